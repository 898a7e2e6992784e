//! PCI configuration space: IDs, the bus-master bit, the PCI Express capability (FLR, pending
//! transactions), and the quiesce built on them.
//!
//! Everything here works through the small [`ConfigSpace`] trait, so that a fake config space
//! can stand in for the device in tests; the real one is the VFIO config region.

use std::io;
use std::time::{Duration, Instant};

/// Offset of the Vendor ID.
pub const PCI_VENDOR_ID: u64 = 0x00;
/// Offset of the Device ID.
pub const PCI_DEVICE_ID: u64 = 0x02;
/// Offset of the Command register.
pub const PCI_COMMAND: u64 = 0x04;
/// Bus Master Enable in the Command register.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Offset of the Status register.
pub const PCI_STATUS: u64 = 0x06;
/// "Capabilities List" in the Status register.
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
/// Offset of the first capability pointer.
pub const PCI_CAPABILITY_LIST: u64 = 0x34;
/// Capability ID of PCI Express.
pub const PCI_CAP_ID_EXP: u8 = 0x10;
/// Device Capabilities, from the PCI Express capability.
pub const PCI_EXP_DEVCAP: u64 = 0x04;
/// Function Level Reset capability in Device Capabilities.
pub const PCI_EXP_DEVCAP_FLR: u32 = 1 << 28;
/// Device Status, from the PCI Express capability.
pub const PCI_EXP_DEVSTA: u64 = 0x0a;
/// Transactions Pending in Device Status.
pub const PCI_EXP_DEVSTA_TRPND: u16 = 1 << 5;

/// How long a quiesce waits for pending transactions by default. PCIe completion timeouts
/// default to at most 50 ms, and Linux waits up to 700 ms before an FLR; a device still
/// pending after a second is not going to finish.
pub const DEFAULT_PENDING_TIMEOUT: Duration = Duration::from_secs(1);

/// Byte access to a PCI function's configuration space.
pub trait ConfigSpace {
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
}

/// Reads a byte.
pub fn read_u8(cs: &dyn ConfigSpace, offset: u64) -> io::Result<u8> {
    let mut b = [0u8; 1];
    cs.read(offset, &mut b)?;
    Ok(b[0])
}

