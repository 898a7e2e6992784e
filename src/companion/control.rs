//! The companion's control socket: JSON lines over a UNIX socket (mode 0600).
//!
//! Each request is one JSON object with a `cmd` field; each reply is one JSON object with
//! `"ok": true` and the result's fields, or `"ok": false` and an `error` that says what went
//! wrong. A malformed request gets an error reply and the connection stays open.
//!
//! The requests and their replies are in [`protocol`]; the companion's side is a [`Handler`]
//! and [`serve`], the orchestrator's a [`ControlClient`] with one typed method per request.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::generator::{GeneratorConfig, Window};

pub mod protocol;

pub use protocol::{
    from_hex, to_hex, GeneratorStartReply, GeneratorStopReply, GuestEvent, HexError, LedgerReply,
    QuitReply, ReadReply, Reply, Request, ScanReply, SendEventReply, SetTrackingReply, StatsReply,
    StatusReply, VfExportReply, VfImportReply, VfReclaimReply, VfReleaseReply, WriteReply,
    MAX_READ,
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

/// Serves the control socket at `path` on a background thread.
pub fn serve<H: Handler>(path: &Path, handler: Arc<H>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("vfmig-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let handler = handler.clone();
                        let _ = std::thread::Builder::new()
                            .name("vfmig-control-conn".into())
                            .spawn(move || serve_connection(stream, &*handler));
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                }
            }
        })?;
    Ok(())
}

fn serve_connection<H: Handler>(stream: UnixStream, handler: &H) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { return };
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
        let mut text = reply.to_string();
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
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
}
