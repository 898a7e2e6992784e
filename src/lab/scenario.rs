//! `vfmig demo --workload lu-lite --vms N`: an MPI-style job across N VMs, each on its own test
//! host (network namespace), talking over soft VFs; midway, VM `a` migrates to a fresh QEMU and
//! companion on another host, and the job's result is checked against a run without migration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::demo::{DemoError, Strategy};
use super::hosts::{Hosts, HostsError};
use crate::companion::control::{ControlError, Request};
use crate::orchestrator::hotplug::{self, Hotplug};
use crate::orchestrator::launch::{
    mac_for, stand_in_vf_device, FabricSpec, GuestImage, LaunchError, Nic, PassthroughSlot, Role,
    RunningVm, VmSpec, PASSTHROUGH_DEVICE,
};
use crate::orchestrator::migrate::{migrate, MigrateOptions, MigrationSummary, Observer};
use crate::vf::soft::ClusterMap;

/// Port every soft VF listens on, in its own host.
const FABRIC_PORT: u16 = 7000;

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
}

/// Settings of a scenario run.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// The job.
    pub workload: Workload,
    /// VMs (ranks).
    pub vms: usize,
    /// How `a` migrates; `None`: no migration (the reference run).
    pub strategy: Option<Strategy>,
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

/// What a rank printed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RankResult {
    /// Its checksum.
    pub checksum: Option<String>,
    /// Per-iteration times, ms.
    pub iteration_ms: Vec<f64>,
    /// Longest gap between its completions, ms.
    pub blackout_ms: Option<f64>,
    /// Errors it reported.
    pub errors: Vec<String>,
    /// Completions with an error status, by its count.
    pub failed_completions: u64,
    /// Completions it received twice.
    pub duplicates: u64,
    /// rdma-bw: bytes it sent (sender) or received (receiver).
    pub bytes: Option<u64>,
    /// Whether it printed its final result.
    pub done: bool,
    /// rdma-lat: the typical (median) one-way latency, µs.
    pub latency_us: Option<f64>,
}

/// The scenario's result; the last line of the demo is this, as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// The job.
    pub workload: Workload,
    /// How `a` migrated (`null`: it did not).
    pub strategy: Option<Strategy>,
    /// VMs.
    pub vms: usize,
    /// Every rank's checksum equals the reference run's.
    pub checksum_match: bool,
    /// Checksums by rank.
    pub checksums: BTreeMap<String, Option<String>>,
    /// The reference run's checksums.
    pub reference: BTreeMap<String, Option<String>>,
    /// Operations that failed or never completed, as the ranks saw them.
    pub lost_ops: u64,
    /// Operations that completed twice, as the ranks saw them.
    pub duplicate_ops: u64,
    /// Longest gap in completed RDMA operations seen by a peer of `a`, ms.
    pub blackout_ms: f64,
    /// QEMU's total migration time, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms.
    pub downtime_ms: u64,
    /// Distinct pages `a`'s VF wrote during the migration (its companion's epoch bitmap): each
    /// was logged into QEMU's dirty log and sent again at least once because of the device.
    pub device_dirty_pages: Option<u64>,
    /// rdma-bw: bytes `a` sent.
    pub bytes_sent: Option<u64>,
    /// rdma-bw: bytes `b` received.
    pub bytes_received: Option<u64>,
    /// Median iteration time before, during and after the migration, ms (rank 0).
    pub iteration_ms: IterationMedians,
    /// The migration, when there was one and it completed.
    pub migration: Option<MigrationSummary>,
    /// Why the migration did not complete (an injected fault).
    pub migration_error: Option<String>,
    /// `passthrough-hotplug` after a failed migration: whether the source has its VF back,
    /// with its guest driver up.
    pub source_vf_restored: Option<bool>,
    /// Per rank.
    pub ranks: BTreeMap<String, RankResult>,
}

