//! The companion's control socket: JSON lines over a UNIX socket (mode 0600).
//!
//! Each request is one JSON object with a `cmd` field; each reply is one JSON object with
//! `"ok": true` and the result's fields, or `"ok": false` and an `error` that says what went
//! wrong. A malformed request gets an error reply and the connection stays open.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::generator::{GeneratorConfig, Window};

/// Longest range `read` returns, in bytes.
pub const MAX_READ: u64 = 1 << 20;

/// A request to the companion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Who the companion is and what state its device is in.
    Status,
    /// Counters: device writes, bytes, device-dirty pages of this migration, log, quiesce.
    Stats,
    /// Start the traffic generator.
    GeneratorStart(GeneratorConfig),
    /// Stop the traffic generator (its ledger stays).
    GeneratorStop,
    /// The generator's ledger: the last version of each record that landed.
    Ledger,
    /// Read every record slot of a window and report what each holds.
    Scan {
        /// The window to read.
        window: Window,
    },
    /// Read guest RAM (hex), at most [`MAX_READ`] bytes.
    Read {
        /// First guest-physical address.
        gpa: u64,
        /// Bytes to read.
        len: u64,
    },
    /// Write guest RAM as the device would (hex bytes).
    Write {
        /// First guest-physical address.
        gpa: u64,
        /// The bytes, hex-encoded.
        hex: String,
    },
    /// Take the soft VF's state for the destination (after the switchover quiesce): regions,
    /// QPs, pending requests, completions, and frames still waiting for the guest.
    VfExport,
    /// Take over a migrated VM's soft VF state and announce the VM's new place to its peers.
    VfImport {
        /// The state, as `vf_export` gave it.
        vf: crate::vf::soft::VfState,
        /// Frames that waited for the guest at the source, hex-encoded.
        rx_frames: Vec<String>,
    },
    /// Tell the guest's runtime a migration event (`suspend` or `resume`), for the cooperative
    /// strategy; its acknowledgement shows in `stats` (`guest_link.suspend_acks`).
    SendEvent {
        /// `suspend` or `resume`.
        event: GuestEvent,
    },
    /// Switch dirty tracking of device writes on or off (off: `unsafe-no-tracking` only).
    SetTracking {
        /// On or off.
        enabled: bool,
    },
    /// Stop the companion.
    Quit,
}

/// Migration events for the guest's runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestEvent {
    /// Stop communicating and report ready (the paper's migration-thread design).
    Suspend,
    /// Communicate again.
    Resume,
}

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    /// The reply's fields on success, or the error message.
    fn handle(&self, request: Request) -> Result<Value, String>;
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached.
    #[error("cannot connect to companion control socket {path}: {source} (is `vfmig companion` running?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("companion control socket {path}: {source}")]
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
    /// The reply was not what the protocol says.
    #[error("companion at {path} sent a malformed reply: {reason}")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
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

/// Serves the control socket at `path` on a background thread.
pub fn serve(path: &Path, handler: std::sync::Arc<dyn Handler>) -> std::io::Result<()> {
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

fn serve_connection(stream: UnixStream, handler: &dyn Handler) {
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
                match handler.handle(request) {
                    Ok(mut fields) => {
                        if let Value::Object(map) = &mut fields {
                            map.insert("ok".into(), Value::Bool(true));
                            fields
                        } else {
                            json!({"ok": true, "result": fields})
                        }
                    }
                    Err(message) => json!({"ok": false, "error": message}),
                }
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

    /// Sends one request and returns the reply's fields (`ok` removed).
    pub fn call(&mut self, request: &Request) -> Result<Value, ControlError> {
        let text = serde_json::to_string(request).map_err(|e| ControlError::Malformed {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        self.call_raw(&text, &command_name(request))
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
            serde_json::from_str(&reply).map_err(|e| ControlError::Malformed {
                path: self.path.clone(),
                reason: format!("{e}: {}", reply.chars().take(200).collect::<String>()),
            })?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| ControlError::Malformed {
                path: self.path.clone(),
                reason: "reply is not a JSON object".into(),
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
                reason: "reply has no boolean \"ok\"".into(),
            }),
        }
    }

    /// Sends a request and decodes the reply into `T`.
    pub fn call_as<T: serde::de::DeserializeOwned>(
        &mut self,
        request: &Request,
    ) -> Result<T, ControlError> {
        let value = self.call(request)?;
        serde_json::from_value(value).map_err(|e| ControlError::Malformed {
            path: self.path.clone(),
            reason: format!("reply to `{}`: {e}", command_name(request)),
        })
    }
}

fn command_name(request: &Request) -> String {
    serde_json::to_value(request)
        .ok()
        .and_then(|v| v.get("cmd").and_then(Value::as_str).map(String::from))
        .unwrap_or_default()
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a hex string.
pub fn from_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.is_ascii() {
        return Err("hex string has non-ASCII characters".into());
    }
    if hex.len() % 2 != 0 {
        return Err("hex string has an odd number of digits".into());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|_| format!("not a hex byte at offset {i}: {:?}", &hex[i..i + 2]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, request: Request) -> Result<Value, String> {
            match request {
                Request::Status => Ok(json!({"name": "vm"})),
                Request::Read { len, .. } if len > MAX_READ => Err("too long".into()),
                _ => Err("unsupported".into()),
            }
        }
    }

    #[test]
    fn requests_parse_from_their_documented_form() {
        let r: Request = serde_json::from_str(r#"{"cmd":"read","gpa":4096,"len":8}"#).unwrap();
        assert_eq!(r, Request::Read { gpa: 4096, len: 8 });
        let r: Request = serde_json::from_str(
            r#"{"cmd":"generator_start","window":{"gpa":1,"slots":2,"stride":4096,"record_size":64},"rate":10}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::GeneratorStart(_)));
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"read","gpa":1,"len":2,"x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"read","gpa":"one","len":2}"#).is_err());
    }

    #[test]
    fn malformed_requests_get_an_error_reply_and_the_connection_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        serve(&path, Arc::new(Echo)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut c = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
        for bad in ["not json", "{\"cmd\":\"explode\"}", "[1,2]", "{\"gpa\":1}"] {
            match c.call_raw(bad, "?") {
                Err(ControlError::Refused { message, .. }) => {
                    assert!(message.contains("malformed request"), "{message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let v = c.call(&Request::Status).unwrap();
        assert_eq!(v["name"], "vm");
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
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(
            from_hex(&to_hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }
}
