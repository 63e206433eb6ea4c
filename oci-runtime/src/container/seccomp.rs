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
use std::collections::BTreeMap;

use super::syscalls::{FOREIGN_ONLY, OTHER_ARCH, SYSCALLS};

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
    /// Names that are a syscall on no architecture this build knows: their rules were
    /// skipped, as runc and crun (through libseccomp) skip them.
    pub(crate) unknown_names: Vec<String>,
}

impl SeccompProgram {
    pub fn len(&self) -> usize {
        self.filter.len()
    }
    pub fn is_empty(&self) -> bool {
        self.filter.is_empty()
    }
}

/// Syscalls the default profile allows; everything else fails with EPERM (and syscalls newer
/// than this build knows with ENOSYS, so the C library falls back). Modelled on the allow-list
/// that Docker, containerd and Podman share, for a container holding the default capability
/// set (no CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_SYS_TIME, CAP_SYS_BOOT, ...), so
/// mount, namespace creation, kernel modules, keyrings, BPF, perf, swap, clock setting and
/// reboot are absent. `io_uring_*` are absent too: io_uring bypasses seccomp for the
/// operations it submits and has been the source of many kernel exploits (Docker dropped it
/// from its profile for that reason). Names that are not syscalls on the build architecture
/// (the 32-bit variants) are skipped when compiled.
#[rustfmt::skip] // Data, grouped by concern; one name per line would run to 330 lines.
pub const DEFAULT_ALLOWED_SYSCALLS: &[&str] = &[
    // Processes, threads and their identity.
    "arch_prctl", "capget", "capset", "execve", "execveat", "exit", "exit_group", "fork",
    "get_robust_list", "get_thread_area", "getcpu", "getegid", "getegid32", "geteuid",
    "geteuid32", "getgid", "getgid32", "getgroups", "getgroups32", "getpgid", "getpgrp",
    "getpid", "getppid", "getpriority", "getresgid", "getresgid32", "getresuid", "getresuid32",
    "getrlimit", "getrusage", "getsid", "gettid", "getuid", "getuid32", "ioprio_get",
    "ioprio_set", "kill", "membarrier", "modify_ldt", "pidfd_getfd", "pidfd_open",
    "pidfd_send_signal", "prctl", "prlimit64", "process_mrelease", "ptrace", "rseq",
    "sched_get_priority_max", "sched_get_priority_min", "sched_getaffinity", "sched_getattr",
    "sched_getparam", "sched_getscheduler", "sched_rr_get_interval",
    "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr", "sched_setparam",
    "sched_setscheduler", "sched_yield", "seccomp", "set_robust_list", "set_thread_area",
    "set_tid_address", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid",
    "setgid32", "setgroups", "setgroups32", "setpgid", "setpriority", "setregid", "setregid32",
    "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32",
    "setrlimit", "setsid", "setuid", "setuid32", "tgkill", "tkill", "ugetrlimit", "vfork",
    "wait4", "waitid", "waitpid", "landlock_add_rule", "landlock_create_ruleset",
    "landlock_restrict_self",
    // Signals.
    "pause", "restart_syscall", "rt_sigaction", "rt_sigpending", "rt_sigprocmask",
    "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sigaltstack", "signalfd", "signalfd4",
    "sigprocmask", "sigreturn",
    // Memory.
    "brk", "cachestat", "madvise", "map_shadow_stack", "memfd_create", "memfd_secret",
    "mincore", "mlock", "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mremap", "mseal",
    "msync", "munlock", "munlockall", "munmap", "pkey_alloc", "pkey_free", "pkey_mprotect",
    "remap_file_pages",
    // Time and timers.
    "adjtimex", "alarm", "clock_getres", "clock_getres_time64", "clock_gettime",
    "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64", "getitimer",
    "gettimeofday", "nanosleep", "setitimer", "time", "timer_create", "timer_delete",
    "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime", "timer_settime64",
    "timerfd_create", "timerfd_gettime", "timerfd_gettime64", "timerfd_settime",
    "timerfd_settime64", "times",
    // Files and directories.
    "_llseek", "access", "chdir", "chmod", "chown", "chown32", "chroot", "close", "close_range",
    "copy_file_range", "creat", "dup", "dup2", "dup3", "faccessat", "faccessat2", "fadvise64",
    "fadvise64_64", "fallocate", "fchdir", "fchmod", "fchmodat", "fchmodat2", "fchown",
    "fchown32", "fchownat", "fcntl", "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock",
    "fremovexattr", "fsetxattr", "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64",
    "fsync", "ftruncate", "ftruncate64", "futimesat", "getcwd", "getdents", "getdents64",
    "getxattr", "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch",
    "lchown", "lchown32", "lgetxattr", "link", "linkat", "listxattr", "llistxattr",
    "lremovexattr", "lseek", "lsetxattr", "lstat", "lstat64", "mkdir", "mkdirat", "mknod",
    "mknodat", "newfstatat", "open", "openat", "openat2", "pread64", "preadv", "preadv2",
    "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat", "readv",
    "removexattr", "rename", "renameat", "renameat2", "rmdir", "sendfile", "sendfile64",
    "setxattr", "splice", "stat", "stat64", "statfs", "statfs64", "statx", "symlink",
    "symlinkat", "sync", "sync_file_range", "sync_file_range2", "arm_sync_file_range",
    "arm_fadvise64_64", "syncfs", "tee", "truncate", "truncate64", "umask", "unlink",
    "unlinkat", "utime", "utimensat", "utimensat_time64", "utimes", "vmsplice", "write",
    "writev", "fanotify_mark", "ioctl",
    // Polling, events and futexes.
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait",
    "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2", "futex",
    "futex_requeue", "futex_time64", "futex_wait", "futex_waitv", "futex_wake", "poll",
    "ppoll", "ppoll_time64", "pselect6", "pselect6_time64", "select", "_newselect",
    // Asynchronous I/O (the old interface; io_uring is not allowed).
    "io_cancel", "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64",
    "io_setup", "io_submit",
    // Sockets.
    "accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt",
    "listen", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "send", "sendmmsg",
    "sendmsg", "sendto", "setsockopt", "shutdown", "socket", "socketcall", "socketpair",
    "pipe", "pipe2",
    // System V and POSIX IPC (the container has its own IPC namespace).
    "ipc", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "msgctl",
    "msgget", "msgrcv", "msgsnd", "semctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "shmat", "shmctl", "shmdt", "shmget",
    // The system, read-only.
    "getrandom", "sysinfo", "uname",
];

