//! PCI hot-unplug and hot-plug of a passthrough VF, for the `passthrough-hotplug` strategy.
//!
//! The VF is an ordinary PCI device of QEMU (`-device vfio-pci,host=…,id=…,bus=<pcie-root-port>`
//! in production; any emulated PCIe NIC in the tests: the QMP commands are the same). A device
//! that cannot migrate must be gone before precopy and plugged again at the destination:
//! - [`detach`]: `device_del`, then wait for QEMU's `DEVICE_DELETED`, which comes only once the
//!   guest has released the device (its driver unbound, the slot powered off);
//! - [`attach`]: `device_add` on the destination's pcie-root-port, then wait until the guest's
//!   driver has enabled the device.
//!
//! "Driver up" is read from QEMU, with no help from the guest: a hot-added device's BARs
//! decode only once a driver's probe enables it (`pci_enable_device`); until then QEMU reports
//! them unmapped in `query-pci`.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::qmp::{QmpClient, QmpError};

/// What QEMU reports as the address of a BAR that does not decode.
const BAR_UNMAPPED: u64 = u64::MAX;

/// Where the passthrough VF is, and how to plug one in.
#[derive(Debug, Clone)]
pub struct Hotplug {
    /// The device's `id` on the source.
    pub device_id: String,
    /// `device_add` arguments of a free VF at the destination, on its pcie-root-port.
    pub destination_device: Map<String, Value>,
    /// `device_add` arguments that plug the VF back into the source when the migration fails
    /// after the unplug; `None`: the source stays without it (said in the error).
    pub source_device: Option<Map<String, Value>>,
    /// How long the guest may take to release the device.
    pub detach_timeout: Duration,
    /// How long the guest's driver may take to come up on the new device.
    pub attach_timeout: Duration,
}

/// How long each half took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HotplugTimes {
    /// `device_del` to `DEVICE_DELETED`, ms.
    pub detach_ms: f64,
    /// `device_add` to the guest's driver having enabled the device, ms.
    pub attach_ms: f64,
    /// The device's PCI address at the destination (`bus:slot.function`).
    pub destination_address: Option<String>,
}

/// Why a hot-unplug or hot-plug failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// A QMP command failed.
    #[error("QMP {command} failed")]
    Qmp {
        /// The command.
        command: &'static str,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// The guest did not release the device in time.
    #[error(
        "the guest did not release device `{id}` within {secs} s after device_del (its driver \
         still holds it, or the guest does not handle PCI hot-unplug: check its console for \
         pciehp/acpiphp messages); the unplug request may still complete later"
    )]
    NotReleased {
        /// The device.
        id: String,
        /// The limit.
        secs: u64,
    },
    /// The guest's driver did not enable the new device in time.
    #[error(
        "the guest's driver did not come up on device `{id}` within {secs} s after device_add \
         (no driver bound it, or its probe failed: check the guest's console); the device is \
         plugged in"
    )]
    DriverNotUp {
        /// The device.
        id: String,
        /// The limit.
        secs: u64,
    },
    /// A `--*-vf-device` string is malformed.
    #[error("device arguments `{spec}`: {reason}")]
    BadDeviceArgs {
        /// What was given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
}

/// Parses QEMU's `-device` syntax, `DRIVER,key=value,…`, into `device_add` arguments.
/// `on`/`off`/`true`/`false` become booleans and decimal numbers integers (QMP's `device_add`
/// is typed); everything else stays a string. Values cannot contain commas.
pub fn device_args(spec: &str) -> Result<Map<String, Value>, HotplugError> {
    let bad = |reason: &str| HotplugError::BadDeviceArgs {
        spec: spec.into(),
        reason: reason.into(),
    };
    let mut parts = spec.split(',');
    let driver = parts.next().unwrap_or("").trim();
    if driver.is_empty() || driver.contains('=') {
        return Err(bad(
            "it must start with the driver, e.g. `vfio-pci,host=0000:3b:02.1,id=vf0,bus=vf-port`",
        ));
    }
    let mut map = Map::new();
    map.insert("driver".into(), Value::String(driver.into()));
    for p in parts {
        let Some((k, v)) = p.split_once('=') else {
            return Err(bad(&format!("`{p}` is not key=value")));
        };
        let value = match v {
            "on" | "true" => Value::Bool(true),
            "off" | "false" => Value::Bool(false),
            _ => match v.parse::<i64>() {
                Ok(n) if !v.starts_with('0') || v == "0" => Value::from(n),
                _ => Value::String(v.into()),
            },
        };
        map.insert(k.trim().into(), value);
    }
    if !map.contains_key("id") {
        return Err(bad("it needs an id=… (the device is found again by it)"));
    }
    Ok(map)
}

/// `device_del` of `id`, then waits for the guest to release it. Returns how long it took.
pub fn detach(qmp: &QmpClient, id: &str, timeout: Duration) -> Result<Duration, HotplugError> {
    let events = qmp.events();
    while events.try_recv().is_ok() {} // only events from now on
    let start = Instant::now();
    qmp.execute("device_del", Some(serde_json::json!({ "id": id })))
        .map_err(|source| HotplugError::Qmp {
            command: "device_del",
            source,
        })?;
    let deadline = start + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(ev) if ev.event == "DEVICE_DELETED" && ev.data["device"].as_str() == Some(id) => {
                let took = start.elapsed();
                tracing::info!(
                    id,
                    ms = took.as_millis() as u64,
                    "the guest released the VF"
                );
                return Ok(took);
            }
            Ok(_) => {}
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                return Err(HotplugError::NotReleased {
                    id: id.into(),
                    secs: timeout.as_secs(),
                })
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(HotplugError::Qmp {
                    command: "device_del",
                    source: QmpError::Disconnected {
                        path: qmp.path().into(),
                    },
                })
            }
        }
    }
}

