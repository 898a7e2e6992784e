//! The filter's checks of the guest memory a front-end hands over: every mapping inside its
//! file, and the dirty log large enough for the memory it covers.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;

use super::Message;
use crate::memory::LOG_PAGE_SIZE;

/// Bytes of one memory region in `SET_MEM_TABLE` and `ADD_MEM_REG`: guest address, size, user
/// address, offset in the file.
const REGION_LEN: usize = 32;
/// Bytes of the `SET_MEM_TABLE` header (region count and padding).
const MEM_TABLE_HEADER: usize = 8;

/// Why the filter refused a message from the front-end (QEMU's side of the socket).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The payload does not have the size its region count says.
    #[error(
        "{request}: a payload of {len} bytes does not hold the {regions} memory regions it \
         announces; the front-end is broken"
    )]
    Malformed {
        /// The message.
        request: &'static str,
        /// Payload bytes.
        len: usize,
        /// Regions announced.
        regions: u64,
    },
    /// One file descriptor per region (or per log) is required.
    #[error(
        "{request}: {fds} file descriptors came for {wanted}; each memory region (and the log) \
         needs exactly one"
    )]
    FdCount {
        /// The message.
        request: &'static str,
        /// Descriptors attached.
        fds: usize,
        /// Descriptors needed.
        wanted: usize,
    },
    /// The descriptor's size could not be read.
    #[error("{request}: cannot read the size of the file of {what}")]
    Stat {
        /// The message.
        request: &'static str,
        /// Which mapping.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The descriptor is not a regular file (memfd, hugetlbfs or tmpfs file).
    #[error("{request}: the file of {what} is not a regular file, so its size cannot be checked")]
    NotAFile {
        /// The message.
        request: &'static str,
        /// Which mapping.
        what: String,
    },
    /// The mapping extends past the end of its file.
    #[error(
        "{request}: {what} maps bytes {offset:#x}..{offset:#x}+{size:#x} of a file of only \
         {file_size:#x} bytes; mapping it would crash the companion on first access"
    )]
    PastFile {
        /// The message.
        request: &'static str,
        /// Which mapping.
        what: String,
        /// Offset in the file.
        offset: u64,
        /// Bytes mapped.
        size: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// A region wraps around the guest address space, or has no bytes.
    #[error(
        "{request}: {what} at guest address {gpa:#x} with size {size:#x} is not a usable range"
    )]
    BadRange {
        /// The message.
        request: &'static str,
        /// Which mapping.
        what: String,
        /// Guest-physical address.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// The dirty log is smaller than the guest memory it must cover.
    #[error(
        "SET_LOG_BASE: a dirty log of {size} bytes covers guest memory up to {covers:#x}, but \
         guest memory ends at {end:#x} ({needed} bytes of log needed)"
    )]
    LogTooSmall {
        /// Log bytes.
        size: u64,
        /// Guest bytes the log covers.
        covers: u64,
        /// End of guest memory.
        end: u64,
        /// Log bytes needed.
        needed: u64,
    },
}

impl From<Refused> for io::Error {
    fn from(r: Refused) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, r)
    }
}

/// One region of a memory table, as the payload gives it.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    size: u64,
    mmap_offset: u64,
}

impl Region {
    fn parse(bytes: &[u8]) -> Self {
        let at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        Self {
            gpa: at(0),
            size: at(8),
            mmap_offset: at(24),
        }
    }
}

/// Checks that `[offset, offset + size)` lies inside the regular file `fd`.
fn check_fits(
    request: &'static str,
    what: &dyn Fn() -> String,
    fd: &OwnedFd,
    offset: u64,
    size: u64,
) -> Result<(), Refused> {
    let stat = |source| Refused::Stat {
        request,
        what: what(),
        source,
    };
    let meta = std::fs::File::from(fd.try_clone().map_err(stat)?)
        .metadata()
        .map_err(stat)?;
    if !meta.file_type().is_file() {
        return Err(Refused::NotAFile {
            request,
            what: what(),
        });
    }
    match offset.checked_add(size) {
        Some(end) if end <= meta.len() => Ok(()),
        _ => Err(Refused::PastFile {
            request,
            what: what(),
            offset,
            size,
            file_size: meta.len(),
        }),
    }
}

