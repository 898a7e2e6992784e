//! The demo's check, driven by libvirt instead of `vfmig migrate`: a libvirt domain with a
//! companion (started by vfmig's hook), the companion's generator writing guest RAM as a
//! device, `virsh migrate --live --p2p` to a second libvirt host, and the destination's
//! records compared with the source companion's ledger (kept by the hook in
//! `last-stats.json` when it stopped the source's companion).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::demo::{verdict, window};
use super::libvirt_hosts::{LibvirtHosts, LibvirtLabError};
use crate::companion::control::{ControlClient, ControlError, LedgerReply, StatsReply};
use crate::companion::generator::GeneratorConfig;
use crate::libvirt::domain::{self, CompanionSettings, DomainSpec};
use crate::libvirt::DEFAULT_RUN_DIR;
use crate::orchestrator::launch::GuestImage;

/// What to run.
#[derive(Debug, Clone)]
pub struct LibvirtDemoOptions {
    /// Where the hosts' directories go.
    pub run_dir: PathBuf,
    /// The guest.
    pub image: GuestImage,
    /// The binary the hooks run.
    pub vfmig_bin: PathBuf,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// Device writes per second.
    pub rate: u64,
    /// Bytes per record.
    pub record_size: u32,
    /// Writes before the migration starts.
    pub lead_time: Duration,
    /// `virsh migrate --bandwidth`, MiB/s.
    pub bandwidth_mib_s: u64,
    /// Companions log device writes (off: the negative control).
    pub tracking: bool,
}

