//! `vfmig bench soak --migrations N`: VM `a` migrates back and forth between two test hosts N
//! times while lu-lite runs on all the VMs, each time into a fresh QEMU and companion, the
//! old source quit once the migration completed; then the job's checksum is compared with a
//! run without migration, and the ranks' lost and duplicated operations are counted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::scenario::{
    self, job_lines, start_job, strategy_for, wait_for_results, wait_until_migrate_at,
    ScenarioError, ScenarioOptions,
};
use super::stats::median;
use crate::orchestrator::launch::{Role, RunningVm};
use crate::orchestrator::migrate::{migrate, MigrateOptions, Observer};
use crate::orchestrator::strategy::StrategyKind;
use crate::orchestrator::summary::error_text;

/// Settings of a soak.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The job (lu-lite) and its VMs; `strategy` is ignored (`a` migrates transparently).
    pub base: ScenarioOptions,
    /// Migrations of `a`.
    pub migrations: u32,
    /// How long `a` runs in each new place before it moves again.
    pub dwell: Duration,
    /// A job silent this long at the end is stalled.
    pub stall: Duration,
}

/// One of the soak's migrations.
#[derive(Debug, Clone, Serialize)]
pub struct SoakMigration {
    /// 1, 2, …
    pub number: u32,
    /// Test host it left.
    pub from_host: usize,
    /// Test host it went to.
    pub to_host: usize,
    /// QEMU's total migration time, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms.
    pub downtime_ms: u64,
    /// Longest time peer `b` printed nothing during the migration (and 2 s after), ms: how
    /// long the job stood still for it.
    pub blackout_ms: f64,
    /// The VF takeover, ms.
    pub takeover_ms: Option<f64>,
    /// Whether the job was still running when it started (a migration under load).
    pub under_load: bool,
}

/// The soak's result; the JSON line of `vfmig bench soak`.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Migrations asked for.
    pub migrations_requested: u32,
    /// Migrations that completed.
    pub migrations_done: u32,
    /// Of those, the ones that started while the job still ran.
    pub migrations_under_load: u32,
    /// Operations that failed or never completed, as the ranks saw them.
    pub lost_ops: u64,
    /// Operations that completed twice, as the ranks saw them.
    pub duplicate_ops: u64,
    /// Every rank's checksum equals the run without migration's.
    pub checksum_match: bool,
    /// Checksums by rank.
    pub checksums: BTreeMap<String, Option<String>>,
    /// The run without migration's.
    pub reference: BTreeMap<String, Option<String>>,
    /// Median of QEMU's total migration time, ms.
    pub median_total_ms: f64,
    /// Median of QEMU's downtime, ms.
    pub median_downtime_ms: f64,
    /// Median of the per-migration blackout seen by peer `b`, ms.
    pub median_blackout_ms: f64,
    /// Longest gap between completed RDMA operations that a peer of `a` reported for the
    /// whole job, ms.
    pub job_blackout_ms: f64,
    /// Why the soak stopped early, or why the job gave no result.
    pub error: Option<String>,
    /// Each migration.
    pub runs: Vec<SoakMigration>,
}

/// Watches a file grow on a thread of its own: the longest time it did not.
struct GapWatcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl GapWatcher {
    fn start(path: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, path) = (stop.clone(), path.to_path_buf());
        let thread = std::thread::spawn(move || {
            let len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let (mut last, mut since, mut longest) = (len(), Instant::now(), 0.0f64);
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                let now = len();
                if now != last {
                    last = now;
                    since = Instant::now();
                }
                longest = longest.max(since.elapsed().as_secs_f64() * 1e3);
            }
            longest
        });
        Self { stop, thread }
    }

    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or(0.0)
    }
}

/// Whether rank `a`, reading its consoles `logs`, has printed its result.
fn job_finished(logs: &[&Path]) -> bool {
    logs.iter()
        .any(|l| job_lines(l).iter().any(|v| v.get("checksum").is_some()))
}

