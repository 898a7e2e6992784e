//! Unmodified MPI jobs in the lab's VMs: Debian's Open MPI 4.1, HPCC and NetPIPE in the MPI
//! guest image (`tools/mpi-image.sh`), started by Open MPI's own launcher in one guest and
//! judged by what those programs print.
//!
//! Each VM has two NICs: `eth0`, the vhost-user NIC its companion serves, and an IP NIC on a
//! QEMU multicast segment shared by the run's VMs ([`IpNic`]), across the test hosts' bridge.
//! Open MPI's launcher (over dropbear), its out-of-band channel and, for now, its data path
//! (libfabric's `tcp;ofi_rxm`) use the IP NIC; [`MpiLaunch::provider`] is where the vfmig
//! provider will be named instead.
//!
//! The guest side is `tools/mpi-guest-run.sh`: it reads `vfmig.mpi*` options from the kernel
//! command line ([`guest_args`]) and prints each job and file between marker lines on the
//! console ([`Console::parse`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::hosts::{Hosts, HostsError};
use super::qmp_driver::QmpDriveError;
use crate::orchestrator::launch::{
    mac_for, FabricSpec, GuestImage, IpNic, LaunchError, Nic, Role, RunningVm, VmSpec,
};
use crate::orchestrator::summary::MigrationSummary;
use crate::vf::soft::ClusterMap;

/// Open MPI's own libfabric path over TCP, on the IP NIC.
pub const TCP_PROVIDER: &str = "tcp;ofi_rxm";
/// vfmig's libfabric provider, on the soft VF (`provider/`).
pub const VFMIG_PROVIDER: &str = "vfmig";

/// The MPI image's initramfs in `tools/setup.sh`'s cache.
pub const MPI_INITRD: &str = "mpi-initramfs.cpio.gz";

/// The guests' network on the IP NIC: host `i` is `mpi{i}` at 10.78.0.(i+1) (set by the guest
/// from `vfmig.mpi=INDEX:COUNT`).
pub fn guest_host(index: usize) -> String {
    format!("mpi{index}")
}

