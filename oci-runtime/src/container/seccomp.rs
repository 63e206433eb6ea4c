//! Seccomp for containers: compiles the `linux.seccomp` section of an OCI spec into a classic
//! BPF program (no libseccomp), and holds the default profile of generated specs. It owns
//! syscall-name resolution and the program layout; it never installs anything (the executor
//! does, through `sys::install_seccomp`) and never accepts a rule it cannot express exactly.
//!
//! The program checks the architecture (a foreign one is killed), refuses x32 syscall numbers
//! on x86_64, then compares the syscall number against each rule in order; the first match
//! decides, otherwise the default action does. Argument conditions are not supported yet and
//! are refused with an error rather than silently widened.

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag};

use super::sys::SockFilter;
use super::syscalls::{OTHER_ARCH, SYSCALLS};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp syscall {0:?} is unknown on this architecture")]
    UnknownSyscall(String),
    #[error("seccomp action {0:?} is not supported")]
    UnsupportedAction(LinuxSeccompAction),
    #[error("seccomp rule for {0:?} has argument conditions, which are not supported")]
    ArgumentConditions(String),
    #[error("seccomp {0} is not supported")]
    Unsupported(&'static str),
    #[error("seccomp program for this profile is too long ({0} instructions)")]
    TooLong(usize),
}

/// The compiled filter and the flags to install it with.
#[derive(Debug, Clone)]
pub struct SeccompProgram {
    pub(crate) filter: Vec<SockFilter>,
    pub(crate) flags: libc::c_ulong,
}

impl SeccompProgram {
    pub fn len(&self) -> usize {
        self.filter.len()
    }
    pub fn is_empty(&self) -> bool {
        self.filter.is_empty()
    }
}

/// Syscalls the default profile refuses with EPERM. Like Docker's default profile, it blocks
/// kernel module and keyring management, mounting and namespace creation, clock setting,
/// tracing and cross-process memory access, BPF, perf and swap; everything else is allowed.
/// Names absent on the build architecture are skipped.
pub const DEFAULT_DENIED_SYSCALLS: &[&str] = &[
    "_sysctl",
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
];

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
#[cfg(target_arch = "x86_64")]
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
/// The kernel's limit on classic BPF program length.
const MAX_INSNS: usize = 4096;

fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | (errno.unwrap_or(libc::EPERM as u32) & 0xffff),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | (errno.unwrap_or(0) & 0xffff),
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        other => return Err(SeccompError::UnsupportedAction(other)),
    })
}

/// Looks a syscall name up: `Ok(Some(nr))` on this architecture, `Ok(None)` for a syscall
/// that exists only on the other supported architecture.
fn resolve(name: &str) -> Result<Option<u32>, SeccompError> {
    if let Some((_, nr)) = SYSCALLS.iter().find(|(n, _)| *n == name) {
        return Ok(Some(*nr as u32));
    }
    if OTHER_ARCH.contains(&name) {
        return Ok(None);
    }
    Err(SeccompError::UnknownSyscall(name.to_string()))
}

/// Compiles an OCI seccomp section into a BPF program.
pub fn compile(spec: &LinuxSeccomp) -> Result<SeccompProgram, SeccompError> {
    if spec.listener_path().is_some() {
        return Err(SeccompError::Unsupported("listenerPath (user notification)"));
    }
    let mut flags: libc::c_ulong = 0;
    for flag in spec.flags().iter().flatten() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            // The filter is installed by a single-threaded process: there is nothing to sync.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            _ => return Err(SeccompError::Unsupported("filter flag")),
        };
    }
    let default = action(spec.default_action(), spec.default_errno_ret())?;
    let mut filter = vec![
        stmt(BPF_LD_W_ABS, 4),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, 0),
    ];
    #[cfg(target_arch = "x86_64")]
    {
        // x32 syscalls carry bit 30; they would bypass a list of x86_64 numbers.
        filter.push(jump(BPF_JMP_JGE_K, 0x4000_0000, 0, 1));
        filter.push(stmt(BPF_RET_K, RET_ERRNO | libc::EPERM as u32));
    }
    for rule in spec.syscalls().iter().flatten() {
        let ret = action(rule.action(), rule.errno_ret())?;
        if rule.args().as_ref().is_some_and(|a| !a.is_empty()) {
            return Err(SeccompError::ArgumentConditions(rule.names().join(",")));
        }
        for name in rule.names() {
            if let Some(nr) = resolve(name)? {
                filter.push(jump(BPF_JMP_JEQ_K, nr, 0, 1));
                filter.push(stmt(BPF_RET_K, ret));
            }
        }
    }
    filter.push(stmt(BPF_RET_K, default));
    if filter.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(filter.len()));
    }
    Ok(SeccompProgram { filter, flags })
}

/// The default profile as an OCI seccomp section: allow by default, EPERM for
/// [`DEFAULT_DENIED_SYSCALLS`].
pub fn default_profile() -> serde_json::Value {
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": [{
            "names": DEFAULT_DENIED_SYSCALLS,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program for one (arch, nr) the way the kernel would for these opcodes.
    fn eval(program: &[SockFilter], arch: u32, nr: u32) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let insn = program[pc];
            match insn.code {
                BPF_LD_W_ABS => acc = if insn.k == 4 { arch } else { nr },
                BPF_JMP_JEQ_K => pc += if acc == insn.k { insn.jt } else { insn.jf } as usize,
                0x35 => pc += if acc >= insn.k { insn.jt } else { insn.jf } as usize,
                BPF_RET_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc += 1;
        }
    }

    fn nr(name: &str) -> u32 {
        resolve(name).unwrap().unwrap()
    }

    #[test]
    fn default_profile_denies_the_list_and_allows_the_rest() {
        let spec: LinuxSeccomp = serde_json::from_value(default_profile()).unwrap();
        let program = compile(&spec).unwrap();
        assert_eq!(eval(&program.filter, AUDIT_ARCH, nr("mount")), RET_ERRNO | libc::EPERM as u32);
        assert_eq!(eval(&program.filter, AUDIT_ARCH, nr("unshare")), RET_ERRNO | libc::EPERM as u32);
        assert_eq!(eval(&program.filter, AUDIT_ARCH, nr("read")), RET_ALLOW);
        assert_eq!(eval(&program.filter, AUDIT_ARCH, nr("execve")), RET_ALLOW);
        assert_eq!(eval(&program.filter, 0x4000_0003, nr("read")), RET_KILL_PROCESS, "foreign arch");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(eval(&program.filter, AUDIT_ARCH, 0x4000_0000 | nr("mount")), RET_ERRNO | libc::EPERM as u32);
    }

    #[test]
    fn allowlist_profile_uses_default_errno() {
        let spec: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
            "syscalls": [{"names": ["read", "write", "arch_prctl"], "action": "SCMP_ACT_ALLOW"}]
        }))
        .unwrap();
        let program = compile(&spec).unwrap();
        assert_eq!(eval(&program.filter, AUDIT_ARCH, nr("write")), RET_ALLOW);
        assert_eq!(eval(&program.filter, AUDIT_ARCH, nr("openat")), RET_ERRNO | 38);
    }

    #[test]
    fn unknown_names_and_argument_rules_are_errors() {
        let unknown: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["no_such_call"], "action": "SCMP_ACT_ERRNO"}]
        }))
        .unwrap();
        assert!(matches!(compile(&unknown), Err(SeccompError::UnknownSyscall(n)) if n == "no_such_call"));
        let args: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]}]
        }))
        .unwrap();
        assert!(matches!(compile(&args), Err(SeccompError::ArgumentConditions(_))));
    }
}
