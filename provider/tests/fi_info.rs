//! libfabric's own `fi_info` (libfabric-bin) loads the built provider from FI_PROVIDER_PATH
//! under its installed name, libvfmig-fi.so, and lists what it offers.

mod common;

use common::{provider_dir, text};
use std::path::Path;
use std::process::{Command, Output};

fn fi_info(provider_path: &Path, args: &[&str]) -> Output {
    Command::new("fi_info")
        .args(args)
        .env("FI_PROVIDER_PATH", provider_path)
        .env_remove("FI_PROVIDER")
        .output()
        .unwrap_or_else(|e| {
            panic!("running fi_info (libfabric-bin; tools/setup.sh installs it): {e}")
        })
}

#[test]
fn fi_info_lists_the_vfmig_provider() {
    let dir = provider_dir();
    let out = fi_info(dir.path(), &["-l"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "vfmig:"),
        "{}",
        text(&out)
    );
}

#[test]
fn fi_info_p_vfmig_offers_a_tagged_rdm_endpoint() {
    let dir = provider_dir();
    let out = fi_info(dir.path(), &["-p", "vfmig"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("provider: vfmig"), "{}", text(&out));
    assert!(stdout.contains("type: FI_EP_RDM"), "{}", text(&out));
    // The verbose form shows the attributes Open MPI's mtl/ofi relies on.
    let out = fi_info(dir.path(), &["-p", "vfmig", "-c", "FI_TAGGED", "-v"]);
    assert!(out.status.success(), "{}", text(&out));
    let verbose = String::from_utf8_lossy(&out.stdout);
    for want in [
        "FI_TAGGED",
        "threading: FI_THREAD_DOMAIN",
        "resource_mgmt: FI_RM_ENABLED",
        "cq_data_size: 4",
        "prov_name: vfmig",
    ] {
        assert!(verbose.contains(want), "missing {want:?}\n{}", text(&out));
    }
}

#[test]
fn fi_info_gets_nothing_for_what_vfmig_does_not_do() {
    let dir = provider_dir();
    for args in [
        ["-p", "vfmig", "-t", "FI_EP_MSG"],
        ["-p", "vfmig", "-t", "FI_EP_DGRAM"],
        ["-p", "vfmig", "-c", "FI_RMA"],
    ] {
        let out = fi_info(dir.path(), &args);
        assert!(
            !out.status.success(),
            "{args:?} should find nothing\n{}",
            text(&out)
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("provider: vfmig"),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn without_the_provider_in_the_path_fi_info_has_no_vfmig() {
    let empty = tempfile::tempdir().expect("temporary directory");
    let out = fi_info(empty.path(), &["-p", "vfmig"]);
    assert!(
        !out.status.success(),
        "vfmig found without its .so\n{}",
        text(&out)
    );
}
