//! Which logs `flotilla logs` reads, as a pure rule: a workload's replicas, or for a Job each
//! index's latest attempt (or the attempt asked for), finished and failed ones included, since
//! their logs stay on the node that ran them. The API (`api.rs`) reads the store, asks
//! [`sources`], and relays each log from its node.

use std::collections::BTreeMap;

use proto::messages::LogSource;

/// A replica row of the workload (`attempt`: a Job replica's attempt number, if recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveReplica {
    pub name: String,
    pub index: u32,
    pub attempt: Option<u32>,
}

/// An attempt of a Job that ended (table `job_attempts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedAttempt {
    pub replica: String,
    pub index: u32,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogSourceError {
    #[error("workload {0:?} not found")]
    NotFound(String),
    #[error("{workload:?} has no replica {replica:?}")]
    NoSuchReplica { workload: String, replica: String },
    #[error("--attempt applies to Jobs; {0:?} is not a Job")]
    NotAJob(String),
    #[error("{what} has no attempt {attempt} (attempts so far: {have})")]
    NoSuchAttempt { what: String, attempt: u32, have: String },
}

/// The logs to read for `workload` (`is_job` when it is a Job), optionally only replica
/// `replica`, and for a Job attempt `attempt` instead of each index's latest. Empty when the
/// workload has nothing to read yet (no replica placed, no attempt started).
pub fn sources(
    workload: &str,
    is_job: bool,
    live: &[LiveReplica],
    ended: &[EndedAttempt],
    replica: Option<&str>,
    attempt: Option<u32>,
) -> Result<Vec<LogSource>, LogSourceError> {
    let wanted = |name: &str| replica.is_none_or(|r| r == name);
    if !is_job {
        if attempt.is_some() {
            return Err(LogSourceError::NotAJob(workload.to_string()));
        }
        let out: Vec<LogSource> = live
            .iter()
            .filter(|r| wanted(&r.name))
            .map(|r| LogSource { replica: r.name.clone(), attempt: None })
            .collect();
        if out.is_empty()
            && let Some(r) = replica
        {
            return Err(LogSourceError::NoSuchReplica { workload: workload.to_string(), replica: r.to_string() });
        }
        return Ok(out);
    }
    // Per index: its attempts, oldest first. A live row without a number (created before
    // attempts were numbered) is the index's latest, read from the replica's own log.
    #[derive(Default)]
    struct Index<'a> {
        name: &'a str,
        ended: Vec<u32>,
        live: Option<Option<u32>>,
    }
    let mut indexes: BTreeMap<u32, Index> = BTreeMap::new();
    for a in ended.iter().filter(|a| wanted(&a.replica)) {
        let i = indexes.entry(a.index).or_default();
        i.name = &a.replica;
        i.ended.push(a.attempt);
    }
    for r in live.iter().filter(|r| wanted(&r.name)) {
        let i = indexes.entry(r.index).or_default();
        i.name = &r.name;
        i.live = Some(r.attempt);
    }
    if let (true, Some(r)) = (indexes.is_empty(), replica)
        && attempt.is_some()
    {
        return Err(LogSourceError::NoSuchReplica { workload: workload.to_string(), replica: r.to_string() });
    }
    let mut out = Vec::new();
    for i in indexes.values_mut() {
        i.ended.sort_unstable();
        let chosen = match attempt {
            None => match i.live {
                Some(live) => live,
                None => i.ended.last().copied(),
            },
            Some(n) if i.ended.contains(&n) || i.live == Some(Some(n)) => Some(n),
            Some(_) => continue,
        };
        out.push(LogSource { replica: i.name.to_string(), attempt: chosen });
    }
    if let (true, Some(n)) = (out.is_empty(), attempt) {
        let have: Vec<String> = indexes
            .values()
            .map(|i| {
                let mut all: Vec<u32> = i.ended.clone();
                all.extend(i.live.flatten());
                all.sort_unstable();
                let nums: Vec<String> = all.iter().map(u32::to_string).collect();
                format!("{} {}", i.name, if nums.is_empty() { "none".into() } else { nums.join(", ") })
            })
            .collect();
        let what = match replica {
            Some(r) => format!("replica {r:?}"),
            None => format!("Job {workload:?}"),
        };
        let have = if have.is_empty() { "none".to_string() } else { have.join("; ") };
        return Err(LogSourceError::NoSuchAttempt { what, attempt: n, have });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(name: &str, index: u32, attempt: Option<u32>) -> LiveReplica {
        LiveReplica { name: name.into(), index, attempt }
    }
    fn ended(replica: &str, index: u32, attempt: u32) -> EndedAttempt {
        EndedAttempt { replica: replica.into(), index, attempt }
    }
    fn src(replica: &str, attempt: Option<u32>) -> LogSource {
        LogSource { replica: replica.into(), attempt }
    }

    #[test]
    fn a_replicated_workload_reads_its_replicas() {
        let l = [live("w-0", 0, None), live("w-1", 1, None)];
        assert_eq!(sources("w", false, &l, &[], None, None).unwrap(), [src("w-0", None), src("w-1", None)]);
        assert_eq!(sources("w", false, &l, &[], Some("w-1"), None).unwrap(), [src("w-1", None)]);
        assert_eq!(
            sources("w", false, &l, &[], Some("w-7"), None),
            Err(LogSourceError::NoSuchReplica { workload: "w".into(), replica: "w-7".into() })
        );
        assert_eq!(sources("w", false, &l, &[], None, Some(1)), Err(LogSourceError::NotAJob("w".into())));
        // Nothing placed yet: nothing to read, not an error (the caller may wait).
        assert_eq!(sources("w", false, &[], &[], None, None).unwrap(), []);
    }

    #[test]
    fn a_job_reads_each_index_latest_attempt_finished_or_running() {
        // Index 0 failed twice and runs its third attempt; index 1 failed once then succeeded;
        // index 2 ran before attempts were numbered.
        let l = [live("j-0", 0, Some(3)), live("j-2", 2, None)];
        let e = [ended("j-0", 0, 2), ended("j-0", 0, 1), ended("j-1", 1, 1), ended("j-1", 1, 2)];
        assert_eq!(
            sources("j", true, &l, &e, None, None).unwrap(),
            [src("j-0", Some(3)), src("j-1", Some(2)), src("j-2", None)]
        );
        // A finished Job: nothing live, the last attempts.
        assert_eq!(sources("j", true, &[], &e, None, None).unwrap(), [src("j-0", Some(2)), src("j-1", Some(2))]);
        assert_eq!(sources("j", true, &[], &e, Some("j-1"), None).unwrap(), [src("j-1", Some(2))]);
    }

    #[test]
    fn a_job_attempt_is_chosen_by_number_and_a_missing_one_is_explained() {
        let l = [live("j-0", 0, Some(3))];
        let e = [ended("j-0", 0, 1), ended("j-0", 0, 2), ended("j-1", 1, 1)];
        assert_eq!(sources("j", true, &l, &e, None, Some(1)).unwrap(), [src("j-0", Some(1)), src("j-1", Some(1))]);
        assert_eq!(sources("j", true, &l, &e, None, Some(3)).unwrap(), [src("j-0", Some(3))]);
        assert_eq!(sources("j", true, &l, &e, Some("j-0"), Some(2)).unwrap(), [src("j-0", Some(2))]);
        let err = sources("j", true, &l, &e, Some("j-1"), Some(4)).unwrap_err();
        assert_eq!(err.to_string(), "replica \"j-1\" has no attempt 4 (attempts so far: j-1 1)");
        let err = sources("j", true, &l, &e, None, Some(9)).unwrap_err();
        assert_eq!(err.to_string(), "Job \"j\" has no attempt 9 (attempts so far: j-0 1, 2, 3; j-1 1)");
        assert!(matches!(sources("j", true, &l, &e, Some("j-5"), Some(1)), Err(LogSourceError::NoSuchReplica { .. })));
    }
}
