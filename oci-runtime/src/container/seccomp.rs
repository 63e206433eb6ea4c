//! Seccomp for containers: compiles the `linux.seccomp` section of an OCI spec into a classic
//! BPF program (no libseccomp), and holds the default profile of generated specs. It owns
//! syscall-name resolution and the program layout; it never installs anything (the executor
//! does, through `sys::install_seccomp`) and never accepts a rule it cannot express exactly.
//!
//! The program checks the architecture (a foreign one is killed), refuses x32 syscall numbers
//! on x86_64, then tries each rule in order: the syscall number, then every argument
//! condition of the rule (64-bit unsigned comparisons, as libseccomp makes them); the first
//! rule that matches decides, otherwise the default action does.

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

use super::sys::SockFilter;
use super::syscalls::{OTHER_ARCH, SYSCALLS};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp syscall {0:?} is unknown on this architecture")]
    UnknownSyscall(String),
    #[error("seccomp action {0:?} is not supported")]
    UnsupportedAction(LinuxSeccompAction),
    #[error("seccomp rule for {0:?} has an argument condition on argument {1} (syscalls have 6)")]
    BadArgument(String, usize),
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
const BPF_JMP_JGT_K: u16 = 0x25;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_ALU_AND_K: u16 = 0x54;
/// Offset of `args[0]` in `struct seccomp_data`; each argument is 8 bytes, little-endian.
const ARGS_OFFSET: u32 = 16;
/// Placeholder jump offset meaning "this rule does not match": patched to the rule's end.
const FAIL: u8 = u8::MAX;
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
        let args = rule.args().as_deref().unwrap_or(&[]);
        for arg in args {
            if arg.index() > 5 {
                return Err(SeccompError::BadArgument(rule.names().join(","), arg.index()));
            }
        }
        for name in rule.names() {
            if let Some(nr) = resolve(name)? {
                filter.extend(rule_block(nr, args, ret));
            }
        }
    }
    filter.push(stmt(BPF_RET_K, default));
    if filter.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(filter.len()));
    }
    Ok(SeccompProgram { filter, flags })
}

/// One rule: match the number (the accumulator holds it on entry), then each condition;
/// any mismatch jumps past the block, with the number reloaded for the next rule.
fn rule_block(nr: u32, args: &[LinuxSeccompArg], ret: u32) -> Vec<SockFilter> {
    let mut block = vec![jump(BPF_JMP_JEQ_K, nr, 0, FAIL)];
    for arg in args {
        block.extend(condition(arg));
    }
    block.push(stmt(BPF_RET_K, ret));
    if !args.is_empty() {
        // Conditions clobber the accumulator: the next rule needs the number again.
        block.push(stmt(BPF_LD_W_ABS, 0));
    }
    // The last instruction is where a failed match resumes: the reload if there is one,
    // otherwise the next rule.
    let end = if args.is_empty() { block.len() } else { block.len() - 1 };
    for (i, insn) in block.iter_mut().enumerate() {
        if insn.jt == FAIL {
            insn.jt = (end - i - 1) as u8;
        }
        if insn.jf == FAIL {
            insn.jf = (end - i - 1) as u8;
        }
    }
    block
}

