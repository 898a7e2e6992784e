//! The endpoint (`FI_EP_RDM`): eager tagged and untagged messages over a [`Transport`], matched
//! by the tag-matching engine, completed into the bound completion queues.
//!
//! A send copies the payload and hands it to the transport whole; its completion is written at
//! once (the copy is the provider's: `FI_INJECT_COMPLETE`). A receive is matched against the
//! unexpected messages when posted, and arrivals against the posted receives when the endpoint
//! is progressed (by `fi_cq_read` on a bound queue, or a peek). The C entry points are in
//! `ep_ops.rs`; this file is the state and its rules.

use std::os::raw::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::av::AvTable;
use crate::cq::{CqInner, Entry, Progress};
use crate::error::FiError;
use crate::ffi;
use crate::getinfo::{INJECT_SIZE, MAX_MSG_SIZE};
use crate::tagmatch::{Addr, Completion, Delivery, Matcher, Message, NotClaimed, Recv, Selector};
use crate::transport::{Kind, Transport, Wire};

/// Where a posted receive's data goes, and the flags it was posted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvBuf {
    pub ptr: usize,
    pub flags: u64,
}

type EpMatcher = Matcher<usize, RecvBuf, Vec<u8>>;

/// What `fi_trecvmsg`'s flags ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvMode {
    Post,
    Peek,
    PeekClaim,
    PeekDiscard,
    Claim,
    ClaimDiscard,
}

impl RecvMode {
    pub fn from_flags(flags: u64) -> RecvMode {
        let peek = flags & ffi::FI_PEEK as u64 != 0;
        let claim = flags & ffi::FI_CLAIM != 0;
        let discard = flags & ffi::FI_DISCARD != 0;
        match (peek, claim, discard) {
            (true, true, _) => RecvMode::PeekClaim,
            (true, false, true) => RecvMode::PeekDiscard,
            (true, false, false) => RecvMode::Peek,
            (false, true, true) => RecvMode::ClaimDiscard,
            (false, true, false) => RecvMode::Claim,
            (false, false, _) => RecvMode::Post,
        }
    }
}

/// An endpoint's state.
pub struct EpState {
    transport: Box<dyn Transport>,
    av: Option<Arc<Mutex<AvTable>>>,
    tx_cq: Option<Arc<CqInner>>,
    rx_cq: Option<Arc<CqInner>>,
    selective_tx: bool,
    selective_rx: bool,
    pub(crate) tx_op_flags: u64,
    pub(crate) rx_op_flags: u64,
    enabled: bool,
    tagged: EpMatcher,
    msg: EpMatcher,
    arrivals: Vec<(String, Wire)>,
    /// How many of the bound AV's entries the transport was told to expect.
    expected: usize,
    /// Peers whose link failed (at most one per AV entry): a receive only they could match
    /// completes in error at once.
    failed: std::collections::HashSet<Addr>,
}

/// The state behind a `fid_ep`, shared with the completion queues it is bound to.
pub struct EpShared(Mutex<EpState>);

impl Progress for EpShared {
    fn progress(&self) {
        self.lock().progress();
    }
}

