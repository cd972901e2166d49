//! Kernel block-device uevents from a `NETLINK_KOBJECT_UEVENT` socket. This works without
//! udevd: the kernel multicasts every uevent to group 1, and we read only block ones.

use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::os::fd::{AsRawFd, OwnedFd};

/// The kernel's multicast group (udevd re-broadcasts on group 2; we do not need it).
const KERNEL_GROUP: u32 = 1;
const RECEIVE_BUFFER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Add,
    Remove,
    Change,
}

/// One block-device uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEvent {
    pub action: Action,
    /// `sdb`, `loop3p1`.
    pub devname: String,
    /// `disk` or `partition`.
    pub devtype: String,
}

/// Parse a kernel uevent datagram: `ACTION@DEVPATH\0KEY=VALUE\0...`. Returns `None` for
/// anything but add/remove/change of a block device.
pub fn parse(datagram: &[u8]) -> Option<BlockEvent> {
    let mut fields = datagram
        .split(|b| *b == 0)
        .filter_map(|f| std::str::from_utf8(f).ok());
    let header = fields.next()?;
    if !header.contains('@') {
        return None; // udevd's "libudev" messages, should one ever arrive
    }
    let (mut action, mut subsystem, mut devname, mut devtype) = (None, None, None, String::new());
    for field in fields {
        match field.split_once('=') {
            Some(("ACTION", v)) => action = Some(v),
            Some(("SUBSYSTEM", v)) => subsystem = Some(v),
            Some(("DEVNAME", v)) => devname = Some(v),
            Some(("DEVTYPE", v)) => devtype = v.to_string(),
            _ => {}
        }
    }
    if subsystem != Some("block") {
        return None;
    }
    let action = match action? {
        "add" => Action::Add,
        "remove" => Action::Remove,
        "change" => Action::Change,
        _ => return None,
    };
    let devname = devname?.trim_start_matches("/dev/").to_string();
    Some(BlockEvent {
        action,
        devname,
        devtype,
    })
}

/// A bound uevent socket.
pub struct UeventSocket {
    fd: OwnedFd,
}

impl UeventSocket {
    pub fn open() -> nix::Result<UeventSocket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // A node booting with 60 disks sends thousands of events at once; a bigger buffer
        // means fewer ENOBUFS (which we survive, but by rescanning everything).
        let _ =
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &RECEIVE_BUFFER);
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        Ok(UeventSocket { fd })
    }

    /// Block until the next block-device event; other uevents are skipped.
    pub fn next(&self) -> nix::Result<BlockEvent> {
        // Kernel uevents are at most 8 KiB (UEVENT_BUFFER_SIZE would be 2 KiB of env).
        let mut buf = vec![0u8; 8192];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if let Some(event) = buf.get(..n).and_then(parse) {
                return Ok(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(fields: &[&str]) -> Vec<u8> {
        fields.join("\0").into_bytes()
    }

    #[test]
    fn parses_block_add() {
        let d = datagram(&[
            "add@/devices/virtual/block/loop3/loop3p1",
            "ACTION=add",
            "DEVPATH=/devices/virtual/block/loop3/loop3p1",
            "SUBSYSTEM=block",
            "DEVNAME=loop3p1",
            "DEVTYPE=partition",
            "SEQNUM=4242",
        ]);
        let e = parse(&d).unwrap();
        assert_eq!(
            e,
            BlockEvent {
                action: Action::Add,
                devname: "loop3p1".into(),
                devtype: "partition".into()
            }
        );
    }

    #[test]
    fn ignores_other_subsystems_and_actions() {
        let net = datagram(&[
            "add@/devices/net/x",
            "ACTION=add",
            "SUBSYSTEM=net",
            "DEVNAME=x",
        ]);
        assert_eq!(parse(&net), None);
        let bind = datagram(&[
            "bind@/devices/x",
            "ACTION=bind",
            "SUBSYSTEM=block",
            "DEVNAME=sda",
        ]);
        assert_eq!(parse(&bind), None);
    }

    #[test]
    fn ignores_udev_rebroadcasts() {
        let mut d = b"libudev\0\xfe\xed\xca\xfe".to_vec();
        d.extend_from_slice(b"\0ACTION=add\0SUBSYSTEM=block\0DEVNAME=sda");
        assert_eq!(parse(&d), None);
    }

    #[test]
    fn remove_and_change_are_kept() {
        let r = datagram(&[
            "remove@/x",
            "ACTION=remove",
            "SUBSYSTEM=block",
            "DEVNAME=/dev/sdc",
            "DEVTYPE=disk",
        ]);
        assert_eq!(
            parse(&r).map(|e| (e.action, e.devname)),
            Some((Action::Remove, "sdc".to_string()))
        );
        let c = datagram(&[
            "change@/x",
            "ACTION=change",
            "SUBSYSTEM=block",
            "DEVNAME=loop0",
            "DEVTYPE=disk",
        ]);
        assert_eq!(parse(&c).map(|e| e.action), Some(Action::Change));
    }
}
