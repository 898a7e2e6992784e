//! `vfmig demo --workload lu-lite --vms N`: an MPI-style job across N VMs, each on its own test
//! host (network namespace), talking over soft VFs; midway, VM `a` migrates to a fresh QEMU and
//! companion on another host, and the job's result is checked against a run without migration.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::demo::DemoError;
use super::faults::{Injection, Injector, PeerCompanion, Targets};
use super::hosts::{Hosts, HostsError};
use crate::companion::control::{error_chain, ControlError};
use crate::orchestrator::hotplug;
use crate::orchestrator::launch::{
    mac_for, stand_in_vf_device, FabricSpec, GuestImage, LaunchError, Nic, PassthroughSlot, Role,
    RunningVm, VmSpec, PASSTHROUGH_DEVICE,
};
use crate::orchestrator::migrate::{migrate, MigrateOptions, Observer};
use crate::orchestrator::strategy::{
    Strategy, StrategyError, StrategyInputs, StrategyKind, VfDevices,
};
use crate::orchestrator::summary::error_text;
use crate::vf::soft::ClusterMap;

/// Port every soft VF listens on, in its own host.
pub(in crate::lab) const FABRIC_PORT: u16 = 7000;

mod ranks;
mod report;
#[cfg(test)]
use ranks::rank_result;
pub(super) use ranks::wait_for_results;
pub use ranks::{job_lines, RankResult};
pub(super) use report::{report, MigrationOutcome};
pub use report::{IterationMedians, ScenarioReport};

/// The job the VMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// LU/SSOR-style stencil with RDMA halo exchange; checksum at the end.
    LuLite,
    /// perftest-style WRITE bandwidth from `a` to `b`; bytes received must equal bytes sent.
    RdmaBw,
    /// perftest-style WRITE latency between `a` and `b` (ping-pong).
    RdmaLat,
    /// Messages of one byte to several 64 KiB segments around a ring, over the message
    /// channel the libfabric provider uses (`--n` is the base size); every message is checked
    /// and goes into a checksum.
    MsgRing,
}

pub use super::faults::Fault;

/// What drives `a`'s migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Driver {
    /// vfmig's orchestrator (`vfmig migrate`), with every strategy.
    #[default]
    Vfmig,
    /// A plain QMP client, as libvirt or Nova: `migrate-incoming`, `migrate`, `cont`, and no
    /// vfmig command; the companions hand the VF over themselves. Strategies `transparent`
    /// and `unsafe-no-tracking` (its source companion starts with `--unsafe-no-tracking`).
    Qmp,
}

/// Settings of a scenario run.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// The job.
    pub workload: Workload,
    /// VMs (ranks).
    pub vms: usize,
    /// How `a` migrates; `None`: no migration (the reference run).
    pub strategy: Option<StrategyKind>,
    /// What drives the migration: `vfmig migrate` or a plain QMP client.
    pub driver: Driver,
    /// Guest RAM per VM, MiB.
    pub mem_mib: u64,
    /// lu-lite: grid size; rdma-bw: message size in bytes.
    pub n: u32,
    /// Iterations.
    pub iters: u32,
    /// Migrate once rank 0 has done this many iterations.
    pub migrate_at: u32,
    /// QEMU `max-bandwidth`, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Run directories.
    pub run_dir: PathBuf,
    /// QEMU accelerator.
    pub accel: String,
    /// Guest image.
    pub image: GuestImage,
    /// The vfmig binary.
    pub vfmig_bin: PathBuf,
    /// Give up after this long.
    pub timeout: Duration,
    /// A failure to inject this long after the migration starts.
    pub fault: Option<(Fault, Duration)>,
    /// Where the migration's timeline goes.
    pub trace: Option<Arc<crate::trace::TraceRecorder>>,
}

