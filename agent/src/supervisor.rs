//! The supervisor: the agent's sans-IO core. It holds the replicas a node must run and what is
//! happening to each, takes events in (`set_assignments`, `on_started`, `on_exited`,
//! `on_stopped`) and hands decisions out (`poll_actions`, `next_deadline`,
//! `take_status_changes`). It never touches a runtime, a socket or the clock: time is passed
//! in, so restart policies and backoff are tested in microseconds.
//!
//! Each run of a replica has a `run_id`; events for an old run are ignored, so a late exit
//! report can never confuse the state of the run that replaced it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proto::messages::{Assignment, EventReason, Phase, ReplicaStatus, Termination};

use crate::probe::Verdict;

/// Capped exponential backoff between restarts of one replica.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A run that lasted this long resets the backoff.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(30), reset_after: Duration::from_secs(60) }
    }
}

impl Backoff {
    /// Delay before restart number `failures` (1-based count of consecutive short runs).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << exp).min(self.max)
    }
}

/// "Now", as the shell sees it: a monotonic instant for timers and wall-clock milliseconds
/// for the timestamps users read.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The assignment is boxed: it carries the whole template, and actions are moved around.
    Start {
        replica: String,
        run_id: u64,
        assignment: Box<Assignment>,
    },
    Stop {
        replica: String,
        run_id: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RunState {
    /// Should start at the next poll.
    Ready,
    /// Start requested; the runtime is pulling or compiling.
    Starting {
        run_id: u64,
    },
    Running {
        run_id: u64,
        since: Instant,
    },
    /// Stop requested; `then` says what follows.
    Stopping {
        run_id: u64,
        then: AfterStop,
    },
    BackingOff {
        until: Instant,
    },
    /// Not started: what it needs (a config or secret) is not on the node yet. Started when
    /// it arrives ([`Supervisor::retry_now`]) or, at the latest, at `until`. Not a restart.
    Waiting {
        until: Instant,
    },
    /// Ended for good under its restart policy.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterStop {
    /// Removed from the node: forget it.
    Forget,
    /// The template changed: start the new one.
    Start,
    /// Killed as unhealthy: the run ended `how` (it had run since `since`); the restart
    /// policy and back-off decide what follows, as for an exit.
    Ended { how: Termination, since: Instant },
}

/// What a replica's status message currently says, as a type: the supervisor decides on this,
/// never on the message text, and [`Replica::note`] writes both together so they cannot drift.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Note {
    /// No message (running, or finished under its policy).
    None,
    /// About to start, or starting: "starting".
    Starting,
    /// The template changed and the new one is on its way: "updating to a new template".
    Updating,
    /// Waiting to restart: "back-off 3s before restarting".
    BackOff { secs: u64 },
    /// The stop of the current run has been asked of the runtime: "stopping".
    Stopping,
    /// Stopped because it was removed from the node: "stopped".
    Stopped,
    /// A liveness or startup probe failed; the run is being killed.
    Unhealthy(String),
    /// Carried over from the previous agent process's saved status of a finished replica (it
    /// stays finished until a new template replaces the note with `Updating`).
    Restored(String),
    /// Waiting for what it needs: "secret/db not found: ...".
    Waiting(String),
}

impl Note {
    /// The human message users see.
    fn message(&self) -> String {
        match self {
            Note::None => String::new(),
            Note::Starting => "starting".into(),
            Note::Updating => "updating to a new template".into(),
            Note::BackOff { secs } => format!("back-off {secs}s before restarting"),
            Note::Stopping => "stopping".into(),
            Note::Stopped => "stopped".into(),
            Note::Unhealthy(message) | Note::Restored(message) | Note::Waiting(message) => message.clone(),
        }
    }

    /// A start replaces no message, or a back-off's; other notes (an update in progress, a
    /// probe failure) stay until the run has started.
    fn replaced_by_start(&self) -> bool {
        matches!(self, Note::None | Note::BackOff { .. } | Note::Waiting(_))
    }
}

#[derive(Debug)]
struct Replica {
    assignment: Assignment,
    state: RunState,
    consecutive_failures: u32,
    /// Why `status.message` says what it says; set only through [`Replica::note`].
    note: Note,
    status: ReplicaStatus,
    /// Removed from the assignment set: forget it once stopped.
    removed: bool,
    /// Restored from the previous agent process's statuses and not started since: whether it
    /// was running then. Its next start is then either an adoption (it kept running) or a
    /// restart caused by the agent's own restart, counted as one.
    resumed: Option<bool>,
    /// Restored, and the previous process last saw it running and ready: its endpoint keeps
    /// serving while this process adopts it (see [`Supervisor::serving`]), and an adopted run
    /// starts ready (the same process kept running); a probe that fails withdraws it as usual.
    resumed_ready: bool,
}

impl Replica {
    /// Sets what the status message says, and the message itself.
    fn note(&mut self, note: Note) {
        self.status.message = note.message();
        self.note = note;
    }
}

/// How the agent process before this one ended, as the next one finds out at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviousExit {
    /// Stopped by SIGTERM/SIGINT, leaving its workloads running.
    Clean,
    /// Stopped, and stopped its workloads with it (`--stop-workloads-on-exit`).
    CleanStoppingWorkloads,
    /// Crashed, killed or cut from power: its last save was not a clean stop's.
    Unclean,
    /// The node rebooted since.
    Reboot,
}

impl PreviousExit {
    fn describe(self) -> &'static str {
        match self {
            PreviousExit::Clean => "the agent restarted after a clean stop",
            PreviousExit::CleanStoppingWorkloads => {
                "the agent restarted after a clean stop that stopped its workloads (--stop-workloads-on-exit)"
            }
            PreviousExit::Unclean => "the agent restarted after an unclean stop (crash, kill or power loss)",
            PreviousExit::Reboot => "the node rebooted",
        }
    }
}

#[derive(Debug, Default)]
pub struct Supervisor {
    backoff: Backoff,
    replicas: BTreeMap<String, Replica>,
    next_run: u64,
    changed: BTreeSet<String>,
}

impl Supervisor {
    pub fn new(backoff: Backoff) -> Self {
        Supervisor { backoff, ..Default::default() }
    }

