//! Several migrations at once, each VM to its own destination (`vfmig migrate --plan`), as in
//! the paper's multi-VM scaling. Its bench is `crate::lab::plan_bench`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::migrate::{migrate, MigrateError, MigrateOptions, MigrationSummary, Quiet};
use super::summary::error_text;
use crate::qmp::{QmpClient, QmpError};

/// A plan: `{"migrations":[{"name":…,"src_qmp":…,"dst_qmp":…,"uri":…}, …]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationPlan {
    /// The migrations, run at once.
    pub migrations: Vec<PlannedMigration>,
}

/// One VM of a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedMigration {
    /// A name for the report.
    pub name: String,
    /// QMP socket of the source QEMU.
    pub src_qmp: PathBuf,
    /// QMP socket of the destination QEMU.
    pub dst_qmp: PathBuf,
    /// Migration stream URI.
    pub uri: String,
    /// The source's companion control socket (optional).
    #[serde(default)]
    pub src_control: Option<PathBuf>,
    /// The destination's companion control socket (optional).
    #[serde(default)]
    pub dst_control: Option<PathBuf>,
}

/// How one planned migration ended.
#[derive(Debug, Clone, Serialize)]
pub struct PlanOutcome {
    /// Its name.
    pub name: String,
    /// Its summary, when it completed.
    pub summary: Option<MigrationSummary>,
    /// Why it failed (its source keeps running).
    pub error: Option<String>,
}

/// Why one planned migration did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Its source or destination QEMU could not be reached.
    #[error("cannot connect to the {side} QEMU of `{name}`: check that it runs")]
    Connect {
        /// The migration's name.
        name: String,
        /// `source` or `destination`.
        side: &'static str,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// The migration failed (its source keeps running unless the error says otherwise).
    #[error("the migration of `{name}` failed")]
    Migrate {
        /// The migration's name.
        name: String,
        /// Why.
        #[source]
        source: MigrateError,
    },
}

/// Runs one planned migration with the settings of `common`.
fn migrate_one(
    m: &PlannedMigration,
    common: &MigrateOptions,
) -> Result<MigrationSummary, PlanError> {
    let connect = |path: &PathBuf, side| {
        QmpClient::connect(path, Duration::from_secs(10)).map_err(|source| PlanError::Connect {
            name: m.name.clone(),
            side,
            source,
        })
    };
    let src = connect(&m.src_qmp, "source")?;
    let dst = connect(&m.dst_qmp, "destination")?;
    let opts = MigrateOptions {
        uri: m.uri.clone(),
        companions: m.src_control.clone().zip(m.dst_control.clone()),
        ..common.clone()
    };
    migrate(&src, &dst, &opts, &mut Quiet).map_err(|source| PlanError::Migrate {
        name: m.name.clone(),
        source,
    })
}

/// Runs every migration of `plan` at once with the settings of `common` (its URI and
/// companions are replaced by each entry's).
pub fn migrate_all(plan: &MigrationPlan, common: &MigrateOptions) -> Vec<PlanOutcome> {
    std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .migrations
            .iter()
            .map(|m| {
                s.spawn(move || {
                    let (summary, error) = match migrate_one(m, common) {
                        Ok(s) => (Some(s), None),
                        Err(e) => (None, Some(error_text(&e))),
                    };
                    PlanOutcome {
                        name: m.name.clone(),
                        summary,
                        error,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| PlanOutcome {
                    name: "?".into(),
                    summary: None,
                    error: Some("the migration thread panicked".into()),
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_reads_with_or_without_companions() {
        let plan: MigrationPlan = serde_json::from_str(
            r#"{"migrations":[
                {"name":"a","src_qmp":"/s","dst_qmp":"/d","uri":"tcp:127.0.0.1:1"},
                {"name":"b","src_qmp":"/s2","dst_qmp":"/d2","uri":"tcp:127.0.0.1:2",
                 "src_control":"/sc","dst_control":"/dc"}]}"#,
        )
        .unwrap();
        assert_eq!(plan.migrations.len(), 2);
        assert!(plan.migrations[0].src_control.is_none());
        assert_eq!(plan.migrations[1].dst_control, Some(PathBuf::from("/dc")));
    }

    #[test]
    fn a_failed_migration_names_the_vm_and_says_why_once() {
        let e = PlanError::Connect {
            name: "vm0".into(),
            side: "source",
            source: QmpError::Disconnected {
                path: "/run/vm0/qmp.sock".into(),
            },
        };
        let text = error_text(&e);
        assert!(
            text.starts_with("cannot connect to the source QEMU of `vm0`"),
            "{text}"
        );
        let cause = QmpError::Disconnected {
            path: "/run/vm0/qmp.sock".into(),
        }
        .to_string();
        assert_eq!(text.matches(&cause).count(), 1, "{text}");
    }
}