/// Errors of an MPI run.
#[derive(Debug, thiserror::Error)]
pub enum MpiError {
    /// The MPI guest image is missing.
    #[error("the MPI guest image is missing: run `bash tools/setup.sh` (as root)")]
    NoImage(#[source] Box<LaunchError>),
    /// The test hosts could not be set up.
    #[error("cannot set up the MPI run's test hosts")]
    Hosts(#[from] HostsError),
    /// A VM could not be started.
    #[error("MPI run: cannot start VM {vm}")]
    Launch {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: Box<LaunchError>,
    },
    /// The jobs did not finish in time.
    #[error(
        "MPI run: rank 0's guest did not finish its jobs within {secs} s; last console lines of {}:\n{tail}",
        serial.display()
    )]
    Timeout {
        /// Seconds waited.
        secs: u64,
        /// Rank 0's console.
        serial: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// The soft VFs' cluster file and keys could not be written.
    #[error("MPI run: cannot write the soft VFs' cluster file")]
    Cluster(#[source] Box<super::scenario::ScenarioError>),
    /// The migration failed.
    #[error("MPI run: migrating VM {vm} failed")]
    Migration {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: Box<QmpDriveError>,
    },
    /// HPCC's output has no summary to judge.
    #[error("hpccoutf.txt has no summary section (HPCC did not finish)")]
    NoHpccSummary,
    /// HPCC's summary lacks its verdict.
    #[error("hpccoutf.txt's summary has no {0} line")]
    NoHpccVerdict(&'static str),
}

/// HPCC's problem sizes: `hpccinf.txt`'s N, NB and process grid P x Q (P x Q ranks for HPL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HpccInput {
    /// HPL's matrix order.
    pub n: u32,
    /// Its block size.
    pub nb: u32,
    /// Process grid rows.
    pub p: u32,
    /// Process grid columns.
    pub q: u32,
}

impl HpccInput {
    /// A run that takes well under a minute on three TCG guests: N=400, NB=40, 1 x `ranks`.
    pub fn small(ranks: u32) -> Self {
        Self {
            n: 400,
            nb: 40,
            p: 1,
            q: ranks,
        }
    }
}

/// Open MPI's launch line for `program` on `hosts`, one rank each: the one place it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpiLaunch {
    /// Guest host names (from [`guest_host`]), one rank on each.
    pub hosts: Vec<String>,
    /// libfabric provider(s) for Open MPI's `mtl ofi` (`mtl_ofi_provider_include`).
    pub provider: String,
    /// The program and its arguments.
    pub program: Vec<String>,
}

impl MpiLaunch {
    /// `program` on guests `0..ranks` over [`TCP_PROVIDER`].
    pub fn new(ranks: usize, program: &[&str]) -> Self {
        Self {
            hosts: (0..ranks).map(guest_host).collect(),
            provider: TCP_PROVIDER.into(),
            program: program.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The `mpirun` command line.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "mpirun",
            // The lab's guests run everything as root.
            "--allow-run-as-root",
            "-np",
            &self.hosts.len().to_string(),
            "--host",
            &self.hosts.join(","),
            // orted is started in the other guests through dropbear (the image's vfmig-rsh).
            "--mca",
            "plm_rsh_agent",
            "vfmig-rsh",
            // The runtime's out-of-band channel on the IP NIC's segment.
            "--mca",
            "oob_tcp_if_include",
            "10.78.0.0/24",
            // MPI point-to-point through libfabric, on the provider named here.
            "--mca",
            "pml",
            "cm",
            "--mca",
            "mtl",
            "ofi",
            "--mca",
            "mtl_ofi_provider_include",
            &self.provider,
            "--mca",
            "btl",
            "self",
            // libfabric's tcp provider on the IP NIC (eth0 is the companion's).
            "-x",
            "FI_TCP_IFACE=eth1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(self.program.iter().cloned());
        a
    }
}

/// A job rank 0's guest runs: its name on the console and its launch line.
#[derive(Debug, Clone)]
pub struct MpiJob {
    /// Name (a word).
    pub name: String,
    /// What it runs.
    pub launch: MpiLaunch,
}

/// The kernel command line options of guest `index` of `count`, whose IP NIC has MAC
/// `ip_mac`; rank 0's guest (`index` 0) also gets the jobs, HPCC's input and the files to
/// print. Words are colon-separated: no launch argument may hold a space or a colon.
pub fn guest_args(
    index: usize,
    count: usize,
    ip_mac: &str,
    hpcc: Option<HpccInput>,
    jobs: &[MpiJob],
    show: &[&str],
) -> String {
    let mut a = vec![
        format!("vfmig.mpi={index}:{count}"),
        format!("vfmig.mpi_mac={ip_mac}"),
        // The VM's name in the soft VFs' cluster map, for the vfmig provider.
        format!("vfmig.vm={}", guest_host(index)),
    ];
    if index == 0 {
        if let Some(h) = hpcc {
            a.push(format!("vfmig.hpcc={}:{}:{}:{}", h.n, h.nb, h.p, h.q));
        }
        for j in jobs {
            a.push(format!(
                "vfmig.mpi_job={}:{}",
                j.name,
                j.launch.args().join(":")
            ));
        }
        for f in show {
            a.push(format!("vfmig.mpi_show={f}"));
        }
    }
    a.join(" ")
}

/// One job as rank 0's console showed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobOutcome {
    /// Its exit status (`None`: it never ended).
    pub exit: Option<i32>,
    /// Its wall time in the guest, seconds.
    pub secs: Option<u64>,
    /// Everything it printed.
    pub output: String,
}

/// What rank 0's guest printed: its jobs, its files, and whether it got to the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Console {
    /// Jobs by name.
    pub jobs: BTreeMap<String, JobOutcome>,
    /// Files by name.
    pub files: BTreeMap<String, String>,
    /// `vfmig-mpi: done` was printed.
    pub done: bool,
}

impl Console {
    /// Reads the marker lines of `tools/mpi-guest-run.sh` out of a console.
    pub fn parse(text: &str) -> Self {
        enum In {
            Nothing,
            Job(String),
            File(String),
        }
        let mut c = Self::default();
        let mut now = In::Nothing;
        for line in text.lines().map(|l| l.trim_end_matches('\r')) {
            let Some(mark) = line.strip_prefix("vfmig-mpi: ") else {
                match &now {
                    In::Job(name) => {
                        let out = &mut c.jobs.get_mut(name).expect("job started").output;
                        out.push_str(line);
                        out.push('\n');
                    }
                    In::File(name) => {
                        let f = c.files.get_mut(name).expect("file begun");
                        f.push_str(line);
                        f.push('\n');
                    }
                    In::Nothing => {}
                }
                continue;
            };
            let words: Vec<&str> = mark.split_whitespace().collect();
            match words.as_slice() {
                ["job", name, "start"] => {
                    c.jobs.insert(
                        name.to_string(),
                        JobOutcome {
                            exit: None,
                            secs: None,
                            output: String::new(),
                        },
                    );
                    now = In::Job(name.to_string());
                }
                ["job", name, "exit", status, "after", secs, "s"] => {
                    if let Some(j) = c.jobs.get_mut(*name) {
                        j.exit = status.parse().ok();
                        j.secs = secs.parse().ok();
                    }
                    now = In::Nothing;
                }
                ["file", name, "begin"] => {
                    c.files.insert(name.to_string(), String::new());
                    now = In::File(name.to_string());
                }
                ["file", _, "end"] => now = In::Nothing,
                ["done"] => c.done = true,
                _ => {}
            }
        }
        c
    }
}

