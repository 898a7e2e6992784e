//! `vfmig vf self-test`: every step the companion relies on, run against a real VF, each
//! reported as it finishes.
//!
//! Steps, in order: `open`, `map_memfd` (16 MiB of memfd mapped at IOVA = GPA
//! 0x1_0000_0000 as guest RAM), `read_config`, `bus_master`, `reset`, `dirty_tracking`,
//! `unmap` (including a remap on a changed table), `release`. After a failed step the rest
//! are skipped.
//!
//! With a network interface to send from (`--dma-from`, the PF's interface), an extra step
//! `device_dma` after `dirty_tracking` makes an 82576 VF receive a frame sent from it: the
//! device writes it into the mapped memfd through the IOMMU, and the page must be reported by
//! the dirty sync.

pub mod igbvf;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::memory::LOG_PAGE_SIZE;
use crate::vf::vfio::device::VfioVf;
use crate::vf::vfio::mapping::RegionKey;
use crate::vf::vfio::sysfs::DEFAULT_SYSFS_ROOT;
use crate::vf::vfio::VfioVfError;
use crate::vf::{DirtyTracking, MapChange, MappedRegion, VfDevice};

/// The steps, in order.
pub const STEPS: [&str; 8] = [
    "open",
    "map_memfd",
    "read_config",
    "bus_master",
    "reset",
    "dirty_tracking",
    "unmap",
    "release",
];

/// Size of the self-test's guest RAM.
pub const TEST_RAM_SIZE: u64 = 16 << 20;
/// Where the self-test's guest RAM sits in guest-physical space (and IOVA).
pub const TEST_RAM_GPA: u64 = 0x1_0000_0000;
/// Where the remap check moves the second half of the guest RAM.
const MOVED_GPA: u64 = 0x2_0000_0000;

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// It passed.
    Ok,
    /// It failed, with the error (shown as `error: …`).
    Failed(String),
    /// It did not run, and why.
    Skipped(String),
}

impl fmt::Display for StepResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepResult::Ok => f.write_str("ok"),
            StepResult::Failed(e) => write!(f, "error: {e}"),
            StepResult::Skipped(why) => write!(f, "skipped: {why}"),
        }
    }
}

/// One finished step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its name (one of [`STEPS`]).
    pub name: &'static str,
    /// How it ended.
    pub result: StepResult,
    /// What it did, when it passed.
    pub detail: String,
}

impl Step {
    /// Whether it passed.
    pub fn ok(&self) -> bool {
        self.result == StepResult::Ok
    }
}

impl fmt::Display for Step {
    /// `step NAME: ok (detail)`, `step NAME: error: WHAT`, or `step NAME: skipped: WHY`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {}: {}", self.name, self.result)?;
        if self.ok() && !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// The outcome of a self-test. As JSON: `{"bdf":…, "steps":{"open":"ok", …},
/// "dirty_tracking":…, "ok":…, "details":{…}}`, steps in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfTestReport {
    /// The address tested.
    pub bdf: String,
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// The dirty-tracking mode found, if the device opened.
    pub dirty_tracking: Option<DirtyTracking>,
}

impl SelfTestReport {
    /// Whether every step passed (every one of [`STEPS`], and `device_dma` when it ran).
    pub fn ok(&self) -> bool {
        STEPS
            .iter()
            .all(|name| self.steps.iter().any(|s| s.name == *name))
            && self.steps.iter().all(Step::ok)
    }
}

/// The steps as an ordered JSON object.
struct StepMap<'a>(&'a [Step], bool);

impl Serialize for StepMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let details = self.1;
        let items: Vec<&Step> = self
            .0
            .iter()
            .filter(|st| !details || !st.detail.is_empty())
            .collect();
        let mut map = s.serialize_map(Some(items.len()))?;
        for st in items {
            if details {
                map.serialize_entry(st.name, &st.detail)?;
            } else {
                map.serialize_entry(st.name, &st.result.to_string())?;
            }
        }
        map.end()
    }
}

