//! Faults injected into a migration at a named phase, and the fault matrix of
//! `vfmig bench faults`.
//!
//! The phase comes from the migration's own [`Observer`]: the injector watches the phases and
//! the `query-migrate` samples the orchestrator reports and fires the fault when its phase
//! begins. What each phase means, in terms of what the observer sees:
//!
//! - [`FaultPhase::PrecopyStart`]: `Phase::Precopy` begins (just before QMP `migrate`);
//! - [`FaultPhase::MidPrecopy`]: the first sample, while QEMU is `active`, in which at most
//!   half of RAM remains to be sent (zero pages cost QEMU almost no bytes, so bytes
//!   transferred would never reach half of RAM in a mostly empty guest);
//! - [`FaultPhase::Switchover`]: `Phase::Switchover` begins (QEMU's `MIGRATION` event
//!   `device`: the source is stopped, the VF quiesces inside `GET_VRING_BASE`);
//! - [`FaultPhase::Takeover`]: `Phase::DestinationUp` begins. The export from the source
//!   companion and the import into the destination's happen inside one step of the
//!   orchestrator with no observer call between them, so "between export and import" is not
//!   observable as such; this is the closest point that is: QEMU has reported `completed`
//!   and the VF's state is about to move;
//! - [`FaultPhase::AfterCont`]: `Phase::Done` begins (the destination has been resumed).
//!
//! The fault kinds are [`Fault`]'s: a cancel, the destination's QEMU or companion killed,
//! peer `b`'s companion killed and started again with the same command line, and the fabric
//! link cut (the veths of `a`'s source and destination hosts down for a while, then up).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::hosts;
use crate::orchestrator::migrate::{Observer, Phase};
use crate::qmp::MigrationInfo;

mod matrix;
pub use matrix::{
    classify, markdown, run_cell, run_matrix, Cell, MatrixOptions, MatrixReport, Outcome,
};

/// When, in the migration, a fault is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultPhase {
    /// As precopy begins.
    PrecopyStart,
    /// Once half of RAM has been sent in precopy.
    MidPrecopy,
    /// As the source stops for the switchover.
    Switchover,
    /// After QEMU reported `completed`, as the VF's state moves to the destination.
    Takeover,
    /// After the destination was resumed (`cont`).
    AfterCont,
}

impl FaultPhase {
    /// Every phase, in the migration's order.
    pub const ALL: [FaultPhase; 5] = [
        FaultPhase::PrecopyStart,
        FaultPhase::MidPrecopy,
        FaultPhase::Switchover,
        FaultPhase::Takeover,
        FaultPhase::AfterCont,
    ];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            FaultPhase::PrecopyStart => "precopy-start",
            FaultPhase::MidPrecopy => "mid-precopy",
            FaultPhase::Switchover => "switchover",
            FaultPhase::Takeover => "takeover",
            FaultPhase::AfterCont => "after-cont",
        }
    }
}

/// A failure injected during the migration, to prove the source job survives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The operator cancels (`migrate_cancel`).
    Cancel,
    /// The destination QEMU is killed.
    KillDestinationQemu,
    /// The destination's companion is killed.
    KillDestinationCompanion,
    /// Peer `b`'s companion is killed and started again with the same configuration.
    RestartPeerCompanion,
    /// The fabric link is cut: the veths of `a`'s source and destination hosts go down for
    /// a while, then up again.
    CutLink,
}

impl Fault {
    /// Every kind, as the matrix runs them.
    pub const ALL: [Fault; 5] = [
        Fault::KillDestinationQemu,
        Fault::KillDestinationCompanion,
        Fault::RestartPeerCompanion,
        Fault::CutLink,
        Fault::Cancel,
    ];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Cancel => "cancel",
            Fault::KillDestinationQemu => "kill-destination-qemu",
            Fault::KillDestinationCompanion => "kill-destination-companion",
            Fault::RestartPeerCompanion => "restart-peer-companion",
            Fault::CutLink => "cut-link",
        }
    }
}

/// What sets a fault off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// This long after the migration starts (the older drills).
    After(Duration),
    /// When the migration reaches this phase.
    At(FaultPhase),
}

/// A fault to inject into a scenario's migration.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// What happens.
    pub fault: Fault,
    /// When.
    pub trigger: Trigger,
    /// [`Fault::CutLink`]: how long the link stays down.
    pub link_down: Duration,
    /// A job in which no rank prints anything for this long after the migration is reported
    /// as stalled (`ScenarioReport::stalled`) instead of failing the run; `None`: the run
    /// fails on its timeout as without a fault.
    pub stall: Option<Duration>,
}

