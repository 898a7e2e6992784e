//! Just enough of an Intel 82576 VF (8086:10ca, the SR-IOV VF that QEMU's `igb` emulates) to
//! make it DMA one received frame into guest RAM mapped at IOVA = GPA.
//!
//! This is not a driver. It is the proof that a VF owned by vfmig writes guest RAM through the
//! IOMMU mapping the companion made, at the GPA the descriptor named, and that the dirty sync
//! reports that page: one receive ring, polled, no interrupts. The steps are the ones the
//! 82576 datasheet and Linux's igbvf give:
//! 1. reset the VF (CTRL.RST), then ask the PF for a reset through the mailbox; the PF's
//!    driver enables the VF's queues and replies with its MAC address (or NACKs when the VF has
//!    none, and the VF then proposes one with SET_MAC_ADDR);
//! 2. one ring of advanced receive descriptors in guest RAM, each naming a 2 KiB buffer by its
//!    IOVA, and the queue enabled;
//! 3. a frame sent to the VF's MAC (by the caller, e.g. from the PF's interface), then the
//!    first descriptor polled until the device writes it back (Descriptor Done).
//!
//! Registers are reached through the [`ConfigSpace`] byte-access trait over the VF's BAR0, so a
//! fake can stand in for the device in tests.

use std::io;
use std::time::{Duration, Instant};

use crate::vf::vfio::config::ConfigSpace;

/// Intel.
pub const VENDOR_INTEL: u16 = 0x8086;
/// The 82576 Virtual Function.
pub const DEVICE_82576_VF: u16 = 0x10ca;

// VF register offsets in BAR0 (82576 datasheet, 8.27 "Virtual Function Device Registers").
const CTRL: u64 = 0x0000;
const VMBMEM: u64 = 0x0800;
const V2PMAILBOX: u64 = 0x0C40;
const RDBAL: u64 = 0x2800;
const RDBAH: u64 = 0x2804;
const RDLEN: u64 = 0x2808;
const SRRCTL: u64 = 0x280C;
const RDH: u64 = 0x2810;
const RDT: u64 = 0x2818;
const RXDCTL: u64 = 0x2828;

const CTRL_RST: u32 = 1 << 26;
const RXDCTL_ENABLE: u32 = 1 << 25;
/// SRRCTL: advanced descriptors, one buffer; packet buffer size in KiB.
const SRRCTL_DESCTYPE_ADV_ONEBUF: u32 = 1 << 25;

// V2PMAILBOX bits.
const MBX_REQ: u32 = 0x01;
const MBX_ACK: u32 = 0x02;
const MBX_VFU: u32 = 0x04;
const MBX_PFSTS: u32 = 0x10;
const MBX_PFACK: u32 = 0x20;
const MBX_RSTI: u32 = 0x40;
const MBX_RSTD: u32 = 0x80;

// Mailbox messages (Linux igbvf's mbx.h).
const MSG_RESET: u32 = 0x01;
const MSG_SET_MAC_ADDR: u32 = 0x02;
const MSGTYPE_ACK: u32 = 0x8000_0000;
const MSGTYPE_NACK: u32 = 0x4000_0000;
const MSGTYPE_CTS: u32 = 0x2000_0000;

/// Descriptors in the ring (RDLEN must be a multiple of 128 bytes: 8 × 16).
pub const RING_DESCRIPTORS: u64 = 8;
/// Bytes of one receive buffer.
pub const BUFFER_BYTES: u64 = 2048;
/// Where the ring sits in the DMA window, and where the buffers start.
const RING_OFFSET: u64 = 0;
const BUFFERS_OFFSET: u64 = 4096;
/// Bytes of the DMA window the receive path needs.
pub const WINDOW_BYTES: u64 = BUFFERS_OFFSET + RING_DESCRIPTORS * BUFFER_BYTES;

/// The MAC address vfmig proposes when the PF gave the VF none (locally administered).
pub const PROPOSED_MAC: [u8; 6] = [0x02, 0x76, 0x66, 0x6d, 0x69, 0x67];