/// Runs the reference job, then the soak; `progress` sees each migration as it ends.
pub fn run(
    opts: &SoakOptions,
    observer: &mut dyn Observer,
    mut progress: impl FnMut(&SoakMigration),
) -> Result<SoakReport, ScenarioError> {
    let mut reference_opts = opts.base.clone();
    reference_opts.strategy = None;
    reference_opts.fault = None;
    reference_opts.trace = None;
    reference_opts.run_dir = opts.base.run_dir.join("reference");
    let reference = scenario::run(&reference_opts, observer)?.checksums;

    let mut o = opts.base.clone();
    o.strategy = Some(StrategyKind::Transparent);
    o.fault = None;
    o.run_dir = opts.base.run_dir.join("soak");
    let mut job = start_job(&o)?;
    let deadline = Instant::now() + o.timeout;
    wait_until_migrate_at(&o, &job.vms[0].paths.serial_log, deadline)?;
    let far_host = o.vms;
    // `a` in each place after the first, in order; the first destination was started with
    // the job.
    let mut moved: Vec<RunningVm> = job.dest.take().into_iter().collect();
    let mut runs = Vec::new();
    let mut error = None;
    for number in 1..=opts.migrations {
        let (from_host, to_host) = if number % 2 == 1 {
            (0, far_host)
        } else {
            (far_host, 0)
        };
        if number > 1 {
            // A fresh QEMU and companion where `a` goes, configured as the first VM there.
            let like = if to_host == 0 { &job.vms[0] } else { &moved[0] };
            let mut spec = like.spec.clone();
            spec.role = Role::Destination;
            spec.passthrough = None;
            spec.run_dir = o.run_dir.join(format!("a-{number}"));
            match RunningVm::launch(spec) {
                Ok(vm) => moved.push(vm),
                Err(e) => {
                    error = Some(format!("migration {number}: {}", error_text(&e)));
                    break;
                }
            }
        }
        let dst = &moved[moved.len() - 1];
        let src = if moved.len() >= 2 {
            &moved[moved.len() - 2]
        } else {
            &job.vms[0]
        };
        let a_logs: Vec<&Path> = std::iter::once(&job.vms[0])
            .chain(moved.iter())
            .map(|v| v.paths.serial_log.as_path())
            .collect();
        let under_load = !job_finished(&a_logs);
        let watcher = GapWatcher::start(&job.vms[1].paths.serial_log);
        let strategy = strategy_for(StrategyKind::Transparent, &job)?;
        let result = (|| {
            let (sq, dq) = (src.qmp()?, dst.qmp()?);
            Ok::<_, ScenarioError>(migrate(
                &sq,
                &dq,
                &MigrateOptions {
                    uri: format!("tcp:{}:4444", job.hosts.addr(to_host)),
                    max_bandwidth: o.max_bandwidth,
                    timeout: o.timeout,
                    companions: Some((
                        src.paths.control_socket.clone(),
                        dst.paths.control_socket.clone(),
                    )),
                    strategy,
                    ..Default::default()
                },
                observer,
            ))
        })();
        std::thread::sleep(Duration::from_secs(2));
        let blackout_ms = watcher.stop();
        match result {
            Ok(Ok(m)) => {
                let run = SoakMigration {
                    number,
                    from_host,
                    to_host,
                    total_ms: m.total_ms,
                    downtime_ms: m.downtime_ms,
                    blackout_ms,
                    takeover_ms: m.vf_takeover.as_ref().map(|t| t.ms),
                    under_load,
                };
                progress(&run);
                runs.push(run);
            }
            Ok(Err(e)) => {
                error = Some(format!("migration {number}: {}", error_text(&e)));
                break;
            }
            Err(e) => {
                error = Some(format!("migration {number}: {}", error_text(&e)));
                break;
            }
        }
        // The old source is done with: quit it (QEMU and companion).
        if moved.len() >= 2 {
            let at = moved.len() - 2;
            moved[at].stop();
        } else {
            job.vms[0].stop();
        }
        std::thread::sleep(opts.dwell);
    }

    let logs = job.serial_logs(moved.iter());
    let (ranks, stalled) = wait_for_results(&o, &job.names, &logs, deadline, Some(opts.stall))?;
    let checksums: BTreeMap<String, Option<String>> = job
        .names
        .iter()
        .cloned()
        .zip(ranks.iter().map(|r| r.checksum.clone()))
        .collect();
    let lost_ops = ranks
        .iter()
        .map(|r| r.failed_completions + u64::from(!r.done))
        .sum();
    let duplicate_ops = ranks.iter().map(|r| r.duplicates).sum();
    if let Some(s) = stalled {
        error = Some(match error {
            Some(e) => format!("{e}; then the job {s}"),
            None => format!("the job {s}"),
        });
    }
    let of = |f: fn(&SoakMigration) -> f64| median(runs.iter().map(f).collect());
    Ok(SoakReport {
        migrations_requested: opts.migrations,
        migrations_done: runs.len() as u32,
        migrations_under_load: runs.iter().filter(|r| r.under_load).count() as u32,
        lost_ops,
        duplicate_ops,
        checksum_match: checksums.values().all(Option::is_some) && checksums == reference,
        checksums,
        reference,
        median_total_ms: of(|r| r.total_ms as f64),
        median_downtime_ms: of(|r| r.downtime_ms as f64),
        median_blackout_ms: of(|r| r.blackout_ms),
        job_blackout_ms: ranks[1..]
            .iter()
            .filter_map(|r| r.blackout_ms)
            .fold(0.0, f64::max),
        error,
        runs,
    })
}

