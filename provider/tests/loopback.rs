//! The provider's objects driven through libfabric itself: tests/c/rdm_loopback.c, built with
//! the system C compiler against libfabric-dev, opens two endpoints of the vfmig provider in
//! one process (Open MPI's hints, AV map, tagged CQ, selective completion) and checks eager
//! send and receive, unexpected messages with CQ data, directed receive, inject, cancel,
//! truncation, peek / claim / discard, and the refusals, over VFMIG_FI_TRANSPORT=loopback.

mod common;
use common::text;

use std::path::Path;
use std::process::{Command, Output};

fn build_program(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/rdm_loopback.c");
    let exe = dir.join("rdm_loopback");
    let out = Command::new("cc")
        .args(["-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg("-lfabric")
        .output()
        .expect("running cc (the C compiler cargo links with)");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn run(exe: &Path, provider_path: &Path, transport: Option<&str>) -> Output {
    let mut cmd = Command::new(exe);
    cmd.env("FI_PROVIDER_PATH", provider_path)
        .env_remove("FI_PROVIDER")
        .env("VFMIG_FI_LOG", "1")
        .env_remove("VFMIG_FI_VM");
    match transport {
        Some(t) => cmd.env("VFMIG_FI_TRANSPORT", t),
        None => cmd.env_remove("VFMIG_FI_TRANSPORT"),
    };
    cmd.output().expect("running the C test program")
}

#[test]
fn two_endpoints_exchange_tagged_messages_through_libfabric() {
    let dir = common::provider_dir();
    let exe = build_program(dir.path());
    let out = run(&exe, dir.path(), Some("loopback"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        text(&out)
    );
}

/// The default transport is the soft VF, which needs a guest: on the host it cannot open, and
/// says what is missing.
#[test]
fn without_a_transport_fi_endpoint_says_so() {
    let dir = common::provider_dir();
    let exe = build_program(dir.path());
    let out = run(&exe, dir.path(), None);
    assert!(
        !out.status.success(),
        "an endpoint opened without a transport\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fi_endpoint(domain, info, &r[i].ep, NULL) returned -38"),
        "{}",
        text(&out)
    );
    assert!(
        stderr.contains("set VFMIG_FI_VM"),
        "the reason is logged\n{}",
        text(&out)
    );
}