/// `personality(2)` values the default profile allows: `PER_LINUX` and `PER_LINUX32`, each
/// also with `UNAME26`, and the query `0xffffffff`; the rest (`READ_IMPLIES_EXEC`,
/// `ADDR_NO_RANDOMIZE`, foreign personas) are refused.
const DEFAULT_PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// The namespace flags of `clone(2)`; the default profile refuses a clone that sets any.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// The actions [`compile`] accepts, as the runtime spec names them.
pub const SUPPORTED_ACTIONS: &[&str] = &[
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_LOG",
];

/// The one architecture a compiled filter admits (a foreign one is killed).
#[cfg(target_arch = "x86_64")]
pub const NATIVE_ARCH: &str = "SCMP_ARCH_X86_64";
#[cfg(target_arch = "aarch64")]
pub const NATIVE_ARCH: &str = "SCMP_ARCH_AARCH64";

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
/// of another Linux architecture (it cannot be called here, so a rule naming it is skipped),
/// and an error for a name that is a syscall nowhere (the caller skips and reports it).
fn resolve(name: &str) -> Result<Option<u32>, SeccompError> {
    if let Some((_, nr)) = SYSCALLS.iter().find(|(n, _)| *n == name) {
        return Ok(Some(*nr as u32));
    }
    if OTHER_ARCH.contains(&name) || FOREIGN_ONLY.contains(&name) {
        return Ok(None);
    }
    Err(SeccompError::UnknownSyscall(name.to_string()))
}

/// The highest syscall number this build knows on its architecture.
fn max_known_syscall() -> u32 {
    SYSCALLS.iter().map(|(_, nr)| *nr as u32).max().unwrap_or(0)
}

