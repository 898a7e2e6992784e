//! The endpoint's data path at the C ABI: the `fi_ops_msg` and `fi_ops_tagged` tables of
//! `struct fid_ep` (send, inject, senddata, recv, recvmsg with peek / claim / discard). One
//! buffer per operation (`iov_limit` 1).

use std::os::raw::c_void;

use crate::ep::RecvMode;
use crate::ep_ops::shared;
use crate::error::{guard_count, FiError};
use crate::ffi;
use crate::tagmatch::Selector;
use crate::transport::Kind;

pub(crate) static EP_OPS_MSG: ffi::fi_ops_msg = ffi::fi_ops_msg {
    size: std::mem::size_of::<ffi::fi_ops_msg>(),
    recv: Some(msg_recv),
    recvv: Some(msg_recvv),
    recvmsg: Some(msg_recvmsg),
    send: Some(msg_send),
    sendv: Some(msg_sendv),
    sendmsg: Some(msg_sendmsg),
    inject: Some(msg_inject),
    senddata: Some(msg_senddata),
    injectdata: Some(msg_injectdata),
};
pub(crate) static EP_OPS_TAGGED: ffi::fi_ops_tagged = ffi::fi_ops_tagged {
    size: std::mem::size_of::<ffi::fi_ops_tagged>(),
    recv: Some(tagged_recv),
    recvv: Some(tagged_recvv),
    recvmsg: Some(tagged_recvmsg),
    send: Some(tagged_send),
    sendv: Some(tagged_sendv),
    sendmsg: Some(tagged_sendmsg),
    inject: Some(tagged_inject),
    senddata: Some(tagged_senddata),
    injectdata: Some(tagged_injectdata),
};

/// The one buffer of an iov list of at most one element.
///
/// # Safety
/// `iov` has `count` valid elements.
unsafe fn single_iov(
    iov: *const ffi::iovec,
    count: usize,
) -> Result<(*mut c_void, usize), FiError> {
    match count {
        0 => Ok((std::ptr::null_mut(), 0)),
        // SAFETY: iov has one valid element.
        1 => Ok(unsafe { ((*iov).iov_base, (*iov).iov_len) }),
        _ => Err(FiError::Invalid("more than one iov (iov_limit is 1)")),
    }
}

/// Posts a receive on the endpoint `ep`.
///
/// # Safety
/// `ep` is null or a live fid; `buf` has `len` bytes, valid until the receive completes.
#[allow(clippy::too_many_arguments)]
unsafe fn recv(
    ep: *mut ffi::fid_ep,
    kind: Kind,
    mode: RecvMode,
    sel: Selector,
    buf: *mut c_void,
    len: usize,
    context: *mut c_void,
    flags: Option<u64>,
) -> isize {
    guard_count("fi_recv", || {
        // SAFETY: libfabric passes the endpoint's fid (checked by class).
        let mut ep = unsafe { shared(ep as *const ffi::fid)? }.lock();
        let flags = flags.unwrap_or(ep.rx_op_flags);
        ep.recv(kind, mode, sel, buf, len, context, flags)
            .map(|()| 0)
    })
}

/// Sends on the endpoint `ep`.
///
/// # Safety
/// `ep` is null or a live fid; `buf` has `len` bytes (copied before this returns).
#[allow(clippy::too_many_arguments)]
unsafe fn send(
    ep: *mut ffi::fid_ep,
    kind: Kind,
    buf: *const c_void,
    len: usize,
    dest: ffi::fi_addr_t,
    tag: u64,
    data: Option<u64>,
    context: *mut c_void,
    flags: Option<u64>,
    inject: bool,
) -> isize {
    guard_count("fi_send", || {
        // SAFETY: libfabric passes the endpoint's fid (checked by class).
        let mut ep = unsafe { shared(ep as *const ffi::fid)? }.lock();
        let payload = if len == 0 {
            &[][..]
        } else if buf.is_null() {
            return Err(FiError::Invalid("a send without a buffer"));
        } else {
            // SAFETY: the caller's buffer has len bytes.
            unsafe { std::slice::from_raw_parts(buf as *const u8, len) }
        };
        let flags = flags.unwrap_or(ep.tx_op_flags);
        ep.send(kind, payload, dest, tag, data, context, flags, inject)
            .map(|()| 0)
    })
}

