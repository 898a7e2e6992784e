//! The fault matrix: phases × fault kinds, each cell one migration of `a` under lu-lite with
//! one fault, judged against a run without faults by one rule: the job's checksum matches, or
//! the job stops with an error that names what failed; nothing is lost silently.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{FaultPhase, Injection};
use crate::lab::scenario::{self, Fault, ScenarioError, ScenarioOptions, ScenarioReport};
use crate::orchestrator::migrate::Quiet;
use crate::orchestrator::strategy::StrategyKind;

/// How a cell ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "kebab-case")]
pub enum Outcome {
    /// Every rank finished with the reference's checksum, nothing lost or duplicated.
    ChecksumMatches,
    /// A rank or the migration reported an error naming what failed.
    StoppedWithError(String),
    /// The job finished with a wrong result (or duplicated operations) and nobody said so.
    LostSilently(String),
    /// The job stopped making progress and nobody said why.
    StalledSilently(String),
    /// The fault's phase never came: the cell proves nothing.
    NotInjected,
    /// The run itself could not be made (hosts, VMs): the cell proves nothing.
    RunFailed(String),
}

impl Outcome {
    /// Whether the cell keeps the rule (a cell that proves nothing does not).
    pub fn keeps_the_rule(&self) -> bool {
        matches!(
            self,
            Outcome::ChecksumMatches | Outcome::StoppedWithError(_)
        )
    }

    /// The cell's text in the table.
    pub fn label(&self) -> String {
        match self {
            Outcome::ChecksumMatches => "checksum matches".into(),
            Outcome::StoppedWithError(e) => format!("stopped with error: {e}"),
            Outcome::LostSilently(d) => format!("LOST SILENTLY: {d}"),
            Outcome::StalledSilently(d) => format!("STALLED SILENTLY: {d}"),
            Outcome::NotInjected => "NOT INJECTED (its phase never came)".into(),
            Outcome::RunFailed(e) => format!("RUN FAILED: {e}"),
        }
    }
}

/// Judges a run against the reference's checksums by the rule.
pub fn classify(r: &ScenarioReport, reference: &BTreeMap<String, Option<String>>) -> Outcome {
    if r.fault.as_ref().is_some_and(|f| f.fired_at_ms.is_none()) {
        return Outcome::NotInjected;
    }
    let every_rank_done = r.stalled.is_none() && r.ranks.values().all(|k| k.done);
    let all_rank_errors: Vec<(bool, String)> = r
        .ranks
        .iter()
        .flat_map(|(n, k)| {
            let failed = (k.failed_completions > 0).then(|| {
                (
                    false,
                    format!("{n}: {} operations failed", k.failed_completions),
                )
            });
            k.errors
                .iter()
                .map(move |e| (is_watchdog(e), format!("{n}: {e}")))
                .chain(failed)
        })
        .collect();
    // A rank's own watchdog says that it waited, not what failed: alone, it is a stall.
    let watchdog: Vec<String> = all_rank_errors
        .iter()
        .filter(|(w, _)| *w)
        .map(|(_, e)| e.clone())
        .collect();
    let rank_errors: Vec<String> = all_rank_errors
        .into_iter()
        .filter(|(w, _)| !*w)
        .map(|(_, e)| e)
        .collect();
    let stalled = match (&r.stalled, watchdog.is_empty()) {
        (s, true) => s.clone(),
        (Some(s), false) => Some(format!("{s}; {}", watchdog.join("; "))),
        (None, false) => Some(watchdog.join("; ")),
    };
    let checksums_match = r.checksums.values().all(Option::is_some) && &r.checksums == reference;
    if every_rank_done && rank_errors.is_empty() {
        if checksums_match && r.lost_ops == 0 && r.duplicate_ops == 0 {
            return Outcome::ChecksumMatches;
        }
        // The job says it finished well: a wrong result here is silent whatever the
        // migration reported.
        return Outcome::LostSilently(format!(
            "checksums {:?} (reference {:?}), lost {} duplicated {}",
            r.checksums, reference, r.lost_ops, r.duplicate_ops
        ));
    }
    // An error that says the source keeps running explains no stall (the job should then
    // have finished where it was), unless it adds that the source is in fact in another state.
    let explains_a_stall = |e: &String| !e.contains("keeps running") || e.contains("its state is");
    if let (Some(s), Some(e), true) = (&stalled, &r.migration_error, rank_errors.is_empty()) {
        if !explains_a_stall(e) {
            return Outcome::StalledSilently(format!(
                "the migration reported \"{e}\", yet the job {s}"
            ));
        }
    }
    let mut named = rank_errors;
    if let Some(e) = &r.migration_error {
        named.insert(0, format!("migration: {e}"));
    }
    if named.is_empty() {
        return Outcome::StalledSilently(
            stalled.unwrap_or_else(|| "a rank ended without its result".into()),
        );
    }
    if let Some(s) = &stalled {
        named.push(format!("job {s}"));
    }
    Outcome::StoppedWithError(named.join("; "))
}

