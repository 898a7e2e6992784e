//! A small, synchronous client for the QEMU Machine Protocol (QMP) over a
//! UNIX socket.
//!
//! QMP is newline-delimited JSON. On connection QEMU sends a greeting
//! (`{"QMP": {"version": ..., "capabilities": [...]}}`); the client answers
//! with `qmp_capabilities` before anything else. Commands are
//! `{"execute": NAME, "arguments": {...}, "id": N}` and are answered by
//! `{"return": VALUE, "id": N}` or
//! `{"error": {"class": C, "desc": D}, "id": N}`. Events
//! (`{"event": NAME, "data": {...}, "timestamp": {...}}`) may arrive at any
//! time, interleaved with replies.
//!
//! [`QmpClient`] runs one reader thread per connection that routes each
//! reply to the caller waiting for its `id` and puts events on a channel,
//! so commands can be issued from several threads at once. Lines that are
//! not valid QMP are logged and skipped. When QEMU goes away, every pending
//! and later call returns [`QmpError::Disconnected`].
//!
//! The module by role: `client.rs` (connection, commands, waiting for events), `reader.rs` (the
//! reader thread and the table of callers waiting for replies), `wire.rs` (the line format:
//! bounded line reads, greeting/reply/event parsing), `migration.rs` (the typed commands of a
//! migration), `transport.rs` (the byte stream underneath), `error.rs`.
//!
//! QEMU must expose a QMP monitor, e.g.
//! `-qmp unix:/run/vm/qmp.sock,server=on,wait=off`.
//!
//! ```no_run
//! # fn main() -> Result<(), vfmig::qmp::QmpError> {
//! use std::{path::Path, time::Duration};
//! use vfmig::qmp::QmpClient;
//!
//! let qmp = QmpClient::connect(Path::new("/run/vm/qmp.sock"), Duration::from_secs(10))?;
//! qmp.migrate_set_capabilities(&[("events", true)])?;
//! qmp.migrate("tcp:10.0.0.2:4444")?;
//! let done = qmp.wait_event("MIGRATION", Duration::from_secs(600))?;
//! println!("{done:?} {:?}", qmp.query_migrate()?);
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod migration;
mod reader;
mod transport;
pub(crate) mod wire;

#[cfg(test)]
mod testutil;

pub use client::{QmpClient, EVENT_QUEUE_CAPACITY};
pub use error::{QmpError, MAX_LINE_IN_MESSAGE};
pub use migration::{MigrationInfo, RamStats, VfioStats, VmStatus};
pub use transport::{QmpTransport, ShutdownFn, TransportParts};
pub use wire::QmpEvent;
