//! A scripted fake QEMU for the unit tests: one end of a
//! [`UnixStream::pair`], driven by a test thread.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{json, Value};

use super::{QmpClient, QmpError};

/// Default timeout in tests: long enough never to fire on a slow machine,
/// short enough that a broken test fails instead of hanging.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// The greeting of a QEMU 9.2.0.
pub(crate) fn greeting_line() -> String {
    json!({"QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 9}, "package": "v9.2.0"},
        "capabilities": ["oob"]
    }})
    .to_string()
}

/// QEMU's side of the connection.
pub(crate) struct FakeQemu {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl FakeQemu {
    pub(crate) fn new(stream: UnixStream) -> Self {
        let writer = stream.try_clone().expect("clone fake QEMU stream");
        FakeQemu {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Sends `line` and a newline.
    pub(crate) fn send_line(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    pub(crate) fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("fake QEMU write");
    }

    /// Reads the next command the client sent.
    pub(crate) fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("fake QEMU read");
        assert!(
            n > 0,
            "client closed the connection instead of sending a command"
        );
        serde_json::from_str(&line).expect("client sent invalid JSON")
    }

    /// Waits until the client closes the connection.
    pub(crate) fn expect_eof(&mut self) {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("fake QEMU read");
        assert_eq!(n, 0, "unexpected message from client: {line}");
    }

    /// Replies to `cmd` with `value`.
    pub(crate) fn reply(&mut self, cmd: &Value, value: Value) {
        self.send_line(&json!({"return": value, "id": cmd["id"]}).to_string());
    }

    /// Replies to `cmd` with an error.
    pub(crate) fn error(&mut self, cmd: &Value, class: &str, desc: &str) {
        let reply = json!({"error": {"class": class, "desc": desc}, "id": cmd["id"]});
        self.send_line(&reply.to_string());
    }

    /// Sends the greeting and accepts capabilities negotiation.
    pub(crate) fn handshake(&mut self) {
        self.send_line(&greeting_line());
        let cmd = self.recv();
        assert_eq!(cmd["execute"], "qmp_capabilities");
        self.reply(&cmd, json!({}));
    }
}

/// Runs `script` as QEMU in a thread and connects a client to it (with
/// [`TIMEOUT`]). Join the returned handle to surface the script's failed
/// assertions; drop the client first if the script ends with
/// [`FakeQemu::expect_eof`].
pub(crate) fn client_with(
    script: impl FnOnce(FakeQemu) + Send + 'static,
) -> (Result<QmpClient, QmpError>, JoinHandle<()>) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let server = thread::spawn(move || script(FakeQemu::new(theirs)));
    (QmpClient::over(ours, TIMEOUT), server)
}
