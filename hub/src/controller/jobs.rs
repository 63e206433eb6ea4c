//! Job attempts: which ended on their node (and are recorded, once, leaving the node), and
//! the progress the scheduler's [`crate::scheduler::job_plan`] decides from. Back-off
//! instants are cluster time (see [`super::time`]).

use std::collections::{BTreeMap, BTreeSet};

use proto::messages::Phase;

use crate::scheduler::{IndexOutcome, JobProgress};

use super::{JobAttempt, JobIndex, Replica};

/// The attempts of the Job workloads `jobs` that ended: replicas placed on a node whose
/// status for their assigned template is Succeeded or Failed. Sorted by replica name.
pub fn finished_attempts(jobs: &BTreeSet<&str>, replicas: &[&Replica]) -> Vec<JobAttempt> {
    let mut out: Vec<JobAttempt> = replicas
        .iter()
        .filter(|r| jobs.contains(r.workload.as_str()) && r.reported.template_hash == r.template_hash)
        .filter_map(|r| {
            let succeeded = match r.reported.phase {
                Phase::Succeeded => true,
                Phase::Failed => false,
                _ => return None,
            };
            Some(JobAttempt {
                replica: r.name.clone(),
                workload: r.workload.clone(),
                index: r.index,
                node: r.node.clone()?,
                succeeded,
            })
        })
        .collect();
    out.sort_by(|a, b| a.replica.cmp(&b.replica));
    out
}

/// The recorded outcomes with `attempts` counted in at `now_ms`, as the store records them:
/// an index succeeds once and for all, each failure counts and restarts its back-off.
pub fn record(indexes: &[JobIndex], attempts: &[JobAttempt], now_ms: u64) -> BTreeMap<(String, u32), JobIndex> {
    let mut out: BTreeMap<(String, u32), JobIndex> =
        indexes.iter().map(|i| ((i.workload.clone(), i.index), i.clone())).collect();
    for a in attempts {
        let row = out.entry((a.workload.clone(), a.index)).or_insert_with(|| JobIndex {
            workload: a.workload.clone(),
            index: a.index,
            succeeded: false,
            failures: 0,
            failed_at_ms: None,
        });
        if a.succeeded {
            row.succeeded = true;
        } else {
            row.failures = row.failures.saturating_add(1);
            row.failed_at_ms = Some(now_ms);
        }
    }
    out
}

/// The number of the next attempt of `workload`'s index `index`, given the outcomes
/// recorded (this pass's included): every ended attempt either succeeded (and the index
/// never runs again) or counted a failure, so it is the failures so far plus one.
pub fn attempt_number(recorded: &BTreeMap<(String, u32), JobIndex>, workload: &str, index: u32) -> u32 {
    recorded.get(&(workload.to_string(), index)).map_or(0, |i| i.failures).saturating_add(1)
}

/// A Job's phase as `get workloads` shows it: the plan's, except that a running Job with
/// nothing on a node after a failure is waiting out a back-off, shown as `BackOff` (not
/// `Running`, as nothing runs).
pub fn display_phase(plan: &crate::scheduler::JobPlan, active: u32) -> &'static str {
    use crate::scheduler::JobPhase;
    match plan.phase {
        JobPhase::Complete => "Complete",
        JobPhase::Failed => "Failed",
        JobPhase::Running if active == 0 && plan.failed > 0 => "BackOff",
        JobPhase::Running => "Running",
    }
}