/// `device_add` with `args`, then waits until the guest's driver has enabled the device.
pub fn attach(
    qmp: &QmpClient,
    args: &Map<String, Value>,
    timeout: Duration,
) -> Result<(Duration, Option<String>), HotplugError> {
    let Some(id) = args.get("id").and_then(Value::as_str).map(String::from) else {
        return Err(HotplugError::BadDeviceArgs {
            spec: Value::Object(args.clone()).to_string(),
            reason: "it needs an id=… (the device is found again by it)".into(),
        });
    };
    let start = Instant::now();
    qmp.execute("device_add", Some(Value::Object(args.clone())))
        .map_err(|source| HotplugError::Qmp {
            command: "device_add",
            source,
        })?;
    let deadline = start + timeout;
    loop {
        let pci = qmp
            .execute("query-pci", None)
            .map_err(|source| HotplugError::Qmp {
                command: "query-pci",
                source,
            })?;
        if let Some(dev) = find_device(&pci, &id) {
            if driver_enabled(dev) {
                let took = start.elapsed();
                let addr = format!(
                    "{:02x}:{:02x}.{}",
                    dev["bus"].as_u64().unwrap_or(0),
                    dev["slot"].as_u64().unwrap_or(0),
                    dev["function"].as_u64().unwrap_or(0)
                );
                tracing::info!(id, %addr, ms = took.as_millis() as u64, "the guest's driver enabled the VF");
                return Ok((took, Some(addr)));
            }
        }
        if Instant::now() > deadline {
            return Err(HotplugError::DriverNotUp {
                id,
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether device `id` is plugged in and its guest driver has enabled it.
pub fn driver_up(qmp: &QmpClient, id: &str) -> bool {
    qmp.execute("query-pci", None)
        .ok()
        .and_then(|pci| find_device(&pci, id).map(driver_enabled))
        .unwrap_or(false)
}

/// The device with qdev id `id` anywhere in a `query-pci` reply (behind bridges too).
fn find_device<'a>(pci: &'a Value, id: &str) -> Option<&'a Value> {
    fn in_devices<'a>(devices: &'a Value, id: &str) -> Option<&'a Value> {
        for d in devices.as_array()? {
            if d["qdev_id"].as_str() == Some(id) {
                return Some(d);
            }
            if let Some(found) = in_devices(&d["pci_bridge"]["devices"], id) {
                return Some(found);
            }
        }
        None
    }
    pci.as_array()?
        .iter()
        .find_map(|bus| in_devices(&bus["devices"], id))
}

/// Whether a driver enabled the device: it has memory BARs and all of them decode.
fn driver_enabled(dev: &Value) -> bool {
    let bars: Vec<&Value> = dev["regions"]
        .as_array()
        .map(|r| r.iter().filter(|b| b["type"] == "memory").collect())
        .unwrap_or_default();
    !bars.is_empty()
        && bars
            .iter()
            .all(|b| b["address"].as_u64().is_some_and(|a| a != BAR_UNMAPPED))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn device_args_follow_qemus_syntax() {
        let m =
            device_args("vfio-pci,host=0000:3b:02.1,id=vf0,bus=vf-port,x-enable=on,bootindex=3")
                .unwrap();
        assert_eq!(m["driver"], "vfio-pci");
        assert_eq!(m["host"], "0000:3b:02.1");
        assert_eq!(m["id"], "vf0");
        assert_eq!(m["x-enable"], true);
        assert_eq!(m["bootindex"], 3);
        // a MAC and a zero-padded value stay strings
        let m = device_args("virtio-net-pci,id=v,mac=52:54:00:00:00:01,addr=00").unwrap();
        assert_eq!(m["mac"], "52:54:00:00:00:01");
        assert_eq!(m["addr"], "00");
        for bad in ["", "host=1,id=x", "vfio-pci,host", "vfio-pci,host=1"] {
            let e = device_args(bad).unwrap_err().to_string();
            assert!(e.contains("device arguments"), "{e}");
        }
    }

    fn pci(address: u64) -> Value {
        json!([{ "bus": 0, "devices": [
            { "bus": 0, "slot": 1, "function": 0, "qdev_id": "nic", "regions": [] },
            { "bus": 0, "slot": 2, "function": 0, "qdev_id": "port", "regions": [],
              "pci_bridge": { "bus": { "number": 1 }, "devices": [
                { "bus": 1, "slot": 0, "function": 0, "qdev_id": "vf0", "regions": [
                    { "bar": 1, "type": "memory", "address": address, "size": 4096 },
                    { "bar": 0, "type": "io", "address": 49152, "size": 32 } ] } ] } } ] }])
    }

    #[test]
    fn a_device_behind_a_root_port_is_found_and_its_bars_read() {
        let up = pci(0xfe00_0000);
        let dev = find_device(&up, "vf0").expect("found behind the bridge");
        assert_eq!(dev["bus"], 1);
        assert!(driver_enabled(dev));
        let down = pci(u64::MAX);
        assert!(!driver_enabled(find_device(&down, "vf0").unwrap()));
        assert!(find_device(&up, "missing").is_none());
        // no memory BAR at all: nothing says a driver is up
        assert!(!driver_enabled(find_device(&up, "nic").unwrap()));
    }
}
