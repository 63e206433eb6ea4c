//! Health probes, sans-IO: when each probe of one run is due, and what its results mean. The
//! shell ([`crate::prober`]) runs the checks and feeds the outcomes in; what comes out are
//! verdicts for the supervisor (ready or not, kill the run). No clock, no sockets: time is
//! passed in, so thresholds and schedules are tested in microseconds.
//!
//! Kubernetes semantics:
//! - The startup probe runs first; until it passes, liveness and readiness are not checked.
//!   `failureThreshold` failures in a row kill the run.
//! - Liveness: `failureThreshold` failures in a row kill the run.
//! - Readiness: a run starts not ready; `successThreshold` successes in a row make it ready,
//!   `failureThreshold` failures in a row make it not ready again. It never kills.
//! - Each probe first runs `initialDelay` after the run started, then every `period`.

use std::fmt;
use std::time::{Duration, Instant};

use proto::manifest::{Probe, Probes};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    /// Its name in events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startup",
            ProbeKind::Liveness => "liveness",
            ProbeKind::Readiness => "readiness",
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a probe result means for the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The readiness changed; the message says why.
    Ready { ready: bool, message: String },
    /// The liveness or startup probe failed its threshold: stop the run and restart it under
    /// the restart policy.
    Kill { message: String },
}

#[derive(Debug)]
struct Tracker {
    probe: Probe,
    next: Instant,
    successes: u32,
    failures: u32,
}

impl Tracker {
    fn new(probe: &Probe, started: Instant) -> Self {
        Tracker {
            probe: probe.clone(),
            next: started + Duration::from_millis(probe.initial_delay_ms),
            successes: 0,
            failures: 0,
        }
    }

    /// Counts a result; returns the streak length of its kind.
    fn count(&mut self, ok: bool, now: Instant) -> u32 {
        self.next = now + Duration::from_millis(self.probe.period_ms);
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            self.successes
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            self.failures
        }
    }
}

/// The probes of one run.
#[derive(Debug)]
pub struct ProbeSet {
    startup: Option<Tracker>,
    liveness: Option<Tracker>,
    readiness: Option<Tracker>,
    /// The startup probe passed (or there is none).
    started: bool,
    ready: bool,
    /// A kill was decided: nothing more is due.
    dead: bool,
}

impl ProbeSet {
    pub fn new(probes: &Probes, started_at: Instant) -> Self {
        let t = |p: &Option<Probe>| p.as_ref().map(|p| Tracker::new(p, started_at));
        ProbeSet {
            startup: t(&probes.startup),
            liveness: t(&probes.liveness),
            readiness: t(&probes.readiness),
            started: probes.startup.is_none(),
            ready: Self::ready_at_start(probes),
            dead: false,
        }
    }