/// Why the VF did not receive the frame.
#[derive(Debug, thiserror::Error)]
pub enum IgbvfError {
    /// A register access failed.
    #[error("register {what} at BAR0+{offset:#x} could not be accessed")]
    Register {
        /// Which register.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The PF did not answer through the mailbox.
    #[error(
        "the PF did not {what} within {ms} ms: is the PF's driver (igb) loaded and its SR-IOV \
         enabled? (`dmesg | grep igb`)"
    )]
    Mailbox {
        /// What it did not do.
        what: &'static str,
        /// How long we waited.
        ms: u128,
    },
    /// The PF refused a request.
    #[error("the PF refused {what} (reply {reply:#010x})")]
    Refused {
        /// The request.
        what: &'static str,
        /// Its reply word.
        reply: u32,
    },
    /// The DMA window is too small or misplaced.
    #[error("the DMA window of {len:#x} bytes is smaller than the {need:#x} the ring needs")]
    Window {
        /// Its size.
        len: u64,
        /// What is needed.
        need: u64,
    },
    /// Sending the frame failed.
    #[error("sending the probe frame failed")]
    Send(#[source] io::Error),
    /// Nothing arrived.
    #[error(
        "no frame arrived within {ms} ms (RDH {rdh}, RDT {rdt}, RXDCTL {rxdctl:#x}): the PF's \
         interface must be up, and it must switch frames to the VF (VMDq loopback)"
    )]
    NothingReceived {
        /// How long we waited.
        ms: u128,
        /// Head, as the device left it.
        rdh: u32,
        /// Tail.
        rdt: u32,
        /// Queue control.
        rxdctl: u32,
    },
}

/// Guest RAM the VF may write: `len` bytes at host address `host`, mapped at `iova`.
///
/// It is read with volatile loads only: the device writes it behind the compiler's back.
#[derive(Debug, Clone, Copy)]
pub struct DmaWindow {
    /// Host virtual address of the first byte.
    pub host: usize,
    /// Its IOVA (= its GPA).
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DmaWindow {
    fn check(&self, offset: u64, len: u64) {
        assert!(
            offset + len <= self.len,
            "DMA window access {offset:#x}+{len:#x} past {:#x}",
            self.len
        );
    }

    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) {
        self.check(offset, data.len() as u64);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: inside the window (checked above), which the caller guarantees is mapped
            // and writable for its whole length; volatile because the device shares it.
            unsafe { std::ptr::write_volatile((self.host + offset as usize + i) as *mut u8, *b) };
        }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.check(offset, len);
        (0..len as usize)
            // SAFETY: inside the window (checked above), mapped for its whole length; volatile
            // because the device writes it.
            .map(|i| unsafe {
                std::ptr::read_volatile((self.host + offset as usize + i) as *const u8)
            })
            .collect()
    }
}

/// The frame that arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The VF's MAC address.
    pub mac: [u8; 6],
    /// Whether the PF gave the MAC (`false`: vfmig proposed it).
    pub mac_from_pf: bool,
    /// GPA (= IOVA) of the buffer the device wrote.
    pub buffer_gpa: u64,
    /// Bytes the device wrote there.
    pub len: u16,
    /// Those bytes.
    pub data: Vec<u8>,
}

struct Regs<'a>(&'a dyn ConfigSpace);

