//! The completion queue: entries in the format chosen at `fi_cq_open` (context, msg, data or
//! tagged; `FI_CQ_FORMAT_UNSPEC` is context), error entries read with `fi_cq_readerr`.
//!
//! Progress is manual: `fi_cq_read` first progresses every endpoint bound to the queue (their
//! arrivals are matched and completed), then returns what is there. An error entry at the head
//! makes `fi_cq_read` return `-FI_EAVAIL` until `fi_cq_readerr` takes it. No wait object:
//! `fi_cq_sread` is `-FI_ENOSYS`.

use std::collections::VecDeque;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{guard, guard_count, FiError};
use crate::ffi;
use crate::object::{self, enosys, fi_ops, no_bind, no_control, ops_ptr};

/// One completion, in the widest (tagged) shape; `error` makes it an error entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub context: usize,
    pub flags: u64,
    pub len: usize,
    pub buf: usize,
    pub data: u64,
    pub tag: u64,
    pub src: ffi::fi_addr_t,
    /// `(FI_E* number, bytes that did not fit)`.
    pub error: Option<(u32, usize)>,
}

/// What a completion queue asks of the endpoints bound to it when it is read.
pub trait Progress: Send + Sync {
    fn progress(&self);
}

/// The queue behind a `fid_cq`, shared with the endpoints bound to it.
pub struct CqInner {
    stride: usize,
    queue: Mutex<VecDeque<Entry>>,
    bound: Mutex<Vec<Weak<dyn Progress>>>,
}

impl CqInner {
    /// A queue whose entries are `format`'s (`-FI_ENOSYS` for formats it does not write).
    pub fn new(format: ffi::fi_cq_format) -> Result<CqInner, FiError> {
        let stride = match format {
            ffi::FI_CQ_FORMAT_UNSPEC | ffi::FI_CQ_FORMAT_CONTEXT => {
                std::mem::size_of::<ffi::fi_cq_entry>()
            }
            ffi::FI_CQ_FORMAT_MSG => std::mem::size_of::<ffi::fi_cq_msg_entry>(),
            ffi::FI_CQ_FORMAT_DATA => std::mem::size_of::<ffi::fi_cq_data_entry>(),
            ffi::FI_CQ_FORMAT_TAGGED => std::mem::size_of::<ffi::fi_cq_tagged_entry>(),
            _ => return Err(FiError::NotImplemented("that completion format")),
        };
        Ok(CqInner {
            stride,
            queue: Mutex::default(),
            bound: Mutex::default(),
        })
    }

    /// Adds a completion.
    pub fn push(&self, entry: Entry) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(entry);
    }

    /// Binds an endpoint: it is progressed when the queue is read.
    pub fn bind(&self, ep: Weak<dyn Progress>) {
        self.bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ep);
    }

    /// Progresses the bound endpoints (those still open).
    pub fn progress(&self) {
        let eps: Vec<_> = {
            let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
            bound.retain(|w| w.strong_count() > 0);
            bound.iter().filter_map(Weak::upgrade).collect()
        };
        for ep in eps {
            ep.progress();
        }
    }

    /// Takes up to `max` successful entries from the head; `Again` if there is none,
    /// `ErrorAvailable` if an error entry is first.
    pub fn take(&self, max: usize) -> Result<Vec<Entry>, FiError> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        match q.front() {
            None => return Err(FiError::Again),
            Some(e) if e.error.is_some() => return Err(FiError::ErrorAvailable),
            Some(_) => {}
        }
        let mut out = Vec::new();
        while out.len() < max && q.front().is_some_and(|e| e.error.is_none()) {
            out.extend(q.pop_front());
        }
        Ok(out)
    }

    /// Takes the error entry at the head, if there is one.
    pub fn take_error(&self) -> Option<Entry> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.front()?.error.is_some() {
            q.pop_front()
        } else {
            None
        }
    }
}

/// An open completion queue (`struct fid_cq` first).
#[repr(C)]
pub struct Cq {
    fid: ffi::fid_cq,
    pub(crate) inner: Arc<CqInner>,
}