impl Injection {
    /// `fault`, `after` the migration starts (the older drills: a stalled job fails the run).
    pub fn after(fault: Fault, after: Duration) -> Self {
        Self {
            fault,
            trigger: Trigger::After(after),
            link_down: Duration::from_secs(3),
            stall: None,
        }
    }

    /// `fault` at `phase`; a job that then prints nothing for `stall` is reported as stalled.
    pub fn at(fault: Fault, phase: FaultPhase, stall: Duration) -> Self {
        Self {
            fault,
            trigger: Trigger::At(phase),
            link_down: Duration::from_secs(3),
            stall: Some(stall),
        }
    }
}

/// What was injected, and when, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// The fault.
    pub fault: Fault,
    /// Its phase (or `after N ms`).
    pub at: String,
    /// When it fired, ms from the start of the migration; `None`: never (its phase did not
    /// come, so the run says nothing about it).
    pub fired_at_ms: Option<f64>,
    /// What else was seen while injecting it.
    pub notes: Vec<String>,
}

/// Peer `b`'s companion, as it was started.
#[derive(Debug, Clone)]
pub struct PeerCompanion {
    /// Its pid.
    pub pid: u32,
    /// Its host's network namespace.
    pub netns: Option<String>,
    /// Where its second life logs.
    pub log: PathBuf,
}

/// What the faults act on, gathered before the migration starts.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The orchestrator's cancel flag.
    pub cancel: Arc<AtomicBool>,
    /// The destination's QEMU.
    pub destination_qemu: Option<u32>,
    /// The destination's companion.
    pub destination_companion: Option<u32>,
    /// Peer `b`'s companion.
    pub peer: Option<PeerCompanion>,
    /// The host-side veths of `a`'s source and destination hosts.
    pub links: Vec<String>,
}

/// A companion started again by [`Fault::RestartPeerCompanion`]; dropping it stops it.
pub struct Restarted(Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What firing a fault left running.
#[derive(Default)]
struct Fired {
    restarted: Option<Restarted>,
    link: Option<std::thread::JoinHandle<()>>,
    notes: Vec<String>,
}

fn kill(pid: Option<u32>, what: &str, notes: &mut Vec<String>) {
    match pid {
        Some(pid) => {
            if let Err(e) = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                notes.push(format!("{what} (pid {pid}) could not be killed: {e}"));
            }
        }
        None => notes.push(format!("{what} was not running")),
    }
}

/// Kills peer `b`'s companion and starts it again with the same command line, in the same
/// host.
fn restart_peer(peer: &PeerCompanion, notes: &mut Vec<String>) -> Option<Restarted> {
    let cmdline = match std::fs::read(format!("/proc/{}/cmdline", peer.pid)) {
        Ok(raw) => raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>(),
        Err(e) => {
            notes.push(format!("peer companion's command line unreadable: {e}"));
            return None;
        }
    };
    kill(Some(peer.pid), "peer companion", notes);
    // Killed, it stays a zombie of its launcher: wait until it is no longer running.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", peer.pid)).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.trim().chars().next());
        if !matches!(state, Some('R' | 'S' | 'D')) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (program, args) = cmdline.split_first()?;
    let mut cmd = match &peer.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    };
    let log = std::fs::File::create(&peer.log);
    let (out, err) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
        Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
        Err(_) => (Stdio::null(), Stdio::null()),
    };
    match cmd
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
    {
        Ok(child) => Some(Restarted(child)),
        Err(e) => {
            notes.push(format!("peer companion could not be started again: {e}"));
            None
        }
    }
}

/// Takes `links` down for `down`, then up again, on a thread of its own.
fn cut_links(links: Vec<String>, down: Duration) -> std::thread::JoinHandle<()> {
    let set = |links: &[String], up: bool| {
        for l in links {
            if let Err(e) = hosts::set_link(l, up) {
                tracing::error!(link = %l, up, error = %e, "cannot set the test link");
            }
        }
    };
    set(&links, false);
    std::thread::spawn(move || {
        std::thread::sleep(down);
        set(&links, true);
    })
}

