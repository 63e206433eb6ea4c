//! The container executor: OCI runtime bundles run under Linux namespaces and cgroups, written
//! directly on `nix`/`libc` (no libcontainer) so that every step is ours to measure and trim.
//! It owns the runtime state root (`<root>/<id>/`), the containers' cgroups and mount
//! namespaces, and the per-container supervisor (shim) that outlives its caller. It must
//! never clone from a multi-threaded process, never honour a spec field it does not
//! implement (it refuses a known field by name; unknown properties are ignored with a
//! warning, as the runtime spec requires), and never leave cgroups, mounts or state behind after
//! a delete. `unsafe` lives in `sys.rs` only.
//!
//! - [`spec`]: the generated default spec and bundle loading into a checked plan.
//! - [`runtime`]: create/start/state/kill/delete/run with runc's semantics.
//! - [`cgroup`]: `CgroupManager` with v1 and v2 backends.
//! - [`exec`]: a further process in a running container (exec probes, `oci exec`).
//! - [`hooks`]: the OCI lifecycle hooks: which stage runs where, and running one.
//! - `privileges`: the privilege drop of a container's processes, once for init and exec.
//! - [`seccomp`]: OCI seccomp to classic BPF, and the default profile.
//! - [`shim`]: the supervisor process and the agent's handle on it.
//! - [`overlay`]: overlayfs rootfs mount helpers.
//! - [`tty`]: pseudo-terminals, window sizes and raw mode for `exec -t`.

pub mod cgroup;
pub mod exec;
pub mod hooks;
mod init;
pub mod netns;
pub mod overlay;
mod privileges;
pub mod runtime;
pub mod seccomp;
pub mod shim;
pub mod spec;
mod sys;
mod syscalls;
pub mod tty;

pub use cgroup::{AnyCgroupManager, CgroupConfig, CgroupError, CgroupManager, CgroupVersion, Resources, Stats};
pub use exec::{ExecError, ExecOutcome, ExecRequest, ExecStatus, exec};
/// Signals as the runtime API takes them.
pub use nix::sys::signal::{SigSet, Signal};
pub use overlay::{OverlayError, is_mountpoint, mount_overlay, unmount};
pub use runtime::{
    ContainerError, ContainerRecord, CreateOptions, Created, ExitInfo, NetworkHook, NetworkHookError, OciState,
    Runtime, RuntimeConfig, Status, signal_process,
};
pub use shim::{ShimError, ShimHandle, ShimOptions, run_shim};
pub use spec::{
    BindMount, NetworkMode, Plan, SpecError, SpecInputs, default_spec, load_bundle, resources_from_json,
    resources_from_spec,
};