impl LibvirtDemoOptions {
    /// The demo's defaults: a 512 MiB guest (the generator's window is at 384 MiB), 4000 writes/s
    /// of 256 B for 0.5 s before the migration, 64 MiB/s.
    pub fn new(run_dir: PathBuf, image: GuestImage, vfmig_bin: PathBuf) -> Self {
        Self {
            run_dir,
            image,
            vfmig_bin,
            mem_mib: 512,
            rate: 4000,
            record_size: 256,
            lead_time: Duration::from_millis(500),
            bandwidth_mib_s: 64,
            tracking: true,
        }
    }
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct LibvirtDemoReport {
    /// Device writes the destination does not hold.
    pub lost_writes: u64,
    /// Records the source's ledger says landed.
    pub records_written: u64,
    /// The source companion's device writes.
    pub device_writes: u64,
    /// How long `virsh migrate` took, ms.
    pub virsh_migrate_ms: u64,
    /// libvirt's job statistics of the completed migration (`virsh domjobinfo --completed`
    /// on the source): total time and downtime, ms, when libvirt reports them.
    pub total_ms: Option<u64>,
    /// The downtime libvirt reports, ms.
    pub downtime_ms: Option<u64>,
}

/// Why the libvirt demo failed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtDemoError {
    /// The hosts.
    #[error(transparent)]
    Lab(#[from] LibvirtLabError),
    /// A companion's control socket.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A file of the run.
    #[error("cannot use {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// The source companion's last statistics are unreadable.
    #[error("the source companion's last statistics ({path}) are unreadable")]
    LastStats {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Waits until the companion in `dir` has guest RAM mapped (the guest started its NIC).
pub(super) fn wait_guest_up(
    dir: &Path,
    timeout: Duration,
) -> Result<ControlClient, LibvirtDemoError> {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = ControlClient::connect(&dir.join("control.sock"), Duration::from_secs(2))
        {
            if c.status().is_ok_and(|s| !s.regions.is_empty()) {
                return Ok(c);
            }
        }
        if start.elapsed() > timeout {
            return Err(LibvirtDemoError::Timeout(format!(
                "the guest's NIC did not start within {} s (companion in {})",
                timeout.as_secs(),
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `Key: value unit` line of `virsh domjobinfo`, in ms.
fn jobinfo_ms(info: &str, key: &str) -> Option<u64> {
    info.lines()
        .find(|l| l.trim_start().starts_with(key))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The lab's guest as libvirt domain `name` (its companion's files under `/run/vfmig/NAME` in
/// the host's namespace, its console there in `serial.log`), booted with `guest_args` for its
/// agent.
pub(super) fn lab_domain(
    name: &str,
    mem_mib: u64,
    image: &GuestImage,
    guest_args: &str,
    companion: CompanionSettings,
) -> DomainSpec {
    DomainSpec {
        name: name.into(),
        domain_type: "qemu".into(),
        memory_mib: mem_mib,
        vcpus: 1,
        mac: domain::mac_for(name),
        run_dir: DEFAULT_RUN_DIR.into(),
        emulator: "/usr/bin/qemu-system-x86_64".into(),
        kernel: Some((
            image.kernel.clone(),
            image.initrd.clone(),
            format!("console=ttyS0 memmap=16M$0x18000000 panic=-1 quiet loglevel=3 {guest_args}")
                .trim_end()
                .to_string(),
        )),
        disk: None,
        serial_log: Some(Path::new(DEFAULT_RUN_DIR).join(name).join("serial.log")),
        companion,
    }
}

/// Runs it on two fresh libvirt hosts.
pub fn run(opts: &LibvirtDemoOptions) -> Result<LibvirtDemoReport, LibvirtDemoError> {
    let hosts = LibvirtHosts::start(&opts.run_dir, 2, &opts.vfmig_bin)?;
    let name = "a";
    let spec = lab_domain(
        name,
        opts.mem_mib,
        &opts.image,
        "",
        CompanionSettings {
            unsafe_no_tracking: !opts.tracking,
            ..Default::default()
        },
    );
    define_and_start(&hosts, 0, &opts.run_dir, &spec)?;
    let mut src = wait_guest_up(&hosts.companion_dir(0, name), Duration::from_secs(120))?;
    let win = window(opts.record_size);
    if opts.rate > 0 {
        src.generator_start(GeneratorConfig {
            window: win,
            rate: opts.rate,
        })?;
        std::thread::sleep(opts.lead_time);
    }
    drop(src);
    let moved = migrate_with_virsh(&hosts, name, opts.bandwidth_mib_s)?;

    // The source's companion was stopped by the release hook, which kept its last stats.
    let last = hook_last_stats(&hosts.companion_dir(0, name))?;
    let mut dst = wait_guest_up(&hosts.companion_dir(1, name), Duration::from_secs(60))?;
    let versions = match (&last.1, opts.rate) {
        (Some(l), r) if r > 0 => l.versions.clone(),
        _ => vec![0; win.slots as usize],
    };
    let found = dst.scan(win)?.slots;
    let verdict = verdict(&versions, &found);
    Ok(LibvirtDemoReport {
        lost_writes: verdict.lost_writes,
        records_written: verdict.records_written,
        device_writes: last.0.dma.writes,
        virsh_migrate_ms: moved.virsh_ms,
        total_ms: moved.total_ms,
        downtime_ms: moved.downtime_ms,
    })
}

/// Defines domain `spec` on libvirt host `host` (its XML kept in `run_dir`) and starts it.
pub(super) fn define_and_start(
    hosts: &LibvirtHosts,
    host: usize,
    run_dir: &Path,
    spec: &DomainSpec,
) -> Result<(), LibvirtDemoError> {
    let xml_path = run_dir.join(format!("{}.xml", spec.name));
    std::fs::write(&xml_path, domain::to_xml(spec)).map_err(|source| LibvirtDemoError::File {
        path: xml_path.clone(),
        source,
    })?;
    let xml = xml_path.display().to_string();
    hosts.virsh(host, &["define", &xml])?;
    hosts.virsh(host, &["start", &spec.name])?;
    Ok(())
}

/// What `virsh migrate` took, and libvirt's figures of the completed job.
#[derive(Debug, Clone, Copy)]
pub(super) struct VirshMigration {
    /// How long `virsh migrate` took, ms.
    pub(super) virsh_ms: u64,
    /// libvirt's total time of the job (`virsh domjobinfo --completed`), ms.
    pub(super) total_ms: Option<u64>,
    /// libvirt's downtime, ms.
    pub(super) downtime_ms: Option<u64>,
}

/// `virsh migrate --live --p2p` of domain `name` from host 0 to host 1, at `bandwidth_mib_s`.
pub(super) fn migrate_with_virsh(
    hosts: &LibvirtHosts,
    name: &str,
    bandwidth_mib_s: u64,
) -> Result<VirshMigration, LibvirtDemoError> {
    let started = Instant::now();
    let migrate_uri = format!("tcp://{}", hosts.addr(1));
    let bandwidth = bandwidth_mib_s.to_string();
    hosts.virsh(
        0,
        &[
            "migrate",
            "--live",
            "--p2p",
            "--bandwidth",
            &bandwidth,
            name,
            &hosts.uri(1),
            "--migrateuri",
            &migrate_uri,
        ],
    )?;
    let virsh_ms = started.elapsed().as_millis() as u64;
    let info = hosts
        .virsh(0, &["domjobinfo", "--completed", name])
        .unwrap_or_default();
    Ok(VirshMigration {
        virsh_ms,
        total_ms: jobinfo_ms(&info, "Time elapsed"),
        downtime_ms: jobinfo_ms(&info, "Total downtime"),
    })
}

/// The source companion's statistics and ledger, as the hook kept them (waits for the file).
pub(super) fn hook_last_stats(
    dir: &Path,
) -> Result<(StatsReply, Option<LedgerReply>), LibvirtDemoError> {
    let path = dir.join("last-stats.json");
    let start = Instant::now();
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&path) {
            break t;
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(LibvirtDemoError::Timeout(format!(
                "the release hook did not keep the source companion's statistics ({})",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    #[derive(serde::Deserialize)]
    struct Last {
        stats: StatsReply,
        ledger: Option<LedgerReply>,
    }
    let last: Last = serde_json::from_str(&text).map_err(|source| LibvirtDemoError::LastStats {
        path: path.clone(),
        source,
    })?;
    Ok((last.stats, last.ledger))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobinfo_times_are_read_in_ms() {
        let info = "Job type:         Completed\nTime elapsed:     2405         ms\n\
                    Total downtime:   31           ms\n";
        assert_eq!(jobinfo_ms(info, "Time elapsed"), Some(2405));
        assert_eq!(jobinfo_ms(info, "Total downtime"), Some(31));
        assert_eq!(jobinfo_ms(info, "Setup time"), None);
    }
}
