//! The VF's move at switchover, between the source's companion and the destination's, and
//! its undo: step 6 of [`migrate`](super::migrate::migrate) moves a copy of the source's VF
//! state ([`take_over_vf`]); once the destination runs the source drops its copy
//! ([`release_source_vf`]); if the destination cannot take over or start, the source takes its
//! state back and resumes ([`roll_back`]).

use std::path::Path;
use std::time::{Duration, Instant};

use super::migrate_error::MigrateError;
use super::options::MigrateOptions;
use super::summary::Takeover;
use crate::companion::control::{error_chain, ControlClient, ControlError};
use crate::qmp::QmpClient;
use crate::vf::soft::VfState;

/// Step 6b, after QEMU completed and the destination could not take over or start: the
/// destination QEMU is stopped (it must never run beside the source), its companion drops
/// what it imported, the source companion takes its VF state back and tells the peers, and
/// the source VM resumes from `postmigrate`. Returns the error to report, which says whether
/// the source runs.
pub(super) fn roll_back(
    src: &QmpClient,
    dst: &QmpClient,
    opts: &MigrateOptions,
    cause: MigrateError,
) -> MigrateError {
    tracing::error!(error = %error_chain(&cause), "the destination did not take over: resuming the source");
    if let Err(e) = dst.quit() {
        tracing::warn!(error = %e, "the destination QEMU did not take `quit` (it may be gone already)");
    }
    if let Some((src_ctl, dst_ctl)) = &opts.companions {
        let dropped = ControlClient::connect(dst_ctl, Duration::from_secs(2))
            .and_then(|mut c| c.vf_release());
        if let Err(e) = dropped {
            tracing::warn!(error = %error_chain(&e), "the destination companion did not drop its VF state (it may be gone)");
        }
        let reclaimed = ControlClient::connect(src_ctl, Duration::from_secs(5))
            .and_then(|mut c| c.vf_reclaim());
        match reclaimed {
            Ok(r) => {
                tracing::info!(announced_to = ?r.announced_to, "the source companion took its VF state back")
            }
            Err(e) => {
                return MigrateError::RollbackFailed {
                    cause: Box::new(cause),
                    resume: format!(
                        "the source companion did not take its VF state back: {}",
                        error_chain(&e)
                    ),
                }
            }
        }
    }
    match src.cont() {
        Ok(()) => MigrateError::RolledBack(Box::new(cause)),
        Err(e) => MigrateError::RollbackFailed {
            cause: Box::new(cause),
            resume: format!("QMP cont on the source failed: {e}"),
        },
    }
}

/// Step 6c: the destination has the VF and runs; the source companion drops its copy, so
/// nothing can take it back by mistake. A failure is logged only: the source VM stays in
/// `postmigrate` and its companion ends with it.
pub(super) fn release_source_vf(src_ctl: &Path) {
    let released =
        ControlClient::connect(src_ctl, Duration::from_secs(5)).and_then(|mut c| c.vf_release());
    if let Err(e) = released {
        tracing::warn!(error = %error_chain(&e), "the source companion did not drop its copy of the VF state");
    }
}

/// Moves the VF from the source's companion (quiesced at switchover) to the destination's:
/// `None` when the source's companion has no VF. The source keeps its copy until
/// [`release_source_vf`].
pub(super) fn take_over_vf(
    src_ctl: &Path,
    dst_ctl: &Path,
) -> Result<Option<Takeover>, MigrateError> {
    let err = |e: ControlError| MigrateError::Takeover(error_chain(&e));
    let start = Instant::now();
    let mut src = ControlClient::connect(src_ctl, Duration::from_secs(5)).map_err(err)?;
    if src.stats().map_err(err)?.soft_vf.is_none() {
        return Ok(None);
    }
    let exported = src.vf_export().map_err(err)?;
    let state: VfState = exported.vf;
    let rx_frames = exported.rx_frames;
    let mut info = Takeover {
        qps: state.qps.len(),
        pending_requests: state.qps.iter().map(|q| q.unacked.len()).sum(),
        waiting_frames: rx_frames.len(),
        ..Default::default()
    };
    let mut dst = ControlClient::connect(dst_ctl, Duration::from_secs(5)).map_err(err)?;
    info.announced_to = dst.vf_import(state, rx_frames).map_err(err)?.announced_to;
    info.ms = start.elapsed().as_secs_f64() * 1e3;
    tracing::info!(?info, "VF moved to the destination's companion");
    Ok(Some(info))
}