/// Median iteration times around the migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IterationMedians {
    /// Before it.
    pub before: f64,
    /// While it ran.
    pub during: f64,
    /// After it.
    pub after: f64,
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
    /// Files of the run.
    #[error("scenario files: {0}")]
    Io(#[from] std::io::Error),
    /// The passthrough VF's device arguments.
    #[error(transparent)]
    Hotplug(#[from] crate::orchestrator::hotplug::HotplugError),
}

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| ((b'a' + i as u8) as char).to_string())
        .collect()
}

/// The job's lines in a serial log: JSON objects with a `tool` field.
pub fn job_lines(serial: &Path) -> Vec<Value> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let at = l.find('{')?;
            serde_json::from_str::<Value>(&l[at..]).ok()
        })
        .filter(|v| v.get("tool").is_some())
        .collect()
}

fn rank_result(lines: &[Value]) -> RankResult {
    let mut r = RankResult::default();
    for v in lines {
        if let Some(ms) = v["ms"].as_f64() {
            if v.get("iter").is_some() {
                r.iteration_ms.push(ms);
            }
        }
        for key in ["bytes_sent", "bytes_received"] {
            if let Some(b) = v[key].as_u64() {
                r.bytes = Some(b);
                r.done = true;
            }
        }
        // rdma-lat: the initiator's report, or the responder's.
        if v.get("t_typical[usec]").is_some() || v["role"] == "responder" {
            r.done = true;
            r.latency_us = v["t_typical[usec]"].as_f64();
        }
        if let Some(c) = v["checksum"].as_str() {
            r.done = true;
            r.checksum = Some(c.to_string());
            r.failed_completions = v["errors"].as_u64().unwrap_or(0);
            r.duplicates = v["duplicates"].as_u64().unwrap_or(0);
        }
        if let Some(b) = v["blackout_ms"].as_f64() {
            r.blackout_ms = Some(b);
        }
        if let Some(e) = v["error"].as_str() {
            r.errors.push(e.to_string());
        }
    }
    r
}

fn median(xs: &[f64]) -> f64 {
    super::stats::median(xs.to_vec())
}

