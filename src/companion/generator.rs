//! The traffic generator: stands in for remote RDMA writes until the soft VF exists.
//!
//! At a set rate it writes sequence-numbered, checksummed records into a window of guest RAM
//! that the guest kernel never touches (reserved with `memmap=` on its command line), one
//! record per slot, one slot per `stride` bytes (a page by default, so every write dirties a
//! page of its own). The [`Ledger`] remembers the last version of each record that landed.
//! Writes refused at the quiesce are not in the ledger, so the ledger is exactly what the
//! destination must hold: a write is *lost* when the destination holds an older version of a
//! record than the ledger's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::memory::{DmaEngine, DmaError};

/// Magic number at the start of every record ("VFMG").
const MAGIC: u32 = 0x474d_4656;
/// Bytes of a record's header: magic, slot, version, length, reserved.
const HEADER: usize = 24;
/// Bytes of the trailing checksum.
const TRAILER: usize = 8;
/// Smallest record: header, one payload byte rounded up, checksum.
pub const MIN_RECORD: usize = 64;
/// Most slots of a window (the ledger keeps 8 bytes per slot).
pub const MAX_SLOTS: u32 = 1 << 20;

/// Where and how the generator writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Guest-physical address of slot 0.
    pub gpa: u64,
    /// Number of slots (records).
    pub slots: u32,
    /// Distance between slots in bytes.
    pub stride: u64,
    /// Bytes written per record (the write size).
    pub record_size: u32,
}

/// Why a window's shape is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Zero slots.
    #[error("the window has no slots")]
    NoSlots,
    /// Records too small for a header and a checksum.
    #[error("record size {record_size} is below the minimum of {MIN_RECORD} bytes")]
    RecordTooSmall {
        /// The window's record size.
        record_size: u32,
    },
    /// Records that would overlap the next slot.
    #[error("record size {record_size} exceeds the stride {stride}")]
    RecordOverStride {
        /// The window's record size.
        record_size: u32,
        /// The window's stride.
        stride: u64,
    },
    /// A window that wraps around the address space.
    #[error("the window overflows the address space")]
    Overflow,
    /// More slots than a ledger keeps.
    #[error("the window has {slots} slots, more than the {MAX_SLOTS} a ledger keeps; use fewer")]
    TooManySlots {
        /// The window's slots.
        slots: u32,
    },
}

