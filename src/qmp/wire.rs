//! QMP on the wire: newline-delimited JSON. Reading one line without buffering more than a
//! bound, and telling what a line is: the greeting, a reply or an event.

use std::io::{self, BufRead};

use serde_json::{Map, Value};

use super::error::QmpError;

/// Longest line accepted from QEMU. Longer lines are skipped (with a
/// warning) without being buffered whole. The largest real QMP replies
/// (`query-qmp-schema`) are a few hundred KiB.
pub(crate) const MAX_LINE_BYTES: usize = 64 << 20;

/// An asynchronous event sent by QEMU, e.g. `STOP`, `RESUME` or `MIGRATION`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name, e.g. `"MIGRATION"`.
    pub event: String,
    /// The event's `data` member; an empty object when QEMU sent none.
    pub data: Value,
    /// When QEMU emitted the event, in microseconds since the UNIX epoch
    /// (0 if QEMU sent no usable timestamp).
    pub timestamp_us: u64,
}

/// One read from the transport.
#[derive(Debug, PartialEq)]
pub(crate) enum Line {
    /// A complete line (with its newline, unless the stream ended first) is
    /// in the buffer.
    Data,
    /// A line longer than the limit was read and dropped; this many bytes.
    TooLong(usize),
    /// End of stream.
    Eof,
}

/// Reads one line into `buf` (cleared first) without ever buffering more
/// than `max` bytes of it.
pub(crate) fn read_line_bounded(
    reader: &mut dyn BufRead,
    max: usize,
    buf: &mut Vec<u8>,
) -> io::Result<Line> {
    buf.clear();
    let mut dropped: Option<usize> = None;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if available.is_empty() {
            return Ok(match dropped {
                Some(n) => Line::TooLong(n),
                None if buf.is_empty() => Line::Eof,
                None => Line::Data,
            });
        }
        let (len, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        match dropped.as_mut() {
            Some(n) => *n += len,
            None if buf.len() + len > max => {
                dropped = Some(buf.len() + len);
                buf.clear();
            }
            None => buf.extend_from_slice(&available[..len]),
        }
        reader.consume(len);
        if complete {
            return Ok(match dropped {
                Some(n) => Line::TooLong(n),
                None => Line::Data,
            });
        }
    }
}

/// What one line from QEMU turned out to be.
#[derive(Debug, PartialEq)]
pub(crate) enum Message {
    Greeting(Value),
    Reply { id: Option<u64>, reply: Reply },
    Event(QmpEvent),
}

/// QEMU's answer to one command, as routed to the caller waiting for it.
#[derive(Debug, PartialEq)]
pub(crate) enum Reply {
    Return(Value),
    Error { class: String, desc: String },
}

/// Parses one line from QEMU.
pub(crate) fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let text = || String::from_utf8_lossy(line);
    let value: Value = serde_json::from_slice(line)
        .map_err(|err| QmpError::malformed_json(&text(), "not JSON", err))?;
    let Value::Object(mut object) = value else {
        return Err(QmpError::malformed(&text(), "not a JSON object"));
    };
    let id = object.get("id").and_then(Value::as_u64);
    if let Some(value) = object.remove("return") {
        return Ok(Message::Reply {
            id,
            reply: Reply::Return(value),
        });
    }
    if let Some(error) = object.remove("error") {
        let field = |name: &str| {
            error
                .get(name)
                .and_then(Value::as_str)
                .map_or_else(|| format!("<no {name}>"), str::to_owned)
        };
        return Ok(Message::Reply {
            id,
            reply: Reply::Error {
                class: field("class"),
                desc: field("desc"),
            },
        });
    }
    if let Some(event) = object.get("event").and_then(Value::as_str) {
        let timestamp = object.get("timestamp");
        let field = |name| {
            timestamp
                .and_then(|t| t.get(name))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        return Ok(Message::Event(QmpEvent {
            event: event.to_owned(),
            timestamp_us: field("seconds")
                .saturating_mul(1_000_000)
                .saturating_add(field("microseconds")),
            data: object
                .remove("data")
                .unwrap_or_else(|| Value::Object(Map::new())),
        }));
    }
    if let Some(greeting @ Value::Object(_)) = object.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    Err(QmpError::malformed(
        &text(),
        "neither a reply, an event nor a greeting",
    ))
}

pub(crate) fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::testutil::greeting_line;
    use serde_json::json;
    use std::io::Cursor;

    #[test]
    fn parse_message_classifies_lines() {
        assert_eq!(
            parse_message(br#"{"return": {"a": 1}, "id": 7}"#).expect("reply"),
            Message::Reply {
                id: Some(7),
                reply: Reply::Return(json!({"a": 1}))
            }
        );
        assert_eq!(
            parse_message(br#"{"error": {"class": "GenericError"}, "id": 8}"#).expect("error"),
            Message::Reply {
                id: Some(8),
                reply: Reply::Error {
                    class: "GenericError".into(),
                    desc: "<no desc>".into()
                }
            }
        );
        assert!(matches!(
            parse_message(greeting_line().as_bytes()),
            Ok(Message::Greeting(_))
        ));
        assert!(matches!(
            parse_message(br#"{"QMP": 3}"#),
            Err(QmpError::Malformed { .. })
        ));
        assert!(matches!(
            parse_message(b"42"),
            Err(QmpError::Malformed { .. })
        ));
    }

    #[test]
    fn read_line_bounded_skips_over_long_lines() {
        let input = format!("short\n{}\nafter\ntail", "x".repeat(100));
        // A tiny BufReader capacity forces lines to span several fills.
        let mut reader = io::BufReader::with_capacity(7, Cursor::new(input.into_bytes()));
        let mut buf = Vec::new();
        let mut next = || {
            let line = read_line_bounded(&mut reader, 16, &mut buf).expect("read");
            (line, String::from_utf8_lossy(&buf).into_owned())
        };
        assert_eq!(next(), (Line::Data, "short\n".into()));
        assert_eq!(next(), (Line::TooLong(101), String::new()));
        assert_eq!(next(), (Line::Data, "after\n".into()));
        assert_eq!(next(), (Line::Data, "tail".into()));
        assert_eq!(next(), (Line::Eof, String::new()));
    }
}
