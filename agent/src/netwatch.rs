//! Local network changes, as the kernel announces them over rtnetlink: a link going up or
//! down, an address added or removed, a route changed. The link to the hub uses them to
//! reconnect at once when the network comes back (cable, Wi-Fi, a cellular modem) instead of
//! sleeping out its backoff, which may have grown to 30 s during a long outage.
//!
//! It only counts events; what changed does not matter to the caller. It never fails the
//! agent: without netlink (another OS, a sandbox) the count simply never moves.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket};
use tokio::sync::watch;
use tracing::{debug, warn};

// rtnetlink multicast groups (linux/rtnetlink.h).
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

/// Starts watching on a small thread of its own (blocked in `recv` between events); the
/// receiver's value counts the network changes seen so far.
pub fn spawn() -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    let fd = match open() {
        Ok(fd) => fd,
        Err(e) => {
            debug!(error = %e, "no network change notifications; reconnects follow the backoff only");
            return rx;
        }
    };
    let watcher = move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                // ENOBUFS: events were dropped; something changed all the same.
                Ok(_) | Err(Errno::ENOBUFS) => {
                    debug!("local network changed");
                    tx.send_modify(|n| *n += 1);
                    if tx.is_closed() {
                        return;
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    warn!(error = %e, "network change watch stopped");
                    return;
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("netwatch".into()).stack_size(64 << 10).spawn(watcher) {
        warn!(error = %e, "cannot start the network change watch");
    }
    rx
}

fn open() -> nix::Result<OwnedFd> {
    let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
    let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    /// A veth pair created (no addresses, no traffic) and deleted again is seen as a change.
    /// Needs root and `ip`; skipped (with the reason) elsewhere unless CI is set.
    #[tokio::test]
    async fn sees_a_link_appear() {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
        let ip = std::process::Command::new("ip").arg("-V").output().is_ok();
        if !(root && ip) {
            assert!(std::env::var_os("CI").is_none(), "needs root and iproute2 in CI");
            eprintln!("skipping: needs root and iproute2");
            return;
        }
        let name = format!("fltnw{}", std::process::id() % 100_000);
        let mut rx = super::spawn();
        let before = *rx.borrow_and_update();
        let ok = std::process::Command::new("ip")
            .args(["link", "add", &name, "type", "veth", "peer", "name", &format!("{name}p")])
            .status()
            .unwrap();
        assert!(ok.success());
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed()).await;
        let _ = std::process::Command::new("ip").args(["link", "del", &name]).status();
        assert!(seen.is_ok(), "no netlink event within 5 s");
        assert!(*rx.borrow() > before);
    }
}
