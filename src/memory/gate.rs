//! The DMA engine's gate: which device writes may start, and the wait for those in progress.
//!
//! A write that passes the gate holds a [`Pass`] until it has landed and been logged.
//! [`Gate::quiesce`] closes the gate and returns only when no pass is held. The fast path is
//! two atomic operations on the in-flight count and one load of the `quiesced` flag, with no
//! lock: the mutex and condition variable serve only a quiesce that has to wait.
//!
//! # Why a write is either refused or waited for
//!
//! Every access to `in_flight`, `quiesced` and `waiters` is `SeqCst`, so all of them fall in one
//! total order S that agrees with each thread's program order.
//!
//! - A writer increments `in_flight`, then loads `quiesced`. A quiesce stores `quiesced = true`,
//!   then loads `in_flight`. If the writer's load saw `false`, it came before the store in S;
//!   its increment came before that load, so before the quiesce's load of `in_flight`, which
//!   therefore counts the writer (or sees its decrement, i.e. it is done). This is the
//!   store-buffer (Dekker) pattern; it needs `SeqCst` on both sides, `Acquire`/`Release` alone
//!   would let both loads see the old values.
//! - The quiesce waits until it reads `in_flight == 0`. A writer's decrement is a release and
//!   the quiesce's load an acquire, so everything the writer did before the decrement (the
//!   copy and the `fetch_or` into QEMU's log) happens before the quiesce returns.
//! - A writer that saw `quiesced` increments and decrements without writing: a refused write
//!   leaves the count as it found it.
//!
//! # Why the quiesce is woken
//!
//! A waiting quiesce counts itself in `waiters` (before it reads `in_flight`) and holds the
//! mutex from its read of `in_flight` until the condition variable releases it. A writer whose
//! decrement brings `in_flight` to 0 then loads `waiters`; if it is non-zero, it takes the mutex
//! and notifies. In S, the quiesce's increment of `waiters` precedes its read of `in_flight`,
//! which (having seen a non-zero count) precedes the last decrement, which precedes the writer's
//! load of `waiters`: that load sees the waiter. The writer can take the mutex only before the
//! quiesce took it (the quiesce's read then sees the decrement, 0) or once the quiesce sleeps
//! (the notification wakes it): no wake-up is lost. `waiters` rather than `quiesced` decides,
//! because a `resume` may clear `quiesced` while a quiesce still waits.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Gate {
    in_flight: AtomicU32,
    quiesced: AtomicBool,
    /// Quiesce calls waiting for the drain.
    waiters: AtomicU32,
    lock: Mutex<()>,
    drained: Condvar,
}

/// A write in progress: held from the gate until the write has landed and been logged.
pub(crate) struct Pass<'a>(&'a Gate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let gate = self.0;
        if gate.in_flight.fetch_sub(1, SeqCst) == 1 && gate.waiters.load(SeqCst) > 0 {
            // The lock only orders this wake-up against the waiter's check; it guards no data.
            let _held = gate.lock.lock().unwrap_or_else(|e| e.into_inner());
            gate.drained.notify_all();
        }
    }
}

impl Gate {
    /// A pass for one write, or `None` if the gate is closed (quiesced).
    pub(crate) fn enter(&self) -> Option<Pass<'_>> {
        self.in_flight.fetch_add(1, SeqCst);
        let pass = Pass(self);
        if self.quiesced.load(SeqCst) {
            return None; // `pass` drops: the count goes back, waking a quiesce if it was last.
        }
        Some(pass)
    }

    /// Closes the gate and waits until no pass is held. Returns whether it was closed already.
    pub(crate) fn quiesce(&self) -> bool {
        let mut held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let was = self.quiesced.swap(true, SeqCst);
        self.waiters.fetch_add(1, SeqCst);
        while self.in_flight.load(SeqCst) > 0 {
            held = self.drained.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        self.waiters.fetch_sub(1, SeqCst);
        was
    }

    /// Opens the gate again. Returns whether it was closed.
    pub(crate) fn resume(&self) -> bool {
        self.quiesced.swap(false, SeqCst)
    }

    /// Whether the gate is closed.
    pub(crate) fn quiesced(&self) -> bool {
        self.quiesced.load(SeqCst)
    }

    /// Writes holding a pass now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn quiesce_waits_for_a_pass_and_refuses_new_ones() {
        let gate = Arc::new(Gate::default());
        let pass = gate.enter().expect("open gate");
        let g = Arc::clone(&gate);
        let t = std::thread::spawn(move || g.quiesce());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !t.is_finished(),
            "quiesce returned with a write in progress"
        );
        assert!(gate.enter().is_none(), "a closed gate gave a pass");
        drop(pass);
        assert!(!t.join().unwrap(), "first quiesce");
        assert_eq!(gate.in_flight(), 0);
        assert!(gate.resume());
        assert!(gate.enter().is_some());
    }

    /// Writers race quiesces in a loop: each writer "writes" (sets its slot) while it holds a
    /// pass. When a quiesce returns, every write that got a pass before it has set its slot;
    /// a writer reports a slot as done only after dropping its pass, and the checker reads,
    /// after the quiesce, every slot whose pass was granted before the quiesce closed.
    #[test]
    fn every_write_that_passed_before_quiesce_returned_has_landed() {
        const WRITERS: usize = 3;
        for round in 0..200 {
            let gate = Arc::new(Gate::default());
            // Per writer: the number of passes granted, and the number of writes landed.
            let granted: Arc<Vec<AtomicU64>> =
                Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
            let landed: Arc<Vec<AtomicU64>> =
                Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
            let threads: Vec<_> = (0..WRITERS)
                .map(|i| {
                    let (gate, granted, landed) =
                        (Arc::clone(&gate), Arc::clone(&granted), Arc::clone(&landed));
                    std::thread::spawn(move || {
                        for _ in 0..2_000 {
                            let Some(_pass) = gate.enter() else {
                                return;
                            };
                            granted[i].fetch_add(1, SeqCst);
                            std::hint::spin_loop();
                            landed[i].fetch_add(1, SeqCst);
                        }
                    })
                })
                .collect();
            if round % 2 == 1 {
                std::thread::yield_now();
            }
            gate.quiesce();
            // Closed and drained: no pass is held, so every grant has landed, and stays so.
            for i in 0..WRITERS {
                let g = granted[i].load(SeqCst);
                assert_eq!(landed[i].load(SeqCst), g, "round {round}: writer {i}");
            }
            std::thread::sleep(Duration::from_micros(200));
            for i in 0..WRITERS {
                assert_eq!(
                    landed[i].load(SeqCst),
                    granted[i].load(SeqCst),
                    "round {round}: writer {i} wrote after the quiesce"
                );
            }
            for t in threads {
                t.join().unwrap();
            }
        }
    }

    #[test]
    fn a_resume_during_the_wait_does_not_lose_the_wake_up() {
        let gate = Arc::new(Gate::default());
        let pass = gate.enter().unwrap();
        let g = Arc::clone(&gate);
        let t = std::thread::spawn(move || g.quiesce());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while gate.waiters.load(SeqCst) == 0 && !t.is_finished() {
            assert!(std::time::Instant::now() < deadline, "quiesce never waited");
            std::thread::yield_now();
        }
        assert!(
            !t.is_finished(),
            "quiesce returned with a write in progress"
        );
        gate.resume();
        drop(pass);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(t.join().unwrap()));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("quiesce never woke after the last write");
    }
}