/// Errors of a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The hosts could not be made.
    #[error(transparent)]
    Hosts(#[from] HostsError),
    /// A VM failed.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The demo machinery failed.
    #[error(transparent)]
    Demo(#[from] DemoError),
    /// A companion failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The job did not finish in time.
    #[error("the job did not finish within {secs} s: {detail}; see the serial logs under {dir}")]
    Timeout {
        /// The limit.
        secs: u64,
        /// What was missing.
        detail: String,
        /// The run directory.
        dir: PathBuf,
    },
    /// A file or directory of the run could not be written.
    #[error("cannot write {path}: check the run directory's permissions and free space")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The strategy could not be built.
    #[error(transparent)]
    Strategy(#[from] StrategyError),
    /// The plain QMP driver cannot carry out this strategy.
    #[error(
        "a plain QMP client cannot migrate under {0:?}: it needs vfmig's orchestrator (SUSPEND \
         and RESUME, or the VF's unplug and plug); use --driver vfmig, or transparent"
    )]
    Driver(StrategyKind),
    /// The migration driven by plain QMP failed.
    #[error(transparent)]
    QmpDriver(super::qmp_driver::QmpDriveError),
}

/// The ranks' VM names: `a`, `b`, …
pub(super) fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| ((b'a' + i as u8) as char).to_string())
        .collect()
}

fn median(xs: &[f64]) -> f64 {
    super::stats::median(xs.to_vec())
}

/// Runs the job on `opts.vms` VMs, migrating `a` midway unless `opts.strategy` is `None`.
pub fn run(
    opts: &ScenarioOptions,
    observer: &mut dyn Observer,
) -> Result<ScenarioReport, ScenarioError> {
    let injection = opts.fault.map(|(f, after)| Injection::after(f, after));
    run_with(opts, injection.as_ref(), observer)
}

/// [`run`], with `injection` (instead of `opts.fault`) injected into the migration.
pub fn run_with(
    opts: &ScenarioOptions,
    injection: Option<&Injection>,
    observer: &mut dyn Observer,
) -> Result<ScenarioReport, ScenarioError> {
    let job = start_job(opts)?;
    let deadline = Instant::now() + opts.timeout;
    let outcome = match (opts.strategy, job.dest.as_ref()) {
        (Some(kind), Some(dest)) => {
            let started_at = wait_until_migrate_at(opts, &job.vms[0].paths.serial_log, deadline)?;
            migrate_a(opts, kind, &job, dest, started_at, injection, observer)?
        }
        _ => MigrationOutcome::default(),
    };
    let logs = job.serial_logs(job.dest.iter());
    let stall = injection.and_then(|i| i.stall);
    let (ranks, stalled) = wait_for_results(opts, &job.names, &logs, deadline, stall)?;
    let mut report = report(opts, &job.names, ranks, outcome);
    report.stalled = stalled;
    report.op_latency = op_latency(&job);
    Ok(report)
}

/// What each companion of the job added to each operation's latency, as its stats say now.
fn op_latency(job: &Job) -> BTreeMap<String, crate::companion::op_latency::OpLatencyReport> {
    let named = job.names.iter().cloned().zip(&job.vms).chain(
        job.dest
            .iter()
            .map(|d| (format!("{}-dest", job.names[0]), d)),
    );
    named
        .filter_map(|(name, vm)| {
            let stats = crate::companion::control::ControlClient::connect(
                &vm.paths.control_socket,
                Duration::from_secs(5),
            )
            .and_then(|mut c| c.stats());
            match stats {
                Ok(s) => Some((name, s.guest_link.op_latency)),
                Err(e) => {
                    tracing::warn!(vm = %name, error = %error_chain(&e), "a companion's stats are unreadable");
                    None
                }
            }
        })
        .collect()
}

/// The VMs of a run, each rank on its own test host, and `a`'s destination when it migrates.
/// Fields drop in order: the VMs stop before their hosts go.
pub(super) struct Job {
    /// `a`'s destination, on the host after the ranks'.
    pub(super) dest: Option<RunningVm>,
    /// The ranks, `a` first.
    pub(super) vms: Vec<RunningVm>,
    /// Their names.
    pub(super) names: Vec<String>,
    /// The test hosts.
    pub(super) hosts: Hosts,
}

