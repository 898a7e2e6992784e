//! The C interface (`include/vfmig.h`), for MPI runtimes and other C programs.
//!
//! Every function returns 0 (or a pointer / count) on success and -1 (or NULL) on error;
//! [`vfmig_last_error`] then gives the message. No panic crosses the boundary: each entry point
//! runs inside `catch_unwind`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use vfmig_proto::{Completion, Event, Sge};

use crate::{Device, PinnedBuffer};

/// The last few error messages of this thread, newest last: a pointer from
/// [`vfmig_last_error`] stays valid for the next few failing calls (C evaluates `printf`
/// arguments in any order).
const KEEP_ERRORS: usize = 8;

thread_local! {
    static LAST_ERROR: RefCell<Vec<CString>> = const { RefCell::new(Vec::new()) };
}

fn set_error(msg: impl Into<String>) {
    let s = msg.into().replace('\0', " ");
    let c = CString::new(s).unwrap_or_default();
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        if e.len() >= KEEP_ERRORS {
            e.remove(0);
        }
        e.push(c);
    });
}

/// Runs `f`, turning errors and panics into `on_err` plus a last-error message.
fn guard<T>(on_err: T, f: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(e);
            on_err
        }
        Err(_) => {
            set_error("internal error (panic) in libvfmig");
            on_err
        }
    }
}

/// An open device (`vfmig_dev` in C).
pub struct VfmigDev(Device);
/// A pinned buffer (`vfmig_buf` in C).
pub struct VfmigBuf(PinnedBuffer);

/// A local buffer of a work request (`struct vfmig_sge`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VfmigSge {
    /// Address in the region's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Region key.
    pub lkey: u32,
}

/// A work completion (`struct vfmig_wc`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VfmigWc {
    /// The work request's id.
    pub wr_id: u64,
    /// QP number.
    pub qp: u32,
    /// `VFMIG_WC_*` opcode.
    pub opcode: u8,
    /// `VFMIG_WC_SUCCESS` (0) or an error status.
    pub status: u8,
    /// 1 when `imm` is valid.
    pub has_imm: u8,
    /// Padding.
    pub pad: u8,
    /// Bytes moved.
    pub byte_len: u32,
    /// Immediate data.
    pub imm: u32,
}

impl From<Completion> for VfmigWc {
    fn from(c: Completion) -> Self {
        VfmigWc {
            wr_id: c.wr_id,
            qp: c.qp,
            opcode: c.opcode as u8,
            status: c.status as u8,
            has_imm: c.imm.is_some() as u8,
            pad: 0,
            byte_len: c.byte_len,
            imm: c.imm.unwrap_or(0),
        }
    }
}

fn dev<'a>(d: *const VfmigDev) -> Result<&'a Device, String> {
    // SAFETY: the caller passes NULL or a pointer from vfmig_open that it has not closed.
    unsafe { d.as_ref() }
        .map(|d| &d.0)
        .ok_or_else(|| "NULL device".to_string())
}

fn buf<'a>(b: *const VfmigBuf) -> Result<&'a PinnedBuffer, String> {
    // SAFETY: the caller passes NULL or a pointer from vfmig_buf_alloc that it has not freed.
    unsafe { b.as_ref() }
        .map(|b| &b.0)
        .ok_or_else(|| "NULL buffer".to_string())
}

fn sge(s: *const VfmigSge) -> Result<Sge, String> {
    // SAFETY: the caller passes NULL or a pointer to a readable struct vfmig_sge.
    let s = unsafe { s.as_ref() }.ok_or_else(|| "NULL sge".to_string())?;
    Ok(Sge {
        addr: s.addr,
        len: s.len,
        lkey: s.lkey,
    })
}

fn status(r: std::io::Result<()>) -> Result<c_int, String> {
    r.map(|_| 0).map_err(|e| e.to_string())
}

