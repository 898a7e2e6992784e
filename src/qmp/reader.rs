//! The reader thread of a QMP connection: it reads everything QEMU sends, hands each reply to
//! the caller waiting for its id and queues the events.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use parking_lot::{Mutex, MutexGuard};
use serde_json::Value;

use super::error::{truncate_for_display, QmpError};
use super::wire::{
    is_blank, parse_message, read_line_bounded, Line, Message, Reply, MAX_LINE_BYTES,
};
use super::{QmpEvent, EVENT_QUEUE_CAPACITY};

/// What the reader thread and the callers share.
pub(super) struct Shared {
    /// The socket path (or transport name) for error messages.
    pub(super) path: PathBuf,
    pub(super) state: Mutex<Pending>,
}

#[derive(Default)]
pub(super) struct Pending {
    /// Callers waiting for a reply, by command id.
    pub(super) waiters: HashMap<u64, Sender<Reply>>,
    /// Ids of commands whose callers gave up waiting.
    pub(super) abandoned: HashSet<u64>,
    /// Set once the reader thread has stopped: no reply will ever come.
    pub(super) closed: bool,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock()
    }

    pub(super) fn disconnected(&self) -> QmpError {
        QmpError::Disconnected {
            path: self.path.clone(),
        }
    }

    /// Marks the connection closed and wakes every waiting caller: dropping
    /// their senders makes their receivers report disconnection.
    pub(super) fn close(&self) {
        let mut pending = self.lock();
        pending.closed = true;
        pending.waiters.clear();
        pending.abandoned.clear();
    }
}

/// The reader thread's state.
pub(super) struct ReaderState {
    pub(super) shared: Arc<Shared>,
    pub(super) events_tx: Sender<QmpEvent>,
    /// Used only to drop the oldest event when the queue is full.
    pub(super) events_rx: Receiver<QmpEvent>,
}

impl ReaderState {
    pub(super) fn run(
        self,
        mut reader: Box<dyn BufRead + Send>,
        greeting_tx: Sender<Result<Value, QmpError>>,
    ) {
        let mut buf = Vec::new();
        let greeting = self.read_greeting(&mut *reader, &mut buf);
        let greeted = greeting.is_ok();
        // The constructor may have timed out and gone away: nothing to do.
        let _ = greeting_tx.send(greeting);
        if greeted {
            self.read_messages(&mut *reader, &mut buf);
        }
        self.shared.close();
        tracing::debug!(path = %self.shared.path.display(), "QMP reader thread stopped");
        // Dropping `self.events_tx` closes the events channel.
    }

    fn read_greeting(
        &self,
        reader: &mut dyn BufRead,
        buf: &mut Vec<u8>,
    ) -> Result<Value, QmpError> {
        loop {
            match read_line_bounded(reader, MAX_LINE_BYTES, buf) {
                Ok(Line::Data) if is_blank(buf) => continue,
                Ok(Line::Data) => {
                    return match parse_message(buf)? {
                        Message::Greeting(greeting) => Ok(greeting),
                        _ => Err(QmpError::malformed(
                            &String::from_utf8_lossy(buf),
                            "expected the QMP greeting {\"QMP\": {...}} first",
                        )),
                    }
                }
                Ok(Line::TooLong(n)) => {
                    return Err(QmpError::malformed(
                        &format!("<{n} bytes>"),
                        "greeting line too long",
                    ))
                }
                Ok(Line::Eof) => return Err(self.shared.disconnected()),
                Err(err) => {
                    tracing::warn!(path = %self.shared.path.display(), error = %err, "reading QMP greeting failed");
                    return Err(self.shared.disconnected());
                }
            }
        }
    }

    fn read_messages(&self, reader: &mut dyn BufRead, buf: &mut Vec<u8>) {
        loop {
            match read_line_bounded(reader, MAX_LINE_BYTES, buf) {
                Ok(Line::Data) if is_blank(buf) => {}
                Ok(Line::Data) => {
                    tracing::trace!(line = %truncate_for_display(&String::from_utf8_lossy(buf)), "QMP <-");
                    match parse_message(buf) {
                        Ok(message) => self.dispatch(message, buf),
                        Err(err) => {
                            tracing::warn!(path = %self.shared.path.display(), "skipping line from QEMU: {}", err.chain())
                        }
                    }
                }
                Ok(Line::TooLong(n)) => {
                    tracing::warn!(path = %self.shared.path.display(), bytes = n, "skipping over-long line from QEMU");
                }
                Ok(Line::Eof) => {
                    tracing::info!(path = %self.shared.path.display(), "QMP socket closed by QEMU");
                    return;
                }
                Err(err) => {
                    tracing::warn!(path = %self.shared.path.display(), error = %err, "reading from QMP socket failed; treating it as closed");
                    return;
                }
            }
        }
    }

    fn dispatch(&self, message: Message, line: &[u8]) {
        match message {
            Message::Reply { id, reply } => self.route_reply(id, reply, line),
            Message::Event(event) => self.deliver_event(event),
            Message::Greeting(_) => {
                let err = QmpError::malformed(
                    &String::from_utf8_lossy(line),
                    "unexpected second greeting",
                );
                tracing::warn!(path = %self.shared.path.display(), "skipping line from QEMU: {err}");
            }
        }
    }

    fn route_reply(&self, id: Option<u64>, reply: Reply, line: &[u8]) {
        let mut pending = self.shared.lock();
        let waiter = id.and_then(|id| pending.waiters.remove(&id));
        if let Some(waiter) = waiter {
            drop(pending);
            // The waiter holds the only receiver until it gives up; a full
            // or closed channel means it already has gone away.
            let _ = waiter.try_send(reply);
            return;
        }
        if let Some(id) = id.filter(|id| pending.abandoned.remove(id)) {
            tracing::debug!(
                id,
                ?reply,
                "discarding late reply to a timed-out QMP command"
            );
            return;
        }
        drop(pending);
        let reason = match id {
            Some(id) => format!("reply with id {id}, which matches no request"),
            None => "reply without a usable id".to_owned(),
        };
        let err = QmpError::malformed(&String::from_utf8_lossy(line), reason);
        tracing::warn!(path = %self.shared.path.display(), "skipping line from QEMU: {err}");
    }

    fn deliver_event(&self, event: QmpEvent) {
        tracing::debug!(event = %event.event, data = %event.data, "QMP event");
        let mut event = event;
        loop {
            match self.events_tx.try_send(event) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) => {
                    event = back;
                    match self.events_rx.try_recv() {
                        Ok(oldest) => tracing::warn!(
                            dropped = %oldest.event,
                            "QMP event queue full ({EVENT_QUEUE_CAPACITY}): nobody reads events; dropping the oldest"
                        ),
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
                    }
                }
                // Cannot happen while `self.events_rx` lives; nothing to do.
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}
