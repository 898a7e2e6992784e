//! vfmig's libfabric provider (`libvfmig-fi.so`): MPI's tagged messages over the soft VF.
//!
//! libfabric loads the shared object from `FI_PROVIDER_PATH` and calls [`provider::fi_prov_ini`].
//! The modules, by concern:
//! - [`ffi`]: libfabric 1.17's C types, generated from libfabric-dev's headers;
//! - [`getinfo`]: what the provider offers, checked against `fi_getinfo`'s hints;
//! - [`provider`]: the `struct fi_provider` and its entry points (panics caught, `-FI_E*`);
//! - [`tagmatch`]: the tag-matching engine (posted and unexpected queues), independent of the
//!   transport;
//! - [`fabric`], [`av`], [`cq`], [`ep`] (with `ep_ops` and `ep_data`, its C tables): the
//!   libfabric objects;
//!   `object` is what they share (fid header, class check, `-FI_ENOSYS` stubs);
//! - [`transport`]: what carries an endpoint's messages; [`softvf`]: over the guest's soft VF
//!   (the default), or in process (`loopback`, for tests);
//! - [`error`]: the errors and their `-FI_E*` codes.

pub mod av;
pub mod cq;
pub mod ep;
mod ep_data;
mod ep_ops;
pub mod error;
pub mod fabric;
pub mod ffi;
pub mod getinfo;
mod object;
pub mod provider;
pub mod softvf;
pub mod tagmatch;
pub mod transport;

/// Says on stderr what went wrong outside any call (a peer's link failed): the application
/// would otherwise only see its messages stop.
pub(crate) fn log_message(msg: &str) {
    eprintln!("vfmig-fi: {msg}");
}

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
