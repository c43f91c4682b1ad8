//! The node's network interfaces and addresses, read with one rtnetlink dump each from the
//! calling thread's network namespace. (sysfs would show the namespace of whoever mounted
//! it, not ours, and the agent must not depend on iproute2 being installed.)

use std::{io, net::IpAddr, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: `veth`, `bridge`, `dummy`, `vxlan`... (`None` for plain devices).
    pub kind: Option<String>,
    pub loopback: bool,
}

/// One address of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFF_LOOPBACK: u32 = 0x8;
/// `struct ifinfomsg` and `struct ifaddrmsg` sizes.
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Sends one dump request and collects the payloads of its answers of type `reply`.
fn dump(request: u16, family: u8, body_len: usize, reply: u16) -> io::Result<Vec<Vec<u8>>> {
    // SAFETY: plain socket call; the descriptor is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = NLMSG_HDRLEN + body_len;
    let mut msg = vec![0u8; len];
    msg[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&request.to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    msg[NLMSG_HDRLEN] = family;
    // SAFETY: valid buffer for the duration of the call.
    let sent = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: valid buffer for the duration of the call.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let data = &buf[..n as usize];
        let mut off = 0;
        while off + NLMSG_HDRLEN <= data.len() {
            let len = u32::from_ne_bytes(data[off..off + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(data[off + 4..off + 6].try_into().expect("2 bytes"));
            if len < NLMSG_HDRLEN || off + len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(
                        data[off + NLMSG_HDRLEN..off + NLMSG_HDRLEN + 4]
                            .try_into()
                            .expect("4 bytes"),
                    );
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                k if k == reply => out.push(data[off + NLMSG_HDRLEN..off + len].to_vec()),
                _ => {}
            }
            off += align4(len);
        }
    }
}

/// The attributes after a fixed header: (type, payload).
fn attributes(data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= data.len() {
        let len = u16::from_ne_bytes([data[off], data[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([data[off + 2], data[off + 3]]) & 0x3fff;
        if len < 4 || off + len > data.len() {
            break;
        }
        out.push((kind, &data[off + 4..off + len]));
        off += align4(len);
    }
    out
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Every interface of this thread's network namespace.
pub fn links() -> io::Result<Vec<Link>> {
    let mut out = Vec::new();
    for msg in dump(
        RTM_GETLINK,
        libc::AF_UNSPEC as u8,
        IFINFOMSG_LEN,
        RTM_NEWLINK,
    )? {
        if msg.len() < IFINFOMSG_LEN {
            continue;
        }
        let index = i32::from_ne_bytes(msg[4..8].try_into().expect("4 bytes")) as u32;
        let flags = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes"));
        let mut link = Link {
            index,
            name: String::new(),
            kind: None,
            loopback: flags & IFF_LOOPBACK != 0,
        };
        for (kind, value) in attributes(&msg[IFINFOMSG_LEN..]) {
            match kind {
                IFLA_IFNAME => link.name = c_string(value),
                IFLA_LINKINFO => {
                    link.kind = attributes(value)
                        .into_iter()
                        .find(|(k, _)| *k == IFLA_INFO_KIND)
                        .map(|(_, v)| c_string(v));
                }
                _ => {}
            }
        }
        out.push(link);
    }
    Ok(out)
}

/// Every address of every interface of this thread's network namespace.
pub fn addresses() -> io::Result<Vec<Address>> {
    let mut out = Vec::new();
    for msg in dump(
        RTM_GETADDR,
        libc::AF_UNSPEC as u8,
        IFADDRMSG_LEN,
        RTM_NEWADDR,
    )? {
        if msg.len() < IFADDRMSG_LEN {
            continue;
        }
        let family = msg[0] as i32;
        let index = u32::from_ne_bytes(msg[4..8].try_into().expect("4 bytes"));
        let (mut local, mut address) = (None, None);
        for (kind, value) in attributes(&msg[IFADDRMSG_LEN..]) {
            let ip = match (family, value.len()) {
                (libc::AF_INET, 4) => IpAddr::from(<[u8; 4]>::try_from(value).expect("4 bytes")),
                (libc::AF_INET6, 16) => {
                    IpAddr::from(<[u8; 16]>::try_from(value).expect("16 bytes"))
                }
                _ => continue,
            };
            match kind {
                IFA_LOCAL => local = Some(ip),
                IFA_ADDRESS => address = Some(ip),
                _ => {}
            }
        }
        // IFA_LOCAL is the interface's own address where it differs (point-to-point).
        if let Some(ip) = local.or(address) {
            out.push(Address { index, ip });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_interface_and_its_address_are_listed() {
        let links = links().expect("dump links");
        let lo = links
            .iter()
            .find(|l| l.loopback)
            .expect("a loopback device");
        assert_eq!(lo.name, "lo");
        let addresses = addresses().expect("dump addresses");
        assert!(
            addresses
                .iter()
                .any(|a| a.index == lo.index && a.ip == IpAddr::from([127, 0, 0, 1])),
            "{addresses:?}"
        );
    }
}
