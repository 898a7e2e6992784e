//! The fabric and domain objects: `fi_fabric` opens the one fabric "vfmig", `fi_domain` its one
//! domain, from which address vectors, completion queues and endpoints are opened. No memory
//! registration is needed (`mr_mode` 0), so the MR operations are `-FI_ENOSYS`.

use std::os::raw::{c_int, c_void};

use crate::error::{guard, FiError};
use crate::ffi;
use crate::object::{self, enosys, fi_ops, no_bind, no_control, ops_ptr};

/// An open fabric (`struct fid_fabric` first).
#[repr(C)]
pub struct Fabric {
    fid: ffi::fid_fabric,
}

/// An open domain (`struct fid_domain` first): what its endpoints take from the `fi_info`.
#[repr(C)]
pub struct Domain {
    fid: ffi::fid_domain,
}

static FABRIC_OPS: ffi::fi_ops = fi_ops(fabric_close, no_bind, no_control);
static FABRIC_OPS_FABRIC: ffi::fi_ops_fabric = ffi::fi_ops_fabric {
    size: std::mem::size_of::<ffi::fi_ops_fabric>(),
    domain: Some(fabric_domain),
    passive_ep: Some(no_passive_ep),
    eq_open: Some(no_eq_open),
    wait_open: Some(no_wait_open),
    trywait: Some(no_trywait),
    domain2: Some(fabric_domain2),
};
pub(crate) static DOMAIN_OPS: ffi::fi_ops = fi_ops(domain_close, no_bind, no_control);
static DOMAIN_OPS_DOMAIN: ffi::fi_ops_domain = ffi::fi_ops_domain {
    size: std::mem::size_of::<ffi::fi_ops_domain>(),
    av_open: Some(crate::av::av_open),
    cq_open: Some(crate::cq::cq_open),
    endpoint: Some(crate::ep_ops::endpoint),
    scalable_ep: Some(no_scalable_ep),
    cntr_open: Some(no_cntr_open),
    poll_open: Some(no_poll_open),
    stx_ctx: Some(no_stx_ctx),
    srx_ctx: Some(no_srx_ctx),
    query_atomic: Some(no_query_atomic),
    query_collective: Some(no_query_collective),
    endpoint2: Some(domain_endpoint2),
};
static DOMAIN_OPS_MR: ffi::fi_ops_mr = ffi::fi_ops_mr {
    size: std::mem::size_of::<ffi::fi_ops_mr>(),
    reg: Some(no_mr_reg),
    regv: Some(no_mr_regv),
    regattr: Some(no_mr_regattr),
};

enosys! {
    no_passive_ep(f: *mut ffi::fid_fabric, i: *mut ffi::fi_info, p: *mut *mut ffi::fid_pep, c: *mut c_void) -> c_int;
    no_eq_open(f: *mut ffi::fid_fabric, a: *mut ffi::fi_eq_attr, e: *mut *mut ffi::fid_eq, c: *mut c_void) -> c_int;
    no_wait_open(f: *mut ffi::fid_fabric, a: *mut ffi::fi_wait_attr, w: *mut *mut ffi::fid_wait) -> c_int;
    no_trywait(f: *mut ffi::fid_fabric, fids: *mut *mut ffi::fid, count: c_int) -> c_int;
    no_scalable_ep(d: *mut ffi::fid_domain, i: *mut ffi::fi_info, s: *mut *mut ffi::fid_ep, c: *mut c_void) -> c_int;
    no_cntr_open(d: *mut ffi::fid_domain, a: *mut ffi::fi_cntr_attr, n: *mut *mut ffi::fid_cntr, c: *mut c_void) -> c_int;
    no_poll_open(d: *mut ffi::fid_domain, a: *mut ffi::fi_poll_attr, p: *mut *mut ffi::fid_poll) -> c_int;
    no_stx_ctx(d: *mut ffi::fid_domain, a: *mut ffi::fi_tx_attr, s: *mut *mut ffi::fid_stx, c: *mut c_void) -> c_int;
    no_srx_ctx(d: *mut ffi::fid_domain, a: *mut ffi::fi_rx_attr, r: *mut *mut ffi::fid_ep, c: *mut c_void) -> c_int;
    no_query_atomic(d: *mut ffi::fid_domain, t: ffi::fi_datatype, o: ffi::fi_op, a: *mut ffi::fi_atomic_attr, f: u64) -> c_int;
    no_query_collective(d: *mut ffi::fid_domain, o: ffi::fi_collective_op, a: *mut ffi::fi_collective_attr, f: u64) -> c_int;
    no_mr_reg(f: *mut ffi::fid, b: *const c_void, l: usize, a: u64, o: u64, k: u64, fl: u64, m: *mut *mut ffi::fid_mr, c: *mut c_void) -> c_int;
    no_mr_regv(f: *mut ffi::fid, i: *const ffi::iovec, n: usize, a: u64, o: u64, k: u64, fl: u64, m: *mut *mut ffi::fid_mr, c: *mut c_void) -> c_int;
    no_mr_regattr(f: *mut ffi::fid, a: *const ffi::fi_mr_attr, fl: u64, m: *mut *mut ffi::fid_mr) -> c_int;
}

