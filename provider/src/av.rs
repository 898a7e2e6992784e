//! The address vector: peers' endpoint names (what their `fi_getname` returned) by `fi_addr_t`.
//!
//! An address is `FI_ADDR_STR`: the peer endpoint's name, NUL-padded to [`ADDR_LEN`] bytes, so
//! that the packed arrays Open MPI passes to `fi_av_insert` (count × the length `fi_getname`
//! returned) are read slot by slot. `fi_addr_t` values are indices, so `FI_AV_MAP` and
//! `FI_AV_TABLE` behave alike (a table's indices are consecutive from 0, as required).

use std::collections::HashMap;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex};

use crate::error::{guard, FiError};
use crate::ffi;
use crate::object::{self, enosys, fi_ops, no_bind, no_control, ops_ptr};

/// The length of an endpoint address (`FI_NAME_MAX`).
pub const ADDR_LEN: usize = ffi::FI_NAME_MAX as usize;

/// An endpoint's name as an address: the name, NUL-padded to [`ADDR_LEN`] bytes.
pub fn encode_name(name: &str) -> Result<[u8; ADDR_LEN], FiError> {
    let mut out = [0u8; ADDR_LEN];
    if name.is_empty() || name.len() >= ADDR_LEN || name.contains('\0') {
        return Err(FiError::Invalid(
            "an endpoint name that does not fit an address",
        ));
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

/// The name in an address slot, if it holds one.
pub fn decode_name(slot: &[u8]) -> Option<String> {
    let end = slot.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&slot[..end]).ok()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The names behind the `fi_addr_t` values of one address vector.
#[derive(Debug, Default)]
pub struct AvTable {
    names: Vec<Option<String>>,
    by_name: HashMap<String, ffi::fi_addr_t>,
}

impl AvTable {
    /// Adds `name`; its `fi_addr_t` is the next index.
    pub fn insert(&mut self, name: String) -> ffi::fi_addr_t {
        let addr = self.names.len() as ffi::fi_addr_t;
        self.by_name.insert(name.clone(), addr);
        self.names.push(Some(name));
        addr
    }

    /// Removes `addr`; its index is not reused.
    pub fn remove(&mut self, addr: ffi::fi_addr_t) -> bool {
        match self.names.get_mut(addr as usize).and_then(Option::take) {
            Some(name) => {
                self.by_name.remove(&name);
                true
            }
            None => false,
        }
    }

    /// The names inserted from index `from` on (removed ones skipped), and the next index.
    pub fn names_from(&self, from: usize) -> (Vec<String>, usize) {
        let names = self.names.iter().skip(from).flatten().cloned().collect();
        (names, self.names.len())
    }

    /// The name behind `addr`.
    pub fn name(&self, addr: ffi::fi_addr_t) -> Option<&str> {
        self.names.get(addr as usize)?.as_deref()
    }

    /// The `fi_addr_t` of `name` (`FI_ADDR_NOTAVAIL` if it was never inserted).
    pub fn addr_of(&self, name: &str) -> ffi::fi_addr_t {
        self.by_name
            .get(name)
            .copied()
            .unwrap_or(ffi::FI_ADDR_UNSPEC)
    }
}

/// An open address vector (`struct fid_av` first).
#[repr(C)]
pub struct Av {
    fid: ffi::fid_av,
    pub(crate) table: Arc<Mutex<AvTable>>,
}

pub(crate) static AV_OPS: ffi::fi_ops = fi_ops(av_close, no_bind, no_control);
static AV_OPS_AV: ffi::fi_ops_av = ffi::fi_ops_av {
    size: std::mem::size_of::<ffi::fi_ops_av>(),
    insert: Some(av_insert),
    insertsvc: Some(no_insertsvc),
    insertsym: Some(no_insertsym),
    remove: Some(av_remove),
    lookup: Some(av_lookup),
    straddr: Some(av_straddr),
    av_set: Some(no_av_set),
};

enosys! {
    no_insertsvc(av: *mut ffi::fid_av, n: *const c_char, s: *const c_char, a: *mut ffi::fi_addr_t, f: u64, c: *mut c_void) -> c_int;
    no_insertsym(av: *mut ffi::fid_av, n: *const c_char, nc: usize, s: *const c_char, sc: usize, a: *mut ffi::fi_addr_t, f: u64, c: *mut c_void) -> c_int;
    no_av_set(av: *mut ffi::fid_av, a: *mut ffi::fi_av_set_attr, s: *mut *mut ffi::fid_av_set, c: *mut c_void) -> c_int;
}

/// The table of the address vector `av`.
///
/// # Safety
/// `av` is null or a live libfabric fid.
pub(crate) unsafe fn table_of(av: *const ffi::fid) -> Result<Arc<Mutex<AvTable>>, FiError> {
    // SAFETY: the caller's guarantee; the class is checked.
    Ok(
        unsafe { object::object::<Av>(av, &AV_OPS, "address vector")? }
            .table
            .clone(),
    )
}

pub(crate) unsafe extern "C" fn av_open(
    domain: *mut ffi::fid_domain,
    attr: *mut ffi::fi_av_attr,
    av: *mut *mut ffi::fid_av,
    context: *mut c_void,
) -> c_int {
    guard("fi_av_open", || {
        // SAFETY: libfabric passes the domain's fid (checked by class).
        unsafe { crate::fabric::check_domain(domain)? };
        if !attr.is_null() {
            // SAFETY: non-null attributes are valid.
            let attr = unsafe { &*attr };
            if !matches!(
                attr.type_,
                ffi::FI_AV_UNSPEC | ffi::FI_AV_MAP | ffi::FI_AV_TABLE
            ) {
                return Err(FiError::Invalid("an address vector type"));
            }
            if attr.flags & ffi::FI_EVENT as u64 != 0 || !attr.name.is_null() {
                return Err(FiError::NotImplemented(
                    "asynchronous or named address vectors",
                ));
            }
        }
        let obj = Box::into_raw(Box::new(Av {
            fid: ffi::fid_av {
                fid: object::fid(ffi::FI_CLASS_AV, context, &AV_OPS),
                ops: ops_ptr(&AV_OPS_AV),
            },
            table: Arc::default(),
        }));
        // SAFETY: obj was just leaked; its fid_av is what the caller gets.
        unsafe { object::give(av, &mut (*obj).fid) }.inspect_err(|_| {
            // SAFETY: obj was leaked above and never handed out.
            drop(unsafe { Box::from_raw(obj) })
        })
    })
}

unsafe extern "C" fn av_close(fid: *mut ffi::fid) -> c_int {
    // SAFETY: libfabric passes the fid to close; object::close checks its class.
    guard("fi_close(av)", || unsafe {
        object::close::<Av>(fid, &AV_OPS, "address vector")
    })
}

unsafe extern "C" fn av_insert(
    av: *mut ffi::fid_av,
    addr: *const c_void,
    count: usize,
    fi_addr: *mut ffi::fi_addr_t,
    _flags: u64,
    _context: *mut c_void,
) -> c_int {
    let mut inserted = 0;
    let rc = guard("fi_av_insert", || {
        // SAFETY: libfabric passes the av's fid (checked by class).
        let table = unsafe { table_of(av as *const ffi::fid)? };
        if addr.is_null() && count > 0 {
            return Err(FiError::Invalid("fi_av_insert without addresses"));
        }
        let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..count {
            // SAFETY: the caller passes count packed addresses of ADDR_LEN bytes each.
            let slot = unsafe {
                std::slice::from_raw_parts((addr as *const u8).add(i * ADDR_LEN), ADDR_LEN)
            };
            let out = match decode_name(slot) {
                Some(name) => {
                    inserted += 1;
                    table.insert(name)
                }
                None => ffi::FI_ADDR_UNSPEC,
            };
            if !fi_addr.is_null() {
                // SAFETY: fi_addr, when given, has room for count entries.
                unsafe { *fi_addr.add(i) = out };
            }
        }
        Ok(())
    });
    if rc < 0 {
        rc
    } else {
        inserted
    }
}

unsafe extern "C" fn av_remove(
    av: *mut ffi::fid_av,
    fi_addr: *mut ffi::fi_addr_t,
    count: usize,
    _flags: u64,
) -> c_int {
    guard("fi_av_remove", || {
        // SAFETY: libfabric passes the av's fid (checked by class).
        let table = unsafe { table_of(av as *const ffi::fid)? };
        let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..count {
            // SAFETY: fi_addr holds count entries.
            let a = unsafe { *fi_addr.add(i) };
            if !table.remove(a) {
                return Err(FiError::NotFound("an address to remove"));
            }
        }
        Ok(())
    })
}

unsafe extern "C" fn av_lookup(
    av: *mut ffi::fid_av,
    fi_addr: ffi::fi_addr_t,
    addr: *mut c_void,
    addrlen: *mut usize,
) -> c_int {
    guard("fi_av_lookup", || {
        // SAFETY: libfabric passes the av's fid (checked by class).
        let table = unsafe { table_of(av as *const ffi::fid)? };
        let table = table.lock().unwrap_or_else(|e| e.into_inner());
        let name = table
            .name(fi_addr)
            .ok_or(FiError::NotFound("the address"))?;
        // SAFETY: addrlen is a valid in/out length.
        unsafe { write_name(name, addr, addrlen, "fi_av_lookup") }
    })
}

/// Copies `name`'s address into `(addr, *addrlen)`, setting `*addrlen` to [`ADDR_LEN`].
///
/// # Safety
/// `addrlen` is valid to read and write; `addr` has `*addrlen` bytes.
pub(crate) unsafe fn write_name(
    name: &str,
    addr: *mut c_void,
    addrlen: *mut usize,
    what: &'static str,
) -> Result<(), FiError> {
    if addrlen.is_null() {
        return Err(FiError::Invalid("a null address length"));
    }
    let encoded = encode_name(name)?;
    // SAFETY: addrlen is valid (the caller's guarantee).
    let room = unsafe { *addrlen };
    // SAFETY: as above.
    unsafe { *addrlen = ADDR_LEN };
    if !addr.is_null() {
        let n = room.min(ADDR_LEN);
        // SAFETY: addr has room bytes; n <= room.
        unsafe { std::ptr::copy_nonoverlapping(encoded.as_ptr(), addr as *mut u8, n) };
    }
    if room < ADDR_LEN {
        return Err(FiError::TooSmall(what));
    }
    Ok(())
}

unsafe extern "C" fn av_straddr(
    _av: *mut ffi::fid_av,
    addr: *const c_void,
    buf: *mut c_char,
    len: *mut usize,
) -> *const c_char {
    let text = if addr.is_null() {
        String::new()
    } else {
        // SAFETY: addr is an address of ADDR_LEN bytes.
        decode_name(unsafe { std::slice::from_raw_parts(addr as *const u8, ADDR_LEN) })
            .unwrap_or_default()
    };
    if buf.is_null() || len.is_null() {
        return buf;
    }
    // SAFETY: len is valid; buf has *len bytes.
    unsafe {
        let room = *len;
        *len = text.len() + 1;
        if room > 0 {
            let n = text.len().min(room - 1);
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, n);
            *buf.add(n) = 0;
        }
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_addresses() {
        let a = encode_name("loop:1:2").unwrap();
        assert_eq!(decode_name(&a).as_deref(), Some("loop:1:2"));
        assert!(encode_name("").is_err());
        assert!(encode_name(&"x".repeat(ADDR_LEN)).is_err());
        assert_eq!(decode_name(&[0u8; ADDR_LEN]), None);
        assert_eq!(decode_name(&[b'x'; ADDR_LEN]), None, "no terminating NUL");
    }

    #[test]
    fn the_table_gives_consecutive_indices_and_forgets_removed_ones() {
        let mut t = AvTable::default();
        assert_eq!(t.insert("a".into()), 0);
        assert_eq!(t.insert("b".into()), 1);
        assert_eq!((t.name(1), t.addr_of("a")), (Some("b"), 0));
        assert!(t.remove(0));
        assert!(!t.remove(0));
        assert_eq!((t.name(0), t.addr_of("a")), (None, ffi::FI_ADDR_UNSPEC));
        assert_eq!(t.insert("c".into()), 2);
    }
}