/// Why a generator did not start.
#[derive(Debug, thiserror::Error)]
pub enum GeneratorError {
    /// The window's shape is wrong.
    #[error("the generator's window is not usable")]
    Window(#[from] WindowError),
    /// A rate of zero.
    #[error("rate must be at least 1 write per second")]
    ZeroRate,
    /// The thread could not be started.
    #[error("cannot start the generator thread")]
    Thread(#[source] std::io::Error),
}

impl Window {
    /// Checks the window's shape (not whether it lies in guest RAM: the DMA engine does that).
    pub fn validate(&self) -> Result<(), WindowError> {
        if self.slots == 0 {
            return Err(WindowError::NoSlots);
        }
        if self.slots > MAX_SLOTS {
            return Err(WindowError::TooManySlots { slots: self.slots });
        }
        if (self.record_size as usize) < MIN_RECORD {
            return Err(WindowError::RecordTooSmall {
                record_size: self.record_size,
            });
        }
        if u64::from(self.record_size) > self.stride {
            return Err(WindowError::RecordOverStride {
                record_size: self.record_size,
                stride: self.stride,
            });
        }
        if self
            .stride
            .checked_mul(u64::from(self.slots))
            .and_then(|n| n.checked_add(self.gpa))
            .is_none()
        {
            return Err(WindowError::Overflow);
        }
        Ok(())
    }

    /// Guest-physical address of a slot's record.
    pub fn slot_gpa(&self, slot: u32) -> u64 {
        self.gpa + u64::from(slot) * self.stride
    }
}

/// Builds the bytes of version `version` of the record in `slot`.
pub fn encode_record(slot: u32, version: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&slot.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(size as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let seed = u64::from(slot).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version;
    out.extend((0..size - HEADER - TRAILER).map(|i| (seed.wrapping_add(i as u64 * 31) >> 3) as u8));
    let sum = xxh3_64(out);
    out.extend_from_slice(&sum.to_le_bytes());
}

/// What a slot of guest RAM holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "version")]
pub enum SlotContent {
    /// All zero: never written.
    Empty,
    /// A valid record of this slot, at this version.
    Record(u64),
    /// Anything else: torn, corrupt, or another slot's record.
    Corrupt,
}

/// Reads a record back; `expected_slot` guards against a record written at the wrong place.
pub fn decode_record(bytes: &[u8], expected_slot: u32) -> SlotContent {
    if bytes.iter().all(|&b| b == 0) {
        return SlotContent::Empty;
    }
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
    if bytes.len() < MIN_RECORD || le32(0) != MAGIC || le32(4) != expected_slot {
        return SlotContent::Corrupt;
    }
    let size = le32(16) as usize;
    if size != bytes.len() {
        return SlotContent::Corrupt;
    }
    let sum = u64::from_le_bytes(bytes[size - 8..].try_into().unwrap_or([0; 8]));
    if xxh3_64(&bytes[..size - 8]) != sum {
        return SlotContent::Corrupt;
    }
    SlotContent::Record(u64::from_le_bytes(
        bytes[8..16].try_into().unwrap_or([0; 8]),
    ))
}

/// The last version of each record that landed in guest RAM.
#[derive(Debug)]
pub struct Ledger {
    window: Window,
    versions: Vec<AtomicU64>,
}

impl Ledger {
    fn new(window: Window) -> Self {
        Self {
            window,
            versions: (0..window.slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The window the ledger describes.
    pub fn window(&self) -> Window {
        self.window
    }

    /// A copy of the versions, slot by slot (0: never written).
    pub fn versions(&self) -> Vec<u64> {
        self.versions
            .iter()
            .map(|v| v.load(Ordering::SeqCst))
            .collect()
    }
}

/// The verdict of comparing what a VM holds against a ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Records the ledger says were written.
    pub records_written: u64,
    /// Records found at exactly the ledger's version.
    pub intact: u64,
    /// Records found older than the ledger's version, empty, or corrupt: lost writes.
    pub lost_writes: u64,
    /// Of those, records found corrupt.
    pub corrupt: u64,
    /// Records found newer than the ledger's version (a write the ledger missed: a bug).
    pub newer_than_ledger: u64,
    /// Up to ten slots with lost writes, for the message.
    pub lost_examples: Vec<u32>,
}

/// Compares the slots' contents with the ledger's versions.
pub fn compare(ledger: &[u64], found: &[SlotContent]) -> Verdict {
    let mut v = Verdict::default();
    for (slot, (&want, &got)) in ledger.iter().zip(found).enumerate() {
        if want == 0 {
            continue;
        }
        v.records_written += 1;
        let lost = match got {
            SlotContent::Record(have) if have == want => {
                v.intact += 1;
                false
            }
            SlotContent::Record(have) if have > want => {
                v.newer_than_ledger += 1;
                false
            }
            SlotContent::Corrupt => {
                v.corrupt += 1;
                true
            }
            _ => true,
        };
        if lost {
            v.lost_writes += 1;
            if v.lost_examples.len() < 10 {
                v.lost_examples.push(slot as u32);
            }
        }
    }
    v
}

/// Reads every slot of `window` through `dma`.
pub fn scan(dma: &DmaEngine, window: &Window) -> Result<Vec<SlotContent>, DmaError> {
    (0..window.slots)
        .map(|slot| {
            let bytes = dma.read(window.slot_gpa(slot), u64::from(window.record_size))?;
            Ok(decode_record(&bytes, slot))
        })
        .collect()
}

/// Generator settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratorConfig {
    /// Where to write.
    pub window: Window,
    /// Writes per second.
    pub rate: u64,
}

/// Progress of a generator.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GeneratorStatus {
    /// Whether its thread runs.
    pub running: bool,
    /// Writes that landed.
    pub writes: u64,
    /// Times a write was held or refused and retried.
    pub retries: u64,
    /// Whether it is waiting for the device to come back from a quiesce.
    pub waiting_quiesced: bool,
    /// The error that stopped it, if any.
    pub error: Option<String>,
}

#[derive(Default)]
struct Progress {
    writes: AtomicU64,
    retries: AtomicU64,
    waiting_quiesced: AtomicBool,
    error: Mutex<Option<String>>,
}

/// A running generator.
pub struct Generator {
    config: GeneratorConfig,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

impl Generator {
    /// Starts writing through `dma`.
    pub fn start(dma: Arc<DmaEngine>, config: GeneratorConfig) -> Result<Self, GeneratorError> {
        config.window.validate()?;
        if config.rate == 0 {
            return Err(GeneratorError::ZeroRate);
        }
        let ledger = Arc::new(Ledger::new(config.window));
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let thread = {
            let (ledger, stop, progress) = (ledger.clone(), stop.clone(), progress.clone());
            std::thread::Builder::new()
                .name("vfmig-generator".into())
                .spawn(move || run(&dma, config, &ledger, &stop, &progress))
                .map_err(GeneratorError::Thread)?
        };
        tracing::info!(?config, "traffic generator started");
        Ok(Self {
            config,
            ledger,
            stop,
            progress,
            thread: Some(thread),
        })
    }

    /// Its settings.
    pub fn config(&self) -> GeneratorConfig {
        self.config
    }

    /// Its ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Its progress.
    pub fn status(&self) -> GeneratorStatus {
        GeneratorStatus {
            running: self.thread.as_ref().is_some_and(|t| !t.is_finished()),
            writes: self.progress.writes.load(Ordering::Relaxed),
            retries: self.progress.retries.load(Ordering::Relaxed),
            waiting_quiesced: self.progress.waiting_quiesced.load(Ordering::Relaxed),
            error: self
                .progress
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Stops the thread and waits for it; the ledger stays readable.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the generator thread panicked");
            }
            tracing::info!(
                writes = self.progress.writes.load(Ordering::Relaxed),
                "traffic generator stopped"
            );
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The order the generator visits slots in: a fixed permutation, so that consecutive writes
/// land on distinct pages spread over the window and every slot is visited once per sweep.
struct SlotOrder {
    slots: u64,
    step: u64,
}

impl SlotOrder {
    fn new(slots: u32) -> Self {
        let slots = u64::from(slots);
        // An odd multiplier near slots × the golden ratio, made coprime with the slot count.
        let mut step = ((slots as f64 * 0.618_033_988_75) as u64) | 1;
        while gcd(step, slots) != 1 {
            step += 2;
        }
        Self { slots, step }
    }

    /// The slot of the `n`-th write.
    fn slot(&self, n: u64) -> u32 {
        ((n % self.slots) * self.step % self.slots) as u32
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn run(
    dma: &DmaEngine,
    config: GeneratorConfig,
    ledger: &Ledger,
    stop: &AtomicBool,
    progress: &Progress,
) {
    let window = config.window;
    let interval = Duration::from_secs_f64(1.0 / config.rate as f64);
    let started = Instant::now();
    let mut buf = Vec::with_capacity(window.record_size as usize);
    let order = SlotOrder::new(window.slots);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        // Pace: write n is due at started + n * interval; sleep when ahead, in steps of at
        // least a millisecond so that high rates write in bursts instead of spinning.
        let due = started + interval.mul_f64(n as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).max(Duration::from_millis(1)));
            continue;
        }
        let slot = order.slot(n);
        let version = ledger.versions[slot as usize].load(Ordering::SeqCst) + 1;
        encode_record(slot, version, window.record_size as usize, &mut buf);
        match dma.write(window.slot_gpa(slot), &buf) {
            Ok(()) => {
                ledger.versions[slot as usize].store(version, Ordering::SeqCst);
                progress.writes.fetch_add(1, Ordering::Relaxed);
                progress.waiting_quiesced.store(false, Ordering::Relaxed);
                n += 1;
            }
            Err(DmaError::Quiesced) => {
                progress.waiting_quiesced.store(true, Ordering::Relaxed);
                progress.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(DmaError::HeldNoLog { .. }) | Err(DmaError::NoMemory) => {
                progress.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                tracing::error!(error = %e, "traffic generator stopped on a refused write");
                *progress.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    #[test]
    fn records_round_trip_and_detect_damage() {
        let mut buf = vec![];
        encode_record(7, 42, 256, &mut buf);
        assert_eq!(buf.len(), 256);
        assert_eq!(decode_record(&buf, 7), SlotContent::Record(42));
        assert_eq!(decode_record(&buf, 8), SlotContent::Corrupt, "wrong slot");
        let mut torn = buf.clone();
        torn[100] ^= 1;
        assert_eq!(decode_record(&torn, 7), SlotContent::Corrupt);
        assert_eq!(decode_record(&[0u8; 256], 7), SlotContent::Empty);
    }

    #[test]
    fn the_slot_order_visits_every_slot_once_per_sweep() {
        for slots in [1u32, 2, 4096, 1000, 997] {
            let order = SlotOrder::new(slots);
            let mut seen: Vec<u32> = (0..u64::from(slots)).map(|n| order.slot(n)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..slots).collect::<Vec<_>>());
        }
    }

    #[test]
    fn compare_counts_older_empty_and_corrupt_as_lost() {
        let ledger = [0, 3, 3, 3, 3, 2];
        let found = [
            SlotContent::Empty,
            SlotContent::Record(3),
            SlotContent::Record(2),
            SlotContent::Empty,
            SlotContent::Corrupt,
            SlotContent::Record(5),
        ];
        let v = compare(&ledger, &found);
        assert_eq!(v.records_written, 5);
        assert_eq!(v.intact, 1);
        assert_eq!(v.lost_writes, 3);
        assert_eq!(v.corrupt, 1);
        assert_eq!(v.newer_than_ledger, 1);
        assert_eq!(v.lost_examples, vec![2, 3, 4]);
    }

    #[test]
    fn the_generator_writes_what_its_ledger_says() {
        let ram = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let dma = Arc::new(DmaEngine::new(ram));
        dma.adopt_memory();
        let window = Window {
            gpa: 0x1_0000,
            slots: 64,
            stride: 4096,
            record_size: 128,
        };
        let mut g = Generator::start(
            dma.clone(),
            GeneratorConfig {
                window,
                rate: 20_000,
            },
        )
        .unwrap();
        while g.status().writes < 300 {
            std::thread::sleep(Duration::from_millis(5));
        }
        g.stop();
        let verdict = compare(&g.ledger().versions(), &scan(&dma, &window).unwrap());
        assert_eq!(verdict.records_written, 64);
        assert_eq!(verdict.lost_writes, 0, "{verdict:?}");
        assert_eq!(verdict.intact, 64);
        // And a rollback of one slot is caught.
        let mut old = vec![];
        encode_record(5, 1, 128, &mut old);
        dma.write(window.slot_gpa(5), &old).unwrap();
        let verdict = compare(&g.ledger().versions(), &scan(&dma, &window).unwrap());
        assert_eq!(verdict.lost_writes, 1);
        assert_eq!(verdict.lost_examples, vec![5]);
    }

    #[test]
    fn a_window_of_the_wrong_shape_or_a_zero_rate_is_refused_with_the_reason() {
        let ok = Window {
            gpa: 0x1_0000,
            slots: 4,
            stride: 4096,
            record_size: 64,
        };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            Window { slots: 0, ..ok }.validate(),
            Err(WindowError::NoSlots)
        );
        assert_eq!(
            Window {
                record_size: 63,
                ..ok
            }
            .validate(),
            Err(WindowError::RecordTooSmall { record_size: 63 })
        );
        assert_eq!(
            Window { stride: 32, ..ok }.validate(),
            Err(WindowError::RecordOverStride {
                record_size: 64,
                stride: 32
            })
        );
        assert_eq!(
            Window {
                gpa: u64::MAX - 4096,
                ..ok
            }
            .validate(),
            Err(WindowError::Overflow)
        );
        let ram = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let dma = Arc::new(DmaEngine::new(ram));
        let zero_rate = Generator::start(
            dma.clone(),
            GeneratorConfig {
                window: ok,
                rate: 0,
            },
        );
        assert!(matches!(zero_rate, Err(GeneratorError::ZeroRate)));
        let no_slots = Generator::start(
            dma,
            GeneratorConfig {
                window: Window { slots: 0, ..ok },
                rate: 1,
            },
        );
        match no_slots {
            Err(e @ GeneratorError::Window(WindowError::NoSlots)) => {
                let cause = std::error::Error::source(&e).map(ToString::to_string);
                assert_eq!(cause.as_deref(), Some("the window has no slots"));
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a window without slots started"),
        }
    }

    #[test]
    fn a_window_outside_guest_ram_stops_the_generator_with_the_reason() {
        let ram = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let dma = Arc::new(DmaEngine::new(ram));
        dma.adopt_memory();
        let window = Window {
            gpa: 1 << 30,
            slots: 4,
            stride: 4096,
            record_size: 64,
        };
        let g = Generator::start(dma, GeneratorConfig { window, rate: 1000 }).unwrap();
        let t = Instant::now();
        while g.status().running && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = g.status();
        assert!(!s.running);
        assert!(s.error.unwrap().contains("outside guest RAM"));
    }
}