/// Fires `fault` on `targets`.
fn fire(fault: Fault, targets: &Targets, link_down: Duration) -> Fired {
    tracing::warn!(fault = fault.name(), "injecting a fault into the migration");
    let mut fired = Fired::default();
    match fault {
        Fault::Cancel => targets.cancel.store(true, Ordering::SeqCst),
        Fault::KillDestinationQemu => kill(
            targets.destination_qemu,
            "destination QEMU",
            &mut fired.notes,
        ),
        Fault::KillDestinationCompanion => kill(
            targets.destination_companion,
            "destination companion",
            &mut fired.notes,
        ),
        Fault::RestartPeerCompanion => match &targets.peer {
            Some(p) => fired.restarted = restart_peer(p, &mut fired.notes),
            None => fired.notes.push("no peer to restart".into()),
        },
        Fault::CutLink => fired.link = Some(cut_links(targets.links.clone(), link_down)),
    }
    fired
}

/// Injects one fault into one migration: [`Injector::observing`] wraps the migration's
/// observer; [`Injector::finish`] waits for what the fault started and says what happened.
pub struct Injector {
    injection: Injection,
    targets: Targets,
    start: Instant,
    fired_at_ms: Option<f64>,
    last_status: Option<String>,
    fired: Fired,
    timer: Option<std::thread::JoinHandle<(f64, Fired)>>,
}

impl Injector {
    /// Arms `injection` on `targets`; a timed one starts counting now.
    pub fn arm(injection: Injection, targets: Targets) -> Self {
        let start = Instant::now();
        let timer = match injection.trigger {
            Trigger::After(after) => {
                let (t, fault, down) = (targets.clone(), injection.fault, injection.link_down);
                Some(std::thread::spawn(move || {
                    std::thread::sleep(after);
                    let fired = fire(fault, &t, down);
                    (start.elapsed().as_secs_f64() * 1e3, fired)
                }))
            }
            Trigger::At(_) => None,
        };
        Self {
            injection,
            targets,
            start,
            fired_at_ms: None,
            last_status: None,
            fired: Fired::default(),
            timer,
        }
    }

    /// An observer that passes everything to `inner` and fires the fault at its phase.
    pub fn observing<'a>(&'a mut self, inner: &'a mut dyn Observer) -> Observing<'a> {
        Observing {
            injector: self,
            inner,
        }
    }

    fn fire_if(&mut self, phase: FaultPhase) {
        if self.fired_at_ms.is_some() || self.injection.trigger != Trigger::At(phase) {
            return;
        }
        self.fired_at_ms = Some(self.start.elapsed().as_secs_f64() * 1e3);
        if phase == FaultPhase::Switchover && self.last_status.as_deref() == Some("completed") {
            self.fired
                .notes
                .push("the switchover was seen only once QEMU reported completed".into());
        }
        let fired = fire(
            self.injection.fault,
            &self.targets,
            self.injection.link_down,
        );
        self.fired.notes.extend(fired.notes);
        self.fired.restarted = fired.restarted;
        self.fired.link = fired.link;
    }

    /// Waits for the fault's own threads (a link comes back up) and returns what was
    /// injected, and a restarted companion to keep until the job ends.
    pub fn finish(mut self) -> (FaultRecord, Option<Restarted>) {
        if let Some(t) = self.timer.take() {
            match t.join() {
                Ok((at, fired)) => {
                    self.fired_at_ms = Some(at);
                    self.fired = fired;
                }
                Err(_) => self.fired.notes.push("the fault's timer panicked".into()),
            }
        }
        if let Some(l) = self.fired.link.take() {
            let _ = l.join();
        }
        let at = match self.injection.trigger {
            Trigger::After(d) => format!("after {} ms", d.as_millis()),
            Trigger::At(p) => p.name().to_string(),
        };
        (
            FaultRecord {
                fault: self.injection.fault,
                at,
                fired_at_ms: self.fired_at_ms,
                notes: std::mem::take(&mut self.fired.notes),
            },
            self.fired.restarted.take(),
        )
    }
}

/// The migration's observer with an [`Injector`] watching it.
pub struct Observing<'a> {
    injector: &'a mut Injector,
    inner: &'a mut dyn Observer,
}

