//! Typed helpers for the QMP commands used to drive a live migration.
//!
//! Each helper is a thin wrapper around [`QmpClient::execute`] with the
//! argument names of QEMU's QAPI schema (`qapi/migration.json`,
//! `qapi/run-state.json`, `qapi/misc.json`, `qapi/net.json`) and uses the
//! client's default timeout.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{QmpClient, QmpError};

/// The reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// QEMU's run state, e.g. `"running"`, `"paused"`, `"inmigrate"`,
    /// `"postmigrate"`, `"finish-migrate"`.
    pub status: String,
    /// Whether the guest's vCPUs are running.
    pub running: bool,
}

/// The reply of `query-migrate` (QAPI `MigrationInfo`).
///
/// Every field is optional: QEMU only sends those that apply to the current
/// state (an empty object before the first migration). Unknown fields are
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `MigrationStatus`: `none`, `setup`, `active`, `completed`, `failed`,
    /// `cancelled`, `pre-switchover`, `device`, `postcopy-active`, ...
    /// Absent if no migration was ever started.
    pub status: Option<String>,
    /// RAM transfer statistics, present while `active` and once `completed`.
    pub ram: Option<RamStats>,
    /// VFIO device state transfer statistics, when VFIO devices migrate.
    pub vfio: Option<VfioStats>,
    /// Milliseconds since the migration started (or its total duration).
    pub total_time: Option<u64>,
    /// Actual guest downtime in milliseconds, once completed.
    pub downtime: Option<u64>,
    /// Expected downtime in milliseconds, while active.
    pub expected_downtime: Option<u64>,
    /// Milliseconds spent in setup before the first iteration.
    pub setup_time: Option<u64>,
    /// Percentage of time the vCPUs are throttled by auto-converge.
    pub cpu_throttle_percentage: Option<u64>,
    /// Why the migration failed, when it did.
    pub error_desc: Option<String>,
    /// Why an outgoing migration is blocked (e.g. a non-migratable device).
    pub blocked_reasons: Option<Vec<String>>,
}

impl MigrationInfo {
    /// Whether the migration has reached a final state (`completed`,
    /// `failed` or `cancelled`).
    pub fn is_finished(&self) -> bool {
        matches!(
            self.status.as_deref(),
            Some("completed" | "failed" | "cancelled")
        )
    }
}

/// RAM migration statistics (QAPI `MigrationStats`). Sizes are in bytes,
/// page counts in pages of `page_size` bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes already transferred.
    pub transferred: Option<u64>,
    /// Bytes still to transfer.
    pub remaining: Option<u64>,
    /// Total bytes of guest RAM involved.
    pub total: Option<u64>,
    /// Zero pages (sent as a marker only).
    pub duplicate: Option<u64>,
    /// Normal (full) pages sent.
    pub normal: Option<u64>,
    /// Bytes of normal pages sent.
    pub normal_bytes: Option<u64>,
    /// Pages dirtied per second by the guest.
    pub dirty_pages_rate: Option<u64>,
    /// Throughput in megabits per second.
    pub mbps: Option<f64>,
    /// Dirty bitmap synchronisations so far (≈ iterations).
    pub dirty_sync_count: Option<u64>,
    /// Page requests received from the destination during postcopy.
    pub postcopy_requests: Option<u64>,
    /// Bytes per page for the page counts.
    pub page_size: Option<u64>,
    /// Bytes sent over multifd channels.
    pub multifd_bytes: Option<u64>,
    /// Pages transferred per second.
    pub pages_per_second: Option<u64>,
    /// Bytes sent during the pre-copy phase.
    pub precopy_bytes: Option<u64>,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: Option<u64>,
    /// Bytes sent during the post-copy phase.
    pub postcopy_bytes: Option<u64>,
    /// Dirty syncs that could not avoid copying with zero-copy send.
    pub dirty_sync_missed_zero_copy: Option<u64>,
}

/// VFIO migration statistics (QAPI `VfioStats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VfioStats {
    /// Bytes of device state transferred by VFIO devices.
    pub transferred: Option<u64>,
}

impl QmpClient {
    /// `query-status`: the VM's run state.
    pub fn query_status(&self) -> Result<VmStatus, QmpError> {
        self.execute_as("query-status", None)
    }

