//! The `device_dma` step: an 82576 VF receives a frame sent from the PF's interface into the
//! mapped memfd, through the IOMMU, and the dirty sync must report the page it wrote.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::error::SelfTestError;
use super::igbvf;
use super::plan::{DmaProbe, TEST_RAM_GPA};
use super::ram::MemfdRam;
use crate::memory::LOG_PAGE_SIZE;
use crate::vf::vfio::VfioVf;
use crate::vf::VfDevice;

/// Where in the self-test RAM the 82576's receive ring and buffers go.
const DMA_WINDOW_OFFSET: u64 = 8 << 20;

/// The `device_dma` step: the VF receives a frame sent from `iface` into the mapped memfd, and
/// the dirty sync reports the page it wrote.
pub(super) fn device_dma(
    v: &mut VfioVf,
    mem: &Arc<MemfdRam>,
    probe: DmaProbe<'_>,
) -> Result<String, SelfTestError> {
    use igbvf::DmaWindow;
    let iface = probe.from;
    let (vendor, device) = v.ids()?;
    if (vendor, device) != (igbvf::VENDOR_INTEL, igbvf::DEVICE_82576_VF) {
        return Err(SelfTestError::Not82576 { vendor, device });
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
    let was_master = v.bus_master()?;
    v.set_bus_master(true)?;
    let got = {
        let bar0 = v.region(0)?;
        igbvf::receive_one(
            &bar0,
            window,
            &mut |mac| send_frame(iface, &igbvf::probe_frame(mac, &src_mac, marker.as_bytes())),
            std::time::Duration::from_secs(5),
        )
    };
    v.set_bus_master(was_master)?;
    let got = got?;
    if !got
        .data
        .windows(marker.len())
        .any(|w| w == marker.as_bytes())
    {
        return Err(SelfTestError::MarkerMissing {
            len: got.len,
            gpa: got.buffer_gpa,
            marker,
        });
    }
    let page = got.buffer_gpa & !(LOG_PAGE_SIZE - 1);
    let mut reported = false;
    v.sync_dirty(&mut |g, l| reported |= g <= page && page < g + l)?;
    if !reported {
        return Err(SelfTestError::PageNotReported {
            gpa: got.buffer_gpa,
            page,
        });
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
fn interface_mac(iface: &str) -> Result<[u8; 6], SelfTestError> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).map_err(|source| SelfTestError::InterfaceMac {
        path: path.clone(),
        iface: iface.to_string(),
        source,
    })?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    bytes.try_into().map_err(|_| SelfTestError::NotAMac {
        text: text.trim().to_string(),
        path,
    })
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
