//! libfabric 1.17's C types and constants, generated from libfabric-dev's headers by build.rs
//! (bindgen; its layout assertions fail the build if a struct differs from the C compiler's).
//! The few macros bindgen cannot evaluate are written out below, each with its header line.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]
#![allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn
)]
include!(concat!(env!("OUT_DIR"), "/fabric.rs"));

/// `FI_VERSION(major, minor)`, fabric.h:96.
pub const fn fi_version(major: u32, minor: u32) -> u32 {
    (major << 16) | minor
}

/// `FI_MAJOR(version)`.
pub const fn fi_major(version: u32) -> u32 {
    version >> 16
}

/// `FI_ADDR_UNSPEC`, fabric.h:221: `((uint64_t) -1)`.
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;

/// The version of the headers the provider was built against (1.17 for Debian 12).
pub const HEADERS_VERSION: u32 = fi_version(FI_MAJOR_VERSION, FI_MINOR_VERSION);
