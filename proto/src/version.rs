//! Which agent versions a hub serves: the version skew policy, checked at hello.
//!
//! A hub serves agents of its own major version and of its minor version, the one before and
//! the one after (hub 0.5 serves agents 0.4, 0.5 and 0.6), as Kubernetes states its skew.
//! So a fleet is upgraded one minor version at a time, hub or agents first, and runs mixed
//! meanwhile. Outside the window the hub closes the session with [`CLOSE_VERSION`] and says
//! which versions it serves; the agent keeps its workloads running and keeps retrying, so it
//! comes back once either side is upgraded.

use std::fmt;

/// This build's version (all of Flotilla's crates share the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The close code of a session refused for the agent's version (HTTP's "upgrade required").
pub const CLOSE_VERSION: u32 = 0x426;

/// `MAJOR.MINOR.PATCH`, with anything after the patch (`-rc.1`, `+build`) ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let core = s.trim().split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let v = Version {
            major: parts.next()?.parse().ok()?,
            minor: parts.next()?.parse().ok()?,
            patch: parts.next().unwrap_or("0").parse().ok()?,
        };
        parts.next().is_none().then_some(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Why a hub does not serve an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkewError {
    #[error("agent version {0:?} is unreadable; this hub serves agents {1}")]
    Unreadable(String, String),
    #[error("agent {agent} is too old for hub {hub}: this hub serves agents {window}; upgrade the agent")]
    TooOld { agent: Version, hub: Version, window: String },
    #[error("agent {agent} is too new for hub {hub}: this hub serves agents {window}; upgrade the hub first")]
    TooNew { agent: Version, hub: Version, window: String },
}

/// The versions hub `hub` serves, as text ("0.4 to 0.6").
fn window(hub: Version) -> String {
    format!("{}.{} to {}.{}", hub.major, hub.minor.saturating_sub(1), hub.major, hub.minor + 1)
}

/// Whether hub version `hub` serves agent version `agent`.
pub fn check(hub: &str, agent: &str) -> Result<(), SkewError> {
    // The hub's own version always parses (it is this build's); be lenient if it does not.
    let Some(hub) = Version::parse(hub) else { return Ok(()) };
    let Some(a) = Version::parse(agent) else {
        return Err(SkewError::Unreadable(agent.to_string(), window(hub)));
    };
    let too_old = (a.major, a.minor) < (hub.major, hub.minor.saturating_sub(1));
    let too_new = (a.major, a.minor) > (hub.major, hub.minor + 1);
    if too_old {
        return Err(SkewError::TooOld { agent: a, hub, window: window(hub) });
    }
    if too_new {
        return Err(SkewError::TooNew { agent: a, hub, window: window(hub) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_serves_one_minor_version_either_side() {
        for agent in ["0.4.0", "0.4.9", "0.5.0", "0.5.3-rc.1", "0.6.2+abc"] {
            assert_eq!(check("0.5.1", agent), Ok(()), "{agent}");
        }
        let old = check("0.5.1", "0.3.9").unwrap_err();
        assert_eq!(
            old.to_string(),
            "agent 0.3.9 is too old for hub 0.5.1: this hub serves agents 0.4 to 0.6; upgrade the agent"
        );
        assert!(matches!(check("0.5.1", "0.7.0"), Err(SkewError::TooNew { .. })));
        assert!(matches!(check("1.0.0", "0.9.0"), Err(SkewError::TooOld { .. })), "another major");
        assert!(matches!(check("1.0.0", "2.0.0"), Err(SkewError::TooNew { .. })));
        assert!(check("1.0.0", "0.99.0").unwrap_err().to_string().contains("0.99.0"));
        // Minor 0 serves minor 0 and 1 (there is no minor -1).
        assert_eq!(check("0.0.5", "0.1.0"), Ok(()));
        assert!(check("0.1.0", "banana").unwrap_err().to_string().contains("unreadable"));
        assert!(check("0.1.0", "").is_err());
        assert!(check("0.1.0", "0.1.0.7").is_err());
    }

    #[test]
    fn this_build_serves_itself() {
        assert_eq!(check(VERSION, VERSION), Ok(()));
        assert!(Version::parse(VERSION).is_some());
    }
}
