//! What the operator sets for one migration: [`MigrateOptions`].

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::strategy::Strategy;
use crate::companion::converge::{DeviceThrottle, DEFAULT_BANDWIDTH};
use crate::trace::TraceRecorder;

/// Operator settings of one migration. `Default` is QEMU's own settings, the `transparent`
/// strategy, no companions, no trace, and a 600 s timeout; set at least `uri`.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Migration stream URI, e.g. `tcp:127.0.0.1:4444`.
    pub uri: String,
    /// Leave the destination paused after completion (no `cont`).
    pub keep_paused: bool,
    /// QEMU `max-bandwidth`, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// QEMU `downtime-limit`, ms.
    pub downtime_limit_ms: Option<u64>,
    /// Multifd channels (capability `multifd` on both sides, `multifd-channels`).
    pub multifd: Option<u32>,
    /// Give up (and cancel) after this long.
    pub timeout: Duration,
    /// Control sockets of the source's and the destination's companions: with them, the VF
    /// moves at switchover, and the destination's companion is watched during precopy.
    pub companions: Option<(PathBuf, PathBuf)>,
    /// Set from elsewhere (Ctrl-C) to cancel the migration.
    pub cancel: Option<Arc<AtomicBool>>,
    /// How the VF and the job's ranks are treated, with what that needs.
    pub strategy: Strategy,
    /// Where the timeline goes (phases, QEMU's passes, query-migrate and companion samples).
    pub trace: Option<Arc<TraceRecorder>>,
    /// Control sockets of the companions of the VM's peers: with a trace, their steps of the
    /// switchover (the announce received, the redial and replay, the first ack) go on it too.
    pub peer_controls: Vec<PathBuf>,
    /// Device auto-converge: the policy the source companion applies to its VF's writes in
    /// this migration (told with the migration's bandwidth), `auto` by default.
    pub device_throttle: DeviceThrottle,
    /// QEMU's own `auto-converge` capability (throttles the vCPUs, not the device).
    pub auto_converge: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            uri: String::new(),
            keep_paused: false,
            max_bandwidth: None,
            downtime_limit_ms: None,
            multifd: None,
            timeout: Duration::from_secs(600),
            companions: None,
            cancel: None,
            strategy: Strategy::Transparent,
            trace: None,
            peer_controls: Vec::new(),
            device_throttle: DeviceThrottle::Auto,
            auto_converge: false,
        }
    }
}

/// Capabilities set on both sides.
pub(super) fn capabilities(opts: &MigrateOptions) -> Vec<(&'static str, bool)> {
    let mut caps = vec![("events", true)];
    if opts.multifd.is_some() {
        caps.push(("multifd", true));
    }
    if opts.auto_converge {
        caps.push(("auto-converge", true));
    }
    caps
}

/// The bandwidth the migration gets, as the source companion's throttle policy assumes it:
/// `max-bandwidth`, or QEMU's default.
pub(super) fn expected_bandwidth(opts: &MigrateOptions) -> u64 {
    opts.max_bandwidth.unwrap_or(DEFAULT_BANDWIDTH)
}

/// Parameters set on both sides (multifd channels must match).
pub(super) fn shared_parameters(opts: &MigrateOptions) -> Option<serde_json::Value> {
    opts.multifd
        .map(|n| serde_json::json!({ "multifd-channels": n }))
}

/// Parameters set on the source only: the shared ones, bandwidth and downtime limit.
pub(super) fn source_parameters(
    opts: &MigrateOptions,
) -> serde_json::Map<String, serde_json::Value> {
    let mut params = match shared_parameters(opts) {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    if let Some(bw) = opts.max_bandwidth {
        params.insert("max-bandwidth".into(), bw.into());
    }
    if let Some(dl) = opts.downtime_limit_ms {
        params.insert("downtime-limit".into(), dl.into());
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_qemus_own_settings_and_transparent() {
        let o = MigrateOptions::default();
        assert_eq!(capabilities(&o), vec![("events", true)]);
        assert!(shared_parameters(&o).is_none());
        assert!(source_parameters(&o).is_empty());
        assert!(matches!(o.strategy, Strategy::Transparent));
        assert_eq!(o.device_throttle, DeviceThrottle::Auto);
        assert_eq!(expected_bandwidth(&o), 128 << 20);
        assert_eq!(o.timeout, Duration::from_secs(600));
    }

    #[test]
    fn multifd_bandwidth_and_downtime_reach_the_right_side() {
        let o = MigrateOptions {
            multifd: Some(4),
            max_bandwidth: Some(1 << 20),
            downtime_limit_ms: Some(50),
            ..Default::default()
        };
        assert_eq!(capabilities(&o), vec![("events", true), ("multifd", true)]);
        assert_eq!(expected_bandwidth(&o), 1 << 20);
        let ac = MigrateOptions {
            auto_converge: true,
            ..Default::default()
        };
        assert_eq!(
            capabilities(&ac),
            vec![("events", true), ("auto-converge", true)]
        );
        assert_eq!(
            shared_parameters(&o),
            Some(serde_json::json!({ "multifd-channels": 4 }))
        );
        let src = serde_json::Value::Object(source_parameters(&o));
        assert_eq!(
            src,
            serde_json::json!({
                "multifd-channels": 4, "max-bandwidth": 1 << 20, "downtime-limit": 50
            })
        );
    }
}
