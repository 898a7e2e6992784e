//! The test hosts: network namespaces on one bridge reach each other by address.

use std::process::Command;

use vfmig::lab::hosts::Hosts;

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn two_hosts_reach_each_other_over_the_bridge() {
    let hosts = Hosts::create(2).expect("hosts (needs root and iproute2)");
    let server = format!(
        "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
         s.bind(('{}', 7999)); s.listen(1); c,_=s.accept(); c.sendall(c.recv(5)[::-1])",
        hosts.addr(1)
    );
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &hosts.netns(1), "python3", "-c", &server])
        .spawn()
        .unwrap();
    let client = format!(
        "import socket,time\nfor i in range(50):\n try:\n  s=socket.create_connection(('{}',7999),1); break\n except OSError: time.sleep(0.1)\ns.sendall(b'hello'); print(s.recv(5).decode())",
        hosts.addr(1)
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &hosts.netns(0), "python3", "-c", &client])
        .output()
        .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "olleh",
        "{out:?}"
    );
    // The namespaces are gone after the drop.
    let ns = hosts.netns(0);
    drop(hosts);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&ns));
}
