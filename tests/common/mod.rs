//! Shared set-up of the end-to-end tests: real QEMU, a real Linux guest, real sockets.
//!
//! They run with the `e2e` feature (`bash tools/test.sh`, or `cargo test --release --workspace
//! --features e2e` once `tools/setup.sh` has built the guest); without it `cargo test` lists
//! each of them as ignored.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use vfmig::lab::demo::DemoOptions;
use vfmig::orchestrator::launch::GuestImage;
use vfmig::orchestrator::StrategyKind as Strategy;

/// The machine has two cores: VMs of different tests must not compete for them.
static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Takes the machine for one test.
pub fn machine() -> parking_lot::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock()
}

/// Logs of the run go to the test's output (shown on failure).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "vfmig=info,warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The guest image from tools/setup.sh; the tests cannot run without it.
pub fn image() -> GuestImage {
    GuestImage::from_setup().unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh run directory that is kept when the test fails (for the logs) and removed when
/// it passes.
pub struct RunDir {
    pub path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl RunDir {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vfmig-{name}-"))
            .tempdir()
            .expect("temporary directory");
        Self {
            path: dir.path().into(),
            dir: Some(dir),
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("run directory kept for inspection: {}", d.keep().display());
            }
        }
    }
}

/// Demo settings for the tests: a 512 MiB guest, a device writing 4000 records a second
/// across the 16 MiB reserved window, precopy capped at 64 MiB/s so it stays open for
/// a few seconds.
pub fn demo_options(strategy: Strategy, run_dir: &RunDir) -> DemoOptions {
    DemoOptions {
        strategy,
        timeout: Duration::from_secs(300),
        ..DemoOptions::new(
            run_dir.path.clone(),
            image(),
            PathBuf::from(env!("CARGO_BIN_EXE_vfmig")),
        )
    }
}