/// HPCC's verdict and main figures, from the summary section of its `hpccoutf.txt`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HpccSummary {
    /// `Success=1`: HPCC's own verdict that every test passed its check.
    pub success: bool,
    /// Lines of the tests' own checks that say `FAILED` or `(failed)` (HPL's residual checks,
    /// RandomAccess's and PTRANS's error counts).
    pub failed_checks: u32,
    /// HPL, Tflop/s.
    pub hpl_tflops: Option<f64>,
    /// StarDGEMM, Gflop/s per process.
    pub star_dgemm_gflops: Option<f64>,
    /// PTRANS, GB/s.
    pub ptrans_gbs: Option<f64>,
    /// MPIRandomAccess, GUP/s.
    pub mpi_random_access_gups: Option<f64>,
    /// StarSTREAM Triad, GB/s per process.
    pub star_stream_triad: Option<f64>,
    /// MPIFFT, Gflop/s.
    pub mpi_fft_gflops: Option<f64>,
    /// Average ping-pong latency, µs.
    pub avg_ping_pong_latency_usec: Option<f64>,
    /// Average ping-pong bandwidth, GB/s.
    pub avg_ping_pong_bandwidth_gbytes: Option<f64>,
}

impl HpccSummary {
    /// Reads the `key=value` lines between HPCC's `Begin of Summary section.` and `End of
    /// Summary section.`, and counts the failed checks above them. Without the summary or its
    /// `Success=` line there is no verdict: an error.
    pub fn parse(hpccoutf: &str) -> Result<Self, MpiError> {
        let start = hpccoutf
            .find("Begin of Summary section.")
            .ok_or(MpiError::NoHpccSummary)?;
        let body = &hpccoutf[start..];
        let end = body
            .find("End of Summary section.")
            .ok_or(MpiError::NoHpccSummary)?;
        let kv: BTreeMap<&str, &str> = body[..end]
            .lines()
            .filter_map(|l| l.trim().split_once('='))
            .collect();
        let num = |k: &str| kv.get(k).and_then(|v| v.trim().parse::<f64>().ok());
        let success = kv
            .get("Success")
            .ok_or(MpiError::NoHpccVerdict("Success="))?
            .trim()
            == "1";
        let failed_checks = hpccoutf[..start]
            .lines()
            .filter(|l| l.contains("FAILED") || l.contains("(failed)"))
            .count() as u32;
        Ok(Self {
            success,
            failed_checks,
            hpl_tflops: num("HPL_Tflops"),
            star_dgemm_gflops: num("StarDGEMM_Gflops"),
            ptrans_gbs: num("PTRANS_GBs"),
            mpi_random_access_gups: num("MPIRandomAccess_GUPs"),
            star_stream_triad: num("StarSTREAM_Triad"),
            mpi_fft_gflops: num("MPIFFT_Gflops"),
            avg_ping_pong_latency_usec: num("AvgPingPongLatency_usec"),
            avg_ping_pong_bandwidth_gbytes: num("AvgPingPongBandwidth_GBytes"),
        })
    }

    /// HPCC's verdict: `Success=1` and no failed check.
    pub fn passed(&self) -> bool {
        self.success && self.failed_checks == 0
    }
}

/// One NetPIPE point: a message size, its one-way time and throughput.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NetpipePoint {
    /// Message size, bytes.
    pub bytes: u64,
    /// Throughput, Mbit/s.
    pub mbps: f64,
    /// Half the round trip, µs.
    pub usec: f64,
}

/// Reads NetPIPE's (`NPmpi`, Debian's `NPopenmpi`) result lines,
/// `  3:       4 bytes     32 times -->      0.01 Mbps in    3720.51 usec`, in order.
pub fn netpipe_points(output: &str) -> Vec<NetpipePoint> {
    output
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let w: Vec<&str> = rest.split_whitespace().collect();
            match w.as_slice() {
                [bytes, "bytes", _, "times", "-->", mbps, "Mbps", "in", usec, "usec"] => {
                    Some(NetpipePoint {
                        bytes: bytes.parse().ok()?,
                        mbps: mbps.parse().ok()?,
                        usec: usec.parse().ok()?,
                    })
                }
                _ => None,
            }
        })
        .collect()
}

