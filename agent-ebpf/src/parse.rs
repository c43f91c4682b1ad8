//! Bounds-checked header parsing: IPv4 (with options), IPv6 (extension headers, bounded),
//! TCP, UDP, ICMP, ICMPv6, and the packet quoted inside ICMP errors.
//!
//! A read is direct from the linear part of the packet when it lies there, checked against
//! `data_end` (no helper call); otherwise it goes through `bpf_skb_load_bytes`, which reads
//! paged data too and fails instead of reading past the packet. Either way a truncated
//! header is an error, never a wrong value.

use agent_common::{
    FAMILY_IPV4, FAMILY_IPV6, MAX_IPV6_EXT_HEADERS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use core::mem::MaybeUninit;

use aya_ebpf::programs::sk_buff::SkBuff;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

/// Why a packet could not be parsed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// ARP: link plumbing.
    Arp,
    /// Neither IP nor ARP (LLDP...).
    NonIp,
    /// A VLAN tag still in the frame after the kernel took the outer one off (it does so
    /// before any hook): tags in tags.
    Stacked,
    /// A header runs past the end of the packet.
    Truncated,
    /// A header field is impossible (version, header length).
    BadHeader,
    /// More IPv6 extension headers than `MAX_IPV6_EXT_HEADERS`.
    Ipv6ExtUnparsed,
}

/// What kind of packet this is, as far as policy is concerned.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// TCP, UDP, ICMP echo or any other protocol: a flow of its own (0: what
    /// `Packet::empty_in` leaves).
    Flow = 0,
    /// An ICMP error quoting a packet: `related` holds the flow it belongs to.
    IcmpError,
    /// IPv6 neighbour discovery or MLD: link plumbing, always passes.
    LinkControl,
    /// A fragment after the first: no L4 header, ports come from the first fragment.
    LaterFragment,
}

/// The 5-tuple of a packet (or of the flow an ICMP error relates to).
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order. ICMP echo: both hold the identifier. Other ICMP: 0.
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// ICMP echo: which end sent the request (`ECHO_FROM_SRC`, `ECHO_FROM_DST`); 0 else.
    pub echo: u8,
}

/// `Tuple::echo`: a request, sent by its source; a reply, to the request's sender. The
/// same values as `echo_end::LOCAL` and `REMOTE` for a packet leaving the workload.
pub const ECHO_FROM_SRC: u8 = agent_common::echo_end::LOCAL;
pub const ECHO_FROM_DST: u8 = agent_common::echo_end::REMOTE;
const _: () = assert!(ECHO_FROM_SRC == 1 && ECHO_FROM_DST == 2);

/// `Tuple::echo` of the tuple turned around (source and destination swapped): 1 and 2
/// swap, 0 stays.
#[inline(always)]
pub fn turned_around(echo: u8) -> u8 {
    ((echo & 1) << 1) | ((echo >> 1) & 1)
}

impl Tuple {
    const EMPTY: Tuple = Tuple {
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        proto: 0,
        echo: 0,
    };
}

/// A parsed packet. Aligned for `Packet::empty_in`.
#[repr(C, align(8))]
pub struct Packet {
    pub family: u8,
    pub kind: Kind,
    pub tuple: Tuple,
    /// For `Kind::IcmpError`: the quoted packet's flow, turned around so it reads in the
    /// direction the error travels (as if it were a reply of that flow). For
    /// `Kind::LinkControl`: the ICMPv6 type in `proto`, and a neighbour advertisement's
    /// target in `src` (else zero).
    pub related: Tuple,
    pub tcp_flags: u8,
    /// IP identification, for fragments.
    pub frag_id: u32,
    /// First fragment of a fragmented datagram: its ports are remembered for the rest.
    pub first_fragment: bool,
}

