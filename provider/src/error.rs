//! The provider's errors, and the negative `-FI_E*` code each one becomes at the C ABI.

use crate::ffi;

/// Why a call into the provider failed.
#[derive(Debug, thiserror::Error)]
pub enum FiError {
    /// `fi_getinfo` found nothing to offer for these hints (`-FI_ENODATA`).
    #[error("no vfmig offer for these hints")]
    NoData(#[source] crate::getinfo::Refusal),
    /// An argument the call cannot accept (`-FI_EINVAL`).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// An allocation failed (`-FI_ENOMEM`).
    #[error("out of memory allocating {0}")]
    NoMemory(&'static str),
    /// Not implemented by this provider yet (`-FI_ENOSYS`).
    #[error("{0} is not implemented by the vfmig provider")]
    NotImplemented(&'static str),
    /// Nothing to read yet (`-FI_EAGAIN`).
    #[error("nothing available yet")]
    Again,
    /// An error entry waits at the head of the completion queue (`-FI_EAVAIL`).
    #[error("an error completion is waiting: read it with fi_cq_readerr")]
    ErrorAvailable,
    /// No such object, operation or address (`-FI_ENOENT`).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller's buffer is too small; the needed size was written back (`-FI_ETOOSMALL`).
    #[error("{0}: the buffer is too small")]
    TooSmall(&'static str),
    /// A message longer than the provider carries (`-FI_EMSGSIZE`).
    #[error("a message of {0} bytes is longer than vfmig's {max}", max = crate::getinfo::MAX_MSG_SIZE)]
    MessageSize(usize),
    /// The call needs a state the object is not in, e.g. an endpoint not enabled
    /// (`-FI_EOPBADSTATE`).
    #[error("{0}")]
    BadState(&'static str),
    /// The object given is not one of this provider's, or of the wrong class (`-FI_EBADF`).
    #[error("{0} is not a vfmig object of the right class")]
    BadObject(&'static str),
    /// The transport could not carry a message or could not be opened.
    #[error("the endpoint's transport")]
    Transport(#[source] crate::transport::TransportError),
    /// A Rust panic was caught at the C boundary (`-FI_EOTHER`).
    #[error("internal error in {0} (a panic was caught at the C boundary)")]
    Panic(&'static str),
}

impl FiError {
    /// The positive libfabric error number (`FI_E*`); the C ABI returns its negation.
    pub fn errno(&self) -> i32 {
        let code = match self {
            FiError::NoData(_) => ffi::FI_ENODATA,
            FiError::Invalid(_) => ffi::FI_EINVAL,
            FiError::NoMemory(_) => ffi::FI_ENOMEM,
            FiError::NotImplemented(_) => ffi::FI_ENOSYS,
            FiError::Again => ffi::FI_EAGAIN,
            FiError::ErrorAvailable => ffi::FI_EAVAIL,
            FiError::NotFound(_) => ffi::FI_ENOENT,
            FiError::TooSmall(_) => ffi::FI_ETOOSMALL,
            FiError::MessageSize(_) => ffi::FI_EMSGSIZE,
            FiError::BadState(_) => ffi::FI_EOPBADSTATE,
            FiError::BadObject(_) => ffi::FI_EBADF,
            FiError::Transport(crate::transport::TransportError::UnknownPeer(_)) => {
                ffi::FI_EHOSTUNREACH
            }
            FiError::Transport(crate::transport::TransportError::Unavailable(..)) => ffi::FI_ENOSYS,
            FiError::Transport(crate::transport::TransportError::Busy(_)) => ffi::FI_EAGAIN,
            FiError::Transport(crate::transport::TransportError::Failed(_)) => ffi::FI_EIO,
            FiError::Panic(_) => ffi::FI_EOTHER,
        };
        code as i32
    }
}

/// Runs `f` for an `extern "C"` entry point named `what`: its error becomes `-FI_E*`, and a
/// panic becomes `-FI_EOTHER` instead of unwinding into C.
pub fn guard(what: &'static str, f: impl FnOnce() -> Result<(), FiError>) -> i32 {
    guard_count(what, || f().map(|()| 0)) as i32
}

/// As [`guard`], for the calls that return a count (`ssize_t`) on success.
pub fn guard_count(what: &'static str, f: impl FnOnce() -> Result<isize, FiError>) -> isize {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or(Err(FiError::Panic(what)));
    match result {
        Ok(n) => n,
        Err(e) => {
            if !matches!(e, FiError::Again | FiError::ErrorAvailable) {
                crate::log_error(what, &e);
            }
            -(e.errno() as isize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_libfabric_code() {
        assert_eq!(FiError::Invalid("x").errno(), 22);
        assert_eq!(FiError::NoMemory("x").errno(), 12);
        assert_eq!(FiError::NotImplemented("x").errno(), 38);
        assert_eq!(FiError::Panic("x").errno(), 256);
    }

    #[test]
    fn guard_turns_errors_and_panics_into_negative_codes() {
        assert_eq!(guard("ok", || Ok(())), 0);
        assert_eq!(guard("inval", || Err(FiError::Invalid("bad"))), -22);
        assert_eq!(guard("boom", || panic!("deliberate")), -256);
        assert_eq!(guard_count("count", || Ok(3)), 3);
        assert_eq!(guard_count("again", || Err(FiError::Again)), -11);
    }
}
