//! A realistic synthetic migration trace for the tests.

use super::TraceRecorder;

const MIB: f64 = 1024.0 * 1024.0;

/// Five phases over ~2.8 s, four QEMU passes, 60 `query-migrate` samples (remaining bytes
/// falling from 512 MiB with a bump at each pass, a dirty rate between 2000 and 8000 pages/s)
/// and companion `a`'s rising `device_dirty_pages`.
pub(crate) fn sample_recorder() -> TraceRecorder {
    let rec = TraceRecorder::new();
    rec.set_meta("strategy", "transparent");
    rec.set_meta("vm", "a");
    rec.set_meta("qemu_version", "10.0.2");
    rec.set_meta("downtime_ms", 11);
    let ms = |t: f64| t * 1e3;

    let phases = [
        ("prepare-destination", 0.0),
        ("precopy", 45.0),
        ("switchover", 2640.0),
        ("destination-up", 2651.5),
        ("done", 2790.0),
    ];
    for (name, start) in phases {
        rec.enter_phase_at(name, ms(start));
    }
    rec.close_phase_at(ms(2796.0));

    let passes = [60.0, 1810.0, 2330.0, 2585.0];
    for (i, at) in passes.iter().enumerate() {
        rec.pass(ms(*at), i as u64 + 1);
    }

    let companion = rec.register_process("companion a");
    let mut seed: u64 = 0x5eed;
    let mut noise = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as f64 / (1u64 << 31) as f64
    };
    let (first, last) = (45.0, 2640.0);
    let mut remaining = 512.0 * MIB;
    let mut transferred = 0.0;
    let mut device = 0.0;
    for i in 0..60 {
        let t = first + (last - first) * f64::from(i) / 59.0;
        let rate = 2000.0 + 6000.0 * noise();
        if i > 0 {
            let sent = (remaining * 0.09).max(2.0 * MIB);
            remaining = (remaining - sent).max(0.0);
            transferred += sent;
            // Each new pass re-adds the pages dirtied since the previous sync.
            let prev_t = first + (last - first) * f64::from(i - 1) / 59.0;
            if passes[1..].iter().any(|&p| p > prev_t && p <= t) {
                remaining += 24.0 * MIB + 40.0 * MIB * noise();
            }
            device += 40.0 + 100.0 * noise();
        }
        rec.counter("remaining_bytes", ms(t), remaining.round());
        rec.counter("transferred_bytes", ms(t), transferred.round());
        rec.counter("dirty_pages_rate", ms(t), rate.round());
        rec.counter("mbps", ms(t), 800.0 + 200.0 * noise());
        rec.counter_for(companion, "a/device_dirty_pages", ms(t), device.round());
        rec.counter_for(companion, "a/held_ops", ms(t), (noise() * 8.0).round());
    }
    rec
}