/// Whether a rank's error is lu-lite's own watchdog (guest/src/lulite.rs: a rank that waited
/// too long for a halo, the row hashes or its own writes), which says that it waited, not what
/// failed.
fn is_watchdog(error: &str) -> bool {
    [
        "no completion for ",
        "not gathered within ",
        "not completed within ",
    ]
    .iter()
    .any(|w| error.contains(w))
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The fault (`null`: none, as in the negative control).
    pub fault: Option<Fault>,
    /// Its phase.
    pub phase: Option<FaultPhase>,
    /// How `a` migrated.
    pub strategy: StrategyKind,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// When the fault fired, ms from the start of the migration.
    pub fired_at_ms: Option<f64>,
    /// QEMU's total migration time when it completed, ms.
    pub total_ms: Option<u64>,
    /// QEMU's downtime when it completed, ms.
    pub downtime_ms: Option<u64>,
    /// The run's wall time, s.
    pub wall_s: f64,
    /// The migration's error, when it failed.
    pub migration_error: Option<String>,
    /// What the injector noted.
    pub notes: Vec<String>,
}

/// Runs `base` (lu-lite) once with `a` migrated under `strategy` and `injection` injected,
/// and judges it against `reference`.
pub fn run_cell(
    base: &ScenarioOptions,
    reference: &BTreeMap<String, Option<String>>,
    strategy: StrategyKind,
    injection: Option<Injection>,
) -> Cell {
    let start = Instant::now();
    let mut opts = base.clone();
    opts.strategy = Some(strategy);
    opts.fault = None;
    let phase = injection.as_ref().and_then(|i| match i.trigger {
        super::Trigger::At(p) => Some(p),
        super::Trigger::After(_) => None,
    });
    let fault = injection.as_ref().map(|i| i.fault);
    let strategy_name = serde_json::to_value(strategy)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    opts.run_dir = base.run_dir.join(format!(
        "{strategy_name}-{}-{}",
        fault.map_or("none", Fault::name),
        phase.map_or("none", FaultPhase::name)
    ));
    let result = scenario::run_with(&opts, injection.as_ref(), &mut Quiet);
    let wall_s = start.elapsed().as_secs_f64();
    match result {
        Ok(r) => Cell {
            fault,
            phase,
            strategy,
            outcome: classify(&r, reference),
            fired_at_ms: r.fault.as_ref().and_then(|f| f.fired_at_ms),
            total_ms: r.migration.as_ref().map(|m| m.total_ms),
            downtime_ms: r.migration.as_ref().map(|m| m.downtime_ms),
            wall_s,
            migration_error: r.migration_error.clone(),
            notes: r.fault.map(|f| f.notes).unwrap_or_default(),
        },
        Err(e) => Cell {
            fault,
            phase,
            strategy,
            outcome: match &e {
                // Without a stall window, a job that never finishes ends here.
                ScenarioError::Timeout { .. } => Outcome::StalledSilently(e.to_string()),
                _ => Outcome::RunFailed(crate::orchestrator::summary::error_text(&e)),
            },
            fired_at_ms: None,
            total_ms: None,
            downtime_ms: None,
            wall_s,
            migration_error: None,
            notes: vec![],
        },
    }
}

