//! How a migration fails: [`MigrateError`]. Each error says in which state the source was
//! left, and what to do.

use super::hotplug::HotplugError;
use super::summary::error_text;
use crate::companion::control::ControlError;
use crate::qmp::QmpError;

/// Errors of a migration. Each says in which state the source was left.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A QMP call failed.
    #[error("a QMP command to the {side} QEMU failed")]
    Qmp {
        /// `source` or `destination`.
        side: &'static str,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// QEMU reported the migration failed.
    #[error("migration failed: {reason}; the source VM keeps running")]
    Failed {
        /// QEMU's `error-desc`.
        reason: String,
    },
    /// The migration was cancelled.
    #[error("migration cancelled; the source VM keeps running")]
    Cancelled,
    /// The cancel came as QEMU completed the migration: the source had stopped and sent
    /// everything (`postmigrate`). [`migrate`](super::migrate::migrate) rolls back (the
    /// destination is stopped, the source resumes) and reports this as the cause.
    #[error("migration cancelled as QEMU completed it")]
    CancelledAtCompletion,
    /// The destination died during the migration; it was cancelled.
    #[error(
        "the destination's {what} died during the migration ({detail}); the migration was \
         cancelled and the source VM keeps running{source_state}. Restart the destination and \
         migrate again"
    )]
    DestinationDied {
        /// `QEMU` or `companion`.
        what: &'static str,
        /// What was seen.
        detail: String,
        /// How the source was left, for the message.
        source_state: String,
    },
    /// The destination died as QEMU completed the migration: the source had sent everything
    /// and stopped (`postmigrate`), so it does not resume by itself. [`migrate`] rolls back
    /// (the source takes its VF state back and resumes), and reports this as the cause.
    ///
    /// [`migrate`]: super::migrate::migrate
    #[error("the destination's {what} died as QEMU completed the migration ({detail})")]
    DestinationLost {
        /// `QEMU` or `companion`.
        what: &'static str,
        /// What was seen.
        detail: String,
    },
    /// It took too long; it was cancelled.
    #[error("migration did not finish within {secs} s and was cancelled; the source VM keeps running. Raise --timeout or --max-bandwidth")]
    Timeout {
        /// The limit.
        secs: u64,
    },
    /// `unsafe-no-tracking` was asked for without the source companion to switch off.
    #[error(
        "the unsafe-no-tracking strategy switches off the source companion's dirty tracking: \
         give its control socket (--src-control and --dst-control); nothing was migrated"
    )]
    NoCompanion,
    /// The source companion did not switch its dirty tracking off.
    #[error(
        "the source companion did not switch off its dirty tracking (unsafe-no-tracking); \
         nothing was migrated"
    )]
    Tracking(#[source] ControlError),
    /// The VF could not move to the destination's companion.
    #[error("the VF could not move to the destination's companion: {0}")]
    Takeover(String),
    /// After QEMU completed, the destination could not take over the VF or start; it was
    /// stopped and the source resumed. The cause is part of the message, as for `Detach`.
    #[error(
        "{}; the destination was stopped, the source companion took its VF state back and the \
         source VM was resumed: it runs where it was. Fix the destination and migrate again",
        error_text(.0.as_ref())
    )]
    RolledBack(Box<MigrateError>),
    /// After QEMU completed, the destination could not take over or start, and the source
    /// could not be resumed either.
    #[error(
        "{}; the destination was stopped, but the source VM could not be resumed ({resume}): it \
         is paused in `postmigrate`. Check its companion, then resume it with QMP `cont`",
        error_text(.cause.as_ref())
    )]
    RollbackFailed {
        /// Why the destination did not take over.
        cause: Box<MigrateError>,
        /// Why the source did not resume.
        resume: String,
    },
    /// A rank's runtime did not report ready after SUSPEND.
    #[error("cooperative suspend failed; nothing was migrated and every rank was told RESUME")]
    Suspend(#[source] RankEventError),
    /// The passthrough VF could not be unplugged from the source. The cause and its own causes
    /// are part of the message (callers match on it), so none is repeated as a source.
    #[error(
        "passthrough-hotplug: unplugging the VF: {}. Nothing was migrated; every rank was told \
         RESUME",
        error_text(.0)
    )]
    Detach(HotplugError),
    /// The passthrough VF could not be plugged in at the destination. The cause is part of the
    /// message, as for `Detach`.
    #[error(
        "passthrough-hotplug: the VM runs at the destination, but plugging in its VF failed: \
         {}. Every rank was told RESUME; plug a VF in by hand (QMP device_add) if the job needs \
         it",
        error_text(.0)
    )]
    Attach(HotplugError),
    /// The destination did not reach `paused` after completion.
    #[error("the destination did not reach the paused state after completion (it is {status})")]
    DestinationNotReady {
        /// Its status.
        status: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hotplug_failures_say_the_cause_once() {
        let cause = HotplugError::NotReleased {
            id: "vfmig-vf".into(),
            secs: 3,
        };
        let e = MigrateError::Detach(cause);
        let msg = e.to_string();
        assert_eq!(msg.matches("did not release device `vfmig-vf`").count(), 1);
        assert!(msg.contains("Nothing was migrated"), "{msg}");
        assert!(std::error::Error::source(&e).is_none());
        // A QMP refusal keeps its reason, once.
        let e = MigrateError::Attach(HotplugError::Qmp {
            command: "device_add",
            source: QmpError::Disconnected {
                path: "/run/qmp.sock".into(),
            },
        });
        let msg = e.to_string();
        assert!(msg.contains("QMP device_add failed: "), "{msg}");
        assert!(msg.contains("/run/qmp.sock"), "{msg}");
        assert!(msg.contains("the VM runs at the destination"), "{msg}");
    }
}

/// Why a rank's runtime was not told SUSPEND or RESUME, or did not acknowledge it.
#[derive(Debug, thiserror::Error)]
pub enum RankEventError {
    /// The rank's companion could not be reached or refused.
    #[error("the companion at {} (a rank's control socket) failed", path.display())]
    Control {
        /// The rank's control socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: crate::companion::control::ControlError,
    },
    /// The rank's runtime did not acknowledge the event in time.
    #[error(
        "the runtime behind {} did not acknowledge {event:?} within {secs} s; is the guest's \
         agent or MPI runtime running?",
        path.display()
    )]
    NoAck {
        /// The rank's control socket.
        path: std::path::PathBuf,
        /// The event.
        event: crate::companion::control::GuestEvent,
        /// The wait, in seconds.
        secs: u64,
    },
}
