//! The companion's control socket: JSON lines over a UNIX socket (mode 0600).
//!
//! Each request is one JSON object with a `cmd` field; each reply is one JSON object with
//! `"ok": true` and the result's fields, or `"ok": false` and an `error` that says what went
//! wrong. A malformed request gets an error reply and the connection stays open.
//!
//! The requests and their replies are in [`protocol`]; the companion's side is a [`Handler`]
//! and [`serve`], the orchestrator's a [`ControlClient`] with one typed method per request.

use std::error::Error;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::generator::{GeneratorConfig, Window};

pub mod protocol;

pub use protocol::{
    from_hex, to_hex, GeneratorStartReply, GeneratorStopReply, GuestEvent, HexError, LedgerReply,
    QuitReply, ReadReply, Reply, Request, ScanReply, SendEventReply, SetThrottleReply,
    SetTrackingReply, StatsReply, StatusReply, StepsReply, VfExportReply, VfImportReply,
    VfReclaimReply, VfReleaseReply, WriteReply, MAX_READ,
};

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    /// Why a request failed; the reply's `error` is its message and its causes'.
    type Error: Error;

    /// The reply to `request`.
    fn handle(&self, request: Request) -> Result<Reply, Self::Error>;
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached.
    #[error("cannot connect to companion control socket {path} (is `vfmig companion` running?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("the connection to companion control socket {path} failed mid-request")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The companion closed the connection without replying.
    #[error("companion at {path} closed the connection without replying (did it exit?)")]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The request could not be put into JSON (a bug: every request can).
    #[error("request `{cmd}` cannot be encoded as JSON")]
    Encode {
        /// The request's command.
        cmd: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The reply line is not JSON.
    #[error("companion at {path} sent a reply that is not JSON: {line:?}")]
    NotJson {
        /// The socket.
        path: PathBuf,
        /// The reply's first 200 characters.
        line: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The reply is JSON but not what the protocol says every reply is.
    #[error("companion at {path} sent a malformed reply: {reason}")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        reason: &'static str,
    },
    /// The reply's fields are not the request's reply (a field missing, renamed or of
    /// another type): the companion speaks another version of the protocol.
    #[error(
        "companion at {path} answered `{cmd}` with fields this vfmig cannot read; run the same \
         vfmig release on both sides"
    )]
    Reply {
        /// The socket.
        path: PathBuf,
        /// The request's command.
        cmd: &'static str,
        /// Which field, and what was wrong with it.
        #[source]
        source: serde_json::Error,
    },
    /// The companion refused the request.
    #[error("companion at {path} refused `{cmd}`: {message}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The request's command.
        cmd: String,
        /// The companion's message.
        message: String,
    },
}

pub use crate::errors::chain as error_chain;

/// Binds a UNIX socket at `path` (replacing a stale one) that only its owner can connect to,
/// whatever the umask: the socket is created under a umask of 0177, so there is no moment at
/// which others could connect, and then set to 0600 explicitly.
///
/// The umask is process-wide: a file another thread creates during the bind gets no group or
/// other permissions, never more.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use nix::sys::stat::{umask, Mode};
    let _ = std::fs::remove_file(path);
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Longest request line the companion reads (a `vf_import` state of many regions and QPs,
/// or a `write` of [`MAX_READ`] bytes in hex, fits many times over): a longer line is refused
/// and its connection closed, without reading it whole.
pub const MAX_LINE: usize = 16 << 20;
/// Most control connections served at once; one more gets an error reply and is closed.
pub const MAX_CONNECTIONS: usize = 16;

/// Serves the control socket at `path` on a background thread.
pub fn serve<H: Handler>(path: &Path, handler: Arc<H>) -> std::io::Result<()> {
    let listener = bind_private(path)?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("vfmig-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                            open.fetch_sub(1, Ordering::SeqCst);
                            tracing::warn!(
                                limit = MAX_CONNECTIONS,
                                "control connection refused: too many open"
                            );
                            let _ = send_line(
                                &stream,
                                &json!({"ok": false, "error": format!(
                                    "the companion already serves {MAX_CONNECTIONS} control \
                                     connections; close one and retry")}),
                            );
                            continue;
                        }
                        let handler = handler.clone();
                        let spawned = std::thread::Builder::new()
                            .name("vfmig-control-conn".into())
                            .spawn({
                                let open = open.clone();
                                move || {
                                    serve_connection(stream, &*handler);
                                    open.fetch_sub(1, Ordering::SeqCst);
                                }
                            });
                        if let Err(e) = spawned {
                            open.fetch_sub(1, Ordering::SeqCst);
                            tracing::warn!(error = %e, "cannot start a control connection's thread");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                }
            }
        })?;
    Ok(())
}

