//! The container's first process between `clone` and `execve`: it waits for its parent to
//! place it in the cgroup, builds the root filesystem (bind, the spec's mounts, /dev,
//! pivot_root, masked and read-only paths), sets hostname, loopback, sysctls, rlimits, user,
//! capabilities, no_new_privs and seccomp, reports ready, waits for `start` on the exec fifo
//! and executes the user's program. It owns nothing after exec. It runs in a copy of a
//! single-threaded parent, so it must never return into the parent's code: every path ends
//! in `execve` or `sys::exit_now`, and errors ([`InitError`]) travel to the parent as text on
//! the sync pipe. The privilege drop is [`super::privileges`], shared with `exec`.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, makedev, mknod, umask};
use nix::unistd::{Gid, Uid};

use super::privileges::{self, PrivilegeError};
use super::spec::{MountPlan, Plan};
use super::sys;

/// Why the container's init could not get to exec; its text goes to the parent, which
/// reports "container X failed to start: <text>".
#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    /// A system call failed while doing `what`.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done, with its input.
        what: String,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed while doing `what`.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with its input.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Dropping privileges failed.
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    /// A sysctl name that would leave `/proc/sys`.
    #[error("sysctl {0:?} is not a valid name")]
    BadSysctl(String),
    /// The program is not on the container's PATH.
    #[error("executable {program:?} not found in PATH {search:?}")]
    NotFound {
        /// The program as given.
        program: String,
        /// The PATH searched.
        search: String,
    },
    /// The program exists but cannot be executed.
    #[error("executable {} cannot be run: {source}", path.display())]
    CannotRun {
        /// The program's path.
        path: PathBuf,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// An argument, environment entry or path holds a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// A path inside the rootfs resolves through too many symlinks.
    #[error("too many symlinks resolving {}", .0.display())]
    SymlinkLoop(PathBuf),
    /// A createContainer hook failed.
    #[error("{0}")]
    Hook(String),
}

/// `InitError::Sys` for doing `what`.
fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

/// `InitError::Io` for doing `what`.
fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Io { what, source }
}

/// The descriptors the child works with.
pub(crate) struct ChildFds {
    /// Parent to child: one byte once the parent has placed the child in its cgroup.
    pub go: OwnedFd,
    /// Child to parent: `R` when ready, or `E` followed by an error message.
    pub report: OwnedFd,
    /// The exec fifo, opened read-write: a byte arrives when `start` runs.
    pub fifo: OwnedFd,
    /// Replacements for stdin, stdout and stderr (None keeps the inherited one).
    pub stdio: [Option<OwnedFd>; 3],
    /// cgroup v1 `tasks` files, opened by the parent, into which the child writes `0` to
    /// join its cgroups itself (empty: the parent adds it).
    pub attach: Vec<OwnedFd>,
    /// The caller's console socket, for `process.terminal`.
    pub console: Option<OwnedFd>,
}

/// Entry point of the child after clone. Never returns.
pub(crate) fn child_main(plan: &Plan, fds: ChildFds) -> ! {
    let ChildFds { go, report, fifo, stdio, attach, console } = fds;
    // Until it execs the container's program this process is the flotilla binary running
    // privileged inside the container: non-dumpable, so nothing in the container can open its
    // /proc entries (and through /proc/<pid>/exe the binary on the host). execve resets it.
    let _ = sys::set_dumpable(false);
    let mut report = fs::File::from(report);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        join_cgroups(attach)?;
        prepare(plan, go, stdio, console)
    }));
    let (exec, state) = match result {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => fail(&mut report, &e.to_string()),
        Err(_) => fail(&mut report, "container init panicked"),
    };
    if report.write_all(b"R").is_err() {
        sys::exit_now(127);
    }
    drop(report);
    // Block until `start` writes a byte into the fifo.
    let mut fifo = fs::File::from(fifo);
    let mut byte = [0u8; 1];
    if fifo.read_exact(&mut byte).is_err() {
        sys::exit_now(127);
    }
    drop(fifo);
    if let Err(e) = super::hooks::run("startContainer", &plan.hooks.start_container, &state) {
        let _ = writeln!(io::stderr(), "flotilla-oci: {e}");
        sys::exit_now(127);
    }
    let _ = sys::cloexec_from(3);
    sys::reset_signals();
    if let Some(program) = plan.seccomp.as_ref().filter(|_| plan.no_new_privs)
        && let Err(e) = sys::install_seccomp(&program.filter, program.flags)
    {
        let _ = writeln!(io::stderr(), "flotilla-oci: installing seccomp filter: {e}");
        sys::exit_now(127);
    }
    let err = nix::unistd::execve(&exec.path, &exec.args, &exec.env).err();
    let _ = writeln!(io::stderr(), "flotilla-oci: exec {:?}: {err:?}", exec.path);
    sys::exit_now(127)
}