/// Whether the soak passed: every migration done under load, the checksum matches, nothing
/// lost or duplicated.
pub fn passed(r: &SoakReport) -> bool {
    r.error.is_none()
        && r.migrations_done == r.migrations_requested
        && r.migrations_under_load == r.migrations_done
        && r.checksum_match
        && r.lost_ops == 0
        && r.duplicate_ops == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> SoakReport {
        SoakReport {
            migrations_requested: 3,
            migrations_done: 3,
            migrations_under_load: 3,
            lost_ops: 0,
            duplicate_ops: 0,
            checksum_match: true,
            checksums: BTreeMap::new(),
            reference: BTreeMap::new(),
            median_total_ms: 0.0,
            median_downtime_ms: 0.0,
            median_blackout_ms: 0.0,
            job_blackout_ms: 0.0,
            error: None,
            runs: vec![],
        }
    }

    #[test]
    fn a_soak_passes_only_with_every_migration_under_load_and_nothing_lost() {
        assert!(passed(&report()));
        let broken: [fn(&mut SoakReport); 5] = [
            |r| r.migrations_done = 2,
            |r| r.migrations_under_load = 2,
            |r| r.checksum_match = false,
            |r| r.duplicate_ops = 1,
            |r| r.error = Some("migration 2: the destination's QEMU died".into()),
        ];
        for b in broken {
            let mut r = report();
            b(&mut r);
            assert!(!passed(&r), "{r:?}");
        }
    }

    #[test]
    fn the_gap_watcher_sees_the_longest_pause_of_a_growing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        std::fs::write(&path, "x").unwrap();
        let t0 = Instant::now();
        let w = GapWatcher::start(&path);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "xx").unwrap();
        std::thread::sleep(Duration::from_millis(150));
        std::fs::write(&path, "xxx").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let gap = w.stop();
        // At least the pause; at most the whole watch (a loaded machine stretches sleeps).
        let whole = t0.elapsed().as_secs_f64() * 1e3;
        assert!(gap >= 140.0 && gap <= whole, "{gap} of {whole}");
    }

    #[test]
    fn a_rank_is_finished_once_its_console_has_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("1.log"), dir.path().join("2.log"));
        std::fs::write(&one, "{\"tool\":\"lu-lite\",\"iter\":1,\"ms\":1}\n").unwrap();
        std::fs::write(&two, "boot\n").unwrap();
        assert!(!job_finished(&[&one, &two]));
        std::fs::write(&two, "[ 1.0] {\"tool\":\"lu-lite\",\"checksum\":\"ab\"}\n").unwrap();
        assert!(job_finished(&[&one, &two]));
    }
}