    /// Replaces the desired set. New replicas start; removed ones stop; replicas whose
    /// template changed stop and start again with the new template. Unchanged replicas are
    /// untouched (no restart).
    pub fn set_assignments(&mut self, assignments: &[Assignment], now: Now) {
        let wanted: BTreeMap<&str, &Assignment> = assignments.iter().map(|a| (a.name.as_str(), a)).collect();
        for (name, r) in self.replicas.iter_mut() {
            if !wanted.contains_key(name.as_str()) && !r.removed {
                r.removed = true;
                r.state = match r.state {
                    RunState::Starting { run_id }
                    | RunState::Running { run_id, .. }
                    | RunState::Stopping { run_id, .. } => RunState::Stopping { run_id, then: AfterStop::Forget },
                    _ => RunState::Done,
                };
            }
        }
        for (name, a) in wanted {
            // Another Job attempt under the same name is a new replica, even on the same
            // template (the set that removed the previous attempt may have been missed): once
            // the old attempt no longer runs it starts over with a fresh status.
            if self.replicas.get(name).is_some_and(|r| {
                r.assignment.attempt != a.attempt
                    && matches!(
                        r.state,
                        RunState::Done | RunState::Ready | RunState::BackingOff { .. } | RunState::Waiting { .. }
                    )
            }) {
                self.replicas.remove(name);
            }
            match self.replicas.get_mut(name) {
                Some(r)
                    if r.assignment.template_hash == a.template_hash
                        && r.assignment.attempt == a.attempt
                        && !r.removed => {}
                Some(r) => {
                    let was_removed = r.removed;
                    r.assignment = a.clone();
                    r.removed = false;
                    r.consecutive_failures = 0;
                    r.state = match r.state {
                        RunState::Starting { run_id }
                        | RunState::Running { run_id, .. }
                        | RunState::Stopping { run_id, .. } => RunState::Stopping { run_id, then: AfterStop::Start },
                        _ => RunState::Ready,
                    };
                    if !was_removed {
                        r.note(Note::Updating);
                        r.status.record(
                            now.wall_ms,
                            EventReason::Updating,
                            format!("new template {}", a.template_hash),
                        );
                    }
                    r.status.phase = Phase::Pending;
                    r.status.template_hash = a.template_hash.clone();
                    r.status.observed_at_ms = now.wall_ms;
                    self.changed.insert(name.to_string());
                }
                None => {
                    let status = ReplicaStatus {
                        phase: Phase::Pending,
                        template_hash: a.template_hash.clone(),
                        observed_at_ms: now.wall_ms,
                        ..Default::default()
                    };
                    let mut replica = Replica {
                        assignment: a.clone(),
                        state: RunState::Ready,
                        consecutive_failures: 0,
                        note: Note::None,
                        status,
                        removed: false,
                        resumed: None,
                        resumed_ready: false,
                    };
                    replica.note(Note::Starting);
                    self.replicas.insert(name.to_string(), replica);
                    self.changed.insert(name.to_string());
                }
            }
        }
        self.forget_finished_removals();
    }

