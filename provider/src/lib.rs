//! vfmig's libfabric provider (`libvfmig-fi.so`): MPI's tagged messages over the soft VF.
//!
//! libfabric loads the shared object from `FI_PROVIDER_PATH` and calls [`provider::fi_prov_ini`].
//! The modules, by concern:
//! - [`ffi`]: libfabric 1.17's C types, generated from libfabric-dev's headers;
//! - [`getinfo`]: what the provider offers, checked against `fi_getinfo`'s hints;
//! - [`provider`]: the `struct fi_provider` and its entry points (panics caught, `-FI_E*`);
//! - [`tagmatch`]: the tag-matching engine (posted and unexpected queues), independent of the
//!   transport;
//! - [`error`]: the errors and their `-FI_E*` codes.

pub mod error;
pub mod ffi;
pub mod getinfo;
pub mod provider;
pub mod tagmatch;

/// Logs an entry point's failure on stderr when `VFMIG_FI_LOG` is set (libfabric's core asks
/// every provider, so refusals are normal and silent by default).
pub(crate) fn log_error(what: &str, e: &error::FiError) {
    if std::env::var_os("VFMIG_FI_LOG").is_some() {
        let mut msg = format!("vfmig-fi: {what}: {e}");
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!("{msg}");
    }
}