impl Regs<'_> {
    fn read(&self, what: &'static str, offset: u64) -> Result<u32, IgbvfError> {
        let mut b = [0u8; 4];
        self.0
            .read(offset, &mut b)
            .map_err(|source| IgbvfError::Register {
                what,
                offset,
                source,
            })?;
        Ok(u32::from_le_bytes(b))
    }

    fn write(&self, what: &'static str, offset: u64, v: u32) -> Result<(), IgbvfError> {
        self.0
            .write(offset, &v.to_le_bytes())
            .map_err(|source| IgbvfError::Register {
                what,
                offset,
                source,
            })
    }

    /// Reads the mailbox register; its PF bits clear on read, so what was seen accumulates.
    fn mailbox(&self, seen: &mut u32) -> Result<u32, IgbvfError> {
        let v = self.read("V2PMAILBOX", V2PMAILBOX)?;
        *seen |= v;
        Ok(v)
    }

    fn wait_mailbox(
        &self,
        seen: &mut u32,
        bit: u32,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(), IgbvfError> {
        let start = Instant::now();
        loop {
            self.mailbox(seen)?;
            if *seen & bit != 0 {
                *seen &= !bit;
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(IgbvfError::Mailbox {
                    what,
                    ms: timeout.as_millis(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends `msg` to the PF and returns its reply of `reply_words` words.
    fn request(
        &self,
        msg: &[u32],
        reply_words: usize,
        timeout: Duration,
    ) -> Result<Vec<u32>, IgbvfError> {
        let mut seen = 0;
        // Take the mailbox (VFU), drop stale status, write the message, then REQ.
        self.write("V2PMAILBOX", V2PMAILBOX, MBX_VFU)?;
        self.mailbox(&mut seen)?;
        seen = 0;
        for (i, w) in msg.iter().enumerate() {
            self.write("VMBMEM", VMBMEM + 4 * i as u64, *w)?;
        }
        self.write("V2PMAILBOX", V2PMAILBOX, MBX_REQ)?;
        self.wait_mailbox(&mut seen, MBX_PFACK, "acknowledge the request", timeout)?;
        self.wait_mailbox(&mut seen, MBX_PFSTS, "reply", timeout)?;
        self.write("V2PMAILBOX", V2PMAILBOX, MBX_VFU)?;
        let reply = (0..reply_words)
            .map(|i| self.read("VMBMEM", VMBMEM + 4 * i as u64))
            .collect::<Result<Vec<u32>, _>>()?;
        // Acknowledge the reply and release the mailbox.
        self.write("V2PMAILBOX", V2PMAILBOX, MBX_ACK)?;
        Ok(reply)
    }
}

fn mac_of(words: &[u32]) -> [u8; 6] {
    let a = words[1].to_le_bytes();
    let b = words[2].to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1]]
}

/// Resets the VF and gets its MAC address from the PF (proposing [`PROPOSED_MAC`] when the PF
/// has none for it). Returns the MAC and whether the PF gave it.
pub fn reset_and_get_mac(
    bar0: &dyn ConfigSpace,
    timeout: Duration,
) -> Result<([u8; 6], bool), IgbvfError> {
    let r = Regs(bar0);
    let ctrl = r.read("CTRL", CTRL)?;
    r.write("CTRL", CTRL, ctrl | CTRL_RST)?;
    // The VF may not talk to the PF while the reset indications are up.
    let start = Instant::now();
    let mut seen = 0;
    while r.mailbox(&mut seen)? & (MBX_RSTI | MBX_RSTD) != 0 && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(1));
    }
    let reply = r.request(&[MSG_RESET], 3, timeout)?;
    match reply[0] & !MSGTYPE_CTS {
        w if w == MSG_RESET | MSGTYPE_ACK => return Ok((mac_of(&reply), true)),
        w if w == MSG_RESET | MSGTYPE_NACK => {}
        _ => {
            return Err(IgbvfError::Refused {
                what: "the VF reset",
                reply: reply[0],
            })
        }
    }
    // No MAC from the PF: propose one.
    let m = PROPOSED_MAC;
    let msg = [
        MSG_SET_MAC_ADDR,
        u32::from_le_bytes([m[0], m[1], m[2], m[3]]),
        u32::from_le_bytes([m[4], m[5], 0, 0]),
    ];
    let reply = r.request(&msg, 1, timeout)?;
    if reply[0] & !MSGTYPE_CTS != MSG_SET_MAC_ADDR | MSGTYPE_ACK {
        return Err(IgbvfError::Refused {
            what: "the VF's MAC address",
            reply: reply[0],
        });
    }
    Ok((m, false))
}

/// Sets up one receive ring in `window`, lets `send` put a frame on the wire for the VF's MAC,
/// and waits until the device has written it into the first buffer.
pub fn receive_one(
    bar0: &dyn ConfigSpace,
    window: DmaWindow,
    send: &mut dyn FnMut(&[u8; 6]) -> io::Result<()>,
    timeout: Duration,
) -> Result<Received, IgbvfError> {
    if window.len < WINDOW_BYTES {
        return Err(IgbvfError::Window {
            len: window.len,
            need: WINDOW_BYTES,
        });
    }
    let (mac, mac_from_pf) = reset_and_get_mac(bar0, timeout)?;
    let r = Regs(bar0);
    // The ring: advanced read descriptors {packet buffer IOVA, header buffer IOVA = 0}.
    window.write(0, &vec![0u8; WINDOW_BYTES as usize]);
    for i in 0..RING_DESCRIPTORS {
        let buf = window.iova + BUFFERS_OFFSET + i * BUFFER_BYTES;
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&buf.to_le_bytes());
        window.write(RING_OFFSET + 16 * i, &desc);
    }
    let ring = window.iova + RING_OFFSET;
    r.write("RXDCTL", RXDCTL, 0)?;
    r.write("RDBAL", RDBAL, ring as u32)?;
    r.write("RDBAH", RDBAH, (ring >> 32) as u32)?;
    r.write("RDLEN", RDLEN, (RING_DESCRIPTORS * 16) as u32)?;
    r.write(
        "SRRCTL",
        SRRCTL,
        SRRCTL_DESCTYPE_ADV_ONEBUF | (BUFFER_BYTES / 1024) as u32,
    )?;
    r.write("RDH", RDH, 0)?;
    r.write("RDT", RDT, 0)?;
    r.write("RXDCTL", RXDCTL, RXDCTL_ENABLE)?;
    r.write("RDT", RDT, (RING_DESCRIPTORS - 1) as u32)?;

    send(&mac).map_err(IgbvfError::Send)?;
    let start = Instant::now();
    let result = loop {
        // Write-back format: status/error at byte 8 (bit 0: Descriptor Done), length at 12.
        let wb = window.read(RING_OFFSET, 16);
        if wb[8] & 1 != 0 {
            let len = u16::from_le_bytes([wb[12], wb[13]]);
            let data = window.read(BUFFERS_OFFSET, u64::from(len).min(BUFFER_BYTES));
            break Ok(Received {
                mac,
                mac_from_pf,
                buffer_gpa: window.iova + BUFFERS_OFFSET,
                len,
                data,
            });
        }
        if start.elapsed() > timeout {
            break Err(IgbvfError::NothingReceived {
                ms: timeout.as_millis(),
                rdh: r.read("RDH", RDH)?,
                rdt: r.read("RDT", RDT)?,
                rxdctl: r.read("RXDCTL", RXDCTL)?,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // Stop the queue again: nothing may write the window after this.
    r.write("RXDCTL", RXDCTL, 0)?;
    result
}

/// The probe frame: to `dst` from `src`, EtherType 0x88B5 (local experimental), carrying
/// `marker`, padded to the 60-byte minimum.
pub fn probe_frame(dst: &[u8; 6], src: &[u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60.max(14 + marker.len()));
    f.extend_from_slice(dst);
    f.extend_from_slice(src);
    f.extend_from_slice(&0x88B5u16.to_be_bytes());
    f.extend_from_slice(marker);
    f.resize(f.len().max(60), 0);
    f
}

/// Formats a MAC address.
pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A fake VF BAR0 with a PF behind the mailbox that answers RESET with `reset_reply` and
    /// SET_MAC_ADDR with ACK, and records what was written.
    struct FakeVf {
        regs: RefCell<HashMap<u64, u32>>,
        reset_reply: [u32; 3],
        writes: RefCell<Vec<(u64, u32)>>,
    }

    impl FakeVf {
        fn new(reset_reply: [u32; 3]) -> Self {
            Self {
                regs: RefCell::new(HashMap::new()),
                reset_reply,
                writes: RefCell::new(Vec::new()),
            }
        }
    }

    impl ConfigSpace for FakeVf {
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let mut regs = self.regs.borrow_mut();
            let v = regs.get(&offset).copied().unwrap_or(0);
            if offset == V2PMAILBOX {
                // PF bits clear on read.
                regs.insert(offset, v & !(MBX_PFSTS | MBX_PFACK | MBX_RSTD));
            }
            buf.copy_from_slice(&v.to_le_bytes());
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            let v = u32::from_le_bytes(data.try_into().unwrap());
            self.writes.borrow_mut().push((offset, v));
            let mut regs = self.regs.borrow_mut();
            if offset == V2PMAILBOX && v & MBX_REQ != 0 {
                // The PF reads the request and answers at once.
                let req = regs.get(&VMBMEM).copied().unwrap_or(0);
                let reply: Vec<u32> = match req {
                    MSG_RESET => self.reset_reply.to_vec(),
                    MSG_SET_MAC_ADDR => vec![MSG_SET_MAC_ADDR | MSGTYPE_ACK | MSGTYPE_CTS],
                    _ => vec![req | MSGTYPE_NACK],
                };
                for (i, w) in reply.iter().enumerate() {
                    regs.insert(VMBMEM + 4 * i as u64, *w);
                }
                regs.insert(V2PMAILBOX, MBX_PFACK | MBX_PFSTS);
                return Ok(());
            }
            if offset != V2PMAILBOX {
                regs.insert(offset, v);
            }
            Ok(())
        }
    }

    #[test]
    fn the_pf_gives_the_mac_on_reset() {
        let vf = FakeVf::new([
            MSG_RESET | MSGTYPE_ACK | MSGTYPE_CTS,
            u32::from_le_bytes([0x52, 0x54, 0x00, 0x12]),
            u32::from_le_bytes([0x34, 0x56, 0, 0]),
        ]);
        let (mac, from_pf) = reset_and_get_mac(&vf, Duration::from_millis(200)).unwrap();
        assert_eq!(mac, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert!(from_pf);
        // CTRL.RST was written first.
        assert_eq!(vf.writes.borrow()[0], (CTRL, CTRL_RST));
    }

    #[test]
    fn without_a_mac_from_the_pf_vfmig_proposes_one() {
        let vf = FakeVf::new([MSG_RESET | MSGTYPE_NACK | MSGTYPE_CTS, 0, 0]);
        let (mac, from_pf) = reset_and_get_mac(&vf, Duration::from_millis(200)).unwrap();
        assert_eq!(mac, PROPOSED_MAC);
        assert!(!from_pf);
    }

    #[test]
    fn a_silent_pf_is_reported() {
        struct Silent;
        impl ConfigSpace for Silent {
            fn read(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
                buf.fill(0);
                Ok(())
            }
            fn write(&self, _: u64, _: &[u8]) -> io::Result<()> {
                Ok(())
            }
        }
        let e = reset_and_get_mac(&Silent, Duration::from_millis(20)).unwrap_err();
        assert!(e.to_string().contains("did not acknowledge"), "{e}");
    }

    #[test]
    fn the_ring_names_buffers_by_iova_and_nothing_received_says_where_it_stood() {
        let vf = FakeVf::new([MSG_RESET | MSGTYPE_ACK, u32::from_le_bytes([2, 0, 0, 0]), 0]);
        let mut mem = vec![0u8; WINDOW_BYTES as usize];
        let window = DmaWindow {
            host: mem.as_mut_ptr() as usize,
            iova: 0x1_0000_0000,
            len: WINDOW_BYTES,
        };
        let mut sent_to = None;
        let e = receive_one(
            &vf,
            window,
            &mut |mac| {
                sent_to = Some(*mac);
                Ok(())
            },
            Duration::from_millis(30),
        )
        .unwrap_err();
        assert_eq!(sent_to, Some([2, 0, 0, 0, 0, 0]));
        assert!(
            matches!(e, IgbvfError::NothingReceived { rdt: 7, .. }),
            "{e}"
        );
        let desc0 = u64::from_le_bytes(window.read(0, 8).try_into().unwrap());
        let desc7 = u64::from_le_bytes(window.read(7 * 16, 8).try_into().unwrap());
        assert_eq!(desc0, 0x1_0000_0000 + 4096);
        assert_eq!(desc7, 0x1_0000_0000 + 4096 + 7 * 2048);
        let regs = vf.regs.borrow();
        assert_eq!(regs[&RDBAL], 0);
        assert_eq!(regs[&RDBAH], 1);
        assert_eq!(regs[&RDLEN], 128);
        // the queue was stopped again
        assert_eq!(regs[&RXDCTL], 0);
        drop(mem);
    }

    #[test]
    fn a_written_back_descriptor_is_read_with_its_data() {
        let vf = FakeVf::new([MSG_RESET | MSGTYPE_ACK, 0, 0]);
        let mut mem = vec![0u8; WINDOW_BYTES as usize];
        let window = DmaWindow {
            host: mem.as_mut_ptr() as usize,
            iova: 0x1000_0000,
            len: WINDOW_BYTES,
        };
        let frame = probe_frame(&[0; 6], &[1; 6], b"hello");
        let r = receive_one(
            &vf,
            window,
            &mut |_| {
                // the "device": data into buffer 0, then DD and the length
                window.write(BUFFERS_OFFSET, &frame);
                let mut wb = [0u8; 16];
                wb[8] = 1;
                wb[12..14].copy_from_slice(&(frame.len() as u16).to_le_bytes());
                window.write(0, &wb);
                Ok(())
            },
            Duration::from_millis(500),
        )
        .unwrap();
        assert_eq!(r.len, 60);
        assert_eq!(r.buffer_gpa, 0x1000_0000 + 4096);
        assert_eq!(&r.data[14..19], b"hello");
        drop(mem);
    }

    #[test]
    fn probe_frames_are_padded_and_macs_printed() {
        let f = probe_frame(&[0xff; 6], &[2; 6], b"x");
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x88, 0xB5]);
        assert_eq!(mac_string(&PROPOSED_MAC), "02:76:66:6d:69:67");
    }
}