    fn forget_finished_removals(&mut self) {
        let gone: Vec<String> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.removed && r.state == RunState::Done)
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            self.replicas.remove(&name);
            self.changed.remove(&name);
        }
    }

    /// Carries the statuses a previous agent process saved over to the replicas it still
    /// holds with the same template (restart counts, last termination, events), and records
    /// the agent's restart as an event on each. Replicas that had finished for good stay
    /// finished (a Job attempt is not run twice). Call after the first `set_assignments` and
    /// before the first `poll_actions`.
    pub fn restore(&mut self, saved: &BTreeMap<String, ReplicaStatus>, previous: PreviousExit, now: Now) {
        for (name, r) in self.replicas.iter_mut().filter(|(_, r)| !r.removed && r.state == RunState::Ready) {
            let Some(old) = saved.get(name).filter(|s| s.template_hash == r.assignment.template_hash) else {
                continue;
            };
            r.status.restarts = old.restarts;
            r.status.last_termination = old.last_termination.clone();
            r.status.events = old.events.clone();
            r.status.record(now.wall_ms, EventReason::AgentRestarted, previous.describe());
            if matches!(old.phase, Phase::Succeeded | Phase::Failed) {
                r.state = RunState::Done;
                r.status.phase = old.phase;
                r.note(Note::Restored(old.message.clone()));
            } else {
                r.resumed = Some(old.phase == Phase::Running);
                // After a reboot or a stop that stopped the workloads nothing kept serving.
                let kept = matches!(previous, PreviousExit::Clean | PreviousExit::Unclean);
                r.resumed_ready = kept && old.phase == Phase::Running && old.ready;
                // What it serves through the restart (`serving`) is what the hub hears too:
                // still Running at its address, so no node's service table or gateway drops
                // it while it is adopted or started again.
                if kept && old.phase == Phase::Running {
                    r.status.phase = Phase::Running;
                    r.status.ready = r.resumed_ready;
                    r.status.address = old.address;
                }
            }
            r.status.observed_at_ms = now.wall_ms;
            self.changed.insert(name.clone());
        }
    }

    /// Which replicas take traffic on this node now: those running and ready, and, right after
    /// an agent restart, those being adopted or started again that the previous process last
    /// saw ready (a container kept running; a Wasm component's listening socket was handed
    /// over and queues connections), so an agent restart withdraws no endpoint.
    pub fn serving(&self) -> BTreeMap<String, bool> {
        self.replicas
            .iter()
            .map(|(name, r)| {
                let serving = match r.state {
                    RunState::Running { .. } => r.status.phase == Phase::Running && r.status.ready,
                    RunState::Ready | RunState::Starting { .. } => r.resumed_ready && !r.removed,
                    _ => false,
                };
                (name.clone(), serving)
            })
            .collect()
    }

    /// The replica's address on the node's container network, as its runtime reports it when
    /// a run starts (it keeps it across runs while it stays on the node).
    pub fn set_address(&mut self, replica: &str, address: Option<std::net::IpAddr>) {
        let Some(r) = self.replicas.get_mut(replica) else { return };
        if r.status.address != address {
            r.status.address = address;
            self.changed.insert(replica.to_string());
        }
    }

    /// The runtime started the run.
    pub fn on_started(&mut self, replica: &str, run_id: u64, now: Now) {
        self.started(replica, run_id, None, now);
    }

    /// A step of run `run_id`'s start worth an event (a pull, a compile); ignored once the run
    /// is no longer the one starting.
    pub fn on_progress(&mut self, replica: &str, run_id: u64, reason: EventReason, message: String, now: Now) {
        let Some(r) = self.replicas.get_mut(replica) else { return };
        if r.state != (RunState::Starting { run_id }) {
            return;
        }
        r.status.record(now.wall_ms, reason, message);
        self.changed.insert(replica.to_string());
    }

    /// The runtime took over a workload an earlier agent process started, which kept running
    /// (`how` says what it adopted): running again, and not a restart.
    pub fn on_adopted(&mut self, replica: &str, run_id: u64, how: String, now: Now) {
        self.started(replica, run_id, Some(how), now);
    }

    fn started(&mut self, replica: &str, run_id: u64, adopted: Option<String>, now: Now) {
        let Some(r) = self.replicas.get_mut(replica) else { return };
        if r.state != (RunState::Starting { run_id }) {
            return;
        }
        r.state = RunState::Running { run_id, since: now.mono };
        let was_running = r.resumed.take() == Some(true);
        let still_ready = std::mem::take(&mut r.resumed_ready) && adopted.is_some();
        match adopted {
            Some(how) => r.status.record(now.wall_ms, EventReason::Adopted, how),
            // It ran in the previous agent process (a Wasm guest, or a container that did not
            // survive): the agent's restart restarted it, and that counts.
            None if was_running => {
                r.status.restarts += 1;
                r.status.record(
                    now.wall_ms,
                    EventReason::Started,
                    "started again: it ran in the previous agent process",
                );
            }
            None => r.status.record(now.wall_ms, EventReason::Started, ""),
        }
        r.status.phase = Phase::Running;
        r.note(Note::None);
        r.status.ready = still_ready || crate::probe::ProbeSet::ready_at_start(&r.assignment.template.probes);
        r.status.started_at_ms = Some(now.wall_ms);
        r.status.observed_at_ms = now.wall_ms;
        self.changed.insert(replica.to_string());
    }

    /// The run ended by itself (exit, trap) or could not start.
    /// What run `run_id` wrote last, reported as it ended (before [`Supervisor::on_exited`]):
    /// kept in the status beside the termination. Ignored for any other run.
    pub fn on_output(&mut self, replica: &str, run_id: u64, lines: Vec<String>) {
        let Some(r) = self.replicas.get_mut(replica) else { return };
        let current = match r.state {
            RunState::Starting { run_id: id } | RunState::Running { run_id: id, .. } => id == run_id,
            RunState::Stopping { run_id: id, .. } => id == run_id,
            _ => false,
        };
        if current {
            r.status.last_output = lines;
            self.changed.insert(replica.to_string());
        }
    }

    pub fn on_exited(&mut self, replica: &str, run_id: u64, how: Termination, now: Now) {
        let Some(r) = self.replicas.get_mut(replica) else { return };
        let since = match r.state {
            RunState::Running { run_id: id, since } if id == run_id => Some(since),
            RunState::Starting { run_id: id } if id == run_id => None,
            // Ended on its own while we were stopping it: the stop is complete.
            RunState::Stopping { run_id: id, .. } if id == run_id => {
                self.on_stopped(replica, run_id, now);
                return;
            }
            _ => return,
        };
        Self::ended(r, how, since, self.backoff, now);
        self.changed.insert(replica.to_string());
    }

    /// The start of `run_id` could not begin: `why` (a config or secret not on the node).
    /// The replica waits, Pending with `why` as its message, and starts when
    /// [`Supervisor::retry_now`] says what it waited for arrived, or after `recheck`. It is
    /// not a failure: no back-off grows and no restart is counted.
    pub fn on_waiting(&mut self, replica: &str, run_id: u64, why: String, recheck: Duration, now: Now) {
        let Some(r) = self.replicas.get_mut(replica) else { return };
        if r.state != (RunState::Starting { run_id }) {
            return;
        }
        r.state = RunState::Waiting { until: now.mono + recheck };
        r.status.phase = Phase::Pending;
        r.status.observed_at_ms = now.wall_ms;
        if r.note != Note::Waiting(why.clone()) {
            r.note(Note::Waiting(why));
        }
        self.changed.insert(replica.to_string());
    }

    /// A run ended `how`: restart it under its policy with back-off, or finish it.
    fn ended(r: &mut Replica, how: Termination, since: Option<Instant>, backoff: Backoff, now: Now) {
        let success = matches!(how, Termination::Exited { code: 0 });
        let long_run = since.is_some_and(|s| now.mono.saturating_duration_since(s) >= backoff.reset_after);
        r.consecutive_failures = if long_run { 1 } else { r.consecutive_failures + 1 };
        // A start failure (missing image, invalid module) is retried whatever the policy,
        // since the cause may be fixed outside the node (an image pushed late).
        let start_failed = matches!(how, Termination::StartFailed { .. });
        let restart = start_failed || r.assignment.template.restart_policy.restarts(success);
        r.status.started_at_ms = None;
        r.status.ready = false;
        r.status.observed_at_ms = now.wall_ms;
        let reason = match &how {
            Termination::StartFailed { .. } => EventReason::StartFailed,
            Termination::OomKilled => EventReason::OomKilled,
            _ => EventReason::Exited,
        };
        r.status.record(now.wall_ms, reason, how.to_string());
        if restart {
            let delay = backoff.delay(r.consecutive_failures);
            r.state = RunState::BackingOff { until: now.mono + delay };
            r.status.phase = Phase::Pending;
            let secs = delay.as_secs_f64().ceil() as u64;
            r.note(Note::BackOff { secs });
            let failures = r.consecutive_failures;
            r.status.record(
                now.wall_ms,
                EventReason::BackOff,
                format!("restarting in {secs}s ({failures} failure{} in a row)", if failures == 1 { "" } else { "s" }),
            );
        } else {
            r.state = RunState::Done;
            r.status.phase = if success { Phase::Succeeded } else { Phase::Failed };
            r.note(Note::None);
        }
        r.status.last_termination = Some(how);
    }

    /// A verdict of the running run's health probes.
    pub fn on_probe(&mut self, replica: &str, run_id: u64, verdict: Verdict, now: Now) {
        let Some(r) = self.replicas.get_mut(replica) else { return };
        let RunState::Running { run_id: id, since } = r.state else { return };
        if id != run_id {
            return;
        }
        match verdict {
            Verdict::Ready { ready, message } => {
                if r.status.ready == ready {
                    return;
                }
                r.status.ready = ready;
                let reason = if ready { EventReason::Ready } else { EventReason::NotReady };
                r.status.record(now.wall_ms, reason, message);
            }
            Verdict::Kill { message } => {
                r.status.ready = false;
                r.status.record(now.wall_ms, EventReason::Unhealthy, format!("{message}; restarting"));
                r.note(Note::Unhealthy(message.clone()));
                let how = Termination::Unhealthy { message };
                r.state = RunState::Stopping { run_id, then: AfterStop::Ended { how, since } };
            }
        }
        r.status.observed_at_ms = now.wall_ms;
        self.changed.insert(replica.to_string());
    }

    /// The runtime finished stopping a run the supervisor asked to stop.
    pub fn on_stopped(&mut self, replica: &str, run_id: u64, now: Now) {
        let Some(r) = self.replicas.get_mut(replica) else { return };
        let RunState::Stopping { run_id: id, then } = &r.state else { return };
        if *id != run_id {
            return;
        }
        let then = then.clone();
        r.status.started_at_ms = None;
        r.status.ready = false;
        if !matches!(then, AfterStop::Ended { .. }) {
            r.status.record(now.wall_ms, EventReason::Stopped, "");
        }
        match then {
            AfterStop::Start => r.state = RunState::Ready,
            AfterStop::Forget => {
                r.state = RunState::Done;
                r.status.phase = Phase::Succeeded;
                r.note(Note::Stopped);
            }
            AfterStop::Ended { how, since } => Self::ended(r, how, Some(since), self.backoff, now),
        }
        r.status.observed_at_ms = now.wall_ms;
        self.changed.insert(replica.to_string());
        self.forget_finished_removals();
    }

    /// Actions due at `now`. Calling it again without new events returns nothing new.
    pub fn poll_actions(&mut self, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        for (name, r) in self.replicas.iter_mut() {
            match r.state {
                RunState::BackingOff { until } if until <= now.mono => {
                    r.status.restarts += 1;
                    r.state = RunState::Ready;
                }
                RunState::Waiting { until } if until <= now.mono => r.state = RunState::Ready,
                _ => {}
            }
            match r.state {
                RunState::Ready => {
                    self.next_run += 1;
                    let run_id = self.next_run;
                    r.state = RunState::Starting { run_id };
                    r.status.record(
                        now.wall_ms,
                        EventReason::Starting,
                        format!("image {}", r.assignment.template.image),
                    );
                    self.changed.insert(name.clone());
                    if r.note.replaced_by_start() {
                        r.note(Note::Starting);
                        r.status.observed_at_ms = now.wall_ms;
                        self.changed.insert(name.clone());
                    }
                    out.push(Action::Start {
                        replica: name.clone(),
                        run_id,
                        assignment: Box::new(r.assignment.clone()),
                    });
                }
                // The note says whether this stop was already asked for.
                RunState::Stopping { run_id, .. } if r.note != Note::Stopping => {
                    r.note(Note::Stopping);
                    r.status.record(now.wall_ms, EventReason::Stopping, "");
                    self.changed.insert(name.clone());
                    out.push(Action::Stop { replica: name.clone(), run_id });
                }
                _ => {}
            }
        }
        out
    }

    /// Ends the back-off of `replica` now (what it waited for arrived: a config or secret it
    /// reads); its next start comes with the next `poll_actions`.
    pub fn retry_now(&mut self, replica: &str, now: Now) {
        if let Some(r) = self.replicas.get_mut(replica)
            && let RunState::BackingOff { until } | RunState::Waiting { until } = &mut r.state
        {
            *until = (*until).min(now.mono);
        }
    }

    /// When `poll_actions` next has something to do by the clock alone.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.replicas
            .values()
            .filter_map(|r| match r.state {
                RunState::BackingOff { until } | RunState::Waiting { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// The longest stop grace period among the replicas' templates, `default` for those that
    /// set none: how long stopping everything may take.
    pub fn max_grace(&self, default: Duration) -> Duration {
        self.replicas
            .values()
            .map(|r| r.assignment.template.grace_ms.map_or(default, Duration::from_millis))
            .max()
            .unwrap_or_default()
    }

    /// Statuses that changed since the last call.
    pub fn take_status_changes(&mut self) -> BTreeMap<String, ReplicaStatus> {
        let names = std::mem::take(&mut self.changed);
        names.into_iter().filter_map(|n| self.replicas.get(&n).map(|r| (n, r.status.clone()))).collect()
    }

    /// Current status of every replica the node holds.
    pub fn statuses(&self) -> BTreeMap<String, ReplicaStatus> {
        self.replicas.iter().filter(|(_, r)| !r.removed).map(|(n, r)| (n.clone(), r.status.clone())).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::{ReplicaTemplate, RestartPolicy, Runtime};

    fn assignment(name: &str, image: &str, policy: RestartPolicy) -> Assignment {
        let template = ReplicaTemplate {
            runtime: Runtime::Wasm,
            image: image.into(),
            args: vec![],
            env: Default::default(),
            restart_policy: policy,
            memory_bytes: None,
            cpu_time_ms: None,
            fuel: None,
            http: None,
            volumes: vec![],
            network: Default::default(),
            ports: Vec::new(),
            command: vec![],
            cpu_millis: None,
            pids: None,
            grace_ms: None,
            probes: Default::default(),
            env_refs: Default::default(),
            env_from: vec![],
            object_versions: Default::default(),
        };
        Assignment { name: name.into(), workload: "w".into(), template_hash: template.hash(), template, attempt: None }
    }

    struct Clock(Instant, u64);
    impl Clock {
        fn now(&self) -> Now {
            Now { mono: self.0, wall_ms: self.1 }
        }
        fn advance(&mut self, d: Duration) {
            self.0 += d;
            self.1 += d.as_millis() as u64;
        }
    }

    fn start_id(actions: &[Action]) -> u64 {
        match actions {
            [Action::Start { run_id, .. }] => *run_id,
            other => panic!("expected one start, got {other:?}"),
        }
    }

    #[test]
    fn starts_new_replicas_once() {
        let c = Clock(Instant::now(), 1_000);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        assert!(s.poll_actions(c.now()).is_empty());
        s.on_started("w-0", id, c.now());
        assert_eq!(s.statuses()["w-0"].phase, Phase::Running);
        // Re-applying the same set changes nothing.
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        assert!(s.poll_actions(c.now()).is_empty());
        assert_eq!(s.statuses()["w-0"].phase, Phase::Running);
    }

    #[test]
    fn a_replica_waiting_for_a_secret_is_not_restarting_and_starts_when_it_arrives() {
        let mut c = Clock(Instant::now(), 1_000);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        let recheck = Duration::from_secs(10);
        s.on_waiting("w-0", id, "secret/db not found".into(), recheck, c.now());
        let st = &s.statuses()["w-0"];
        assert_eq!((st.phase, st.message.as_str(), st.restarts), (Phase::Pending, "secret/db not found", 0));
        assert!(s.poll_actions(c.now()).is_empty(), "no start before it arrives");
        assert_eq!(s.next_deadline(), Some(c.now().mono + recheck));
        // A stale run id changes nothing.
        s.on_waiting("w-0", id + 7, "other".into(), recheck, c.now());
        assert_eq!(s.statuses()["w-0"].message, "secret/db not found");
        // It arrives: the next poll starts the replica, and no restart is counted.
        c.advance(Duration::from_secs(1));
        s.retry_now("w-0", c.now());
        let id2 = start_id(&s.poll_actions(c.now()));
        s.on_started("w-0", id2, c.now());
        let st = &s.statuses()["w-0"];
        assert_eq!((st.phase, st.restarts, st.message.as_str()), (Phase::Running, 0, ""));
        // Without a wake-up, the recheck starts it all the same.
        s.set_assignments(&[assignment("w-0", "b", RestartPolicy::Always)], c.now());
        let _ = s.poll_actions(c.now());
        s.on_stopped("w-0", id2, c.now());
        let id3 = start_id(&s.poll_actions(c.now()));
        s.on_waiting("w-0", id3, "waiting for config/app".into(), recheck, c.now());
        c.advance(recheck);
        start_id(&s.poll_actions(c.now()));
    }

    #[test]
    fn a_new_job_attempt_under_the_same_name_runs_again_with_a_fresh_status() {
        let c = Clock(Instant::now(), 1_000);
        let mut s = Supervisor::new(Backoff::default());
        let attempt = |n| Assignment { attempt: Some(n), ..assignment("j-0", "a", RestartPolicy::Never) };
        s.set_assignments(&[attempt(1)], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        s.on_started("j-0", id, c.now());
        s.on_output("j-0", id, vec!["boom".into()]);
        s.on_exited("j-0", id, Termination::Exited { code: 3 }, c.now());
        let st = &s.statuses()["j-0"];
        assert_eq!((st.phase, st.last_output.as_slice()), (Phase::Failed, ["boom".to_string()].as_slice()));
        // The same attempt again: a replay, nothing runs.
        s.set_assignments(&[attempt(1)], c.now());
        assert!(s.poll_actions(c.now()).is_empty());
        // Attempt 2 on the same template (the set without attempt 1 was missed): it runs.
        s.set_assignments(&[attempt(2)], c.now());
        let id2 = start_id(&s.poll_actions(c.now()));
        assert_ne!(id, id2);
        let st = &s.statuses()["j-0"];
        assert_eq!(st.phase, Phase::Pending);
        assert!(st.last_termination.is_none() && st.last_output.is_empty(), "{st:?}");
        // Output reported for the old run is not taken for the new one.
        s.on_output("j-0", id, vec!["stale".into()]);
        assert!(s.statuses()["j-0"].last_output.is_empty());
    }

    #[test]
    fn a_crash_loop_leaves_an_ordered_bounded_event_history() {
        let mut c = Clock(Instant::now(), 1_000);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        s.on_started("w-0", id, c.now());
        c.1 += 5;
        s.on_exited("w-0", id, Termination::Exited { code: 3 }, c.now());
        let events = &s.statuses()["w-0"].events;
        let reasons: Vec<EventReason> = events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, [EventReason::Starting, EventReason::Started, EventReason::Exited, EventReason::BackOff]);
        assert_eq!(events[2].message, "exited with code 3");
        assert_eq!(events[3].message, "restarting in 1s (1 failure in a row)");
        assert!(events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        // Many more crashes: the history keeps the newest MAX_REPLICA_EVENTS, in order.
        for _ in 0..20 {
            c.advance(s.next_deadline().unwrap() - c.0);
            let id = start_id(&s.poll_actions(c.now()));
            s.on_exited("w-0", id, Termination::StartFailed { message: "image not found".into() }, c.now());
        }
        let events = &s.statuses()["w-0"].events;
        assert_eq!(events.len(), proto::messages::MAX_REPLICA_EVENTS);
        assert_eq!(events.last().unwrap().reason, EventReason::BackOff);
        assert_eq!(events[events.len() - 2].reason, EventReason::StartFailed);
        assert!(events.last().unwrap().message.contains("21 failures in a row"), "{events:?}");
    }

    #[test]
    fn pulls_and_compiles_of_the_starting_run_become_events() {
        let c = Clock(Instant::now(), 1_000);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        s.on_progress("w-0", id, EventReason::Pulling, "reg/w:1".into(), c.now());
        s.on_progress("w-0", id + 1, EventReason::Pulled, "another run's".into(), c.now());
        s.on_progress("w-0", id, EventReason::Compiled, "module in 80 ms".into(), c.now());
        s.on_started("w-0", id, c.now());
        // Once running, a late step of the start is not an event.
        s.on_progress("w-0", id, EventReason::Pulled, "late".into(), c.now());
        let statuses = s.statuses();
        let events: Vec<(EventReason, &str)> =
            statuses["w-0"].events.iter().map(|e| (e.reason, e.message.as_str())).collect();
        assert_eq!(
            events,
            [
                (EventReason::Starting, "image a"),
                (EventReason::Pulling, "reg/w:1"),
                (EventReason::Compiled, "module in 80 ms"),
                (EventReason::Started, "")
            ],
        );
    }

    #[test]
    fn restarts_with_capped_exponential_backoff() {
        let mut c = Clock(Instant::now(), 0);
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
            reset_after: Duration::from_secs(60),
        };
        let mut s = Supervisor::new(b);
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        let mut delays = vec![];
        for _ in 0..5 {
            let id = start_id(&s.poll_actions(c.now()));
            s.on_started("w-0", id, c.now());
            s.on_exited("w-0", id, Termination::Exited { code: 1 }, c.now());
            let d = s.next_deadline().unwrap() - c.0;
            delays.push(d.as_secs());
            // Not before the deadline.
            assert!(s.poll_actions(c.now()).is_empty());
            c.advance(d);
        }
        assert_eq!(delays, [1, 2, 4, 4, 4]);
        let st = &s.statuses()["w-0"];
        assert_eq!(st.restarts, 4);
        assert_eq!(st.last_termination, Some(Termination::Exited { code: 1 }));
    }

    #[test]
    fn a_long_run_resets_the_backoff() {
        let mut c = Clock(Instant::now(), 0);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        for _ in 0..3 {
            let id = start_id(&s.poll_actions(c.now()));
            s.on_started("w-0", id, c.now());
            s.on_exited("w-0", id, Termination::Exited { code: 1 }, c.now());
            c.advance(s.next_deadline().unwrap() - c.0);
        }
        let id = start_id(&s.poll_actions(c.now()));
        s.on_started("w-0", id, c.now());
        c.advance(Duration::from_secs(120));
        s.on_exited("w-0", id, Termination::Exited { code: 1 }, c.now());
        assert_eq!(s.next_deadline().unwrap() - c.0, Duration::from_secs(1));
    }

    #[test]
    fn restart_policies_decide_the_final_phase() {
        let c = Clock(Instant::now(), 0);
        for (policy, how, phase) in [
            (RestartPolicy::Never, Termination::Exited { code: 0 }, Some(Phase::Succeeded)),
            (RestartPolicy::Never, Termination::Trapped { message: "unreachable".into() }, Some(Phase::Failed)),
            (RestartPolicy::OnFailure, Termination::Exited { code: 0 }, Some(Phase::Succeeded)),
            (RestartPolicy::OnFailure, Termination::Exited { code: 2 }, None),
            (RestartPolicy::Always, Termination::Exited { code: 0 }, None),
            // Start failures are retried even under Never.
            (RestartPolicy::Never, Termination::StartFailed { message: "image not found".into() }, None),
        ] {
            let mut s = Supervisor::new(Backoff::default());
            s.set_assignments(&[assignment("w-0", "a", policy)], c.now());
            let id = start_id(&s.poll_actions(c.now()));
            if !matches!(how, Termination::StartFailed { .. }) {
                s.on_started("w-0", id, c.now());
            }
            s.on_exited("w-0", id, how.clone(), c.now());
            let st = &s.statuses()["w-0"];
            match phase {
                Some(p) => {
                    assert_eq!(st.phase, p, "{policy:?} {how:?}");
                    assert!(s.next_deadline().is_none());
                }
                None => {
                    assert_eq!(st.phase, Phase::Pending, "{policy:?} {how:?}");
                    assert!(st.message.contains("back-off"), "{}", st.message);
                    assert!(s.next_deadline().is_some());
                }
            }
            assert_eq!(st.last_termination.as_ref(), Some(&how));
        }
    }

    #[test]
    fn template_change_stops_then_starts_and_removal_stops() {
        let c = Clock(Instant::now(), 0);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(
            &[assignment("w-0", "a", RestartPolicy::Always), assignment("w-1", "a", RestartPolicy::Always)],
            c.now(),
        );
        let actions = s.poll_actions(c.now());
        assert_eq!(actions.len(), 2);
        for a in &actions {
            if let Action::Start { replica, run_id, .. } = a {
                s.on_started(replica, *run_id, c.now());
            }
        }
        let old_w0 = match &actions[0] {
            Action::Start { run_id, .. } => *run_id,
            _ => unreachable!(),
        };
        // w-0 gets a new image, w-1 is removed.
        s.set_assignments(&[assignment("w-0", "b", RestartPolicy::Always)], c.now());
        let stops = s.poll_actions(c.now());
        assert_eq!(stops.len(), 2, "{stops:?}");
        assert!(stops.contains(&Action::Stop { replica: "w-0".into(), run_id: old_w0 }));
        assert!(!s.statuses().contains_key("w-1"));
        // A late exit of the old run does not count as a crash.
        for a in stops {
            if let Action::Stop { replica, run_id } = a {
                s.on_stopped(&replica, run_id, c.now());
            }
        }
        let id = match s.poll_actions(c.now()).as_slice() {
            [Action::Start { replica, run_id, assignment }] => {
                assert_eq!(replica, "w-0");
                assert_eq!(assignment.template.image, "b");
                *run_id
            }
            other => panic!("{other:?}"),
        };
        s.on_exited("w-0", old_w0, Termination::Exited { code: 9 }, c.now());
        s.on_started("w-0", id, c.now());
        let st = &s.statuses()["w-0"];
        assert_eq!(st.phase, Phase::Running);
        assert_eq!(st.restarts, 0);
        assert!(st.last_termination.is_none());
        assert!(!s.replicas.contains_key("w-1"), "stopped removals are forgotten");
    }

    #[test]
    fn status_changes_are_reported_once() {
        let c = Clock(Instant::now(), 0);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        assert_eq!(s.take_status_changes().len(), 1);
        assert!(s.take_status_changes().is_empty());
        s.on_started("w-0", id, c.now());
        assert_eq!(s.take_status_changes()["w-0"].phase, Phase::Running);
    }

    #[test]
    fn a_failing_liveness_probe_stops_the_run_and_restarts_it_with_back_off() {
        use proto::manifest::{Probe, ProbeAction};
        let mut c = Clock(Instant::now(), 1_000);
        let mut s = Supervisor::new(Backoff::default());
        let mut a = assignment("w-0", "a", RestartPolicy::Always);
        let probe = Probe {
            action: ProbeAction::Tcp { port: 80 },
            initial_delay_ms: 0,
            period_ms: 100,
            timeout_ms: 100,
            failure_threshold: 1,
            success_threshold: 1,
        };
        a.template.probes.readiness = Some(probe.clone());
        a.template.probes.liveness = Some(probe);
        s.set_assignments(&[a], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        s.on_started("w-0", id, c.now());
        assert!(!s.statuses()["w-0"].ready, "a readiness probe must pass first");
        s.on_probe("w-0", id, Verdict::Ready { ready: true, message: "readiness probe passed".into() }, c.now());
        assert!(s.statuses()["w-0"].ready);
        // A verdict for an old run changes nothing.
        s.on_probe("w-0", id + 7, Verdict::Kill { message: "x".into() }, c.now());
        assert_eq!(s.statuses()["w-0"].phase, Phase::Running);

        s.on_probe(
            "w-0",
            id,
            Verdict::Kill { message: "liveness probe failed 1 time in a row: refused".into() },
            c.now(),
        );
        assert!(!s.statuses()["w-0"].ready);
        assert_eq!(s.poll_actions(c.now()), [Action::Stop { replica: "w-0".into(), run_id: id }]);
        c.advance(Duration::from_millis(50));
        // The stopped run counts as a failure: back-off, then a new run.
        s.on_exited("w-0", id, Termination::Signaled { signal: 15 }, c.now());
        let st = &s.statuses()["w-0"];
        assert_eq!(st.phase, Phase::Pending);
        assert!(st.message.starts_with("back-off 1s"), "{}", st.message);
        assert_eq!(
            st.last_termination,
            Some(Termination::Unhealthy { message: "liveness probe failed 1 time in a row: refused".into() })
        );
        let reasons: Vec<EventReason> = st.events.iter().map(|e| e.reason).collect();
        assert_eq!(
            reasons[2..],
            [
                EventReason::Ready,
                EventReason::Unhealthy,
                EventReason::Stopping,
                EventReason::Exited,
                EventReason::BackOff
            ]
        );
        assert!(s.poll_actions(c.now()).is_empty());
        c.advance(Duration::from_secs(1));
        let id2 = start_id(&s.poll_actions(c.now()));
        assert!(id2 > id);
        assert_eq!(s.statuses()["w-0"].restarts, 1);
    }

    #[test]
    fn an_unhealthy_kill_under_restart_policy_never_fails_the_replica() {
        let c = Clock(Instant::now(), 1_000);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Never)], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        s.on_started("w-0", id, c.now());
        assert!(s.statuses()["w-0"].ready, "no probes: ready while it runs");
        s.on_probe("w-0", id, Verdict::Kill { message: "startup probe failed".into() }, c.now());
        s.poll_actions(c.now());
        s.on_stopped("w-0", id, c.now());
        let st = &s.statuses()["w-0"];
        assert_eq!(st.phase, Phase::Failed);
        assert!(!st.ready);
        assert!(s.poll_actions(c.now()).is_empty());
    }

    #[test]
    fn decisions_do_not_depend_on_what_a_message_says() {
        // A probe's failure text that reads like the supervisor's own messages must neither
        // hold back the stop nor be mistaken for a back-off.
        let c = Clock(Instant::now(), 1_000);
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[assignment("w-0", "a", RestartPolicy::Always)], c.now());
        let id = start_id(&s.poll_actions(c.now()));
        s.on_started("w-0", id, c.now());
        s.on_probe("w-0", id, Verdict::Kill { message: "stopping: GET /healthz: HTTP 500".into() }, c.now());
        assert_eq!(s.poll_actions(c.now()), vec![Action::Stop { replica: "w-0".into(), run_id: id }]);
        assert_eq!(s.statuses()["w-0"].message, "stopping");
        assert!(s.poll_actions(c.now()).is_empty(), "one stop per run");
    }
}

#[cfg(test)]
mod restore_tests {
    use super::*;
    use proto::manifest::{ReplicaTemplate, RestartPolicy, Runtime};

    fn assignment(name: &str, image: &str, policy: RestartPolicy) -> Assignment {
        let template = ReplicaTemplate {
            runtime: Runtime::Wasm,
            image: image.into(),
            args: vec![],
            env: Default::default(),
            restart_policy: policy,
            memory_bytes: None,
            cpu_time_ms: None,
            fuel: None,
            http: None,
            volumes: vec![],
            network: Default::default(),
            ports: Vec::new(),
            command: vec![],
            cpu_millis: None,
            pids: None,
            grace_ms: None,
            probes: Default::default(),
            env_refs: Default::default(),
            env_from: vec![],
            object_versions: Default::default(),
        };
        Assignment { name: name.into(), workload: "w".into(), template_hash: template.hash(), template, attempt: None }
    }

    fn now(ms: u64) -> Now {
        Now { mono: Instant::now(), wall_ms: ms }
    }

    /// A supervisor that ran `set` for a while (each replica crashed once, then ran) and the
    /// statuses it would have saved.
    fn previous_life(set: &[Assignment]) -> BTreeMap<String, ReplicaStatus> {
        let b = Backoff { initial: Duration::ZERO, ..Backoff::default() };
        let mut s = Supervisor::new(b);
        s.set_assignments(set, now(1_000));
        for a in s.poll_actions(now(1_000)) {
            let Action::Start { replica, run_id, .. } = a else { panic!() };
            s.on_started(&replica, run_id, now(1_001));
            s.on_exited(&replica, run_id, Termination::Exited { code: 1 }, now(1_002));
        }
        for a in s.poll_actions(now(1_003)) {
            let Action::Start { replica, run_id, .. } = a else { panic!() };
            s.on_started(&replica, run_id, now(1_004));
        }
        s.statuses()
    }

    #[test]
    fn restart_counts_and_events_carry_over_and_the_restart_is_an_event() {
        let set = [assignment("box-0", "a", RestartPolicy::Always), assignment("wasm-0", "a", RestartPolicy::Always)];
        let saved = previous_life(&set);
        assert_eq!(saved["box-0"].restarts, 1);

        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&set, now(5_000));
        s.restore(&saved, PreviousExit::Clean, now(5_000));
        let mut ids = BTreeMap::new();
        for a in s.poll_actions(now(5_001)) {
            let Action::Start { replica, run_id, .. } = a else { panic!() };
            ids.insert(replica, run_id);
        }
        // The container was adopted (it kept running); the Wasm guest started again.
        s.on_adopted("box-0", ids["box-0"], "adopted running container (pid 42)".into(), now(5_002));
        s.on_started("wasm-0", ids["wasm-0"], now(5_002));
        let st = s.statuses();
        assert_eq!(st["box-0"].restarts, 1, "an adoption is not a restart");
        assert_eq!(st["wasm-0"].restarts, 2, "a guest restarted with the agent counts");
        for name in ["box-0", "wasm-0"] {
            let reasons: Vec<EventReason> = st[name].events.iter().map(|e| e.reason).collect();
            assert_eq!(
                reasons[..4],
                [EventReason::Starting, EventReason::Started, EventReason::Exited, EventReason::BackOff]
            );
            let restarted = st[name].events.iter().find(|e| e.reason == EventReason::AgentRestarted).unwrap();
            assert_eq!(restarted.message, "the agent restarted after a clean stop");
            assert_eq!(st[name].phase, Phase::Running);
        }
        let adopted = st["box-0"].events.last().unwrap();
        assert_eq!(
            (adopted.reason, adopted.message.as_str()),
            (EventReason::Adopted, "adopted running container (pid 42)")
        );
        let started = st["wasm-0"].events.last().unwrap();
        assert_eq!(started.reason, EventReason::Started);
        assert!(started.message.contains("previous agent process"), "{started:?}");
        // A later start of the same replica is an ordinary one.
        s.on_exited("wasm-0", ids["wasm-0"], Termination::Exited { code: 1 }, now(5_003));
        assert_eq!(s.statuses()["wasm-0"].restarts, 2);
    }

    #[test]
    fn an_agent_restart_withdraws_no_endpoint_that_was_ready() {
        let probed = |name: &str| {
            let mut a = assignment(name, "a", RestartPolicy::Always);
            a.template.probes.readiness = Some(proto::manifest::Probe {
                action: proto::manifest::ProbeAction::Tcp { port: 80 },
                initial_delay_ms: 0,
                period_ms: 500,
                timeout_ms: 1_000,
                failure_threshold: 1,
                success_threshold: 1,
            });
            a.template_hash = a.template.hash();
            a
        };
        let set = [probed("kept-0"), probed("gone-0"), probed("unready-0")];
        let mut saved = previous_life(&set);
        for name in ["kept-0", "gone-0"] {
            saved.get_mut(name).unwrap().ready = true;
        }
        saved.get_mut("kept-0").unwrap().address = Some("10.42.0.5".parse().unwrap());
        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&set, now(5_000));
        s.restore(&saved, PreviousExit::Unclean, now(5_000));
        // Before anything is adopted: what was ready still serves, what was not does not.
        let serving = s.serving();
        assert_eq!((serving["kept-0"], serving["gone-0"], serving["unready-0"]), (true, true, false));
        // The hub hears the same (it builds every node's service table from statuses): still
        // Running, ready as it was, at its address.
        let st = s.statuses();
        let kept = (st["kept-0"].phase, st["kept-0"].ready, st["kept-0"].address);
        assert_eq!(kept, (Phase::Running, true, Some("10.42.0.5".parse().unwrap())));
        assert_eq!((st["unready-0"].phase, st["unready-0"].ready), (Phase::Running, false));
        // After a reboot nothing kept running: nothing serves until it starts again.
        let mut rebooted = Supervisor::new(Backoff::default());
        rebooted.set_assignments(&set, now(5_000));
        rebooted.restore(&saved, PreviousExit::Reboot, now(5_000));
        assert!(rebooted.serving().values().all(|s| !s), "{:?}", rebooted.serving());
        assert!(rebooted.statuses().values().all(|s| s.phase != Phase::Running && !s.ready));
        let mut ids = BTreeMap::new();
        for a in s.poll_actions(now(5_001)) {
            let Action::Start { replica, run_id, .. } = a else { panic!() };
            ids.insert(replica, run_id);
        }
        assert!(s.serving()["kept-0"], "still serving while its adoption runs");
        // Adopted: the same process, still ready until a probe says otherwise. Not adopted (the
        // container died with the agent): a fresh start, unready until its probe passes.
        s.on_adopted("kept-0", ids["kept-0"], "adopted running container (pid 42)".into(), now(5_002));
        s.on_started("gone-0", ids["gone-0"], now(5_002));
        s.on_adopted("unready-0", ids["unready-0"], "adopted running container (pid 43)".into(), now(5_002));
        let (serving, st) = (s.serving(), s.statuses());
        assert!(serving["kept-0"] && st["kept-0"].ready);
        assert!(!serving["gone-0"] && !st["gone-0"].ready);
        assert!(!serving["unready-0"] && !st["unready-0"].ready);
        // The carried readiness is spent: a later start of the same replica begins unready.
        s.on_exited("kept-0", ids["kept-0"], Termination::Exited { code: 1 }, now(5_003));
        assert!(!s.serving()["kept-0"]);
        for a in s.poll_actions(now(60_000)) {
            if let Action::Start { replica, run_id, .. } = a {
                s.on_started(&replica, run_id, now(60_001));
            }
        }
        assert!(!s.serving()["kept-0"] && !s.statuses()["kept-0"].ready);
    }

    #[test]
    fn a_finished_replica_stays_finished_and_a_changed_template_starts_fresh() {
        let c = now(1_000);
        let mut before = Supervisor::new(Backoff::default());
        let done = assignment("job-0", "a", RestartPolicy::Never);
        before.set_assignments(std::slice::from_ref(&done), c);
        let Action::Start { run_id, .. } = before.poll_actions(c).remove(0) else { panic!() };
        before.on_started("job-0", run_id, c);
        before.on_exited("job-0", run_id, Termination::Exited { code: 3 }, c);
        let mut saved = before.statuses();
        assert_eq!(saved["job-0"].phase, Phase::Failed);
        let mut other = saved["job-0"].clone();
        other.restarts = 7;
        saved.insert("web-0".into(), other);

        let mut s = Supervisor::new(Backoff::default());
        s.set_assignments(&[done, assignment("web-0", "b", RestartPolicy::Always)], now(2_000));
        s.restore(&saved, PreviousExit::Unclean, now(2_000));
        let actions = s.poll_actions(now(2_001));
        assert!(
            matches!(actions.as_slice(), [Action::Start { replica, .. }] if replica == "web-0"),
            "a failed Job attempt is not run again: {actions:?}"
        );
        let st = s.statuses();
        assert_eq!(st["job-0"].phase, Phase::Failed);
        assert_eq!(st["job-0"].last_termination, Some(Termination::Exited { code: 3 }));
        assert!(
            st["job-0"].events.iter().any(|e| e.reason == EventReason::AgentRestarted && e.message.contains("unclean"))
        );
        assert_eq!(st["web-0"].restarts, 0, "another template's history does not carry over");
        assert!(st["web-0"].events.iter().all(|e| e.reason != EventReason::AgentRestarted));
    }
}
