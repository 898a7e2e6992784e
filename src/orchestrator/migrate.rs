//! The migration state machine. It reads top to bottom:
//!
//! 1. **prepare the destination**: capabilities, `migrate-incoming` on the URI (and, under
//!    `unsafe-no-tracking`, the source companion stops logging device writes);
//! 2. **suspend** (`cooperative` and `passthrough-hotplug`): every rank's guest runtime is told
//!    SUSPEND and the migration waits until all report ready, as in the paper's
//!    migration-thread design;
//! 3. **detach** (`passthrough-hotplug` only): the VF, a PCI device of QEMU, is unplugged
//!    (`device_del`) and the migration waits until the guest has released it;
//! 4. **precopy**: capabilities and parameters on the source, `migrate`, then follow
//!    `query-migrate` and QEMU's `MIGRATION` / `MIGRATION_PASS` events;
//! 5. **switchover**: the source stops (QEMU status `device`); the companion quiesces the VF
//!    inside `GET_VRING_BASE`, and QEMU's last log sync picks up its last writes;
//! 6. **destination up**: QEMU completed; the VF's state went from the source's companion to
//!    the destination's at the quiesce (the companions' handoff); the migration checks that it
//!    arrived, then, once the destination is paused (`-S`) with all of RAM, resumes it, once,
//!    unless `keep_paused`; as the VM starts there, its companion claims the state, imports it
//!    and announces the VM's new place. If the state did not arrive or `cont` fails, the
//!    destination is stopped, the source companion takes its VF state back and the source VM
//!    resumes (6b); otherwise the source companion's copy is dropped (6c);
//! 7. **attach** (`passthrough-hotplug` only): a free VF of the destination is plugged in
//!    (`device_add`) and the migration waits until the guest's driver has enabled it;
//! 8. **resume** (`cooperative` and `passthrough-hotplug`): every rank's runtime is told RESUME;
//! 9. **done**.
//!
//! The strategy is matched once, at the top of [`migrate`]: it decides which of steps 2, 3, 7
//! and 8 run, and whether device writes are logged. If the migration fails or is cancelled
//! after step 2, the source is put back as it was: the VF is plugged in again (when its
//! arguments are known) and every rank is told RESUME. A destination that dies, or a cancel
//! that comes, just as QEMU completes leaves the source stopped in `postmigrate`: it is rolled
//! back as in 6b. Every phase becomes a span of the returned timeline.
//!
//! Beside this file: [`options`](super::options) (what the operator sets),
//! [`strategy`](super::strategy), [`summary`](super::summary) (phases and what the migration
//! did), [`migrate_error`](super::migrate_error) (how it fails) and
//! [`progress`](super::progress) (observers).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hotplug::{self, Hotplug, HotplugTimes};
use super::options::{capabilities, expected_bandwidth, shared_parameters, source_parameters};
use super::progress::Timeline;
use super::takeover::{
    finish_takeover, record_companion_steps, release_source_vf, roll_back, take_over_vf,
};
use crate::companion::control::{error_chain, ControlClient, ControlError, GuestEvent, Request};
use crate::qmp::{MigrationInfo, QmpClient};
use crate::trace::TraceRecorder;

pub use super::migrate_error::{MigrateError, RankEventError};
pub use super::options::MigrateOptions;
pub use super::progress::{with_progress, Observer, Quiet, TerminalProgress};
pub use super::strategy::{Strategy, StrategyKind};
pub use super::summary::{MigrationSummary, Phase, PhaseSpan, Takeover};

/// Samples the source companion onto the trace, at most every 100 ms: pages its device
/// dirtied in this migration (and the bytes they made QEMU resend), requests it holds, and
/// its device throttle (the rate in force, 0 when none, and the bytes it delayed).
struct CompanionSampler {
    trace: Arc<TraceRecorder>,
    control: ControlClient,
    pid: u32,
    last_us: f64,
}

impl CompanionSampler {
    fn new(trace: Arc<TraceRecorder>, control: &Path) -> Option<Self> {
        let control = ControlClient::connect(control, Duration::from_secs(2)).ok()?;
        let pid = trace.register_process("source companion");
        Some(Self {
            trace,
            control,
            pid,
            last_us: f64::NEG_INFINITY,
        })
    }

    fn sample(&mut self, now_us: f64) {
        if now_us - self.last_us < 100_000.0 {
            return;
        }
        self.last_us = now_us;
        let s = match self.control.stats() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "no companion sample");
                return;
            }
        };
        let pages = s.device_dirty_pages as f64;
        self.trace
            .counter_for(self.pid, "device_dirty_pages", now_us, pages);
        self.trace
            .counter_for(self.pid, "bytes_resent", now_us, pages * 4096.0);
        if let Some(vf) = &s.soft_vf {
            self.trace
                .counter_for(self.pid, "held_ops", now_us, vf.held as f64);
        }
        let t = &s.throttle;
        self.trace
            .counter_for(self.pid, "device_throttle_rate", now_us, t.rate as f64);
        self.trace.counter_for(
            self.pid,
            "device_throttle_delayed_bytes",
            now_us,
            t.delayed_bytes as f64,
        );
    }
}

