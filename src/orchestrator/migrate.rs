//! The migration state machine. It reads top to bottom:
//!
//! 1. **prepare the destination**: capabilities, `migrate-incoming` on the URI;
//! 2. **suspend** (`cooperative` and `passthrough-hotplug`): every rank's guest runtime is told
//!    SUSPEND and the migration waits until all report ready, as in the paper's
//!    migration-thread design;
//! 3. **detach** (`passthrough-hotplug` only): the VF, a PCI device of QEMU, is unplugged
//!    (`device_del`) and the migration waits until the guest has released it;
//! 4. **precopy**: capabilities and parameters on the source, `migrate`, then follow
//!    `query-migrate` and QEMU's `MIGRATION` / `MIGRATION_PASS` events;
//! 5. **switchover**: the source stops (QEMU status `device`); the companion quiesces the VF
//!    inside `GET_VRING_BASE`, and QEMU's last log sync picks up its last writes;
//! 6. **destination up**: the destination has all of RAM and is paused (`-S`); its companion
//!    takes over the VF (the source's VF state moves, and the VM's new place is announced to
//!    its peers); then, unless `keep_paused`, it is resumed, once;
//! 7. **attach** (`passthrough-hotplug` only): a free VF of the destination is plugged in
//!    (`device_add`) and the migration waits until the guest's driver has enabled it;
//! 8. **resume** (`cooperative` and `passthrough-hotplug`): every rank's runtime is told RESUME;
//! 9. **done**.
//!
//! If the migration fails or is cancelled after step 2, the source is put back as it was: the
//! VF is plugged in again (when its arguments are known) and every rank is told RESUME.
//! Every phase becomes a span of the returned timeline.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::hotplug::{self, Hotplug, HotplugTimes};
use crate::companion::control::{error_chain, ControlClient, ControlError, GuestEvent, Request};
use crate::qmp::{MigrationInfo, QmpClient, QmpError};
use crate::trace::TraceRecorder;
use crate::vf::soft::VfState;

/// The phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Capabilities and `migrate-incoming` on the destination.
    PrepareDestination,
    /// `cooperative`, `passthrough-hotplug`: every rank's runtime suspends communication and
    /// reports ready.
    Suspend,
    /// `passthrough-hotplug`: the VF is unplugged from the source.
    Detach,
    /// RAM is copied while the source runs.
    Precopy,
    /// The source is stopped; last dirty pages and device state move.
    Switchover,
    /// The destination takes over and is resumed.
    DestinationUp,
    /// `passthrough-hotplug`: a VF is plugged into the destination and its driver comes up.
    Attach,
    /// `cooperative`, `passthrough-hotplug`: every rank's runtime communicates again.
    Resume,
    /// Finished.
    Done,
}

/// One phase's place on the timeline, in ms from the start of the migration.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSpan {
    /// The phase.
    pub phase: Phase,
    /// Start, ms.
    pub start_ms: f64,
    /// End, ms.
    pub end_ms: f64,
}

/// Operator settings of one migration. `Default` is QEMU's own settings, no companions, no
/// trace, and a 600 s timeout; set at least `uri`.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Migration stream URI, e.g. `tcp:127.0.0.1:4444`.
    pub uri: String,
    /// Leave the destination paused after completion (no `cont`).
    pub keep_paused: bool,
    /// QEMU `max-bandwidth`, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// QEMU `downtime-limit`, ms.
    pub downtime_limit_ms: Option<u64>,
    /// Multifd channels (capability `multifd` on both sides, `multifd-channels`).
    pub multifd: Option<u32>,
    /// Give up (and cancel) after this long.
    pub timeout: Duration,
    /// Control sockets of the source's and the destination's companions: with them, the VF
    /// moves at switchover, and the destination's companion is watched during precopy.
    pub companions: Option<(PathBuf, PathBuf)>,
    /// Set from elsewhere (Ctrl-C) to cancel the migration.
    pub cancel: Option<Arc<AtomicBool>>,
    /// `cooperative` strategy: the control sockets of every rank's companion (the migrating
    /// VM's source companion among them), told SUSPEND before precopy and RESUME after.
    pub cooperative: Option<Vec<PathBuf>>,
    /// `passthrough-hotplug` strategy (with `cooperative`): the VF is a PCI device of QEMU,
    /// unplugged before precopy and plugged in at the destination after it.
    pub hotplug: Option<Hotplug>,
    /// Where the timeline goes (phases, QEMU's passes, query-migrate and companion samples).
    pub trace: Option<Arc<TraceRecorder>>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            uri: String::new(),
            keep_paused: false,
            max_bandwidth: None,
            downtime_limit_ms: None,
            multifd: None,
            timeout: Duration::from_secs(600),
            companions: None,
            cancel: None,
            cooperative: None,
            hotplug: None,
            trace: None,
        }
    }
}

