//! Debian's Open MPI 4.1 (openmpi-bin, libopenmpi-dev) selects the vfmig provider through its
//! ofi MTL and runs an MPI program on it: one rank, whose own messages go through the provider
//! (the loopback transport carries them within the process).

mod common;
use common::text;

use std::path::Path;
use std::process::{Command, Output};

fn build_program(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mpi/self_messages.c");
    let exe = dir.join("self_messages");
    let out = Command::new("mpicc")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| {
            panic!("running mpicc (libopenmpi-dev; tools/setup.sh installs it): {e}")
        });
    assert!(
        out.status.success(),
        "mpicc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn mpirun(exe: &Path, provider_path: &Path, transport: Option<&str>) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "mpirun", "--allow-run-as-root", "-np", "1"])
        .args(["--mca", "pml", "cm", "--mca", "mtl", "ofi"])
        .args([
            "--mca",
            "mtl_ofi_provider_include",
            "vfmig",
            "--mca",
            "mtl_base_verbose",
            "100",
        ])
        .args([
            "-x",
            "FI_PROVIDER_PATH",
            "-x",
            "VFMIG_FI_TRANSPORT",
            "-x",
            "VFMIG_FI_LOG",
        ])
        .arg(exe)
        .env("FI_PROVIDER_PATH", provider_path)
        .env("VFMIG_FI_LOG", "1")
        .env("VFMIG_FI_TRANSPORT", transport.unwrap_or("none"));
    cmd.output()
        .expect("running mpirun (openmpi-bin; tools/setup.sh installs it)")
}

#[test]
fn open_mpi_runs_on_the_vfmig_provider() {
    let dir = common::provider_dir();
    let exe = build_program(dir.path());
    let out = mpirun(&exe, dir.path(), Some("loopback"));
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("mtl:ofi:provider: vfmig"),
        "Open MPI did not pick vfmig\n{all}"
    );
    assert!(all.contains("size=1 in='to myself' y=42 sum=42"), "{all}");
}

#[test]
fn without_a_transport_open_mpi_cannot_use_vfmig() {
    let dir = common::provider_dir();
    let exe = build_program(dir.path());
    let out = mpirun(&exe, dir.path(), None);
    let all = text(&out);
    assert!(!out.status.success(), "ran without a transport\n{all}");
    assert!(
        all.contains("fi_endpoint: the endpoint's transport"),
        "{all}"
    );
}