/// One 64-bit unsigned comparison of an argument; falls through when it holds, jumps to
/// FAIL when not. Offsets other than FAIL are local to the returned instructions.
fn condition(arg: &LinuxSeccompArg) -> Vec<SockFilter> {
    let lo_at = ARGS_OFFSET + 8 * arg.index() as u32;
    let hi_at = lo_at + 4;
    let (value, mask) = match arg.op() {
        // libseccomp's masked compare: `value` is the mask, `valueTwo` the datum.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (arg.value_two().unwrap_or(0), Some(arg.value())),
        _ => (arg.value(), None),
    };
    let (hi, lo) = ((value >> 32) as u32, value as u32);
    let ld_hi = stmt(BPF_LD_W_ABS, hi_at);
    let ld_lo = stmt(BPF_LD_W_ABS, lo_at);
    match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => {
            vec![ld_hi, jump(BPF_JMP_JEQ_K, hi, 0, FAIL), ld_lo, jump(BPF_JMP_JEQ_K, lo, 0, FAIL)]
        }
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let m = mask.unwrap_or(u64::MAX);
            vec![
                ld_hi,
                stmt(BPF_ALU_AND_K, (m >> 32) as u32),
                jump(BPF_JMP_JEQ_K, hi & (m >> 32) as u32, 0, FAIL),
                ld_lo,
                stmt(BPF_ALU_AND_K, m as u32),
                jump(BPF_JMP_JEQ_K, lo & m as u32, 0, FAIL),
            ]
        }
        // Holds when either half differs.
        LinuxSeccompOperator::ScmpCmpNe => {
            vec![ld_hi, jump(BPF_JMP_JEQ_K, hi, 0, 2), ld_lo, jump(BPF_JMP_JEQ_K, lo, FAIL, 0)]
        }
        LinuxSeccompOperator::ScmpCmpGt => vec![
            ld_hi,
            jump(BPF_JMP_JGT_K, hi, 3, 0),
            jump(BPF_JMP_JEQ_K, hi, 0, FAIL),
            ld_lo,
            jump(BPF_JMP_JGT_K, lo, 0, FAIL),
        ],
        LinuxSeccompOperator::ScmpCmpGe => vec![
            ld_hi,
            jump(BPF_JMP_JGT_K, hi, 3, 0),
            jump(BPF_JMP_JEQ_K, hi, 0, FAIL),
            ld_lo,
            jump(BPF_JMP_JGE_K, lo, 0, FAIL),
        ],
        LinuxSeccompOperator::ScmpCmpLt => vec![
            ld_hi,
            jump(BPF_JMP_JGE_K, hi, 0, 3),
            jump(BPF_JMP_JEQ_K, hi, 0, FAIL),
            ld_lo,
            jump(BPF_JMP_JGE_K, lo, FAIL, 0),
        ],
        LinuxSeccompOperator::ScmpCmpLe => vec![
            ld_hi,
            jump(BPF_JMP_JGE_K, hi, 0, 3),
            jump(BPF_JMP_JEQ_K, hi, 0, FAIL),
            ld_lo,
            jump(BPF_JMP_JGT_K, lo, FAIL, 0),
        ],
    }
}