impl Packet {
    /// An empty packet in `place`: every field zero (`Kind::Flow`, empty tuples), written
    /// as 64-bit words. Built from constants, LLVM copies it from read-only data a byte or
    /// two at a time, or makes a `memset` call of it (a BPF-to-BPF call to a byte loop).
    #[inline(always)]
    pub fn empty_in(place: &mut MaybeUninit<Packet>) -> &mut Packet {
        let words = place.as_mut_ptr().cast::<u64>();
        for i in 0..size_of::<Packet>() / 8 {
            // SAFETY: within the packet, which is 8-aligned and a whole number of words
            // (checked below); volatile so the stores stay stores.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
        }
        // SAFETY: every field is an integer, a byte array, a bool or `Kind`, for each of
        // which all-zero bytes are a valid value (`Kind::Flow`, false, empty tuples).
        unsafe { place.assume_init_mut() }
    }
}
const _: () = assert!(size_of::<Packet>().is_multiple_of(8));

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Headers start within this many bytes of the frame's start (Ethernet, IPv6 with its
/// bounded extension headers, an ICMP error's quote): a bound the verifier needs for a
/// direct read at a variable offset.
const MAX_DIRECT_OFFSET: usize = 1024;

/// Reads a `T` at `offset`, which must end by `end`: the end of the IP packet as its own
/// header gives it. The frame may carry more (Ethernet padding, or bytes a hostile pod
/// appends): the kernel trims them before the packet goes on, so ports read there would be
/// ports no receiver sees.
#[inline(always)]
fn load<T>(skb: &SkBuff, offset: u32, end: u32) -> Result<T, ParseError> {
    if offset + size_of::<T>() as u32 > end {
        return Err(ParseError::Truncated);
    }
    // SAFETY: context fields; the read below happens only inside [data, data_end).
    let (start, end) = unsafe { ((*skb.skb).data as usize, (*skb.skb).data_end as usize) };
    let off = offset as usize;
    if off < MAX_DIRECT_OFFSET && start + off + size_of::<T>() <= end {
        // SAFETY: the whole value lies in the linear packet data, checked just above.
        return Ok(unsafe { ((start + off) as *const T).read_unaligned() });
    }
    skb.load::<T>(off).map_err(|_| ParseError::Truncated)
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses the packet whose network header starts at `l3` (14 on a TC/ethernet hook, 0 on a
/// cgroup_skb hook).
#[inline(always)]
pub fn parse(skb: &SkBuff, l3: u32, pkt: &mut Packet) -> Result<(), ParseError> {
    // SAFETY: the context pointer is valid for the whole program run.
    let ethertype = u16::from_be(unsafe { (*skb.skb).protocol } as u16);
    match ethertype {
        ETH_P_IP => parse_ipv4(skb, l3, pkt),
        ETH_P_IPV6 => parse_ipv6(skb, l3, pkt),
        ETH_P_ARP => parse_arp(skb, l3, pkt),
        ETH_P_8021Q | ETH_P_8021AD => Err(ParseError::Stacked),
        _ => Err(ParseError::NonIp),
    }
}

/// ARP, which passes as link plumbing (`ParseError::Arp`). One with 6-byte hardware and
/// 4-byte protocol addresses (all an Ethernet device takes) speaks for its sender's IPv4
/// address, which neighbours then reach at its sender's hardware address: that address goes
/// into the tuple's source, for the check of what a pod may claim. The hardware and
/// protocol types are not looked at: Linux takes IEEE 802 beside Ethernet, and a claim in
/// an ARP packet nobody takes is no loss.
#[inline(always)]
fn parse_arp(skb: &SkBuff, l3: u32, pkt: &mut Packet) -> Result<(), ParseError> {
    // Hardware type, protocol type, their address lengths, operation, sender hardware
    // address, sender protocol address.
    if let Ok(a) = load::<[u8; 18]>(skb, l3, skb.len())
        && a[4] == 6
        && a[5] == 4
    {
        pkt.family = FAMILY_IPV4;
        pkt.tuple.src[..4].copy_from_slice(&a[14..18]);
    }
    Err(ParseError::Arp)
}

#[inline(always)]
fn parse_ipv4(skb: &SkBuff, l3: u32, pkt: &mut Packet) -> Result<(), ParseError> {
    let h: [u8; 20] = load(skb, l3, skb.len())?;
    if h[0] >> 4 != 4 {
        return Err(ParseError::BadHeader);
    }
    let header_len = ((h[0] & 0x0f) as u32) * 4;
    let total_len = be16(&h, 2) as u32;
    if header_len < 20 || total_len < header_len {
        return Err(ParseError::BadHeader);
    }
    if total_len > skb.len().saturating_sub(l3) {
        return Err(ParseError::Truncated);
    }
    pkt.family = FAMILY_IPV4;
    pkt.tuple.proto = h[9];
    pkt.tuple.src[..4].copy_from_slice(&h[12..16]);
    pkt.tuple.dst[..4].copy_from_slice(&h[16..20]);
    let frag = be16(&h, 6);
    pkt.frag_id = be16(&h, 4) as u32;
    if frag & 0x1fff != 0 {
        pkt.kind = Kind::LaterFragment;
        return Ok(());
    }
    pkt.first_fragment = frag & 0x2000 != 0;
    parse_l4(skb, l3 + header_len, l3 + total_len, 0, pkt)
}

#[inline(always)]
fn parse_ipv6(skb: &SkBuff, l3: u32, pkt: &mut Packet) -> Result<(), ParseError> {
    let h: [u8; 40] = load(skb, l3, skb.len())?;
    if h[0] >> 4 != 6 {
        return Err(ParseError::BadHeader);
    }
    let payload_len = be16(&h, 4) as u32;
    // Payload length 0 is a jumbogram (hop-by-hop option): the frame's end is its end.
    if payload_len != 0 && payload_len + 40 > skb.len().saturating_sub(l3) {
        return Err(ParseError::Truncated);
    }
    let end = if payload_len == 0 {
        skb.len()
    } else {
        l3 + 40 + payload_len
    };
    pkt.family = FAMILY_IPV6;
    pkt.tuple.src.copy_from_slice(&h[8..24]);
    pkt.tuple.dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut off = l3 + 40;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let e: [u8; 2] = load(skb, off, end)?;
                next = e[0];
                off += (e[1] as u32 + 1) * 8;
            }
            IPV6_AUTH => {
                let e: [u8; 2] = load(skb, off, end)?;
                next = e[0];
                off += (e[1] as u32 + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let f: [u8; 8] = load(skb, off, end)?;
                next = f[0];
                let offset_flags = be16(&f, 2);
                pkt.frag_id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
                off += 8;
                if offset_flags & 0xfff8 != 0 {
                    pkt.tuple.proto = next;
                    pkt.kind = Kind::LaterFragment;
                    return Ok(());
                }
                pkt.first_fragment = offset_flags & 1 != 0;
            }
            _ => break,
        }
    }
    if matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT
    ) {
        return Err(ParseError::Ipv6ExtUnparsed);
    }
    pkt.tuple.proto = next;
    parse_l4(skb, off, end, h[7], pkt)
}

