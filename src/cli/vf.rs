//! `vfmig vf …`: real VFs bound to vfio-pci: check one, self-test one, or run the self-test
//! on an emulated VF inside a nested guest.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use vfmig::lab::nested::{self, NestedOptions};
use vfmig::lab::vfio_selftest::{self, DmaProbe};
use vfmig::vf::vfio;

use super::{init_logging, run_dir_or_temp};

#[derive(clap::Subcommand)]
pub enum VfCommand {
    /// Report on a VF: its driver, IOMMU group and members, IDs, VFIO regions, reset and FLR,
    /// and dirty-tracking mode, with every problem and how to fix it. Works (reporting the
    /// problem) even when the VF cannot be opened. Exits non-zero if vfmig cannot use the VF.
    Check {
        /// PCI address of the VF: `0000:00:02.1`, or `00:02.1` for domain 0000.
        bdf: String,
        /// Print the report as one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Where sysfs is mounted (for tests against a fake tree).
        #[arg(long, default_value = "/sys", value_name = "DIR")]
        sysfs_root: PathBuf,
    },
    /// Exercise a VF bound to vfio-pci step by step: open, map_memfd (16 MiB of memfd as guest
    /// RAM at IOVA = GPA 0x100000000), read_config, bus_master, reset, dirty_tracking, unmap
    /// (with a remap on a changed table), release. Prints `step NAME: ok` or the error as each
    /// step finishes, then, as the last line, a JSON object
    /// `{"bdf":…,"steps":{…},"dirty_tracking":…,"ok":…,"details":{…}}`. Exits non-zero if a
    /// step failed. Needs root (or access to /dev/vfio) and a locked-memory limit of 16 MiB.
    SelfTest {
        /// PCI address of the VF: `0000:00:02.1`, or `00:02.1` for domain 0000.
        bdf: String,
        /// Also make the VF DMA: on an Intel 82576 VF, set up a receive ring in the mapped
        /// memfd, send it a frame from this network interface (its PF's), and check that the
        /// device wrote it there and that the dirty sync reports the page (step `device_dma`).
        #[arg(long, value_name = "IFACE")]
        dma_from: Option<String>,
        /// With --dma-from, the negative control: the receive ring names IOVAs outside the
        /// IOMMU mapping, so the device's writes fault and `device_dma` must fail.
        #[arg(long, requires = "dma_from")]
        dma_unmapped: bool,
    },
    /// Prove the VFIO path on this machine without SR-IOV hardware: boot an L1 guest under TCG
    /// with an emulated IOMMU (intel-iommu) and SR-IOV NIC (igb), create two VFs, bind one to
    /// vfio-pci, and run `vfmig vf self-test` on it inside L1. Prints each step as it finishes;
    /// the last line is one JSON object `{"steps":{"boot":…,"create_vfs":…,
    /// "bind_vfio_pci":…,"open":…,…},"dirty_tracking":…,"ok":…}`. Exits non-zero if a step
    /// failed. Needs `tools/setup.sh` (kernel, L1 initramfs) and `tools/build-static.sh`.
    NestedTest {
        /// The statically linked vfmig to run inside L1 (default: the one
        /// tools/build-static.sh builds, or $VFMIG_STATIC_BIN).
        #[arg(long)]
        vfmig: Option<PathBuf>,
        /// L1's RAM in MiB.
        #[arg(long, default_value_t = 512)]
        mem_mib: u64,
        /// Fail if L1 has not finished after this many seconds.
        #[arg(long, default_value_t = 240)]
        timeout: u64,
        /// Where to write the combined initramfs and L1's console log (default: a fresh
        /// temporary directory, kept).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Also print every line of L1's console (on stderr).
        #[arg(long)]
        verbose: bool,
    },
}

/// Runs the VF command; exits non-zero when the VF (or a step) failed.
pub fn run(cmd: VfCommand) -> Result<()> {
    init_logging("warn");
    let ok = match cmd {
        VfCommand::Check {
            bdf,
            json,
            sysfs_root,
        } => {
            let report = vfio::check_with_root(&sysfs_root, &bdf);
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
            report.ok
        }
        VfCommand::NestedTest {
            vfmig,
            mem_mib,
            timeout,
            work_dir,
            verbose,
        } => {
            let mut opts = NestedOptions::from_setup(run_dir_or_temp(work_dir)?);
            if let Some(v) = vfmig {
                opts.vfmig = v;
            }
            opts.mem_mib = mem_mib;
            opts.timeout = Duration::from_secs(timeout);
            opts.verbose = verbose;
            eprintln!(
                "vf nested-test: booting L1 (kernel {}), console in {}",
                opts.kernel.display(),
                opts.work_dir.join("l1-console.log").display()
            );
            let report = nested::run(&opts, &mut |name, result| {
                println!("step {name}: {result}");
                let _ = std::io::stdout().flush();
            })?;
            println!("{}", serde_json::to_string(&report.to_json())?);
            report.ok
        }
        VfCommand::SelfTest {
            bdf,
            dma_from,
            dma_unmapped,
        } => {
            let dma = dma_from.as_deref().map(|from| DmaProbe {
                from,
                unmapped: dma_unmapped,
            });
            let report = vfio_selftest::self_test_with_dma(&bdf, dma, &mut |step| {
                println!("{step}");
                let _ = std::io::stdout().flush();
            });
            println!("{}", serde_json::to_string(&report)?);
            report.ok()
        }
    };
    std::io::stdout().flush()?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
