//! Job progress: which indexes of a run-to-completion workload should be active now, and
//! whether the job is Complete or Failed. A pure function of the spec, the per-index outcomes
//! the store recorded and the time passed in; the scheduler places the indexes it returns.
//! It never looks at nodes.

use std::collections::BTreeMap;

/// What a job asks for (Kubernetes Indexed-completion semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// Indexes `0..completions` must each succeed once. Default 1.
    pub completions: u32,
    /// At most this many indexes run at once; 0 suspends the job. Default 1.
    pub parallelism: u32,
    /// The job fails once the failures of all indexes together exceed this. Default 6.
    pub backoff_limit: u32,
    /// A failed index is retried `base * 2^(failures-1)` after its last failure. Default 10 s.
    pub backoff_base_ms: u64,
    /// Cap of that delay. Default 6 min.
    pub backoff_max_ms: u64,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec { completions: 1, parallelism: 1, backoff_limit: 6, backoff_base_ms: 10_000, backoff_max_ms: 360_000 }
    }
}

/// What happened so far to one index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexOutcome {
    /// The index ran to completion with exit status 0.
    pub succeeded: bool,
    /// How many attempts of this index failed.
    pub failures: u32,
    /// An attempt is running (or starting) on a node.
    pub running: bool,
    /// When the last attempt failed (same clock as `now_ms`).
    pub last_failure_ms: Option<u64>,
}

/// The per-index outcomes of a job; indexes never mentioned have not run yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobProgress {
    pub indexes: BTreeMap<u32, IndexOutcome>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JobPhase {
    #[default]
    Running,
    /// Every index succeeded.
    Complete,
    /// The failures exceeded `backoff_limit`; nothing runs any more.
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobPlan {
    pub phase: JobPhase,
    /// Indexes that should be running now, ascending. Empty unless `Running`.
    pub active: Vec<u32>,
    /// Indexes below `completions` that succeeded.
    pub succeeded: u32,
    /// Failed attempts over all indexes.
    pub failed: u32,
    /// The earliest time a backed-off index becomes eligible while a slot is free: the
    /// controller should run the scheduler again then.
    pub retry_at_ms: Option<u64>,
}

fn backoff(spec: &JobSpec, failures: u32) -> u64 {
    let shift = failures.saturating_sub(1).min(63);
    spec.backoff_base_ms.saturating_mul(1u64 << shift).min(spec.backoff_max_ms)
}

/// Decides the job's phase and its active indexes. Running indexes stay active (the lowest
/// ones if parallelism shrank); free slots go to the lowest pending indexes whose backoff has
/// elapsed.
pub fn job_plan(spec: &JobSpec, progress: &JobProgress, now_ms: u64) -> JobPlan {
    let in_range = || progress.indexes.range(..spec.completions);
    let succeeded = in_range().filter(|(_, o)| o.succeeded).count() as u32;
    let failed = progress.indexes.values().fold(0u32, |acc, o| acc.saturating_add(o.failures));
    let mut plan = JobPlan { succeeded, failed, ..JobPlan::default() };
    if succeeded >= spec.completions {
        plan.phase = JobPhase::Complete;
        return plan;
    }
    if failed > spec.backoff_limit {
        plan.phase = JobPhase::Failed;
        return plan;
    }
    let slots = spec.parallelism as usize;
    plan.active = in_range().filter(|(_, o)| o.running && !o.succeeded).map(|(i, _)| *i).take(slots).collect();
    let mut index = 0u32;
    while plan.active.len() < slots && index < spec.completions {
        let outcome = progress.indexes.get(&index);
        let busy = outcome.is_some_and(|o| o.succeeded || o.running);
        if !busy {
            let eligible_at = outcome
                .filter(|o| o.failures > 0)
                .map(|o| o.last_failure_ms.unwrap_or(0).saturating_add(backoff(spec, o.failures)));
            match eligible_at {
                Some(at) if at > now_ms => plan.retry_at_ms = Some(plan.retry_at_ms.map_or(at, |r| r.min(at))),
                _ => plan.active.push(index),
            }
        }
        index += 1;
    }
    plan.active.sort_unstable();
    plan
}