pub(crate) static CQ_OPS: ffi::fi_ops = fi_ops(cq_close, no_bind, no_control);
static CQ_OPS_CQ: ffi::fi_ops_cq = ffi::fi_ops_cq {
    size: std::mem::size_of::<ffi::fi_ops_cq>(),
    read: Some(cq_read),
    readfrom: Some(cq_readfrom),
    readerr: Some(cq_readerr),
    sread: Some(no_sread),
    sreadfrom: Some(no_sreadfrom),
    signal: Some(no_signal),
    strerror: Some(cq_strerror),
};

enosys! {
    no_sread(cq: *mut ffi::fid_cq, b: *mut c_void, n: usize, c: *const c_void, t: c_int) -> isize;
    no_sreadfrom(cq: *mut ffi::fid_cq, b: *mut c_void, n: usize, s: *mut ffi::fi_addr_t, c: *const c_void, t: c_int) -> isize;
    no_signal(cq: *mut ffi::fid_cq) -> c_int;
}

/// The queue of the completion queue `cq`.
///
/// # Safety
/// `cq` is null or a live libfabric fid.
pub(crate) unsafe fn inner_of(cq: *const ffi::fid) -> Result<Arc<CqInner>, FiError> {
    // SAFETY: the caller's guarantee; the class is checked.
    Ok(
        unsafe { object::object::<Cq>(cq, &CQ_OPS, "completion queue")? }
            .inner
            .clone(),
    )
}

pub(crate) unsafe extern "C" fn cq_open(
    domain: *mut ffi::fid_domain,
    attr: *mut ffi::fi_cq_attr,
    cq: *mut *mut ffi::fid_cq,
    context: *mut c_void,
) -> c_int {
    guard("fi_cq_open", || {
        // SAFETY: libfabric passes the domain's fid (checked by class).
        unsafe { crate::fabric::check_domain(domain)? };
        if attr.is_null() {
            return Err(FiError::Invalid("fi_cq_open without attributes"));
        }
        // SAFETY: non-null attributes are valid.
        let attr = unsafe { &*attr };
        if !matches!(attr.wait_obj, ffi::FI_WAIT_NONE | ffi::FI_WAIT_UNSPEC) {
            return Err(FiError::NotImplemented("completion queue wait objects"));
        }
        let obj = Box::into_raw(Box::new(Cq {
            fid: ffi::fid_cq {
                fid: object::fid(ffi::FI_CLASS_CQ, context, &CQ_OPS),
                ops: ops_ptr(&CQ_OPS_CQ),
            },
            inner: Arc::new(CqInner::new(attr.format)?),
        }));
        // SAFETY: obj was just leaked; its fid_cq is what the caller gets.
        unsafe { object::give(cq, &mut (*obj).fid) }.inspect_err(|_| {
            // SAFETY: obj was leaked above and never handed out.
            drop(unsafe { Box::from_raw(obj) })
        })
    })
}

unsafe extern "C" fn cq_close(fid: *mut ffi::fid) -> c_int {
    // SAFETY: libfabric passes the fid to close; object::close checks its class.
    guard("fi_close(cq)", || unsafe {
        object::close::<Cq>(fid, &CQ_OPS, "completion queue")
    })
}

unsafe extern "C" fn cq_read(cq: *mut ffi::fid_cq, buf: *mut c_void, count: usize) -> isize {
    // SAFETY: the same contract, without source addresses.
    unsafe { cq_readfrom(cq, buf, count, std::ptr::null_mut()) }
}