/// Runs the job on `opts.vms` VMs, migrating `a` midway unless `opts.strategy` is `None`.
pub fn run(
    opts: &ScenarioOptions,
    observer: &mut dyn Observer,
) -> Result<ScenarioReport, ScenarioError> {
    let vm_names = names(opts.vms);
    let hosts = Hosts::create(opts.vms + 1)?;
    std::fs::create_dir_all(&opts.run_dir)?;
    let cluster = ClusterMap {
        vms: vm_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), format!("{}:{FABRIC_PORT}", hosts.addr(i))))
            .collect(),
    };
    let cluster_file = opts.run_dir.join("cluster.json");
    std::fs::write(
        &cluster_file,
        serde_json::to_string_pretty(&cluster).unwrap_or_default(),
    )?;
    let guest_args = |me: &str| match opts.workload {
        Workload::LuLite => format!(
            "vfmig.run=lu-lite vfmig.args=--me:{me}:--peers:{}:--n:{}:--iters:{}",
            vm_names.join(","),
            opts.n,
            opts.iters
        ),
        Workload::RdmaBw => format!(
            "vfmig.run=rdma-bw vfmig.args=--me:{me}:--peers:{}:--size:{}:--iters:{}",
            vm_names.join(","),
            opts.n,
            opts.iters
        ),
        Workload::RdmaLat => format!(
            "vfmig.run=rdma-lat vfmig.args=--me:{me}:--peers:{}:--size:{}:--iters:{}",
            vm_names.join(","),
            opts.n,
            opts.iters
        ),
    };
    let spec = |name: &str, host: usize, role: Role, dir: &str| VmSpec {
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
        netns: Some(hosts.netns(host)),
        fabric: Some(FabricSpec {
            listen: format!("{}:{FABRIC_PORT}", hosts.addr(host)),
            cluster: cluster_file.clone(),
        }),
        guest_args: guest_args(name),
        // passthrough-hotplug: `a` has an emulated PCIe NIC standing in for its vfio-pci VF;
        // its destination has the empty slot the VF is plugged into after the migration.
        passthrough: (opts.strategy == Some(Strategy::PassthroughHotplug) && name == "a").then(
            || PassthroughSlot {
                device: (role == Role::Source).then(|| stand_in_vf_device(&mac_for("a-vf"))),
            },
        ),
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
    let deadline = Instant::now() + opts.timeout;
    let timeout = |detail: String| ScenarioError::Timeout {
        secs: opts.timeout.as_secs(),
        detail,
        dir: opts.run_dir.clone(),
    };

    // Migrate `a` once rank 0 has done `migrate_at` iterations.
    let mut migration = None;
    let mut migration_error = None;
    let mut source_vf_restored = None;
    let mut device_dirty_pages = None;
    let mut iters_at = (0usize, 0usize);
    if let (Some(strategy), Some(dest)) = (opts.strategy, dest.as_ref()) {
        loop {
            // lu-lite: iterations of rank a; rdma-bw: its progress lines (one a second).
            let done = job_lines(&vms[0].paths.serial_log)
                .iter()
                .filter(|v| v.get("iter").is_some() || v.get("t_ms").is_some())
                .count();
            if done >= opts.migrate_at as usize {
                iters_at.0 = done;
                break;
            }
            if Instant::now() > deadline {
                return Err(timeout(format!(
                    "rank a did {done} of the {} iterations to reach before migrating",
                    opts.migrate_at
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut src_ctl = vms[0].control()?;
        src_ctl.call(&Request::SetTracking {
            enabled: strategy != Strategy::UnsafeNoTracking,
        })?;
        let cancel = Arc::new(AtomicBool::new(false));
        let injector = opts.fault.map(|(fault, after)| {
            let (cancel, qemu, companion) = (cancel.clone(), dest.qemu_pid(), dest.companion_pid());
            std::thread::spawn(move || {
                std::thread::sleep(after);
                tracing::warn!(?fault, "injecting a failure into the migration");
                let kill = |pid: Option<u32>| {
                    if let Some(pid) = pid {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                };
                match fault {
                    Fault::Cancel => cancel.store(true, Ordering::SeqCst),
                    Fault::KillDestinationQemu => kill(qemu),
                    Fault::KillDestinationCompanion => kill(companion),
                }
            })
        });
        let result = migrate(
            &vms[0].qmp()?,
            &dest.qmp()?,
            &MigrateOptions {
                uri: format!("tcp:{}:{}", hosts.addr(opts.vms), 4444),
                max_bandwidth: opts.max_bandwidth,
                timeout: opts.timeout,
                companions: Some((
                    vms[0].paths.control_socket.clone(),
                    dest.paths.control_socket.clone(),
                )),
                cancel: Some(cancel),
                cooperative: matches!(
                    strategy,
                    Strategy::Cooperative | Strategy::PassthroughHotplug
                )
                .then(|| vms.iter().map(|v| v.paths.control_socket.clone()).collect()),
                hotplug: (strategy == Strategy::PassthroughHotplug)
                    .then(|| {
                        let device = hotplug::device_args(&stand_in_vf_device(&mac_for("a-vf")))?;
                        Ok::<_, hotplug::HotplugError>(Hotplug {
                            device_id: PASSTHROUGH_DEVICE.into(),
                            destination_device: device.clone(),
                            source_device: Some(device),
                            detach_timeout: Duration::from_secs(30),
                            attach_timeout: Duration::from_secs(30),
                        })
                    })
                    .transpose()?,
                trace: opts.trace.clone(),
                ..Default::default()
            },
            observer,
        );
        if let Some(t) = injector {
            let _ = t.join();
        }
        match result {
            Ok(summary) => migration = Some(summary),
            Err(e) if opts.fault.is_some() => {
                tracing::info!(error = %e, "the migration failed as the injected fault made it");
                migration_error = Some(e.to_string());
                if strategy == Strategy::PassthroughHotplug {
                    source_vf_restored =
                        Some(hotplug::driver_up(&vms[0].qmp()?, PASSTHROUGH_DEVICE));
                }
            }
            Err(e) => return Err(DemoError::from(e).into()),
        }
        // What the device dirtied on the source during the migration (its epoch).
        if let Ok(stats) = src_ctl.call(&Request::Stats) {
            device_dirty_pages = stats["device_dirty_pages"].as_u64();
        }
        iters_at.1 = job_lines(&dest.paths.serial_log)
            .iter()
            .chain(job_lines(&vms[0].paths.serial_log).iter())
            .filter(|v| v.get("iter").is_some())
            .count();
    }

    // Wait for every rank's checksum. `a`'s console continues in its destination's log.
    let serial_of = |i: usize| -> Vec<Value> {
        let mut lines = job_lines(&vms[i].paths.serial_log);
        if i == 0 {
            if let Some(d) = &dest {
                lines.extend(job_lines(&d.paths.serial_log));
            }
        }
        lines
    };
    let ranks = loop {
        let ranks: Vec<RankResult> = (0..opts.vms).map(|i| rank_result(&serial_of(i))).collect();
        let finished = ranks.iter().all(|r| r.done || !r.errors.is_empty());
        if finished {
            break ranks;
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = vm_names
                .iter()
                .zip(&ranks)
                .filter(|(_, r)| r.checksum.is_none())
                .map(|(n, _)| n)
                .collect();
            return Err(timeout(format!("no checksum from {missing:?}")));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let by_name: BTreeMap<String, RankResult> = vm_names
        .iter()
        .cloned()
        .zip(ranks.iter().cloned())
        .collect();
    let checksums = by_name
        .iter()
        .map(|(n, r)| (n.clone(), r.checksum.clone()))
        .collect();
    // Lost: failed completions, a rank that ended without its result, and (rdma-bw) bytes
    // sent that never arrived, in messages.
    let mut lost_ops: u64 = ranks
        .iter()
        .map(|r| r.failed_completions + u64::from(!r.done))
        .sum();
    let bytes_sent = ranks[0].bytes;
    let bytes_received = ranks.get(1).and_then(|r| r.bytes);
    if opts.workload == Workload::RdmaBw {
        let (s, r) = (bytes_sent.unwrap_or(0), bytes_received.unwrap_or(0));
        lost_ops += s.saturating_sub(r).div_ceil(u64::from(opts.n.max(1)));
    }
    let duplicate_ops = ranks.iter().map(|r| r.duplicates).sum();
    let blackout_ms = ranks[1..]
        .iter()
        .filter_map(|r| r.blackout_ms)
        .fold(0.0, f64::max);
    let it = &ranks[0].iteration_ms;
    let (b, d) = (iters_at.0.min(it.len()), iters_at.1.min(it.len()));
    let summary = migration.clone().unwrap_or_default();
    Ok(ScenarioReport {
        workload: opts.workload,
        strategy: opts.strategy,
        vms: opts.vms,
        checksum_match: false,
        checksums,
        reference: BTreeMap::new(),
        lost_ops,
        duplicate_ops,
        device_dirty_pages,
        bytes_sent,
        bytes_received,
        blackout_ms,
        total_ms: summary.total_ms,
        downtime_ms: summary.downtime_ms,
        iteration_ms: IterationMedians {
            before: median(&it[..b]),
            during: median(&it[b..d.max(b)]),
            after: median(&it[d.max(b)..]),
        },
        migration,
        migration_error,
        source_vf_restored,
        ranks: by_name,
    })
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
    if opts.workload != Workload::LuLite {
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
