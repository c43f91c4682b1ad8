//! Whole IP packets with correct checksums, for [`crate::traffic::raw`]: UDP datagrams with
//! any source address (spoofed ones included) and ICMP errors with chosen outer addresses;
//! and Ethernet frames of link plumbing (ARP, neighbour discovery) for
//! [`crate::traffic::frames`].
//! IPv4 headers carry no options, TTL/hop limit 64, no DF; the kernel fills in a zero IPv4
//! id on a raw send.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Largest ICMPv4 error (RFC 1812 4.3.2.3): outer header, ICMP header and quote.
const ICMPV4_ERROR_MAX: usize = 576;
/// Largest ICMPv6 error (RFC 4443 2.4 (c)): the IPv6 minimum MTU.
const ICMPV6_ERROR_MAX: usize = 1280;

/// The internet checksum (RFC 1071) of `chunks` as one byte string: ones' complement of the
/// ones' complement sum of its 16-bit words. Checking a whole header that carries its
/// checksum yields 0.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for chunk in chunks {
        for &b in *chunk {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (no options) with its checksum, then `payload`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("IPv4 packet over 65535 bytes");
    let mut p = vec![0x45, 0];
    p.extend(total.to_be_bytes());
    p.extend([0, 0, 0, 0, 64, proto, 0, 0]);
    p.extend(src.octets());
    p.extend(dst.octets());
    let sum = checksum(&[&p]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend(payload);
    p
}

/// An IPv6 header with next header `next`, then `payload`.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("IPv6 payload over 65535 bytes");
    let mut p = vec![0x60, 0, 0, 0];
    p.extend(len.to_be_bytes());
    p.extend([next, 64]);
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(payload);
    p
}

/// The IPv6 pseudo-header of upper-layer checksums (RFC 8200 8.1).
fn ipv6_pseudo(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend(src.octets());
    h.extend(dst.octets());
    h.extend((len as u32).to_be_bytes());
    h.extend([0, 0, 0, next]);
    h
}

/// A UDP header and `payload` with the checksum over `pseudo` (0 sent as 0xffff).
fn udp(pseudo: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("UDP datagram over 65535 bytes");
    let mut u = Vec::with_capacity(len as usize);
    u.extend(sport.to_be_bytes());
    u.extend(dport.to_be_bytes());
    u.extend(len.to_be_bytes());
    u.extend([0, 0]);
    u.extend(payload);
    let sum = match checksum(&[pseudo, &u]) {
        0 => 0xffff,
        s => s,
    };
    u[6..8].copy_from_slice(&sum.to_be_bytes());
    u
}

/// An IPv4 UDP datagram from `src:sport` to `dst:dport`.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, 17]);
    pseudo.extend(((8 + payload.len()) as u16).to_be_bytes());
    ipv4(src, dst, 17, &udp(&pseudo, sport, dport, payload))
}

/// An IPv6 UDP datagram from `[src]:sport` to `[dst]:dport`.
pub fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let pseudo = ipv6_pseudo(src, dst, 17, 8 + payload.len());
    ipv6(src, dst, 17, &udp(&pseudo, sport, dport, payload))
}

/// An ICMPv4 error (e.g. type 3 code 3, port unreachable; type 11, time exceeded) from
/// `outer_src` to `outer_dst`, quoting `quoted`: the offending IPv4 packet, of which a router
/// sends at least the header and 8 bytes (28+). Quotes are cut so the error stays within 576
/// bytes, as routers do. The 4 bytes after the checksum (unused, or the next-hop MTU of
/// "fragmentation needed") are zero.
pub fn icmpv4_error(
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    quoted: &[u8],
) -> Vec<u8> {
    let quoted = &quoted[..quoted.len().min(ICMPV4_ERROR_MAX - 28)];
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    icmp.extend(quoted);
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv4(outer_src, outer_dst, 1, &icmp)
}