/// Settings of an MPI run.
#[derive(Debug, Clone)]
pub struct MpiRunOptions {
    /// VMs, one rank each.
    pub vms: usize,
    /// Guest RAM per VM, MiB.
    pub mem_mib: u64,
    /// Run directory (one folder per VM under it).
    pub run_dir: PathBuf,
    /// QEMU accelerator.
    pub accel: String,
    /// The MPI guest image ([`mpi_image`]).
    pub image: GuestImage,
    /// The `vfmig` binary, for the companions.
    pub vfmig_bin: PathBuf,
    /// HPCC on every VM, with this input; none: no HPCC.
    pub hpcc: Option<HpccInput>,
    /// NetPIPE between the first two VMs up to this message size; none: no NetPIPE.
    pub netpipe_max_bytes: Option<u64>,
    /// `mpi-ring` on every VM (`provider/tests/mpi/ring_checksum.c`), after HPCC; none: not
    /// run.
    pub ring: Option<RingJob>,
    /// Whether the migrated VM's destination companion takes the VF over (`--incoming`);
    /// false: the negative control, in which the VF's state stays behind.
    pub handoff: bool,
    /// Whether the migrated VM's source companion logs the VF's writes into QEMU's dirty log;
    /// false: the negative control `unsafe-no-tracking` (`--unsafe-no-tracking`).
    pub tracking: bool,
    /// The libfabric provider of every job ([`TCP_PROVIDER`] or [`VFMIG_PROVIDER`]). With
    /// vfmig, every VM has a soft VF on an authenticated fabric, and the migrated VM's
    /// companions hand its VF over.
    pub provider: String,
    /// Migrate the last VM to a fresh QEMU and companion on another test host this long after
    /// HPCC (or the first job) started, by plain QMP (`migrate-incoming`, `migrate`, `cont`);
    /// none: no migration.
    pub migrate_after: Option<Duration>,
    /// Count `migrate_after` from the first time rank 0's console shows this text instead
    /// (e.g. a job's first progress line, once MPI is up).
    pub migrate_from: Option<String>,
    /// Keep the migration's pre-copy going at least this long (see
    /// [`super::qmp_driver::Precopy::at_least`]); none: QEMU converges when it can.
    pub precopy_at_least: Option<Duration>,
    /// How long the whole run may take.
    pub timeout: Duration,
}

/// `mpi-ring`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RingJob {
    /// Rounds.
    pub iters: u32,
    /// Largest message, bytes (sizes cycle from 1 B up to 1 MiB, capped here).
    pub max_bytes: u32,
    /// How long each rank leaves a round's message unread in its receive buffers, ms (0: it
    /// waits at once).
    pub hold_ms: u32,
    /// MiB of its own memory each rank keeps rewriting while it holds (so that a migration's
    /// pre-copy always has pages to send).
    pub dirty_mib: u32,
}

impl RingJob {
    /// `mpi-ring`'s command line.
    pub fn program(&self) -> Vec<String> {
        ["mpi-ring".to_string()]
            .into_iter()
            .chain(
                [self.iters, self.max_bytes, self.hold_ms, self.dirty_mib].map(|n| n.to_string()),
            )
            .collect()
    }
}

/// `mpi-ring`'s verdict: the last JSON line of its output that has a checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RingVerdict {
    /// Ranks.
    pub ranks: u32,
    /// Rounds.
    pub iters: u64,
    /// The checksum of every byte every rank received.
    pub checksum: String,
    /// Messages that differed from what their senders made.
    pub errors: u64,
}

impl RingVerdict {
    /// Reads the verdict out of `mpi-ring`'s output; `None` if it printed none.
    pub fn parse(output: &str) -> Option<Self> {
        output.lines().rev().find_map(|l| {
            let at = l.find('{')?;
            let v: serde_json::Value = serde_json::from_str(&l[at..]).ok()?;
            v.get("checksum")?;
            serde_json::from_value(v).ok()
        })
    }
}

/// The MPI guest image of `tools/setup.sh`.
pub fn mpi_image() -> Result<GuestImage, MpiError> {
    GuestImage::from_setup_with(MPI_INITRD).map_err(|e| MpiError::NoImage(Box::new(e)))
}

/// What an MPI run gave.
#[derive(Debug, Clone, Serialize)]
pub struct MpiReport {
    /// HPCC's job (`None`: not run).
    pub hpcc_job: Option<JobOutcome>,
    /// HPCC's verdict, when its output had one.
    pub hpcc: Option<HpccSummary>,
    /// Why HPCC has no verdict.
    pub hpcc_error: Option<String>,
    /// NetPIPE's job.
    pub netpipe_job: Option<JobOutcome>,
    /// `mpi-ring`'s job: its last line is its JSON verdict.
    pub ring_job: Option<JobOutcome>,
    /// `mpi-ring`'s verdict, when it printed one.
    pub ring: Option<RingVerdict>,
    /// NetPIPE's points.
    pub netpipe: Vec<NetpipePoint>,
    /// The migration of the last VM, when there was one.
    pub migration: Option<MigrationSummary>,
    /// The migrated VM's silence as its peers saw it, ms: the longest any peer's soft VF
    /// heard no request from it, from the last from its old place to the first from its new
    /// one (vfmig provider only; `None` before any request from the new place). It holds the
    /// VF's blackout ([`crate::orchestrator::summary::Takeover::blackout_ms`]) and whatever
    /// time the application itself sent nothing around it.
    pub peer_silence_ms: Option<f64>,
    /// The QPs each VM's soft VF still held once every job had ended (vfmig provider
    /// only; the migrated VM's is its destination's): an endpoint that closes destroys its
    /// QPs, so each is 0 unless a rank leaked them. `None`: the companion could not be read.
    pub qps_left: BTreeMap<String, Option<u64>>,
    /// Seconds from the first launch until every guest's driver had started its NIC.
    pub boot_secs: f64,
    /// Seconds of the whole run.
    pub wall_secs: f64,
}

