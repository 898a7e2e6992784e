//! How a migration treats the VF and the job's ranks: the strategy, with what each one needs.
//!
//! - [`Strategy`] carries its inputs (the ranks' control sockets, the hotplug settings) and is
//!   part of [`MigrateOptions`](super::options::MigrateOptions); the state machine in
//!   [`migrate`](super::migrate) matches it once.
//! - [`StrategyKind`] is its name alone, for the command line, tables and reports;
//!   [`StrategyKind::with`] turns a kind plus the caller's inputs into a [`Strategy`], for the
//!   CLI and the lab's scenarios alike.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::hotplug::{self, Hotplug, HotplugError};

/// A strategy's name, without its inputs: what `--strategy` takes and reports print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// vfmig's own: device writes keep going through precopy, each logged into QEMU's dirty
    /// log; the VF is quiesced only inside the downtime.
    Transparent,
    /// The paper's design, the baseline to beat: every rank's runtime suspends communication
    /// for the whole migration, then resumes.
    Cooperative,
    /// The paper's own setting: the VF is a passthrough PCI device of QEMU (`vfio-pci`); every
    /// rank suspends, the VF is unplugged, the VM migrates, a VF is plugged in at the
    /// destination, and the ranks resume.
    PassthroughHotplug,
    /// Negative control: the same load with the dirty log switched off. Loses writes, by
    /// design, to prove that the check catches it.
    UnsafeNoTracking,
}

/// How one migration treats the VF and the job's ranks, with what that needs.
#[derive(Debug, Clone, Default)]
pub enum Strategy {
    /// RDMA keeps running through precopy; the VF is quiesced inside `GET_VRING_BASE` and moves
    /// to the destination's companion at switchover (when both companions are given).
    #[default]
    Transparent,
    /// Every rank's runtime is told SUSPEND before precopy and RESUME after it.
    Cooperative {
        /// The control sockets of every rank's companion, the migrating VM's source companion
        /// among them.
        ranks: Vec<PathBuf>,
    },
    /// As `Cooperative`, and the VF, a PCI device of QEMU, is unplugged before precopy and a
    /// free one plugged in at the destination after it.
    PassthroughHotplug {
        /// The control sockets of every rank's companion; empty: no runtime to suspend (the
        /// VF still moves by unplug and plug).
        ranks: Vec<PathBuf>,
        /// Which device leaves the source, and what goes in at the destination.
        hotplug: Hotplug,
    },
    /// Negative control: the source companion's dirty tracking of device writes is switched off
    /// before precopy (it needs the companions' control sockets).
    UnsafeNoTracking,
}

impl Strategy {
    /// Its name.
    pub fn kind(&self) -> StrategyKind {
        match self {
            Self::Transparent => StrategyKind::Transparent,
            Self::Cooperative { .. } => StrategyKind::Cooperative,
            Self::PassthroughHotplug { .. } => StrategyKind::PassthroughHotplug,
            Self::UnsafeNoTracking => StrategyKind::UnsafeNoTracking,
        }
    }
}

/// The passthrough VF as the caller names it: `-device` strings, parsed by
/// [`StrategyKind::with`].
#[derive(Debug, Clone, Default)]
pub struct VfDevices {
    /// The id of the VF device on the source (`-device …,id=ID`).
    pub device_id: String,
    /// The free VF to plug in at the destination, in `-device` syntax.
    pub destination: Option<String>,
    /// The source's VF in `-device` syntax, plugged back in if the migration fails after the
    /// unplug; `None`: the source keeps running without it.
    pub source: Option<String>,
    /// How long the guest may take to release the VF, and its driver to come up on the new one.
    pub timeout: Duration,
}

/// What a strategy may need, as the CLI or a scenario has it.
#[derive(Debug, Clone, Default)]
pub struct StrategyInputs {
    /// Control sockets of every rank's companion (`cooperative`, `passthrough-hotplug`).
    pub ranks: Vec<PathBuf>,
    /// The passthrough VF (`passthrough-hotplug`).
    pub vf: VfDevices,
}

/// Why a strategy cannot be built from the inputs given.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    /// A strategy that suspends ranks was given none.
    #[error(
        "--strategy {kind:?} suspends every rank of the job: give --rank-control for every rank"
    )]
    NoRanks {
        /// The strategy.
        kind: StrategyKind,
    },
    /// `passthrough-hotplug` without a VF for the destination.
    #[error(
        "--strategy passthrough-hotplug needs --dst-vf-device (the free VF to plug in at the \
         destination)"
    )]
    NoDestinationVf,
    /// A `-device` string of the VF is malformed.
    #[error("the passthrough VF's device arguments are malformed")]
    VfDevice(#[source] HotplugError),
}

