//! The provider object libfabric loads: `fi_prov_ini` and the `getinfo`/`fabric`/`cleanup`
//! entry points of `struct fi_provider`. Every entry point catches panics and returns `-FI_E*`.

use std::cell::UnsafeCell;
use std::os::raw::{c_char, c_int, c_void};

use crate::error::{guard, FiError};
use crate::ffi;
use crate::getinfo::{self, Hints, PROVIDER_VERSION};

/// `struct fi_provider`, writable: libfabric's core keeps its own state in `context`.
struct ProviderCell(UnsafeCell<ffi::fi_provider>);

// SAFETY: the cell is written only by libfabric's core (its `context`), which serialises
// provider registration; the provider itself only hands out the pointer.
unsafe impl Sync for ProviderCell {}

static PROVIDER: ProviderCell = ProviderCell(UnsafeCell::new(ffi::fi_provider {
    version: PROVIDER_VERSION,
    fi_version: ffi::HEADERS_VERSION,
    context: ffi::fi_context {
        internal: [std::ptr::null_mut(); 4],
    },
    name: c"vfmig".as_ptr(),
    getinfo: Some(vfmig_getinfo),
    fabric: Some(vfmig_fabric),
    cleanup: Some(vfmig_cleanup),
}));

/// The provider's entry point: libfabric calls it after loading `libvfmig-fi.so` from
/// `FI_PROVIDER_PATH` (or its own provider directory).
#[no_mangle]
pub extern "C" fn fi_prov_ini() -> *mut ffi::fi_provider {
    PROVIDER.0.get()
}

unsafe extern "C" fn vfmig_getinfo(
    version: u32,
    node: *const c_char,
    service: *const c_char,
    _flags: u64,
    hints: *const ffi::fi_info,
    info: *mut *mut ffi::fi_info,
) -> c_int {
    guard("fi_getinfo", || {
        if info.is_null() {
            return Err(FiError::Invalid("fi_getinfo without an info pointer"));
        }
        // SAFETY: libfabric passes hints that are null or a valid fi_info.
        let hints = (!hints.is_null()).then(|| unsafe { Hints::from_c(hints) });
        let offer = getinfo::select(
            version,
            !node.is_null() || !service.is_null(),
            hints.as_ref(),
        )
        .map_err(FiError::NoData)?;
        let list = getinfo::alloc_info(&offer)?;
        // SAFETY: info is a valid out-pointer (checked non-null above).
        unsafe { *info = list };
        Ok(())
    })
}

unsafe extern "C" fn vfmig_fabric(
    attr: *mut ffi::fi_fabric_attr,
    fabric: *mut *mut ffi::fid_fabric,
    context: *mut c_void,
) -> c_int {
    // SAFETY: libfabric's fi_fabric contract, passed on.
    unsafe { crate::fabric::open_fabric(attr, fabric, context) }
}

unsafe extern "C" fn vfmig_cleanup() {
    // Nothing global to release: every object is freed by its own fi_close.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prov_ini_returns_the_vfmig_provider() {
        let p = fi_prov_ini();
        assert!(!p.is_null());
        // SAFETY: p points to the static provider; only read here.
        let p = unsafe { &*p };
        // SAFETY: name is a static NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(p.name) };
        assert_eq!(name.to_str().unwrap(), "vfmig");
        assert_eq!(ffi::fi_major(p.fi_version), 1);
        assert!(p.getinfo.is_some() && p.fabric.is_some());
    }

    #[test]
    fn getinfo_refuses_an_msg_endpoint_with_enodata() {
        // SAFETY: fi_dupinfo(NULL) allocates hints with every attribute; freed below.
        let hints = unsafe { ffi::fi_dupinfo(std::ptr::null()) };
        // SAFETY: hints and its ep_attr were just allocated.
        unsafe { (*(*hints).ep_attr).type_ = ffi::FI_EP_MSG };
        let mut out: *mut ffi::fi_info = std::ptr::null_mut();
        let getinfo = fi_prov_ini();
        // SAFETY: the provider's getinfo with valid hints and out-pointer.
        let rc = unsafe {
            ((*getinfo).getinfo.unwrap())(
                ffi::fi_version(1, 5),
                std::ptr::null(),
                std::ptr::null(),
                0,
                hints,
                &mut out,
            )
        };
        assert_eq!(rc, -(ffi::FI_ENODATA as i32));
        assert!(out.is_null());
        // SAFETY: the RDM hints now get an answer, which libfabric's fi_freeinfo frees.
        unsafe {
            (*(*hints).ep_attr).type_ = ffi::FI_EP_RDM;
            let rc = ((*getinfo).getinfo.unwrap())(
                ffi::fi_version(1, 5),
                std::ptr::null(),
                std::ptr::null(),
                0,
                hints,
                &mut out,
            );
            assert_eq!(rc, 0);
            assert!(!out.is_null());
            assert!((*out).next.is_null());
            ffi::fi_freeinfo(out);
            ffi::fi_freeinfo(hints);
        }
    }

    #[test]
    fn fabric_needs_attributes_and_its_own_name() {
        let p = fi_prov_ini();
        let mut fabric = std::ptr::null_mut();
        // SAFETY: the provider's fabric entry with a valid out-pointer.
        let rc = unsafe {
            ((*p).fabric.unwrap())(std::ptr::null_mut(), &mut fabric, std::ptr::null_mut())
        };
        assert_eq!(rc, -(ffi::FI_EINVAL as i32));
        let mut attr = ffi::fi_fabric_attr {
            name: c"tcp".as_ptr() as *mut _,
            ..Default::default()
        };
        // SAFETY: as above, with valid attributes.
        let rc = unsafe { ((*p).fabric.unwrap())(&mut attr, &mut fabric, std::ptr::null_mut()) };
        assert_eq!(rc, -(ffi::FI_ENOENT as i32));
        assert!(fabric.is_null());
    }
}