    /// Whether a run of these probes is ready as soon as it runs: only without startup and
    /// readiness probes.
    pub fn ready_at_start(probes: &Probes) -> bool {
        probes.startup.is_none() && probes.readiness.is_none()
    }

    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.liveness.is_none() && self.readiness.is_none()
    }

    /// The probe due next and when, if any is still active.
    pub fn next_due(&self) -> Option<(ProbeKind, Instant)> {
        if self.dead {
            return None;
        }
        if !self.started {
            return self.startup.as_ref().map(|t| (ProbeKind::Startup, t.next));
        }
        [(ProbeKind::Liveness, &self.liveness), (ProbeKind::Readiness, &self.readiness)]
            .into_iter()
            .filter_map(|(k, t)| t.as_ref().map(|t| (k, t.next)))
            .min_by_key(|(_, at)| *at)
    }

    /// The probe definition of `kind`.
    pub fn probe(&self, kind: ProbeKind) -> Option<&Probe> {
        self.tracker(kind).map(|t| &t.probe)
    }

    fn tracker(&self, kind: ProbeKind) -> Option<&Tracker> {
        match kind {
            ProbeKind::Startup => self.startup.as_ref(),
            ProbeKind::Liveness => self.liveness.as_ref(),
            ProbeKind::Readiness => self.readiness.as_ref(),
        }
    }

    /// Takes the result of one check of `kind` that finished at `now`. A failure's error (the
    /// shell's [`crate::prober::CheckError`]) is only ever shown, in the verdict's message: what
    /// the probes decide depends on whether the check passed, never on why it failed.
    pub fn record<E: fmt::Display>(&mut self, kind: ProbeKind, result: Result<(), E>, now: Instant) -> Option<Verdict> {
        if self.dead {
            return None;
        }
        let ok = result.is_ok();
        let tracker = match kind {
            ProbeKind::Startup => self.startup.as_mut(),
            ProbeKind::Liveness => self.liveness.as_mut(),
            ProbeKind::Readiness => self.readiness.as_mut(),
        }?;
        let streak = tracker.count(ok, now);
        let (failure_threshold, success_threshold) =
            (tracker.probe.failure_threshold.max(1), tracker.probe.success_threshold.max(1));
        let why = |n: u32| {
            let err = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
            format!("{kind} probe failed {n} time{} in a row: {err}", if n == 1 { "" } else { "s" })
        };
        match kind {
            ProbeKind::Startup if ok => {
                self.started = true;
                // Liveness and readiness start now, or at their own initial delay if later.
                for t in [self.liveness.as_mut(), self.readiness.as_mut()].into_iter().flatten() {
                    t.next = t.next.max(now);
                }
                if self.readiness.is_none() && !self.ready {
                    self.ready = true;
                    return Some(Verdict::Ready { ready: true, message: "startup probe passed".into() });
                }
                None
            }
            ProbeKind::Startup | ProbeKind::Liveness if !ok && streak >= failure_threshold => {
                self.dead = true;
                self.ready = false;
                Some(Verdict::Kill { message: why(streak) })
            }
            ProbeKind::Readiness if ok && !self.ready && streak >= success_threshold => {
                self.ready = true;
                Some(Verdict::Ready { ready: true, message: "readiness probe passed".into() })
            }
            ProbeKind::Readiness if !ok && self.ready && streak >= failure_threshold => {
                self.ready = false;
                Some(Verdict::Ready { ready: false, message: why(streak) })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::ProbeAction;

    fn probe(delay: u64, period: u64, failures: u32, successes: u32) -> Probe {
        Probe {
            action: ProbeAction::Tcp { port: 80 },
            initial_delay_ms: delay,
            period_ms: period,
            timeout_ms: 100,
            failure_threshold: failures,
            success_threshold: successes,
        }
    }

    /// A passed check (its error type is never used).
    fn ok() -> Result<(), &'static str> {
        Ok(())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn liveness_kills_after_the_threshold_of_failures_in_a_row() {
        let t0 = Instant::now();
        let probes = Probes { liveness: Some(probe(500, 1000, 3, 1)), ..Default::default() };
        let mut s = ProbeSet::new(&probes, t0);
        assert!(ProbeSet::ready_at_start(&probes), "no readiness probe: ready while running");
        assert_eq!(s.next_due(), Some((ProbeKind::Liveness, t0 + ms(500))));
        let fail = || Err("connection refused");
        assert_eq!(s.record(ProbeKind::Liveness, fail(), t0 + ms(500)), None);
        assert_eq!(s.next_due(), Some((ProbeKind::Liveness, t0 + ms(1500))));
        assert_eq!(s.record(ProbeKind::Liveness, fail(), t0 + ms(1500)), None);
        // A success in between resets the streak.
        assert_eq!(s.record(ProbeKind::Liveness, ok(), t0 + ms(2500)), None);
        assert_eq!(s.record(ProbeKind::Liveness, fail(), t0 + ms(3500)), None);
        assert_eq!(s.record(ProbeKind::Liveness, fail(), t0 + ms(4500)), None);
        let v = s.record(ProbeKind::Liveness, fail(), t0 + ms(5500));
        assert_eq!(
            v,
            Some(Verdict::Kill { message: "liveness probe failed 3 times in a row: connection refused".into() })
        );
        assert_eq!(s.next_due(), None, "nothing is probed after a kill");
        assert_eq!(s.record(ProbeKind::Liveness, fail(), t0 + ms(6500)), None);
    }

    #[test]
    fn readiness_needs_its_success_threshold_and_flips_back_on_failures() {
        let t0 = Instant::now();
        let probes = Probes { readiness: Some(probe(0, 100, 2, 2)), ..Default::default() };
        assert!(!ProbeSet::ready_at_start(&probes));
        let mut s = ProbeSet::new(&probes, t0);
        assert_eq!(s.record(ProbeKind::Readiness, ok(), t0), None);
        let v = s.record(ProbeKind::Readiness, ok(), t0 + ms(100));
        assert_eq!(v, Some(Verdict::Ready { ready: true, message: "readiness probe passed".into() }));
        assert_eq!(s.record(ProbeKind::Readiness, ok(), t0 + ms(200)), None, "no repeated verdicts");
        assert_eq!(s.record(ProbeKind::Readiness, Err("HTTP 503"), t0 + ms(300)), None);
        let v = s.record(ProbeKind::Readiness, Err("HTTP 503"), t0 + ms(400));
        assert_eq!(
            v,
            Some(Verdict::Ready { ready: false, message: "readiness probe failed 2 times in a row: HTTP 503".into() })
        );
        // Readiness never kills.
        for i in 0..10 {
            assert_eq!(s.record(ProbeKind::Readiness, Err("x"), t0 + ms(500 + i * 100)), None);
        }
        assert!(s.next_due().is_some());
    }

    #[test]
    fn startup_gates_the_other_probes_and_kills_when_it_never_passes() {
        let t0 = Instant::now();
        let probes =
            Probes { startup: Some(probe(0, 100, 3, 1)), liveness: Some(probe(1000, 500, 1, 1)), readiness: None };
        let mut s = ProbeSet::new(&probes, t0);
        assert_eq!(s.next_due(), Some((ProbeKind::Startup, t0)));
        assert_eq!(s.record(ProbeKind::Startup, Err("refused"), t0), None);
        // Passing startup makes the run ready (no readiness probe) and hands over to liveness,
        // which keeps its own initial delay.
        let v = s.record(ProbeKind::Startup, ok(), t0 + ms(100));
        assert_eq!(v, Some(Verdict::Ready { ready: true, message: "startup probe passed".into() }));
        assert_eq!(s.next_due(), Some((ProbeKind::Liveness, t0 + ms(1000))));

        let mut s = ProbeSet::new(&probes, t0);
        for i in 0..2 {
            assert_eq!(s.record(ProbeKind::Startup, Err("refused"), t0 + ms(i * 100)), None);
        }
        let v = s.record(ProbeKind::Startup, Err("refused"), t0 + ms(200));
        assert!(matches!(v, Some(Verdict::Kill { message }) if message.starts_with("startup probe failed 3 times")));
    }

    #[test]
    fn liveness_and_readiness_interleave_by_their_own_periods() {
        let t0 = Instant::now();
        let probes =
            Probes { liveness: Some(probe(0, 300, 3, 1)), readiness: Some(probe(100, 200, 1, 1)), startup: None };
        let mut s = ProbeSet::new(&probes, t0);
        assert_eq!(s.next_due(), Some((ProbeKind::Liveness, t0)));
        s.record(ProbeKind::Liveness, ok(), t0);
        assert_eq!(s.next_due(), Some((ProbeKind::Readiness, t0 + ms(100))));
        s.record(ProbeKind::Readiness, ok(), t0 + ms(100));
        assert_eq!(s.next_due(), Some((ProbeKind::Liveness, t0 + ms(300))));
    }
}