fn fail(report: &mut fs::File, message: &str) -> ! {
    let _ = report.write_all(format!("E{message}").as_bytes());
    sys::exit_now(1)
}

/// Moves this (single-threaded) process into its cgroups before it does anything else, so
/// every later process and allocation is accounted there.
fn join_cgroups(files: Vec<OwnedFd>) -> Result<(), InitError> {
    for fd in files {
        fs::File::from(fd).write_all(b"0").map_err(io_err("joining cgroup"))?;
    }
    Ok(())
}

struct Exec {
    path: CString,
    args: Vec<CString>,
    env: Vec<CString>,
}

/// Sets the container up; returns its program and the OCI state for its hooks.
fn prepare(
    plan: &Plan,
    go: OwnedFd,
    stdio: [Option<OwnedFd>; 3],
    console: Option<OwnedFd>,
) -> Result<(Exec, Vec<u8>), InitError> {
    let mut go = fs::File::from(go);
    let mut byte = [0u8; 1];
    go.read_exact(&mut byte).map_err(io_err("waiting for the runtime"))?;
    let mut state = Vec::new();
    if plan.hooks.in_container() {
        go.read_to_end(&mut state).map_err(io_err("reading the container state"))?;
    }
    drop(go);

    let [stdin, stdout, stderr] = stdio;
    if let Some(fd) = stdin {
        nix::unistd::dup2_stdin(&fd).map_err(sys_err("redirecting stdin"))?;
    }
    if let Some(fd) = stdout {
        nix::unistd::dup2_stdout(&fd).map_err(sys_err("redirecting stdout"))?;
    }
    if let Some(fd) = stderr {
        nix::unistd::dup2_stderr(&fd).map_err(sys_err("redirecting stderr"))?;
    }
    if let Some(adj) = plan.oom_score_adj {
        fs::write("/proc/self/oom_score_adj", adj.to_string()).map_err(io_err("setting oom_score_adj"))?;
    }
    // Read while the host's /proc is still the one mounted.
    let last_cap = privileges::last_cap();

    for (flag, path) in &plan.join_namespaces {
        let file = fs::File::open(path).map_err(io_err(format!("opening namespace {}", path.display())))?;
        nix::sched::setns(&file, *flag).map_err(sys_err(format!("joining namespace {}", path.display())))?;
    }
    if plan.cgroup_ns {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP).map_err(sys_err("creating cgroup namespace"))?;
    }
    let user_ns = plan.clone_flags.contains(CloneFlags::CLONE_NEWUSER)
        || plan.join_namespaces.iter().any(|(f, _)| *f == CloneFlags::CLONE_NEWUSER);
    if user_ns {
        // Become root of the new user namespace so mounts and the rest are permitted.
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
            .map_err(sys_err("setting gid 0 in the user namespace"))?;
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
            .map_err(sys_err("setting uid 0 in the user namespace"))?;
    }
    umask(Mode::empty());
    setup_rootfs(plan, &state)?;

    if let Some(socket) = console {
        // After pivot_root: the terminal is one of the container's own devpts.
        let (rows, cols) = plan.console_size.unwrap_or((0, 0));
        let pty = super::tty::open_pty(rows, cols).map_err(io_err("opening a pseudo-terminal"))?;
        send_fd(&socket, &pty.master).map_err(io_err("sending the terminal to the console socket"))?;
        drop((socket, pty.master));
        nix::unistd::setsid().map_err(sys_err("starting a session"))?;
        sys::set_controlling_terminal(&pty.slave).map_err(io_err("taking the terminal"))?;
        nix::unistd::dup2_stdin(&pty.slave).map_err(sys_err("terminal as stdin"))?;
        nix::unistd::dup2_stdout(&pty.slave).map_err(sys_err("terminal as stdout"))?;
        nix::unistd::dup2_stderr(&pty.slave).map_err(sys_err("terminal as stderr"))?;
    }
    if let Some(name) = &plan.hostname {
        nix::unistd::sethostname(name).map_err(sys_err(format!("setting hostname {name:?}")))?;
    }
    if plan.clone_flags.contains(CloneFlags::CLONE_NEWNET) {
        sys::loopback_up().map_err(io_err("bringing up loopback"))?;
    }
    for (key, value) in &plan.sysctl {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        if key.contains("..") || key.contains('/') {
            return Err(InitError::BadSysctl(key.clone()));
        }
        fs::write(&path, value).map_err(io_err(format!("setting sysctl {key}")))?;
    }
    restrict_paths(plan)?;
    privileges::drop_privileges(plan, user_ns, last_cap)?;
    nix::unistd::chdir(&plan.cwd).map_err(sys_err(format!("changing to cwd {}", plan.cwd.display())))?;
    umask(Mode::from_bits_truncate(plan.umask.unwrap_or(0o022)));
    Ok((resolve_exec(plan)?, state))
}

