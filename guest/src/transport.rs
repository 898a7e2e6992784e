//! How frames reach the companion: an AF_PACKET socket on the guest's NIC, or (in tests) any
//! datagram socket, behind the small [`Transport`] trait.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Sends and receives whole Ethernet frames.
pub trait Transport: Send + Sync + 'static {
    /// Sends one frame.
    fn send(&self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf`: `Ok(Some(len))`, or `Ok(None)` when nothing came within
    /// the transport's poll interval (so the receiver can check whether to stop).
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>>;
}

/// `sll_pkttype` of frames this host sent (AF_PACKET sockets see them too).
const PACKET_OUTGOING: u8 = 4;
/// Socket option: do not deliver our own outgoing frames (Linux ≥ 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// Socket option: receive buffer size, ignoring `rmem_max` (needs CAP_NET_ADMIN).
const SO_RCVBUFFORCE: libc::c_int = 33;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;

/// `struct ifreq`: the name, then a 24-byte union (flags `short`, index `int`, or a
/// `struct sockaddr` whose `sa_data` starts with the MAC).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(ifname: &str) -> io::Result<Self> {
        let b = ifname.as_bytes();
        if b.is_empty() || b.len() >= 16 || b.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {ifname:?}"),
            ));
        }
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }
}

fn ioctl(fd: RawFd, req: libc::c_ulong, r: &mut IfReq, what: &str, ifname: &str) -> io::Result<()> {
    // SAFETY: `r` is a valid, writable `struct ifreq` for the duration of the call; each request
    // used here reads/writes only within it.
    if unsafe { libc::ioctl(fd, req as _, r as *mut IfReq) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what} on {ifname}: {e}")));
    }
    Ok(())
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_recv_timeout(fd: RawFd, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: passes a pointer to a live timeval and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A datagram socket carrying one frame per datagram: the AF_PACKET socket of the NIC, or a
/// socketpair end in tests.
#[derive(Debug)]
pub struct FdTransport {
    fd: OwnedFd,
    packet: bool,
}

/// How often a blocked receive returns to check for shutdown.
const POLL: Duration = Duration::from_millis(100);

impl FdTransport {
    /// Wraps a datagram or seqpacket socket (one frame per message), e.g. one end of a
    /// `socketpair`. Sets a short receive timeout.
    pub fn from_socket(fd: OwnedFd) -> io::Result<Self> {
        set_recv_timeout(fd.as_raw_fd(), POLL)?;
        Ok(FdTransport { fd, packet: false })
    }

    /// Opens an AF_PACKET socket for EtherType 0x88B5 on `ifname`, brings the interface up if
    /// it is down, enlarges the receive buffer, and returns it with the interface's MAC.
    pub fn open_packet(ifname: &str) -> io::Result<(Self, [u8; 6])> {
        let proto = vfmig_proto::ETHERTYPE.to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto as libc::c_int,
            )
        };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("AF_PACKET socket: {e} (needs root / CAP_NET_RAW)"),
            ));
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = fd.as_raw_fd();

        let mut r = IfReq::new(ifname)?;
        ioctl(s, SIOCGIFINDEX, &mut r, "SIOCGIFINDEX", ifname)?;
        let ifindex = i32::from_ne_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);

        let mut r = IfReq::new(ifname)?;
        ioctl(s, SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS", ifname)?;
        let flags = i16::from_ne_bytes([r.data[0], r.data[1]]);
        if flags & libc::IFF_UP as i16 == 0 {
            let up = (flags | libc::IFF_UP as i16).to_ne_bytes();
            r.data[0] = up[0];
            r.data[1] = up[1];
            ioctl(s, SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS (IFF_UP)", ifname)?;
        }

        let mut r = IfReq::new(ifname)?;
        ioctl(s, SIOCGIFHWADDR, &mut r, "SIOCGIFHWADDR", ifname)?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&r.data[2..8]);

        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: passes a live sockaddr_ll and its size.
        let rc = unsafe {
            libc::bind(
                s,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("bind to {ifname}: {e}")));
        }
        let big = 8 << 20;
        if setsockopt_int(s, libc::SOL_SOCKET, SO_RCVBUFFORCE, big).is_err() {
            let _ = setsockopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF, big);
        }
        // Older kernels lack it; outgoing frames are then skipped by their packet type.
        let _ = setsockopt_int(s, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
        set_recv_timeout(s, POLL)?;
        Ok((FdTransport { fd, packet: true }, mac))
    }
}

impl Transport for FdTransport {
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        let mut tries = 0;
        loop {
            // SAFETY: frame is a live buffer of frame.len() bytes.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // The NIC's queue is full: wait a little for it to drain.
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) if tries < 1000 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                _ => return Err(e),
            }
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut alen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buf and sll are live, writable, and their sizes are passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut alen,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                    _ => Err(e),
                };
            }
            if n == 0 && !self.packet {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other end of the socket closed",
                ));
            }
            if self.packet && sll.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(n as usize));
        }
    }
}