impl Serialize for SelfTestReport {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("bdf", &self.bdf)?;
        map.serialize_entry("steps", &StepMap(&self.steps, false))?;
        map.serialize_entry("dirty_tracking", &self.dirty_tracking)?;
        map.serialize_entry("ok", &self.ok())?;
        map.serialize_entry("details", &StepMap(&self.steps, true))?;
        map.end()
    }
}

/// Anonymous shared memory standing in for guest RAM: a memfd mapped shared, unmapped on drop.
struct MemfdRam {
    addr: usize,
    len: usize,
    _fd: OwnedFd,
}

impl MemfdRam {
    fn new(len: u64) -> Result<Arc<Self>, VfioVfError> {
        let err = |what: &str| {
            let what = what.to_string();
            move |source: std::io::Error| VfioVfError::Memfd { what, source }
        };
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
    fn region(self: &Arc<Self>, gpa: u64, offset: u64, size: u64) -> MappedRegion {
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

/// Runs steps in order; after a failure, the rest are skipped.
struct Runner<'a> {
    steps: Vec<Step>,
    failed: Option<&'static str>,
    progress: &'a mut dyn FnMut(&Step),
}

impl Runner<'_> {
    fn step(&mut self, name: &'static str, f: impl FnOnce() -> Result<String, String>) {
        let step = match self.failed {
            Some(at) => Step {
                name,
                result: StepResult::Skipped(format!("step {at} failed")),
                detail: String::new(),
            },
            None => match f() {
                Ok(detail) => Step {
                    name,
                    result: StepResult::Ok,
                    detail,
                },
                Err(e) => {
                    self.failed = Some(name);
                    Step {
                        name,
                        result: StepResult::Failed(e),
                        detail: String::new(),
                    }
                }
            },
        };
        (self.progress)(&step);
        self.steps.push(step);
    }
}

/// The VF of a step, or the error of a step that finds none (only after `open` failed, when
/// it is skipped anyway).
fn need(vf: &mut Option<VfioVf>) -> Result<&mut VfioVf, String> {
    vf.as_mut()
        .ok_or_else(|| "the device is not open".to_string())
}

fn spans(keys: &[RegionKey]) -> Vec<(u64, u64)> {
    keys.iter().map(|k| (k.gpa, k.size)).collect()
}

/// Runs the self-test on the VF at `bdf` with sysfs at `/sys`, calling `progress` as each
/// step finishes.
pub fn self_test(bdf: &str, progress: &mut dyn FnMut(&Step)) -> SelfTestReport {
    self_test_with_root(Path::new(DEFAULT_SYSFS_ROOT), bdf, progress)
}

/// As [`self_test`], with sysfs at `sysfs_root`.
pub fn self_test_with_root(
    sysfs_root: &Path,
    bdf: &str,
    progress: &mut dyn FnMut(&Step),
) -> SelfTestReport {
    self_test_full(sysfs_root, bdf, None, progress)
}

/// The `device_dma` step's settings.
#[derive(Debug, Clone, Copy)]
pub struct DmaProbe<'a> {
    /// The interface that sends the VF its frame (the PF's).
    pub from: &'a str,
    /// Negative control: the receive ring names IOVAs outside the IOMMU mapping, so the
    /// device's writes fault and the step must fail with "no frame arrived".
    pub unmapped: bool,
}

/// As [`self_test`], with the `device_dma` step when `dma` is given.
pub fn self_test_with_dma(
    bdf: &str,
    dma: Option<DmaProbe<'_>>,
    progress: &mut dyn FnMut(&Step),
) -> SelfTestReport {
    self_test_full(Path::new(DEFAULT_SYSFS_ROOT), bdf, dma, progress)
}