/// Compiles an OCI seccomp section into a BPF program.
///
/// Layout: the architecture check, the x32 refusal, ENOSYS for syscall numbers above any
/// this build knows (when the default action is an errno, so the C library falls back, as
/// runc does), then the syscalls whose rules have no argument conditions as ranges of
/// consecutive numbers with the same action (an allow-list of 300 names becomes a few dozen
/// range checks instead of 300 comparisons on every syscall), then each syscall with
/// argument conditions, its rules in profile order; then the default action. Per syscall,
/// the first matching rule in profile order decides, as libseccomp does; the order between
/// different syscalls cannot matter, as each syscall's rules are tried only for its number.
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

    // Each syscall's rules in profile order. A rule without conditions ends its syscall's
    // chain: rules after it can never match.
    let mut chains: BTreeMap<u32, Vec<(&[LinuxSeccompArg], u32)>> = BTreeMap::new();
    let mut unknown_names = Vec::new();
    for rule in spec.syscalls().iter().flatten() {
        let ret = action(rule.action(), rule.errno_ret())?;
        let args = rule.args().as_deref().unwrap_or(&[]);
        for arg in args {
            if arg.index() > 5 {
                return Err(SeccompError::BadArgument(rule.names().join(","), arg.index()));
            }
        }
        for name in rule.names() {
            let nr = match resolve(name) {
                Err(SeccompError::UnknownSyscall(n)) => {
                    if !unknown_names.contains(&n) {
                        unknown_names.push(n);
                    }
                    None
                }
                other => other?,
            };
            if let Some(nr) = nr {
                let chain = chains.entry(nr).or_default();
                if !chain.last().is_some_and(|(a, _)| a.is_empty()) {
                    chain.push((args, ret));
                }
            }
        }
    }

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
    if default & 0xffff_0000 == RET_ERRNO {
        filter.push(jump(BPF_JMP_JGT_K, max_known_syscall(), 0, 1));
        filter.push(stmt(BPF_RET_K, RET_ERRNO | libc::ENOSYS as u32));
    }
    // Unconditional rules, merged into runs of consecutive numbers with the same action.
    // A rule whose action is the default needs no instruction at all.
    let mut runs: Vec<(u32, u32, u32)> = Vec::new();
    for (&nr, chain) in &chains {
        let [(args, ret)] = chain.as_slice() else { continue };
        if !args.is_empty() || *ret == default {
            continue;
        }
        match runs.last_mut() {
            Some((_, hi, r)) if *hi + 1 == nr && r == ret => *hi = nr,
            _ => runs.push((nr, nr, *ret)),
        }
    }
    for (lo, hi, ret) in runs {
        if lo == hi {
            filter.push(jump(BPF_JMP_JEQ_K, lo, 0, 1));
        } else {
            filter.push(jump(BPF_JMP_JGE_K, lo, 0, 2));
            filter.push(jump(BPF_JMP_JGT_K, hi, 1, 0));
        }
        filter.push(stmt(BPF_RET_K, ret));
    }
    for (&nr, chain) in &chains {
        if chain.len() == 1 && chain[0].0.is_empty() {
            continue;
        }
        for (args, ret) in chain {
            filter.extend(rule_block(nr, args, *ret));
        }
    }
    filter.push(stmt(BPF_RET_K, default));
    if filter.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(filter.len()));
    }
    Ok(SeccompProgram { filter, flags, unknown_names })
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