/// Tells the source companion the device-throttle policy and the migration's bandwidth. A
/// companion that does not take them keeps its own (`auto` by default, at QEMU's default
/// bandwidth): the migration goes on, with a warning.
fn tell_throttle(src_ctl: &Path, opts: &MigrateOptions) {
    let bandwidth = expected_bandwidth(opts);
    let told = ControlClient::connect(src_ctl, Duration::from_secs(5))
        .and_then(|mut c| c.set_throttle(opts.device_throttle, bandwidth));
    if let Err(e) = told {
        tracing::warn!(
            error = %error_chain(&e),
            policy = %opts.device_throttle,
            "the source companion did not take the device-throttle policy; it keeps its own"
        );
    }
}

/// What the strategy adds to the steps every migration takes.
struct Steps<'a> {
    /// Steps 2 and 8: the ranks told SUSPEND and RESUME; empty: none.
    ranks: &'a [PathBuf],
    /// Steps 3 and 7: the passthrough VF, unplugged and plugged in again.
    hotplug: Option<&'a Hotplug>,
    /// Step 1: the source companion stops logging device writes (the negative control).
    untracked: bool,
}

impl<'a> Steps<'a> {
    /// The one place where the strategies differ.
    fn of(strategy: &'a Strategy) -> Self {
        let (ranks, hotplug, untracked): (&[PathBuf], _, _) = match strategy {
            Strategy::Transparent => (&[], None, false),
            Strategy::Cooperative { ranks } => (ranks, None, false),
            Strategy::PassthroughHotplug { ranks, hotplug } => (ranks, Some(hotplug), false),
            Strategy::UnsafeNoTracking => (&[], None, true),
        };
        Self {
            ranks,
            hotplug,
            untracked,
        }
    }
}