/// Samples the source companion onto the trace, at most every 100 ms: pages its device
/// dirtied in this migration (and the bytes they made QEMU resend), and requests it holds.
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
    }
}

/// What a migration did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationSummary {
    /// QEMU's final status on the source (`completed`).
    pub status: String,
    /// QEMU's total migration time, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms.
    pub downtime_ms: u64,
    /// QEMU's setup time, ms.
    pub setup_ms: u64,
    /// RAM bytes sent.
    pub transferred_bytes: u64,
    /// Guest RAM size as QEMU counts it.
    pub ram_total_bytes: u64,
    /// Dirty-bitmap syncs QEMU made (each one also syncs the vhost-user log).
    pub dirty_sync_count: u64,
    /// Whether the destination was resumed.
    pub destination_resumed: bool,
    /// The VF's move to the destination's companion, when there was a VF to move.
    pub vf_takeover: Option<Takeover>,
    /// `passthrough-hotplug`: how long the unplug and the plug took.
    pub hotplug: Option<HotplugTimes>,
    /// The phases.
    pub timeline: Vec<PhaseSpan>,
    /// Wall-clock time of the whole state machine, ms.
    pub wall_ms: u64,
}

/// The VF's move at switchover.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Takeover {
    /// Time from the start of the export to the end of the import and announce, ms.
    pub ms: f64,
    /// QPs moved.
    pub qps: usize,
    /// Requests in flight that the destination will replay.
    pub pending_requests: usize,
    /// Frames that waited for the guest and moved.
    pub waiting_frames: usize,
    /// Peers told of the VM's new place.
    pub announced_to: Vec<String>,
}

/// Errors of a migration. After any of them the source VM keeps running.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A QMP call failed.
    #[error("{side} QEMU: {source}")]
    Qmp {
        /// `source` or `destination`.
        side: &'static str,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// QEMU reported the migration failed.
    #[error("migration failed: {reason}; the source VM keeps running")]
    Failed {
        /// QEMU's `error-desc`.
        reason: String,
    },
    /// The migration was cancelled.
    #[error("migration cancelled; the source VM keeps running")]
    Cancelled,
    /// The destination died during the migration; it was cancelled.
    #[error(
        "the destination's {what} died during the migration ({detail}); the migration was \
         cancelled and the source VM keeps running{source_state}. Restart the destination and \
         migrate again"
    )]
    DestinationDied {
        /// `QEMU` or `companion`.
        what: &'static str,
        /// What was seen.
        detail: String,
        /// How the source was left, for the message.
        source_state: String,
    },
    /// It took too long; it was cancelled.
    #[error("migration did not finish within {secs} s and was cancelled; the source VM keeps running. Raise --timeout or --max-bandwidth")]
    Timeout {
        /// The limit.
        secs: u64,
    },
    /// The VF could not move to the destination's companion.
    #[error(
        "the VF could not move to the destination's companion: {0}; the destination stays paused"
    )]
    Takeover(String),
    /// A rank's runtime did not report ready after SUSPEND.
    #[error("cooperative suspend: {0}; nothing was migrated and every rank was told RESUME")]
    Suspend(String),
    /// The passthrough VF could not be unplugged from the source.
    #[error("passthrough-hotplug: unplugging the VF: {0}. Nothing was migrated; every rank was told RESUME")]
    Detach(String),
    /// The passthrough VF could not be plugged in at the destination.
    #[error(
        "passthrough-hotplug: the VM runs at the destination, but plugging in its VF failed: \
         {0}. Every rank was told RESUME; plug a VF in by hand (QMP device_add) if the job needs it"
    )]
    Attach(String),
    /// The destination did not reach `paused` after completion.
    #[error("the destination did not reach the paused state after completion (it is {status})")]
    DestinationNotReady {
        /// Its status.
        status: String,
    },
}