/// Finds the program: a path with a slash is used as is, otherwise the container's PATH is
/// searched, as execvp would.
fn resolve_exec(plan: &Plan) -> Result<Exec, InitError> {
    let cstr = |s: &str| CString::new(s).map_err(|_| InitError::Nul(s.to_owned()));
    let program = &plan.args[0];
    let path = if program.contains('/') {
        PathBuf::from(program)
    } else {
        let search = plan
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        search
            .split(':')
            .map(|dir| Path::new(dir).join(program))
            .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
            .ok_or_else(|| InitError::NotFound { program: program.clone(), search: search.to_owned() })?
    };
    nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK)
        .map_err(|source| InitError::CannotRun { path: path.clone(), source })?;
    Ok(Exec {
        path: CString::new(path.as_os_str().as_bytes()).map_err(|_| InitError::Nul(path.display().to_string()))?,
        args: plan.args.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?,
        env: plan.env.iter().map(|e| cstr(e)).collect::<Result<_, _>>()?,
    })
}

/// Joins `path` under `root` resolving symlinks as if `root` were `/`, so nothing in the
/// image can point a mount outside the rootfs.
pub(crate) fn secure_join(root: &Path, path: &Path) -> Result<PathBuf, InitError> {
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| {
            if let Component::Normal(n) = c {
                Some(n.into())
            } else if c == Component::ParentDir {
                Some("..".into())
            } else {
                None
            }
        })
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = std::iter::once(root.as_os_str().to_owned())
            .chain(resolved.iter().cloned())
            .chain(std::iter::once(part.clone()))
            .collect();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(InitError::SymlinkLoop(path.to_owned()));
                }
                let target =
                    fs::read_link(&candidate).map_err(io_err(format!("reading link {}", candidate.display())))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.into()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    Ok(std::iter::once(root.as_os_str().to_owned()).chain(resolved).collect())
}

fn mount_err(what: &str, target: &Path) -> impl FnOnce(nix::Error) -> InitError {
    sys_err(format!("{what} {}", target.display()))
}

