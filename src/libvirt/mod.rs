//! libvirt integration: a vfmig VM as a libvirt domain, and the companion's life tied to the
//! domain's by a libvirt `qemu` hook, so that anything that drives libvirt (`virsh`, Nova)
//! starts, stops and migrates a vfmig VM with no vfmig command in between.
//!
//! - [`domain`]: the domain definition libvirt understands natively: memfd shared guest RAM
//!   (`<memoryBacking>` with `memfd` and `shared` access, which vhost-user needs) and a
//!   `vhostuser` interface on the companion's socket, with the companion's settings in the
//!   domain's `<metadata>` (element `companion` in the namespace [`XMLNS`]).
//! - [`hook`]: what `/etc/libvirt/hooks/qemu` does (`vfmig libvirt hook`): on `prepare`
//!   (a start, or an incoming migration) it starts the domain's companion before QEMU and waits
//!   for its vhost-user socket; on `release` it stops it. Domains without vfmig metadata are
//!   left alone.
//! - [`host`]: the per-host settings the hook reads (`/etc/vfmig/host.json`): the address this
//!   host's companions listen on for the fabric.

pub mod domain;
pub mod hook;
pub mod host;

/// The XML namespace of vfmig's element in a domain's `<metadata>`.
pub const XMLNS: &str = "https://vfmig.dev/xmlns/libvirt/1";

/// Where the companions of libvirt domains keep their sockets, logs and pid files by default:
/// one directory per domain, named after it.
pub const DEFAULT_RUN_DIR: &str = "/run/vfmig";
