//! What the integration tests share: the built provider, installed under libfabric's name.

use std::path::PathBuf;
use std::process::Output;

/// The cdylib cargo built for this test run (target/<profile>/deps/libvfmig_fi.so), copied into
/// a fresh directory as libvfmig-fi.so.
pub fn provider_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps directory");
    let candidates = [deps.join("libvfmig_fi.so"), deps.join("../libvfmig_fi.so")];
    let built: &PathBuf = candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("libvfmig_fi.so not found next to {}", exe.display()));
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::copy(built, dir.path().join("libvfmig-fi.so")).expect("copying the provider");
    dir
}

/// A finished process's status and output, for a failed assertion's message.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
