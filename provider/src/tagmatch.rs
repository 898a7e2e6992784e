//! The tag-matching engine: posted receives and unexpected messages, as libfabric's tagged
//! interface defines them, independent of the transport and of the C ABI.
//!
//! - A message that arrives takes the oldest posted receive that matches it, or waits in the
//!   unexpected queue. A receive that is posted takes the oldest unexpected message that
//!   matches it, or waits in the posted queue. Both queues are searched in order, so two
//!   messages from one source with one tag are received in the order they were sent
//!   (`FI_ORDER_SAS`).
//! - A receive matches a message when their tags agree outside the receive's ignore mask:
//!   `(msg.tag | ignore) == (recv.tag | ignore)`. With `FI_DIRECTED_RECV` a receive for a
//!   source address other than `FI_ADDR_UNSPEC` only matches that source; without it the
//!   source is not looked at.
//! - `FI_PEEK` reports the first matching unexpected message without taking it;
//!   `FI_PEEK|FI_CLAIM` also reserves it for the peek's context, so that no receive, peek or
//!   arrival sees it until `FI_CLAIM` with that context takes it (into a buffer) or
//!   `FI_CLAIM|FI_DISCARD` drops it; `FI_PEEK|FI_DISCARD` drops it at once.
//! - `fi_cancel` takes a posted receive back by its context.
//!
//! The engine is generic over the receive's context `C` (the application's `fi_context`
//! pointer), its buffer `B` and the message's payload `P`; what it hands back ([`Delivery`],
//! [`Completion`]) says what the completion queue must report, truncation included.

use std::collections::VecDeque;

use crate::ffi;

/// A peer's address in the address vector (`fi_addr_t`).
pub type Addr = ffi::fi_addr_t;
/// The source of a receive that takes any source (`FI_ADDR_UNSPEC`).
pub const ANY_SRC: Addr = ffi::FI_ADDR_UNSPEC;

/// What a receive (or a peek) accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selector {
    /// The source, or [`ANY_SRC`]; looked at only with directed receive.
    pub src: Addr,
    pub tag: u64,
    /// Tag bits that do not take part in the match.
    pub ignore: u64,
}

impl Selector {
    /// A selector for any source and exactly `tag`.
    pub fn tag(tag: u64) -> Selector {
        Selector {
            src: ANY_SRC,
            tag,
            ignore: 0,
        }
    }

    fn accepts(&self, directed: bool, src: Addr, tag: u64) -> bool {
        (tag | self.ignore) == (self.tag | self.ignore)
            && (!directed || self.src == ANY_SRC || self.src == src)
    }
}

/// A receive the application posted: what it accepts, where the data goes (`len` bytes at
/// most), and the context its completion carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recv<C, B> {
    pub sel: Selector,
    pub context: C,
    pub buf: B,
    pub len: usize,
}

/// A message that arrived from a peer: `len` bytes of payload, with remote CQ data if the
/// sender gave some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<P> {
    pub src: Addr,
    pub tag: u64,
    pub data: Option<u64>,
    pub len: usize,
    pub payload: P,
}

/// What a peek learns of a message, without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageInfo {
    pub src: Addr,
    pub tag: u64,
    pub data: Option<u64>,
    pub len: usize,
}

impl<P> Message<P> {
    fn info(&self) -> MessageInfo {
        MessageInfo {
            src: self.src,
            tag: self.tag,
            data: self.data,
            len: self.len,
        }
    }
}

/// Why a completion is an error entry (`fi_cq_readerr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionError {
    /// The message was longer than the buffer: `olen` bytes did not fit (`FI_ETRUNC`).
    Truncated { olen: usize },
    /// The receive was cancelled (`FI_ECANCELED`).
    Canceled,
    /// A peek found no matching message (`FI_ENOMSG`).
    NoMessage,
    /// The only peer that could match the receive failed (`FI_EIO`).
    PeerFailed,
}

impl CompletionError {
    /// The positive `FI_E*` number of the error entry.
    pub fn errno(&self) -> u32 {
        match self {
            CompletionError::Truncated { .. } => ffi::FI_ETRUNC,
            CompletionError::Canceled => ffi::FI_ECANCELED,
            CompletionError::NoMessage => ffi::FI_ENOMSG,
            CompletionError::PeerFailed => ffi::FI_EIO,
        }
    }
}

