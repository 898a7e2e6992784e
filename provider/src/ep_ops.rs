//! The endpoint's C face: `fi_endpoint` and the ops tables of `struct fid_ep` for the object
//! itself (fid, ep, cm); the data path (msg, tagged) is in `ep_data.rs`. Each entry point
//! checks the fid's class, catches panics, and calls the rules in `ep.rs`. RMA, atomics and collectives are not offered (`fi_getinfo` refuses those
//! capabilities), so their tables are null.

use std::os::raw::{c_int, c_void};
use std::sync::Arc;

use crate::cq::Progress;
use crate::ep::EpShared;
use crate::error::{guard, guard_count, FiError};
use crate::ffi;
use crate::getinfo::QUEUE_SIZE;
use crate::object::{self, enosys, no_ops_open, no_ops_set, no_tostr, ops_ptr};
use crate::transport;

/// An open endpoint (`struct fid_ep` first).
#[repr(C)]
pub struct Ep {
    fid: ffi::fid_ep,
    shared: Arc<EpShared>,
}

static EP_OPS: ffi::fi_ops = ffi::fi_ops {
    size: std::mem::size_of::<ffi::fi_ops>(),
    close: Some(ep_close),
    bind: Some(ep_bind),
    control: Some(ep_control),
    ops_open: Some(no_ops_open),
    tostr: Some(no_tostr),
    ops_set: Some(no_ops_set),
};
static EP_OPS_EP: ffi::fi_ops_ep = ffi::fi_ops_ep {
    size: std::mem::size_of::<ffi::fi_ops_ep>(),
    cancel: Some(ep_cancel),
    getopt: Some(no_getopt),
    setopt: Some(no_setopt),
    tx_ctx: Some(no_tx_ctx),
    rx_ctx: Some(no_rx_ctx),
    rx_size_left: Some(size_left),
    tx_size_left: Some(size_left),
};
static EP_OPS_CM: ffi::fi_ops_cm = ffi::fi_ops_cm {
    size: std::mem::size_of::<ffi::fi_ops_cm>(),
    setname: Some(no_setname),
    getname: Some(ep_getname),
    getpeer: Some(no_getpeer),
    connect: Some(no_connect),
    listen: Some(no_listen),
    accept: Some(no_accept),
    reject: Some(no_reject),
    shutdown: Some(no_shutdown),
    join: Some(no_join),
};

enosys! {
    no_tx_ctx(s: *mut ffi::fid_ep, i: c_int, a: *mut ffi::fi_tx_attr, t: *mut *mut ffi::fid_ep, c: *mut c_void) -> c_int;
    no_rx_ctx(s: *mut ffi::fid_ep, i: c_int, a: *mut ffi::fi_rx_attr, r: *mut *mut ffi::fid_ep, c: *mut c_void) -> c_int;
    no_setname(f: ffi::fid_t, a: *mut c_void, l: usize) -> c_int;
    no_getpeer(e: *mut ffi::fid_ep, a: *mut c_void, l: *mut usize) -> c_int;
    no_connect(e: *mut ffi::fid_ep, a: *const c_void, p: *const c_void, l: usize) -> c_int;
    no_listen(p: *mut ffi::fid_pep) -> c_int;
    no_accept(e: *mut ffi::fid_ep, p: *const c_void, l: usize) -> c_int;
    no_reject(p: *mut ffi::fid_pep, h: ffi::fid_t, q: *const c_void, l: usize) -> c_int;
    no_shutdown(e: *mut ffi::fid_ep, f: u64) -> c_int;
    no_join(e: *mut ffi::fid_ep, a: *const c_void, f: u64, m: *mut *mut ffi::fid_mc, c: *mut c_void) -> c_int;
}

unsafe extern "C" fn no_getopt(
    _f: ffi::fid_t,
    _l: c_int,
    _o: c_int,
    _v: *mut c_void,
    _n: *mut usize,
) -> c_int {
    -(ffi::FI_ENOPROTOOPT as c_int)
}

unsafe extern "C" fn no_setopt(
    _f: ffi::fid_t,
    _l: c_int,
    _o: c_int,
    _v: *const c_void,
    _n: usize,
) -> c_int {
    -(ffi::FI_ENOPROTOOPT as c_int)
}

unsafe extern "C" fn size_left(_ep: *mut ffi::fid_ep) -> isize {
    QUEUE_SIZE as isize
}

/// The endpoint behind `fid`.
///
/// # Safety
/// `fid` is null or a live libfabric fid.
pub(crate) unsafe fn shared<'a>(fid: *const ffi::fid) -> Result<&'a Arc<EpShared>, FiError> {
    // SAFETY: the caller's guarantee; the class is checked.
    Ok(&unsafe { object::object::<Ep>(fid, &EP_OPS, "endpoint")? }.shared)
}

