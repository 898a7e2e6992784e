//! A live migration as any QMP client drives it, with no vfmig command at all: `migrate-incoming`
//! on the destination, `migrate` on the source, `query-migrate` until it completes, `cont` on
//! the destination. This is what libvirt, Nova or an operator's own script send; the VMs'
//! companions move the VF between themselves (the handoff), so the job keeps its RDMA state.
//! The companions are only read afterwards, for the report.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::companion::control::{error_chain, ControlClient};
use crate::orchestrator::summary::MigrationSummary;
use crate::orchestrator::takeover::{finish_takeover, takeover_of};
use crate::qmp::{QmpClient, QmpError};

/// Why the plainly driven migration failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpDriveError {
    /// A QMP command failed.
    #[error("QMP `{command}` on the {side} failed")]
    Qmp {
        /// The command.
        command: &'static str,
        /// `source` or `destination`.
        side: &'static str,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// QEMU ended the migration without completing it.
    #[error("the migration ended {status}: {reason}")]
    NotCompleted {
        /// QEMU's final status.
        status: String,
        /// QEMU's `error-desc`.
        reason: String,
    },
    /// It took too long.
    #[error("the migration did not complete within {0} s")]
    Timeout(u64),
}

/// Migrates the VM of `src` to `dst` (started with `-incoming defer -S`) over `uri`, at
/// `max_bandwidth` bytes/s when set, as a plain QMP client; resumes the destination. The
/// summary has QEMU's figures and, when the companions' control sockets are given, the VF
/// handoff as they report it.
pub fn migrate(
    src: &QmpClient,
    dst: &QmpClient,
    uri: &str,
    precopy: Precopy<'_>,
    timeout: Duration,
    companions: Option<(&Path, &Path)>,
) -> Result<MigrationSummary, QmpDriveError> {
    let on = |command, side| {
        move |source| QmpDriveError::Qmp {
            command,
            side,
            source,
        }
    };
    let started = Instant::now();
    dst.migrate_incoming(uri)
        .map_err(on("migrate-incoming", "destination"))?;
    if let Some(bw) = precopy.max_bandwidth {
        src.migrate_set_parameters(json!({ "max-bandwidth": bw }))
            .map_err(on("migrate-set-parameters", "source"))?;
    }
    if precopy.at_least.is_some() {
        src.migrate_set_parameters(json!({ "downtime-limit": HELD_DOWNTIME_MS }))
            .map_err(on("migrate-set-parameters", "source"))?;
    }
    src.migrate(uri).map_err(on("migrate", "source"))?;
    let mut held = precopy.at_least;
    // When QEMU's first pass over RAM ended (its second dirty-log sync).
    let mut first_pass_done: Option<Instant> = None;
    let info = loop {
        let info = src.query_migrate().map_err(on("query-migrate", "source"))?;
        if info.is_finished() {
            break info;
        }
        let syncs = info.ram.as_ref().and_then(|r| r.dirty_sync_count);
        if first_pass_done.is_none() && syncs.unwrap_or(0) >= 2 {
            first_pass_done = Some(Instant::now());
        }
        let ready = || precopy.release_when.is_none_or(|f| f());
        if held.is_some_and(|d| first_pass_done.is_some_and(|t| t.elapsed() >= d)) && ready() {
            src.migrate_set_parameters(json!({ "downtime-limit": DEFAULT_DOWNTIME_MS }))
                .map_err(on("migrate-set-parameters", "source"))?;
            held = None;
        }
        if started.elapsed() > timeout {
            let _ = src.migrate_cancel();
            return Err(QmpDriveError::Timeout(timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if info.status.as_deref() != Some("completed") {
        return Err(QmpDriveError::NotCompleted {
            status: info.status.clone().unwrap_or_default(),
            reason: info.error_desc.clone().unwrap_or_default(),
        });
    }
    // The destination has all of RAM once it is paused (`-S`); then it runs.
    loop {
        let s = dst
            .query_status()
            .map_err(on("query-status", "destination"))?;
        if s.status == "paused" || s.running {
            break;
        }
        if started.elapsed() > timeout {
            return Err(QmpDriveError::Timeout(timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    dst.cont().map_err(on("cont", "destination"))?;
    let mut summary = MigrationSummary {
        destination_resumed: true,
        wall_ms: started.elapsed().as_millis() as u64,
        ..MigrationSummary::from_qemu(&info)
    };
    if let Some((src_ctl, dst_ctl)) = companions {
        summary.vf_takeover = handoff_of(src_ctl, dst_ctl);
    }
    Ok(summary)
}

/// How the source's pre-copy is shaped.
#[derive(Default)]
pub struct Precopy<'a> {
    /// QEMU's `max-bandwidth`, bytes/s; none: QEMU's own.
    pub max_bandwidth: Option<u64>,
    /// Keep pre-copy iterating at least this long after its first pass over RAM: QEMU's
    /// `downtime-limit` is held at [`HELD_DOWNTIME_MS`] (no guest that writes memory
    /// converges), then set back to [`DEFAULT_DOWNTIME_MS`]. A page that only the VF writes is
    /// then sent once, in the first pass, and again only if the VF's writes reach QEMU's dirty
    /// log: what a negative control of that log needs.
    pub at_least: Option<Duration>,
    /// With `at_least`: once it has passed, pre-copy is let converge only when this says so
    /// (polled every 10 ms), e.g. when the guest has just begun what the test wants the VM
    /// stopped in.
    pub release_when: Option<&'a dyn Fn() -> bool>,
}

/// `downtime-limit` while [`Precopy::at_least`] holds pre-copy open, ms.
pub const HELD_DOWNTIME_MS: u64 = 1;
/// QEMU's default `downtime-limit`, ms.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// The VF handoff, as the two companions report it once the destination runs.
fn handoff_of(src_ctl: &Path, dst_ctl: &Path) -> Option<crate::orchestrator::summary::Takeover> {
    let report = |ctl: &Path| {
        ControlClient::connect(ctl, Duration::from_secs(2))
            .and_then(|mut c| c.stats())
            .map(|s| s.handoff)
            .map_err(
                |e| tracing::warn!(error = %error_chain(&e), "no handoff report from a companion"),
            )
            .ok()
    };
    let (sent, received) = (report(src_ctl)?, report(dst_ctl)?);
    let mut info = takeover_of(&sent, &received);
    finish_takeover(dst_ctl, &mut info, Duration::from_secs(2));
    Some(info)
}