/// Writes `reply` as one line.
fn send_line(mut stream: &UnixStream, reply: &Value) -> std::io::Result<()> {
    let mut text = reply.to_string();
    text.push('\n');
    stream.write_all(text.as_bytes())
}

/// Reads the next line into `buf` (without its newline), reading at most [`MAX_LINE`] bytes
/// of it: `Ok(false)` at the end of the stream, an error of kind `InvalidData` for a longer
/// line.
fn read_line_capped(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    buf.clear();
    let n = Read::take(reader, MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a request line longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(true)
}

fn serve_connection<H: Handler>(stream: UnixStream, handler: &H) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        match read_line_capped(&mut reader, &mut buf) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(
                    limit = MAX_LINE,
                    "control request line too long: connection closed"
                );
                let _ = send_line(
                    &writer,
                    &json!({"ok": false, "error": format!(
                        "request line longer than {MAX_LINE} bytes: refused, and the connection \
                         closed; send one JSON object per line")}),
                );
                return;
            }
            Err(_) => return,
        }
        let line = String::from_utf8_lossy(&buf);
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                tracing::debug!(?request, "control request");
                answer(handler, request)
            }
            Err(e) => {
                tracing::warn!(error = %e, "malformed control request");
                json!({"ok": false, "error": format!(
                    "malformed request ({e}); send one JSON object per line with a \"cmd\" field, \
                     e.g. {{\"cmd\":\"status\"}}")})
            }
        };
        if send_line(&writer, &reply).is_err() {
            return;
        }
    }
}

/// The reply line's object: the reply's fields and `"ok": true`, or `"ok": false` and the
/// error's message with its causes.
fn answer<H: Handler>(handler: &H, request: Request) -> Value {
    let cmd = request.cmd();
    let error = match handler.handle(request) {
        Ok(reply) if reply.cmd() != cmd => format!(
            "the companion answered `{cmd}` with the reply to `{}` (a bug in vfmig)",
            reply.cmd()
        ),
        Ok(reply) => match serde_json::to_value(&reply) {
            Ok(Value::Object(mut fields)) => {
                fields.insert("ok".into(), Value::Bool(true));
                return Value::Object(fields);
            }
            Ok(_) => format!("the reply to `{cmd}` is not a JSON object (a bug in vfmig)"),
            Err(e) => format!("the reply to `{cmd}` cannot be encoded as JSON: {e}"),
        },
        Err(e) => error_chain(&e),
    };
    json!({"ok": false, "error": error})
}