/// Settings of `vfmig bench faults`.
#[derive(Debug, Clone)]
pub struct MatrixOptions {
    /// The job (lu-lite), its run directory the parent of every cell's.
    pub base: ScenarioOptions,
    /// Phases to inject at.
    pub phases: Vec<FaultPhase>,
    /// Fault kinds.
    pub faults: Vec<Fault>,
    /// How long a cut link stays down.
    pub link_down: Duration,
    /// A job silent this long after its fault is stalled.
    pub stall: Duration,
}

/// The matrix's result.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixReport {
    /// The run without faults (and without migration).
    pub reference: BTreeMap<String, Option<String>>,
    /// The cells, phase by phase.
    pub cells: Vec<Cell>,
    /// Cells that break the rule (or prove nothing).
    pub failures: usize,
}

/// Runs the reference, then every cell; `progress` sees each cell as it ends.
pub fn run_matrix(
    opts: &MatrixOptions,
    mut progress: impl FnMut(usize, usize, &Cell),
) -> Result<MatrixReport, ScenarioError> {
    let mut reference_opts = opts.base.clone();
    reference_opts.strategy = None;
    reference_opts.fault = None;
    reference_opts.run_dir = opts.base.run_dir.join("reference");
    let reference = scenario::run(&reference_opts, &mut Quiet)?.checksums;
    let total = opts.phases.len() * opts.faults.len();
    let mut cells = Vec::new();
    for &phase in &opts.phases {
        for &fault in &opts.faults {
            let mut injection = Injection::at(fault, phase, opts.stall);
            injection.link_down = opts.link_down;
            let cell = run_cell(
                &opts.base,
                &reference,
                StrategyKind::Transparent,
                Some(injection),
            );
            progress(cells.len() + 1, total, &cell);
            cells.push(cell);
        }
    }
    let failures = cells.iter().filter(|c| !c.outcome.keeps_the_rule()).count();
    Ok(MatrixReport {
        reference,
        cells,
        failures,
    })
}

