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
            FiError::Panic(_) => ffi::FI_EOTHER,
        };
        code as i32
    }
}

/// Runs `f` for an `extern "C"` entry point named `what`: its error becomes `-FI_E*`, and a
/// panic becomes `-FI_EOTHER` instead of unwinding into C.
pub fn guard(what: &'static str, f: impl FnOnce() -> Result<(), FiError>) -> i32 {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or(Err(FiError::Panic(what)));
    match result {
        Ok(()) => 0,
        Err(e) => {
            crate::log_error(what, &e);
            -e.errno()
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
    }
}
