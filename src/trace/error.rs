//! The errors of writing, reading and checking a trace.

use std::path::PathBuf;

/// What went wrong with a trace file.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A file could not be read or written.
    #[error("cannot read or write {}: check the path and its permissions", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The text is not JSON (or could not be turned into JSON).
    #[error("{what}: not valid JSON: is it a trace written by vfmig --trace?")]
    Json {
        /// What was being parsed or written: a path, or `"trace"`.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An event passed the format's rules but is not one vfmig can read.
    #[error("trace event #{index}: not a trace event vfmig can read")]
    Event {
        /// Index of the offending event in `traceEvents`.
        index: usize,
        /// Why it could not be read.
        #[source]
        source: serde_json::Error,
    },
    /// The JSON breaks a rule of the trace-event format.
    #[error("{}{reason}", match index { Some(i) => format!("trace event #{i}: "), None => "trace: ".to_string() })]
    Invalid {
        /// Index of the offending event in `traceEvents`; `None` for a problem with the
        /// top-level object.
        index: Option<usize>,
        /// What is wrong.
        reason: String,
    },
}

impl TraceError {
    /// An [`TraceError::Invalid`] error about event `index`.
    pub(crate) fn event(index: usize, reason: impl Into<String>) -> Self {
        TraceError::Invalid {
            index: Some(index),
            reason: reason.into(),
        }
    }

    /// An [`TraceError::Invalid`] error about the top-level object.
    pub(crate) fn top(reason: impl Into<String>) -> Self {
        TraceError::Invalid {
            index: None,
            reason: reason.into(),
        }
    }
}