/// An ICMPv6 error (e.g. type 1 code 4, port unreachable; type 3, time exceeded) from
/// `outer_src` to `outer_dst`, quoting as much of `quoted` (the offending IPv6 packet) as
/// fits in 1280 bytes. The checksum covers the IPv6 pseudo-header. The 4 bytes after the
/// checksum (unused, the MTU of "packet too big", the pointer of "parameter problem") are
/// zero.
pub fn icmpv6_error(
    outer_src: Ipv6Addr,
    outer_dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    quoted: &[u8],
) -> Vec<u8> {
    let quoted = &quoted[..quoted.len().min(ICMPV6_ERROR_MAX - 48)];
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    icmp.extend(quoted);
    let pseudo = ipv6_pseudo(outer_src, outer_dst, 58, icmp.len());
    let sum = checksum(&[&pseudo, &icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv6(outer_src, outer_dst, 58, &icmp)
}

/// An Ethernet frame from `src_mac` to `dst_mac` carrying `payload` as `ethertype`.
pub fn ethernet(dst_mac: [u8; 6], src_mac: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend(dst_mac);
    f.extend(src_mac);
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

/// An ARP reply (RFC 826) as an Ethernet frame to `target_mac`: "`sender_ip` is at
/// `sender_mac`", sent from `sender_mac`.
pub fn arp_reply(
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    // Ethernet, IPv4, address lengths 6 and 4, operation 2 (reply).
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 2];
    arp.extend(sender_mac);
    arp.extend(sender_ip.octets());
    arp.extend(target_mac);
    arp.extend(target_ip.octets());
    ethernet(target_mac, sender_mac, 0x0806, &arp)
}

/// An ICMPv6 message of `icmp_type` (code 0) with `body` after the checksum, from `src` to
/// all nodes (ff02::1) with hop limit 255, as neighbour discovery sends it, in an Ethernet
/// frame from `mac` (RFC 4861).
fn neighbour_discovery(mac: [u8; 6], src: Ipv6Addr, icmp_type: u8, body: &[u8]) -> Vec<u8> {
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![icmp_type, 0, 0, 0];
    icmp.extend(body);
    let pseudo = ipv6_pseudo(src, dst, 58, icmp.len());
    let sum = checksum(&[&pseudo, &icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = ipv6(src, dst, 58, &icmp);
    ip[7] = 255;
    ethernet([0x33, 0x33, 0, 0, 0, 1], mac, 0x86dd, &ip)
}

/// An unsolicited neighbour advertisement with the override flag: "`target` is at `mac`"
/// (the target link-layer address option), from `src`.
pub fn neighbour_advertisement(mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    // Flags: override; reserved.
    let mut body = vec![0x20, 0, 0, 0];
    body.extend(target.octets());
    // Option 2 (target link-layer address), 1 unit of 8 bytes.
    body.extend([2, 1]);
    body.extend(mac);
    neighbour_discovery(mac, src, 136, &body)
}

/// A router advertisement from `src`: a default router for 30 minutes, at `mac` (the source
/// link-layer address option).
pub fn router_advertisement(mac: [u8; 6], src: Ipv6Addr) -> Vec<u8> {
    // Hop limit 64, no flags, router lifetime 1800 s, reachable time and retransmit timer
    // unspecified.
    let mut body = vec![64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    // Option 1 (source link-layer address).
    body.extend([1, 1]);
    body.extend(mac);
    neighbour_discovery(mac, src, 134, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
    const B4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
    const A6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 10);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 11);

    /// RFC 1071's worked example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    #[test]
    fn checksum_rfc1071_example() {
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03], &[0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
        // Odd lengths pad with a zero byte, also across chunks.
        assert_eq!(
            checksum(&[&[0x01], &[0x02, 0x03]]),
            checksum(&[&[0x01, 0x02, 0x03, 0]])
        );
    }

    /// A known datagram: 10.1.0.10:1234 -> 10.1.0.11:80, "hi".
    #[test]
    fn ipv4_udp_fields_and_checksums() {
        let p = ipv4_udp(A4, B4, 1234, 80, b"hi");
        assert_eq!(p.len(), 30);
        assert_eq!(&p[..4], &[0x45, 0, 0, 30]);
        assert_eq!(p[9], 17);
        assert_eq!(checksum(&[&p[..20]]), 0, "IPv4 header checksum");
        let mut pseudo = Vec::new();
        pseudo.extend(A4.octets());
        pseudo.extend(B4.octets());
        pseudo.extend([0, 17, 0, 10]);
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "UDP checksum");
        assert_eq!(&p[20..28], &[0x04, 0xd2, 0, 80, 0, 10, p[26], p[27]]);
    }

    #[test]
    fn ipv6_udp_checksum_covers_pseudo_header() {
        let p = ipv6_udp(A6, B6, 1234, 80, b"hello");
        assert_eq!(p.len(), 40 + 13);
        assert_eq!(&p[4..8], &[0, 13, 17, 64]);
        let pseudo = ipv6_pseudo(A6, B6, 17, 13);
        assert_eq!(checksum(&[&pseudo, &p[40..]]), 0);
        assert_ne!(&p[46..48], &[0, 0]);
    }

    #[test]
    fn icmp_errors_quote_and_checksum() {
        let inner = ipv4_udp(B4, A4, 80, 1234, &[7; 1000]);
        let e = icmpv4_error(Ipv4Addr::new(10, 1, 0, 1), B4, 3, 3, &inner);
        assert_eq!(e.len(), 576);
        assert_eq!(&e[20..22], &[3, 3]);
        assert_eq!(checksum(&[&e[..20]]), 0);
        assert_eq!(checksum(&[&e[20..]]), 0);
        assert_eq!(&e[28..48], &inner[..20]);

        let inner6 = ipv6_udp(B6, A6, 80, 1234, &[7; 2000]);
        let e6 = icmpv6_error(A6, B6, 1, 4, &inner6);
        assert_eq!(e6.len(), 1280);
        assert_eq!(e6[6], 58);
        let pseudo = ipv6_pseudo(A6, B6, 58, 1240);
        assert_eq!(checksum(&[&pseudo, &e6[40..]]), 0);
        assert_eq!(&e6[48..88], &inner6[..40]);
    }
}