/// The matrix as a markdown table: a row per phase, a column per fault kind; then each cell
/// in full.
pub fn markdown(m: &MatrixReport) -> String {
    let mut faults: Vec<Fault> = Vec::new();
    let mut phases: Vec<FaultPhase> = Vec::new();
    for c in &m.cells {
        if let Some(f) = c.fault.filter(|f| !faults.contains(f)) {
            faults.push(f);
        }
        if let Some(p) = c.phase.filter(|p| !phases.contains(p)) {
            phases.push(p);
        }
    }
    let short = |o: &Outcome| match o {
        Outcome::ChecksumMatches => "checksum matches",
        Outcome::StoppedWithError(_) => "stopped with error",
        Outcome::LostSilently(_) => "**LOST SILENTLY**",
        Outcome::StalledSilently(_) => "**STALLED SILENTLY**",
        Outcome::NotInjected => "**NOT INJECTED**",
        Outcome::RunFailed(_) => "**RUN FAILED**",
    };
    let mut s = String::from("| phase |");
    for f in &faults {
        s += &format!(" {} |", f.name());
    }
    s += "\n|---|";
    s += &"---|".repeat(faults.len());
    s += "\n";
    for p in &phases {
        s += &format!("| {} |", p.name());
        for f in &faults {
            match m
                .cells
                .iter()
                .find(|c| c.phase == Some(*p) && c.fault == Some(*f))
            {
                Some(c) => s += &format!(" {} ({:.0} s) |", short(&c.outcome), c.wall_s),
                None => s += " – |",
            }
        }
        s += "\n";
    }
    s += &format!(
        "\n{} of {} cells break the rule (checksum matches, or the job stops with an error \
         naming what failed).\n\n",
        m.failures,
        m.cells.len()
    );
    for c in &m.cells {
        s += &format!(
            "- {} at {}: {} (fired at {} ms)\n",
            c.fault.map_or("none", Fault::name),
            c.phase.map_or("none", FaultPhase::name),
            c.outcome.label(),
            c.fired_at_ms.map_or("–".into(), |t| format!("{t:.0}"))
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::faults::FaultRecord;
    use crate::lab::scenario::{IterationMedians, RankResult, Workload};

    fn rank(checksum: &str) -> RankResult {
        RankResult {
            checksum: Some(checksum.into()),
            done: true,
            ..Default::default()
        }
    }

    fn run_report(ranks: &[(&str, RankResult)]) -> ScenarioReport {
        ScenarioReport {
            workload: Workload::LuLite,
            strategy: Some(StrategyKind::Transparent),
            vms: ranks.len(),
            checksum_match: false,
            checksums: ranks
                .iter()
                .map(|(n, r)| (n.to_string(), r.checksum.clone()))
                .collect(),
            reference: BTreeMap::new(),
            lost_ops: ranks.iter().map(|(_, r)| u64::from(!r.done)).sum(),
            duplicate_ops: ranks.iter().map(|(_, r)| r.duplicates).sum(),
            blackout_ms: 0.0,
            total_ms: 0,
            downtime_ms: 0,
            device_dirty_pages: None,
            bytes_sent: None,
            bytes_received: None,
            iteration_ms: IterationMedians::default(),
            migration: None,
            migration_error: None,
            source_vf_restored: None,
            ranks: ranks
                .iter()
                .map(|(n, r)| (n.to_string(), r.clone()))
                .collect(),
            fault: Some(FaultRecord {
                fault: Fault::CutLink,
                at: "mid-precopy".into(),
                fired_at_ms: Some(10.0),
                notes: vec![],
            }),
            stalled: None,
            op_latency: BTreeMap::new(),
        }
    }

    fn reference() -> BTreeMap<String, Option<String>> {
        [("a", "1"), ("b", "2")]
            .iter()
            .map(|(n, c)| (n.to_string(), Some(c.to_string())))
            .collect()
    }

    #[test]
    fn the_same_checksums_keep_the_rule() {
        let r = run_report(&[("a", rank("1")), ("b", rank("2"))]);
        assert_eq!(classify(&r, &reference()), Outcome::ChecksumMatches);
    }

    #[test]
    fn a_wrong_checksum_that_nobody_reports_is_lost_silently_even_after_a_migration_error() {
        let mut r = run_report(&[("a", rank("1")), ("b", rank("X"))]);
        r.migration_error = Some("the destination's QEMU died".into());
        let o = classify(&r, &reference());
        assert!(matches!(o, Outcome::LostSilently(_)), "{o:?}");
        assert!(!o.keeps_the_rule());
    }

    #[test]
    fn a_duplicated_operation_is_not_a_match() {
        let mut b = rank("2");
        b.duplicates = 1;
        let r = run_report(&[("a", rank("1")), ("b", b)]);
        assert!(matches!(
            classify(&r, &reference()),
            Outcome::LostSilently(_)
        ));
    }

    #[test]
    fn a_rank_that_names_its_error_stops_with_it() {
        let b = RankResult {
            errors: vec!["peer a unreachable".into()],
            ..Default::default()
        };
        let r = run_report(&[("a", rank("1")), ("b", b)]);
        assert_eq!(
            classify(&r, &reference()),
            Outcome::StoppedWithError("b: peer a unreachable".into())
        );
    }

    #[test]
    fn a_stalled_job_keeps_the_rule_only_when_something_named_the_failure() {
        let mut r = run_report(&[("a", RankResult::default()), ("b", rank("2"))]);
        r.stalled = Some("no result from [\"a\"]".into());
        let silent = classify(&r, &reference());
        assert!(matches!(silent, Outcome::StalledSilently(_)), "{silent:?}");
        assert!(!silent.keeps_the_rule());
        r.migration_error = Some("VF takeover failed".into());
        let named = classify(&r, &reference());
        assert!(named.keeps_the_rule(), "{named:?}");
        assert!(named.label().contains("VF takeover failed"));
    }

    #[test]
    fn a_stall_after_an_error_that_says_the_source_keeps_running_is_silent() {
        let mut r = run_report(&[("a", RankResult::default()), ("b", rank("2"))]);
        r.stalled = Some("no result from [\"a\"]".into());
        r.migration_error = Some("migration cancelled; the source VM keeps running".into());
        let o = classify(&r, &reference());
        assert!(matches!(o, Outcome::StalledSilently(_)), "{o:?}");
        assert!(o.label().contains("keeps running"));
        // The orchestrator's own correction names the state the source was left in.
        r.migration_error = Some(
            "the destination's QEMU died; the migration was cancelled and the source VM keeps \
             running (its state is postmigrate: check it)"
                .into(),
        );
        assert!(classify(&r, &reference()).keeps_the_rule());
    }

    #[test]
    fn a_job_whose_ranks_only_timed_out_stalled_silently() {
        let waited = |it: u32| RankResult {
            errors: vec![format!(
                "iteration {it}: no completion for 120 s (halo from above: false, from below: \
                 true, own writes outstanding: 0)"
            )],
            ..Default::default()
        };
        let r = run_report(&[("a", waited(406)), ("b", waited(407))]);
        let o = classify(&r, &reference());
        assert!(matches!(o, Outcome::StalledSilently(_)), "{o:?}");
        assert!(o.label().contains("no completion for 120 s"), "{o:?}");
        // With an error that names the cause beside it, the job stopped with that error.
        let mut b = waited(407);
        b.errors
            .push("Recv completion on QP 1 failed: RemoteLost".into());
        let r = run_report(&[("a", waited(406)), ("b", b)]);
        let o = classify(&r, &reference());
        assert!(matches!(o, Outcome::StoppedWithError(_)), "{o:?}");
        assert!(o.label().contains("RemoteLost"), "{o:?}");
    }

    #[test]
    fn a_fault_that_never_fired_proves_nothing() {
        let mut r = run_report(&[("a", rank("1")), ("b", rank("2"))]);
        r.fault.as_mut().unwrap().fired_at_ms = None;
        assert_eq!(classify(&r, &reference()), Outcome::NotInjected);
        assert!(!Outcome::NotInjected.keeps_the_rule());
    }

    #[test]
    fn the_table_has_a_row_per_phase_and_a_column_per_fault() {
        let cell = |fault, phase, outcome| Cell {
            fault: Some(fault),
            phase: Some(phase),
            strategy: StrategyKind::Transparent,
            outcome,
            fired_at_ms: Some(1.0),
            total_ms: None,
            downtime_ms: None,
            wall_s: 60.0,
            migration_error: None,
            notes: vec![],
        };
        let m = MatrixReport {
            reference: reference(),
            cells: vec![
                cell(
                    Fault::Cancel,
                    FaultPhase::PrecopyStart,
                    Outcome::ChecksumMatches,
                ),
                cell(
                    Fault::CutLink,
                    FaultPhase::PrecopyStart,
                    Outcome::LostSilently("x".into()),
                ),
                cell(
                    Fault::Cancel,
                    FaultPhase::AfterCont,
                    Outcome::ChecksumMatches,
                ),
            ],
            failures: 1,
        };
        let md = markdown(&m);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| phase | cancel | cut-link |");
        assert!(
            lines[2].starts_with("| precopy-start | checksum matches (60 s) | **LOST SILENTLY**")
        );
        assert!(lines[3].starts_with("| after-cont | checksum matches (60 s) | – |"));
        assert!(md.contains("1 of 3 cells break the rule"));
    }
}
