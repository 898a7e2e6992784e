//! The QMP client: connection set-up, command execution and waiting for events. The reader
//! thread is in `reader.rs`, the line format in `wire.rs`.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::{truncate_for_display, QmpError};
use super::reader::{Pending, ReaderState, Shared};
use super::transport::{QmpTransport, ShutdownFn, TransportParts};
use super::wire::{QmpEvent, Reply};

/// How many undelivered events are kept. When nobody reads the events
/// channel and it is full, the oldest event is dropped (with a warning).
pub const EVENT_QUEUE_CAPACITY: usize = 4096;

/// How many ids of timed-out commands are remembered, so that their late
/// replies are recognised (and logged at debug level) instead of being
/// reported as replies to nothing.
const MAX_ABANDONED_IDS: usize = 1024;

/// Longest pause between two attempts to connect to a socket that does not
/// accept connections yet.
const MAX_CONNECT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// A QMP client connected to one QEMU monitor.
///
/// All methods take `&self`; share the client between threads with an
/// [`Arc`]. A background reader thread parses everything QEMU sends, hands
/// each reply to the caller waiting for its `id` and puts events on the
/// channel returned by [`events`](Self::events).
///
/// When QEMU closes the socket, every waiting and every later call fails
/// with [`QmpError::Disconnected`] and the events channel is closed.
/// Dropping the client closes the socket and stops the reader thread.
pub struct QmpClient {
    shared: Arc<Shared>,
    writer: Mutex<Box<dyn Write + Send>>,
    events: Receiver<QmpEvent>,
    greeting: Value,
    timeout: Mutex<Duration>,
    next_id: AtomicU64,
    shutdown: Option<ShutdownFn>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.shared.path)
            .field("connected", &self.is_connected())
            .field("timeout", &self.timeout())
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Connects to QEMU's QMP UNIX socket at `path`, reads the greeting and
    /// negotiates capabilities.
    ///
    /// While the socket does not exist or refuses connections (QEMU still
    /// starting), connecting is retried until `timeout` has passed. Reading
    /// the greeting and negotiating capabilities each get `timeout` too, and
    /// `timeout` becomes the default command timeout (see
    /// [`set_timeout`](Self::set_timeout)).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(err) if is_retryable_connect_error(&err) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(QmpError::Connect {
                            path: path.to_path_buf(),
                            source: err,
                        });
                    }
                    tracing::debug!(path = %path.display(), error = %err, "QMP socket not ready yet, retrying");
                    thread::sleep(delay.min(deadline - now));
                    delay = (delay * 2).min(MAX_CONNECT_RETRY_DELAY);
                }
                Err(err) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source: err,
                    })
                }
            }
        };
        tracing::debug!(path = %path.display(), "connected to QMP socket");
        Self::start(stream, path.to_path_buf(), timeout)
    }

    /// Talks QMP over an already open `transport`: reads the greeting and
    /// negotiates capabilities, each within `timeout`, which also becomes
    /// the default command timeout.
    pub fn over<T: QmpTransport>(transport: T, timeout: Duration) -> Result<Self, QmpError> {
        let path = transport.endpoint();
        Self::start(transport, path, timeout)
    }

    fn start<T: QmpTransport>(
        transport: T,
        path: PathBuf,
        timeout: Duration,
    ) -> Result<Self, QmpError> {
        let io_error = |source| QmpError::Io {
            path: path.clone(),
            source,
        };
        let TransportParts {
            reader,
            writer,
            shutdown,
        } = transport.split().map_err(io_error)?;

        let shared = Arc::new(Shared {
            path: path.clone(),
            state: Mutex::new(Pending::default()),
        });
        let (events_tx, events_rx) = crossbeam_channel::bounded(EVENT_QUEUE_CAPACITY);
        let (greeting_tx, greeting_rx) = crossbeam_channel::bounded(1);

        let reader_state = ReaderState {
            shared: Arc::clone(&shared),
            events_tx,
            events_rx: events_rx.clone(),
        };
        let spawned = thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || reader_state.run(reader, greeting_tx));
        let handle = match spawned {
            Ok(handle) => handle,
            Err(err) => {
                if let Some(shutdown) = &shutdown {
                    shutdown();
                }
                return Err(io_error(err));
            }
        };

        let client = QmpClient {
            shared,
            writer: Mutex::new(writer),
            events: events_rx,
            greeting: Value::Null,
            timeout: Mutex::new(timeout),
            next_id: AtomicU64::new(1),
            shutdown,
            reader: Some(handle),
        };
        // From here on, an early return drops `client`, which shuts the
        // transport down and joins the reader thread.
        client.handshake(&greeting_rx, timeout)
    }

    /// Waits for the greeting the reader thread passes on, then negotiates capabilities.
    fn handshake(
        mut self,
        greeting_rx: &Receiver<Result<Value, QmpError>>,
        timeout: Duration,
    ) -> Result<Self, QmpError> {
        self.greeting = match greeting_rx.recv_timeout(timeout) {
            Ok(greeting) => greeting?,
            Err(RecvTimeoutError::Timeout) => {
                return Err(QmpError::Timeout {
                    command: "greeting".into(),
                    after: timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => return Err(self.shared.disconnected()),
        };
        let path = self.shared.path.display();
        tracing::debug!(path = %path, version = ?self.qemu_version(), "QMP greeting received");
        self.execute_with_timeout("qmp_capabilities", None, timeout)?;
        tracing::debug!(path = %path, "QMP capabilities negotiated");
        Ok(self)
    }

    /// The contents of QEMU's greeting (the object under `"QMP"`, with
    /// `version` and `capabilities`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version `(major, minor, micro)` from the greeting, if present.
    pub fn qemu_version(&self) -> Option<(u64, u64, u64)> {
        let qemu = self.greeting.get("version")?.get("qemu")?;
        let part = |name| qemu.get(name).and_then(Value::as_u64);
        Some((part("major")?, part("minor")?, part("micro")?))
    }

    /// The socket path (or transport name) this client talks to.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether the connection is still open (QEMU has not closed it).
    pub fn is_connected(&self) -> bool {
        !self.shared.lock().closed
    }

    /// The default timeout of [`execute`](Self::execute).
    pub fn timeout(&self) -> Duration {
        *self.timeout.lock()
    }

    /// Sets the default timeout of [`execute`](Self::execute) and of the
    /// typed helpers.
    pub fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock() = timeout;
    }

    /// A receiver of QEMU's events.
    ///
    /// All receivers returned share one queue: each event is delivered to
    /// only one of them, and [`wait_event`](Self::wait_event) consumes from
    /// the same queue. The channel is closed (after the queued events are
    /// drained) once QEMU closes the socket.
    pub fn events(&self) -> Receiver<QmpEvent> {
        self.events.clone()
    }

    /// Runs `command` with optional `args` (a JSON object) and returns
    /// QEMU's `return` value, waiting at most the default timeout.
    pub fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, args, self.timeout())
    }

    /// Like [`execute`](Self::execute), then deserializes the return value
    /// into `T`; a value of the wrong shape gives [`QmpError::Malformed`].
    pub fn execute_as<T: DeserializeOwned>(
        &self,
        command: &str,
        args: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, args)?;
        serde_json::from_value(value.clone()).map_err(|err| {
            QmpError::malformed_json(
                &value.to_string(),
                format!("unexpected reply to `{command}`"),
                err,
            )
        })
    }

    /// Runs `command` with optional `args`, waiting at most `timeout` for
    /// the reply.
    ///
    /// On [`QmpError::Timeout`] the command may still be running in QEMU;
    /// its late reply is discarded.
    pub fn execute_with_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = command_line(command, args, id);
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        {
            let mut pending = self.shared.lock();
            if pending.closed {
                return Err(self.shared.disconnected());
            }
            pending.waiters.insert(id, reply_tx);
        }

        tracing::debug!(command, id, "QMP command sent");
        tracing::trace!(line = %truncate_for_display(&line), "QMP ->");
        if let Err(err) = self.write_line(line.as_bytes()) {
            self.shared.lock().waiters.remove(&id);
            return Err(err);
        }

        let reply = match reply_rx.recv_timeout(timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Disconnected) => return Err(self.shared.disconnected()),
            Err(RecvTimeoutError::Timeout) => self.give_up(command, id, &reply_rx, timeout)?,
        };
        match reply {
            Reply::Return(value) => {
                tracing::debug!(command, id, "QMP command succeeded");
                Ok(value)
            }
            Reply::Error { class, desc } => {
                tracing::debug!(command, id, %class, %desc, "QMP command failed");
                Err(QmpError::Command {
                    command: command.into(),
                    class,
                    desc,
                })
            }
        }
    }

    /// After a timeout: stops waiting for the reply to `id` (its late reply is then discarded
    /// by the reader thread), unless it arrived, or the connection closed, just before.
    fn give_up(
        &self,
        command: &str,
        id: u64,
        reply_rx: &Receiver<Reply>,
        timeout: Duration,
    ) -> Result<Reply, QmpError> {
        let closed = {
            let mut pending = self.shared.lock();
            pending.waiters.remove(&id);
            if !pending.closed {
                if pending.abandoned.len() >= MAX_ABANDONED_IDS {
                    pending.abandoned.clear();
                }
                pending.abandoned.insert(id);
            }
            pending.closed
        };
        match reply_rx.try_recv() {
            Ok(reply) => Ok(reply),
            Err(_) if closed => Err(self.shared.disconnected()),
            Err(_) => {
                tracing::warn!(command, id, ?timeout, "QMP command timed out");
                Err(QmpError::Timeout {
                    command: command.into(),
                    after: timeout,
                })
            }
        }
    }

    fn write_line(&self, line: &[u8]) -> Result<(), QmpError> {
        let mut writer = self.writer.lock();
        let result = writer.write_all(line).and_then(|()| writer.flush());
        result.map_err(|err| match err.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected => self.shared.disconnected(),
            _ => QmpError::Io {
                path: self.shared.path.clone(),
                source: err,
            },
        })
    }

    /// Waits at most `timeout` for the event called `name` and returns it.
    ///
    /// This **consumes** events: every other event read from the queue while
    /// waiting is dropped (logged at debug level), so other readers of
    /// [`events`](Self::events) will not see it. Events that arrived before
    /// the call and are still queued count: an event already queued is
    /// returned at once.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(remaining) {
                Ok(event) if event.event == name => return Ok(event),
                Ok(event) => {
                    tracing::debug!(awaited = name, event = %event.event, data = %event.data, "dropping QMP event while waiting for another");
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(QmpError::Timeout {
                        command: format!("wait for event {name}"),
                        after: timeout,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.shared.disconnected()),
            }
        }
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        // Without a shutdown hook the reader thread may stay blocked on the
        // transport: the handle is dropped (detached) rather than hang here.
        if let (Some(shutdown), Some(handle)) = (&self.shutdown, self.reader.take()) {
            shutdown();
            if handle.join().is_err() {
                tracing::error!(path = %self.shared.path.display(), "QMP reader thread panicked");
            }
        }
    }
}