/// The run's multicast segment: a group and port from this process's id, so that runs of
/// several processes do not share one.
fn segment() -> SocketAddrV4 {
    let pid = std::process::id();
    SocketAddrV4::new(
        Ipv4Addr::new(230, 78, (pid >> 8) as u8, pid as u8),
        7000 + (pid % 1000) as u16,
    )
}

/// The spec of the run's VM `index`, in test host `index`.
fn vm_spec(
    opts: &MpiRunOptions,
    hosts: &Hosts,
    index: usize,
    jobs: &[MpiJob],
    group: SocketAddrV4,
) -> VmSpec {
    let name = guest_host(index);
    let ip_mac = mac_for(&format!("{name}-ip"));
    let show: &[&str] = if opts.hpcc.is_some() {
        &["hpccoutf.txt"]
    } else {
        &[]
    };
    VmSpec {
        run_dir: opts.run_dir.join(&name),
        mem_mib: opts.mem_mib,
        role: Role::Source,
        accel: opts.accel.clone(),
        image: opts.image.clone(),
        vfmig_bin: opts.vfmig_bin.clone(),
        qemu_bin: "qemu-system-x86_64".into(),
        config_dir: None,
        mac: mac_for(&name),
        nic: Nic::VhostUser,
        netns: Some(hosts.netns(index)),
        fabric: None,
        guest_args: guest_args(index, opts.vms, &ip_mac, opts.hpcc, jobs, show),
        passthrough: None,
        ip_nic: Some(IpNic {
            mac: ip_mac,
            group,
            local: hosts.addr(index),
        }),
        name,
    }
}

/// The soft VFs of a run on the vfmig provider: every VM's fabric address in the cluster
/// map, and the destination's host among its hosts.
struct Fabrics {
    cluster: PathBuf,
    keys: crate::vf::soft::Generated,
    addrs: Vec<String>,
}

impl Fabrics {
    /// The fabric of VM `name` on test host `host`.
    fn spec(&self, name: &str, host: usize) -> FabricSpec {
        FabricSpec {
            listen: self.addrs[host].clone(),
            cluster: self.cluster.clone(),
            key: self.keys.private_keys.get(name).cloned(),
            untracked: false,
            no_handoff: false,
        }
    }
}

fn fabrics(opts: &MpiRunOptions, hosts: &Hosts) -> Result<Option<Fabrics>, MpiError> {
    if opts.provider != VFMIG_PROVIDER {
        return Ok(None);
    }
    let hosts_used = opts.vms + usize::from(opts.migrate_after.is_some());
    let addrs: Vec<String> = (0..hosts_used)
        .map(|i| format!("{}:{}", hosts.addr(i), super::scenario::FABRIC_PORT))
        .collect();
    let cluster = ClusterMap {
        vms: (0..opts.vms)
            .map(|i| (guest_host(i), addrs[i].clone()))
            .collect(),
        hosts: addrs[opts.vms..].to_vec(),
        ..ClusterMap::default()
    };
    let (cluster, keys) = super::scenario::write_cluster_in(&opts.run_dir, &cluster)
        .map_err(|e| MpiError::Cluster(Box::new(e)))?;
    Ok(Some(Fabrics {
        cluster,
        keys,
        addrs,
    }))
}

/// Says whether `mpi-ring`'s rank `rank` (one per VM) has just begun a hold: its line
/// `{"tool":"mpi-ring","rank":R,"hold":I}` appeared on the console less than 300 ms ago (of a
/// hold of seconds). Always yes when the console has no such line: nothing to wait for.
struct HoldWatch<'a> {
    serial: &'a Path,
    mark: String,
    /// Hold lines counted at the last look, and when their count last grew (none yet: the
    /// first look only counts).
    seen: std::cell::Cell<Option<(usize, Option<Instant>)>>,
}

impl<'a> HoldWatch<'a> {
    fn new(serial: &'a Path, rank: usize) -> Self {
        Self {
            serial,
            mark: format!("\"tool\":\"mpi-ring\",\"rank\":{rank},\"hold\":"),
            seen: Default::default(),
        }
    }

    fn just_began(&self) -> bool {
        let text = std::fs::read_to_string(self.serial).unwrap_or_default();
        let holds = text.matches(self.mark.as_str()).count();
        if holds == 0 {
            return true;
        }
        let at = match self.seen.get() {
            Some((before, at)) if holds == before => at,
            Some(_) => Some(Instant::now()),
            None => None,
        };
        self.seen.set(Some((holds, at)));
        at.is_some_and(|t| t.elapsed() < Duration::from_millis(300))
    }
}