/// The default profile as an OCI seccomp section: allow by default, EPERM for
/// [`DEFAULT_DENIED_SYSCALLS`] and for clone with CLONE_NEWUSER, ENOSYS for clone3.
pub fn default_profile() -> serde_json::Value {
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": [
            {"names": DEFAULT_DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM},
            // New user namespaces through clone (the other namespace flags already need
            // CAP_SYS_ADMIN, which the default set lacks).
            {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM,
             "args": [{"index": 0, "value": libc::CLONE_NEWUSER, "valueTwo": libc::CLONE_NEWUSER,
                       "op": "SCMP_CMP_MASKED_EQ"}]},
            // clone3 passes its flags in memory a filter cannot read; ENOSYS makes the C
            // library fall back to clone, as Docker's profile does.
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS},
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program for one (arch, nr, args) the way the kernel would for these opcodes.
    fn eval_args(program: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let insn = program[pc];
            match insn.code {
                BPF_LD_W_ABS => {
                    acc = match insn.k {
                        0 => nr,
                        4 => arch,
                        k => {
                            let a = args[((k - ARGS_OFFSET) / 8) as usize];
                            if (k - ARGS_OFFSET).is_multiple_of(8) { a as u32 } else { (a >> 32) as u32 }
                        }
                    }
                }
                BPF_ALU_AND_K => acc &= insn.k,
                BPF_JMP_JEQ_K => pc += if acc == insn.k { insn.jt } else { insn.jf } as usize,
                BPF_JMP_JGT_K => pc += if acc > insn.k { insn.jt } else { insn.jf } as usize,
                BPF_JMP_JGE_K => pc += if acc >= insn.k { insn.jt } else { insn.jf } as usize,
                BPF_RET_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc += 1;
        }
    }

    fn eval(program: &[SockFilter], arch: u32, nr: u32) -> u32 {
        eval_args(program, arch, nr, [0; 6])
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
        let clone = |flags: u64| eval_args(&program.filter, AUDIT_ARCH, nr("clone"), [flags, 0, 0, 0, 0, 0]);
        assert_eq!(clone(libc::SIGCHLD as u64), RET_ALLOW);
        assert_eq!(clone(libc::CLONE_NEWUSER as u64 | libc::SIGCHLD as u64), RET_ERRNO | libc::EPERM as u32);
        assert_eq!(eval(&program.filter, AUDIT_ARCH, nr("clone3")), RET_ERRNO | libc::ENOSYS as u32);
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
    fn unknown_names_and_bad_argument_indexes_are_errors() {
        let unknown: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["no_such_call"], "action": "SCMP_ACT_ERRNO"}]
        }))
        .unwrap();
        assert!(matches!(compile(&unknown), Err(SeccompError::UnknownSyscall(n)) if n == "no_such_call"));
        let args: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 7, "value": 1, "op": "SCMP_CMP_EQ"}]}]
        }))
        .unwrap();
        assert!(matches!(compile(&args), Err(SeccompError::BadArgument(_, 7))));
    }

    #[test]
    fn argument_conditions_compare_64_bit_values() {
        const NEWUSER: u64 = 0x1000_0000;
        let spec: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0xffff_ffffu64, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": NEWUSER, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["read"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 2, "value": 0x1_0000_0000u64, "op": "SCMP_CMP_LT"},
                          {"index": 0, "value": 2, "op": "SCMP_CMP_NE"}]},
                {"names": ["write"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 1, "value": 0x1_0000_0005u64, "op": "SCMP_CMP_GE"}]},
                {"names": ["openat"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 3, "value": 10, "op": "SCMP_CMP_GT"},
                          {"index": 3, "value": 20, "op": "SCMP_CMP_LE"}]},
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
            ]
        }))
        .unwrap();
        let p = compile(&spec).unwrap().filter;
        let run = |name: &str, args: [u64; 6]| eval_args(&p, AUDIT_ARCH, nr(name), args) == RET_ALLOW;
        assert!(run("personality", [0, 0, 0, 0, 0, 0]));
        assert!(run("personality", [0xffff_ffff, 0, 0, 0, 0, 0]));
        assert!(!run("personality", [8, 0, 0, 0, 0, 0]));
        assert!(!run("personality", [0x1_0000_0000, 0, 0, 0, 0, 0]), "the high half counts");
        assert!(run("clone", [0x11, 0, 0, 0, 0, 0]));
        assert!(!run("clone", [NEWUSER | 0x11, 0, 0, 0, 0, 0]));
        assert!(run("read", [0, 0, 0xffff_ffff, 0, 0, 0]));
        assert!(!run("read", [0, 0, 0x1_0000_0000, 0, 0, 0]));
        assert!(!run("read", [2, 0, 5, 0, 0, 0]), "both conditions must hold");
        assert!(run("write", [0, 0x1_0000_0005, 0, 0, 0, 0]));
        assert!(run("write", [0, 0x2_0000_0000, 0, 0, 0, 0]));
        assert!(!run("write", [0, 0x1_0000_0004, 0, 0, 0, 0]));
        assert!(!run("write", [0, 0xffff_ffff, 0, 0, 0, 0]));
        assert!(run("openat", [0, 0, 0, 11, 0, 0]));
        assert!(run("openat", [0, 0, 0, 20, 0, 0]));
        assert!(!run("openat", [0, 0, 0, 10, 0, 0]));
        assert!(!run("openat", [0, 0, 0, 21, 0, 0]));
        assert!(!run("openat", [0, 0, 0, 0x1_0000_0011, 0, 0]));
        assert!(run("getpid", [9; 6]), "a rule after conditional rules still sees the number");
        assert!(!run("getppid", [0; 6]));
    }
}