/// Someone who wants to watch a migration (a progress bar, a trace).
pub trait Observer {
    /// A phase begins.
    fn phase(&mut self, _phase: Phase) {}
    /// A `query-migrate` sample of the source.
    fn sample(&mut self, _info: &MigrationInfo) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

struct Timeline {
    start: Instant,
    spans: Vec<PhaseSpan>,
    trace: Option<Arc<TraceRecorder>>,
}

impl Timeline {
    /// µs since the start, on the trace's clock.
    fn us(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e6
    }

    fn enter(&mut self, phase: Phase, observer: &mut dyn Observer) {
        let now = self.start.elapsed().as_secs_f64() * 1e3;
        if let Some(last) = self.spans.last_mut() {
            last.end_ms = now;
        }
        if self.spans.last().map(|s| s.phase) != Some(phase) {
            self.spans.push(PhaseSpan {
                phase,
                start_ms: now,
                end_ms: now,
            });
            tracing::info!(?phase, at_ms = now as u64, "migration phase");
            if let Some(tr) = &self.trace {
                let name = serde_json::to_value(phase)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                tr.enter_phase_at(&name, self.us());
                if phase == Phase::Done {
                    tr.close_phase_at(self.us());
                }
            }
            observer.phase(phase);
        }
    }
}

/// Capabilities set on both sides.
fn capabilities(opts: &MigrateOptions) -> Vec<(&'static str, bool)> {
    let mut caps = vec![("events", true)];
    if opts.multifd.is_some() {
        caps.push(("multifd", true));
    }
    caps
}

/// Parameters set on both sides (multifd channels must match).
fn shared_parameters(opts: &MigrateOptions) -> Option<serde_json::Value> {
    opts.multifd
        .map(|n| serde_json::json!({ "multifd-channels": n }))
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
    let mut t = Timeline {
        // Trace timestamps count from the start of the migration.
        start: Instant::now(),
        spans: vec![],
        trace: opts.trace.clone(),
    };
    // The source companion's samples on the trace, when there is a trace and a companion.
    let mut sampler = match (&opts.trace, &opts.companions) {
        (Some(tr), Some((src_ctl, _))) => CompanionSampler::new(tr.clone(), src_ctl),
        _ => None,
    };

    // 1. Prepare the destination.
    t.enter(Phase::PrepareDestination, observer);
    let caps = capabilities(opts);
    dst.migrate_set_capabilities(&caps).map_err(on_dst)?;
    if let Some(p) = shared_parameters(opts) {
        dst.migrate_set_parameters(p).map_err(on_dst)?;
    }
    dst.migrate_incoming(&opts.uri).map_err(on_dst)?;

    // 2. Cooperative and passthrough-hotplug: every rank suspends and reports ready.
    if let Some(ranks) = &opts.cooperative {
        t.enter(Phase::Suspend, observer);
        if let Err(e) = send_event_and_wait(ranks, GuestEvent::Suspend, Duration::from_secs(60)) {
            resume_ranks(ranks, None);
            return Err(MigrateError::Suspend(e));
        }
    }

    // 3. Passthrough-hotplug: the VF leaves the source; the guest must release it.
    let mut hotplug_times = None;
    if let Some(h) = &opts.hotplug {
        t.enter(Phase::Detach, observer);
        match hotplug::detach(src, &h.device_id, h.detach_timeout) {
            Ok(took) => {
                hotplug_times = Some(HotplugTimes {
                    detach_ms: took.as_secs_f64() * 1e3,
                    ..Default::default()
                })
            }
            Err(e) => {
                if let Some(ranks) = &opts.cooperative {
                    resume_ranks(ranks, None);
                }
                return Err(MigrateError::Detach(e.to_string()));
            }
        }
    }

    // 4-5. Precopy and switchover. On failure the source is put back as it was before step 2.
    let info = match precopy(src, dst, opts, &mut t, observer, sampler.as_mut()) {
        Ok(info) => info,
        Err(e) => {
            restore_source(src, opts, hotplug_times.is_some());
            return Err(e);
        }
    };
    // A switchover too short to be seen still has a span.
    t.enter(Phase::Switchover, observer);

    // 6. Destination up: it has all of RAM and stays paused (-S) until resumed here, once.
    t.enter(Phase::DestinationUp, observer);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = dst.query_status().map_err(on_dst)?;
        if s.status == "paused" || s.status == "running" || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.status != "paused" && status.status != "running" {
        return Err(MigrateError::DestinationNotReady {
            status: status.status,
        });
    }
    let vf_takeover = match &opts.companions {
        Some((src_ctl, dst_ctl)) => take_over_vf(src_ctl, dst_ctl)?,
        None => None,
    };
    let resumed = if opts.keep_paused {
        false
    } else {
        dst.cont().map_err(on_dst)?;
        true
    };

    // 7. Passthrough-hotplug: a free VF of the destination goes in; its driver must come up.
    let mut attach_error = None;
    if opts.keep_paused && (opts.hotplug.is_some() || opts.cooperative.is_some()) {
        tracing::warn!(
            "the destination stays paused (keep_paused): no VF is plugged in and no rank is \
             told RESUME; do both once it runs"
        );
    } else if let (Some(h), Some(times)) = (&opts.hotplug, hotplug_times.as_mut()) {
        t.enter(Phase::Attach, observer);
        match hotplug::attach(dst, &h.destination_device, h.attach_timeout) {
            Ok((took, addr)) => {
                times.attach_ms = took.as_secs_f64() * 1e3;
                times.destination_address = addr;
            }
            Err(e) => attach_error = Some(e.to_string()),
        }
    }

    // 8. Cooperative and passthrough-hotplug: every rank resumes; the migrated VM's runtime is
    // told through the destination's companion.
    if let (Some(ranks), false) = (&opts.cooperative, opts.keep_paused) {
        t.enter(Phase::Resume, observer);
        resume_ranks(ranks, opts.companions.as_ref());
    }
    if let Some(e) = attach_error {
        return Err(MigrateError::Attach(e));
    }

    // 9. Done.
    t.enter(Phase::Done, observer);
    let ram = info.ram.clone().unwrap_or_default();
    Ok(MigrationSummary {
        status: info.status.clone().unwrap_or_default(),
        total_ms: info.total_time.unwrap_or(0),
        downtime_ms: info.downtime.unwrap_or(0),
        setup_ms: info.setup_time.unwrap_or(0),
        transferred_bytes: ram.transferred.unwrap_or(0),
        ram_total_bytes: ram.total.unwrap_or(0),
        dirty_sync_count: ram.dirty_sync_count.unwrap_or(0),
        destination_resumed: resumed,
        vf_takeover,
        hotplug: hotplug_times,
        wall_ms: t.start.elapsed().as_millis() as u64,
        timeline: t.spans,
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
    let mut params = match shared_parameters(opts) {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    if let Some(bw) = opts.max_bandwidth {
        params.insert("max-bandwidth".into(), bw.into());
    }
    if let Some(dl) = opts.downtime_limit_ms {
        params.insert("downtime-limit".into(), dl.into());
    }
    if !params.is_empty() {
        src.migrate_set_parameters(params.into()).map_err(on_src)?;
    }
    let events = src.events();
    while events.try_recv().is_ok() {} // drop what came before this migration
    t.enter(Phase::Precopy, observer);
    src.migrate(&opts.uri).map_err(on_src)?;

    // Follow the source until QEMU says it is finished; its MIGRATION events mark the
    // switchover (`device`) more precisely than polling would.
    let info = loop {
        for ev in events.try_iter() {
            if ev.event == "MIGRATION" {
                match ev.data["status"].as_str() {
                    Some("device") | Some("pre-switchover") => t.enter(Phase::Switchover, observer),
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
                wait_source_settled(src);
                return Err(MigrateError::Cancelled);
            }
        }
        if let Some((what, detail)) = destination_dead(dst, opts.companions.as_ref().map(|c| &c.1))
        {
            tracing::error!(what, %detail, "the destination died: cancelling the migration");
            let _ = src.migrate_cancel();
            let state = wait_source_settled(src);
            return Err(MigrateError::DestinationDied {
                what,
                detail,
                source_state: state,
            });
        }
        let info = src.query_migrate().map_err(on_src)?;
        observer.sample(&info);
        if let Some(tr) = &t.trace {
            tr.migration_info(t.us(), &info);
        }
        if let Some(s) = sampler.as_mut() {
            s.sample(t.us());
        }
        match info.status.as_deref() {
            Some("completed") => break info,
            Some("failed") => {
                // A destination that died makes the stream fail: say so.
                if let Some((what, detail)) =
                    destination_dead(dst, opts.companions.as_ref().map(|c| &c.1))
                {
                    let state = wait_source_settled(src);
                    return Err(MigrateError::DestinationDied {
                        what,
                        detail,
                        source_state: state,
                    });
                }
                return Err(MigrateError::Failed {
                    reason: info
                        .error_desc
                        .clone()
                        .unwrap_or_else(|| "no reason given".into()),
                });
            }
            Some("cancelled") => return Err(MigrateError::Cancelled),
            Some("device") => t.enter(Phase::Switchover, observer),
            _ => {}
        }
        if t.start.elapsed() > opts.timeout {
            let _ = src.migrate_cancel();
            return Err(MigrateError::Timeout {
                secs: opts.timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(info)
}

/// After a failed or cancelled migration: the VF back into the source (when it was unplugged
/// and its arguments are known) and RESUME to every rank, so that the job goes on where it was.
fn restore_source(src: &QmpClient, opts: &MigrateOptions, detached: bool) {
    if let (true, Some(h)) = (detached, &opts.hotplug) {
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
    if let Some(ranks) = &opts.cooperative {
        resume_ranks(ranks, None);
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
        tracing::warn!(error = %e, "not every rank acknowledged RESUME");
    }
}

/// Tells every rank's runtime `event` through its companion and waits until each has
/// acknowledged it.
fn send_event_and_wait(
    ranks: &[PathBuf],
    event: GuestEvent,
    timeout: Duration,
) -> Result<(), String> {
    let acks = |c: &mut ControlClient| -> Result<u64, String> {
        let link = c.stats().map_err(|e| error_chain(&e))?.guest_link;
        Ok(match event {
            GuestEvent::Suspend => link.suspend_acks,
            GuestEvent::Resume => link.resume_acks,
        })
    };
    let mut clients = Vec::new();
    for path in ranks {
        let mut c =
            ControlClient::connect(path, Duration::from_secs(5)).map_err(|e| error_chain(&e))?;
        let before = acks(&mut c)?;
        c.send_event(event).map_err(|e| error_chain(&e))?;
        clients.push((path, c, before));
    }
    let deadline = Instant::now() + timeout;
    for (path, c, before) in clients.iter_mut() {
        loop {
            if acks(c)? > *before {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the runtime behind {} did not acknowledge {event:?} within {} s",
                    path.display(),
                    timeout.as_secs()
                ));
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

/// After a cancel or failure: waits until QEMU reports the migration over and the source
/// running again, and describes the source's state for the message.
fn wait_source_settled(src: &QmpClient) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let over = src
            .query_migrate()
            .map(|i| i.is_finished() || i.status.is_none())
            .unwrap_or(true);
        let running = src.query_status().map(|s| s.running).unwrap_or(false);
        if over && running {
            return String::new();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match src.query_status() {
        Ok(s) => format!(" (its state is {}: check it)", s.status),
        Err(e) => format!(" (its state could not be read: {e})"),
    }
}

/// Moves the VF from the source's companion (quiesced at switchover) to the destination's:
/// `None` when the source's companion has no VF.
fn take_over_vf(src_ctl: &Path, dst_ctl: &Path) -> Result<Option<Takeover>, MigrateError> {
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

/// Runs `f` with a progress bar on stderr when it is a terminal, and with no observer when it
/// is not (no progress noise in logs and pipes).
pub fn with_progress<T>(f: impl FnOnce(&mut dyn Observer) -> T) -> T {
    match TerminalProgress::on_stderr() {
        Some(mut bar) => f(&mut bar),
        None => f(&mut Quiet),
    }
}

/// A progress bar on the terminal: phase, percent of RAM sent, rate and ETA.
pub struct TerminalProgress {
    bar: indicatif::ProgressBar,
}

impl TerminalProgress {
    /// A bar on stderr, or `None` when stderr is not a terminal (no progress noise then).
    pub fn on_stderr() -> Option<Self> {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>20} [{bar:30}] {percent:>3}% {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Some(Self { bar })
    }
}

impl Observer for TerminalProgress {
    fn phase(&mut self, phase: Phase) {
        self.bar.set_message(format!("{phase:?}"));
        if phase == Phase::Done {
            self.bar.finish();
        }
    }

    fn sample(&mut self, info: &MigrationInfo) {
        if let Some(ram) = &info.ram {
            let total = ram.total.unwrap_or(0);
            let remaining = ram.remaining.unwrap_or(total);
            self.bar.set_length(total);
            self.bar.set_position(total.saturating_sub(remaining));
        }
    }
}
