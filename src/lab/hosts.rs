//! Several "hosts" on one machine: network namespaces joined by veth pairs to one bridge,
//! made and removed by the run itself. A VM's companion and QEMU run inside its host; the
//! fabric and the migration stream cross the bridge, as they would cross a cluster network.

use std::net::Ipv4Addr;
use std::process::Command;

/// Errors of setting up hosts.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// An `ip` command failed.
    #[error("cannot set up test host network: `ip {args}` failed: {stderr} (root and iproute2 are needed)")]
    Ip {
        /// Its arguments.
        args: String,
        /// Its error output.
        stderr: String,
    },
    /// `ip` could not be run at all.
    #[error("cannot set up test host network: cannot run `ip {args}`: install iproute2")]
    Spawn {
        /// Its arguments.
        args: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A set of network namespaces on one bridge. Dropping it removes them.
pub struct Hosts {
    tag: String,
    bridge: String,
    subnet: u8,
    count: usize,
}

fn ip(args: &[&str]) -> Result<(), HostsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| HostsError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HostsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl Hosts {
    /// Makes `count` hosts. Names and the subnet derive from this process's id, so that runs
    /// do not collide.
    pub fn create(count: usize) -> Result<Self, HostsError> {
        // Names derive from this process's id and a count of the sets it made, so that runs
        // do not collide, nor two sets of one run whose first is still being torn down.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let seq = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let tag = format!("{}{seq}", pid % 100_000);
        let hosts = Self {
            bridge: format!("vfmbr{tag}"),
            subnet: (pid % 200 + 20) as u8,
            tag,
            count,
        };
        ip(&["link", "add", &hosts.bridge, "type", "bridge"])?;
        ip(&["link", "set", &hosts.bridge, "up"])?;
        for i in 0..count {
            let ns = hosts.netns(i);
            let (outer, inner) = (hosts.veth(i), format!("{}p", hosts.veth(i)));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &hosts.bridge, "up"])?;
            let addr = format!("{}/24", hosts.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        tracing::info!(count, bridge = %hosts.bridge, subnet = %format!("10.77.{}.0/24", hosts.subnet), "test hosts up");
        Ok(hosts)
    }

    /// The network namespace of host `i`.
    pub fn netns(&self, i: usize) -> String {
        format!("vfmig-{}-h{i}", self.tag)
    }

    /// The address of host `i`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, i as u8 + 1)
    }

    /// The host-side end of host `i`'s veth pair, on the bridge: taking it down cuts the
    /// host off the network.
    pub fn veth(&self, i: usize) -> String {
        format!("vfm{}h{i}", self.tag)
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Takes the link `name` (a host's [`Hosts::veth`]) up or down: a cable pulled and put back.
pub fn set_link(name: &str, up: bool) -> Result<(), HostsError> {
    ip(&["link", "set", name, if up { "up" } else { "down" }])
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 0..self.count {
            let _ = ip(&["netns", "delete", &self.netns(i)]);
        }
        let _ = ip(&["link", "delete", &self.bridge]);
    }
}
