//! An RDMA job whose migrating VM is a libvirt domain: `a` runs under libvirt on the first
//! of two libvirt hosts, its peers `b`, `c`, … are vfmig VMs on hosts of their own, and midway
//! `virsh migrate --live --p2p` moves `a` to the second libvirt host. libvirt drives QEMU and
//! vfmig's hook starts and stops the companions; nothing of vfmig's orchestrator runs. The VF's
//! state moves because the companions hand it over themselves. The negative control
//! (`unsafe-no-tracking`) defines `a` with `tracking='off'`, so its companion does not log the
//! device's writes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::libvirt_demo::{
    define_and_start, hook_last_stats, lab_domain, migrate_with_virsh, wait_guest_up,
    LibvirtDemoError,
};
use super::libvirt_hosts::LibvirtHosts;
use super::scenario::{
    self, iterations_in, rank_spec, report, wait_for_results, wait_until_migrate_at, write_cluster,
    MigrationOutcome, ScenarioError, ScenarioOptions, ScenarioReport,
};
use crate::libvirt::domain::CompanionSettings;
use crate::orchestrator::launch::{FabricSpec, Role, RunningVm};
use crate::orchestrator::strategy::StrategyKind;
use crate::orchestrator::summary::MigrationSummary;
use crate::orchestrator::takeover::{finish_takeover, takeover_of};
use crate::vf::soft::ClusterMap;

/// Port every soft VF listens on, in its own host.
const FABRIC_PORT: u16 = 7000;

/// Why the job failed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtJobError {
    /// The libvirt side.
    #[error(transparent)]
    Libvirt(#[from] LibvirtDemoError),
    /// The job's side.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// libvirt hosts.
    #[error(transparent)]
    Lab(#[from] super::libvirt_hosts::LibvirtLabError),
    /// A strategy libvirt cannot carry out.
    #[error(
        "libvirt migrates under transparent or unsafe-no-tracking only (got {0:?}): the others \
         need vfmig's orchestrator"
    )]
    Strategy(StrategyKind),
}

/// Runs `opts.workload` on `opts.vms` VMs, `a` a libvirt domain migrated by `virsh migrate` at
/// `bandwidth_mib_s` (unless `opts.strategy` is `None`: the job runs without migration).
pub fn run(
    opts: &ScenarioOptions,
    bandwidth_mib_s: u64,
) -> Result<ScenarioReport, LibvirtJobError> {
    if let Some(k) = opts.strategy {
        if !matches!(
            k,
            StrategyKind::Transparent | StrategyKind::UnsafeNoTracking
        ) {
            return Err(LibvirtJobError::Strategy(k));
        }
    }
    let names = scenario::names(opts.vms);
    let peers = opts.vms - 1;
    let hosts = LibvirtHosts::start_beside(&opts.run_dir, 2, peers, &opts.vfmig_bin)?;
    let net = hosts.net();
    // `a` on libvirt host 0 (and may move to host 1); rank i ≥ 1 on host i + 1.
    let host_of = |rank: usize| if rank == 0 { 0 } else { rank + 1 };
    let fabric_addr = |host: usize| format!("{}:{FABRIC_PORT}", net.addr(host));
    let cluster = ClusterMap {
        vms: names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), fabric_addr(host_of(i))))
            .collect(),
        hosts: vec![fabric_addr(1)],
        ..ClusterMap::default()
    };
    let (cluster_file, keys) = write_cluster(opts, &cluster)?;
    let mut vms = Vec::new();
    for (i, name) in names.iter().enumerate().skip(1) {
        let host = host_of(i);
        let spec = rank_spec(
            opts,
            name,
            Role::Source,
            name,
            net.netns(host),
            FabricSpec {
                listen: fabric_addr(host),
                cluster: cluster_file.clone(),
                key: keys.private_keys.get(name).cloned(),
                untracked: false,
                no_handoff: false,
            },
        );
        vms.push(RunningVm::launch(spec).map_err(ScenarioError::from)?);
    }
    let domain = lab_domain(
        "a",
        opts.mem_mib,
        &opts.image,
        &scenario::guest_args(opts, "a"),
        CompanionSettings {
            fabric_port: Some(FABRIC_PORT),
            cluster: Some(cluster_file.clone()),
            fabric_key: keys.private_keys.get("a").cloned(),
            insecure_fabric: false,
            unsafe_no_tracking: opts.strategy == Some(StrategyKind::UnsafeNoTracking),
        },
    );
    define_and_start(&hosts, 0, &opts.run_dir, &domain)?;
    let (src_dir, dst_dir) = (hosts.companion_dir(0, "a"), hosts.companion_dir(1, "a"));
    let serial = |dir: &PathBuf| dir.join("serial.log");
    let deadline = Instant::now() + opts.timeout;
    let mut outcome = MigrationOutcome::default();
    if opts.strategy.is_some() {
        outcome.iters_at.0 = wait_until_migrate_at(opts, &serial(&src_dir), deadline)?;
        let moved = migrate_with_virsh(&hosts, "a", bandwidth_mib_s)?;
        // The source's companion was stopped by the release hook, which kept its last stats.
        let (last, _) = hook_last_stats(&src_dir)?;
        let received = wait_guest_up(&dst_dir, Duration::from_secs(60))?
            .stats()
            .map_err(LibvirtDemoError::from)?
            .handoff;
        let mut takeover = takeover_of(&last.handoff, &received);
        finish_takeover(
            &dst_dir.join("control.sock"),
            &mut takeover,
            Duration::from_secs(2),
        );
        outcome.device_dirty_pages = Some(last.device_dirty_pages);
        outcome.migration = Some(MigrationSummary {
            status: "completed".into(),
            total_ms: moved.total_ms.unwrap_or(0),
            downtime_ms: moved.downtime_ms.unwrap_or(0),
            destination_resumed: true,
            wall_ms: moved.virsh_ms,
            vf_takeover: Some(takeover),
            ..Default::default()
        });
        outcome.iters_at.1 = iterations_in(&[&serial(&src_dir), &serial(&dst_dir)]);
    }
    let mut logs = vec![vec![serial(&src_dir), serial(&dst_dir)]];
    logs.extend(vms.iter().map(|v| vec![v.paths.serial_log.clone()]));
    let (ranks, _) = wait_for_results(opts, &names, &logs, deadline, None)?;
    // The domain goes before its hosts do (their drop destroys what is left).
    let live = usize::from(opts.strategy.is_some());
    let _ = hosts.virsh(live, &["destroy", "a"]);
    Ok(report(opts, &names, ranks, outcome))
}