/// The guest memory the front-end has handed over so far: guest address → size.
#[derive(Debug, Default)]
pub(super) struct MemoryTable(BTreeMap<u64, u64>);

impl MemoryTable {
    /// One past the highest guest address mapped.
    fn end(&self) -> u64 {
        self.0
            .iter()
            .map(|(gpa, size)| gpa.saturating_add(*size))
            .max()
            .unwrap_or(0)
    }

    fn check_region(
        request: &'static str,
        index: usize,
        r: Region,
        fd: &OwnedFd,
    ) -> Result<(), Refused> {
        let what = || format!("memory region {index}");
        if r.size == 0 || r.gpa.checked_add(r.size).is_none() {
            return Err(Refused::BadRange {
                request,
                what: what(),
                gpa: r.gpa,
                size: r.size,
            });
        }
        check_fits(request, &what, fd, r.mmap_offset, r.size)
    }

    /// Checks a `SET_MEM_TABLE` and, when it passes, takes its regions as the table.
    pub(super) fn set(&mut self, m: &Message) -> Result<(), Refused> {
        const REQUEST: &str = "SET_MEM_TABLE";
        let regions = m.u32_at(0).unwrap_or(0);
        let wanted = MEM_TABLE_HEADER as u64 + u64::from(regions) * REGION_LEN as u64;
        if m.payload.len() as u64 != wanted {
            return Err(Refused::Malformed {
                request: REQUEST,
                len: m.payload.len(),
                regions: u64::from(regions),
            });
        }
        if m.fds.len() != regions as usize {
            return Err(Refused::FdCount {
                request: REQUEST,
                fds: m.fds.len(),
                wanted: regions as usize,
            });
        }
        let mut table = BTreeMap::new();
        for (index, (bytes, fd)) in m.payload[MEM_TABLE_HEADER..]
            .chunks_exact(REGION_LEN)
            .zip(&m.fds)
            .enumerate()
        {
            let r = Region::parse(bytes);
            Self::check_region(REQUEST, index, r, fd)?;
            table.insert(r.gpa, r.size);
        }
        self.0 = table;
        Ok(())
    }

    /// Checks an `ADD_MEM_REG` and, when it passes, adds its region.
    pub(super) fn add(&mut self, m: &Message) -> Result<(), Refused> {
        const REQUEST: &str = "ADD_MEM_REG";
        if m.payload.len() != 8 + REGION_LEN {
            return Err(Refused::Malformed {
                request: REQUEST,
                len: m.payload.len(),
                regions: 1,
            });
        }
        let [fd] = m.fds.as_slice() else {
            return Err(Refused::FdCount {
                request: REQUEST,
                fds: m.fds.len(),
                wanted: 1,
            });
        };
        let r = Region::parse(&m.payload[8..]);
        Self::check_region(REQUEST, 0, r, fd)?;
        self.0.insert(r.gpa, r.size);
        Ok(())
    }

    /// Forgets the region a `REM_MEM_REG` removes.
    pub(super) fn remove(&mut self, m: &Message) {
        if m.payload.len() == 8 + REGION_LEN {
            self.0.remove(&Region::parse(&m.payload[8..]).gpa);
        }
    }

    /// Checks a `SET_LOG_BASE`: its mapping inside its file, and its size enough for every
    /// page of guest memory (one bit per 4 KiB page).
    pub(super) fn check_log(&self, m: &Message) -> Result<(), Refused> {
        const REQUEST: &str = "SET_LOG_BASE";
        let (Some(size), Some(offset)) = (m.u64_at(0), m.u64_at(8)) else {
            return Err(Refused::Malformed {
                request: REQUEST,
                len: m.payload.len(),
                regions: 0,
            });
        };
        let [fd] = m.fds.as_slice() else {
            return Err(Refused::FdCount {
                request: REQUEST,
                fds: m.fds.len(),
                wanted: 1,
            });
        };
        check_fits(REQUEST, &|| "the dirty log".to_owned(), fd, offset, size)?;
        let end = self.end();
        let needed = end.div_ceil(LOG_PAGE_SIZE).div_ceil(8);
        if size < needed {
            return Err(Refused::LogTooSmall {
                size,
                covers: size.saturating_mul(8 * LOG_PAGE_SIZE),
                end,
                needed,
            });
        }
        Ok(())
    }
}
