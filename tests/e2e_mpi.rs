//! Debian's unmodified Open MPI across the MPI guest image's VMs, each with its companion on
//! its own test host: HPCC on every VM, during which the last VM migrates to another host
//! (plain QMP), then NetPIPE between two, both started by `mpirun` in rank 0's guest over
//! dropbear, on Open MPI's own libfabric TCP path (`tcp;ofi_rxm`) over the VMs' shared IP
//! segment. Two VMs: three take 4 to 7 minutes under TCG on two cores, most of it in HPCC's
//! ring bandwidth test.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{init_logging, machine, RunDir};
use vfmig::lab::mpi::{self, HpccInput, MpiRunOptions};

/// NetPIPE's largest message: enough to leave the latency regime, short under TCG.
const NETPIPE_MAX: u64 = 65536;
/// When the last VM migrates, after HPCC started (it runs about two minutes under TCG).
const MIGRATE_AFTER: Duration = Duration::from_secs(20);

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn hpcc_and_netpipe_run_unmodified_across_vms() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("mpi");
    let vms = 2;
    let opts = MpiRunOptions {
        vms,
        mem_mib: 512,
        run_dir: dir.path.clone(),
        accel: "tcg".into(),
        image: mpi::mpi_image().unwrap_or_else(|e| panic!("{e}")),
        vfmig_bin: PathBuf::from(env!("CARGO_BIN_EXE_vfmig")),
        hpcc: Some(HpccInput::small(vms as u32)),
        netpipe_max_bytes: Some(NETPIPE_MAX),
        migrate_after: Some(MIGRATE_AFTER),
        timeout: Duration::from_secs(600),
    };
    let r = mpi::run(&opts).expect("MPI run");
    eprintln!(
        "booted in {:.1} s, whole run {:.1} s; hpcc {:?} s, netpipe {:?} s",
        r.boot_secs,
        r.wall_secs,
        r.hpcc_job.as_ref().and_then(|j| j.secs),
        r.netpipe_job.as_ref().and_then(|j| j.secs),
    );
    eprintln!("{}", serde_json::to_string(&r.hpcc).unwrap());
    let m = r.migration.as_ref().expect("the last VM migrated");
    eprintln!(
        "migration of mpi{} during HPCC: {} total {} ms, downtime {} ms",
        vms - 1,
        m.status,
        m.total_ms,
        m.downtime_ms
    );
    assert_eq!(m.status, "completed");
    let job = r.hpcc_job.as_ref().expect("the hpcc job ran");
    assert!(
        job.secs.unwrap_or(0) > MIGRATE_AFTER.as_secs(),
        "HPCC ended before the migration: {:?} s",
        job.secs
    );

    // HPCC: mpirun ended well, and HPCC's own verdict is in its output.
    let job = r.hpcc_job.as_ref().expect("the hpcc job ran");
    assert_eq!(job.exit, Some(0), "mpirun hpcc:\n{}", job.output);
    let hpcc = r
        .hpcc
        .as_ref()
        .unwrap_or_else(|| panic!("no HPCC verdict: {:?}", r.hpcc_error));
    assert!(hpcc.passed(), "HPCC's verdict: {hpcc:?}");

    // NetPIPE: every size up to the largest, each with a time and a throughput.
    let job = r.netpipe_job.as_ref().expect("the netpipe job ran");
    assert_eq!(job.exit, Some(0), "mpirun NPopenmpi:\n{}", job.output);
    let last = r.netpipe.last().expect("NetPIPE printed no result line");
    assert_eq!(last.bytes, NETPIPE_MAX, "{:?}", r.netpipe);
    // (Throughput rounds to 0.00 Mbit/s for the smallest messages under TCG.)
    assert!(r.netpipe.iter().all(|p| p.usec > 0.0) && last.mbps > 0.0);
    eprintln!(
        "NetPIPE over tcp;ofi_rxm: {:.1} us at {} B, {:.1} Mbit/s at {} B",
        r.netpipe[0].usec, r.netpipe[0].bytes, last.mbps, last.bytes
    );
}