fn setup_rootfs(plan: &Plan, state: &[u8]) -> Result<(), InitError> {
    let none: Option<&str> = None;
    mount(none, "/", none, plan.rootfs_propagation, none)
        .map_err(mount_err("setting propagation of", Path::new("/")))?;
    let rootfs = &plan.rootfs;
    // pivot_root refuses a new root, or a parent of it, with shared propagation, and an
    // unbindable mount cannot be bind-mounted: the mount holding the rootfs is made private
    // in this namespace (as runc does); the requested propagation is set on the new root
    // after the pivot.
    let shared_or_unbindable = plan.rootfs_propagation.intersects(MsFlags::MS_SHARED | MsFlags::MS_UNBINDABLE);
    if shared_or_unbindable {
        let holder = mount_point_holding(rootfs)?;
        mount(none, &holder, none, MsFlags::MS_PRIVATE, none).map_err(mount_err("making private", &holder))?;
    }
    mount(Some(rootfs), rootfs, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
        .map_err(mount_err("bind-mounting rootfs", rootfs))?;
    for m in &plan.mounts {
        mount_one(plan, m)?;
    }
    let dev = secure_join(rootfs, Path::new("/dev"))?;
    for d in &plan.devices {
        let target = secure_join(rootfs, &d.path)?;
        create_device(d, &target)?;
    }
    if !plan.devices.is_empty() {
        for (link, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("core", "/proc/kcore"),
            ("ptmx", "pts/ptmx"),
        ] {
            match symlink(to, dev.join(link)) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(InitError::Io { what: format!("creating /dev/{link}"), source: e });
                }
                _ => {}
            }
        }
    }
    // createContainer hooks: in the container's namespaces, paths still the runtime's.
    super::hooks::run("createContainer", &plan.hooks.create_container, state)
        .map_err(|e| InitError::Hook(e.to_string()))?;
    nix::unistd::chdir(rootfs).map_err(mount_err("entering", rootfs))?;
    nix::unistd::pivot_root(".", ".").map_err(mount_err("pivot_root to", rootfs))?;
    if plan.rootfs_propagation.contains(MsFlags::MS_SHARED) {
        // The old root's mounts are peers of the host's: detaching them must not propagate.
        mount(none, ".", none, MsFlags::MS_SLAVE | MsFlags::MS_REC, none)
            .map_err(mount_err("making the old root a slave of", rootfs))?;
    }
    umount2(".", MntFlags::MNT_DETACH).map_err(mount_err("detaching old root from", rootfs))?;
    nix::unistd::chdir("/").map_err(mount_err("entering", Path::new("/")))?;
    if shared_or_unbindable {
        mount(none, "/", none, plan.rootfs_propagation, none)
            .map_err(mount_err("setting propagation of", Path::new("/")))?;
    }

    Ok(())
}

/// Sends `fd` over a unix socket (SCM_RIGHTS), with the terminal's name as the message, as
/// runc does (conmon and containerd read the descriptor and ignore the text).
fn send_fd(socket: &OwnedFd, fd: &OwnedFd) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let data = b"/dev/ptmx";
    let iov = [io::IoSlice::new(data)];
    let fds = [fd.as_raw_fd()];
    sendmsg::<()>(socket.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)?;
    Ok(())
}

/// Masked and read-only paths, then a read-only root: after sysctls are written (through
/// /proc/sys, which the default spec makes read-only), as runc orders them.
fn restrict_paths(plan: &Plan) -> Result<(), InitError> {
    let none: Option<&str> = None;
    for p in &plan.masked_paths {
        match fs::metadata(p) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => mount(Some("tmpfs"), p, Some("tmpfs"), MsFlags::MS_RDONLY, Some("size=0"))
                .map_err(mount_err("masking", p))?,
            Ok(_) => mount(Some("/dev/null"), p, none, MsFlags::MS_BIND, none).map_err(mount_err("masking", p))?,
        }
    }
    for p in &plan.readonly_paths {
        if fs::symlink_metadata(p).is_err() {
            continue;
        }
        mount(Some(p), p, none, MsFlags::MS_BIND | MsFlags::MS_REC, none).map_err(mount_err("binding", p))?;
        remount_readonly(p)?;
    }
    if plan.readonly_rootfs {
        remount_readonly(Path::new("/"))?;
    }
    Ok(())
}