/// What the completion queue reports for a receive, a peek or a cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion<C> {
    pub context: C,
    /// Bytes placed in the buffer (for a peek: the message's length).
    pub len: usize,
    pub tag: u64,
    pub src: Addr,
    pub data: Option<u64>,
    pub error: Option<CompletionError>,
}

impl<C> Completion<C> {
    fn of_info(context: C, info: MessageInfo) -> Completion<C> {
        Completion {
            context,
            len: info.len,
            tag: info.tag,
            src: info.src,
            data: info.data,
            error: None,
        }
    }

    fn error(context: C, sel: Selector, error: CompletionError) -> Completion<C> {
        Completion {
            context,
            len: 0,
            tag: sel.tag,
            src: sel.src,
            data: None,
            error: Some(error),
        }
    }
}

/// A receive and the message it takes: the caller copies `copy_len()` bytes of the payload into
/// the buffer, then reports `completion()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<C, B, P> {
    pub recv: Recv<C, B>,
    pub msg: Message<P>,
}

impl<C: Copy, B, P> Delivery<C, B, P> {
    /// The bytes that fit in the receive's buffer.
    pub fn copy_len(&self) -> usize {
        self.msg.len.min(self.recv.len)
    }

    /// The completion: the message's tag, source and data; an `FI_ETRUNC` error entry when
    /// the message did not fit.
    pub fn completion(&self) -> Completion<C> {
        let copied = self.copy_len();
        let error = (copied < self.msg.len).then_some(CompletionError::Truncated {
            olen: self.msg.len - copied,
        });
        Completion {
            context: self.recv.context,
            len: copied,
            tag: self.msg.tag,
            src: self.msg.src,
            data: self.msg.data,
            error,
        }
    }
}

/// A claimed message was asked for by a context that claimed none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no message is claimed by this context (FI_CLAIM needs an FI_PEEK|FI_CLAIM first)")]
pub struct NotClaimed;

struct Unexpected<C, P> {
    msg: Message<P>,
    claimed_by: Option<C>,
}

/// The posted and unexpected queues of one endpoint's receive side (one for tagged, one for
/// untagged messages, whose tags are all 0).
pub struct Matcher<C, B, P> {
    directed: bool,
    posted: VecDeque<Recv<C, B>>,
    unexpected: VecDeque<Unexpected<C, P>>,
    unexpected_bytes: usize,
}

impl<C: Copy + Eq, B, P> Matcher<C, B, P> {
    /// An empty matcher; `directed` is whether the endpoint has `FI_DIRECTED_RECV`.
    pub fn new(directed: bool) -> Matcher<C, B, P> {
        Matcher {
            directed,
            posted: VecDeque::new(),
            unexpected: VecDeque::new(),
            unexpected_bytes: 0,
        }
    }

    /// Posted receives waiting for a message.
    pub fn posted_len(&self) -> usize {
        self.posted.len()
    }

    /// Unexpected messages waiting for a receive (claimed ones included).
    pub fn unexpected_len(&self) -> usize {
        self.unexpected.len()
    }

    /// Payload bytes held by unexpected messages.
    pub fn unexpected_bytes(&self) -> usize {
        self.unexpected_bytes
    }

    /// A message arrived: the oldest matching posted receive takes it, or it is queued as
    /// unexpected (and `None` is returned).
    pub fn arrive(&mut self, msg: Message<P>) -> Option<Delivery<C, B, P>> {
        let directed = self.directed;
        let found = self
            .posted
            .iter()
            .position(|r| r.sel.accepts(directed, msg.src, msg.tag));
        match found.and_then(|i| self.posted.remove(i)) {
            Some(recv) => Some(Delivery { recv, msg }),
            None => {
                self.unexpected_bytes += msg.len;
                self.unexpected.push_back(Unexpected {
                    msg,
                    claimed_by: None,
                });
                None
            }
        }
    }

