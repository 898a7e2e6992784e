//! Several migrations at once, each VM to its own destination (`vfmig migrate --plan`), as in
//! the paper's multi-VM scaling. Its bench is `crate::lab::plan_bench`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::migrate::{migrate, MigrateOptions, MigrationSummary, Quiet};
use crate::qmp::QmpClient;

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

/// Runs every migration of `plan` at once with the settings of `common` (its URI and
/// companions are replaced by each entry's).
pub fn migrate_all(plan: &MigrationPlan, common: &MigrateOptions) -> Vec<PlanOutcome> {
    std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .migrations
            .iter()
            .map(|m| {
                s.spawn(move || {
                    let run = || -> Result<MigrationSummary, String> {
                        let src = QmpClient::connect(&m.src_qmp, Duration::from_secs(10))
                            .map_err(|e| e.to_string())?;
                        let dst = QmpClient::connect(&m.dst_qmp, Duration::from_secs(10))
                            .map_err(|e| e.to_string())?;
                        let opts = MigrateOptions {
                            uri: m.uri.clone(),
                            companions: m.src_control.clone().zip(m.dst_control.clone()),
                            ..common.clone()
                        };
                        migrate(&src, &dst, &opts, &mut Quiet).map_err(|e| e.to_string())
                    };
                    let (summary, error) = match run() {
                        Ok(s) => (Some(s), None),
                        Err(e) => (None, Some(e)),
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