impl Observer for Observing<'_> {
    fn phase(&mut self, phase: Phase) {
        self.inner.phase(phase);
        match phase {
            Phase::Precopy => self.injector.fire_if(FaultPhase::PrecopyStart),
            Phase::Switchover => self.injector.fire_if(FaultPhase::Switchover),
            Phase::DestinationUp => self.injector.fire_if(FaultPhase::Takeover),
            Phase::Done => self.injector.fire_if(FaultPhase::AfterCont),
            _ => {}
        }
    }

    fn sample(&mut self, info: &MigrationInfo) {
        self.inner.sample(info);
        self.injector.last_status = info.status.clone();
        let half_sent = info.ram.as_ref().is_some_and(|r| {
            let total = r.total.unwrap_or(0);
            total > 0 && r.remaining.unwrap_or(total).saturating_mul(2) <= total
        });
        if info.status.as_deref() == Some("active") && half_sent {
            self.injector.fire_if(FaultPhase::MidPrecopy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::migrate::Quiet;
    use crate::qmp::RamStats;

    fn targets() -> Targets {
        Targets {
            cancel: Arc::new(AtomicBool::new(false)),
            destination_qemu: None,
            destination_companion: None,
            peer: None,
            links: vec![],
        }
    }

    fn sample(status: &str, remaining: u64, total: u64) -> MigrationInfo {
        MigrationInfo {
            status: Some(status.into()),
            ram: Some(RamStats {
                // Zero pages: much of RAM done for few bytes.
                transferred: Some(1),
                remaining: Some(remaining),
                total: Some(total),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Drives an injector of a cancel at `phase` through a whole migration's observer calls;
    /// returns when (in the sequence of calls) the cancel flag went up.
    fn cancelled_at(phase: FaultPhase) -> Option<usize> {
        let t = targets();
        let flag = t.cancel.clone();
        let mut inj = Injector::arm(Injection::at(Fault::Cancel, phase, Duration::ZERO), t);
        let mut quiet = Quiet;
        let mut obs = inj.observing(&mut quiet);
        type Call = Box<dyn Fn(&mut Observing)>;
        let calls: Vec<Call> = vec![
            Box::new(|o| o.phase(Phase::PrepareDestination)),
            Box::new(|o| o.phase(Phase::Precopy)),
            Box::new(|o| o.sample(&sample("active", 90, 100))),
            Box::new(|o| o.sample(&sample("active", 40, 100))),
            Box::new(|o| o.phase(Phase::Switchover)),
            Box::new(|o| o.sample(&sample("completed", 0, 100))),
            Box::new(|o| o.phase(Phase::DestinationUp)),
            Box::new(|o| o.phase(Phase::Done)),
        ];
        let mut when = None;
        for (i, c) in calls.iter().enumerate() {
            c(&mut obs);
            if when.is_none() && flag.load(Ordering::SeqCst) {
                when = Some(i);
            }
        }
        let (record, _) = inj.finish();
        assert_eq!(record.fired_at_ms.is_some(), when.is_some());
        assert_eq!(record.at, phase.name());
        when
    }

    #[test]
    fn each_phase_fires_at_its_own_point_of_the_migration() {
        assert_eq!(cancelled_at(FaultPhase::PrecopyStart), Some(1));
        assert_eq!(cancelled_at(FaultPhase::MidPrecopy), Some(3));
        assert_eq!(cancelled_at(FaultPhase::Switchover), Some(4));
        assert_eq!(cancelled_at(FaultPhase::Takeover), Some(6));
        assert_eq!(cancelled_at(FaultPhase::AfterCont), Some(7));
    }

    #[test]
    fn a_phase_that_never_comes_is_reported_as_not_fired() {
        let t = targets();
        let mut inj = Injector::arm(
            Injection::at(Fault::Cancel, FaultPhase::MidPrecopy, Duration::ZERO),
            t.clone(),
        );
        let mut quiet = Quiet;
        let mut obs = inj.observing(&mut quiet);
        obs.phase(Phase::Precopy);
        // Completed at once: never half-way while active.
        obs.sample(&sample("active", 100, 100));
        obs.sample(&sample("completed", 0, 100));
        obs.phase(Phase::Done);
        let (record, _) = inj.finish();
        assert_eq!(record.fired_at_ms, None);
        assert!(!t.cancel.load(Ordering::SeqCst));
    }

    #[test]
    fn a_timed_fault_fires_on_its_own_thread() {
        let t = targets();
        let inj = Injector::arm(
            Injection::after(Fault::Cancel, Duration::from_millis(5)),
            t.clone(),
        );
        let (record, _) = inj.finish();
        assert!(record.fired_at_ms.is_some_and(|ms| ms >= 5.0));
        assert_eq!(record.at, "after 5 ms");
        assert!(t.cancel.load(Ordering::SeqCst));
    }

    #[test]
    fn a_fault_without_its_target_says_so() {
        let (record, restarted) = {
            let mut inj = Injector::arm(
                Injection::at(
                    Fault::RestartPeerCompanion,
                    FaultPhase::PrecopyStart,
                    Duration::ZERO,
                ),
                targets(),
            );
            let mut quiet = Quiet;
            inj.observing(&mut quiet).phase(Phase::Precopy);
            inj.finish()
        };
        assert!(restarted.is_none());
        assert_eq!(record.notes, ["no peer to restart"]);
    }
}