    /// A receive is posted: it takes the oldest matching unclaimed unexpected message, or is
    /// queued (and `None` is returned).
    pub fn post(&mut self, recv: Recv<C, B>) -> Option<Delivery<C, B, P>> {
        match self.find_unexpected(recv.sel) {
            Some(i) => {
                let msg = self.take_unexpected(i);
                Some(Delivery { recv, msg })
            }
            None => {
                self.posted.push_back(recv);
                None
            }
        }
    }

    /// `FI_PEEK`: the first matching unclaimed unexpected message, left in place; the
    /// completion is the message's, or an `FI_ENOMSG` error entry.
    pub fn peek(&self, sel: Selector, context: C) -> Completion<C> {
        match self.find_unexpected(sel) {
            Some(i) => Completion::of_info(context, self.unexpected[i].msg.info()),
            None => Completion::error(context, sel, CompletionError::NoMessage),
        }
    }

    /// `FI_PEEK|FI_CLAIM`: as [`peek`](Self::peek), and the message is reserved for `context`.
    pub fn peek_claim(&mut self, sel: Selector, context: C) -> Completion<C> {
        match self.find_unexpected(sel) {
            Some(i) => {
                self.unexpected[i].claimed_by = Some(context);
                Completion::of_info(context, self.unexpected[i].msg.info())
            }
            None => Completion::error(context, sel, CompletionError::NoMessage),
        }
    }

    /// `FI_PEEK|FI_DISCARD`: as [`peek`](Self::peek), and the message is dropped.
    pub fn peek_discard(&mut self, sel: Selector, context: C) -> Completion<C> {
        match self.find_unexpected(sel) {
            Some(i) => Completion::of_info(context, self.take_unexpected(i).info()),
            None => Completion::error(context, sel, CompletionError::NoMessage),
        }
    }

    /// `FI_CLAIM`: the receive takes the message its context claimed with a peek.
    pub fn claim(&mut self, recv: Recv<C, B>) -> Result<Delivery<C, B, P>, NotClaimed> {
        let i = self.find_claimed(recv.context).ok_or(NotClaimed)?;
        let msg = self.take_unexpected(i);
        Ok(Delivery { recv, msg })
    }

    /// `FI_CLAIM|FI_DISCARD`: the message `context` claimed is dropped; its completion has no
    /// data placed.
    pub fn claim_discard(&mut self, context: C) -> Result<Completion<C>, NotClaimed> {
        let i = self.find_claimed(context).ok_or(NotClaimed)?;
        let info = self.take_unexpected(i).info();
        Ok(Completion {
            len: 0,
            ..Completion::of_info(context, info)
        })
    }

    /// `fi_cancel`: the posted receive with `context` is taken back, with its `FI_ECANCELED`
    /// error completion; `None` if no posted receive has it (already matched, or never posted).
    pub fn cancel(&mut self, context: C) -> Option<(Recv<C, B>, Completion<C>)> {
        let i = self.posted.iter().position(|r| r.context == context)?;
        let recv = self.posted.remove(i)?;
        let completion = Completion::error(context, recv.sel, CompletionError::Canceled);
        Some((recv, completion))
    }

    /// The peer at `src` failed: every posted receive that only it could match is taken back,
    /// in order, with its `FI_EIO` error completion. Without directed receive no receive names
    /// a source, and none is taken.
    pub fn fail_source(&mut self, src: Addr) -> Vec<(Recv<C, B>, Completion<C>)> {
        if !self.directed || src == ANY_SRC {
            return Vec::new();
        }
        let (failed, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.posted)
            .into_iter()
            .partition(|r| r.sel.src == src);
        self.posted = kept;
        failed
            .into_iter()
            .map(|r| {
                let c = Completion::error(r.context, r.sel, CompletionError::PeerFailed);
                (r, c)
            })
            .collect()
    }

    fn find_unexpected(&self, sel: Selector) -> Option<usize> {
        let directed = self.directed;
        self.unexpected
            .iter()
            .position(|u| u.claimed_by.is_none() && sel.accepts(directed, u.msg.src, u.msg.tag))
    }

    fn find_claimed(&self, context: C) -> Option<usize> {
        self.unexpected
            .iter()
            .position(|u| u.claimed_by == Some(context))
    }