/// Migrates the VM behind `src` into the one behind `dst`.
pub fn migrate(
    src: &QmpClient,
    dst: &QmpClient,
    opts: &MigrateOptions,
    observer: &mut dyn Observer,
) -> Result<MigrationSummary, MigrateError> {
    let on_dst = |source| MigrateError::Qmp {
        side: "destination",
        source,
    };
    let steps = Steps::of(&opts.strategy);
    if steps.untracked && opts.companions.is_none() {
        return Err(MigrateError::NoCompanion);
    }
    let mut t = Timeline::new(opts.trace.clone());
    // The source companion's samples on the trace, when there is a trace and a companion.
    let mut sampler = match (&opts.trace, &opts.companions) {
        (Some(tr), Some((src_ctl, _))) => CompanionSampler::new(tr.clone(), src_ctl),
        _ => None,
    };

    // 1. Prepare the destination; unsafe-no-tracking: the source companion stops logging.
    t.enter(Phase::PrepareDestination, observer);
    if let Some((src_ctl, _)) = &opts.companions {
        tell_throttle(src_ctl, opts);
    }
    if let (true, Some((src_ctl, _))) = (steps.untracked, &opts.companions) {
        ControlClient::connect(src_ctl, Duration::from_secs(5))
            .and_then(|mut c| c.call(&Request::SetTracking { enabled: false }))
            .map_err(MigrateError::Tracking)?;
    }
    let caps = capabilities(opts);
    dst.migrate_set_capabilities(&caps).map_err(on_dst)?;
    if let Some(p) = shared_parameters(opts) {
        dst.migrate_set_parameters(p).map_err(on_dst)?;
    }
    dst.migrate_incoming(&opts.uri).map_err(on_dst)?;

    // 2. Cooperative and passthrough-hotplug: every rank suspends and reports ready.
    if !steps.ranks.is_empty() {
        t.enter(Phase::Suspend, observer);
        if let Err(e) =
            send_event_and_wait(steps.ranks, GuestEvent::Suspend, Duration::from_secs(60))
        {
            resume_ranks(steps.ranks, None);
            return Err(MigrateError::Suspend(e));
        }
    }

    // 3. Passthrough-hotplug: the VF leaves the source; the guest must release it.
    let mut hotplug_times = None;
    if let Some(h) = steps.hotplug {
        t.enter(Phase::Detach, observer);
        match hotplug::detach(src, &h.device_id, h.detach_timeout) {
            Ok(took) => {
                hotplug_times = Some(HotplugTimes {
                    detach_ms: took.as_secs_f64() * 1e3,
                    ..Default::default()
                })
            }
            Err(e) => {
                resume_ranks(steps.ranks, None);
                return Err(MigrateError::Detach(e));
            }
        }
    }

    // 4-5. Precopy and switchover. On failure the source is put back as it was before step 2.
    let info = match precopy(src, dst, opts, &mut t, observer, sampler.as_mut()) {
        Ok(info) => info,
        Err(e) => {
            // A destination that died, or a cancel that came, as QEMU completed leaves the
            // source in `postmigrate`: it resumes as after a failed takeover (6b).
            let e = match e {
                MigrateError::DestinationLost { .. } | MigrateError::CancelledAtCompletion => {
                    roll_back(src, dst, opts, e)
                }
                e => e,
            };
            restore_source(src, &steps, hotplug_times.is_some());
            return Err(e);
        }
    };
    // A switchover too short to be seen still has a span.
    t.enter(Phase::Switchover, observer);

    // 6. Destination up: it has all of RAM and stays paused (-S) until resumed here, once.
    // If it cannot take over the VF or start, the source takes its VF state back and resumes
    // (6b); once it runs, the source companion drops its copy of the VF state (6c).
    t.enter(Phase::DestinationUp, observer);
    let (mut vf_takeover, resumed) = match destination_up(dst, opts) {
        Ok(up) => up,
        Err(e) => {
            let e = roll_back(src, dst, opts, e);
            restore_source(src, &steps, hotplug_times.is_some());
            return Err(e);
        }
    };
    if let (Some(info), Some((src_ctl, dst_ctl))) = (&mut vf_takeover, &opts.companions) {
        if resumed {
            finish_takeover(dst_ctl, info, Duration::from_secs(2));
        }
        release_source_vf(src_ctl);
    }
    if let (Some(tr), Some((src_ctl, dst_ctl)), true) =
        (&opts.trace, &opts.companions, vf_takeover.is_some())
    {
        let wait = if resumed {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        let ctls = (src_ctl.as_path(), dst_ctl.as_path());
        record_companion_steps(tr, ctls, &opts.peer_controls, t.start, wait);
    }

    // 7. Passthrough-hotplug: a free VF of the destination goes in; its driver must come up.
    let mut attach_error = None;
    if opts.keep_paused && (steps.hotplug.is_some() || !steps.ranks.is_empty()) {
        tracing::warn!(
            "the destination stays paused (keep_paused): no VF is plugged in and no rank is \
             told RESUME; do both once it runs"
        );
    } else if let (Some(h), Some(times)) = (steps.hotplug, hotplug_times.as_mut()) {
        t.enter(Phase::Attach, observer);
        match hotplug::attach(dst, &h.destination_device, h.attach_timeout) {
            Ok((took, addr)) => {
                times.attach_ms = took.as_secs_f64() * 1e3;
                times.destination_address = addr;
            }
            Err(e) => attach_error = Some(e),
        }
    }

    // 8. Cooperative and passthrough-hotplug: every rank resumes; the migrated VM's runtime is
    // told through the destination's companion.
    if !steps.ranks.is_empty() && !opts.keep_paused {
        t.enter(Phase::Resume, observer);
        resume_ranks(steps.ranks, opts.companions.as_ref());
    }
    if let Some(e) = attach_error {
        return Err(MigrateError::Attach(e));
    }

    // 9. Done.
    t.enter(Phase::Done, observer);
    Ok(MigrationSummary {
        destination_resumed: resumed,
        vf_takeover,
        hotplug: hotplug_times,
        wall_ms: t.start.elapsed().as_millis() as u64,
        timeline: t.spans,
        ..MigrationSummary::from_qemu(&info)
    })
}

/// Steps 4 and 5: precopy until QEMU reports the migration completed, watching for a cancel,
/// a dead destination and the timeout. The source keeps running after any error.
fn precopy(
    src: &QmpClient,
    dst: &QmpClient,
    opts: &MigrateOptions,
    t: &mut Timeline,
    observer: &mut dyn Observer,
    mut sampler: Option<&mut CompanionSampler>,
) -> Result<MigrationInfo, MigrateError> {
    let on_src = |source| MigrateError::Qmp {
        side: "source",
        source,
    };
    let caps = capabilities(opts);
    src.migrate_set_capabilities(&caps).map_err(on_src)?;
    let params = source_parameters(opts);
    if !params.is_empty() {
        src.migrate_set_parameters(params.into()).map_err(on_src)?;
    }
    let events = src.events();
    while events.try_recv().is_ok() {} // drop what came before this migration
    t.enter(Phase::Precopy, observer);
    src.migrate(&opts.uri).map_err(on_src)?;

    // Follow the source until QEMU says it is finished; its MIGRATION events mark the
    // switchover (`device`) and the completion more precisely than polling would: the loop
    // waits for the next event, or polls again after a while.
    let mut next_event = None;
    let mut switchover = false;
    let info = loop {
        for ev in next_event.take().into_iter().chain(events.try_iter()) {
            if ev.event == "MIGRATION" {
                match ev.data["status"].as_str() {
                    Some("device") | Some("pre-switchover") => {
                        switchover = true;
                        t.enter(Phase::Switchover, observer)
                    }
                    _ => {}
                }
            }
            if ev.event == "MIGRATION_PASS" {
                if let Some(tr) = &t.trace {
                    tr.pass(t.us(), ev.data["pass"].as_u64().unwrap_or(0));
                }
            }
        }
        if let Some(flag) = &opts.cancel {
            if flag.load(Ordering::SeqCst) {
                tracing::warn!("cancel requested: migrate_cancel on the source");
                src.migrate_cancel().map_err(on_src)?;
                return Err(match wait_source_settled(src) {
                    // Too late for QEMU: it completed, and the source waits in `postmigrate`.
                    SourceSettled::Postmigrate => MigrateError::CancelledAtCompletion,
                    _ => MigrateError::Cancelled,
                });
            }
        }
        if let Some((what, detail)) = destination_dead(dst, opts.companions.as_ref().map(|c| &c.1))
        {
            tracing::error!(what, %detail, "the destination died: cancelling the migration");
            let _ = src.migrate_cancel();
            return Err(destination_died(src, what, detail));
        }
        let info = src.query_migrate().map_err(on_src)?;
        observer.sample(&info);
        if let Some(tr) = &t.trace {
            tr.migration_info(t.us(), &info);
        }
        if let (Some(s), false) = (sampler.as_mut(), switchover) {
            s.sample(t.us());
        }
        match info.status.as_deref() {
            Some("completed") => break info,
            Some("failed") => {
                // A destination that died makes the stream fail: say so.
                if let Some((what, detail)) =
                    destination_dead(dst, opts.companions.as_ref().map(|c| &c.1))
                {
                    return Err(destination_died(src, what, detail));
                }
                return Err(MigrateError::Failed {
                    reason: info
                        .error_desc
                        .clone()
                        .unwrap_or_else(|| "no reason given".into()),
                });
            }
            Some("cancelled") => return Err(MigrateError::Cancelled),
            Some("device") | Some("pre-switchover") => {
                switchover = true;
                t.enter(Phase::Switchover, observer)
            }
            _ => {}
        }
        if t.start.elapsed() > opts.timeout {
            let _ = src.migrate_cancel();
            return Err(MigrateError::Timeout {
                secs: opts.timeout.as_secs(),
            });
        }
        // The completion's event wakes the loop at once (QEMU's monitor sends nothing while
        // its migration thread holds the big lock through stop-and-copy, so `device` is rarely
        // seen before `completed`); without events it polls, often inside the switchover.
        let wait = if switchover { 5 } else { 50 };
        next_event = events.recv_timeout(Duration::from_millis(wait)).ok();
    };
    Ok(info)
}

/// After a failed or cancelled migration: the VF back into the source (when it was unplugged
/// and its arguments are known) and RESUME to every rank, so that the job goes on where it was.
fn restore_source(src: &QmpClient, steps: &Steps, detached: bool) {
    if let (true, Some(h)) = (detached, steps.hotplug) {
        // QEMU refuses device_add while a migration is still being cancelled.
        wait_source_settled(src);
        match &h.source_device {
            Some(args) => match hotplug::attach(src, args, h.attach_timeout) {
                Ok((took, _)) => tracing::info!(
                    ms = took.as_millis() as u64,
                    "the VF is plugged back into the source"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "the VF could not be plugged back into the source")
                }
            },
            None => tracing::warn!(
                id = %h.device_id,
                "the source runs without its VF: no source device arguments were given to plug it back"
            ),
        }
    }
    if !steps.ranks.is_empty() {
        resume_ranks(steps.ranks, None);
    }
}

