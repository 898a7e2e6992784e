//! The VF's move at switchover, between the source's companion and the destination's, and
//! its undo. The companions move it themselves (the source sends its state at the quiesce,
//! the destination claims it when its VM runs: [`crate::companion::handoff`]); step 6 of
//! [`migrate`](super::migrate::migrate) checks that the state arrived before it resumes the
//! destination (`take_over_vf`) and reads what the takeover took ([`finish_takeover`]);
//! once the destination runs the source's copy is dropped (`release_source_vf`, which the
//! claim did already); if the destination cannot take over or start, the source takes its
//! state back and resumes (`roll_back`). The companions' own steps of the move end up on
//! the trace (`record_companion_steps`).

use std::path::Path;
use std::time::{Duration, Instant};

use super::migrate_error::MigrateError;
use super::options::MigrateOptions;
use super::summary::Takeover;
use crate::companion::control::{error_chain, ControlClient, ControlError};
use crate::companion::handoff::{HandoffPhase, HandoffReport};
use crate::qmp::QmpClient;
use crate::trace::{TraceRecorder, Track};

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

/// How long, after QEMU completed, the destination's companion may still be without the VF
/// state the source's companion sent at its quiesce.
pub const HANDOFF_WAIT: Duration = Duration::from_secs(5);

/// Waits until the destination's companion holds the VF state that the source's companion
/// handed it at the switchover quiesce, over the fabric (the companions move it themselves,
/// [`crate::companion::handoff`]): `None` when the source's companion has no soft VF. The
/// destination takes the state over once its VM runs; the source keeps its copy until then.
pub(super) fn take_over_vf(
    src_ctl: &Path,
    dst_ctl: &Path,
    trace: Option<&TraceRecorder>,
) -> Result<Option<Takeover>, MigrateError> {
    let err = |e: ControlError| MigrateError::Takeover(error_chain(&e));
    let start = Instant::now();
    let mut src = ControlClient::connect(src_ctl, Duration::from_secs(5)).map_err(err)?;
    if src.stats().map_err(err)?.soft_vf.is_none() {
        return Ok(None);
    }
    let mut dst = ControlClient::connect(dst_ctl, Duration::from_secs(5)).map_err(err)?;
    let deadline = start + HANDOFF_WAIT;
    let received =
        loop {
            let r = dst.stats().map_err(err)?.handoff;
            match r.phase {
                HandoffPhase::Received | HandoffPhase::TakenOver => break r,
                _ if !r.incoming => return Err(MigrateError::Takeover(
                    "the destination's companion does not wait for an incoming VM: start it with \
                     --incoming (`vfmig launch --role destination` does)"
                        .into(),
                )),
                HandoffPhase::Failed | HandoffPhase::TakenBack => {
                    return Err(MigrateError::Takeover(format!(
                        "the VF handoff did not reach the destination's companion ({:?}): {}",
                        r.phase,
                        r.error.unwrap_or_default()
                    )))
                }
                phase if Instant::now() > deadline => {
                    let source = src.stats().map(|s| s.handoff).ok();
                    return Err(MigrateError::Takeover(format!(
                        "the destination's companion has no VF state {} s after QEMU completed \
                     (it is {phase:?}; the source's handoff is {:?}): check that both companions \
                     reach each other on the fabric",
                        HANDOFF_WAIT.as_secs(),
                        source.map(|h| h.phase)
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        };
    if let Some(tr) = trace {
        let end = tr.now_us();
        let begin = end - start.elapsed().as_secs_f64() * 1e6;
        tr.span_on(
            TAKEOVER_TRACK,
            "handoff-wait",
            "takeover",
            begin,
            end,
            serde_json::Value::Null,
        );
    }
    let info = takeover_of(&src.stats().map_err(err)?.handoff, &received);
    tracing::info!(?info, "the VF state is at the destination's companion");
    Ok(Some(info))
}

/// The handoff as the source's report (`sent`) and the destination's (`received`) show it.
pub fn takeover_of(sent: &HandoffReport, received: &HandoffReport) -> Takeover {
    let mut info = Takeover {
        ms: match (sent.export_started_at_unix_us, received.received_at_unix_us) {
            (Some(a), Some(b)) => (b - a) / 1e3,
            _ => 0.0,
        },
        qps: received.qps,
        pending_requests: received.pending_requests,
        waiting_frames: received.waiting_frames,
        bytes: received.bytes,
        exported_at_unix_us: sent.export_started_at_unix_us,
        ..Default::default()
    };
    fill_takeover(&mut info, received);
    info
}

/// What the destination's takeover took, once its report shows it.
fn fill_takeover(info: &mut Takeover, r: &HandoffReport) {
    if r.phase == HandoffPhase::TakenOver {
        info.takeover_ms = (r.claim_us.unwrap_or(0.0) + r.import_us.unwrap_or(0.0)) / 1e3;
        info.announced_to = r.announced_to.clone();
        if let (Some(a), Some(b)) = (info.exported_at_unix_us, r.announced_at_unix_us) {
            info.blackout_ms = (b - a) / 1e3;
        }
    }
}

/// Once the destination runs: what its companion's takeover of the VF took (the claim, the
/// import and the announce), waiting up to `wait` for it.
pub fn finish_takeover(dst_ctl: &Path, info: &mut Takeover, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        let r = ControlClient::connect(dst_ctl, Duration::from_secs(1))
            .and_then(|mut c| c.stats())
            .map(|s| s.handoff);
        match r {
            Ok(r) if r.phase == HandoffPhase::TakenOver => return fill_takeover(info, &r),
            Ok(r) if r.phase == HandoffPhase::Failed => {
                tracing::error!(error = ?r.error, "the destination's companion did not take the VF over");
                return;
            }
            Err(e) if Instant::now() > deadline => {
                tracing::info!(error = %error_chain(&e), "no takeover report from the destination's companion");
                return;
            }
            _ if Instant::now() > deadline => return,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vfs_blackout_runs_from_the_sources_export_to_the_destinations_announce() {
        let sent = HandoffReport {
            export_started_at_unix_us: Some(1_000_000.0),
            ..Default::default()
        };
        let mut received = HandoffReport {
            phase: HandoffPhase::TakenOver,
            received_at_unix_us: Some(1_004_000.0),
            claim_us: Some(1_500.0),
            import_us: Some(2_000.0),
            announced_at_unix_us: Some(1_061_000.0),
            ..Default::default()
        };
        let t = takeover_of(&sent, &received);
        assert_eq!((t.ms, t.takeover_ms, t.blackout_ms), (4.0, 3.5, 61.0));
        // Not taken over yet: no blackout to report.
        received.phase = HandoffPhase::Received;
        assert_eq!(takeover_of(&sent, &received).blackout_ms, 0.0);
    }
}