fn sel(src: ffi::fi_addr_t, tag: u64, ignore: u64) -> Selector {
    Selector { src, tag, ignore }
}

// ---- untagged (fi_msg) -------------------------------------------------------------------

unsafe extern "C" fn msg_recv(
    ep: *mut ffi::fid_ep,
    buf: *mut c_void,
    len: usize,
    _desc: *mut c_void,
    src: ffi::fi_addr_t,
    context: *mut c_void,
) -> isize {
    // SAFETY: libfabric's receive contract (see recv).
    unsafe {
        recv(
            ep,
            Kind::Msg,
            RecvMode::Post,
            sel(src, 0, 0),
            buf,
            len,
            context,
            None,
        )
    }
}

unsafe extern "C" fn msg_recvv(
    ep: *mut ffi::fid_ep,
    iov: *const ffi::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    src: ffi::fi_addr_t,
    context: *mut c_void,
) -> isize {
    // SAFETY: iov has count elements (libfabric's contract).
    match unsafe { single_iov(iov, count) } {
        // SAFETY: libfabric's receive contract (see recv).
        Ok((buf, len)) => unsafe {
            recv(
                ep,
                Kind::Msg,
                RecvMode::Post,
                sel(src, 0, 0),
                buf,
                len,
                context,
                None,
            )
        },
        Err(e) => -(e.errno() as isize),
    }
}

unsafe extern "C" fn msg_recvmsg(
    ep: *mut ffi::fid_ep,
    msg: *const ffi::fi_msg,
    flags: u64,
) -> isize {
    if msg.is_null() {
        return -(ffi::FI_EINVAL as isize);
    }
    // SAFETY: msg is a valid fi_msg whose iov has iov_count elements.
    let (m, iov) = unsafe { (&*msg, single_iov((*msg).msg_iov, (*msg).iov_count)) };
    match iov {
        // SAFETY: libfabric's receive contract (see recv).
        Ok((buf, len)) => unsafe {
            recv(
                ep,
                Kind::Msg,
                RecvMode::Post,
                sel(m.addr, 0, 0),
                buf,
                len,
                m.context,
                Some(flags),
            )
        },
        Err(e) => -(e.errno() as isize),
    }
}

unsafe extern "C" fn msg_send(
    ep: *mut ffi::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    dest: ffi::fi_addr_t,
    context: *mut c_void,
) -> isize {
    // SAFETY: libfabric's send contract (see send).
    unsafe { send(ep, Kind::Msg, buf, len, dest, 0, None, context, None, false) }
}

unsafe extern "C" fn msg_sendv(
    ep: *mut ffi::fid_ep,
    iov: *const ffi::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    dest: ffi::fi_addr_t,
    context: *mut c_void,
) -> isize {
    // SAFETY: iov has count elements (libfabric's contract).
    match unsafe { single_iov(iov, count) } {
        // SAFETY: libfabric's send contract (see send).
        Ok((buf, len)) => unsafe {
            send(ep, Kind::Msg, buf, len, dest, 0, None, context, None, false)
        },
        Err(e) => -(e.errno() as isize),
    }
}