impl EpShared {
    pub fn new(
        transport: Box<dyn Transport>,
        directed: bool,
        tx_op_flags: u64,
        rx_op_flags: u64,
    ) -> Arc<EpShared> {
        Arc::new(EpShared(Mutex::new(EpState {
            transport,
            av: None,
            tx_cq: None,
            rx_cq: None,
            selective_tx: false,
            selective_rx: false,
            tx_op_flags,
            rx_op_flags,
            enabled: false,
            tagged: Matcher::new(directed),
            msg: Matcher::new(directed),
            arrivals: Vec::new(),
            expected: 0,
            failed: Default::default(),
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, EpState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn kind_flag(kind: Kind) -> u64 {
    match kind {
        Kind::Msg => ffi::FI_MSG as u64,
        Kind::Tagged => ffi::FI_TAGGED as u64,
    }
}

fn rx_entry(kind: Kind, c: &Completion<usize>, buf: usize) -> Entry {
    let data_flag = if c.data.is_some() {
        ffi::FI_REMOTE_CQ_DATA as u64
    } else {
        0
    };
    Entry {
        context: c.context,
        flags: ffi::FI_RECV as u64 | kind_flag(kind) | data_flag,
        len: c.len,
        buf,
        data: c.data.unwrap_or(0),
        tag: c.tag,
        src: c.src,
        error: c.error.map(|e| {
            let olen = match e {
                crate::tagmatch::CompletionError::Truncated { olen } => olen,
                _ => 0,
            };
            (e.errno(), olen)
        }),
    }
}

impl EpState {
    /// Binds a completion queue for `flags`' directions (`FI_TRANSMIT`, `FI_RECV`,
    /// `FI_SELECTIVE_COMPLETION`).
    pub fn bind_cq(&mut self, cq: Arc<CqInner>, flags: u64) -> Result<(), FiError> {
        let selective = flags & ffi::FI_SELECTIVE_COMPLETION != 0;
        let (tx, rx) = (
            flags & ffi::FI_TRANSMIT as u64 != 0,
            flags & ffi::FI_RECV as u64 != 0,
        );
        if !tx && !rx {
            return Err(FiError::Invalid(
                "a completion queue bound for neither direction",
            ));
        }
        if tx {
            self.tx_cq = Some(cq.clone());
            self.selective_tx = selective;
        }
        if rx {
            self.rx_cq = Some(cq);
            self.selective_rx = selective;
        }
        Ok(())
    }

    pub fn bind_av(&mut self, av: Arc<Mutex<AvTable>>) {
        self.av = Some(av);
    }

    /// `fi_enable`: an RDM endpoint needs its address vector and both completion queues.
    pub fn enable(&mut self) -> Result<(), FiError> {
        if self.av.is_none() || self.tx_cq.is_none() || self.rx_cq.is_none() {
            return Err(FiError::BadState(
                "fi_enable before an address vector and completion queues were bound",
            ));
        }
        self.enabled = true;
        Ok(())
    }

    pub fn name(&self) -> &str {
        self.transport.name()
    }

    fn check_enabled(&self) -> Result<(), FiError> {
        if self.enabled {
            Ok(())
        } else {
            Err(FiError::BadState("the endpoint is not enabled"))
        }
    }

    fn matcher(&mut self, kind: Kind) -> &mut EpMatcher {
        match kind {
            Kind::Msg => &mut self.msg,
            Kind::Tagged => &mut self.tagged,
        }
    }

    /// Sends `payload` to `dest` (an address of the bound AV). `inject`: no completion.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        kind: Kind,
        payload: &[u8],
        dest: ffi::fi_addr_t,
        tag: u64,
        data: Option<u64>,
        context: *mut c_void,
        flags: u64,
        inject: bool,
    ) -> Result<(), FiError> {
        self.check_enabled()?;
        let inject = inject || flags & ffi::FI_INJECT as u64 != 0;
        if payload.len() > MAX_MSG_SIZE || (inject && payload.len() > INJECT_SIZE) {
            return Err(FiError::MessageSize(payload.len()));
        }
        let peer = {
            let av = self
                .av
                .as_ref()
                .ok_or(FiError::BadState("no address vector"))?;
            let av = av.lock().unwrap_or_else(|e| e.into_inner());
            av.name(dest)
                .ok_or(FiError::NotFound("the destination address"))?
                .to_string()
        };
        // Remote CQ data is CQ_DATA_SIZE (4) bytes: the VF's immediate.
        let data = data.map(|d| d & 0xffff_ffff);
        let wire = Wire {
            kind,
            tag,
            data,
            payload: payload.to_vec(),
        };
        self.transport
            .send(&peer, wire)
            .map_err(FiError::Transport)?;
        let wanted = !self.selective_tx || flags & ffi::FI_COMPLETION as u64 != 0;
        if !inject && wanted {
            if let Some(cq) = &self.tx_cq {
                cq.push(Entry {
                    context: context as usize,
                    flags: ffi::FI_SEND as u64 | kind_flag(kind),
                    tag,
                    ..Entry::default()
                });
            }
        }
        Ok(())
    }

    /// A receive (`fi_recv`, `fi_trecv`, `fi_trecvmsg` with its peek and claim modes).
    #[allow(clippy::too_many_arguments)]
    pub fn recv(
        &mut self,
        kind: Kind,
        mode: RecvMode,
        sel: Selector,
        buf: *mut c_void,
        len: usize,
        context: *mut c_void,
        flags: u64,
    ) -> Result<(), FiError> {
        self.check_enabled()?;
        let ctx = context as usize;
        let recv = Recv {
            sel,
            context: ctx,
            buf: RecvBuf {
                ptr: buf as usize,
                flags,
            },
            len,
        };
        if matches!(
            mode,
            RecvMode::Peek | RecvMode::PeekClaim | RecvMode::PeekDiscard
        ) {
            self.progress();
        }
        let m = self.matcher(kind);
        let completion = match mode {
            RecvMode::Post => {
                if let Some(d) = m.post(recv) {
                    self.deliver(kind, d);
                } else if self.failed.contains(&sel.src) {
                    self.fail_receives(sel.src);
                }
                return Ok(());
            }
            RecvMode::Claim => {
                let d = m.claim(recv).map_err(|NotClaimed| {
                    FiError::Invalid("FI_CLAIM without a claiming FI_PEEK")
                })?;
                self.deliver(kind, d);
                return Ok(());
            }
            RecvMode::Peek => m.peek(sel, ctx),
            RecvMode::PeekClaim => m.peek_claim(sel, ctx),
            RecvMode::PeekDiscard => m.peek_discard(sel, ctx),
            RecvMode::ClaimDiscard => m
                .claim_discard(ctx)
                .map_err(|NotClaimed| FiError::Invalid("FI_CLAIM without a claiming FI_PEEK"))?,
        };
        // Peeks and discards always complete: the application waits for the answer.
        self.push_rx(rx_entry(kind, &completion, 0), true);
        Ok(())
    }

    /// `fi_cancel`: a posted receive with `context` completes with `FI_ECANCELED`.
    pub fn cancel(&mut self, context: *mut c_void) -> Result<(), FiError> {
        for kind in [Kind::Tagged, Kind::Msg] {
            if let Some((recv, c)) = self.matcher(kind).cancel(context as usize) {
                self.push_rx(rx_entry(kind, &c, recv.buf.ptr), true);
                return Ok(());
            }
        }
        Err(FiError::NotFound("a posted receive with that context"))
    }

    /// Matches what the transport received since the last call.
    pub fn progress(&mut self) {
        // Peers inserted since the last turn: the transport gets ready for their messages.
        if let Some(av) = &self.av {
            let (new, next) = av
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .names_from(self.expected);
            self.expected = next;
            for name in new {
                if let Err(e) = self.transport.expect(&name) {
                    crate::log_message(&format!("getting ready for {name}: {e}"));
                }
            }
        }
        let mut arrivals = std::mem::take(&mut self.arrivals);
        self.transport.poll(&mut arrivals);
        for (from, wire) in arrivals.drain(..) {
            let src = match &self.av {
                Some(av) => av.lock().unwrap_or_else(|e| e.into_inner()).addr_of(&from),
                None => ffi::FI_ADDR_UNSPEC,
            };
            let msg = Message {
                src,
                tag: wire.tag,
                data: wire.data,
                len: wire.payload.len(),
                payload: wire.payload,
            };
            if let Some(d) = self.matcher(wire.kind).arrive(msg) {
                self.deliver(wire.kind, d);
            }
        }
        self.arrivals = arrivals;
        for (name, why) in self.transport.take_failed() {
            let Some(src) = self
                .av
                .as_ref()
                .map(|av| av.lock().unwrap_or_else(|e| e.into_inner()).addr_of(&name))
            else {
                continue;
            };
            if src == ffi::FI_ADDR_UNSPEC {
                continue;
            }
            crate::log_message(&format!(
                "vfmig: receives from {name} complete with an error (FI_EIO): {why}"
            ));
            self.failed.insert(src);
            self.fail_receives(src);
        }
    }

    /// Completes in error every posted receive only the failed peer at `src` could match.
    fn fail_receives(&mut self, src: Addr) {
        for kind in [Kind::Tagged, Kind::Msg] {
            for (recv, c) in self.matcher(kind).fail_source(src) {
                self.push_rx(rx_entry(kind, &c, recv.buf.ptr), true);
            }
        }
    }

    fn deliver(&mut self, kind: Kind, d: Delivery<usize, RecvBuf, Vec<u8>>) {
        let n = d.copy_len();
        if n > 0 {
            // SAFETY: the application gave a buffer of recv.len >= n bytes with the receive,
            // valid until its completion is reported (libfabric's receive contract).
            unsafe {
                std::ptr::copy_nonoverlapping(d.msg.payload.as_ptr(), d.recv.buf.ptr as *mut u8, n)
            };
        }
        let c = d.completion();
        let wanted = !self.selective_rx || d.recv.buf.flags & ffi::FI_COMPLETION as u64 != 0;
        self.push_rx(rx_entry(kind, &c, d.recv.buf.ptr), wanted);
    }

    fn push_rx(&self, entry: Entry, wanted: bool) {
        if entry.error.is_some() || wanted {
            if let Some(cq) = &self.rx_cq {
                cq.push(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Loopback;
    use std::ptr::null_mut;

    struct Pair {
        a: Arc<EpShared>,
        b: Arc<EpShared>,
        a_cq: Arc<CqInner>,
        b_cq: Arc<CqInner>,
    }

    /// Two enabled endpoints over loopback, each with its own CQ and an AV holding both
    /// (fi_addr 0 = a, 1 = b).
    fn pair() -> Pair {
        let a = EpShared::new(Box::new(Loopback::open()), true, 0, 0);
        let b = EpShared::new(Box::new(Loopback::open()), true, 0, 0);
        let mut table = AvTable::default();
        table.insert(a.lock().name().to_string());
        table.insert(b.lock().name().to_string());
        let av = Arc::new(Mutex::new(table));
        let mut cqs = Vec::new();
        for ep in [&a, &b] {
            let cq = Arc::new(CqInner::new(ffi::FI_CQ_FORMAT_TAGGED).unwrap());
            let weak: std::sync::Weak<dyn Progress> =
                Arc::downgrade(&(ep.clone() as Arc<dyn Progress>));
            cq.bind(weak);
            let mut s = ep.lock();
            s.bind_cq(cq.clone(), ffi::FI_TRANSMIT as u64 | ffi::FI_RECV as u64)
                .unwrap();
            s.bind_av(av.clone());
            s.enable().unwrap();
            cqs.push(cq);
        }
        let b_cq = cqs.pop().unwrap();
        let a_cq = cqs.pop().unwrap();
        Pair { a, b, a_cq, b_cq }
    }

    fn ctx(n: usize) -> *mut c_void {
        n as *mut c_void
    }

    #[test]
    fn a_tagged_message_reaches_the_posted_receive() {
        let p = pair();
        let mut buf = [0u8; 16];
        p.b.lock()
            .recv(
                Kind::Tagged,
                RecvMode::Post,
                Selector::tag(7),
                buf.as_mut_ptr().cast(),
                16,
                ctx(1),
                0,
            )
            .unwrap();
        p.a.lock()
            .send(Kind::Tagged, b"hello", 1, 7, Some(42), ctx(2), 0, false)
            .unwrap();
        let sent = p.a_cq.take(8).unwrap();
        assert_eq!(
            (sent[0].context, sent[0].flags & ffi::FI_SEND as u64 != 0),
            (2, true)
        );
        p.b_cq.progress();
        let got = p.b_cq.take(8).unwrap();
        assert_eq!(
            (
                got[0].context,
                got[0].len,
                got[0].tag,
                got[0].src,
                got[0].data
            ),
            (1, 5, 7, 0, 42)
        );
        assert_ne!(got[0].flags & ffi::FI_REMOTE_CQ_DATA as u64, 0);
        assert_eq!(&buf[..5], b"hello");
    }

    /// A transport whose only peer's link has failed.
    struct Failed {
        told: bool,
    }

    impl Transport for Failed {
        fn name(&self) -> &str {
            "me"
        }
        fn send(&mut self, _: &str, _: Wire) -> Result<(), crate::transport::TransportError> {
            Err(crate::transport::TransportError::Failed("gone".into()))
        }
        fn poll(&mut self, _: &mut Vec<(String, Wire)>) {}
        fn take_failed(&mut self) -> Vec<(String, String)> {
            if std::mem::replace(&mut self.told, true) {
                Vec::new()
            } else {
                vec![("peer".into(), "its link broke".into())]
            }
        }
    }

    #[test]
    fn receives_only_a_failed_peer_could_match_complete_with_an_error() {
        let e = EpShared::new(Box::new(Failed { told: false }), true, 0, 0);
        let mut table = AvTable::default();
        table.insert("peer".into()); // fi_addr 0
        table.insert("me".into());
        let cq = Arc::new(CqInner::new(ffi::FI_CQ_FORMAT_TAGGED).unwrap());
        {
            let mut s = e.lock();
            s.bind_cq(cq.clone(), ffi::FI_TRANSMIT as u64 | ffi::FI_RECV as u64)
                .unwrap();
            s.bind_av(Arc::new(Mutex::new(table)));
            s.enable().unwrap();
        }
        let mut buf = [0u8; 8];
        let mut post = |src, c| {
            let sel = Selector {
                src,
                tag: 5,
                ignore: 0,
            };
            e.lock()
                .recv(
                    Kind::Tagged,
                    RecvMode::Post,
                    sel,
                    buf.as_mut_ptr().cast(),
                    8,
                    ctx(c),
                    0,
                )
                .unwrap();
        };
        post(0, 1);
        post(crate::tagmatch::ANY_SRC, 2);
        assert!(matches!(cq.take(8), Err(FiError::Again)));
        e.lock().progress();
        let err = cq.take_error().expect("an error entry");
        assert_eq!((err.context, err.error), (1, Some((ffi::FI_EIO, 0))));
        // A receive posted later for the failed peer fails at once; one from any source stays.
        post(0, 3);
        assert_eq!(cq.take_error().expect("an error entry").context, 3);
        assert!(matches!(cq.take(8), Err(FiError::Again)));
    }

    #[test]
    fn an_endpoint_not_enabled_refuses_to_send() {
        let e = EpShared::new(Box::new(Loopback::open()), true, 0, 0);
        let r = e
            .lock()
            .send(Kind::Tagged, b"x", 0, 0, None, null_mut(), 0, false);
        assert!(matches!(r, Err(FiError::BadState(_))));
        assert!(matches!(e.lock().enable(), Err(FiError::BadState(_))));
    }

    #[test]
    fn selective_completion_reports_only_what_asked_for_one() {
        let p = pair();
        p.a.lock()
            .bind_cq(
                p.a_cq.clone(),
                ffi::FI_TRANSMIT as u64 | ffi::FI_SELECTIVE_COMPLETION,
            )
            .unwrap();
        p.a.lock()
            .send(Kind::Tagged, b"quiet", 1, 1, None, ctx(1), 0, false)
            .unwrap();
        assert!(matches!(p.a_cq.take(8), Err(FiError::Again)));
        p.a.lock()
            .send(
                Kind::Tagged,
                b"loud",
                1,
                1,
                None,
                ctx(2),
                ffi::FI_COMPLETION as u64,
                false,
            )
            .unwrap();
        assert_eq!(p.a_cq.take(8).unwrap()[0].context, 2);
        // Injected sends never complete.
        p.a.lock()
            .send(
                Kind::Tagged,
                b"inj",
                1,
                1,
                None,
                ctx(3),
                ffi::FI_COMPLETION as u64,
                true,
            )
            .unwrap();
        assert!(matches!(p.a_cq.take(8), Err(FiError::Again)));
    }

    #[test]
    fn a_message_longer_than_eager_is_refused() {
        let p = pair();
        let big = vec![0u8; MAX_MSG_SIZE + 1];
        let r =
            p.a.lock()
                .send(Kind::Tagged, &big, 1, 0, None, null_mut(), 0, false);
        assert!(matches!(r, Err(FiError::MessageSize(_))));
    }

    #[test]
    fn tagged_and_untagged_messages_do_not_mix() {
        let p = pair();
        let mut buf = [0u8; 8];
        p.b.lock()
            .recv(
                Kind::Msg,
                RecvMode::Post,
                Selector::tag(0),
                buf.as_mut_ptr().cast(),
                8,
                ctx(1),
                0,
            )
            .unwrap();
        p.a.lock()
            .send(Kind::Tagged, b"tagged", 1, 0, None, null_mut(), 0, false)
            .unwrap();
        p.b_cq.progress();
        assert!(
            matches!(p.b_cq.take(8), Err(FiError::Again)),
            "a tagged message took an untagged receive"
        );
        p.a.lock()
            .send(Kind::Msg, b"plain", 1, 0, None, null_mut(), 0, false)
            .unwrap();
        p.b_cq.progress();
        let got = p.b_cq.take(8).unwrap();
        assert_eq!(
            (got[0].context, got[0].flags & ffi::FI_MSG as u64 != 0),
            (1, true)
        );
        assert_eq!(&buf[..5], b"plain");
    }

    #[test]
    fn recv_modes_follow_the_flags() {
        let f = |flags: u64| RecvMode::from_flags(flags);
        let (peek, claim, discard) = (ffi::FI_PEEK as u64, ffi::FI_CLAIM, ffi::FI_DISCARD);
        assert_eq!(f(0), RecvMode::Post);
        assert_eq!(f(peek), RecvMode::Peek);
        assert_eq!(f(peek | claim), RecvMode::PeekClaim);
        assert_eq!(f(peek | discard), RecvMode::PeekDiscard);
        assert_eq!(f(claim), RecvMode::Claim);
        assert_eq!(f(claim | discard), RecvMode::ClaimDiscard);
    }
}
