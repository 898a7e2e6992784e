//! The cluster file: which fabric address each VM's companion listens on, each VM's public
//! key, the job key (or the file that holds it), and the other fabric addresses VMs may move to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// VM name → fabric address (`host:port`) of its companion, and the fabric's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// The map.
    pub vms: BTreeMap<String, String>,
    /// VM name → its static public key (64 hex digits), as `vfmig keys generate` writes it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, String>,
    /// The file (mode 0600) holding the job key; relative to the cluster file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_key_file: Option<PathBuf>,
    /// The job key itself (64 hex digits), instead of `job_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_key: Option<String>,
    /// Further fabric addresses a VM may announce after migrating (the destinations' companions).
    /// A peer's link is only ever pointed at an address in `vms` or here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// Why a cluster file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    /// The file could not be read.
    #[error("cannot read cluster file {}; check the path given with --cluster", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a cluster map.
    #[error(
        "cluster file {} is malformed; write it as {{\"vms\": {{\"NAME\": \"host:port\", ...}}}}",
        path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
}

impl ClusterMap {
    /// Reads a cluster file: `{"vms": {"a": "10.0.0.1:7000", ...}}`.
    pub fn load(path: &Path) -> Result<Self, ClusterFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterFileError::Read {
            path: path.into(),
            source,
        })?;
        let mut map: Self =
            serde_json::from_str(&text).map_err(|source| ClusterFileError::Malformed {
                path: path.into(),
                source,
            })?;
        if let (Some(f), Some(dir)) = (&map.job_key_file, path.parent()) {
            map.job_key_file = Some(dir.join(f));
        }
        Ok(map)
    }

    /// Whether a peer's link may point at `addr`: one of the cluster's fabric addresses.
    pub fn allows_address(&self, addr: &str) -> bool {
        self.vms.values().any(|a| a == addr) || self.hosts.iter().any(|a| a == addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_file_loads_and_its_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("cluster.json");
        std::fs::write(&good, r#"{"vms": {"a": "127.0.0.1:7000"}}"#).unwrap();
        let map = ClusterMap::load(&good).unwrap();
        assert_eq!(map.vms["a"], "127.0.0.1:7000");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        let e = ClusterMap::load(&bad).unwrap_err();
        assert!(matches!(e, ClusterFileError::Malformed { .. }));
        assert!(e.to_string().contains("bad.json"));
        let e = ClusterMap::load(&dir.path().join("none.json")).unwrap_err();
        assert!(matches!(e, ClusterFileError::Read { .. }));
    }
}