/// The message of the last failed call on this thread ("" if none). The string stays valid
/// for at least the next 7 failing calls on the same thread.
#[no_mangle]
pub extern "C" fn vfmig_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().last().map_or(c"".as_ptr(), |s| s.as_ptr()))
}

/// Opens the soft VF behind network interface `ifname` ("eth0"). NULL on error.
///
/// # Safety
/// `ifname` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn vfmig_open(ifname: *const c_char) -> *mut VfmigDev {
    guard(std::ptr::null_mut(), || {
        if ifname.is_null() {
            return Err("NULL interface name".into());
        }
        // SAFETY: non-NULL and NUL-terminated per this function's contract.
        let name = unsafe { CStr::from_ptr(ifname) }
            .to_str()
            .map_err(|_| "interface name is not UTF-8".to_string())?;
        let d = Device::open(name).map_err(|e| e.to_string())?;
        Ok(Box::into_raw(Box::new(VfmigDev(d))))
    })
}

/// Closes a device (NULL is ignored). Buffers stay valid and must be freed separately.
///
/// # Safety
/// `d` must be NULL or from `vfmig_open`, not yet closed, and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn vfmig_close(d: *mut VfmigDev) {
    guard((), || {
        if !d.is_null() {
            // SAFETY: d came from Box::into_raw in vfmig_open and is closed once.
            drop(unsafe { Box::from_raw(d) });
        }
        Ok(())
    })
}

/// Allocates a zeroed pinned buffer of `size` bytes (hugepages when available). NULL on error.
#[no_mangle]
pub extern "C" fn vfmig_buf_alloc(size: usize) -> *mut VfmigBuf {
    guard(std::ptr::null_mut(), || {
        let b = PinnedBuffer::new(size).map_err(|e| e.to_string())?;
        Ok(Box::into_raw(Box::new(VfmigBuf(b))))
    })
}

/// Frees a buffer (NULL is ignored). Deregister it first.
///
/// # Safety
/// `b` must be NULL or from `vfmig_buf_alloc`, not yet freed, and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn vfmig_buf_free(b: *mut VfmigBuf) {
    guard((), || {
        if !b.is_null() {
            // SAFETY: b came from Box::into_raw in vfmig_buf_alloc and is freed once.
            drop(unsafe { Box::from_raw(b) });
        }
        Ok(())
    })
}

/// The buffer's first byte (NULL for a NULL buffer).
///
/// # Safety
/// `b` must be NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_buf_ptr(b: *const VfmigBuf) -> *mut c_void {
    guard(std::ptr::null_mut(), || Ok(buf(b)?.as_ptr() as *mut c_void))
}

/// The buffer's length in bytes (0 for a NULL buffer).
///
/// # Safety
/// `b` must be NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn vfmig_buf_len(b: *const VfmigBuf) -> usize {
    guard(0, || Ok(buf(b)?.len()))
}

/// Registers `b` with its address space starting at `addr` and `access` flags
/// (`VFMIG_ACCESS_*`); stores the key in `*key`.
///
/// # Safety
/// `d`, `b` live (or NULL); `key` writable (or NULL).
#[no_mangle]
pub unsafe extern "C" fn vfmig_reg_mr(
    d: *const VfmigDev,
    b: *const VfmigBuf,
    addr: u64,
    access: u8,
    key: *mut u32,
) -> c_int {
    guard(-1, || {
        let k = dev(d)?
            .register(buf(b)?, addr, access)
            .map_err(|e| e.to_string())?;
        if key.is_null() {
            return Err("NULL key pointer".into());
        }
        // SAFETY: key is non-NULL and writable per the contract.
        unsafe { key.write(k) };
        Ok(0)
    })
}

/// Drops region `key`.
///
/// # Safety
/// `d` live (or NULL).
#[no_mangle]
pub unsafe extern "C" fn vfmig_dereg_mr(d: *const VfmigDev, key: u32) -> c_int {
    guard(-1, || status(dev(d)?.deregister(key)))
}