unsafe extern "C" fn msg_sendmsg(
    ep: *mut ffi::fid_ep,
    msg: *const ffi::fi_msg,
    flags: u64,
) -> isize {
    if msg.is_null() {
        return -(ffi::FI_EINVAL as isize);
    }
    // SAFETY: msg is a valid fi_msg whose iov has iov_count elements.
    let (m, iov) = unsafe { (&*msg, single_iov((*msg).msg_iov, (*msg).iov_count)) };
    let data = (flags & ffi::FI_REMOTE_CQ_DATA as u64 != 0).then_some(m.data);
    match iov {
        // SAFETY: libfabric's send contract (see send).
        Ok((buf, len)) => unsafe {
            send(
                ep,
                Kind::Msg,
                buf,
                len,
                m.addr,
                0,
                data,
                m.context,
                Some(flags),
                false,
            )
        },
        Err(e) => -(e.errno() as isize),
    }
}

unsafe extern "C" fn msg_inject(
    ep: *mut ffi::fid_ep,
    buf: *const c_void,
    len: usize,
    dest: ffi::fi_addr_t,
) -> isize {
    // SAFETY: libfabric's send contract (see send).
    unsafe {
        send(
            ep,
            Kind::Msg,
            buf,
            len,
            dest,
            0,
            None,
            std::ptr::null_mut(),
            None,
            true,
        )
    }
}

unsafe extern "C" fn msg_senddata(
    ep: *mut ffi::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    data: u64,
    dest: ffi::fi_addr_t,
    context: *mut c_void,
) -> isize {
    // SAFETY: libfabric's send contract (see send).
    unsafe {
        send(
            ep,
            Kind::Msg,
            buf,
            len,
            dest,
            0,
            Some(data),
            context,
            None,
            false,
        )
    }
}

unsafe extern "C" fn msg_injectdata(
    ep: *mut ffi::fid_ep,
    buf: *const c_void,
    len: usize,
    data: u64,
    dest: ffi::fi_addr_t,
) -> isize {
    // SAFETY: libfabric's send contract (see send).
    unsafe {
        send(
            ep,
            Kind::Msg,
            buf,
            len,
            dest,
            0,
            Some(data),
            std::ptr::null_mut(),
            None,
            true,
        )
    }
}

// ---- tagged (fi_tagged) ------------------------------------------------------------------

unsafe extern "C" fn tagged_recv(
    ep: *mut ffi::fid_ep,
    buf: *mut c_void,
    len: usize,
    _desc: *mut c_void,
    src: ffi::fi_addr_t,
    tag: u64,
    ignore: u64,
    context: *mut c_void,
) -> isize {
    // SAFETY: libfabric's receive contract (see recv).
    unsafe {
        recv(
            ep,
            Kind::Tagged,
            RecvMode::Post,
            sel(src, tag, ignore),
            buf,
            len,
            context,
            None,
        )
    }
}

unsafe extern "C" fn tagged_recvv(
    ep: *mut ffi::fid_ep,
    iov: *const ffi::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    src: ffi::fi_addr_t,
    tag: u64,
    ignore: u64,
    context: *mut c_void,
) -> isize {
    // SAFETY: iov has count elements (libfabric's contract).
    match unsafe { single_iov(iov, count) } {
        // SAFETY: libfabric's receive contract (see recv).
        Ok((buf, len)) => unsafe {
            recv(
                ep,
                Kind::Tagged,
                RecvMode::Post,
                sel(src, tag, ignore),
                buf,
                len,
                context,
                None,
            )
        },
        Err(e) => -(e.errno() as isize),
    }
}

unsafe extern "C" fn tagged_recvmsg(
    ep: *mut ffi::fid_ep,
    msg: *const ffi::fi_msg_tagged,
    flags: u64,
) -> isize {
    if msg.is_null() {
        return -(ffi::FI_EINVAL as isize);
    }
    // SAFETY: msg is a valid fi_msg_tagged whose iov has iov_count elements.
    let (m, iov) = unsafe { (&*msg, single_iov((*msg).msg_iov, (*msg).iov_count)) };
    let mode = RecvMode::from_flags(flags);
    match iov {
        // SAFETY: libfabric's receive contract (see recv).
        Ok((buf, len)) => unsafe {
            recv(
                ep,
                Kind::Tagged,
                mode,
                sel(m.addr, m.tag, m.ignore),
                buf,
                len,
                m.context,
                Some(flags),
            )
        },
        Err(e) => -(e.errno() as isize),
    }
}