/// Reads a little-endian 16-bit register.
pub fn read_u16(cs: &dyn ConfigSpace, offset: u64) -> io::Result<u16> {
    let mut b = [0u8; 2];
    cs.read(offset, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

/// Reads a little-endian 32-bit register.
pub fn read_u32(cs: &dyn ConfigSpace, offset: u64) -> io::Result<u32> {
    let mut b = [0u8; 4];
    cs.read(offset, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Writes a little-endian 16-bit register.
pub fn write_u16(cs: &dyn ConfigSpace, offset: u64, value: u16) -> io::Result<()> {
    cs.write(offset, &value.to_le_bytes())
}

/// Vendor and device IDs.
pub fn ids(cs: &dyn ConfigSpace) -> io::Result<(u16, u16)> {
    Ok((read_u16(cs, PCI_VENDOR_ID)?, read_u16(cs, PCI_DEVICE_ID)?))
}

/// Whether Bus Master Enable is set.
pub fn bus_master(cs: &dyn ConfigSpace) -> io::Result<bool> {
    Ok(read_u16(cs, PCI_COMMAND)? & PCI_COMMAND_MASTER != 0)
}

/// Sets or clears Bus Master Enable, leaving the other Command bits alone.
pub fn set_bus_master(cs: &dyn ConfigSpace, on: bool) -> io::Result<()> {
    let cmd = read_u16(cs, PCI_COMMAND)?;
    let new = if on {
        cmd | PCI_COMMAND_MASTER
    } else {
        cmd & !PCI_COMMAND_MASTER
    };
    if new != cmd {
        write_u16(cs, PCI_COMMAND, new)?;
    }
    Ok(())
}

/// Offset of the first capability with `id` in the standard capability list, if any. A
/// malformed list (a loop, a pointer into the header) ends the walk.
pub fn find_capability(cs: &dyn ConfigSpace, id: u8) -> io::Result<Option<u64>> {
    if read_u16(cs, PCI_STATUS)? & PCI_STATUS_CAP_LIST == 0 {
        return Ok(None);
    }
    let mut ptr = read_u8(cs, PCI_CAPABILITY_LIST)? & 0xfc;
    // 48 capabilities of 4 bytes fill the 192 bytes after the header: more is a loop.
    for _ in 0..48 {
        if ptr < 0x40 {
            return Ok(None);
        }
        let at = u64::from(ptr);
        if read_u8(cs, at)? == id {
            return Ok(Some(at));
        }
        ptr = read_u8(cs, at + 1)? & 0xfc;
    }
    Ok(None)
}

/// Whether the device advertises FLR; `None` when it has no PCI Express capability.
pub fn flr_advertised(cs: &dyn ConfigSpace) -> io::Result<Option<bool>> {
    match find_capability(cs, PCI_CAP_ID_EXP)? {
        None => Ok(None),
        Some(cap) => Ok(Some(
            read_u32(cs, cap + PCI_EXP_DEVCAP)? & PCI_EXP_DEVCAP_FLR != 0,
        )),
    }
}

/// Whether the Transactions Pending bit of the PCIe capability at `cap` is set.
pub fn transactions_pending(cs: &dyn ConfigSpace, cap: u64) -> io::Result<bool> {
    Ok(read_u16(cs, cap + PCI_EXP_DEVSTA)? & PCI_EXP_DEVSTA_TRPND != 0)
}

/// How a wait for pending transactions ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingWait {
    /// Whether the bit cleared (false: timed out).
    pub cleared: bool,
    /// How many times Device Status was read.
    pub polls: u32,
    /// How long it took.
    pub waited: Duration,
}

/// Polls Transactions Pending until clear or `timeout`: a few tight reads first (it usually
/// is clear already), then reads 100 µs apart, then 1 ms apart.
pub fn wait_transactions_idle(
    cs: &dyn ConfigSpace,
    cap: u64,
    timeout: Duration,
) -> io::Result<PendingWait> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        polls += 1;
        if !transactions_pending(cs, cap)? {
            return Ok(PendingWait {
                cleared: true,
                polls,
                waited: start.elapsed(),
            });
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Ok(PendingWait {
                cleared: false,
                polls,
                waited,
            });
        }
        match polls {
            0..=3 => std::hint::spin_loop(),
            4..=20 => std::thread::sleep(Duration::from_micros(100)),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// What [`quiesce`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuiesceOutcome {
    /// Bus Master Enable before the quiesce.
    pub was_bus_master: bool,
    /// Offset of the PCIe capability, if the device has one.
    pub pcie_cap: Option<u64>,
    /// The wait for pending transactions, if there was a PCIe capability to poll.
    pub wait: Option<PendingWait>,
    /// How long the whole quiesce took.
    pub elapsed: Duration,
}

impl QuiesceOutcome {
    /// Whether the device is known idle (no PCIe capability: we cannot know, so true).
    pub fn idle(&self) -> bool {
        self.wait.is_none_or(|w| w.cleared)
    }

    /// What was done, in words.
    pub fn describe(&self) -> String {
        let bm = if self.was_bus_master {
            "bus master cleared"
        } else {
            "bus master was already off"
        };
        match self.wait {
            None => format!(
                "{bm}; no PCI Express capability, so pending transactions cannot be polled \
                 (took {} µs)",
                self.elapsed.as_micros()
            ),
            Some(w) if w.cleared => format!(
                "{bm}; no transaction pending after {} µs ({} reads of Device Status)",
                w.waited.as_micros(),
                w.polls
            ),
            Some(w) => format!(
                "{bm}; transactions STILL PENDING after {} ms ({} reads of Device Status)",
                w.waited.as_millis(),
                w.polls
            ),
        }
    }
}

/// Stops the device's DMA: clears Bus Master Enable, then waits for Transactions Pending to
/// clear (up to `timeout`) when the device has a PCI Express capability.
pub fn quiesce(cs: &dyn ConfigSpace, timeout: Duration) -> io::Result<QuiesceOutcome> {
    let start = Instant::now();
    let was_bus_master = bus_master(cs)?;
    set_bus_master(cs, false)?;
    let pcie_cap = find_capability(cs, PCI_CAP_ID_EXP)?;
    let wait = match pcie_cap {
        Some(cap) => Some(wait_transactions_idle(cs, cap, timeout)?),
        None => None,
    };
    Ok(QuiesceOutcome {
        was_bus_master,
        pcie_cap,
        wait,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A config space in memory. Transactions Pending reads as set for the first
    /// `pending_reads` reads of Device Status, then clears (never, if `u32::MAX`).
    pub(crate) struct FakeConfig {
        pub bytes: Mutex<Vec<u8>>,
        pub pending_reads: Mutex<u32>,
        pub devsta_reads: Mutex<u32>,
        pub pcie_cap: Option<u64>,
    }

    impl FakeConfig {
        /// A device with a power-management capability at 0x40 and, if `pcie`, a PCI
        /// Express capability at 0x70 (FLR advertised).
        pub fn new(pcie: bool) -> Self {
            let mut b = vec![0u8; 4096];
            b[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
            b[2..4].copy_from_slice(&0x10cau16.to_le_bytes());
            b[6..8].copy_from_slice(&PCI_STATUS_CAP_LIST.to_le_bytes());
            b[0x34] = 0x40;
            b[0x40] = 0x01; // power management
            b[0x41] = if pcie { 0x70 } else { 0x00 };
            if pcie {
                b[0x70] = PCI_CAP_ID_EXP;
                b[0x71] = 0x00;
                b[0x74..0x78].copy_from_slice(&PCI_EXP_DEVCAP_FLR.to_le_bytes());
            }
            Self {
                bytes: Mutex::new(b),
                pending_reads: Mutex::new(0),
                devsta_reads: Mutex::new(0),
                pcie_cap: pcie.then_some(0x70),
            }
        }

        pub fn command(&self) -> u16 {
            let b = self.bytes.lock().unwrap();
            u16::from_le_bytes([b[4], b[5]])
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let off = offset as usize;
            let mut b = self.bytes.lock().unwrap();
            if off + buf.len() > b.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "past the end"));
            }
            if let Some(cap) = self.pcie_cap {
                if offset == cap + PCI_EXP_DEVSTA {
                    *self.devsta_reads.lock().unwrap() += 1;
                    let mut left = self.pending_reads.lock().unwrap();
                    let sta = if *left > 0 {
                        if *left != u32::MAX {
                            *left -= 1;
                        }
                        PCI_EXP_DEVSTA_TRPND
                    } else {
                        0
                    };
                    b[off..off + 2].copy_from_slice(&sta.to_le_bytes());
                }
            }
            buf.copy_from_slice(&b[off..off + buf.len()]);
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            let off = offset as usize;
            let mut b = self.bytes.lock().unwrap();
            if off + data.len() > b.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "past the end"));
            }
            b[off..off + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn reads_ids_and_finds_the_pcie_capability_past_another() {
        let cs = FakeConfig::new(true);
        assert_eq!(ids(&cs).unwrap(), (0x8086, 0x10ca));
        assert_eq!(find_capability(&cs, PCI_CAP_ID_EXP).unwrap(), Some(0x70));
        assert_eq!(find_capability(&cs, 0x11).unwrap(), None);
        assert_eq!(flr_advertised(&cs).unwrap(), Some(true));
        assert_eq!(flr_advertised(&FakeConfig::new(false)).unwrap(), None);
    }

    #[test]
    fn a_capability_loop_ends_the_walk() {
        let cs = FakeConfig::new(false);
        cs.bytes.lock().unwrap()[0x41] = 0x40; // points at itself
        assert_eq!(find_capability(&cs, PCI_CAP_ID_EXP).unwrap(), None);
    }

    #[test]
    fn bus_master_set_and_clear_leave_other_bits() {
        let cs = FakeConfig::new(true);
        write_u16(&cs, PCI_COMMAND, 0x0002).unwrap(); // memory space on
        set_bus_master(&cs, true).unwrap();
        assert_eq!(cs.command(), 0x0006);
        assert!(bus_master(&cs).unwrap());
        set_bus_master(&cs, false).unwrap();
        assert_eq!(cs.command(), 0x0002);
        assert!(!bus_master(&cs).unwrap());
    }

    #[test]
    fn quiesce_clears_bus_master_then_waits_for_pending_to_clear() {
        let cs = FakeConfig::new(true);
        set_bus_master(&cs, true).unwrap();
        *cs.pending_reads.lock().unwrap() = 5;
        let out = quiesce(&cs, Duration::from_secs(5)).unwrap();
        assert!(out.was_bus_master);
        assert!(!bus_master(&cs).unwrap());
        let w = out.wait.unwrap();
        assert!(w.cleared);
        assert_eq!(w.polls, 6, "5 reads pending, the 6th clear");
        assert!(out.idle());
        assert!(out.describe().contains("no transaction pending"));
    }

    #[test]
    fn quiesce_times_out_when_transactions_stay_pending() {
        let cs = FakeConfig::new(true);
        set_bus_master(&cs, true).unwrap();
        *cs.pending_reads.lock().unwrap() = u32::MAX;
        let out = quiesce(&cs, Duration::from_millis(20)).unwrap();
        let w = out.wait.unwrap();
        assert!(!w.cleared);
        assert!(w.waited >= Duration::from_millis(20));
        assert!(!out.idle());
        assert!(
            out.describe().contains("STILL PENDING"),
            "{}",
            out.describe()
        );
        assert!(!bus_master(&cs).unwrap(), "bus master cleared anyway");
    }

    #[test]
    fn quiesce_without_pcie_capability_just_clears_and_says_so() {
        let cs = FakeConfig::new(false);
        set_bus_master(&cs, true).unwrap();
        let out = quiesce(&cs, Duration::from_secs(1)).unwrap();
        assert!(out.wait.is_none());
        assert!(!bus_master(&cs).unwrap());
        assert!(out.describe().contains("no PCI Express capability"));
    }
}