/// Creates a QP; stores its number in `*qp`.
///
/// # Safety
/// `d` live (or NULL); `qp` writable (or NULL).
#[no_mangle]
pub unsafe extern "C" fn vfmig_create_qp(d: *const VfmigDev, qp: *mut u32) -> c_int {
    guard(-1, || {
        if qp.is_null() {
            return Err("NULL qp pointer".into());
        }
        let n = dev(d)?.create_qp().map_err(|e| e.to_string())?;
        // SAFETY: qp is non-NULL and writable per the contract.
        unsafe { qp.write(n) };
        Ok(0)
    })
}

/// Destroys `qp`: its posted work requests are dropped without completions.
///
/// # Safety
/// `d` live (or NULL).
#[no_mangle]
pub unsafe extern "C" fn vfmig_destroy_qp(d: *const VfmigDev, qp: u32) -> c_int {
    guard(-1, || status(dev(d)?.destroy_qp(qp)))
}

/// Connects local `qp` to QP `peer_qp` of the VM named `peer`.
///
/// # Safety
/// `d` live (or NULL); `peer` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vfmig_connect_qp(
    d: *const VfmigDev,
    qp: u32,
    peer: *const c_char,
    peer_qp: u32,
) -> c_int {
    guard(-1, || {
        if peer.is_null() {
            return Err("NULL peer name".into());
        }
        // SAFETY: non-NULL and NUL-terminated per the contract.
        let p = unsafe { CStr::from_ptr(peer) }
            .to_str()
            .map_err(|_| "peer name is not UTF-8".to_string())?;
        status(dev(d)?.connect_qp(qp, p, peer_qp))
    })
}

/// Posts an RDMA WRITE of `*sge` to `remote_addr` of region `rkey`; with immediate `imm` when
/// `has_imm` is non-zero.
///
/// # Safety
/// `d` live (or NULL); `sge` readable (or NULL).
#[no_mangle]
pub unsafe extern "C" fn vfmig_post_write(
    d: *const VfmigDev,
    qp: u32,
    wr_id: u64,
    sge_p: *const VfmigSge,
    remote_addr: u64,
    rkey: u32,
    has_imm: c_int,
    imm: u32,
) -> c_int {
    guard(-1, || {
        let imm = (has_imm != 0).then_some(imm);
        status(dev(d)?.post_write(qp, wr_id, sge(sge_p)?, remote_addr, rkey, imm))
    })
}

/// Posts a SEND of `*sge`; with immediate when `has_imm` is non-zero.
///
/// # Safety
/// `d` live (or NULL); `sge` readable (or NULL).
#[no_mangle]
pub unsafe extern "C" fn vfmig_post_send(
    d: *const VfmigDev,
    qp: u32,
    wr_id: u64,
    sge_p: *const VfmigSge,
    has_imm: c_int,
    imm: u32,
) -> c_int {
    guard(-1, || {
        let imm = (has_imm != 0).then_some(imm);
        status(dev(d)?.post_send(qp, wr_id, sge(sge_p)?, imm))
    })
}

/// Posts a receive into `*sge`.
///
/// # Safety
/// `d` live (or NULL); `sge` readable (or NULL).
#[no_mangle]
pub unsafe extern "C" fn vfmig_post_recv(
    d: *const VfmigDev,
    qp: u32,
    wr_id: u64,
    sge_p: *const VfmigSge,
) -> c_int {
    guard(-1, || status(dev(d)?.post_recv(qp, wr_id, sge(sge_p)?)))
}

fn fill(out: *mut VfmigWc, cs: Vec<Completion>) -> c_int {
    for (i, c) in cs.iter().enumerate() {
        // SAFETY: the caller gave room for `max` entries and cs.len() <= max.
        unsafe { out.add(i).write(VfmigWc::from(*c)) };
    }
    cs.len() as c_int
}