/// Tells every rank RESUME (the migrated VM's through its destination companion when `moved`
/// names the source's and the destination's control sockets); logs those that do not ack.
fn resume_ranks(ranks: &[PathBuf], moved: Option<&(PathBuf, PathBuf)>) {
    let targets: Vec<PathBuf> = ranks
        .iter()
        .map(|r| match moved {
            Some((src_ctl, dst_ctl)) if r == src_ctl => dst_ctl.clone(),
            _ => r.clone(),
        })
        .collect();
    if let Err(e) = send_event_and_wait(&targets, GuestEvent::Resume, Duration::from_secs(30)) {
        tracing::warn!(error = %error_chain(&e), "not every rank acknowledged RESUME");
    }
}

/// Tells every rank's runtime `event` through its companion and waits until each has
/// acknowledged it.
fn send_event_and_wait(
    ranks: &[PathBuf],
    event: GuestEvent,
    timeout: Duration,
) -> Result<(), RankEventError> {
    fn control(path: &Path) -> impl FnOnce(ControlError) -> RankEventError + '_ {
        move |source| RankEventError::Control {
            path: path.to_path_buf(),
            source,
        }
    }
    let acks = |c: &mut ControlClient, path: &PathBuf| -> Result<u64, RankEventError> {
        let link = c.stats().map_err(control(path))?.guest_link;
        Ok(match event {
            GuestEvent::Suspend => link.suspend_acks,
            GuestEvent::Resume => link.resume_acks,
        })
    };
    let mut clients = Vec::new();
    for path in ranks {
        let mut c = ControlClient::connect(path, Duration::from_secs(5)).map_err(control(path))?;
        let before = acks(&mut c, path)?;
        c.send_event(event).map_err(control(path))?;
        clients.push((path, c, before));
    }
    let deadline = Instant::now() + timeout;
    for (path, c, before) in clients.iter_mut() {
        loop {
            if acks(c, path)? > *before {
                break;
            }
            if Instant::now() > deadline {
                return Err(RankEventError::NoAck {
                    path: path.to_path_buf(),
                    event,
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// Whether the destination's QEMU or companion is gone, and what was seen.
fn destination_dead(
    dst: &QmpClient,
    dst_control: Option<&PathBuf>,
) -> Option<(&'static str, String)> {
    if let Err(e) = dst.query_status() {
        if e.is_disconnected() {
            return Some(("QEMU", e.to_string()));
        }
    }
    if let Some(path) = dst_control {
        match ControlClient::connect(path, Duration::from_millis(200)) {
            Err(e) => return Some(("companion", error_chain(&e))),
            Ok(mut c) => {
                if let Err(e) = c.call(&Request::Status) {
                    return Some(("companion", error_chain(&e)));
                }
            }
        }
    }
    None
}

/// The error for a destination that died during steps 4-5, once the source has settled:
/// [`MigrateError::DestinationLost`] when QEMU had completed on the source (it waits in
/// `postmigrate` for the rollback), [`MigrateError::DestinationDied`] otherwise.
fn destination_died(src: &QmpClient, what: &'static str, detail: String) -> MigrateError {
    match wait_source_settled(src) {
        SourceSettled::Running => MigrateError::DestinationDied {
            what,
            detail,
            source_state: String::new(),
        },
        SourceSettled::Postmigrate => MigrateError::DestinationLost { what, detail },
        SourceSettled::Other(note) => MigrateError::DestinationDied {
            what,
            detail,
            source_state: note,
        },
    }
}

/// How the source was left after a cancel or failure.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSettled {
    /// The migration is over and the source runs.
    Running,
    /// QEMU completed the migration on the source's side: it stays stopped until it is
    /// resumed (QMP `cont`, after its companion took its VF state back).
    Postmigrate,
    /// Anything else, described for a message (" (its state is …: check it)").
    Other(String),
}

/// After a cancel or failure: waits (up to 30 s) until QEMU reports the migration over and the
/// source running again, or in `postmigrate` (where it stays until resumed).
pub fn wait_source_settled(src: &QmpClient) -> SourceSettled {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let over = src
            .query_migrate()
            .map(|i| i.is_finished() || i.status.is_none())
            .unwrap_or(true);
        match src.query_status() {
            Ok(s) if over && s.running => return SourceSettled::Running,
            Ok(s) if over && s.status == "postmigrate" => return SourceSettled::Postmigrate,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    SourceSettled::Other(match src.query_status() {
        Ok(s) => format!(" (its state is {}: check it)", s.status),
        Err(e) => format!(" (its state could not be read: {e})"),
    })
}

/// Step 6: checks that the VF's state reached the destination's companion (the handoff,
/// overlapping the destination's last loading), waits until the destination is paused with
/// all of RAM and, unless `keep_paused`, resumes it. Returns the takeover and whether the
/// destination runs.
fn destination_up(
    dst: &QmpClient,
    opts: &MigrateOptions,
) -> Result<(Option<Takeover>, bool), MigrateError> {
    let on_dst = |source| MigrateError::Qmp {
        side: "destination",
        source,
    };
    let vf_takeover = match &opts.companions {
        Some((src_ctl, dst_ctl)) => take_over_vf(src_ctl, dst_ctl, opts.trace.as_deref())?,
        None => None,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = dst.query_status().map_err(on_dst)?;
        if s.status == "paused" || s.status == "running" || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if status.status != "paused" && status.status != "running" {
        return Err(MigrateError::DestinationNotReady {
            status: status.status,
        });
    }
    if opts.keep_paused {
        return Ok((vf_takeover, false));
    }
    if let Err(e) = dst.cont() {
        // A `cont` whose reply was lost may have started it: then it runs, and stays.
        if !dst.query_status().is_ok_and(|s| s.running) {
            return Err(on_dst(e));
        }
        tracing::warn!(error = %e, "cont failed but the destination runs");
    }
    Ok((vf_takeover, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn hotplug() -> Hotplug {
        Hotplug {
            device_id: "vf0".into(),
            destination_device: hotplug::device_args("vfio-pci,id=vf0").unwrap(),
            source_device: None,
            detach_timeout: Duration::from_secs(1),
            attach_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn each_strategy_adds_its_own_steps() {
        let ranks: Vec<PathBuf> = vec!["a".into(), "b".into()];
        let cases = [
            (Strategy::Transparent, 0, false, false),
            (
                Strategy::Cooperative {
                    ranks: ranks.clone(),
                },
                2,
                false,
                false,
            ),
            (
                Strategy::PassthroughHotplug {
                    ranks: ranks.clone(),
                    hotplug: hotplug(),
                },
                2,
                true,
                false,
            ),
            (Strategy::UnsafeNoTracking, 0, false, true),
        ];
        let mut seen = BTreeMap::new();
        for (strategy, n_ranks, has_hotplug, untracked) in &cases {
            let s = Steps::of(strategy);
            assert_eq!(s.ranks.len(), *n_ranks, "{strategy:?}");
            assert_eq!(s.hotplug.is_some(), *has_hotplug, "{strategy:?}");
            assert_eq!(s.untracked, *untracked, "{strategy:?}");
            seen.insert(format!("{:?}", strategy.kind()), ());
        }
        assert_eq!(seen.len(), 4, "every strategy is covered");
    }

    #[test]
    fn a_passthrough_vf_without_ranks_suspends_nobody() {
        let s = Strategy::PassthroughHotplug {
            ranks: vec![],
            hotplug: hotplug(),
        };
        let steps = Steps::of(&s);
        assert!(steps.ranks.is_empty());
        assert_eq!(steps.hotplug.map(|h| h.device_id.as_str()), Some("vf0"));
    }

    /// A QEMU that answers every command from `answer` (by name) and records the names.
    /// `answer` returns the reply and the events to send after it.
    fn fake_qemu(
        answer: impl Fn(&str) -> (serde_json::Value, Vec<serde_json::Value>) + Send + 'static,
    ) -> (QmpClient, Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Write};
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            let mut out = theirs.try_clone().unwrap();
            let mut send = |v: serde_json::Value| {
                let _ = writeln!(out, "{v}");
            };
            send(serde_json::json!({"QMP": {"version": {"qemu":
                {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}));
            for line in BufReader::new(theirs).lines() {
                let Ok(line) = line else { return };
                let cmd: serde_json::Value = serde_json::from_str(&line).unwrap();
                let name = cmd["execute"].as_str().unwrap_or_default().to_string();
                let (reply, events) = match name.as_str() {
                    "qmp_capabilities" => (serde_json::json!({}), vec![]),
                    other => {
                        log.lock().unwrap().push(other.to_string());
                        answer(other)
                    }
                };
                match reply.get("__error") {
                    Some(desc) => send(serde_json::json!({"error":
                        {"class": "GenericError", "desc": desc}, "id": cmd["id"]})),
                    None => send(serde_json::json!({"return": reply, "id": cmd["id"]})),
                }
                for e in events {
                    send(e);
                }
            }
        });
        let client = QmpClient::over(ours, Duration::from_secs(5)).unwrap();
        (client, seen)
    }

    fn source_qemu() -> (QmpClient, Arc<std::sync::Mutex<Vec<String>>>) {
        fake_qemu(|cmd| match cmd {
            "query-migrate" => (
                serde_json::json!({"status": "completed", "total-time": 120, "downtime": 7,
                    "ram": {"transferred": 4096, "total": 8192, "remaining": 0}}),
                vec![],
            ),
            "query-status" => (
                serde_json::json!({"status": "postmigrate", "running": false}),
                vec![],
            ),
            "device_del" => (
                serde_json::json!({}),
                vec![
                    serde_json::json!({"event": "DEVICE_DELETED", "data": {"device": "vf0"},
                    "timestamp": {"seconds": 0, "microseconds": 0}}),
                ],
            ),
            _ => (serde_json::json!({}), vec![]),
        })
    }

    fn destination_qemu() -> (QmpClient, Arc<std::sync::Mutex<Vec<String>>>) {
        fake_qemu(|cmd| match cmd {
            "query-status" => (
                serde_json::json!({"status": "paused", "running": false}),
                vec![],
            ),
            "query-pci" => (
                serde_json::json!([{"bus": 0, "devices": [{"bus": 1, "slot": 0, "function": 0,
                    "qdev_id": "vf0", "regions": [{"bar": 0, "type": "memory",
                    "address": 4_261_412_864u64, "size": 4096}]}]}]),
                vec![],
            ),
            _ => (serde_json::json!({}), vec![]),
        })
    }

    fn phases(summary: &MigrationSummary) -> Vec<Phase> {
        summary.timeline.iter().map(|s| s.phase).collect()
    }

    #[test]
    fn a_transparent_migration_runs_the_common_steps_only() {
        let ((src, src_seen), (dst, dst_seen)) = (source_qemu(), destination_qemu());
        let opts = MigrateOptions {
            uri: "tcp:127.0.0.1:1".into(),
            ..Default::default()
        };
        let summary = migrate(&src, &dst, &opts, &mut Quiet).unwrap();
        assert_eq!(
            phases(&summary),
            [
                Phase::PrepareDestination,
                Phase::Precopy,
                Phase::Switchover,
                Phase::DestinationUp,
                Phase::Done
            ]
        );
        assert!(summary.destination_resumed);
        assert_eq!((summary.total_ms, summary.downtime_ms), (120, 7));
        assert!(summary.hotplug.is_none() && summary.vf_takeover.is_none());
        let src_seen = src_seen.lock().unwrap().clone();
        assert!(!src_seen.iter().any(|c| c == "device_del"), "{src_seen:?}");
        let dst_seen = dst_seen.lock().unwrap().clone();
        assert!(dst_seen.contains(&"cont".to_string()), "{dst_seen:?}");
    }

    #[test]
    fn a_passthrough_vf_is_unplugged_before_precopy_and_plugged_in_after() {
        let ((src, src_seen), (dst, dst_seen)) = (source_qemu(), destination_qemu());
        let opts = MigrateOptions {
            uri: "tcp:127.0.0.1:1".into(),
            strategy: Strategy::PassthroughHotplug {
                ranks: vec![],
                hotplug: hotplug(),
            },
            ..Default::default()
        };
        let summary = migrate(&src, &dst, &opts, &mut Quiet).unwrap();
        assert_eq!(
            phases(&summary),
            [
                Phase::PrepareDestination,
                Phase::Detach,
                Phase::Precopy,
                Phase::Switchover,
                Phase::DestinationUp,
                Phase::Attach,
                Phase::Done
            ]
        );
        let times = summary.hotplug.expect("hotplug times");
        assert_eq!(times.destination_address.as_deref(), Some("01:00.0"));
        let src_seen = src_seen.lock().unwrap().clone();
        let del = src_seen.iter().position(|c| c == "device_del").unwrap();
        let mig = src_seen.iter().position(|c| c == "migrate").unwrap();
        assert!(del < mig, "{src_seen:?}");
        let dst_seen = dst_seen.lock().unwrap().clone();
        let cont = dst_seen.iter().position(|c| c == "cont").unwrap();
        let add = dst_seen.iter().position(|c| c == "device_add").unwrap();
        assert!(cont < add, "{dst_seen:?}");
    }

    #[test]
    fn unsafe_no_tracking_without_a_companion_is_refused_before_anything_happens() {
        let ((src, src_seen), (dst, dst_seen)) = (source_qemu(), destination_qemu());
        let opts = MigrateOptions {
            uri: "tcp:127.0.0.1:1".into(),
            strategy: Strategy::UnsafeNoTracking,
            ..Default::default()
        };
        let e = migrate(&src, &dst, &opts, &mut Quiet).unwrap_err();
        assert!(matches!(e, MigrateError::NoCompanion), "{e:?}");
        assert!(e.to_string().contains("--src-control"), "{e}");
        assert!(src_seen.lock().unwrap().is_empty());
        assert!(dst_seen.lock().unwrap().is_empty());
    }

    /// A companion's control socket that answers each `cmd` from `answer` (`Err`: refused)
    /// and records the commands.
    fn fake_companion(
        dir: &Path,
        name: &str,
        answer: impl Fn(&str) -> Result<serde_json::Value, String> + Send + Sync + 'static,
    ) -> (PathBuf, Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Write};
        let path = dir.join(name);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (log, answer) = (seen.clone(), Arc::new(answer));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (log, answer) = (log.clone(), answer.clone());
                std::thread::spawn(move || {
                    let mut out = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                        let cmd = req["cmd"].as_str().unwrap_or_default().to_string();
                        log.lock().unwrap().push(cmd.clone());
                        let reply = match answer(&cmd) {
                            Ok(mut v) => {
                                v["ok"] = true.into();
                                v
                            }
                            Err(e) => serde_json::json!({"ok": false, "error": e}),
                        };
                        let _ = writeln!(out, "{reply}");
                    }
                });
            }
        });
        (path, seen)
    }

    /// The destination got `quit` and never `cont`.
    fn destination_stopped_before_it_ran(seen: &Arc<std::sync::Mutex<Vec<String>>>) {
        assert!(
            position(seen, "quit").is_some(),
            "the destination is stopped"
        );
        assert!(
            position(seen, "cont").is_none(),
            "the destination never runs"
        );
    }

    fn position(seen: &Arc<std::sync::Mutex<Vec<String>>>, cmd: &str) -> Option<usize> {
        seen.lock().unwrap().iter().position(|c| c == cmd)
    }

    #[test]
    fn a_failed_cont_at_the_destination_stops_it_and_resumes_the_source() {
        let (src, src_seen) = source_qemu();
        let (dst, dst_seen) = fake_qemu(|cmd| match cmd {
            "query-status" => (
                serde_json::json!({"status": "paused", "running": false}),
                vec![],
            ),
            "cont" => (
                serde_json::json!({"__error": "no vhost-user backend"}),
                vec![],
            ),
            _ => (serde_json::json!({}), vec![]),
        });
        let msg = rolled_back(&src, &dst, MigrateOptions::default());
        assert!(msg.contains("no vhost-user backend"), "{msg}");
        assert!(
            position(&dst_seen, "cont") < position(&dst_seen, "quit"),
            "the destination is stopped after its failed cont"
        );
        assert!(position(&src_seen, "cont").is_some(), "the source resumes");
    }

    #[test]
    fn a_failed_takeover_gives_the_vf_state_back_to_the_source_before_it_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let ((src, src_seen), (dst, dst_seen)) = (source_qemu(), destination_qemu());
        let (src_ctl, src_calls) = fake_companion(dir.path(), "src.sock", |cmd| match cmd {
            "vf_reclaim" => Ok(serde_json::json!({"announced_to": ["b"]})),
            _ => Err("the source companion refuses".into()),
        });
        // The destination's companion fails at the takeover (as one killed after `completed`).
        let (dst_ctl, dst_calls) = fake_companion(dir.path(), "dst.sock", |cmd| match cmd {
            "status" => Ok(serde_json::json!({})),
            _ => Err("the destination companion is going away".into()),
        });
        let opts = MigrateOptions {
            uri: "tcp:127.0.0.1:1".into(),
            companions: Some((src_ctl, dst_ctl)),
            ..Default::default()
        };
        let e = migrate(&src, &dst, &opts, &mut Quiet).unwrap_err();
        assert!(matches!(e, MigrateError::RolledBack(_)), "{e:?}");
        assert!(e.to_string().contains("the VF could not move"), "{e}");
        assert!(position(&src_calls, "vf_reclaim").is_some());
        assert!(
            position(&dst_calls, "vf_release").is_some(),
            "it drops what it has"
        );
        destination_stopped_before_it_ran(&dst_seen);
        assert!(position(&src_seen, "cont").is_some(), "the source resumes");
    }

    #[test]
    fn a_source_companion_that_cannot_take_its_state_back_leaves_the_source_paused() {
        let dir = tempfile::tempdir().unwrap();
        let ((src, src_seen), (dst, _)) = (source_qemu(), destination_qemu());
        let (src_ctl, _) = fake_companion(dir.path(), "src.sock", |_| Err("released".into()));
        let (dst_ctl, dst_calls) = fake_companion(dir.path(), "dst.sock", |cmd| match cmd {
            "status" => Ok(serde_json::json!({})),
            "vf_release" => Ok(serde_json::json!({"had_state": false})),
            _ => Err("no".into()),
        });
        let opts = MigrateOptions {
            uri: "tcp:127.0.0.1:1".into(),
            companions: Some((src_ctl, dst_ctl)),
            ..Default::default()
        };
        let e = migrate(&src, &dst, &opts, &mut Quiet).unwrap_err();
        assert!(matches!(e, MigrateError::RollbackFailed { .. }), "{e:?}");
        assert!(e.to_string().contains("paused in `postmigrate`"), "{e}");
        assert!(position(&dst_calls, "vf_release").is_some());
        assert!(
            position(&src_seen, "cont").is_none(),
            "never resumed without its VF state"
        );
    }

    /// Migrates with `opts` (to a dummy URI), which must roll back; returns its message.
    fn rolled_back(src: &QmpClient, dst: &QmpClient, opts: MigrateOptions) -> String {
        let opts = MigrateOptions {
            uri: "tcp:127.0.0.1:1".into(),
            ..opts
        };
        let e = migrate(src, dst, &opts, &mut Quiet).unwrap_err();
        assert!(matches!(e, MigrateError::RolledBack(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("the source VM was resumed"), "{msg}");
        msg
    }

    /// A destination QEMU whose QMP socket closes once it has taken `migrate-incoming`, as
    /// one killed during the migration.
    fn dying_qemu() -> QmpClient {
        use std::io::{BufRead, BufReader, Write};
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut out = theirs.try_clone().unwrap();
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({"QMP": {"version": {"qemu":
                    {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}})
            );
            for line in BufReader::new(theirs).lines() {
                let Ok(line) = line else { return };
                let cmd: serde_json::Value = serde_json::from_str(&line).unwrap();
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({"return": {}, "id": cmd["id"]})
                );
                if cmd["execute"] == "migrate-incoming" {
                    return;
                }
            }
        });
        QmpClient::over(ours, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn a_destination_that_dies_as_qemu_completes_is_stopped_and_the_source_resumes() {
        // The source has sent everything and waits in `postmigrate`: it does not run again by
        // itself, so "the source keeps running" would be false and the job would stall.
        let (src, src_seen) = source_qemu();
        let dst = dying_qemu();
        let msg = rolled_back(&src, &dst, MigrateOptions::default());
        assert!(
            msg.contains("died as QEMU completed the migration"),
            "{msg}"
        );
        assert!(position(&src_seen, "cont").is_some(), "the source resumes");
    }

    #[test]
    fn a_cancel_that_comes_as_qemu_completes_resumes_the_source_instead_of_the_destination() {
        let ((src, src_seen), (dst, dst_seen)) = (source_qemu(), destination_qemu());
        let opts = MigrateOptions {
            cancel: Some(Arc::new(std::sync::atomic::AtomicBool::new(true))),
            ..Default::default()
        };
        let msg = rolled_back(&src, &dst, opts);
        assert!(msg.contains("cancelled as QEMU completed"), "{msg}");
        assert!(position(&src_seen, "cont").is_some(), "the source resumes");
        destination_stopped_before_it_ran(&dst_seen);
    }

    #[test]
    fn a_cancel_in_precopy_leaves_the_running_source_alone() {
        let (src, src_seen) = fake_qemu(|cmd| match cmd {
            "query-migrate" => (serde_json::json!({"status": "cancelled"}), vec![]),
            "query-status" => (
                serde_json::json!({"status": "running", "running": true}),
                vec![],
            ),
            _ => (serde_json::json!({}), vec![]),
        });
        let (dst, dst_seen) = destination_qemu();
        let opts = MigrateOptions {
            uri: "tcp:127.0.0.1:1".into(),
            cancel: Some(Arc::new(std::sync::atomic::AtomicBool::new(true))),
            ..Default::default()
        };
        let e = migrate(&src, &dst, &opts, &mut Quiet).unwrap_err();
        assert!(matches!(e, MigrateError::Cancelled), "{e:?}");
        assert!(position(&src_seen, "cont").is_none());
        assert!(position(&dst_seen, "quit").is_none());
    }
}