impl Job {
    /// What the faults act on: `a`'s destination `dest`, peer `b`'s companion, the links of
    /// `a`'s source host and of the destination's.
    pub(super) fn targets(&self, dest: &RunningVm, cancel: &Arc<AtomicBool>) -> Targets {
        let peer = self.vms.get(1).and_then(|b| {
            Some(PeerCompanion {
                pid: b.companion_pid()?,
                netns: b.spec.netns.clone(),
                log: b.paths.dir.join("companion-restarted.log"),
            })
        });
        Targets {
            cancel: cancel.clone(),
            destination_qemu: dest.qemu_pid(),
            destination_companion: dest.companion_pid(),
            peer,
            links: vec![self.hosts.veth(0), self.hosts.veth(self.vms.len())],
        }
    }

    /// Every rank's serial logs; `a`'s console continues in those of `a_elsewhere` (the VMs it
    /// migrated into), in order.
    pub(super) fn serial_logs<'a>(
        &self,
        a_elsewhere: impl Iterator<Item = &'a RunningVm>,
    ) -> Vec<Vec<PathBuf>> {
        let mut logs: Vec<Vec<PathBuf>> = self
            .vms
            .iter()
            .map(|v| vec![v.paths.serial_log.clone()])
            .collect();
        logs[0].extend(a_elsewhere.map(|v| v.paths.serial_log.clone()));
        logs
    }
}

/// Step 1: the hosts, the cluster file, every rank's VM, and `a`'s destination when it
/// migrates.
pub(super) fn start_job(opts: &ScenarioOptions) -> Result<Job, ScenarioError> {
    let vm_names = names(opts.vms);
    let hosts = Hosts::create(opts.vms + 1)?;
    let fabric_addr = |i: usize| format!("{}:{FABRIC_PORT}", hosts.addr(i));
    // Every rank's fabric address, and `a`'s destination's (where it may announce it moved).
    let cluster = ClusterMap {
        vms: vm_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), fabric_addr(i)))
            .collect(),
        hosts: vec![fabric_addr(opts.vms)],
        ..ClusterMap::default()
    };
    let (cluster_file, keys) = write_cluster(opts, &cluster)?;
    let spec = |name: &str, host: usize, role: Role, dir: &str| {
        let mut spec = rank_spec(
            opts,
            name,
            role,
            dir,
            hosts.netns(host),
            FabricSpec {
                listen: fabric_addr(host),
                cluster: cluster_file.clone(),
                key: keys.private_keys.get(name).cloned(),
                // Driven by plain QMP, the negative control's source companion does not track.
                untracked: opts.driver == Driver::Qmp
                    && opts.strategy == Some(StrategyKind::UnsafeNoTracking)
                    && role == Role::Source
                    && name == "a",
                no_handoff: false,
            },
        );
        // passthrough-hotplug: `a` has an emulated PCIe NIC standing in for its vfio-pci VF;
        // its destination has the empty slot the VF is plugged into after the migration.
        spec.passthrough = (opts.strategy == Some(StrategyKind::PassthroughHotplug) && name == "a")
            .then(|| PassthroughSlot {
                device: (role == Role::Source).then(|| stand_in_vf_device(&mac_for("a-vf"))),
            });
        spec
    };
    let mut vms: Vec<RunningVm> = Vec::new();
    for (i, n) in vm_names.iter().enumerate() {
        vms.push(RunningVm::launch(spec(n, i, Role::Source, n))?);
    }
    let dest = match opts.strategy {
        Some(_) => Some(RunningVm::launch(spec(
            "a",
            opts.vms,
            Role::Destination,
            "a-dest",
        ))?),
        None => None,
    };
    Ok(Job {
        dest,
        vms,
        names: vm_names,
        hosts,
    })
}