    fn take_unexpected(&mut self, i: usize) -> Message<P> {
        let u = self
            .unexpected
            .remove(i)
            .expect("index from a search of the queue");
        self.unexpected_bytes -= u.msg.len;
        u.msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Addr = 1;
    const B: Addr = 2;

    type M = Matcher<u32, Vec<u8>, Vec<u8>>;

    fn recv(context: u32, sel: Selector, len: usize) -> Recv<u32, Vec<u8>> {
        Recv {
            sel,
            context,
            buf: vec![0; len],
            len,
        }
    }

    fn msg(src: Addr, tag: u64, payload: &[u8]) -> Message<Vec<u8>> {
        Message {
            src,
            tag,
            data: None,
            len: payload.len(),
            payload: payload.to_vec(),
        }
    }

    fn from(src: Addr, tag: u64) -> Selector {
        Selector {
            src,
            tag,
            ignore: 0,
        }
    }

    #[test]
    fn a_posted_receive_takes_the_message_that_arrives() {
        let mut m = M::new(true);
        assert!(m.post(recv(7, Selector::tag(5), 16)).is_none());
        assert_eq!(m.posted_len(), 1);
        let d = m.arrive(msg(A, 5, b"hello")).expect("matched");
        assert_eq!(d.recv.context, 7);
        assert_eq!(d.copy_len(), 5);
        let c = d.completion();
        assert_eq!(
            (c.context, c.len, c.tag, c.src, c.error),
            (7, 5, 5, A, None)
        );
        assert_eq!((m.posted_len(), m.unexpected_len()), (0, 0));
    }

    #[test]
    fn an_unexpected_message_waits_for_its_receive() {
        let mut m = M::new(true);
        assert!(m.arrive(msg(A, 9, b"early")).is_none());
        assert_eq!((m.unexpected_len(), m.unexpected_bytes()), (1, 5));
        // A receive for another tag does not take it.
        assert!(m.post(recv(1, Selector::tag(8), 16)).is_none());
        let d = m.post(recv(2, Selector::tag(9), 16)).expect("matched");
        assert_eq!(
            (d.recv.context, d.msg.payload.as_slice()),
            (2, &b"early"[..])
        );
        assert_eq!(
            (m.unexpected_len(), m.unexpected_bytes(), m.posted_len()),
            (0, 0, 1)
        );
    }

    #[test]
    fn messages_of_one_source_and_tag_are_received_in_order() {
        let mut m = M::new(true);
        for p in [b"1", b"2", b"3"] {
            assert!(m.arrive(msg(A, 4, p)).is_none());
        }
        for want in [b"1", b"2", b"3"] {
            let d = m.post(recv(0, Selector::tag(4), 8)).expect("matched");
            assert_eq!(d.msg.payload, want.to_vec());
        }
        // And posted receives are taken in the order they were posted.
        for ctx in [10, 11, 12] {
            assert!(m.post(recv(ctx, Selector::tag(4), 8)).is_none());
        }
        for want in [10, 11, 12] {
            assert_eq!(
                m.arrive(msg(A, 4, b"x")).expect("matched").recv.context,
                want
            );
        }
    }

    #[test]
    fn ignored_tag_bits_do_not_take_part_in_the_match() {
        let mut m = M::new(true);
        let wild = Selector {
            src: ANY_SRC,
            tag: 0x1200,
            ignore: 0x00ff,
        };
        assert!(m.post(recv(1, wild, 8)).is_none());
        // 0x1300 differs outside the ignore mask: no match.
        assert!(m.arrive(msg(A, 0x1300, b"no")).is_none());
        let d = m.arrive(msg(A, 0x12ab, b"yes")).expect("matched");
        assert_eq!((d.recv.context, d.completion().tag), (1, 0x12ab));
        // The same with the message first.
        assert!(m.arrive(msg(A, 0x12cd, b"later")).is_none());
        let d = m.post(recv(2, wild, 8)).expect("matched");
        assert_eq!(d.msg.tag, 0x12cd);
        assert_eq!(m.unexpected_len(), 1, "0x1300 is still waiting");
    }

    #[test]
    fn a_directed_receive_takes_only_its_source() {
        let mut m = M::new(true);
        assert!(m.post(recv(1, from(A, 3), 8)).is_none());
        assert!(
            m.arrive(msg(B, 3, b"from b")).is_none(),
            "B's message is not A's"
        );
        assert_eq!(
            m.arrive(msg(A, 3, b"from a"))
                .expect("matched")
                .recv
                .context,
            1
        );
        // A receive from any source takes B's waiting message.
        assert_eq!(
            m.post(recv(2, from(ANY_SRC, 3), 8))
                .expect("matched")
                .msg
                .src,
            B
        );
        // Unexpected messages are matched by source too: A's receive skips B's older message.
        assert!(m.arrive(msg(B, 3, b"b")).is_none());
        assert!(m.arrive(msg(A, 3, b"a")).is_none());
        assert_eq!(m.post(recv(3, from(A, 3), 8)).expect("matched").msg.src, A);
    }

    #[test]
    fn without_directed_receive_the_source_is_not_looked_at() {
        let mut m = M::new(false);
        assert!(m.post(recv(1, from(A, 3), 8)).is_none());
        assert_eq!(m.arrive(msg(B, 3, b"from b")).expect("matched").msg.src, B);
    }

    #[test]
    fn a_message_longer_than_the_buffer_is_a_truncation_error() {
        let mut m = M::new(true);
        assert!(m.post(recv(1, Selector::tag(0), 4)).is_none());
        let d = m.arrive(msg(A, 0, b"0123456789")).expect("matched");
        assert_eq!(d.copy_len(), 4);
        let c = d.completion();
        assert_eq!(c.len, 4);
        assert_eq!(c.error, Some(CompletionError::Truncated { olen: 6 }));
        assert_eq!(c.error.unwrap().errno(), ffi::FI_ETRUNC);
        // Exactly the buffer's size is no error.
        assert!(m.post(recv(2, Selector::tag(0), 4)).is_none());
        assert_eq!(
            m.arrive(msg(A, 0, b"0123")).unwrap().completion().error,
            None
        );
    }

    #[test]
    fn remote_cq_data_is_reported() {
        let mut m = M::new(true);
        let mut with_data = msg(A, 1, b"d");
        with_data.data = Some(0xdead_beef);
        assert!(m.arrive(with_data).is_none());
        assert_eq!(m.peek(Selector::tag(1), 5).data, Some(0xdead_beef));
        let d = m.post(recv(1, Selector::tag(1), 4)).unwrap();
        assert_eq!(d.completion().data, Some(0xdead_beef));
    }

    #[test]
    fn peek_reports_without_taking() {
        let mut m = M::new(true);
        let none = m.peek(Selector::tag(1), 5);
        assert_eq!(none.error, Some(CompletionError::NoMessage));
        assert_eq!(none.error.unwrap().errno(), ffi::FI_ENOMSG);
        assert!(m.arrive(msg(A, 1, b"abc")).is_none());
        let c = m.peek(Selector::tag(1), 5);
        assert_eq!((c.context, c.len, c.src, c.error), (5, 3, A, None));
        assert_eq!(m.unexpected_len(), 1, "a peek leaves the message");
        // A directed peek for another source finds nothing.
        assert_eq!(
            m.peek(from(B, 1), 6).error,
            Some(CompletionError::NoMessage)
        );
        assert!(m.post(recv(1, Selector::tag(1), 8)).is_some());
    }

    #[test]
    fn a_claimed_message_is_kept_for_its_claimer() {
        let mut m = M::new(true);
        assert!(m.arrive(msg(A, 1, b"first")).is_none());
        assert!(m.arrive(msg(A, 1, b"second")).is_none());
        let c = m.peek_claim(Selector::tag(1), 42);
        assert_eq!((c.len, c.error), (5, None));
        // Peeks, receives and arrivals see past the claimed message.
        assert_eq!(m.peek(Selector::tag(1), 0).len, 6);
        let d = m
            .post(recv(1, Selector::tag(1), 8))
            .expect("the second message");
        assert_eq!(d.msg.payload, b"second".to_vec());
        assert!(
            m.post(recv(2, Selector::tag(1), 8)).is_none(),
            "the claimed one is not taken"
        );
        assert_eq!(m.cancel(2).map(|(r, _)| r.context), Some(2));
        // Only the claiming context gets it.
        assert_eq!(m.claim(recv(7, Selector::tag(1), 8)), Err(NotClaimed));
        let d = m.claim(recv(42, Selector::tag(1), 8)).expect("claimed");
        assert_eq!(d.msg.payload, b"first".to_vec());
        assert_eq!(d.completion().context, 42);
        assert_eq!(
            m.claim(recv(42, Selector::tag(1), 8)),
            Err(NotClaimed),
            "claimed once"
        );
        assert_eq!((m.unexpected_len(), m.unexpected_bytes()), (0, 0));
    }

    #[test]
    fn a_claimed_message_can_be_discarded() {
        let mut m = M::new(true);
        assert!(m.arrive(msg(A, 1, b"drop me")).is_none());
        assert_eq!(m.peek_claim(Selector::tag(1), 3).error, None);
        assert_eq!(m.claim_discard(4), Err(NotClaimed));
        let c = m.claim_discard(3).expect("claimed");
        assert_eq!((c.context, c.len, c.tag, c.error), (3, 0, 1, None));
        assert_eq!((m.unexpected_len(), m.unexpected_bytes()), (0, 0));
    }

    #[test]
    fn peek_discard_drops_the_message() {
        let mut m = M::new(true);
        assert!(m.arrive(msg(A, 1, b"gone")).is_none());
        assert!(m.arrive(msg(A, 2, b"kept")).is_none());
        let c = m.peek_discard(Selector::tag(1), 9);
        assert_eq!((c.len, c.error), (4, None));
        assert_eq!(
            m.peek(Selector::tag(1), 9).error,
            Some(CompletionError::NoMessage)
        );
        assert_eq!((m.unexpected_len(), m.unexpected_bytes()), (1, 4));
        assert_eq!(
            m.peek_discard(Selector::tag(3), 9).error,
            Some(CompletionError::NoMessage)
        );
    }

    #[test]
    fn cancel_takes_back_a_posted_receive() {
        let mut m = M::new(true);
        assert!(m.post(recv(1, Selector::tag(1), 8)).is_none());
        assert!(m.post(recv(2, Selector::tag(1), 8)).is_none());
        let (r, c) = m.cancel(1).expect("posted");
        assert_eq!(r.context, 1);
        assert_eq!((c.context, c.error), (1, Some(CompletionError::Canceled)));
        assert_eq!(c.error.unwrap().errno(), ffi::FI_ECANCELED);
        assert!(m.cancel(1).is_none(), "cancelled once");
        // The message goes to the receive that is left.
        assert_eq!(m.arrive(msg(A, 1, b"x")).expect("matched").recv.context, 2);
        assert!(
            m.cancel(2).is_none(),
            "a matched receive cannot be cancelled"
        );
    }

    #[test]
    fn a_failed_peer_takes_back_only_the_receives_it_alone_could_match() {
        let from = |src| Selector {
            src,
            tag: 1,
            ignore: 0,
        };
        let mut m = M::new(true);
        assert!(m.post(recv(1, from(A), 8)).is_none());
        assert!(m.post(recv(2, from(ANY_SRC), 8)).is_none());
        assert!(m.post(recv(3, from(A), 8)).is_none());
        assert!(m.post(recv(4, from(B), 8)).is_none());
        let failed = m.fail_source(A);
        let got: Vec<_> = failed.iter().map(|(r, c)| (r.context, c.error)).collect();
        assert_eq!(
            got,
            vec![
                (1, Some(CompletionError::PeerFailed)),
                (3, Some(CompletionError::PeerFailed))
            ]
        );
        assert_eq!(failed[0].1.error.unwrap().errno(), ffi::FI_EIO);
        assert!(m.fail_source(A).is_empty(), "taken back once");
        // The others still match.
        assert_eq!(m.arrive(msg(B, 1, b"x")).expect("matched").recv.context, 2);
        assert_eq!(m.arrive(msg(B, 1, b"y")).expect("matched").recv.context, 4);
        // Without directed receive no receive belongs to one source.
        let mut m = M::new(false);
        assert!(m.post(recv(1, from(A), 8)).is_none());
        assert!(m.fail_source(A).is_empty());
    }
}