/// Takes up to `max` completions without waiting; returns how many were written to `out`.
///
/// # Safety
/// `d` live (or NULL); `out` has room for `max` entries.
#[no_mangle]
pub unsafe extern "C" fn vfmig_poll_cq(d: *const VfmigDev, out: *mut VfmigWc, max: c_int) -> c_int {
    guard(-1, || {
        if out.is_null() || max < 0 {
            return Err("NULL output array or negative max".into());
        }
        Ok(fill(out, dev(d)?.poll_cq(max as usize)))
    })
}

/// As `vfmig_poll_cq`, but waits up to `timeout_ms` for the first completion.
///
/// # Safety
/// As `vfmig_poll_cq`.
#[no_mangle]
pub unsafe extern "C" fn vfmig_wait_cq(
    d: *const VfmigDev,
    out: *mut VfmigWc,
    max: c_int,
    timeout_ms: c_int,
) -> c_int {
    guard(-1, || {
        if out.is_null() || max < 0 {
            return Err("NULL output array or negative max".into());
        }
        let t = Duration::from_millis(timeout_ms.max(0) as u64);
        Ok(fill(out, dev(d)?.wait_cq(max as usize, t)))
    })
}

struct CbArg(*mut c_void);
// SAFETY: the C caller promises that `arg` may be used from the receiver thread.
unsafe impl Send for CbArg {}

/// Sets the event callback: `cb(event, arg)` with `VFMIG_EVENT_*`, called on the library's
/// receiver thread. It may call `vfmig_ack_event` and post work requests, but not functions
/// that wait for a reply (reg_mr, create_qp, connect_qp). NULL `cb` removes the callback.
///
/// # Safety
/// `d` live (or NULL); `cb`, if set, callable from another thread with `arg`.
#[no_mangle]
pub unsafe extern "C" fn vfmig_on_event(
    d: *const VfmigDev,
    cb: Option<extern "C" fn(c_int, *mut c_void)>,
    arg: *mut c_void,
) -> c_int {
    guard(-1, || {
        let dev = dev(d)?;
        match cb {
            Some(cb) => {
                let arg = CbArg(arg);
                dev.on_event(Box::new(move |e: Event| {
                    let a = &arg;
                    cb(e as u8 as c_int, a.0)
                }));
            }
            None => dev.on_event(Box::new(|e| eprintln!("vfmig: event {e:?} (no handler)"))),
        }
        Ok(0)
    })
}

/// Acknowledges event `event` (`VFMIG_EVENT_*`).
///
/// # Safety
/// `d` live (or NULL).
#[no_mangle]
pub unsafe extern "C" fn vfmig_ack_event(d: *const VfmigDev, event: c_int) -> c_int {
    guard(-1, || {
        let e = match event {
            1 => Event::Suspend,
            2 => Event::Resume,
            3 => Event::Migrated,
            x => return Err(format!("unknown event {x}")),
        };
        status(dev(d)?.ack_event(e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_reported_not_panics() {
        // SAFETY: NULL and valid strings are within the contracts.
        unsafe {
            assert!(vfmig_open(std::ptr::null()).is_null());
            let msg = CStr::from_ptr(vfmig_last_error()).to_str().unwrap();
            assert_eq!(msg, "NULL interface name");
            assert!(vfmig_open(c"no-such-if0".as_ptr()).is_null());
            let msg = CStr::from_ptr(vfmig_last_error()).to_str().unwrap();
            assert!(!msg.is_empty());
            assert_eq!(vfmig_create_qp(std::ptr::null(), std::ptr::null_mut()), -1);
            assert_eq!(vfmig_destroy_qp(std::ptr::null(), 1), -1);
            let mut wc = [VfmigWc::default(); 2];
            assert_eq!(vfmig_poll_cq(std::ptr::null(), wc.as_mut_ptr(), 2), -1);
            assert!(vfmig_buf_alloc(0).is_null());
            vfmig_close(std::ptr::null_mut());
            vfmig_buf_free(std::ptr::null_mut());
        }
        assert_eq!(std::mem::size_of::<VfmigWc>(), 24);
        assert_eq!(std::mem::size_of::<VfmigSge>(), 16);
    }
}
