//! The seam between the QMP client and the byte stream it talks over.

use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// A function that closes a transport so that a read blocked on its reader
/// half returns (end of file or an error).
pub type ShutdownFn = Box<dyn Fn() + Send + Sync>;

/// The halves a [`QmpTransport`] splits into.
pub struct TransportParts {
    /// Where QEMU's newline-delimited JSON is read from (by the client's
    /// reader thread).
    pub reader: Box<dyn BufRead + Send>,
    /// Where commands are written to; every write is a whole line.
    pub writer: Box<dyn Write + Send>,
    /// Closes the transport, so that the reader thread stops when the client
    /// is dropped. Without it the reader thread only stops once the peer
    /// closes the stream, and dropping the client does not wait for it.
    pub shutdown: Option<ShutdownFn>,
}

/// Something a [`QmpClient`](super::QmpClient) can talk QMP over: a
/// bidirectional byte stream that splits into a line reader and a writer.
///
/// Implemented for [`UnixStream`]; tests can use [`UnixStream::pair`].
pub trait QmpTransport: Send {
    /// A name for the other end, used in error messages (for a UNIX socket:
    /// its path).
    fn endpoint(&self) -> PathBuf {
        PathBuf::from("<QMP transport>")
    }

    /// Splits the transport into its reader, writer and shutdown hook.
    fn split(self) -> io::Result<TransportParts>;
}

impl QmpTransport for UnixStream {
    fn endpoint(&self) -> PathBuf {
        self.peer_addr()
            .ok()
            .and_then(|addr| addr.as_pathname().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("<unnamed UNIX socket>"))
    }

    fn split(self) -> io::Result<TransportParts> {
        let writer = self.try_clone()?;
        let closer = self.try_clone()?;
        Ok(TransportParts {
            reader: Box::new(BufReader::new(self)),
            writer: Box::new(writer),
            shutdown: Some(Box::new(move || {
                // Fails only if the socket is already shut down or gone,
                // which is exactly the state we want.
                let _ = closer.shutdown(Shutdown::Both);
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn unix_stream_splits_into_working_halves() {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        assert_eq!(ours.endpoint(), PathBuf::from("<unnamed UNIX socket>"));
        let mut parts = ours.split().expect("split");

        parts.writer.write_all(b"ping\n").expect("write");
        let mut buf = [0u8; 5];
        theirs.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping\n");

        theirs.write_all(b"pong\n").expect("write");
        let mut line = String::new();
        parts.reader.read_line(&mut line).expect("read_line");
        assert_eq!(line, "pong\n");
    }

    #[test]
    fn shutdown_hook_unblocks_the_reader() {
        let (ours, _theirs) = UnixStream::pair().expect("socketpair");
        let parts = ours.split().expect("split");
        let mut reader = parts.reader;
        let shutdown = parts.shutdown.expect("UnixStream has a shutdown hook");
        let handle = std::thread::spawn(move || {
            let mut line = String::new();
            reader.read_line(&mut line).map(|n| (n, line))
        });
        shutdown();
        let (n, _) = handle.join().expect("reader thread").expect("read");
        assert_eq!(n, 0, "a shut-down socket reads as end of file");
    }

    #[test]
    fn endpoint_of_a_named_socket_is_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let stream = UnixStream::connect(&path).expect("connect");
        assert_eq!(stream.endpoint(), path);
    }
}
