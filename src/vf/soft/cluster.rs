//! The cluster file: which fabric address each VM's companion listens on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// VM name → fabric address (`host:port`) of its companion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// The map.
    pub vms: BTreeMap<String, String>,
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
        serde_json::from_str(&text).map_err(|source| ClusterFileError::Malformed {
            path: path.into(),
            source,
        })
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