fn self_test_full(
    sysfs_root: &Path,
    bdf: &str,
    dma: Option<DmaProbe<'_>>,
    progress: &mut dyn FnMut(&Step),
) -> SelfTestReport {
    let mut run = Runner {
        steps: Vec::new(),
        failed: None,
        progress,
    };
    let mut vf: Option<VfioVf> = None;
    let mut ram: Option<Arc<MemfdRam>> = None;
    let mut tracking = None;
    let mut shown_bdf = bdf
        .parse::<crate::vf::vfio::sysfs::Bdf>()
        .map_or_else(|_| bdf.to_string(), |b| b.to_string());

    run.step("open", || {
        let v = VfioVf::open_with_root(sysfs_root, bdf).map_err(|e| e.to_string())?;
        shown_bdf = v.bdf().to_string();
        let detail = v.describe();
        tracking = Some(v.dirty_tracking());
        vf = Some(v);
        Ok(detail)
    });

    run.step("map_memfd", || {
        let v = need(&mut vf)?;
        let mem = MemfdRam::new(TEST_RAM_SIZE).map_err(|e| e.to_string())?;
        let region = mem.region(TEST_RAM_GPA, 0, TEST_RAM_SIZE);
        ram = Some(mem);
        let change = v.map(&[region]).map_err(|e| e.to_string())?;
        let want = vec![(TEST_RAM_GPA, TEST_RAM_SIZE)];
        if change.mapped != want || spans(&v.mapped()) != want {
            return Err(format!(
                "after mapping, the books say {:?}, expected {want:?}",
                v.mapped()
            ));
        }
        Ok(format!(
            "16 MiB memfd mapped at IOVA = GPA {TEST_RAM_GPA:#x}"
        ))
    });

    run.step("read_config", || {
        let v = need(&mut vf)?;
        let (vendor, device) = v.ids().map_err(|e| e.to_string())?;
        for (what, id) in [("vendor", vendor), ("device", device)] {
            if id == 0 || id == 0xffff {
                return Err(format!(
                    "config space reads {what} ID {id:#06x}: the device does not answer"
                ));
            }
        }
        let sys = v.sysfs();
        if sys.vendor != Some(vendor) || sys.device != Some(device) {
            return Err(format!(
                "config space says {vendor:04x}:{device:04x}, sysfs says {}:{}",
                sys.vendor.map_or("?".into(), |x| format!("{x:04x}")),
                sys.device.map_or("?".into(), |x| format!("{x:04x}"))
            ));
        }
        let cmd = v.command().map_err(|e| e.to_string())?;
        Ok(format!(
            "vendor {vendor:04x} device {device:04x}, as sysfs says; command {cmd:#06x}"
        ))
    });

    run.step("bus_master", || {
        let v = need(&mut vf)?;
        let was = v.bus_master().map_err(|e| e.to_string())?;
        for want in [true, false, was] {
            v.set_bus_master(want).map_err(|e| e.to_string())?;
            let got = v.bus_master().map_err(|e| e.to_string())?;
            if got != want {
                return Err(format!(
                    "wrote bus master {}, read back {}",
                    if want { "on" } else { "off" },
                    if got { "on" } else { "off" }
                ));
            }
        }
        let onoff = if was { "on" } else { "off" };
        Ok(format!(
            "was {onoff}; set -> on, clear -> off, restored {onoff}"
        ))
    });

    run.step("reset", || {
        let v = need(&mut vf)?;
        let r = VfDevice::reset(v).map_err(|e| e.to_string())?;
        Ok(r.detail)
    });

    run.step("dirty_tracking", || {
        let v = need(&mut vf)?;
        let mode = v.dirty_tracking();
        tracking = Some(mode);
        let mut ranges = Vec::new();
        let pages = v
            .sync_dirty(&mut |g, l| ranges.push((g, l)))
            .map_err(|e| e.to_string())?;
        let end = TEST_RAM_GPA + TEST_RAM_SIZE;
        if let Some(&(g, l)) = ranges
            .iter()
            .find(|&&(g, l)| g < TEST_RAM_GPA || g + l > end)
        {
            return Err(format!(
                "sync reported {g:#x}+{l:#x}, outside the mapping {TEST_RAM_GPA:#x}..{end:#x}"
            ));
        }
        let distinct = distinct_pages(&ranges);
        match mode {
            DirtyTracking::AllWritablePages => {
                let want = TEST_RAM_SIZE / LOG_PAGE_SIZE;
                if distinct != want || pages != want {
                    return Err(format!(
                        "all-writable-pages must report exactly the {want} pages of the \
                         mapping; it reported {distinct} distinct pages (counted {pages})"
                    ));
                }
                Ok(format!(
                    "all-writable-pages: the device cannot log its DMA; sync reported all \
                     {want} pages of the mapping ({})",
                    v.dirty_tracking_reason()
                ))
            }
            DirtyTracking::DeviceDmaLogging => Ok(format!(
                "device-dma-logging: sync reported {distinct} pages dirtied since the mapping"
            )),
            DirtyTracking::DmaEngine => {
                Err("a VFIO VF reported the soft VF's tracking mode".to_string())
            }
        }
    });

    if let Some(probe) = dma {
        run.step("device_dma", || {
            let v = need(&mut vf)?;
            let mem = ram.as_ref().ok_or("the self-test RAM is missing")?;
            device_dma(v, mem, probe)
        });
    }

    run.step("unmap", || {
        let v = need(&mut vf)?;
        let mem = ram.as_ref().ok_or("the self-test RAM is missing")?;
        let change = v.map(&[]).map_err(|e| e.to_string())?;
        if !v.mapped().is_empty() || change.unmapped != vec![(TEST_RAM_GPA, TEST_RAM_SIZE)] {
            return Err(format!(
                "after unmapping everything the books still hold {:?} (unmapped {:?})",
                v.mapped(),
                change.unmapped
            ));
        }
        // Remap on a changed table: two halves, then the second moved elsewhere.
        let half = TEST_RAM_SIZE / 2;
        let a = mem.region(TEST_RAM_GPA, 0, half);
        let b = mem.region(TEST_RAM_GPA + half, half, half);
        let b_moved = mem.region(MOVED_GPA, half, half);
        v.map(&[a.clone(), b.clone()]).map_err(|e| e.to_string())?;
        let change = v
            .map(&[a.clone(), b_moved.clone()])
            .map_err(|e| e.to_string())?;
        check_remap(
            &change,
            &spans(&v.mapped()),
            (a.gpa, a.size),
            (b.gpa, b.size),
            (b_moved.gpa, b_moved.size),
        )?;
        v.map(&[]).map_err(|e| e.to_string())?;
        if !v.mapped().is_empty() {
            return Err(format!("the books still hold {:?}", v.mapped()));
        }
        Ok(format!(
            "unmapped all; remap on a changed table unmapped the stale {:#x}+{half:#x} and \
             mapped {MOVED_GPA:#x}+{half:#x}, keeping {TEST_RAM_GPA:#x}+{half:#x}",
            TEST_RAM_GPA + half
        ))
    });

    run.step("release", || {
        let v = need(&mut vf)?;
        VfDevice::release(v).map_err(|e| e.to_string())?;
        VfDevice::release(v).map_err(|e| format!("a second release failed: {e}"))?;
        if !v.is_released() || !v.mapped().is_empty() {
            return Err("after release the device is still open or mapped".to_string());
        }
        Ok("logging stopped, bus master cleared, unmapped, closed; idempotent".to_string())
    });

    drop(vf);
    drop(ram);
    SelfTestReport {
        bdf: shown_bdf,
        steps: run.steps,
        dirty_tracking: tracking,
    }
}