unsafe extern "C" fn tagged_send(
    ep: *mut ffi::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    dest: ffi::fi_addr_t,
    tag: u64,
    context: *mut c_void,
) -> isize {
    // SAFETY: libfabric's send contract (see send).
    unsafe {
        send(
            ep,
            Kind::Tagged,
            buf,
            len,
            dest,
            tag,
            None,
            context,
            None,
            false,
        )
    }
}

unsafe extern "C" fn tagged_sendv(
    ep: *mut ffi::fid_ep,
    iov: *const ffi::iovec,
    _desc: *mut *mut c_void,
    count: usize,
    dest: ffi::fi_addr_t,
    tag: u64,
    context: *mut c_void,
) -> isize {
    // SAFETY: iov has count elements (libfabric's contract).
    match unsafe { single_iov(iov, count) } {
        // SAFETY: libfabric's send contract (see send).
        Ok((buf, len)) => unsafe {
            send(
                ep,
                Kind::Tagged,
                buf,
                len,
                dest,
                tag,
                None,
                context,
                None,
                false,
            )
        },
        Err(e) => -(e.errno() as isize),
    }
}

unsafe extern "C" fn tagged_sendmsg(
    ep: *mut ffi::fid_ep,
    msg: *const ffi::fi_msg_tagged,
    flags: u64,
) -> isize {
    if msg.is_null() {
        return -(ffi::FI_EINVAL as isize);
    }
    // SAFETY: msg is a valid fi_msg_tagged whose iov has iov_count elements.
    let (m, iov) = unsafe { (&*msg, single_iov((*msg).msg_iov, (*msg).iov_count)) };
    let data = (flags & ffi::FI_REMOTE_CQ_DATA as u64 != 0).then_some(m.data);
    match iov {
        // SAFETY: libfabric's send contract (see send).
        Ok((buf, len)) => unsafe {
            send(
                ep,
                Kind::Tagged,
                buf,
                len,
                m.addr,
                m.tag,
                data,
                m.context,
                Some(flags),
                false,
            )
        },
        Err(e) => -(e.errno() as isize),
    }
}

unsafe extern "C" fn tagged_inject(
    ep: *mut ffi::fid_ep,
    buf: *const c_void,
    len: usize,
    dest: ffi::fi_addr_t,
    tag: u64,
) -> isize {
    // SAFETY: libfabric's send contract (see send).
    unsafe {
        send(
            ep,
            Kind::Tagged,
            buf,
            len,
            dest,
            tag,
            None,
            std::ptr::null_mut(),
            None,
            true,
        )
    }
}

unsafe extern "C" fn tagged_senddata(
    ep: *mut ffi::fid_ep,
    buf: *const c_void,
    len: usize,
    _desc: *mut c_void,
    data: u64,
    dest: ffi::fi_addr_t,
    tag: u64,
    context: *mut c_void,
) -> isize {
    // SAFETY: libfabric's send contract (see send).
    unsafe {
        send(
            ep,
            Kind::Tagged,
            buf,
            len,
            dest,
            tag,
            Some(data),
            context,
            None,
            false,
        )
    }
}

unsafe extern "C" fn tagged_injectdata(
    ep: *mut ffi::fid_ep,
    buf: *const c_void,
    len: usize,
    data: u64,
    dest: ffi::fi_addr_t,
    tag: u64,
) -> isize {
    // SAFETY: libfabric's send contract (see send).
    unsafe {
        send(
            ep,
            Kind::Tagged,
            buf,
            len,
            dest,
            tag,
            Some(data),
            std::ptr::null_mut(),
            None,
            true,
        )
    }
}