unsafe extern "C" fn cq_readfrom(
    cq: *mut ffi::fid_cq,
    buf: *mut c_void,
    count: usize,
    src_addr: *mut ffi::fi_addr_t,
) -> isize {
    guard_count("fi_cq_read", || {
        // SAFETY: libfabric passes the cq's fid (checked by class).
        let inner = unsafe { inner_of(cq as *const ffi::fid)? };
        if buf.is_null() && count > 0 {
            return Err(FiError::Invalid("fi_cq_read without a buffer"));
        }
        inner.progress();
        let entries = inner.take(count)?;
        for (i, e) in entries.iter().enumerate() {
            let wide = ffi::fi_cq_tagged_entry {
                op_context: e.context as *mut c_void,
                flags: e.flags,
                len: e.len,
                buf: e.buf as *mut c_void,
                data: e.data,
                tag: e.tag,
            };
            // SAFETY: buf has room for count entries of the queue's format; each format is a
            // prefix of fi_cq_tagged_entry, so its first `stride` bytes are that entry.
            unsafe {
                let dst = (buf as *mut u8).add(i * inner.stride);
                std::ptr::copy_nonoverlapping(&wide as *const _ as *const u8, dst, inner.stride);
                if !src_addr.is_null() {
                    *src_addr.add(i) = e.src;
                }
            }
        }
        Ok(entries.len() as isize)
    })
}

unsafe extern "C" fn cq_readerr(
    cq: *mut ffi::fid_cq,
    buf: *mut ffi::fi_cq_err_entry,
    _flags: u64,
) -> isize {
    guard_count("fi_cq_readerr", || {
        // SAFETY: libfabric passes the cq's fid (checked by class).
        let inner = unsafe { inner_of(cq as *const ffi::fid)? };
        if buf.is_null() {
            return Err(FiError::Invalid("fi_cq_readerr without a buffer"));
        }
        let e = inner.take_error().ok_or(FiError::Again)?;
        let (err, olen) = e.error.unwrap_or_default();
        // SAFETY: buf is a valid fi_cq_err_entry (API >= 1.5: it has err_data_size). No
        // provider error data: err_data_size 0 tells the caller so.
        unsafe {
            let out = &mut *buf;
            out.op_context = e.context as *mut c_void;
            out.flags = e.flags;
            out.len = e.len;
            out.buf = e.buf as *mut c_void;
            out.data = e.data;
            out.tag = e.tag;
            out.olen = olen;
            out.err = err as c_int;
            out.prov_errno = 0;
            out.err_data_size = 0;
        }
        Ok(1)
    })
}

unsafe extern "C" fn cq_strerror(
    _cq: *mut ffi::fid_cq,
    prov_errno: c_int,
    _err_data: *const c_void,
    buf: *mut c_char,
    len: usize,
) -> *const c_char {
    let text = format!("vfmig provider error {prov_errno}");
    if !buf.is_null() && len > 0 {
        let n = text.len().min(len - 1);
        // SAFETY: buf has len bytes; n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, n);
            *buf.add(n) = 0;
        }
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(context: usize) -> Entry {
        Entry {
            context,
            ..Entry::default()
        }
    }

    #[test]
    fn formats_are_prefixes_of_the_tagged_entry() {
        assert_eq!(CqInner::new(ffi::FI_CQ_FORMAT_CONTEXT).unwrap().stride, 8);
        assert_eq!(CqInner::new(ffi::FI_CQ_FORMAT_MSG).unwrap().stride, 24);
        assert_eq!(CqInner::new(ffi::FI_CQ_FORMAT_DATA).unwrap().stride, 40);
        assert_eq!(CqInner::new(ffi::FI_CQ_FORMAT_TAGGED).unwrap().stride, 48);
        assert!(CqInner::new(99).is_err());
    }

    #[test]
    fn an_error_entry_stops_reads_until_it_is_taken() {
        let q = CqInner::new(ffi::FI_CQ_FORMAT_TAGGED).unwrap();
        assert!(matches!(q.take(4), Err(FiError::Again)));
        q.push(ok(1));
        q.push(Entry {
            error: Some((ffi::FI_ETRUNC, 6)),
            ..ok(2)
        });
        q.push(ok(3));
        assert_eq!(q.take(4).unwrap(), vec![ok(1)]);
        assert!(matches!(q.take(4), Err(FiError::ErrorAvailable)));
        assert_eq!(q.take_error().unwrap().error, Some((ffi::FI_ETRUNC, 6)));
        assert_eq!(q.take_error(), None);
        assert_eq!(q.take(4).unwrap(), vec![ok(3)]);
    }
}