/// The mount point of the mount that holds `path` (the longest mount point above it).
fn mount_point_holding(path: &Path) -> Result<PathBuf, InitError> {
    let path = fs::canonicalize(path).map_err(io_err(format!("resolving {}", path.display())))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(io_err("reading mountinfo"))?;
    let mut best = PathBuf::from("/");
    for line in mountinfo.lines() {
        let Some(point) = line.split(' ').nth(4) else { continue };
        let point = PathBuf::from(unescape_mountinfo(point));
        if path.starts_with(&point) && point.components().count() > best.components().count() {
            best = point;
        }
    }
    Ok(best)
}

/// Mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| u8::try_from(d.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0'))).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Remounts a bind mount read-only, keeping the flags the kernel would refuse to drop.
fn remount_readonly(p: &Path) -> Result<(), InitError> {
    use nix::sys::statvfs::FsFlags;
    let none: Option<&str> = None;
    let current = nix::sys::statvfs::statvfs(p).map(|s| s.flags()).unwrap_or(FsFlags::empty());
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (f, m) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if current.contains(f) {
            flags |= m;
        }
    }
    mount(none, p, none, flags, none).map_err(mount_err("remounting read-only", p))
}

fn mount_one(plan: &Plan, m: &MountPlan) -> Result<(), InitError> {
    let none: Option<&str> = None;
    let target = secure_join(&plan.rootfs, &m.destination)?;
    if m.bind {
        let source = m.source.as_deref().unwrap_or(Path::new(""));
        let source = if source.is_absolute() { source.to_path_buf() } else { plan.bundle.join(source) };
        let meta = fs::metadata(&source).map_err(io_err(format!("bind source {}", source.display())))?;
        if meta.is_dir() {
            fs::create_dir_all(&target).map_err(io_err(format!("creating {}", target.display())))?;
        } else {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
            }
            if fs::symlink_metadata(&target).is_err() {
                fs::File::create(&target).map_err(io_err(format!("creating {}", target.display())))?;
            }
        }
        mount(Some(&source), &target, none, MsFlags::MS_BIND | (m.flags & MsFlags::MS_REC), none)
            .map_err(mount_err("bind-mounting onto", &target))?;
        let extra = m.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mount(none, &target, none, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra, none)
                .map_err(mount_err("remounting", &target))?;
        }
        if m.recursive_readonly {
            // Never silently weaker: a kernel without mount_setattr (before 5.12) fails the start.
            sys::set_readonly_recursive(&target).map_err(|source| InitError::Io {
                what: format!("making {} read-only recursively (mount_setattr, Linux 5.12 or later)", target.display()),
                source,
            })?;
        }
    } else if m.fstype == "cgroup" {
        mount_cgroup(&target, m.flags)?;
    } else {
        fs::create_dir_all(&target).map_err(io_err(format!("creating {}", target.display())))?;
        let source = m.source.as_deref().map(Path::as_os_str).unwrap_or(std::ffi::OsStr::new(&m.fstype));
        let data = if m.data.is_empty() { None } else { Some(m.data.as_str()) };
        mount(Some(source), &target, Some(m.fstype.as_str()), m.flags, data)
            .map_err(mount_err(&format!("mounting {} on", m.fstype), &target))?;
    }
    if !m.propagation.is_empty() {
        mount(none, &target, none, m.propagation, none).map_err(mount_err("setting propagation of", &target))?;
    }
    Ok(())
}