/// Where in the self-test RAM the 82576's receive ring and buffers go.
const DMA_WINDOW_OFFSET: u64 = 8 << 20;

/// The `device_dma` step: the VF receives a frame sent from `iface` into the mapped memfd, and
/// the dirty sync reports the page it wrote.
fn device_dma(v: &mut VfioVf, mem: &Arc<MemfdRam>, probe: DmaProbe<'_>) -> Result<String, String> {
    use igbvf::DmaWindow;
    let iface = probe.from;
    let (vendor, device) = v.ids().map_err(|e| e.to_string())?;
    if (vendor, device) != (igbvf::VENDOR_INTEL, igbvf::DEVICE_82576_VF) {
        return Err(format!(
            "vfmig can make only an Intel 82576 VF (8086:10ca) receive a frame; this VF is \
             {vendor:04x}:{device:04x}: run the self-test without --dma-from"
        ));
    }
    let src_mac = interface_mac(iface)?;
    // The negative control names IOVAs 1 GiB past the mapping: nothing is mapped there.
    let iova = TEST_RAM_GPA + DMA_WINDOW_OFFSET + if probe.unmapped { 1 << 30 } else { 0 };
    let window = DmaWindow {
        host: mem.addr + DMA_WINDOW_OFFSET as usize,
        iova,
        len: igbvf::WINDOW_BYTES,
    };
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let marker = format!("vfmig-dma-probe {nonce:016x}");
    let was_master = v.bus_master().map_err(|e| e.to_string())?;
    v.set_bus_master(true).map_err(|e| e.to_string())?;
    let got = {
        let bar0 = v.region(0).map_err(|e| e.to_string())?;
        igbvf::receive_one(
            &bar0,
            window,
            &mut |mac| send_frame(iface, &igbvf::probe_frame(mac, &src_mac, marker.as_bytes())),
            std::time::Duration::from_secs(5),
        )
    };
    v.set_bus_master(was_master).map_err(|e| e.to_string())?;
    let got = got.map_err(|e| e.to_string())?;
    if !got
        .data
        .windows(marker.len())
        .any(|w| w == marker.as_bytes())
    {
        return Err(format!(
            "the device wrote {} bytes at GPA {:#x}, but not the frame sent (marker `{marker}` \
             missing)",
            got.len, got.buffer_gpa
        ));
    }
    let page = got.buffer_gpa & !(LOG_PAGE_SIZE - 1);
    let mut reported = false;
    v.sync_dirty(&mut |g, l| reported |= g <= page && page < g + l)
        .map_err(|e| e.to_string())?;
    if !reported {
        return Err(format!(
            "the device wrote GPA {:#x}, but the dirty sync did not report page {page:#x}",
            got.buffer_gpa
        ));
    }
    Ok(format!(
        "VF MAC {} ({}); a {}-byte frame sent from {iface} was written by the device at GPA \
         {:#x} through the IOMMU, and the dirty sync ({}) reported its page",
        igbvf::mac_string(&got.mac),
        if got.mac_from_pf {
            "given by the PF"
        } else {
            "proposed by vfmig"
        },
        got.len,
        got.buffer_gpa,
        serde_json::to_value(v.dirty_tracking())
            .ok()
            .and_then(|x| x.as_str().map(String::from))
            .unwrap_or_default()
    ))
}