    /// `query-migrate`: the state and statistics of the current (or last)
    /// migration.
    pub fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.execute_as("query-migrate", None)
    }

    /// `migrate-set-capabilities`: sets each named capability (e.g.
    /// `("events", true)`, `("return-path", true)`) on or off.
    pub fn migrate_set_capabilities(&self, capabilities: &[(&str, bool)]) -> Result<(), QmpError> {
        let capabilities: Vec<Value> = capabilities
            .iter()
            .map(|&(capability, state)| json!({"capability": capability, "state": state}))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": capabilities })),
        )
        .map(drop)
    }

    /// `migrate-set-parameters`: `parameters` is a JSON object of QAPI
    /// `MigrationParameters` members, e.g.
    /// `{"downtime-limit": 300, "max-bandwidth": 1073741824}`.
    pub fn migrate_set_parameters(&self, parameters: Value) -> Result<(), QmpError> {
        if !parameters.is_object() {
            return Err(QmpError::InvalidArgument {
                command: "migrate-set-parameters".into(),
                reason: format!("parameters must be a JSON object, got {parameters}"),
            });
        }
        self.execute("migrate-set-parameters", Some(parameters))
            .map(drop)
    }

    /// `migrate`: starts migrating to `uri` (e.g. `tcp:10.0.0.2:4444`,
    /// `rdma:10.0.0.2:4444`). Returns once QEMU has started the migration;
    /// follow it with [`query_migrate`](Self::query_migrate) or the
    /// `MIGRATION` event.
    pub fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate-incoming`: starts listening for an incoming migration on
    /// `uri`. QEMU must have been started with `-incoming defer`.
    pub fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate_cancel`: cancels the running migration (succeeds even if
    /// none is running).
    pub fn migrate_cancel(&self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).map(drop)
    }

    /// `cont`: resumes the guest's vCPUs.
    pub fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// `stop`: pauses the guest's vCPUs.
    pub fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// `pmemsave`: QEMU writes `size` bytes of guest physical memory from
    /// `addr` to the file `path`. QEMU opens the file itself, so a relative
    /// `path` is first made absolute against this process's working
    /// directory.
    pub fn pmemsave(&self, addr: u64, size: u64, path: &Path) -> Result<(), QmpError> {
        const COMMAND: &str = "pmemsave";
        let invalid = |reason: String| QmpError::InvalidArgument {
            command: COMMAND.into(),
            reason,
        };
        let absolute = std::path::absolute(path).map_err(|source| QmpError::RelativePath {
            command: COMMAND.into(),
            path: path.to_path_buf(),
            source,
        })?;
        let filename = absolute
            .to_str()
            .ok_or_else(|| invalid(format!("file name {} is not UTF-8", absolute.display())))?;
        self.execute(
            COMMAND,
            Some(json!({ "val": addr, "size": size, "filename": filename })),
        )
        .map(drop)
    }

    /// `quit`: asks QEMU to exit. QEMU closing the socket right after (or
    /// instead of) replying counts as success.
    pub fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Disconnected { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// `set_link`: sets the link of the network device or netdev `name` up
    /// or down, as the guest sees it.
    pub fn set_link(&self, name: &str, up: bool) -> Result<(), QmpError> {
        self.execute("set_link", Some(json!({ "name": name, "up": up })))
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::testutil::{client_with, FakeQemu};

    /// Runs `call` against a fake QEMU that checks the single command it
    /// receives with `check` and answers with `reply`.
    fn one_command<T>(
        check: impl FnOnce(&Value) + Send + 'static,
        reply: Value,
        call: impl FnOnce(&QmpClient) -> T,
    ) -> T {
        let (client, server) = client_with(move |mut qemu: FakeQemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            check(&cmd);
            qemu.reply(&cmd, reply);
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        let result = call(&client);
        drop(client);
        server.join().expect("fake QEMU");
        result
    }

    #[test]
    fn query_migrate_parses_an_active_migration() {
        let reply = json!({
            "status": "active",
            "total-time": 12345,
            "setup-time": 17,
            "expected-downtime": 301,
            "ram": {
                "transferred": 1_073_741_824u64,
                "remaining": 3_221_225_472u64,
                "total": 4_294_967_296u64,
                "duplicate": 524_288,
                "normal": 262_144,
                "normal-bytes": 1_073_741_824u64,
                "dirty-pages-rate": 12_000,
                "mbps": 9_412.5,
                "dirty-sync-count": 3,
                "postcopy-requests": 0,
                "page-size": 4096,
                "multifd-bytes": 0,
                "pages-per-second": 287_000,
                "precopy-bytes": 1_073_741_824u64,
                "downtime-bytes": 0,
                "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0,
                "some-future-field": {"x": 1}
            },
            "socket-address": [{"type": "inet", "host": "10.0.0.2", "port": "4444"}],
            "cpu-throttle-percentage": 20
        });
        let info = one_command(
            |cmd| {
                assert_eq!(cmd["execute"], "query-migrate");
                assert!(cmd.get("arguments").is_none());
            },
            reply,
            |client| client.query_migrate(),
        )
        .expect("query-migrate");
        assert_eq!(info.status.as_deref(), Some("active"));
        assert!(!info.is_finished());
        assert_eq!(info.total_time, Some(12345));
        assert_eq!(info.setup_time, Some(17));
        assert_eq!(info.expected_downtime, Some(301));
        assert_eq!(info.downtime, None);
        assert_eq!(info.cpu_throttle_percentage, Some(20));
        assert_eq!(info.error_desc, None);
        let ram = info.ram.expect("ram stats");
        assert_eq!(ram.transferred, Some(1 << 30));
        assert_eq!(ram.remaining, Some(3 << 30));
        assert_eq!(ram.total, Some(4 << 30));
        assert_eq!(ram.duplicate, Some(524_288));
        assert_eq!(ram.normal, Some(262_144));
        assert_eq!(ram.dirty_pages_rate, Some(12_000));
        assert_eq!(ram.mbps, Some(9_412.5));
        assert_eq!(ram.dirty_sync_count, Some(3));
        assert_eq!(ram.page_size, Some(4096));
        assert_eq!(ram.pages_per_second, Some(287_000));
        assert_eq!(ram.precopy_bytes, Some(1 << 30));
    }

    #[test]
    fn query_migrate_parses_empty_and_failed_replies() {
        let info = one_command(|_| {}, json!({}), |c| c.query_migrate()).expect("empty");
        assert_eq!(info, MigrationInfo::default());

        let info = one_command(
            |_| {},
            json!({"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}),
            |c| c.query_migrate(),
        )
        .expect("failed");
        assert!(info.is_finished());
        assert_eq!(
            info.error_desc.as_deref(),
            Some("Unable to write to socket: Broken pipe")
        );
    }

    #[test]
    fn query_migrate_rejects_a_wrong_shape() {
        let result = one_command(
            |_| {},
            json!({"status": "active", "ram": {"total": "lots"}}),
            |c| c.query_migrate(),
        );
        assert!(
            matches!(result, Err(QmpError::Malformed { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn query_status_parses_the_run_state() {
        let status = one_command(
            |cmd| assert_eq!(cmd["execute"], "query-status"),
            json!({"status": "paused", "singlestep": false, "running": false}),
            |c| c.query_status(),
        )
        .expect("query-status");
        assert_eq!(
            status,
            VmStatus {
                status: "paused".into(),
                running: false
            }
        );
    }

    #[test]
    fn migrate_set_capabilities_sends_capability_states() {
        one_command(
            |cmd| {
                assert_eq!(cmd["execute"], "migrate-set-capabilities");
                assert_eq!(
                    cmd["arguments"],
                    json!({"capabilities": [
                        {"capability": "events", "state": true},
                        {"capability": "postcopy-ram", "state": false}
                    ]})
                );
            },
            json!({}),
            |c| c.migrate_set_capabilities(&[("events", true), ("postcopy-ram", false)]),
        )
        .expect("migrate-set-capabilities");
    }

    #[test]
    fn migrate_set_parameters_passes_the_object_through() {
        one_command(
            |cmd| {
                assert_eq!(cmd["execute"], "migrate-set-parameters");
                assert_eq!(cmd["arguments"], json!({"downtime-limit": 300}));
            },
            json!({}),
            |c| c.migrate_set_parameters(json!({"downtime-limit": 300})),
        )
        .expect("migrate-set-parameters");
    }

    #[test]
    fn migrate_set_parameters_refuses_non_objects_without_sending() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        let result = client.migrate_set_parameters(json!([1, 2]));
        assert!(
            matches!(result, Err(QmpError::InvalidArgument { .. })),
            "{result:?}"
        );
        drop(client);
        server
            .join()
            .expect("fake QEMU (must have received nothing)");
    }

    #[test]
    fn migrate_and_migrate_incoming_send_the_uri() {
        for (command, incoming) in [("migrate", false), ("migrate-incoming", true)] {
            one_command(
                move |cmd| {
                    assert_eq!(cmd["execute"], command);
                    assert_eq!(cmd["arguments"], json!({"uri": "tcp:10.0.0.2:4444"}));
                },
                json!({}),
                |c| {
                    if incoming {
                        c.migrate_incoming("tcp:10.0.0.2:4444")
                    } else {
                        c.migrate("tcp:10.0.0.2:4444")
                    }
                },
            )
            .expect(command);
        }
    }

    #[test]
    fn argumentless_commands_use_qemu_names() {
        type Call = fn(&QmpClient) -> Result<(), QmpError>;
        let cases: [(&'static str, Call); 4] = [
            ("migrate_cancel", QmpClient::migrate_cancel),
            ("cont", QmpClient::cont),
            ("stop", QmpClient::stop),
            ("quit", QmpClient::quit),
        ];
        for (name, call) in cases {
            one_command(
                move |cmd| {
                    assert_eq!(cmd["execute"], name);
                    assert!(cmd.get("arguments").is_none(), "{cmd}");
                },
                json!({}),
                call,
            )
            .expect(name);
        }
    }

    #[test]
    fn pmemsave_sends_val_size_and_absolute_filename() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mem.bin");
        let expected = path.to_str().expect("utf-8 temp path").to_owned();
        one_command(
            move |cmd| {
                assert_eq!(cmd["execute"], "pmemsave");
                assert_eq!(
                    cmd["arguments"],
                    json!({"val": 0x1000_0000u64, "size": 4096, "filename": expected})
                );
            },
            json!({}),
            |c| c.pmemsave(0x1000_0000, 4096, &path),
        )
        .expect("pmemsave");

        let cwd = std::env::current_dir().expect("cwd");
        let expected = cwd.join("dump.bin").to_str().expect("utf-8 cwd").to_owned();
        one_command(
            move |cmd| assert_eq!(cmd["arguments"]["filename"], expected),
            json!({}),
            |c| c.pmemsave(0, 1, Path::new("dump.bin")),
        )
        .expect("pmemsave relative");
    }

    #[test]
    fn set_link_sends_name_and_state() {
        one_command(
            |cmd| {
                assert_eq!(cmd["execute"], "set_link");
                assert_eq!(cmd["arguments"], json!({"name": "net0", "up": false}));
            },
            json!({}),
            |c| c.set_link("net0", false),
        )
        .expect("set_link");
    }

    #[test]
    fn quit_tolerates_qemu_closing_without_reply() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            assert_eq!(cmd["execute"], "quit");
            // QEMU exits before its reply is read.
        });
        let client = client.expect("handshake");
        client.quit().expect("quit");
        server.join().expect("fake QEMU");
        assert!(!client.is_connected());
    }

    #[test]
    fn helpers_surface_command_errors() {
        let (client, server) = client_with(|mut qemu| {
            qemu.handshake();
            let cmd = qemu.recv();
            qemu.error(
                &cmd,
                "GenericError",
                "Guest migration is blocked by device vfio-pci",
            );
            qemu.expect_eof();
        });
        let client = client.expect("handshake");
        match client.migrate("tcp:10.0.0.2:4444") {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "migrate");
                assert_eq!(class, "GenericError");
                assert!(desc.contains("vfio-pci"));
            }
            other => panic!("expected Command error, got {other:?}"),
        }
        drop(client);
        server.join().expect("fake QEMU");
    }
}
