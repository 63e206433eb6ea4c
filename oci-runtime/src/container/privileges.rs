//! The privilege drop of a container's processes, written once for the container's init
//! ([`super::init`]) and for every further process started in it ([`super::exec`]): rlimits,
//! the seccomp filter when no_new_privs is off, the capability bounding set, supplementary
//! groups, gid and uid, the effective, permitted and inheritable capabilities, ambient
//! capabilities and no_new_privs, in that order. It runs in a single-threaded process about
//! to exec the container's program and owns nothing; the syscalls without a safe wrapper are
//! in [`super::sys`].
//!
//! Why this order: seccomp without no_new_privs needs CAP_SYS_ADMIN, so it goes before the
//! capabilities do (with no_new_privs the caller installs the filter last, right before
//! exec, so it need not allow the runtime's own syscalls); keep-caps carries the permitted
//! set across the uid change, then capset trims it; ambient capabilities can only be raised
//! once they are permitted and inheritable.

use std::io;

use nix::sys::resource::Resource;
use nix::unistd::{Gid, Uid};

use super::spec::Plan;
use super::sys;

/// Which step of the drop failed, and why. The texts are the ones the container's caller
/// reports ("container X failed to start: setting uid 1000: EPERM: ...").
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `setrlimit` refused a limit.
    #[error("setting {resource:?} to {soft}/{hard}: {source}")]
    Rlimit {
        /// The resource.
        resource: Resource,
        /// The soft limit.
        soft: u64,
        /// The hard limit.
        hard: u64,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The seccomp filter could not be installed.
    #[error("installing seccomp: {0}")]
    Seccomp(#[source] io::Error),
    /// A capability could not be dropped from the bounding set.
    #[error("dropping capability {cap}: {source}")]
    Bounding {
        /// The capability number.
        cap: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `PR_SET_KEEPCAPS` failed.
    #[error("keeping capabilities: {0}")]
    KeepCaps(#[source] io::Error),
    /// `setgroups` failed.
    #[error("setting groups {gids:?}: {source}")]
    Groups {
        /// The supplementary groups.
        gids: Vec<u32>,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// `setresgid` failed.
    #[error("setting gid {gid}: {source}")]
    Gid {
        /// The gid.
        gid: u32,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// `setresuid` failed.
    #[error("setting uid {uid}: {source}")]
    Uid {
        /// The uid.
        uid: u32,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// Clearing `PR_SET_KEEPCAPS` failed.
    #[error("clearing keep-caps: {0}")]
    ClearKeepCaps(#[source] io::Error),
    /// `capset` failed.
    #[error("setting capabilities: {0}")]
    Capabilities(#[source] io::Error),
    /// An ambient capability could not be raised.
    #[error("raising ambient capability {cap}: {source}")]
    Ambient {
        /// The capability number.
        cap: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(#[source] io::Error),
}

/// The highest capability number the running kernel knows (40 if it cannot be read).
pub(crate) fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

/// Takes on the restrictions `plan` gives the container's process, in the order the module
/// documents. `user_ns`: the process is in a user namespace of the container's own (then an
/// empty group list is left alone: setgroups may be denied there). `last_cap`: from
/// [`last_cap`], read where the kernel's `/proc` is visible.
pub(crate) fn drop_privileges(plan: &Plan, user_ns: bool, last_cap: u32) -> Result<(), PrivilegeError> {
    for &(resource, soft, hard) in &plan.rlimits {
        nix::sys::resource::setrlimit(resource, soft, hard).map_err(|source| PrivilegeError::Rlimit {
            resource,
            soft,
            hard,
            source,
        })?;
    }
    if !plan.no_new_privs
        && let Some(program) = &plan.seccomp
    {
        sys::install_seccomp(&program.filter, program.flags).map_err(PrivilegeError::Seccomp)?;
    }
    let caps = plan.caps.unwrap_or_default();
    for cap in 0..=last_cap {
        if caps.bounding & (1u64 << cap) == 0 {
            sys::drop_bounding_cap(cap).map_err(|source| PrivilegeError::Bounding { cap, source })?;
        }
    }
    sys::set_keep_caps(true).map_err(PrivilegeError::KeepCaps)?;
    let groups: Vec<Gid> = plan.additional_gids.iter().map(|g| Gid::from_raw(*g)).collect();
    if !user_ns || !groups.is_empty() {
        nix::unistd::setgroups(&groups)
            .map_err(|source| PrivilegeError::Groups { gids: plan.additional_gids.clone(), source })?;
    }
    let gid = Gid::from_raw(plan.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|source| PrivilegeError::Gid { gid: plan.gid, source })?;
    let uid = Uid::from_raw(plan.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|source| PrivilegeError::Uid { uid: plan.uid, source })?;
    sys::set_keep_caps(false).map_err(PrivilegeError::ClearKeepCaps)?;
    sys::capset(caps.effective, caps.permitted, caps.inheritable).map_err(PrivilegeError::Capabilities)?;
    for cap in 0..=last_cap {
        if caps.ambient & (1u64 << cap) != 0 {
            sys::raise_ambient_cap(cap).map_err(|source| PrivilegeError::Ambient { cap, source })?;
        }
    }
    if plan.no_new_privs {
        sys::set_no_new_privs().map_err(PrivilegeError::NoNewPrivs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_step_and_its_input() {
        let e = PrivilegeError::Uid { uid: 1000, source: nix::Error::EPERM };
        assert_eq!(e.to_string(), "setting uid 1000: EPERM: Operation not permitted");
        let e = PrivilegeError::Groups { gids: vec![10, 20], source: nix::Error::EINVAL };
        assert!(e.to_string().starts_with("setting groups [10, 20]: EINVAL"), "{e}");
        let e =
            PrivilegeError::Rlimit { resource: Resource::RLIMIT_NOFILE, soft: 1, hard: 2, source: nix::Error::EPERM };
        assert!(e.to_string().starts_with("setting RLIMIT_NOFILE to 1/2: "), "{e}");
        assert!(last_cap() >= 30, "the kernel knows at least CAP_AUDIT_READ's predecessors");
    }
}
