//! What every provider object shares: its libfabric `fid` header first (`#[repr(C)]`), a
//! static ops table per class by which it is recognised, and `-FI_ENOSYS` stubs for the
//! operations the provider does not have (a table entry is never null: libfabric's inline
//! wrappers call through it unchecked).

use std::os::raw::{c_char, c_int, c_void};

use crate::error::FiError;
use crate::ffi;

/// Defines `unsafe extern "C" fn NAME(args) -> RET` returning `-FI_ENOSYS`.
macro_rules! enosys {
    ($($name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty;)*) => {$(
        pub(crate) unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            let _ = ($($arg,)*);
            -(ffi::FI_ENOSYS as $ret)
        }
    )*};
}
pub(crate) use enosys;

enosys! {
    no_bind(fid: *mut ffi::fid, bfid: *mut ffi::fid, flags: u64) -> c_int;
    no_control(fid: *mut ffi::fid, command: c_int, arg: *mut c_void) -> c_int;
    no_ops_open(fid: *mut ffi::fid, name: *const c_char, flags: u64, ops: *mut *mut c_void, context: *mut c_void) -> c_int;
    no_tostr(fid: *const ffi::fid, buf: *mut c_char, len: usize) -> c_int;
    no_ops_set(fid: *mut ffi::fid, name: *const c_char, flags: u64, ops: *mut c_void, context: *mut c_void) -> c_int;
}

/// An `fi_ops` with `close` and the given `bind`/`control`, the rest `-FI_ENOSYS`.
pub(crate) const fn fi_ops(
    close: unsafe extern "C" fn(*mut ffi::fid) -> c_int,
    bind: unsafe extern "C" fn(*mut ffi::fid, *mut ffi::fid, u64) -> c_int,
    control: unsafe extern "C" fn(*mut ffi::fid, c_int, *mut c_void) -> c_int,
) -> ffi::fi_ops {
    ffi::fi_ops {
        size: std::mem::size_of::<ffi::fi_ops>(),
        close: Some(close),
        bind: Some(bind),
        control: Some(control),
        ops_open: Some(no_ops_open),
        tostr: Some(no_tostr),
        ops_set: Some(no_ops_set),
    }
}

/// The `*mut` libfabric's structs want for a static ops table (libfabric never writes it).
pub(crate) fn ops_ptr<T>(table: &'static T) -> *mut T {
    table as *const T as *mut T
}

/// The provider object `T` behind `fid`, after checking that `fid` carries `ops`, the table
/// of `T`'s class (so a foreign or wrong-class fid is refused, not misread).
///
/// # Safety
/// `fid` is null or points to a live libfabric `fid`; if it carries `ops`, it is the first
/// field of a live `T` created by this provider.
pub(crate) unsafe fn object<'a, T>(
    fid: *const ffi::fid,
    ops: &'static ffi::fi_ops,
    what: &'static str,
) -> Result<&'a T, FiError> {
    if fid.is_null() {
        return Err(FiError::Invalid(what));
    }
    // SAFETY: fid is non-null and points to a live fid (the caller's guarantee).
    if !std::ptr::eq(unsafe { (*fid).ops }, ops) {
        return Err(FiError::BadObject(what));
    }
    // SAFETY: the ops table is T's, so the fid is the first field of a live T (repr(C)).
    Ok(unsafe { &*(fid as *const T) })
}

/// Frees the object `T` behind `fid` (its `close`).
///
/// # Safety
/// As [`object`]; and nothing uses the object after this (libfabric's `fi_close` contract).
pub(crate) unsafe fn close<T>(
    fid: *mut ffi::fid,
    ops: &'static ffi::fi_ops,
    what: &'static str,
) -> Result<(), FiError> {
    // SAFETY: the caller's guarantee; object checks the class first.
    unsafe { object::<T>(fid, ops, what)? };
    // SAFETY: T was leaked from a Box by this provider when it was opened, and is closed once.
    drop(unsafe { Box::from_raw(fid as *mut T) });
    Ok(())
}

/// Writes a new object's fid through the caller's out-pointer.
///
/// # Safety
/// `out` is null or a valid pointer to write.
pub(crate) unsafe fn give<F>(out: *mut *mut F, fid: *mut F) -> Result<(), FiError> {
    if out.is_null() {
        return Err(FiError::Invalid("a null out-pointer"));
    }
    // SAFETY: out is non-null and valid to write (the caller's guarantee).
    unsafe { *out = fid };
    Ok(())
}

/// A libfabric `fid` header.
pub(crate) fn fid(fclass: u32, context: *mut c_void, ops: &'static ffi::fi_ops) -> ffi::fid {
    ffi::fid {
        fclass: fclass as usize,
        context,
        ops: ops_ptr(ops),
    }
}
