//! The verbs a VF offers the guest, as in InfiniBand RC: memory regions registered by
//! guest-physical ranges, reliable-connected queue pairs between VMs, one-sided RDMA WRITE
//! (with or without immediate), SEND/RECV, and a completion queue with status codes.

use serde::{Deserialize, Serialize};

/// The work-request and completion types are the guest frames' own: one definition serves the
/// wire format and the VF (their JSON form, for the VF's exported state, comes with the
/// protocol crate's `serde` feature).
pub use vfmig_proto::{Completion, Opcode, SendOp, Sge, Status};

/// A contiguous range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpaRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a memory region allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Access {
    /// The VF may write it for a local receive.
    pub local_write: bool,
    /// Peers may RDMA WRITE into it.
    pub remote_write: bool,
}

/// A registered memory region, as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// The key that names it, locally (lkey) and to peers (rkey).
    pub key: u32,
    /// The address the guest uses for its first byte (its virtual address); work requests
    /// address the region from here.
    pub addr: u64,
    /// The guest-physical pages behind it, in order.
    pub segments: Vec<GpaRange>,
    /// What it allows.
    pub access: Access,
}

impl MemoryRegion {
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The guest-physical pieces of `[addr, addr + len)`, or `None` if that range is not
    /// entirely inside the region.
    pub fn translate(&self, addr: u64, len: u64) -> Option<Vec<GpaRange>> {
        let offset = addr.checked_sub(self.addr)?;
        let end = offset.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        let mut out = Vec::new();
        let (mut at, mut left) = (offset, len);
        let mut seg_start = 0u64;
        for seg in &self.segments {
            if left == 0 {
                break;
            }
            let seg_end = seg_start + seg.len;
            if at < seg_end {
                let inside = at - seg_start;
                let n = (seg.len - inside).min(left);
                out.push(GpaRange {
                    gpa: seg.gpa + inside,
                    len: n,
                });
                at += n;
                left -= n;
            }
            seg_start = seg_end;
        }
        Some(out)
    }
}

/// A send work request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendWr {
    /// The caller's identifier, returned in the completion.
    pub wr_id: u64,
    /// The local data (one scatter-gather element).
    pub sge: Sge,
    /// What to do with it.
    pub op: SendOp,
}

/// A receive work request: where an incoming SEND lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecvWr {
    /// The caller's identifier.
    pub wr_id: u64,
    /// The local buffer.
    pub sge: Sge,
}

/// Errors of verbs calls themselves (a bad handle); failed transfers are completions.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerbsError {
    /// No such QP.
    #[error("QP {0} does not exist")]
    NoSuchQp(u32),
    /// The VF holds as many QPs as a state may carry.
    #[error("the VF has {0} QPs, as many as it can carry through a migration; none is added")]
    TooManyQps(usize),
    /// A QP number asked for is 0 or taken.
    #[error("QP number {0} is 0 or in use; ask for another")]
    QpInUse(u32),
    /// No such region.
    #[error("memory region {0} does not exist")]
    NoSuchMr(u32),
    /// A region's pages are not all inside guest RAM.
    #[error("memory region segment {gpa:#x}+{len:#x} is outside guest RAM")]
    SegmentOutsideRam {
        /// The segment.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// The peer VM is not in the cluster map.
    #[error("VM {0} is not in the cluster map; add it to the cluster file")]
    UnknownPeer(String),
    /// The VF is quiesced for a migration.
    #[error("the VF is quiesced for switchover")]
    Quiesced,
    /// The companion has no VF to serve verbs.
    #[error("this companion has no VF fabric (start it with --fabric-listen)")]
    NoVf,
    /// The verb runs in the device's own queues, not in the companion.
    #[error(
        "{device} runs its verbs in the HCA's own queues, driven by the provider library in \
         the guest (rdma-core); use the guest's verbs library, not the companion's frames"
    )]
    ServedByDevice {
        /// The device (its PCI address).
        device: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mr() -> MemoryRegion {
        MemoryRegion {
            key: 1,
            addr: 0x7000_0000,
            segments: vec![
                GpaRange {
                    gpa: 0x10_0000,
                    len: 0x1000,
                },
                GpaRange {
                    gpa: 0x50_0000,
                    len: 0x2000,
                },
            ],
            access: Access::default(),
        }
    }

    #[test]
    fn translation_splits_across_segments_and_refuses_overruns() {
        let m = mr();
        assert_eq!(m.len(), 0x3000);
        assert_eq!(
            m.translate(0x7000_0ff0, 0x20).unwrap(),
            vec![
                GpaRange {
                    gpa: 0x10_0ff0,
                    len: 0x10
                },
                GpaRange {
                    gpa: 0x50_0000,
                    len: 0x10
                }
            ]
        );
        assert!(m.translate(0x7000_2fff, 1).is_some());
        assert!(
            m.translate(0x7000_2fff, 2).is_none(),
            "one byte past the end"
        );
        assert!(m.translate(0x6fff_ffff, 1).is_none(), "before the start");
        assert!(m.translate(u64::MAX, 2).is_none());
    }
}
