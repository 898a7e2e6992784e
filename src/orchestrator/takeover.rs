//! The VF's move at switchover, between the source's companion and the destination's, and
//! its undo: step 6 of [`migrate`](super::migrate::migrate) moves a copy of the source's VF
//! state ([`take_over_vf`]); once the destination runs the source drops its copy
//! ([`release_source_vf`]); if the destination cannot take over or start, the source takes its
//! state back and resumes ([`roll_back`]). The companions' own steps of the move end up on
//! the trace ([`record_companion_steps`]).

use std::path::Path;
use std::time::{Duration, Instant};

use super::migrate_error::MigrateError;
use super::options::MigrateOptions;
use super::summary::Takeover;
use crate::companion::control::{error_chain, ControlClient, ControlError};
use crate::qmp::QmpClient;
use crate::trace::{TraceRecorder, Track};
use crate::vf::soft::VfState;

/// The orchestrator's track of the VF's move on the trace: (pid 1, tid 3).
pub const TAKEOVER_TRACK: Track = Track::new(Track::ORCHESTRATOR_PID, 3);

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

/// The steps of the destination's companion that end the switchover as the trace shows it:
/// the first completion it queued for the guest after the import, and the first frame the
/// guest sent once it ran again.
pub const LAST_STEPS: [&str; 2] = ["first-completion-to-guest", "first-frame-from-guest"];

/// Puts the companions' own steps of the switchover (quiesce, export, import, announce, the VM
/// running, first replays and completions; at the peers' companions, the announce received,
/// the redial, the replay and the first ack) on their tracks of the trace, each with its
/// duration. Waits up to `wait` for the destination's [`LAST_STEPS`], which come once the
/// guest runs again. A companion that does not answer is logged and left out.
pub(super) fn record_companion_steps(
    trace: &TraceRecorder,
    (src_ctl, dst_ctl): (&Path, &Path),
    peers: &[std::path::PathBuf],
    since: Instant,
    wait: Duration,
) {
    use crate::trace::steps::{unix_us, Step};
    let zero = unix_us(trace.start());
    let from = unix_us(since);
    let fetch = |ctl: &Path| -> Vec<Step> {
        match ControlClient::connect(ctl, Duration::from_secs(1)).and_then(|mut c| c.steps()) {
            Ok(r) => r
                .steps
                .into_iter()
                .filter(|s| s.at_unix_us >= from)
                .collect(),
            Err(e) => {
                tracing::info!(error = %error_chain(&e), "no switchover steps from a companion");
                Vec::new()
            }
        }
    };
    let deadline = Instant::now() + wait;
    let dst_steps = loop {
        let steps = fetch(dst_ctl);
        let seen = |name: &str| steps.iter().any(|s| s.name == name);
        if LAST_STEPS.iter().all(|n| seen(n)) || Instant::now() >= deadline {
            break steps;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut tracks = vec![
        ("source companion".to_string(), fetch(src_ctl)),
        ("destination companion".to_string(), dst_steps),
    ];
    for peer in peers {
        let name = ControlClient::connect(peer, Duration::from_secs(1))
            .and_then(|mut c| c.status())
            .map_or_else(|_| peer.display().to_string(), |s| s.name);
        tracks.push((format!("peer companion {name}"), fetch(peer)));
    }
    for (name, steps) in tracks {
        let pid = trace.register_process(&name);
        let track = Track::new(pid, 1);
        trace.name_thread(track, "switchover steps");
        for s in steps {
            let start = s.at_unix_us - zero;
            let args = serde_json::json!({ "detail": s.detail, "dur_ms": s.dur_us / 1e3 });
            trace.span_on(track, &s.name, "step", start, start + s.dur_us, args);
        }
    }
}

/// Moves the VF from the source's companion (quiesced at switchover) to the destination's:
/// `None` when the source's companion has no VF. The source keeps its copy until
/// [`release_source_vf`].
pub(super) fn take_over_vf(
    src_ctl: &Path,
    dst_ctl: &Path,
    trace: Option<&TraceRecorder>,
) -> Result<Option<Takeover>, MigrateError> {
    let err = |e: ControlError| MigrateError::Takeover(error_chain(&e));
    let start = Instant::now();
    let span = |name: &str, from: Instant| {
        if let Some(tr) = trace {
            let end = tr.now_us();
            let begin = end - from.elapsed().as_secs_f64() * 1e6;
            tr.span_on(
                TAKEOVER_TRACK,
                name,
                "takeover",
                begin,
                end,
                serde_json::Value::Null,
            );
        }
    };
    let mut src = ControlClient::connect(src_ctl, Duration::from_secs(5)).map_err(err)?;
    if src.stats().map_err(err)?.soft_vf.is_none() {
        return Ok(None);
    }
    let export_start = Instant::now();
    let exported = src.vf_export().map_err(err)?;
    span("vf_export", export_start);
    let state: VfState = exported.vf;
    let rx_frames = exported.rx_frames;
    let mut info = Takeover {
        qps: state.qps.len(),
        pending_requests: state.qps.iter().map(|q| q.unacked.len()).sum(),
        waiting_frames: rx_frames.len(),
        ..Default::default()
    };
    let import_start = Instant::now();
    let mut dst = ControlClient::connect(dst_ctl, Duration::from_secs(5)).map_err(err)?;
    info.announced_to = dst.vf_import(state, rx_frames).map_err(err)?.announced_to;
    span("vf_import+announce", import_start);
    info.ms = start.elapsed().as_secs_f64() * 1e3;
    tracing::info!(?info, "VF moved to the destination's companion");
    Ok(Some(info))
}