/// Largest neighbour solicitation or advertisement between global addresses a pod needs:
/// the 24 bytes of the message and room for its options (a link-layer address, a nonce)
/// and some more (`OVERSIZED_NEIGHBOUR_MESSAGE` beyond).
const NEIGHBOUR_MESSAGE_MAX: u32 = 24 + 4 * 8;

/// `end`: the end of the IP packet. `hop_limit`: the IPv6 header's (0 for IPv4).
#[inline(always)]
fn parse_l4(
    skb: &SkBuff,
    off: u32,
    end: u32,
    hop_limit: u8,
    pkt: &mut Packet,
) -> Result<(), ParseError> {
    match pkt.tuple.proto {
        PROTO_TCP => {
            let t: [u8; 14] = load(skb, off, end)?;
            pkt.tuple.src_port = be16(&t, 0);
            pkt.tuple.dst_port = be16(&t, 2);
            pkt.tcp_flags = t[13];
        }
        PROTO_UDP => {
            let u: [u8; 4] = load(skb, off, end)?;
            pkt.tuple.src_port = be16(&u, 0);
            pkt.tuple.dst_port = be16(&u, 2);
        }
        PROTO_ICMP => {
            let i: [u8; 8] = load(skb, off, end)?;
            match i[0] {
                // echo reply, echo request
                0 | 8 => set_echo_id(pkt, be16(&i, 4), i[0] == 8),
                // destination unreachable, source quench, time exceeded, parameter problem
                3 | 4 | 11 | 12 => parse_icmp_error(skb, off + 8, end, FAMILY_IPV4, pkt),
                _ => {}
            }
        }
        PROTO_ICMPV6 => {
            let i: [u8; 8] = load(skb, off, end)?;
            match i[0] {
                128 | 129 => set_echo_id(pkt, be16(&i, 4), i[0] == 128),
                // destination unreachable, packet too big, time exceeded, parameter problem
                1..=4 => parse_icmp_error(skb, off + 8, end, FAMILY_IPV6, pkt),
                // MLD query/report/done, router/neighbour solicitation/advertisement,
                // redirect, MLDv2 report: plumbing of the link only when it stays on it
                // (else any pod could pass anything through as an MLD query).
                130..=137 | 143 if link_scoped(pkt) => link_control(skb, off, end, i[0], pkt),
                // Neighbour solicitations and advertisements also between global addresses
                // (address resolution and reachability checks with a router port or a
                // neighbour on the pod's link), with the hop limit 255 they must carry (a
                // packet routed to the pod has less) and no payload beyond theirs. Router
                // discovery and redirects come from link-local addresses only (RFC 4861).
                // The hop limit proves nothing about a packet leaving the pod, which the
                // node may yet route anywhere: hence the length.
                135 | 136 if hop_limit == 255 && end - off <= NEIGHBOUR_MESSAGE_MAX => {
                    link_control(skb, off, end, i[0], pkt)
                }
                // Longer, a receiver on the link still takes it as neighbour discovery
                // (Linux does not look at the length): plumbing nobody needs that long,
                // which leaving a pod claims too much.
                135 | 136 if hop_limit == 255 => {
                    link_control(skb, off, end, i[0], pkt);
                    pkt.related.proto = OVERSIZED_NEIGHBOUR_MESSAGE;
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// Marks an ICMPv6 message of `icmp_type` at `off` as link plumbing, with what it claims
/// for its sender (`Packet::related`): its type, and a neighbour advertisement's target
/// (the address neighbours then reach at the sender).
#[inline(always)]
fn link_control(skb: &SkBuff, off: u32, end: u32, icmp_type: u8, pkt: &mut Packet) {
    pkt.kind = Kind::LinkControl;
    pkt.related.proto = icmp_type;
    if icmp_type == ICMPV6_NEIGHBOUR_ADVERTISEMENT
        && let Ok(target) = load::<[u8; 16]>(skb, off + 8, end)
    {
        pkt.related.src = target;
    }
}

pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
pub const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
pub const ICMPV6_REDIRECT: u8 = 137;
/// `Packet::related.proto` of a neighbour solicitation or advertisement between global
/// addresses longer than `NEIGHBOUR_MESSAGE_MAX`: no ICMPv6 type.
pub const OVERSIZED_NEIGHBOUR_MESSAGE: u8 = 255;

/// Whether an IPv6 packet stays on its link: addressed to a link-scope multicast group or a
/// link-local address, or sent from a link-local address (never forwarded).
#[inline(always)]
fn link_scoped(pkt: &Packet) -> bool {
    let (src, dst) = (&pkt.tuple.src, &pkt.tuple.dst);
    (dst[0] == 0xff && dst[1] & 0x0f == 0x02) || is_link_local(dst) || is_link_local(src)
}

/// An IPv6 link-local address (fe80::/10).
#[inline(always)]
pub fn is_link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// An echo message's identifier stands for both ports, and which end sent the request goes
/// into the tracking key (`CtKey::echo`): a request and its replies share a key from either
/// end, while a request sent back the way a flow's requests came is a flow of its own (else
/// a pod could ping out past its egress policy on the identifier of a ping it was sent).
#[inline(always)]
fn set_echo_id(pkt: &mut Packet, id: u16, request: bool) {
    pkt.tuple.src_port = id;
    pkt.tuple.dst_port = id;
    pkt.tuple.echo = echo_of(request);
}

#[inline(always)]
fn echo_of(request: bool) -> u8 {
    if request {
        ECHO_FROM_SRC
    } else {
        ECHO_FROM_DST
    }
}

/// Reads the packet quoted by an ICMP error. When the quote is unreadable the error stays a
/// plain ICMP packet of its own (`Kind::Flow`), evaluated like any other.
#[inline(always)]
fn parse_icmp_error(skb: &SkBuff, off: u32, end: u32, family: u8, pkt: &mut Packet) {
    let inner = if family == FAMILY_IPV4 {
        quoted_ipv4(skb, off, end)
    } else {
        quoted_ipv6(skb, off, end)
    };
    if let Ok(quoted) = inner {
        // The quoted packet went the other way: turn it around.
        pkt.related = Tuple {
            src: quoted.dst,
            dst: quoted.src,
            src_port: quoted.dst_port,
            dst_port: quoted.src_port,
            proto: quoted.proto,
            echo: turned_around(quoted.echo),
        };
        pkt.kind = Kind::IcmpError;
    }
}

#[inline(always)]
fn quoted_ipv4(skb: &SkBuff, off: u32, end: u32) -> Result<Tuple, ParseError> {
    let h: [u8; 20] = load(skb, off, end)?;
    let header_len = ((h[0] & 0x0f) as u32) * 4;
    if h[0] >> 4 != 4 || header_len < 20 {
        return Err(ParseError::BadHeader);
    }
    let mut t = Tuple::EMPTY;
    t.proto = h[9];
    t.src[..4].copy_from_slice(&h[12..16]);
    t.dst[..4].copy_from_slice(&h[16..20]);
    quoted_ports(
        skb,
        off + header_len,
        end,
        be16(&h, 6) & 0x1fff != 0,
        PROTO_ICMP,
        &mut t,
    )?;
    Ok(t)
}

#[inline(always)]
fn quoted_ipv6(skb: &SkBuff, off: u32, end: u32) -> Result<Tuple, ParseError> {
    let h: [u8; 40] = load(skb, off, end)?;
    if h[0] >> 4 != 6 {
        return Err(ParseError::BadHeader);
    }
    let mut t = Tuple::EMPTY;
    t.proto = h[6];
    t.src.copy_from_slice(&h[8..24]);
    t.dst.copy_from_slice(&h[24..40]);
    quoted_ports(skb, off + 40, end, false, PROTO_ICMPV6, &mut t)?;
    Ok(t)
}

/// Ports of a quoted packet: TCP/UDP ports, or the echo identifier of a quoted echo request.
#[inline(always)]
fn quoted_ports(
    skb: &SkBuff,
    off: u32,
    end: u32,
    later_fragment: bool,
    icmp: u8,
    t: &mut Tuple,
) -> Result<(), ParseError> {
    if later_fragment {
        return Ok(());
    }
    if t.proto == PROTO_TCP || t.proto == PROTO_UDP {
        let p: [u8; 4] = load(skb, off, end)?;
        t.src_port = be16(&p, 0);
        t.dst_port = be16(&p, 2);
    } else if t.proto == icmp {
        let i: [u8; 8] = load(skb, off, end)?;
        let (request, reply) = if icmp == PROTO_ICMP {
            (8, 0)
        } else {
            (128, 129)
        };
        if i[0] == request || i[0] == reply {
            t.src_port = be16(&i, 4);
            t.dst_port = t.src_port;
            t.echo = echo_of(i[0] == request);
        }
    }
    Ok(())
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// An IPv4 address as a socket holds it: its `*_ip4` field, or the last word of a
/// v4-mapped IPv6 address (`::ffff:a.b.c.d`) on a dual-stack socket.
#[inline(always)]
fn socket_v4(family: u32, ip4: u32, ip6: &[u32; 4]) -> Option<u32> {
    if family == AF_INET {
        Some(ip4)
    } else if family == AF_INET6 && ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffffu32.to_be() {
        Some(ip6[3])
    } else {
        None
    }
}

/// The socket of a packet at a cgroup hook, if it has one: a readable `bpf_sock` (its
/// common part; the full socket, so a listener for its SYN-ACKs).
#[inline(always)]
fn socket_of(skb: &SkBuff) -> Option<*mut aya_ebpf::bindings::bpf_sock> {
    // SAFETY: context field read; the kernel gives a socket pointer or null.
    let sk = unsafe { (*skb.skb).__bindgen_anon_2.sk };
    (!sk.is_null()).then_some(sk)
}

/// One side of a socket as the packet's 16-byte address field holds it (IPv4 in the first
/// four bytes; a v4-mapped address of a dual-stack socket taken as IPv4), if the socket
/// has that family.
///
/// # Safety
/// `ip4` and `ip6` are fields of a readable `bpf_sock`.
#[inline(always)]
unsafe fn socket_addr(family: u32, pkt_family: u8, ip4: &u32, ip6: &[u32; 4]) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    if pkt_family == FAMILY_IPV4 {
        // SAFETY: as the caller promises.
        let (v4, v6) = unsafe { (core::ptr::read_volatile(ip4), read_ip6(ip6)) };
        let v4 = socket_v4(family, v4, &v6)?;
        out[..4].copy_from_slice(&v4.to_ne_bytes());
    } else {
        if family != AF_INET6 {
            return None;
        }
        // SAFETY: as the caller promises.
        let v6 = unsafe { read_ip6(ip6) };
        for i in 0..4 {
            out[i * 4..i * 4 + 4].copy_from_slice(&v6[i].to_ne_bytes());
        }
    }
    Some(out)
}

/// At a host-network pod's cgroup egress hook, the socket's own port when the packet
/// leaves from another address or port than its socket's (past the node's netfilter: an
/// answer as the backend of a ClusterIP or NodePort has the Service's address or port
/// again) or from a socket without a peer (a listener's SYN-ACK, an unconnected UDP
/// socket's answer), which names no flow. 0 when the socket and the packet agree. It names
/// the flow the packet may answer; only a tracked one makes it a reply.
#[inline(always)]
pub fn socket_answer_port(skb: &SkBuff, pkt: &Packet) -> u16 {
    let Some(sk) = socket_of(skb) else {
        return 0;
    };
    // SAFETY: a readable `bpf_sock`; each field read once, volatile so LLVM keeps the
    // access sizes the verifier allows.
    let (family, src_port, dst_port) = unsafe {
        (
            core::ptr::read_volatile(&(*sk).family),
            core::ptr::read_volatile(&(*sk).src_port) as u16,
            core::ptr::read_volatile(&(*sk).dst_port),
        )
    };
    if src_port == 0 || dst_port == 0 || src_port != pkt.tuple.src_port {
        return src_port;
    }
    // SAFETY: as above.
    match unsafe { socket_addr(family, pkt.family, &(*sk).src_ip4, &(*sk).src_ip6) } {
        Some(src) if src == pkt.tuple.src => 0,
        _ => src_port,
    }
}

/// At a host-network pod's cgroup ingress hook, whether the packet comes from the very
/// address and port its socket is connected to: the answer to a call the pod made, which
/// the node's netfilter DNATed on the way out (so the call was tracked with the backend's
/// address) and turns back into the address called on the way in.
#[inline(always)]
pub fn socket_called_source(skb: &SkBuff, pkt: &Packet) -> bool {
    let Some(sk) = socket_of(skb) else {
        return false;
    };
    // SAFETY: a readable `bpf_sock`, as in `socket_answer_port`.
    let (family, dst_port) = unsafe {
        (
            core::ptr::read_volatile(&(*sk).family),
            u16::from_be(core::ptr::read_volatile(&(*sk).dst_port)),
        )
    };
    if dst_port == 0 || dst_port != pkt.tuple.src_port {
        return false;
    }
    // SAFETY: as above.
    unsafe { socket_addr(family, pkt.family, &(*sk).dst_ip4, &(*sk).dst_ip6) }
        .is_some_and(|dst| dst == pkt.tuple.src)
}

/// # Safety
/// `words` points into a readable `bpf_sock`.
#[inline(always)]
unsafe fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: as the caller promises; one 32-bit load per word, as the verifier allows.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}