impl StrategyKind {
    /// This strategy with its inputs taken from `inputs`: the one place where a name becomes a
    /// strategy, for the CLI and the scenarios.
    pub fn with(self, inputs: StrategyInputs) -> Result<Strategy, StrategyError> {
        let needs_ranks = |ranks: Vec<PathBuf>| {
            if ranks.is_empty() {
                Err(StrategyError::NoRanks { kind: self })
            } else {
                Ok(ranks)
            }
        };
        Ok(match self {
            Self::Transparent => Strategy::Transparent,
            Self::UnsafeNoTracking => Strategy::UnsafeNoTracking,
            Self::Cooperative => Strategy::Cooperative {
                ranks: needs_ranks(inputs.ranks)?,
            },
            Self::PassthroughHotplug => {
                let ranks = needs_ranks(inputs.ranks)?;
                let vf = inputs.vf;
                let destination = vf.destination.ok_or(StrategyError::NoDestinationVf)?;
                let parse =
                    |spec: &str| hotplug::device_args(spec).map_err(StrategyError::VfDevice);
                Strategy::PassthroughHotplug {
                    ranks,
                    hotplug: Hotplug {
                        device_id: vf.device_id,
                        destination_device: parse(&destination)?,
                        source_device: vf.source.as_deref().map(parse).transpose()?,
                        detach_timeout: vf.timeout,
                        attach_timeout: vf.timeout,
                    },
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranks() -> Vec<PathBuf> {
        vec!["a.sock".into(), "b.sock".into()]
    }

    fn vf(destination: Option<&str>) -> VfDevices {
        VfDevices {
            device_id: "vf0".into(),
            destination: destination.map(String::from),
            source: Some("vfio-pci,host=0000:3b:02.1,id=vf0,bus=port".into()),
            timeout: Duration::from_secs(7),
        }
    }

    #[test]
    fn every_kind_becomes_the_strategy_of_its_name() {
        let inputs = StrategyInputs {
            ranks: ranks(),
            vf: vf(Some("vfio-pci,host=0000:3b:02.2,id=vf0,bus=port")),
        };
        for kind in [
            StrategyKind::Transparent,
            StrategyKind::Cooperative,
            StrategyKind::PassthroughHotplug,
            StrategyKind::UnsafeNoTracking,
        ] {
            assert_eq!(kind.with(inputs.clone()).unwrap().kind(), kind);
        }
        match StrategyKind::PassthroughHotplug.with(inputs).unwrap() {
            Strategy::PassthroughHotplug { ranks: r, hotplug } => {
                assert_eq!(r, ranks());
                assert_eq!(hotplug.device_id, "vf0");
                assert_eq!(hotplug.destination_device["host"], "0000:3b:02.2");
                assert_eq!(hotplug.source_device.unwrap()["host"], "0000:3b:02.1");
                assert_eq!(hotplug.detach_timeout, Duration::from_secs(7));
                assert_eq!(hotplug.attach_timeout, Duration::from_secs(7));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transparent_and_unsafe_need_nothing() {
        for kind in [StrategyKind::Transparent, StrategyKind::UnsafeNoTracking] {
            assert_eq!(kind.with(StrategyInputs::default()).unwrap().kind(), kind);
        }
    }

    #[test]
    fn missing_inputs_are_named_with_the_flag_that_gives_them() {
        let e = StrategyKind::Cooperative
            .with(StrategyInputs::default())
            .unwrap_err();
        assert!(matches!(e, StrategyError::NoRanks { .. }), "{e:?}");
        assert!(e.to_string().contains("--rank-control"), "{e}");
        let e = StrategyKind::PassthroughHotplug
            .with(StrategyInputs {
                ranks: ranks(),
                vf: vf(None),
            })
            .unwrap_err();
        assert!(e.to_string().contains("--dst-vf-device"), "{e}");
        let e = StrategyKind::PassthroughHotplug
            .with(StrategyInputs {
                ranks: ranks(),
                vf: vf(Some("host=1")),
            })
            .unwrap_err();
        assert!(matches!(e, StrategyError::VfDevice(_)), "{e:?}");
    }

    #[test]
    fn kinds_are_written_in_kebab_case() {
        let json = serde_json::to_string(&StrategyKind::PassthroughHotplug).unwrap();
        assert_eq!(json, "\"passthrough-hotplug\"");
        assert_eq!(
            format!("{:?}", StrategyKind::UnsafeNoTracking),
            "UnsafeNoTracking"
        );
    }
}
