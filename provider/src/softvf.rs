//! The transport over the guest's soft VF: one [`vfmig_guest::channel::Channel`] per endpoint.
//!
//! An endpoint is named `<vm>/<port>`: the VM's name in the cluster map (`VFMIG_FI_VM`, or
//! `vfmig.vm=` on the guest kernel's command line) and a port unique in the guest (the
//! process's PID and the endpoint's index in it). Each endpoint opens the VF on its own
//! (`VFMIG_FI_IF`, default `eth0`): several processes of one guest use it at once, each taking
//! its own replies and completions. The QP toward a peer is numbered by a hash of both names,
//! so nothing is exchanged; it is created when the peer is inserted into the address vector,
//! so that its receives are posted before the peer's first message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vfmig_guest::channel::{Addr, Channel, ChannelError, Message};
use vfmig_guest::Device;

use crate::transport::{Kind, Transport, TransportError, Wire};

/// The VM's name: `VFMIG_FI_VM`, else `vfmig.vm=` in `cmdline` (the guest kernel's).
pub fn vm_name(env: Option<String>, cmdline: &str) -> Option<String> {
    env.filter(|v| !v.is_empty()).or_else(|| {
        cmdline
            .split_whitespace()
            .find_map(|t| t.strip_prefix("vfmig.vm="))
            .filter(|v| !v.is_empty())
            .map(String::from)
    })
}

/// A port for the `index`th endpoint of process `pid`: unique in the guest.
pub fn port(pid: u32, index: u32) -> u32 {
    (pid << 8) | (index & 0xff)
}

fn kind_byte(k: Kind) -> u8 {
    match k {
        Kind::Msg => 0,
        Kind::Tagged => 1,
    }
}

fn kind_of(b: u8) -> Kind {
    if b == 1 {
        Kind::Tagged
    } else {
        Kind::Msg
    }
}

/// An endpoint's messages over the soft VF.
pub struct SoftVfTransport {
    name: String,
    ch: Channel,
    /// Peers whose link failed, with why: later sends to them fail with it.
    failed: HashMap<String, String>,
    /// Of those, the ones the endpoint has not yet been told of.
    newly_failed: Vec<(String, String)>,
}

impl SoftVfTransport {
    /// Opens the VF and a channel, as the environment says (see the module's doc).
    pub fn open_from_env() -> Result<SoftVfTransport, TransportError> {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let vm = vm_name(std::env::var("VFMIG_FI_VM").ok(), &cmdline).ok_or_else(|| {
            TransportError::Unavailable(
                "softvf".into(),
                "the VM's name is unknown: set VFMIG_FI_VM to its name in the cluster map, or \
                 boot the guest with vfmig.vm=NAME"
                    .into(),
            )
        })?;
        let ifname = std::env::var("VFMIG_FI_IF").unwrap_or_else(|_| "eth0".into());
        let dev = Device::open(&ifname).map_err(|e| {
            TransportError::Unavailable(
                "softvf".into(),
                format!("opening the soft VF on {ifname} (VFMIG_FI_IF): {e}"),
            )
        })?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let me = Addr {
            vm,
            port: port(std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
        };
        Self::over(Arc::new(dev), me)
    }

    /// A transport for endpoint `me` over the open VF `dev`.
    pub fn over(dev: Arc<Device>, me: Addr) -> Result<SoftVfTransport, TransportError> {
        let name = me.to_string();
        let ch = Channel::open(dev, me).map_err(|e| failed(&name, e))?;
        Ok(SoftVfTransport {
            name,
            ch,
            failed: HashMap::new(),
            newly_failed: Vec::new(),
        })
    }

    fn addr(&self, peer: &str) -> Result<Addr, TransportError> {
        if let Some(why) = self.failed.get(peer) {
            return Err(TransportError::Failed(format!(
                "the link to {peer} failed earlier: {why}"
            )));
        }
        Addr::parse(peer).ok_or_else(|| TransportError::UnknownPeer(peer.into()))
    }
}

fn failed(who: &str, e: ChannelError) -> TransportError {
    match e {
        ChannelError::Busy { .. } => TransportError::Busy(e.to_string()),
        e => TransportError::Failed(format!("{who}: {e}")),
    }
}

impl Transport for SoftVfTransport {
    fn name(&self) -> &str {
        &self.name
    }

    fn send(&mut self, peer: &str, wire: Wire) -> Result<(), TransportError> {
        let addr = self.addr(peer)?;
        let msg = Message {
            kind: kind_byte(wire.kind),
            tag: wire.tag,
            data: wire.data,
            payload: wire.payload,
        };
        self.ch.send(&addr, msg).map_err(|e| failed(peer, e))
    }

    fn poll(&mut self, out: &mut Vec<(String, Wire)>) {
        let mut got = Vec::new();
        for (peer, why) in self.ch.progress(&mut got) {
            let peer = peer.to_string();
            crate::log_message(&format!("vfmig: the link to {peer} failed: {why}"));
            self.failed.insert(peer.clone(), why.clone());
            self.newly_failed.push((peer, why));
        }
        out.extend(got.into_iter().map(|(from, m)| {
            (
                from.to_string(),
                Wire {
                    kind: kind_of(m.kind),
                    tag: m.tag,
                    data: m.data,
                    payload: m.payload,
                },
            )
        }));
    }

    fn expect(&mut self, peer: &str) -> Result<(), TransportError> {
        let addr = self.addr(peer)?;
        self.ch.connect(&addr).map_err(|e| failed(peer, e))
    }

    fn take_failed(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.newly_failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_name_comes_from_the_environment_then_the_kernel_command_line() {
        let cmdline = "console=ttyS0 vfmig.vm=b quiet";
        assert_eq!(vm_name(Some("a".into()), cmdline).as_deref(), Some("a"));
        assert_eq!(vm_name(None, cmdline).as_deref(), Some("b"));
        assert_eq!(vm_name(Some(String::new()), cmdline).as_deref(), Some("b"));
        assert_eq!(vm_name(None, "console=ttyS0 vfmig.vm="), None);
        assert_eq!(vm_name(None, ""), None);
    }

    #[test]
    fn ports_differ_by_process_and_by_endpoint() {
        assert_ne!(port(100, 0), port(100, 1));
        assert_ne!(port(100, 0), port(101, 0));
        assert_eq!(
            port(100, 256),
            port(100, 0),
            "256 endpoints per process at most"
        );
    }

    #[test]
    fn kinds_survive_the_byte_they_travel_as() {
        for k in [Kind::Msg, Kind::Tagged] {
            assert_eq!(kind_of(kind_byte(k)), k);
        }
    }
}