/// The line that runs `command` with optional `args` as request `id`.
fn command_line(command: &str, args: Option<Value>, id: u64) -> String {
    let mut message = Map::new();
    message.insert("execute".into(), Value::from(command));
    if let Some(args) = args {
        message.insert("arguments".into(), args);
    }
    message.insert("id".into(), Value::from(id));
    // A serialized JSON value never contains a raw newline.
    let mut line = Value::Object(message).to_string();
    line.push('\n');
    line
}

fn is_retryable_connect_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::testutil::{client_with, greeting_line, FakeQemu, TIMEOUT};
    use serde_json::json;

    #[test]
    fn client_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<QmpClient>();
        assert_send_sync::<QmpError>();
    }

    #[test]
    fn greeting_and_capabilities_negotiation() {
        let (client, server) = client_with(|mut qemu| {
            qemu.send_line(&greeting_line());
            let cmd = qemu.recv();
            assert_eq!(cmd["execute"], "qmp_capabilities");
            assert!(cmd.get("arguments").is_none(), "{cmd}");
            assert!(cmd["id"].is_u64(), "{cmd}");
            qemu.reply(&cmd, json!({}));
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        assert_eq!(client.qemu_version(), Some((9, 2, 0)));
        assert_eq!(client.greeting()["capabilities"], json!(["oob"]));
        assert!(client.is_connected());
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn greeting_that_is_not_json_is_malformed() {
        let (client, server) = client_with(|mut qemu| {
            qemu.send_line("Welcome to the QEMU monitor (HMP)");
            qemu.expect_eof();
        });
        match client {
            Err(QmpError::Malformed { line, reason, .. }) => {
                assert!(line.contains("HMP"), "{line}");
                assert!(reason.contains("not JSON"), "{reason}");
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
        server.join().expect("fake QEMU");
    }

    #[test]
    fn greeting_that_is_an_event_is_malformed() {
        let (client, server) = client_with(|mut qemu| {
            qemu.send_line(r#"{"event":"STOP","timestamp":{"seconds":1,"microseconds":2}}"#);
            qemu.expect_eof();
        });
        assert!(
            matches!(client, Err(QmpError::Malformed { ref reason, .. }) if reason.contains("greeting")),
            "{client:?}"
        );
        server.join().expect("fake QEMU");
    }

    #[test]
    fn capabilities_refused_fails_connect() {
        let (client, server) = client_with(|mut qemu| {
            qemu.send_line(&greeting_line());
            let cmd = qemu.recv();
            qemu.error(&cmd, "CommandNotFound", "nope");
            qemu.expect_eof();
        });
        assert!(
            matches!(client, Err(QmpError::Command { ref command, .. }) if command == "qmp_capabilities"),
            "{client:?}"
        );
        server.join().expect("fake QEMU");
    }

    #[test]
    fn silent_server_gives_greeting_timeout() {
        // Like a QEMU whose monitor is busy with another client: the
        // connection is accepted but no greeting ever comes.
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let result = QmpClient::over(ours, Duration::from_millis(100));
        assert!(
            matches!(result, Err(QmpError::Timeout { ref command, .. }) if command == "greeting"),
            "{result:?}"
        );
        drop(theirs);
    }

    #[test]
    fn command_success_returns_the_return_value() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            assert_eq!(cmd["execute"], "query-status");
            assert!(cmd.get("arguments").is_none());
            qemu.reply(&cmd, json!({"status": "running", "running": true}));
            let cmd = qemu.recv();
            assert_eq!(cmd["execute"], "human-monitor-command");
            assert_eq!(cmd["arguments"], json!({"command-line": "info version"}));
            qemu.reply(&cmd, json!("9.2.0\r\n"));
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        let status = client.execute("query-status", None).expect("query-status");
        assert_eq!(status, json!({"status": "running", "running": true}));
        let version = client
            .execute(
                "human-monitor-command",
                Some(json!({"command-line": "info version"})),
            )
            .expect("hmp");
        assert_eq!(version, json!("9.2.0\r\n"));
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn error_reply_gives_command_error() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            qemu.error(
                &cmd,
                "GenericError",
                "There's a migration process in progress",
            );
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        match client.execute("migrate", Some(json!({"uri": "tcp:h:1"}))) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "migrate");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "There's a migration process in progress");
            }
            other => panic!("expected Command error, got {other:?}"),
        }
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn out_of_order_replies_are_routed_by_id() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            // Wait for both commands, then answer the second one first.
            let first = qemu.recv();
            let second = qemu.recv();
            assert_ne!(first["id"], second["id"]);
            for cmd in [&second, &first] {
                let name = cmd["execute"].clone();
                qemu.reply(cmd, json!({ "answer_to": name }));
            }
            qemu.expect_eof();
        });
        let client = Arc::new(client.expect("handshake"));
        let callers: Vec<_> = ["query-a", "query-b"]
            .into_iter()
            .map(|name| {
                let client = Arc::clone(&client);
                thread::spawn(move || (name, client.execute(name, None)))
            })
            .collect();
        for caller in callers {
            let (name, result) = caller.join().expect("caller thread");
            assert_eq!(result.expect("reply"), json!({ "answer_to": name }));
        }
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn event_before_reply_is_delivered_and_reply_still_arrives() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            qemu.send_line(
                r#"{"event":"MIGRATION","data":{"status":"active"},"timestamp":{"seconds":1432121972,"microseconds":744001}}"#,
            );
            qemu.send_line(r#"{"event":"STOP","timestamp":{"seconds":1,"microseconds":5}}"#);
            qemu.reply(&cmd, json!({"status": "active"}));
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        let events = client.events();
        let reply = client.execute("query-migrate", None).expect("reply");
        assert_eq!(reply, json!({"status": "active"}));

        let event = events.recv_timeout(TIMEOUT).expect("MIGRATION event");
        assert_eq!(
            event,
            QmpEvent {
                event: "MIGRATION".into(),
                data: json!({"status": "active"}),
                timestamp_us: 1_432_121_972_744_001,
            }
        );
        let event = events.recv_timeout(TIMEOUT).expect("STOP event");
        assert_eq!(event.event, "STOP");
        assert_eq!(
            event.data,
            json!({}),
            "missing data becomes an empty object"
        );
        assert_eq!(event.timestamp_us, 1_000_005);
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn malformed_lines_are_skipped_and_the_next_reply_arrives() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            qemu.send_line("this is not JSON");
            qemu.send_line("[1, 2, 3]");
            qemu.send_line(r#"{"unexpected": true}"#);
            qemu.send_line(r#"{"return": {}, "id": 424242}"#);
            qemu.send_line(r#"{"return": {}}"#);
            qemu.send_line("");
            qemu.send_raw(&[0xff, 0xfe, b'\n']);
            qemu.reply(&cmd, json!(1));
            let cmd = qemu.recv();
            qemu.send_line("{\"truncated\": ");
            qemu.reply(&cmd, json!(2));
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        assert_eq!(client.execute("first", None).expect("first"), json!(1));
        assert_eq!(client.execute("second", None).expect("second"), json!(2));
        assert!(client.is_connected());
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn server_closing_mid_command_gives_disconnected() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            assert_eq!(cmd["execute"], "migrate");
            // QEMU crashes: the connection closes without a reply.
        });
        let client = client.expect("handshake");
        let events = client.events();
        let result = client.execute_with_timeout("migrate", Some(json!({"uri": "x"})), TIMEOUT);
        assert!(
            matches!(result, Err(QmpError::Disconnected { .. })),
            "{result:?}"
        );
        server.join().expect("fake QEMU");

        let later = client.execute("query-status", None);
        assert!(
            matches!(later, Err(QmpError::Disconnected { .. })),
            "{later:?}"
        );
        assert!(!client.is_connected());
        assert!(
            events.recv_timeout(TIMEOUT).is_err(),
            "events channel must be closed"
        );
        let waited = client.wait_event("MIGRATION", TIMEOUT);
        assert!(
            matches!(waited, Err(QmpError::Disconnected { .. })),
            "{waited:?}"
        );
    }

    #[test]
    fn server_that_never_replies_gives_timeout_and_late_reply_is_ignored() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let slow = qemu.recv();
            assert_eq!(slow["execute"], "slow");
            // The client gives up and sends the next command; only then
            // does the late reply arrive, followed by the next one's.
            let next = qemu.recv();
            qemu.reply(&slow, json!("late"));
            qemu.reply(&next, json!("on time"));
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        let wait = Duration::from_millis(50);
        match client.execute_with_timeout("slow", None, wait) {
            Err(QmpError::Timeout { command, after }) => {
                assert_eq!(command, "slow");
                assert_eq!(after, wait);
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert_eq!(
            client.execute("next", None).expect("next"),
            json!("on time")
        );
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn default_timeout_is_settable() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let _ignored = qemu.recv();
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        assert_eq!(client.timeout(), TIMEOUT);
        client.set_timeout(Duration::from_millis(30));
        let result = client.execute("ignored", None);
        assert!(
            matches!(result, Err(QmpError::Timeout { after, .. }) if after == Duration::from_millis(30)),
            "{result:?}"
        );
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn wait_event_skips_other_events() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            qemu.send_line(r#"{"event":"MIGRATION_PASS","data":{"pass":1},"timestamp":{"seconds":1,"microseconds":0}}"#);
            qemu.send_line(r#"{"event":"MIGRATION","data":{"status":"completed"},"timestamp":{"seconds":2,"microseconds":0}}"#);
            qemu.send_line(r#"{"event":"STOP","timestamp":{"seconds":3,"microseconds":0}}"#);
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        let event = client.wait_event("MIGRATION", TIMEOUT).expect("MIGRATION");
        assert_eq!(event.data["status"], "completed");
        // MIGRATION_PASS was consumed; STOP is still queued.
        let next = client.events().recv_timeout(TIMEOUT).expect("STOP");
        assert_eq!(next.event, "STOP");
        let missing = client.wait_event("RESUME", Duration::from_millis(20));
        assert!(
            matches!(missing, Err(QmpError::Timeout { ref command, .. }) if command.contains("RESUME")),
            "{missing:?}"
        );
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn full_event_queue_drops_the_oldest_events() {
        const EXTRA: usize = 10;
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            for pass in 0..EVENT_QUEUE_CAPACITY + EXTRA {
                qemu.send_line(
                    &json!({"event": "MIGRATION_PASS", "data": {"pass": pass},
                            "timestamp": {"seconds": 0, "microseconds": 0}})
                    .to_string(),
                );
            }
            // Replies are read in order: once this one is routed, every
            // event above has been queued (or dropped).
            qemu.reply(&cmd, json!({}));
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        client.execute("sync", None).expect("sync");
        let passes: Vec<u64> = client
            .events()
            .try_iter()
            .map(|event| event.data["pass"].as_u64().expect("pass number"))
            .collect();
        assert_eq!(passes.len(), EVENT_QUEUE_CAPACITY);
        assert_eq!(passes.first(), Some(&(EXTRA as u64)));
        assert_eq!(
            passes.last(),
            Some(&((EVENT_QUEUE_CAPACITY + EXTRA - 1) as u64))
        );
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn execute_as_reports_wrong_shapes() {
        #[derive(Debug, serde::Deserialize)]
        struct Status {
            #[allow(dead_code)]
            running: bool,
        }
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            qemu.reply(&cmd, json!({"running": "yes"}));
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        let result = client.execute_as::<Status>("query-status", None);
        assert!(
            matches!(result, Err(QmpError::Malformed { ref reason, .. }) if reason.contains("query-status")),
            "{result:?}"
        );
        drop(client);
        server.join().expect("fake QEMU");
    }

    #[test]
    fn connect_to_missing_socket_fails_with_connect_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.sock");
        let started = Instant::now();
        let result = QmpClient::connect(&path, Duration::from_millis(100));
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "must retry until the timeout"
        );
        match result {
            Err(err @ QmpError::Connect { .. }) => {
                let msg = err.to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
                assert!(msg.contains("server=on,wait=off"), "{msg}");
            }
            other => panic!("expected Connect error, got {other:?}"),
        }
    }

    #[test]
    fn connect_retries_until_qemu_listens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let server_path = path.clone();
        let server = thread::spawn(move || {
            // Not synchronisation: QEMU "starts" a little after the client
            // begins trying. The test passes whatever the interleaving.
            thread::sleep(Duration::from_millis(50));
            let listener = std::os::unix::net::UnixListener::bind(&server_path).expect("bind");
            let (stream, _) = listener.accept().expect("accept");
            let mut qemu = FakeQemu::new(stream);
            qemu.handshake();
            let cmd = qemu.recv();
            qemu.reply(&cmd, json!("ok"));
            qemu.expect_eof();
        });
        let client = QmpClient::connect(&path, TIMEOUT).expect("connect");
        assert_eq!(client.path(), path);
        assert_eq!(client.execute("ping", None).expect("ping"), json!("ok"));
        drop(client);
        server.join().expect("fake QEMU");
    }
}