/// The default profile as an OCI seccomp section: EPERM by default; allowed are
/// [`DEFAULT_ALLOWED_SYSCALLS`], `personality` with [`DEFAULT_PERSONALITIES`], and `clone`
/// without namespace flags; `clone3` gets ENOSYS (its flags live in memory a filter cannot
/// read, and ENOSYS makes the C library fall back to `clone`).
pub fn default_profile() -> serde_json::Value {
    let personalities: Vec<serde_json::Value> = DEFAULT_PERSONALITIES
        .iter()
        .map(|p| {
            serde_json::json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                               "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}]})
        })
        .collect();
    let mut syscalls = vec![
        serde_json::json!({"names": DEFAULT_ALLOWED_SYSCALLS, "action": "SCMP_ACT_ALLOW"}),
        serde_json::json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                           "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0,
                                     "op": "SCMP_CMP_MASKED_EQ"}]}),
        serde_json::json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}),
    ];
    syscalls.extend(personalities);
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": syscalls,
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

    const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = RET_ERRNO | libc::ENOSYS as u32;

    #[test]
    fn default_profile_allows_the_list_and_refuses_the_rest() {
        let spec: LinuxSeccomp = serde_json::from_value(default_profile()).unwrap();
        let program = compile(&spec).unwrap();
        let p = &program.filter;
        for name in ["read", "write", "execve", "openat", "mmap", "futex", "socket", "chroot", "ptrace"] {
            assert_eq!(eval(p, AUDIT_ARCH, nr(name)), RET_ALLOW, "{name}");
        }
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "keyctl",
            "add_key",
            "bpf",
            "perf_event_open",
            "init_module",
            "finit_module",
            "kexec_load",
            "reboot",
            "swapon",
            "settimeofday",
            "clock_settime",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "userfaultfd",
            "open_by_handle_at",
            "process_vm_readv",
            "fsopen",
            "move_mount",
            "syslog",
            "acct",
        ] {
            assert_eq!(eval(p, AUDIT_ARCH, nr(name)), EPERM, "{name}");
        }
        // Every allowed name is allowed, whatever the range layout.
        for name in DEFAULT_ALLOWED_SYSCALLS {
            if let Some(n) = resolve(name).unwrap() {
                assert_eq!(eval(p, AUDIT_ARCH, n), RET_ALLOW, "{name}");
            }
        }
        let clone = |flags: u64| eval_args(p, AUDIT_ARCH, nr("clone"), [flags, 0, 0, 0, 0, 0]);
        assert_eq!(clone(libc::SIGCHLD as u64), RET_ALLOW);
        assert_eq!(clone((libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64), RET_ALLOW);
        assert_eq!(clone(libc::CLONE_NEWUSER as u64 | libc::SIGCHLD as u64), EPERM);
        assert_eq!(clone(libc::CLONE_NEWNET as u64), EPERM);
        assert_eq!(clone(libc::CLONE_NEWNS as u64), EPERM);
        assert_eq!(eval(p, AUDIT_ARCH, nr("clone3")), ENOSYS);
        let personality = |v: u64| eval_args(p, AUDIT_ARCH, nr("personality"), [v, 0, 0, 0, 0, 0]);
        assert_eq!(personality(0), RET_ALLOW);
        assert_eq!(personality(0xffff_ffff), RET_ALLOW);
        assert_eq!(personality(0x0400_0000), EPERM, "READ_IMPLIES_EXEC");
        assert_eq!(personality(0x0004_0000), EPERM, "ADDR_NO_RANDOMIZE");
        assert_eq!(eval(p, AUDIT_ARCH, max_known_syscall() + 1), ENOSYS, "newer than this build");
        assert_eq!(eval(p, 0x4000_0003, nr("read")), RET_KILL_PROCESS, "foreign arch");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(eval(p, AUDIT_ARCH, 0x4000_0000 | nr("read")), EPERM, "x32");
        // The allow-list is checked as ranges of numbers, not one comparison per name.
        assert!(p.len() < 200, "{} instructions", p.len());
    }

    #[test]
    fn names_of_other_architectures_are_skipped() {
        // Docker's and Podman's profiles name 32-bit calls such as these.
        let spec: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["chown32", "bdflush", "socketcall", "read"], "action": "SCMP_ACT_ALLOW"}]
        }))
        .unwrap();
        let p = compile(&spec).unwrap().filter;
        assert_eq!(eval(&p, AUDIT_ARCH, nr("read")), RET_ALLOW);
        assert_eq!(eval(&p, AUDIT_ARCH, nr("write")), EPERM);
    }

    /// The range layout decides exactly what rule-by-rule evaluation in profile order would.
    #[test]
    fn compiled_profiles_agree_with_rule_order_evaluation() {
        use proptest::prelude::*;
        let names: Vec<&str> = SYSCALLS.iter().map(|(n, _)| *n).take(40).collect();
        let actions = [
            ("SCMP_ACT_ALLOW", RET_ALLOW),
            ("SCMP_ACT_ERRNO", EPERM),
            ("SCMP_ACT_KILL_PROCESS", RET_KILL_PROCESS),
            ("SCMP_ACT_LOG", RET_LOG),
        ];
        let rule =
            (prop::collection::vec(0..names.len(), 1..6), 0..actions.len(), prop::option::of((0usize..3, 0u64..4)));
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
        runner
            .run(
                &(
                    prop::collection::vec(rule, 0..30),
                    0..actions.len(),
                    prop::collection::vec((0..names.len(), 0u64..4), 20),
                ),
                |(rules, default, probes)| {
                    let json_rules: Vec<serde_json::Value> = rules
                        .iter()
                        .map(|(ns, a, cond)| {
                            let ns: Vec<&str> = ns.iter().map(|i| names[*i]).collect();
                            let mut r = serde_json::json!({"names": ns, "action": actions[*a].0});
                            if let Some((index, value)) = cond {
                                r["args"] = serde_json::json!([{"index": index, "value": value, "op": "SCMP_CMP_EQ"}]);
                            }
                            r
                        })
                        .collect();
                    let spec: LinuxSeccomp = serde_json::from_value(serde_json::json!({
                        "defaultAction": actions[default].0, "syscalls": json_rules
                    }))
                    .unwrap();
                    let p = compile(&spec).unwrap().filter;
                    for (i, v) in probes {
                        let n = nr(names[i]);
                        let args = [v; 6];
                        let want = rules
                            .iter()
                            .find(|(ns, _, cond)| {
                                ns.iter().any(|j| nr(names[*j]) == n)
                                    && cond.is_none_or(|(index, value)| args[index] == value)
                            })
                            .map_or(actions[default].1, |(_, a, _)| actions[*a].1);
                        prop_assert_eq!(eval_args(&p, AUDIT_ARCH, n, args), want, "{} with {}", names[i], v);
                    }
                    Ok(())
                },
            )
            .unwrap();
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
    fn unknown_names_are_skipped_and_bad_argument_indexes_are_errors() {
        // Podman's default profile names "syscall", a syscall on no architecture we know.
        let unknown: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["no_such_call", "write", "no_such_call"], "action": "SCMP_ACT_ALLOW"}]
        }))
        .unwrap();
        let program = compile(&unknown).unwrap();
        assert_eq!(program.unknown_names, ["no_such_call"]);
        assert_eq!(eval(&program.filter, AUDIT_ARCH, nr("write")), RET_ALLOW, "the rest of the rule applies");
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