/// `fi_endpoint`: an RDM endpoint over the transport `VFMIG_FI_TRANSPORT` names.
pub(crate) unsafe extern "C" fn endpoint(
    domain: *mut ffi::fid_domain,
    info: *mut ffi::fi_info,
    ep: *mut *mut ffi::fid_ep,
    context: *mut c_void,
) -> c_int {
    guard("fi_endpoint", || {
        // SAFETY: libfabric passes the domain's fid (checked by class).
        unsafe { crate::fabric::check_domain(domain)? };
        if info.is_null() {
            return Err(FiError::Invalid("fi_endpoint without an fi_info"));
        }
        // SAFETY: info is a valid fi_info (checked non-null); its attributes are null or valid.
        let hints = unsafe { crate::getinfo::Hints::from_c(info) };
        if hints.ep.type_ != ffi::FI_EP_RDM {
            return Err(FiError::Invalid("an endpoint type other than FI_EP_RDM"));
        }
        let directed = hints.caps == 0 || hints.caps & ffi::FI_DIRECTED_RECV != 0;
        let transport = transport::open_from_env().map_err(FiError::Transport)?;
        let shared = EpShared::new(transport, directed, hints.tx.op_flags, hints.rx.op_flags);
        let obj = Box::into_raw(Box::new(Ep {
            fid: ffi::fid_ep {
                fid: object::fid(ffi::FI_CLASS_EP, context, &EP_OPS),
                ops: ops_ptr(&EP_OPS_EP),
                cm: ops_ptr(&EP_OPS_CM),
                msg: ops_ptr(&crate::ep_data::EP_OPS_MSG),
                rma: std::ptr::null_mut(),
                tagged: ops_ptr(&crate::ep_data::EP_OPS_TAGGED),
                atomic: std::ptr::null_mut(),
                collective: std::ptr::null_mut(),
            },
            shared,
        }));
        // SAFETY: obj was just leaked; its fid_ep is what the caller gets.
        unsafe { object::give(ep, &mut (*obj).fid) }.inspect_err(|_| {
            // SAFETY: obj was leaked above and never handed out.
            drop(unsafe { Box::from_raw(obj) })
        })
    })
}

unsafe extern "C" fn ep_close(fid: *mut ffi::fid) -> c_int {
    // SAFETY: libfabric passes the fid to close; object::close checks its class.
    guard("fi_close(ep)", || unsafe {
        object::close::<Ep>(fid, &EP_OPS, "endpoint")
    })
}

unsafe extern "C" fn ep_bind(fid: *mut ffi::fid, bfid: *mut ffi::fid, flags: u64) -> c_int {
    guard("fi_ep_bind", || {
        // SAFETY: libfabric passes the endpoint's fid (checked by class).
        let ep = unsafe { shared(fid)? };
        if bfid.is_null() {
            return Err(FiError::Invalid("fi_ep_bind without an object"));
        }
        // SAFETY: bfid is a live fid (non-null); its class is read, then checked by its ops.
        match unsafe { (*bfid).fclass } as u32 {
            ffi::FI_CLASS_CQ => {
                // SAFETY: as above.
                let cq = unsafe { crate::cq::inner_of(bfid)? };
                ep.lock().bind_cq(cq.clone(), flags)?;
                let progress: Arc<dyn Progress> = ep.clone();
                cq.bind(Arc::downgrade(&progress));
                Ok(())
            }
            ffi::FI_CLASS_AV => {
                // SAFETY: as above.
                let av = unsafe { crate::av::table_of(bfid)? };
                ep.lock().bind_av(av);
                Ok(())
            }
            _ => Err(FiError::NotImplemented(
                "binding that object to an endpoint",
            )),
        }
    })
}

unsafe extern "C" fn ep_control(fid: *mut ffi::fid, command: c_int, _arg: *mut c_void) -> c_int {
    guard("fi_control(ep)", || {
        // SAFETY: libfabric passes the endpoint's fid (checked by class).
        let ep = unsafe { shared(fid)? };
        match command as u32 {
            ffi::FI_ENABLE => ep.lock().enable(),
            _ => Err(FiError::NotImplemented("that endpoint control command")),
        }
    })
}

unsafe extern "C" fn ep_cancel(fid: ffi::fid_t, context: *mut c_void) -> isize {
    guard_count("fi_cancel", || {
        // SAFETY: libfabric passes the endpoint's fid (checked by class).
        unsafe { shared(fid)? }.lock().cancel(context).map(|()| 0)
    })
}

unsafe extern "C" fn ep_getname(fid: ffi::fid_t, addr: *mut c_void, addrlen: *mut usize) -> c_int {
    guard("fi_getname", || {
        // SAFETY: libfabric passes the endpoint's fid (checked by class).
        let ep = unsafe { shared(fid)? }.lock();
        // SAFETY: addrlen is a valid in/out length and addr has *addrlen bytes.
        unsafe { crate::av::write_name(ep.name(), addr, addrlen, "fi_getname") }
    })
}
