//! The command line: one module per subcommand, each with its arguments (`Args`) and
//! `run(args)`; `main.rs` parses and dispatches. The CLI is a module of the binary, not of the
//! library: it is the one place that reports errors with `anyhow`, and it sits above both the
//! product and the lab, which the library keeps apart.
//!
//! Shared here: logging, the guest image, run directories, and the Ctrl-C flag.

pub mod bench;
pub mod companion;
pub mod ctl;
pub mod demo;
pub mod keys;
pub mod launch;
pub mod libvirt;
pub mod migrate;
pub mod report;
pub mod vf;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{self, Signal};

use vfmig::orchestrator::launch::GuestImage;

/// Logs to stderr, filtered by `RUST_LOG` or else by `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The guest image given by `--kernel` and `--initrd`, or the one tools/setup.sh made.
pub fn image(kernel: Option<PathBuf>, initrd: Option<PathBuf>) -> Result<GuestImage> {
    match (kernel, initrd) {
        (Some(kernel), Some(initrd)) => Ok(GuestImage { kernel, initrd }),
        (None, None) => GuestImage::from_setup().map_err(anyhow::Error::msg),
        _ => bail!("give both --kernel and --initrd, or neither"),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// A flag that Ctrl-C (SIGINT) or SIGTERM sets: it cancels a migration, or stops what
/// `vfmig launch` started.
pub fn cancel_on_signal() -> Result<Arc<AtomicBool>> {
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal::signal(sig, signal::SigHandler::Handler(on_signal)) }
            .context("cannot install the signal handler")?;
    }
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("vfmig: interrupted");
            f.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    Ok(flag)
}

/// This program, to run companions with.
pub fn vfmig_bin() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the vfmig binary")
}

/// The run directory given, or a fresh one.
pub fn run_dir_or_temp(run_dir: Option<PathBuf>) -> Result<PathBuf> {
    match run_dir {
        Some(d) => Ok(d),
        None => tempfile_dir(),
    }
}

/// A fresh directory for run directories, kept after the run for its logs.
fn tempfile_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("vfmig-run-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_half_given_image_is_refused() {
        let e = image(Some("k".into()), None).unwrap_err().to_string();
        assert!(e.contains("--kernel and --initrd"), "{e}");
        let img = image(Some("k".into()), Some("i".into())).unwrap();
        assert_eq!(img.kernel, PathBuf::from("k"));
        assert_eq!(img.initrd, PathBuf::from("i"));
    }

    #[test]
    fn a_given_run_directory_is_kept() {
        let d = run_dir_or_temp(Some("/somewhere".into())).unwrap();
        assert_eq!(d, PathBuf::from("/somewhere"));
    }
}