/// A client of a companion's control socket.
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects, retrying until `timeout` while the companion starts.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ControlError> {
        let deadline = std::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(ControlError::Connect {
                        path: path.into(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let io = |source| ControlError::Io {
            path: path.into(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Self {
            path: path.into(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request and returns the reply's fields (`ok` removed), as JSON: for callers
    /// that print the reply (`vfmig ctl`); the others read it typed, with [`Self::call_as`] or
    /// the method named after the request.
    pub fn call(&mut self, request: &Request) -> Result<Value, ControlError> {
        let text = serde_json::to_string(request).map_err(|source| ControlError::Encode {
            cmd: request.cmd(),
            source,
        })?;
        self.call_raw(&text, request.cmd())
    }

    /// Sends a raw line (for tests of malformed input) and returns the reply's fields.
    pub fn call_raw(&mut self, line: &str, cmd: &str) -> Result<Value, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(io)?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ControlError::Closed {
                path: self.path.clone(),
            });
        }
        let mut value: Value =
            serde_json::from_str(&reply).map_err(|source| ControlError::NotJson {
                path: self.path.clone(),
                line: reply.trim_end().chars().take(200).collect(),
                source,
            })?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| ControlError::Malformed {
                path: self.path.clone(),
                reason: "reply is not a JSON object",
            })?;
        match map.remove("ok") {
            Some(Value::Bool(true)) => Ok(value),
            Some(Value::Bool(false)) => Err(ControlError::Refused {
                path: self.path.clone(),
                cmd: cmd.into(),
                message: map
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
                    .into(),
            }),
            _ => Err(ControlError::Malformed {
                path: self.path.clone(),
                reason: "reply has no boolean \"ok\"",
            }),
        }
    }

    /// Sends a request and reads the reply as `T`, the request's reply struct; a reply whose
    /// fields are not `T`'s is [`ControlError::Reply`], naming the request and the field.
    pub fn call_as<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ControlError> {
        let value = self.call(request)?;
        serde_json::from_value(value).map_err(|source| ControlError::Reply {
            path: self.path.clone(),
            cmd: request.cmd(),
            source,
        })
    }

    /// `status`: who the companion is and what state its device is in.
    pub fn status(&mut self) -> Result<StatusReply, ControlError> {
        self.call_as(&Request::Status)
    }

    /// `stats`: the companion's counters.
    pub fn stats(&mut self) -> Result<StatsReply, ControlError> {
        self.call_as(&Request::Stats)
    }

    /// `generator_start`: starts the traffic generator (a running one is stopped first).
    pub fn generator_start(
        &mut self,
        config: GeneratorConfig,
    ) -> Result<GeneratorStartReply, ControlError> {
        self.call_as(&Request::GeneratorStart(config))
    }

    /// `generator_stop`: stops the traffic generator; its ledger stays.
    pub fn generator_stop(&mut self) -> Result<GeneratorStopReply, ControlError> {
        self.call_as(&Request::GeneratorStop)
    }

    /// `ledger`: the last version of each record that landed.
    pub fn ledger(&mut self) -> Result<LedgerReply, ControlError> {
        self.call_as(&Request::Ledger)
    }

    /// `scan`: what each record slot of `window` holds.
    pub fn scan(&mut self, window: Window) -> Result<ScanReply, ControlError> {
        self.call_as(&Request::Scan { window })
    }

    /// `read`: `len` bytes of guest RAM at `gpa` (at most [`MAX_READ`]).
    pub fn read(&mut self, gpa: u64, len: u64) -> Result<ReadReply, ControlError> {
        self.call_as(&Request::Read { gpa, len })
    }

    /// `write`: `bytes` into guest RAM at `gpa`, as the device would write them.
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<WriteReply, ControlError> {
        self.call_as(&Request::Write {
            gpa,
            hex: to_hex(bytes),
        })
    }

    /// `vf_export`: the soft VF's state, after the switchover quiesce.
    pub fn vf_export(&mut self) -> Result<VfExportReply, ControlError> {
        self.call_as(&Request::VfExport)
    }

    /// `vf_import`: hands a migrated VM's soft VF state to this companion.
    pub fn vf_import(
        &mut self,
        vf: crate::vf::soft::VfState,
        rx_frames: Vec<String>,
    ) -> Result<VfImportReply, ControlError> {
        self.call_as(&Request::VfImport { vf, rx_frames })
    }

    /// `steps`: what this companion did around its last switchovers, for the trace.
    pub fn steps(&mut self) -> Result<StepsReply, ControlError> {
        self.call_as(&Request::Steps)
    }

    /// `vf_release`: this companion drops its soft VF state (the VM's VF lives elsewhere).
    pub fn vf_release(&mut self) -> Result<VfReleaseReply, ControlError> {
        self.call_as(&Request::VfRelease)
    }

    /// `vf_reclaim`: the source takes back the soft VF state it exported.
    pub fn vf_reclaim(&mut self) -> Result<VfReclaimReply, ControlError> {
        self.call_as(&Request::VfReclaim)
    }

    /// `send_event`: tells the guest's runtime a migration event.
    pub fn send_event(&mut self, event: GuestEvent) -> Result<SendEventReply, ControlError> {
        self.call_as(&Request::SendEvent { event })
    }

    /// `set_tracking`: switches dirty tracking of device writes on or off.
    pub fn set_tracking(&mut self, enabled: bool) -> Result<SetTrackingReply, ControlError> {
        self.call_as(&Request::SetTracking { enabled })
    }

    /// `set_throttle`: the device-throttle policy and the migration bandwidth it assumes.
    pub fn set_throttle(
        &mut self,
        policy: crate::companion::converge::DeviceThrottle,
        bandwidth: u64,
    ) -> Result<SetThrottleReply, ControlError> {
        self.call_as(&Request::SetThrottle { policy, bandwidth })
    }

    /// `quit`: stops the companion.
    pub fn quit(&mut self) -> Result<QuitReply, ControlError> {
        self.call_as(&Request::Quit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum EchoError {
        #[error("too long")]
        TooLong,
        #[error("unsupported")]
        Unsupported(#[source] std::io::Error),
    }

    struct Echo;
    impl Handler for Echo {
        type Error = EchoError;

        fn handle(&self, request: Request) -> Result<Reply, EchoError> {
            match request {
                Request::Read { len, .. } if len > MAX_READ => Err(EchoError::TooLong),
                Request::Read { len, .. } => Ok(ReadReply {
                    hex: to_hex(&vec![0xab; len as usize]),
                }
                .into()),
                Request::SetTracking { .. } => Ok(ScanReply { slots: vec![] }.into()),
                _ => Err(EchoError::Unsupported(std::io::Error::other(
                    "nothing here answers it",
                ))),
            }
        }
    }

    fn echo_client(dir: &tempfile::TempDir) -> ControlClient {
        let path = dir.path().join("control.sock");
        serve(&path, Arc::new(Echo)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        ControlClient::connect(&path, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn malformed_requests_get_an_error_reply_and_the_connection_survives() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = echo_client(&dir);
        for bad in ["not json", "{\"cmd\":\"explode\"}", "[1,2]", "{\"gpa\":1}"] {
            match c.call_raw(bad, "?") {
                Err(ControlError::Refused { message, .. }) => {
                    assert!(message.contains("malformed request"), "{message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let v = c.call(&Request::Read { gpa: 0, len: 2 }).unwrap();
        assert_eq!(v["hex"], "abab");
        match c.call(&Request::Read {
            gpa: 0,
            len: MAX_READ + 1,
        }) {
            Err(ControlError::Refused { message, cmd, .. }) => {
                assert_eq!(message, "too long");
                assert_eq!(cmd, "read");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refusal_carries_the_error_and_its_causes_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = echo_client(&dir);
        match c.status() {
            Err(ControlError::Refused { message, cmd, .. }) => {
                assert_eq!(message, "unsupported: nothing here answers it");
                assert_eq!(cmd, "status");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn typed_calls_read_their_reply_and_name_the_request_when_it_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = echo_client(&dir);
        assert_eq!(c.read(0, 3).unwrap().hex, "ababab");
        // A `read` reply read as another request's reply: the client names the request and
        // the field it missed.
        match c.call_as::<SetTrackingReply>(&Request::Read { gpa: 0, len: 1 }) {
            Err(e @ ControlError::Reply { cmd, .. }) => {
                assert_eq!(cmd, "read");
                let text = error_chain(&e);
                assert!(text.contains("missing field `tracking`"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        // A handler that answers with another request's reply is refused on the server.
        match c.set_tracking(true) {
            Err(ControlError::Refused { message, .. }) => {
                assert!(message.contains("with the reply to `scan`"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // The connection still serves.
        assert_eq!(c.read(0, 1).unwrap().hex, "ab");
    }

    #[test]
    fn a_line_over_the_cap_is_refused_and_its_connection_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = echo_client(&dir);
        let path = dir.path().join("control.sock");
        let stream = UnixStream::connect(&path).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let flood = std::thread::spawn(move || {
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..(MAX_LINE >> 20) + 4 {
                if writer.write_all(&chunk).is_err() {
                    return;
                }
            }
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        let mut reader = BufReader::new(stream);
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        assert!(reply.contains("longer than"), "{reply}");
        reply.clear();
        // The connection closes (reset: the rest of the line was never read).
        match reader.read_line(&mut reply) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the connection stays open: {other:?} {reply:?}"),
        }
        flood.join().unwrap();
        // Other connections are served as before.
        assert_eq!(
            c.call(&Request::Read { gpa: 0, len: 1 }).unwrap()["hex"],
            "ab"
        );
    }

    #[test]
    fn connections_over_the_cap_are_refused_until_one_closes() {
        let dir = tempfile::tempdir().unwrap();
        let mut open = vec![echo_client(&dir)];
        let path = dir.path().join("control.sock");
        for _ in 1..MAX_CONNECTIONS {
            let mut c = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
            c.call(&Request::Read { gpa: 0, len: 1 }).unwrap();
            open.push(c);
        }
        // One more is told why and closed, before it sends anything.
        let mut extra = BufReader::new(UnixStream::connect(&path).unwrap());
        let mut reply = String::new();
        extra.read_line(&mut reply).unwrap();
        assert!(reply.contains("close one and retry"), "{reply}");
        reply.clear();
        assert_eq!(extra.read_line(&mut reply).unwrap(), 0);
        drop(open.pop());
        // The closed connection's slot comes free once its thread has seen the end.
        let mut served = false;
        for _ in 0..100 {
            let mut c = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
            if c.call(&Request::Read { gpa: 0, len: 1 }).is_ok() {
                served = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(served, "a slot freed by a closed connection is used again");
    }
}