/// The MAC address of network interface `iface`, from sysfs.
fn interface_mac(iface: &str) -> Result<[u8; 6], String> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {path}: {e} (is `{iface}` a network interface?)"))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    bytes
        .try_into()
        .map_err(|_| format!("{path} holds `{}`, not a MAC address", text.trim()))
}

/// Sends one Ethernet frame out of `iface` through an AF_PACKET socket.
fn send_frame(iface: &str, frame: &[u8]) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let name = std::ffi::CString::new(iface)
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "interface name has a NUL byte"))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no network interface `{iface}`"),
        ));
    }
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` is valid for reads of its length, `addr` is a sockaddr_ll of the size
    // given, and `fd` is an open socket.
    let n = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(Error::last_os_error());
    }
    Ok(())
}

/// Checks a remap from `[a, b]` to `[a, b_moved]`: `b` unmapped, `b_moved` mapped, `a` kept,
/// and the books hold exactly `a` and `b_moved`.
fn check_remap(
    change: &MapChange,
    books: &[(u64, u64)],
    a: (u64, u64),
    b: (u64, u64),
    b_moved: (u64, u64),
) -> Result<(), String> {
    if change.unmapped != vec![b] || change.mapped != vec![b_moved] || change.kept != vec![a] {
        return Err(format!(
            "remap on a changed table: unmapped {:?} mapped {:?} kept {:?}; expected the \
             stale {b:?} unmapped, {b_moved:?} mapped and {a:?} kept",
            change.unmapped, change.mapped, change.kept
        ));
    }
    let mut want = vec![a, b_moved];
    want.sort();
    if books != want.as_slice() {
        return Err(format!(
            "after the remap the books hold {books:?}, expected {want:?}"
        ));
    }
    Ok(())
}

/// Number of distinct 4 KiB pages covered by `ranges`.
fn distinct_pages(ranges: &[(u64, u64)]) -> u64 {
    let mut pages: Vec<u64> = ranges
        .iter()
        .filter(|(_, l)| *l > 0)
        .flat_map(|&(g, l)| (g / LOG_PAGE_SIZE)..=((g + l - 1) / LOG_PAGE_SIZE))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vf::vfio::sysfs::tests::FakeSysfs;

    fn ok(name: &'static str) -> Step {
        Step {
            name,
            result: StepResult::Ok,
            detail: String::new(),
        }
    }

    #[test]
    fn the_json_has_the_steps_in_order_then_mode_and_ok() {
        let mut steps: Vec<Step> = STEPS.iter().map(|n| ok(n)).collect();
        steps[4].detail = "VFIO_DEVICE_RESET done".into();
        let r = SelfTestReport {
            bdf: "0000:00:02.1".into(),
            steps,
            dirty_tracking: Some(DirtyTracking::AllWritablePages),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.starts_with(
                r#"{"bdf":"0000:00:02.1","steps":{"open":"ok","map_memfd":"ok","read_config":"ok","bus_master":"ok","reset":"ok","dirty_tracking":"ok","unmap":"ok","release":"ok"},"dirty_tracking":"all-writable-pages","ok":true"#
            ),
            "{json}"
        );
        assert!(
            json.ends_with(r#""details":{"reset":"VFIO_DEVICE_RESET done"}}"#),
            "{json}"
        );
        let r2 = SelfTestReport {
            dirty_tracking: Some(DirtyTracking::DeviceDmaLogging),
            ..r
        };
        let v: serde_json::Value = serde_json::to_value(&r2).unwrap();
        assert_eq!(v["dirty_tracking"], "device-dma-logging");
    }

    #[test]
    fn a_failed_open_fails_the_test_and_skips_every_later_step() {
        let fake = FakeSysfs::new();
        fake.device("0000:00:02.1", 0x020000, Some("igbvf"), Some(9));
        let mut lines = Vec::new();
        let r = self_test_with_root(fake.root(), "00:02.1", &mut |s| lines.push(s.to_string()));
        assert!(!r.ok());
        assert_eq!(r.steps.len(), STEPS.len());
        assert_eq!(
            r.steps.iter().map(|s| s.name).collect::<Vec<_>>(),
            STEPS.to_vec()
        );
        assert!(matches!(&r.steps[0].result, StepResult::Failed(e) if e.contains("igbvf")));
        for s in &r.steps[1..] {
            assert_eq!(s.result, StepResult::Skipped("step open failed".into()));
        }
        assert_eq!(lines.len(), STEPS.len());
        assert!(lines[0].starts_with("step open: error: 0000:00:02.1 is bound to igbvf"));
        assert_eq!(lines[1], "step map_memfd: skipped: step open failed");
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["bdf"], "0000:00:02.1", "normalised");
        assert_eq!(v["steps"]["release"], "skipped: step open failed");
        assert!(v["steps"]["open"]
            .as_str()
            .unwrap()
            .starts_with("error: 0000:00:02.1 is bound to igbvf"));
        assert!(v["dirty_tracking"].is_null());
        let keys: Vec<&String> = v["steps"].as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 8);
    }

    #[test]
    fn the_step_line_shows_what_was_done() {
        let s = Step {
            name: "reset",
            result: StepResult::Ok,
            detail: "VFIO_DEVICE_RESET done".into(),
        };
        assert_eq!(s.to_string(), "step reset: ok (VFIO_DEVICE_RESET done)");
        assert_eq!(ok("open").to_string(), "step open: ok");
    }

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

    #[test]
    fn remap_check_and_page_count() {
        let a = (0x1000, 0x1000);
        let b = (0x2000, 0x1000);
        let m = (0x9000, 0x1000);
        let good = MapChange {
            mapped: vec![m],
            unmapped: vec![b],
            kept: vec![a],
        };
        assert!(check_remap(&good, &[a, m], a, b, m).is_ok());
        let stale_left = MapChange {
            mapped: vec![m],
            unmapped: vec![],
            kept: vec![a, b],
        };
        assert!(check_remap(&stale_left, &[a, b, m], a, b, m)
            .unwrap_err()
            .contains("stale"));
        assert_eq!(
            distinct_pages(&[(0, 0x2000), (0x1000, 0x2000), (0x10_0000, 1)]),
            4
        );
    }
}