/// The longest silence of `moved` that the soft VFs of `peers` saw across its last move, ms.
fn silence_seen_by_peers(peers: &[RunningVm], moved: &str) -> Option<f64> {
    let silence_at = |vm: &RunningVm| {
        let moves = soft_vf_stats(vm)?.peer_moves;
        moves.into_iter().rev().find(|m| m.vm == moved)?.silent_ms
    };
    peers.iter().filter_map(silence_at).reduce(f64::max)
}

/// The counters of `vm`'s soft VF, read from its companion (`None`, with a warning, when it
/// cannot be read).
fn soft_vf_stats(vm: &RunningVm) -> Option<crate::vf::soft::SoftVfStats> {
    use crate::companion::control::ControlClient;
    let stats = ControlClient::connect(&vm.paths.control_socket, Duration::from_secs(5))
        .and_then(|mut c| c.stats());
    match stats {
        Ok(s) => s.soft_vf,
        Err(e) => {
            let vm = &vm.spec.name;
            tracing::warn!(%vm, error = %e, "MPI run: cannot read a companion");
            None
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Boots `opts.vms` MPI guests, each with a companion on its own test host, runs HPCC across
/// all of them and NetPIPE between the first two from rank 0's guest, and reads their results
/// from its console.
pub fn run(opts: &MpiRunOptions) -> Result<MpiReport, MpiError> {
    let start = Instant::now();
    // One host more for the migration's destination.
    let hosts = Hosts::create(opts.vms + usize::from(opts.migrate_after.is_some()))?;
    let mut jobs = Vec::new();
    let on = |ranks: usize, program: &[&str]| MpiLaunch {
        provider: opts.provider.clone(),
        ..MpiLaunch::new(ranks, program)
    };
    if opts.hpcc.is_some() {
        jobs.push(MpiJob {
            name: "hpcc".into(),
            launch: on(opts.vms, &["hpcc"]),
        });
    }
    if let Some(ring) = opts.ring {
        let program = ring.program();
        let program: Vec<&str> = program.iter().map(String::as_str).collect();
        jobs.push(MpiJob {
            name: "ring".into(),
            launch: on(opts.vms, &program),
        });
    }
    if let Some(max) = opts.netpipe_max_bytes {
        jobs.push(MpiJob {
            name: "netpipe".into(),
            launch: on(2, &["NPopenmpi", "-u", &max.to_string(), "-p", "0"]),
        });
    }
    let fabrics = fabrics(opts, &hosts)?;
    let group = segment();
    let mut vms = Vec::new();
    for i in 0..opts.vms {
        let mut spec = vm_spec(opts, &hosts, i, &jobs, group);
        spec.fabric = fabrics.as_ref().map(|f| FabricSpec {
            // The negative control: the VM that migrates does not log its VF's writes.
            untracked: !opts.tracking && i == opts.vms - 1 && opts.migrate_after.is_some(),
            ..f.spec(&spec.name, i)
        });
        let vm = spec.name.clone();
        vms.push(RunningVm::launch(spec).map_err(|e| MpiError::Launch {
            vm,
            source: Box::new(e),
        })?);
    }
    for vm in &mut vms {
        let left = opts.timeout.saturating_sub(start.elapsed());
        vm.wait_guest_up(left).map_err(|e| MpiError::Launch {
            vm: vm.spec.name.clone(),
            source: Box::new(e),
        })?;
    }
    let boot_secs = start.elapsed().as_secs_f64();
    let launch_error = |vm: &str| {
        let vm = vm.to_string();
        move |e| MpiError::Launch {
            vm,
            source: Box::new(e),
        }
    };
    // The last VM's destination: the same NICs (its IP NIC's MAC included) on the next host.
    let last = opts.vms - 1;
    let dest = match opts.migrate_after {
        None => None,
        Some(_) => {
            let mut spec = vm_spec(opts, &hosts, last, &jobs, group);
            spec.fabric = fabrics.as_ref().map(|f| FabricSpec {
                no_handoff: !opts.handoff,
                ..f.spec(&spec.name, opts.vms)
            });
            spec.role = Role::Destination;
            spec.run_dir = opts.run_dir.join(format!("{}-destination", spec.name));
            spec.netns = Some(hosts.netns(opts.vms));
            if let Some(nic) = spec.ip_nic.as_mut() {
                nic.local = hosts.addr(opts.vms);
            }
            let name = spec.name.clone();
            Some(RunningVm::launch(spec).map_err(launch_error(&name))?)
        }
    };
    let serial = vms[0].paths.serial_log.clone();
    let mut migration = None;
    // When this process first saw a job start on rank 0's console.
    let mut job_started: Option<Instant> = None;
    let holds = HoldWatch::new(&serial, last);
    let console = loop {
        let c = Console::parse(&std::fs::read_to_string(&serial).unwrap_or_default());
        if c.done {
            break c;
        }
        let started = match &opts.migrate_from {
            None => !c.jobs.is_empty(),
            Some(mark) => c.jobs.values().any(|j| j.output.contains(mark.as_str())),
        };
        if job_started.is_none() && started {
            job_started = Some(Instant::now());
        }
        if let (Some(after), Some(dest), None) = (opts.migrate_after, dest.as_ref(), &migration) {
            if let Some(since) = job_started {
                if since.elapsed() >= after {
                    let src = &vms[last];
                    let name = src.spec.name.clone();
                    // With soft VFs, the companions are read after the migration (the
                    // handoff's figures); plain QMP drives it either way.
                    let ctl = fabrics.as_ref().map(|_| {
                        (
                            src.paths.control_socket.as_path(),
                            dest.paths.control_socket.as_path(),
                        )
                    });
                    let summary = super::qmp_driver::migrate(
                        &src.qmp().map_err(launch_error(&name))?,
                        &dest.qmp().map_err(launch_error(&name))?,
                        &format!("tcp:{}:4444", hosts.addr(opts.vms)),
                        super::qmp_driver::Precopy {
                            max_bandwidth: None,
                            at_least: opts.precopy_at_least,
                            release_when: Some(&|| holds.just_began()),
                        },
                        opts.timeout,
                        ctl,
                    )
                    .map_err(|e| MpiError::Migration {
                        vm: name,
                        source: Box::new(e),
                    })?;
                    tracing::info!(
                        total_ms = summary.total_ms,
                        downtime_ms = summary.downtime_ms,
                        "MPI run: the last VM migrated"
                    );
                    migration = Some(summary);
                }
            }
        }
        if start.elapsed() > opts.timeout {
            return Err(MpiError::Timeout {
                secs: opts.timeout.as_secs(),
                serial: serial.clone(),
                tail: tail(&serial, 30),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let (hpcc, hpcc_error) = match console.files.get("hpccoutf.txt") {
        None => (None, opts.hpcc.map(|_| "no hpccoutf.txt".to_string())),
        Some(text) => match HpccSummary::parse(text) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        },
    };
    let netpipe_job = console.jobs.get("netpipe").cloned();
    let ring_job = console.jobs.get("ring").cloned();
    let peer_silence_ms = match (&migration, &fabrics) {
        (Some(_), Some(_)) => silence_seen_by_peers(&vms[..last], &guest_host(last)),
        _ => None,
    };
    let qps_left = match &fabrics {
        None => BTreeMap::new(),
        Some(_) => {
            let here = vms[..last]
                .iter()
                .chain(std::iter::once(match (&migration, &dest) {
                    (Some(_), Some(d)) => d,
                    _ => &vms[last],
                }));
            here.map(|vm| (vm.spec.name.clone(), soft_vf_stats(vm).map(|s| s.qps)))
                .collect()
        }
    };
    Ok(MpiReport {
        hpcc_job: console.jobs.get("hpcc").cloned(),
        hpcc,
        hpcc_error,
        netpipe: netpipe_job
            .as_ref()
            .map(|j| netpipe_points(&j.output))
            .unwrap_or_default(),
        netpipe_job,
        ring: ring_job
            .as_ref()
            .and_then(|j| RingVerdict::parse(&j.output)),
        ring_job,
        migration,
        peer_silence_ms,
        qps_left,
        boot_secs,
        wall_secs: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpi_rings_verdict_is_its_last_line_with_a_checksum() {
        let job = RingJob {
            iters: 80,
            max_bytes: 200_000,
            hold_ms: 250,
            dirty_mib: 16,
        };
        assert_eq!(job.program(), ["mpi-ring", "80", "200000", "250", "16"]);
        let out = "{\"tool\":\"mpi-ring\",\"rank\":0,\"iter\":0}\n\
                   [mpi1:00117] noise {not json}\n\
                   {\"tool\":\"mpi-ring\",\"ranks\":2,\"iters\":80,\"checksum\":\"63c8\",\"errors\":1}\n\
                   done\n";
        assert_eq!(
            RingVerdict::parse(out),
            Some(RingVerdict {
                ranks: 2,
                iters: 80,
                checksum: "63c8".into(),
                errors: 1
            })
        );
        // A job that aborted before its verdict has none.
        assert_eq!(RingVerdict::parse(&out[..out.find("[mpi1").unwrap()]), None);
    }

    #[test]
    fn the_launch_line_names_the_provider_once_and_the_ip_nic() {
        let l = MpiLaunch::new(3, &["hpcc"]);
        let a = l.args();
        assert_eq!(a[0], "mpirun");
        assert_eq!(a.last().unwrap(), "hpcc");
        let joined = a.join(" ");
        assert!(joined.contains("-np 3 --host mpi0,mpi1,mpi2"));
        assert!(joined.contains("--mca mtl_ofi_provider_include tcp;ofi_rxm"));
        assert!(joined.contains("--mca plm_rsh_agent vfmig-rsh"));
        let mut v = l.clone();
        v.provider = "vfmig".into();
        assert!(v
            .args()
            .join(" ")
            .contains("--mca mtl_ofi_provider_include vfmig"));
        // The guest splits the command at colons and the kernel command line at spaces.
        assert!(a.iter().all(|w| !w.contains(' ') && !w.contains(':')));
    }

    #[test]
    fn only_rank_0_gets_the_jobs() {
        let jobs = [MpiJob {
            name: "hpcc".into(),
            launch: MpiLaunch::new(2, &["hpcc"]),
        }];
        let a0 = guest_args(
            0,
            2,
            "52:54:00:01:02:03",
            Some(HpccInput::small(2)),
            &jobs,
            &["hpccoutf.txt"],
        );
        assert!(
            a0.starts_with(
                "vfmig.mpi=0:2 vfmig.mpi_mac=52:54:00:01:02:03 vfmig.vm=mpi0 vfmig.hpcc=400:40:1:2"
            ),
            "{a0}"
        );
        assert!(a0.contains(" vfmig.mpi_job=hpcc:mpirun:--allow-run-as-root:-np:2:"));
        assert!(a0.ends_with(":hpcc vfmig.mpi_show=hpccoutf.txt"));
        let a1 = guest_args(
            1,
            2,
            "m",
            Some(HpccInput::small(2)),
            &jobs,
            &["hpccoutf.txt"],
        );
        assert_eq!(a1, "vfmig.mpi=1:2 vfmig.mpi_mac=m vfmig.vm=mpi1");
    }

    const CONSOLE: &str = "vfmig-guest: nic-bound eth0\r\n\
        vfmig-mpi: up mpi0 10.78.0.1 on eth1\r\n\
        vfmig-mpi: job netpipe start\r\n\
        Now starting the main loop\r\n  \
        0:       1 bytes     52 times -->      0.01 Mbps in     675.36 usec\r\n \
        23:    4096 bytes     27 times -->     27.40 Mbps in    1140.50 usec\r\n\
        vfmig-mpi: job netpipe exit 0 after 21 s\r\n\
        vfmig-mpi: file hpccoutf.txt begin\r\n\
        Success=1\r\n\
        vfmig-mpi: file hpccoutf.txt end\r\n\
        vfmig-mpi: done\r\n";

    /// hpccoutf.txt of Debian's HPCC 1.5.0 on three TCG guests over `tcp;ofi_rxm` (N=400,
    /// NB=40, 1 x 3), as this module's run printed it.
    const HPCCOUTF: &str = include_str!("mpi/hpccoutf-3vms-tcg.txt");

    #[test]
    fn hpccs_verdict_and_figures_come_from_its_summary() {
        let s = HpccSummary::parse(HPCCOUTF).unwrap();
        assert!(s.passed(), "{s:?}");
        assert_eq!(s.failed_checks, 0);
        assert!(s.hpl_tflops.unwrap() > 0.0);
        assert!((s.avg_ping_pong_latency_usec.unwrap() - 2767.98).abs() < 1e-6);
        assert!((s.star_stream_triad.unwrap() - 0.112692).abs() < 1e-9);
        assert!(s.mpi_fft_gflops.is_some() && s.ptrans_gbs.is_some());
    }

    #[test]
    fn hpcc_fails_on_success_0_on_a_failed_check_and_without_a_summary() {
        let zero = HPCCOUTF.replace("Success=1", "Success=0");
        assert!(!HpccSummary::parse(&zero).unwrap().passed());
        let failed = HPCCOUTF.replacen("PASSED", "FAILED", 1);
        let s = HpccSummary::parse(&failed).unwrap();
        assert_eq!(s.failed_checks, 1);
        assert!(!s.passed());
        let cut = &HPCCOUTF[..HPCCOUTF.find("End of Summary section.").unwrap()];
        assert!(matches!(
            HpccSummary::parse(cut),
            Err(MpiError::NoHpccSummary)
        ));
        let no_verdict = HPCCOUTF.replace("Success=1", "");
        assert!(matches!(
            HpccSummary::parse(&no_verdict),
            Err(MpiError::NoHpccVerdict(_))
        ));
        assert!(HpccSummary::parse("").is_err());
    }

    #[test]
    fn the_console_gives_jobs_files_and_the_end() {
        let c = Console::parse(CONSOLE);
        assert!(c.done);
        let j = &c.jobs["netpipe"];
        assert_eq!((j.exit, j.secs), (Some(0), Some(21)));
        let p = netpipe_points(&j.output);
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].bytes, 4096);
        assert!((p[1].mbps - 27.40).abs() < 1e-9 && (p[0].usec - 675.36).abs() < 1e-9);
        assert_eq!(c.files["hpccoutf.txt"], "Success=1\n");
        // A job that never ended, and no end: nothing is taken for done.
        let cut = &CONSOLE[..CONSOLE.find("vfmig-mpi: job netpipe exit").unwrap()];
        let c = Console::parse(cut);
        assert!(!c.done);
        assert_eq!(c.jobs["netpipe"].exit, None);
        assert!(c.files.is_empty());
        assert!(netpipe_points("Using no perturbations\n0: mpi0\n").is_empty());
    }
}
