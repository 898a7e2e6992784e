//! The error type of the QMP client.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// How many characters of an offending QMP line are kept in a
/// [`QmpError::Malformed`] (and in log messages).
pub const MAX_LINE_IN_MESSAGE: usize = 200;

/// Everything that can go wrong while talking to QEMU over QMP.
///
/// Every variant names the socket or the command it concerns, and its
/// message says what happened and what to look at next.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The UNIX socket could not be connected to (it never appeared, kept
    /// refusing connections until the timeout, or could not be opened).
    #[error(
        "cannot connect to QMP socket {}: is QEMU running with \
         -qmp unix:{},server=on,wait=off?",
        path.display(),
        path.display()
    )]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// The last error returned by `connect(2)`.
        #[source]
        source: io::Error,
    },

    /// The QMP socket was closed by the other end: QEMU exited or crashed.
    /// Every pending and every later command on this client fails with this.
    #[error(
        "QMP socket {} was closed: QEMU exited or crashed (check QEMU's \
         stderr/log); reconnect once it runs again",
        path.display()
    )]
    Disconnected {
        /// The socket that closed.
        path: PathBuf,
    },

    /// QEMU sent something that is not a QMP message: a line that is not
    /// JSON, JSON that is neither a reply, an event nor a greeting, or a
    /// reply whose id matches no request.
    #[error(
        "malformed QMP message ({reason}): {line:?}: is the socket really a \
         QEMU QMP monitor (not an HMP monitor or a serial console)?"
    )]
    Malformed {
        /// The offending line, cut to about [`MAX_LINE_IN_MESSAGE`] characters.
        line: String,
        /// Why it was rejected.
        reason: String,
        /// The JSON parser's error, when the line is not JSON or not of the expected shape.
        #[source]
        source: Option<serde_json::Error>,
    },

    /// QEMU answered the command with an error reply.
    #[error("QEMU rejected QMP command `{command}`: {class}: {desc}")]
    Command {
        /// The command that was rejected.
        command: String,
        /// QEMU's error class, e.g. `GenericError` or `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// No reply (or awaited event) arrived in time. The command may still
    /// complete inside QEMU later; its late reply is then ignored.
    #[error(
        "no answer to QMP `{command}` within {after:?}: QEMU may be hung or \
         busy, or another client may be holding its monitor; retry with a \
         longer timeout or check QEMU"
    )]
    Timeout {
        /// The command (or `greeting`, or the awaited event) that timed out.
        command: String,
        /// How long was waited.
        after: Duration,
    },

    /// Writing to (or setting up) the QMP socket failed for a reason other
    /// than the peer having closed it.
    #[error("I/O error on QMP socket {}: check that QEMU still runs", path.display())]
    Io {
        /// The socket concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A helper was given an argument that cannot be sent to QEMU, such as a
    /// file name that is not valid UTF-8. Nothing was sent.
    #[error("invalid argument for QMP command `{command}`: {reason}")]
    InvalidArgument {
        /// The command that was not sent.
        command: String,
        /// What is wrong with the argument.
        reason: String,
    },

    /// A file name for QEMU could not be made absolute (it is empty, or the working directory
    /// is gone). Nothing was sent.
    #[error(
        "cannot make {} absolute for QMP command `{command}`: give an absolute path",
        path.display()
    )]
    RelativePath {
        /// The command that was not sent.
        command: String,
        /// The path as given.
        path: PathBuf,
        /// Why it could not be made absolute.
        #[source]
        source: io::Error,
    },
}

impl QmpError {
    /// Builds a [`QmpError::Malformed`], cutting `line` to a readable length.
    pub fn malformed(line: &str, reason: impl Into<String>) -> Self {
        QmpError::Malformed {
            line: truncate_for_display(line),
            reason: reason.into(),
            source: None,
        }
    }

    /// Builds a [`QmpError::Malformed`] for a line the JSON parser refused.
    pub fn malformed_json(
        line: &str,
        reason: impl Into<String>,
        source: serde_json::Error,
    ) -> Self {
        QmpError::Malformed {
            line: truncate_for_display(line),
            reason: reason.into(),
            source: Some(source),
        }
    }

    /// This error and its causes, `: `-separated, for log lines (which show no source chain).
    pub fn chain(&self) -> String {
        crate::errors::chain(self)
    }

    /// Whether this error means the connection to QEMU is gone for good.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, QmpError::Disconnected { .. })
    }
}

/// Cuts `s` (trailing whitespace removed) to [`MAX_LINE_IN_MESSAGE`]
/// characters, noting how long it was if it had to be cut.
pub(crate) fn truncate_for_display(s: &str) -> String {
    let s = s.trim_end();
    match s.char_indices().nth(MAX_LINE_IN_MESSAGE) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}... ({} bytes in all)", &s[..cut], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lines_are_kept_whole() {
        assert_eq!(truncate_for_display("{\"a\":1}\n"), "{\"a\":1}");
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let line = "é".repeat(1000);
        let cut = truncate_for_display(&line);
        assert!(cut.starts_with(&"é".repeat(MAX_LINE_IN_MESSAGE)));
        assert!(cut.ends_with("(2000 bytes in all)"), "{cut}");
        assert!(cut.chars().count() < MAX_LINE_IN_MESSAGE + 40);
    }

    #[test]
    fn malformed_error_message_is_bounded() {
        let err = QmpError::malformed(&"x".repeat(10_000), "not JSON");
        let msg = err.to_string();
        assert!(msg.len() < 600, "{}", msg.len());
        assert!(msg.contains("not JSON"));
    }

    #[test]
    fn connect_message_says_how_to_start_qemu() {
        let err = QmpError::Connect {
            path: PathBuf::from("/run/vm/qmp.sock"),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let msg = err.to_string();
        assert!(
            msg.contains("-qmp unix:/run/vm/qmp.sock,server=on,wait=off"),
            "{msg}"
        );
        assert!(msg.starts_with("cannot connect to QMP socket /run/vm/qmp.sock"));
    }

    #[test]
    fn command_message_names_command_class_and_desc() {
        let err = QmpError::Command {
            command: "migrate".into(),
            class: "GenericError".into(),
            desc: "There's a migration process in progress".into(),
        };
        assert_eq!(
            err.to_string(),
            "QEMU rejected QMP command `migrate`: GenericError: There's a \
             migration process in progress"
        );
    }

    #[test]
    fn the_cause_is_printed_once_by_the_chain() {
        let source = serde_json::from_str::<serde_json::Value>("HMP").unwrap_err();
        let cause = source.to_string();
        let err = QmpError::malformed_json("HMP", "not JSON", source);
        assert!(!err.to_string().contains(&cause), "{err}");
        let chain = err.chain();
        assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
        assert!(chain.starts_with(&err.to_string()), "{chain}");
    }
}