/// A Job's progress: the outcomes recorded, and which indexes have an attempt on a node now.
pub fn progress<'a>(
    workload: &str,
    recorded: impl IntoIterator<Item = &'a JobIndex>,
    replicas: impl IntoIterator<Item = (u32, bool)>,
) -> JobProgress {
    let mut progress = JobProgress::default();
    for r in recorded.into_iter().filter(|r| r.workload == workload) {
        progress.indexes.insert(
            r.index,
            IndexOutcome {
                succeeded: r.succeeded,
                failures: r.failures,
                running: false,
                last_failure_ms: r.failed_at_ms,
            },
        );
    }
    for (index, placed) in replicas {
        if placed {
            progress.indexes.entry(index).or_default().running = true;
        }
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::inputs::Reported;

    fn replica(name: &str, index: u32, node: Option<&str>, phase: Phase, hash: &str) -> Replica {
        Replica {
            name: name.into(),
            workload: name.split('-').next().unwrap().into(),
            index,
            node: node.map(Into::into),
            template_hash: "t".into(),
            reported: Reported { phase, ready: false, template_hash: hash.into() },
            unschedulable: String::new(),
        }
    }

    #[test]
    fn only_attempts_that_ended_on_their_node_on_their_template_are_finished() {
        let rs = [
            replica("j-1", 1, Some("n"), Phase::Failed, "t"),
            replica("j-0", 0, Some("n"), Phase::Succeeded, "t"),
            replica("j-2", 2, Some("n"), Phase::Running, "t"),
            replica("j-3", 3, Some("n"), Phase::Failed, "old"),
            replica("j-4", 4, None, Phase::Failed, "t"),
            replica("s-0", 0, Some("n"), Phase::Failed, "t"),
        ];
        let refs: Vec<&Replica> = rs.iter().collect();
        let got = finished_attempts(&BTreeSet::from(["j"]), &refs);
        let names: Vec<(&str, bool)> = got.iter().map(|a| (a.replica.as_str(), a.succeeded)).collect();
        assert_eq!(names, [("j-0", true), ("j-1", false)]);
    }

    #[test]
    fn recording_counts_failures_and_keeps_a_success() {
        let before = [JobIndex { workload: "j".into(), index: 0, succeeded: true, failures: 1, failed_at_ms: Some(5) }];
        let attempt = |index, succeeded| JobAttempt {
            replica: format!("j-{index}"),
            workload: "j".into(),
            index,
            node: "n".into(),
            succeeded,
        };
        let after = record(&before, &[attempt(0, false), attempt(1, false), attempt(2, true)], 90);
        let j = |i: u32| after[&("j".to_string(), i)].clone();
        assert_eq!((j(0).succeeded, j(0).failures, j(0).failed_at_ms), (true, 2, Some(90)));
        assert_eq!((j(1).succeeded, j(1).failures, j(1).failed_at_ms), (false, 1, Some(90)));
        assert_eq!((j(2).succeeded, j(2).failures, j(2).failed_at_ms), (true, 0, None));
        let p = progress("j", after.values(), [(1, true), (3, false)]);
        assert!(p.indexes[&1].running && !p.indexes.contains_key(&3));
        assert_eq!(p.indexes[&1].last_failure_ms, Some(90));
        // Attempts are numbered from the failures recorded: index 0 failed twice, 1 once,
        // 3 never ran.
        assert_eq!(attempt_number(&after, "j", 0), 3);
        assert_eq!(attempt_number(&after, "j", 1), 2);
        assert_eq!(attempt_number(&after, "j", 3), 1);
        assert_eq!(attempt_number(&after, "other", 0), 1);
    }

    #[test]
    fn a_running_job_with_nothing_placed_after_a_failure_shows_back_off() {
        use crate::scheduler::{JobPhase, JobPlan};
        let plan = |phase, failed| JobPlan { phase, failed, ..JobPlan::default() };
        assert_eq!(display_phase(&plan(JobPhase::Running, 1), 0), "BackOff");
        assert_eq!(display_phase(&plan(JobPhase::Running, 1), 1), "Running");
        // Not started yet: no failure, nothing placed.
        assert_eq!(display_phase(&plan(JobPhase::Running, 0), 0), "Running");
        assert_eq!(display_phase(&plan(JobPhase::Failed, 3), 0), "Failed");
        assert_eq!(display_phase(&plan(JobPhase::Complete, 1), 0), "Complete");
    }
}