/// A `cgroup` mount shows the container its own cgroups (the root of its cgroup namespace):
/// cgroup2 where the host's /sys/fs/cgroup is cgroup2; otherwise a tmpfs with one mount per
/// hierarchy the host has under /sys/fs/cgroup (v1 controllers, named hierarchies and a
/// cgroup2 `unified`), read-only when the spec says so.
fn mount_cgroup(target: &Path, flags: MsFlags) -> Result<(), InitError> {
    let none: Option<&str> = None;
    fs::create_dir_all(target).map_err(io_err(format!("creating {}", target.display())))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(io_err("reading mountinfo"))?;
    let mut hierarchies = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(point) = left.split_whitespace().nth(4).map(Path::new) else { continue };
        let mut fields = right.split_whitespace();
        let (fstype, options) = (fields.next().unwrap_or(""), fields.nth(1).unwrap_or(""));
        if point == Path::new("/sys/fs/cgroup") && fstype == "cgroup2" {
            return mount(Some("cgroup2"), target, Some("cgroup2"), flags, none)
                .map_err(mount_err("mounting cgroup2 on", target));
        }
        if point.parent() == Some(Path::new("/sys/fs/cgroup")) && (fstype == "cgroup" || fstype == "cgroup2") {
            let data: Vec<&str> = options.split(',').filter(|o| *o != "rw" && *o != "ro").collect();
            if let Some(name) = point.file_name() {
                hierarchies.push((name.to_os_string(), fstype.to_string(), data.join(",")));
            }
        }
    }
    mount(Some("tmpfs"), target, Some("tmpfs"), flags & !MsFlags::MS_RDONLY, Some("mode=755"))
        .map_err(mount_err("mounting tmpfs on", target))?;
    for (name, fstype, data) in &hierarchies {
        let dir = target.join(name);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let data = if data.is_empty() { None } else { Some(data.as_str()) };
        mount(Some(fstype.as_str()), &dir, Some(fstype.as_str()), flags, data)
            .map_err(mount_err(&format!("mounting {fstype} on"), &dir))?;
    }
    if flags.contains(MsFlags::MS_RDONLY) {
        mount(none, target, none, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags, none)
            .map_err(mount_err("remounting read-only", target))?;
    }
    Ok(())
}

fn create_device(d: &super::spec::DevicePlan, target: &Path) -> Result<(), InitError> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    }
    let _ = fs::remove_file(target);
    match mknod(target, d.kind, Mode::from_bits_truncate(d.mode), makedev(d.major, d.minor)) {
        Ok(()) => {
            nix::unistd::chown(target, Some(Uid::from_raw(d.uid)), Some(Gid::from_raw(d.gid)))
                .map_err(mount_err("changing owner of", target))?;
        }
        // In a user namespace device nodes cannot be created; bind the host's node instead.
        Err(nix::Error::EPERM) => {
            fs::File::create(target).map_err(io_err(format!("creating {}", target.display())))?;
            let none: Option<&str> = None;
            mount(Some(&d.path), target, none, MsFlags::MS_BIND, none).map_err(mount_err("binding device", target))?;
        }
        Err(e) => return Err(sys_err(format!("creating device {}", target.display()))(e)),
    }
    let _ = fs::set_permissions(target, fs::Permissions::from_mode(d.mode));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b/c\\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/short\\04"), "/short\\04");
        assert_eq!(unescape_mountinfo("/big\\777"), "/big\\777", "not a byte: kept as written");
    }

    #[test]
    fn secure_join_keeps_symlinks_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("real")).unwrap();
        symlink("/real", root.path().join("abs")).unwrap();
        symlink("../../../etc", root.path().join("escape")).unwrap();
        assert_eq!(secure_join(root.path(), Path::new("/abs/x")).unwrap(), root.path().join("real/x"));
        assert_eq!(secure_join(root.path(), Path::new("/escape/passwd")).unwrap(), root.path().join("etc/passwd"));
        assert_eq!(secure_join(root.path(), Path::new("/../../proc")).unwrap(), root.path().join("proc"));
    }
}
