//! The seam between an endpoint and what carries its messages.
//!
//! An endpoint hands whole eager messages ([`Wire`]) to a [`Transport`], addressed by the peer's
//! name (what the peer's `fi_getname` returned and the application inserted into the address
//! vector), and polls it for arrivals during progress. [`Loopback`] connects the endpoints of
//! one process through in-memory queues: it is how the provider's objects are tested through
//! libfabric without a VF. The soft VF's transport (over `vfmig_guest::Device`) implements the
//! same trait; see the README for how it pairs QPs per peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

/// Which receive queue a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `fi_send` and friends: untagged (`FI_MSG`).
    Msg,
    /// `fi_tsend` and friends: tagged (`FI_TAGGED`).
    Tagged,
}

/// One eager message as it travels: the whole payload, its tag and remote CQ data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    pub kind: Kind,
    pub tag: u64,
    pub data: Option<u64>,
    pub payload: Vec<u8>,
}

/// Why a transport could not carry a message.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no endpoint named {0:?} is reachable")]
    UnknownPeer(String),
    #[error("the transport {0:?} is not available: {1}")]
    Unavailable(String, String),
    /// Too much waits to be sent: progress, then retry (`-FI_EAGAIN`).
    #[error("{0}")]
    Busy(String),
    /// The VF refused, or the link to the peer failed (`-FI_EIO`).
    #[error("{0}")]
    Failed(String),
}

/// What carries an endpoint's messages.
pub trait Transport: Send {
    /// This endpoint's name, unique among its peers (what `fi_getname` returns).
    fn name(&self) -> &str;
    /// Sends one message to the endpoint named `peer`; the payload is the transport's to keep.
    fn send(&mut self, peer: &str, wire: Wire) -> Result<(), TransportError>;
    /// Appends the messages that arrived, with their senders' names, to `out`.
    fn poll(&mut self, out: &mut Vec<(String, Wire)>);
    /// Gets ready for messages from the endpoint named `peer` (it was inserted into the
    /// address vector): a transport with per-peer receive resources sets them up here.
    fn expect(&mut self, peer: &str) -> Result<(), TransportError> {
        let _ = peer;
        Ok(())
    }
    /// The peers whose link failed since the last call, with why: nothing more will come
    /// from them.
    fn take_failed(&mut self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Opens the transport that `VFMIG_FI_TRANSPORT` names: `softvf` (the default: the guest's
/// soft VF, see [`crate::softvf`]) or `loopback` (the endpoints of one process, for tests).
pub fn open_from_env() -> Result<Box<dyn Transport>, TransportError> {
    let which = std::env::var("VFMIG_FI_TRANSPORT").unwrap_or_else(|_| "softvf".into());
    match which.as_str() {
        "loopback" => Ok(Box::new(Loopback::open())),
        "softvf" => Ok(Box::new(crate::softvf::SoftVfTransport::open_from_env()?)),
        other => Err(TransportError::Unavailable(
            other.to_string(),
            "VFMIG_FI_TRANSPORT is softvf (the default) or loopback".into(),
        )),
    }
}

type Mailbox = Sender<(String, Wire)>;

fn registry() -> &'static Mutex<HashMap<String, Mailbox>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Mailbox>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The endpoints of one process, connected through in-memory queues.
pub struct Loopback {
    name: String,
    inbox: Receiver<(String, Wire)>,
}

impl Loopback {
    /// A new endpoint, named `loop:<pid>:<n>`.
    pub fn open() -> Loopback {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("loop:{}:{n}", std::process::id());
        let (tx, inbox) = channel();
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), tx);
        Loopback { name, inbox }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

impl Transport for Loopback {
    fn name(&self) -> &str {
        &self.name
    }

    fn send(&mut self, peer: &str, wire: Wire) -> Result<(), TransportError> {
        let reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        let mailbox = reg
            .get(peer)
            .ok_or_else(|| TransportError::UnknownPeer(peer.into()))?;
        mailbox
            .send((self.name.clone(), wire))
            .map_err(|_| TransportError::UnknownPeer(peer.into()))
    }

    fn poll(&mut self, out: &mut Vec<(String, Wire)>) {
        out.extend(self.inbox.try_iter());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(tag: u64) -> Wire {
        Wire {
            kind: Kind::Tagged,
            tag,
            data: None,
            payload: vec![tag as u8],
        }
    }

    #[test]
    fn loopback_endpoints_reach_each_other_in_order() {
        let mut a = Loopback::open();
        let mut b = Loopback::open();
        assert_ne!(a.name(), b.name());
        a.send(b.name(), wire(1)).unwrap();
        a.send(b.name(), wire(2)).unwrap();
        let mut got = Vec::new();
        b.poll(&mut got);
        assert_eq!(
            got,
            vec![
                (a.name().to_string(), wire(1)),
                (a.name().to_string(), wire(2))
            ]
        );
        let mut none = Vec::new();
        a.poll(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn a_closed_endpoint_is_unreachable() {
        let mut a = Loopback::open();
        let b = Loopback::open();
        let gone = b.name().to_string();
        drop(b);
        assert!(matches!(a.send(&gone, wire(1)), Err(TransportError::UnknownPeer(n)) if n == gone));
    }
}
