//! The per-host settings of the libvirt hook: `/etc/vfmig/host.json`.
//!
//! ```json
//! {"fabric_address": "10.0.0.12", "run_dir": "/run/vfmig"}
//! ```
//! - `fabric_address`: the address this host's companions listen on for the soft VF's fabric
//!   (with each domain's `fabric-port`); needed only by domains that have a fabric port.
//! - `run_dir`: where companions keep their control sockets and logs, one directory per domain
//!   beside its vhost-user socket (default [`DEFAULT_RUN_DIR`](super::DEFAULT_RUN_DIR)); only
//!   `vfmig libvirt domain-xml` uses it, the hook follows each domain's socket path.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the hook reads the host's settings unless `VFMIG_HOST_CONFIG` names another file.
pub const DEFAULT_PATH: &str = "/etc/vfmig/host.json";

/// This host's settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The fabric address of this host's companions.
    #[serde(default)]
    pub fabric_address: Option<String>,
    /// The companions' run directory.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
}

/// Why the host's settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read the vfmig host settings {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not the expected JSON.
    #[error(
        "the vfmig host settings {path} are not valid (expected {{\"fabric_address\": \"IP\", \
         \"run_dir\": \"/run/vfmig\"}})"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl HostConfig {
    /// Reads `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, HostConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(HostConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        serde_json::from_str(&text).map_err(|source| HostConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// The file to read: `VFMIG_HOST_CONFIG`, else [`DEFAULT_PATH`].
    pub fn path() -> PathBuf {
        std::env::var_os("VFMIG_HOST_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_PATH.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_empty_and_a_bad_one_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.json");
        assert_eq!(HostConfig::load(&path).unwrap(), HostConfig::default());
        std::fs::write(&path, r#"{"fabric_address":"10.0.0.1","color":"red"}"#).unwrap();
        let e = HostConfig::load(&path).unwrap_err();
        assert!(e.to_string().contains("host.json"), "{e}");
        std::fs::write(&path, r#"{"fabric_address":"10.0.0.1"}"#).unwrap();
        let c = HostConfig::load(&path).unwrap();
        assert_eq!(c.fabric_address.as_deref(), Some("10.0.0.1"));
    }
}