/// `struct fi_provider.fabric`: opens the fabric named in `attr` (only "vfmig").
pub(crate) unsafe extern "C" fn open_fabric(
    attr: *mut ffi::fi_fabric_attr,
    fabric: *mut *mut ffi::fid_fabric,
    context: *mut c_void,
) -> c_int {
    guard("fi_fabric", || {
        if attr.is_null() {
            return Err(FiError::Invalid("fi_fabric without attributes"));
        }
        // SAFETY: libfabric passes valid attributes (checked non-null).
        let name = unsafe { (*attr).name };
        if !name.is_null() {
            // SAFETY: a non-null fabric name is a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(name) };
            if name.to_bytes() != crate::getinfo::PROVIDER_NAME.as_bytes() {
                return Err(FiError::NotFound("a fabric of that name"));
            }
        }
        let obj = Box::into_raw(Box::new(Fabric {
            fid: ffi::fid_fabric {
                fid: object::fid(ffi::FI_CLASS_FABRIC, context, &FABRIC_OPS),
                ops: ops_ptr(&FABRIC_OPS_FABRIC),
                api_version: ffi::HEADERS_VERSION,
            },
        }));
        // SAFETY: obj was just leaked; its fid_fabric is what the caller gets.
        unsafe { object::give(fabric, &mut (*obj).fid) }.inspect_err(|_| {
            // SAFETY: obj was leaked above and never handed out.
            drop(unsafe { Box::from_raw(obj) })
        })
    })
}

unsafe extern "C" fn fabric_close(fid: *mut ffi::fid) -> c_int {
    // SAFETY: libfabric passes the fid to close; object::close checks its class.
    guard("fi_close(fabric)", || unsafe {
        object::close::<Fabric>(fid, &FABRIC_OPS, "fabric")
    })
}

unsafe extern "C" fn fabric_domain(
    fabric: *mut ffi::fid_fabric,
    info: *mut ffi::fi_info,
    domain: *mut *mut ffi::fid_domain,
    context: *mut c_void,
) -> c_int {
    guard("fi_domain", || {
        // SAFETY: libfabric passes the fabric's fid (checked by class).
        unsafe { object::object::<Fabric>(fabric as *const ffi::fid, &FABRIC_OPS, "fabric")? };
        if info.is_null() {
            return Err(FiError::Invalid("fi_domain without an fi_info"));
        }
        let obj = Box::into_raw(Box::new(Domain {
            fid: ffi::fid_domain {
                fid: object::fid(ffi::FI_CLASS_DOMAIN, context, &DOMAIN_OPS),
                ops: ops_ptr(&DOMAIN_OPS_DOMAIN),
                mr: ops_ptr(&DOMAIN_OPS_MR),
            },
        }));
        // SAFETY: obj was just leaked; its fid_domain is what the caller gets.
        unsafe { object::give(domain, &mut (*obj).fid) }.inspect_err(|_| {
            // SAFETY: obj was leaked above and never handed out.
            drop(unsafe { Box::from_raw(obj) })
        })
    })
}

unsafe extern "C" fn fabric_domain2(
    fabric: *mut ffi::fid_fabric,
    info: *mut ffi::fi_info,
    domain: *mut *mut ffi::fid_domain,
    _flags: u64,
    context: *mut c_void,
) -> c_int {
    // SAFETY: the same contract as fi_domain.
    unsafe { fabric_domain(fabric, info, domain, context) }
}

unsafe extern "C" fn domain_close(fid: *mut ffi::fid) -> c_int {
    // SAFETY: libfabric passes the fid to close; object::close checks its class.
    guard("fi_close(domain)", || unsafe {
        object::close::<Domain>(fid, &DOMAIN_OPS, "domain")
    })
}

unsafe extern "C" fn domain_endpoint2(
    domain: *mut ffi::fid_domain,
    info: *mut ffi::fi_info,
    ep: *mut *mut ffi::fid_ep,
    _flags: u64,
    context: *mut c_void,
) -> c_int {
    // SAFETY: the same contract as fi_endpoint.
    unsafe { crate::ep_ops::endpoint(domain, info, ep, context) }
}

/// Checks that `domain` is one of this provider's domains.
///
/// # Safety
/// `domain` is null or a live libfabric domain fid.
pub(crate) unsafe fn check_domain(domain: *mut ffi::fid_domain) -> Result<(), FiError> {
    // SAFETY: the caller's guarantee; the class is checked.
    unsafe { object::object::<Domain>(domain as *const ffi::fid, &DOMAIN_OPS, "domain") }
        .map(|_| ())
}
