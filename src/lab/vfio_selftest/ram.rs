//! The self-test's stand-in guest RAM: a memfd mapped shared, as QEMU's
//! `memory-backend-memfd` is.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::error::SelfTestError;
use crate::vf::MappedRegion;

/// Anonymous shared memory standing in for guest RAM: a memfd mapped shared, unmapped on drop.
pub(super) struct MemfdRam {
    pub(super) addr: usize,
    len: usize,
    _fd: OwnedFd,
}

impl MemfdRam {
    pub(super) fn new(len: u64) -> Result<Arc<Self>, SelfTestError> {
        let err = |what: &'static str| move |source| SelfTestError::Memfd { what, source };
        let len_usize = usize::try_from(len)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
            .map_err(err("sizing"))?;
        // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"vfmig-selftest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(err("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let file = std::fs::File::from(fd);
        file.set_len(len).map_err(err("ftruncate"))?;
        let fd = OwnedFd::from(file);
        // SAFETY: a fresh shared mapping of `len_usize` bytes of our memfd at an address the
        // kernel picks; it aliases no Rust object.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(err("mmap")(std::io::Error::last_os_error()));
        }
        Ok(Arc::new(Self {
            addr: addr as usize,
            len: len_usize,
            _fd: fd,
        }))
    }

    /// A region over `[offset, offset + size)` of this memory, at `gpa`.
    pub(super) fn region(self: &Arc<Self>, gpa: u64, offset: u64, size: u64) -> MappedRegion {
        debug_assert!(offset + size <= self.len as u64);
        // SAFETY: the range lies inside our shared mapping (offset + size <= len), which stays
        // mapped while the `Arc` given as keep-alive lives; no Rust reference is ever made to
        // it, so a device may DMA into it.
        unsafe {
            MappedRegion::new(
                gpa,
                size,
                self.addr as u64 + offset,
                true,
                self.clone() as crate::vf::KeepAlive,
            )
        }
    }
}

impl Drop for MemfdRam {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are the mapping made in `new`, unmapped only here.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::{TEST_RAM_GPA, TEST_RAM_SIZE};
    use super::*;

    #[test]
    fn memfd_ram_makes_regions_that_own_it() {
        let mem = MemfdRam::new(TEST_RAM_SIZE).unwrap();
        let r = mem.region(TEST_RAM_GPA, TEST_RAM_SIZE / 2, TEST_RAM_SIZE / 2);
        assert!(r.is_backed());
        assert_eq!(r.host_addr, mem.addr as u64 + TEST_RAM_SIZE / 2);
        assert_eq!(Arc::strong_count(&mem), 2);
        drop(r);
        assert_eq!(Arc::strong_count(&mem), 1);
    }
}