/// Writes the job's cluster file into the run directory, with the job key and each VM's key
/// pair: every fabric link of the job is authenticated.
pub(super) fn write_cluster(
    opts: &ScenarioOptions,
    cluster: &ClusterMap,
) -> Result<(PathBuf, crate::vf::soft::Generated), ScenarioError> {
    write_cluster_in(&opts.run_dir, cluster)
}

/// [`write_cluster`], into `run_dir`.
pub(in crate::lab) fn write_cluster_in(
    run_dir: &std::path::Path,
    cluster: &ClusterMap,
) -> Result<(PathBuf, crate::vf::soft::Generated), ScenarioError> {
    std::fs::create_dir_all(run_dir).map_err(|source| ScenarioError::Io {
        path: run_dir.to_path_buf(),
        source,
    })?;
    let cluster_file = run_dir.join("cluster.json");
    std::fs::write(
        &cluster_file,
        serde_json::to_string_pretty(cluster).unwrap_or_default(),
    )
    .map_err(|source| ScenarioError::Io {
        path: cluster_file.clone(),
        source,
    })?;
    let keys =
        crate::vf::soft::generate_keys(&cluster_file, &run_dir.join("keys")).map_err(|e| {
            ScenarioError::Io {
                path: cluster_file.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
    Ok((cluster_file, keys))
}

/// The guest's arguments for rank `me` of the job: which workload its agent runs, and how.
pub(super) fn guest_args(opts: &ScenarioOptions, me: &str) -> String {
    let tool = match opts.workload {
        Workload::LuLite => "lu-lite:--n",
        Workload::RdmaBw => "rdma-bw:--size",
        Workload::RdmaLat => "rdma-lat:--size",
        Workload::MsgRing => "msg-ring:--size",
    };
    let (tool, size) = tool.split_once(':').unwrap_or_default();
    format!(
        "vfmig.run={tool} vfmig.args=--me:{me}:--peers:{}:{size}:{}:--iters:{}",
        names(opts.vms).join(","),
        opts.n,
        opts.iters
    )
}

/// Rank `name`'s VM, in network namespace `netns`, on the soft VF `fabric`.
pub(super) fn rank_spec(
    opts: &ScenarioOptions,
    name: &str,
    role: Role,
    dir: &str,
    netns: String,
    fabric: FabricSpec,
) -> VmSpec {
    VmSpec {
        name: name.into(),
        run_dir: opts.run_dir.join(dir),
        mem_mib: opts.mem_mib,
        role,
        accel: opts.accel.clone(),
        image: opts.image.clone(),
        vfmig_bin: opts.vfmig_bin.clone(),
        qemu_bin: "qemu-system-x86_64".into(),
        config_dir: None,
        mac: mac_for(name),
        nic: Nic::VhostUser,
        netns: Some(netns),
        fabric: Some(fabric),
        guest_args: guest_args(opts, name),
        passthrough: None,
        ip_nic: None,
    }
}

/// The job did not get as far as it should have by `opts.timeout`.
fn timed_out(opts: &ScenarioOptions, detail: String) -> ScenarioError {
    ScenarioError::Timeout {
        secs: opts.timeout.as_secs(),
        detail,
        dir: opts.run_dir.clone(),
    }
}

/// Step 2: waits until rank `a` (its console in `serial_log`) has done `migrate_at`
/// iterations; returns how many it did.
pub(super) fn wait_until_migrate_at(
    opts: &ScenarioOptions,
    serial_log: &std::path::Path,
    deadline: Instant,
) -> Result<usize, ScenarioError> {
    loop {
        // lu-lite: iterations of rank a; rdma-bw: its progress lines (one a second).
        let done = job_lines(serial_log)
            .iter()
            .filter(|v| v.get("iter").is_some() || v.get("t_ms").is_some())
            .count();
        if done >= opts.migrate_at as usize {
            return Ok(done);
        }
        if Instant::now() > deadline {
            return Err(timed_out(
                opts,
                format!(
                    "rank a did {done} of the {} iterations to reach before migrating",
                    opts.migrate_at
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The strategy `kind` for `a`: every rank's companion is told SUSPEND and RESUME, and the
/// stand-in VF moves by unplug and plug.
pub(super) fn strategy_for(kind: StrategyKind, job: &Job) -> Result<Strategy, StrategyError> {
    let vf = stand_in_vf_device(&mac_for("a-vf"));
    kind.with(StrategyInputs {
        ranks: job
            .vms
            .iter()
            .map(|v| v.paths.control_socket.clone())
            .collect(),
        vf: VfDevices {
            device_id: PASSTHROUGH_DEVICE.into(),
            destination: Some(vf.clone()),
            source: Some(vf),
            timeout: Duration::from_secs(30),
        },
    })
}

/// Step 3: migrates `a` to its destination under `kind`, with the fault injected if there is
/// one. A migration that fails because of that fault is an outcome, not an error.
fn migrate_a(
    opts: &ScenarioOptions,
    kind: StrategyKind,
    job: &Job,
    dest: &RunningVm,
    started_at: usize,
    injection: Option<&Injection>,
    observer: &mut dyn Observer,
) -> Result<MigrationOutcome, ScenarioError> {
    let mut outcome = MigrationOutcome {
        iters_at: (started_at, 0),
        ..Default::default()
    };
    let a = &job.vms[0];
    let mut src_ctl = a.control()?;
    if opts.driver == Driver::Qmp {
        let mut outcome = migrate_a_by_qmp(opts, kind, job, dest, outcome)?;
        after_migration(&mut src_ctl, a, dest, &mut outcome);
        return Ok(outcome);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let strategy = strategy_for(kind, job)?;
    let mut injector = injection.map(|i| Injector::arm(i.clone(), job.targets(dest, &cancel)));
    let mut watched;
    let observer: &mut dyn Observer = match injector.as_mut() {
        Some(inj) => {
            watched = inj.observing(observer);
            &mut watched
        }
        None => observer,
    };
    let result = migrate(
        &a.qmp()?,
        &dest.qmp()?,
        &MigrateOptions {
            uri: format!("tcp:{}:{}", job.hosts.addr(opts.vms), 4444),
            max_bandwidth: opts.max_bandwidth,
            timeout: opts.timeout,
            companions: Some((
                a.paths.control_socket.clone(),
                dest.paths.control_socket.clone(),
            )),
            cancel: Some(cancel),
            strategy,
            trace: opts.trace.clone(),
            peer_controls: job.vms[1..]
                .iter()
                .map(|v| v.paths.control_socket.clone())
                .collect(),
            ..Default::default()
        },
        observer,
    );
    if let Some(inj) = injector {
        let (record, restarted) = inj.finish();
        outcome.fault = Some(record);
        outcome._restarted = restarted;
    }
    match result {
        Ok(summary) => outcome.migration = Some(summary),
        Err(e) if injection.is_some() => {
            tracing::info!(error = %e, "the migration failed as the injected fault made it");
            outcome.migration_error = Some(error_text(&e));
            if kind == StrategyKind::PassthroughHotplug {
                outcome.source_vf_restored =
                    Some(hotplug::driver_up(&a.qmp()?, PASSTHROUGH_DEVICE));
            }
        }
        Err(e) => return Err(DemoError::from(e).into()),
    }
    after_migration(&mut src_ctl, a, dest, &mut outcome);
    Ok(outcome)
}

/// What the device dirtied on the source during the migration (its epoch), and how many
/// iterations rank `a` had done when it ended.
fn after_migration(
    src_ctl: &mut crate::companion::control::ControlClient,
    a: &RunningVm,
    dest: &RunningVm,
    outcome: &mut MigrationOutcome,
) {
    match src_ctl.stats() {
        Ok(stats) => outcome.device_dirty_pages = Some(stats.device_dirty_pages),
        Err(e) => tracing::warn!(
            error = %error_chain(&e),
            "the source companion's stats are unreadable"
        ),
    }
    outcome.iters_at.1 = iterations_in(&[&a.paths.serial_log, &dest.paths.serial_log]);
}

/// lu-lite iterations printed on the consoles `logs` (a rank's, across its migrations).
pub(super) fn iterations_in(logs: &[&std::path::Path]) -> usize {
    logs.iter()
        .flat_map(|l| job_lines(l))
        .filter(|v| v.get("iter").is_some())
        .count()
}

/// Step 3, as a plain QMP client drives it (no vfmig command): the companions hand the VF
/// over themselves.
fn migrate_a_by_qmp(
    opts: &ScenarioOptions,
    kind: StrategyKind,
    job: &Job,
    dest: &RunningVm,
    mut outcome: MigrationOutcome,
) -> Result<MigrationOutcome, ScenarioError> {
    if !matches!(
        kind,
        StrategyKind::Transparent | StrategyKind::UnsafeNoTracking
    ) {
        return Err(ScenarioError::Driver(kind));
    }
    let a = &job.vms[0];
    let summary = super::qmp_driver::migrate(
        &a.qmp()?,
        &dest.qmp()?,
        &format!("tcp:{}:{}", job.hosts.addr(opts.vms), 4444),
        super::qmp_driver::Precopy {
            max_bandwidth: opts.max_bandwidth,
            ..Default::default()
        },
        opts.timeout,
        Some((&a.paths.control_socket, &dest.paths.control_socket)),
    )
    .map_err(ScenarioError::QmpDriver)?;
    outcome.migration = Some(summary);
    Ok(outcome)
}

/// Runs the reference (no migration) and the migration, and compares their checksums. For
/// rdma-bw and rdma-lat, which have no checksum, only the migrated run: `checksum_match` then
/// says whether every byte sent arrived (rdma-bw) or every rank finished cleanly (rdma-lat).
pub fn run_compared(
    opts: &ScenarioOptions,
    observer: &mut dyn Observer,
) -> Result<ScenarioReport, ScenarioError> {
    let mut migrated_opts = opts.clone();
    migrated_opts.run_dir = opts.run_dir.join("migrated");
    if !matches!(opts.workload, Workload::LuLite | Workload::MsgRing) {
        let mut report = run(&migrated_opts, observer)?;
        report.checksum_match = report.lost_ops == 0
            && match opts.workload {
                Workload::RdmaBw => {
                    report.bytes_sent.is_some() && report.bytes_sent == report.bytes_received
                }
                _ => report.ranks.values().all(|r| r.done && r.errors.is_empty()),
            };
        return Ok(report);
    }
    let mut reference_opts = opts.clone();
    reference_opts.strategy = None;
    reference_opts.trace = None;
    reference_opts.run_dir = opts.run_dir.join("reference");
    let reference = run(&reference_opts, observer)?;
    let mut report = run(&migrated_opts, observer)?;
    report.checksum_match =
        report.checksums.values().all(Option::is_some) && report.checksums == reference.checksums;
    report.reference = reference.checksums;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(workload: Workload) -> ScenarioOptions {
        ScenarioOptions {
            driver: Default::default(),
            workload,
            vms: 2,
            strategy: Some(StrategyKind::Transparent),
            mem_mib: 256,
            n: 1000,
            iters: 10,
            migrate_at: 2,
            max_bandwidth: None,
            run_dir: "/run".into(),
            accel: "tcg".into(),
            image: GuestImage {
                kernel: "k".into(),
                initrd: "i".into(),
            },
            vfmig_bin: "vfmig".into(),
            timeout: Duration::from_secs(1),
            fault: None,
            trace: None,
        }
    }

    #[test]
    fn a_rank_reads_its_iterations_checksum_and_errors() {
        let r = rank_result(&[
            json!({"tool": "lu-lite", "iter": 1, "ms": 2.0}),
            json!({"tool": "lu-lite", "iter": 2, "ms": 4.0}),
            json!({"tool": "lu-lite", "checksum": "abc", "errors": 1, "duplicates": 2,
                   "blackout_ms": 9.5}),
        ]);
        assert_eq!(r.iteration_ms, [2.0, 4.0]);
        assert_eq!(r.checksum.as_deref(), Some("abc"));
        assert!(r.done);
        assert_eq!((r.failed_completions, r.duplicates), (1, 2));
        assert_eq!(r.blackout_ms, Some(9.5));
    }

    #[test]
    fn an_error_printed_just_after_the_checksum_is_part_of_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(
            &log,
            "{\"tool\":\"lu-lite\",\"rank\":0,\"checksum\":\"abc\",\"iters\":405}\n",
        )
        .unwrap();
        let late = log.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut text = std::fs::read_to_string(&late).unwrap();
            text += "{\"tool\":\"lu-lite\",\"error\":\"iteration 405: no completion for 120 s\"}\n";
            std::fs::write(&late, text).unwrap();
        });
        let (ranks, stalled) = ranks::wait_for_results(
            &options(Workload::LuLite),
            &["a".to_string()],
            &[vec![log]],
            Instant::now() + Duration::from_secs(10),
            None,
        )
        .unwrap();
        writer.join().unwrap();
        assert!(stalled.is_none());
        assert_eq!(ranks[0].errors, ["iteration 405: no completion for 120 s"]);
    }

    #[test]
    fn a_rank_names_each_kind_of_failed_completion_once() {
        let failed = |qp: u32| {
            json!({"tool": "lu-lite", "rank": 0, "error": "completion", "status": "RemoteLost",
                   "opcode": "Write", "qp": qp, "wr_id": 7})
        };
        let r = rank_result(&[failed(1), failed(1), failed(2)]);
        assert_eq!(
            r.errors,
            [
                "Write completion on QP 1 failed: RemoteLost",
                "Write completion on QP 2 failed: RemoteLost"
            ]
        );
    }

    #[test]
    fn the_report_counts_lost_and_duplicate_ops_and_splits_iterations_around_the_migration() {
        let a = RankResult {
            iteration_ms: vec![1.0, 1.0, 5.0, 5.0, 2.0, 2.0],
            bytes: Some(10_000),
            done: true,
            ..Default::default()
        };
        let b = RankResult {
            bytes: Some(7_500),
            blackout_ms: Some(12.0),
            duplicates: 1,
            done: true,
            ..Default::default()
        };
        let outcome = MigrationOutcome {
            iters_at: (2, 4),
            ..Default::default()
        };
        let names = names(2);
        let r = report(&options(Workload::RdmaBw), &names, vec![a, b], outcome);
        // 2500 bytes that never arrived are 3 messages of 1000 bytes.
        assert_eq!(r.lost_ops, 3);
        assert_eq!(r.duplicate_ops, 1);
        assert_eq!(r.blackout_ms, 12.0);
        assert_eq!(
            (
                r.iteration_ms.before,
                r.iteration_ms.during,
                r.iteration_ms.after
            ),
            (1.0, 5.0, 2.0)
        );
        assert_eq!(r.strategy, Some(StrategyKind::Transparent));
        assert!(r.migration.is_none() && r.migration_error.is_none());
        assert_eq!(r.ranks.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn a_rank_without_its_result_is_a_lost_op() {
        let unfinished = RankResult::default();
        let finished = RankResult {
            checksum: Some("x".into()),
            done: true,
            ..Default::default()
        };
        let r = report(
            &options(Workload::LuLite),
            &names(2),
            vec![finished, unfinished],
            MigrationOutcome::default(),
        );
        assert_eq!(r.lost_ops, 1);
        assert_eq!(r.checksums["b"], None);
    }
}
