//! The fast path: a packet of a TCP or UDP flow that connection tracking already holds,
//! whose cached decision stands: it moves the flow's state (a SYN-ACK, a FIN, a RST) as the
//! general pipeline would, but a bare SYN, which may open a closed connection again, is
//! left to that pipeline. Most packets are such, and
//! the general pipeline (a `Packet` built field by field, fragments, DNS, ICMP errors, the
//! 44-byte key copied a byte at a time) costs them more than the lookup itself.
//!
//! Anything else falls through to the general pipeline, which decides it exactly as before:
//! this path only ever takes a packet the general one would pass with the same counts.

use agent_common::{
    CtEntry, CtKey, DIR_EGRESS, DNS_PORT, FAMILY_IPV4, FAMILY_IPV6, FlowCounterKey, PROTO_TCP,
    PROTO_UDP, VERDICT_DROPPED, WorkloadConfig, workload_flags,
};
use core::mem::MaybeUninit;

use aya_ebpf::programs::sk_buff::SkBuff;

use crate::{
    CONFIG, CONNTRACK, conntrack, counters, now_ns,
    parse::{self, Packet},
};

/// `__sk_buff::protocol`: the ethertype in network order.
const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86DDu16.to_be() as u32;
/// Version 4, header length 5 words: no options.
const IPV4_NO_OPTIONS: u8 = 0x45;

/// Reads a `T` at `offset` of the linear packet data if all of it lies there.
///
/// The read is aligned in Rust's terms but the packet may place `T` anywhere: the verifier
/// allows unaligned packet reads on architectures with efficient unaligned access (x86-64,
/// arm64), and an aligned read is one load where an unaligned one is a load per byte on BPF.
#[inline(always)]
fn read<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    if start + offset + size_of::<T>() > end {
        return None;
    }
    // SAFETY: the whole value lies in [data, data_end), checked just above.
    Some(unsafe { *((start + offset) as *const T) })
}

/// Writes the tracking key of a flow a 32-bit word at a time, zeros included. Built as a
/// struct, LLVM merges its zero bytes into `memset`s, which the BPF backend emits as calls
/// to a byte loop: more than the rest of this path together. `local_mask` is 0 for a
/// host-network pod, whose keys leave the local address out (`conntrack::key_of`).
#[inline(always)]
fn write_key(key: &mut MaybeUninit<CtKey>, slot: u32, flow: &Flow, direction: u8, local_mask: u32) {
    let (local, remote, local_port, remote_port) = if direction == DIR_EGRESS {
        (&flow.src, &flow.dst, flow.src_port, flow.dst_port)
    } else {
        (&flow.dst, &flow.src, flow.dst_port, flow.src_port)
    };
    let ports = u32::from_ne_bytes({
        let [l0, l1] = local_port.to_ne_bytes();
        let [r0, r1] = remote_port.to_ne_bytes();
        [l0, l1, r0, r1]
    });
    let words: [u32; 11] = [
        local[0] & local_mask,
        local[1] & local_mask,
        local[2] & local_mask,
        local[3] & local_mask,
        remote[0],
        remote[1],
        remote[2],
        remote[3],
        slot,
        ports,
        u32::from_ne_bytes([flow.proto, flow.family, 0, 0]),
    ];
    let out = key.as_mut_ptr().cast::<u32>();
    for (i, word) in words.into_iter().enumerate() {
        // SAFETY: `CtKey` is 11 words, 4-aligned (checked below); volatile so that the
        // stores stay stores.
        unsafe { core::ptr::write_volatile(out.add(i), word) };
    }
}
const _: () = assert!(size_of::<CtKey>() == 11 * 4 && align_of::<CtKey>() == 4);
const _: () = assert!(core::mem::offset_of!(CtKey, remote) == 16);
const _: () = assert!(core::mem::offset_of!(CtKey, slot) == 32);
const _: () = assert!(core::mem::offset_of!(CtKey, local_port) == 36);
const _: () = assert!(core::mem::offset_of!(CtKey, remote_port) == 38);
const _: () = assert!(core::mem::offset_of!(CtKey, proto) == 40);
const _: () = assert!(core::mem::offset_of!(CtKey, family) == 41);

/// What the fast path made of a packet.
#[derive(Clone, Copy)]
pub enum FastPath {
    /// Counted and passed.
    Passed,
    /// A TCP or UDP packet the tracking tables have no entry for (a new flow, or a denied
    /// one drop mode never records): the general pipeline need not parse it (`Flow::fill`)
    /// or look it up again.
    Untracked(Flow),
    /// Anything else, for the general pipeline.
    General,
}

/// The header fields of a TCP or UDP packet without IPv4 options, IPv6 extension headers
/// or fragmentation. Addresses as they lie in the packet, a word at a time (IPv4: the
/// first word, the rest zero, as `CtKey` holds it).
#[derive(Clone, Copy)]
pub struct Flow {
    src: [u32; 4],
    dst: [u32; 4],
    src_port: u16,
    dst_port: u16,
    /// IPv4 identification.
    id: u16,
    proto: u8,
    family: u8,
    tcp_flags: u8,
}

impl Flow {
    /// Writes into an empty packet (`Packet::empty_in`) what `parse::parse` would have.
    #[inline(always)]
    pub fn fill(&self, pkt: &mut Packet) {
        pkt.family = self.family;
        pkt.tuple.proto = self.proto;
        for i in 0..4 {
            pkt.tuple.src[i * 4..i * 4 + 4].copy_from_slice(&self.src[i].to_ne_bytes());
            pkt.tuple.dst[i * 4..i * 4 + 4].copy_from_slice(&self.dst[i].to_ne_bytes());
        }
        pkt.tuple.src_port = self.src_port;
        pkt.tuple.dst_port = self.dst_port;
        pkt.tcp_flags = self.tcp_flags;
        pkt.frag_id = self.id as u32;
    }
}

/// The flow of an IPv4 packet without options or fragmentation whose header starts at
/// `ip`, with the offsets of its transport header and of its end.
#[inline(always)]
fn ipv4_flow(skb: &SkBuff, start: usize, end: usize, ip: usize) -> Option<(Flow, usize, usize)> {
    // Words as they lie in the packet; their bytes taken apart with shifts.
    let [version_ihl, _, len_hi, len_lo] = read::<u32>(start, end, ip)?.to_ne_bytes();
    let [id_hi, id_lo, flags_offset_hi, offset_lo] = read::<u32>(start, end, ip + 4)?.to_ne_bytes();
    let proto: u8 = read(start, end, ip + 9)?;
    let total_len = u16::from_be_bytes([len_hi, len_lo]) as u32;
    // More fragments, or an offset: fragments take the general pipeline.
    if version_ihl != IPV4_NO_OPTIONS
        || flags_offset_hi & 0x3f != 0
        || offset_lo != 0
        || total_len < 20
        || total_len > skb.len().saturating_sub(ip as u32)
    {
        return None;
    }
    let flow = Flow {
        src: [read(start, end, ip + 12)?, 0, 0, 0],
        dst: [read(start, end, ip + 16)?, 0, 0, 0],
        src_port: 0,
        dst_port: 0,
        id: u16::from_be_bytes([id_hi, id_lo]),
        proto,
        family: FAMILY_IPV4,
        tcp_flags: 0,
    };
    Some((flow, ip + 20, ip + total_len as usize))
}

/// The flow of an IPv6 packet whose transport header follows its fixed header directly (no
/// extension headers), with the offsets of its transport header and of its end.
#[inline(always)]
fn ipv6_flow(skb: &SkBuff, start: usize, end: usize, ip: usize) -> Option<(Flow, usize, usize)> {
    let [version_class, _, _, _] = read::<u32>(start, end, ip)?.to_ne_bytes();
    let [len_hi, len_lo, next, _] = read::<u32>(start, end, ip + 4)?.to_ne_bytes();
    let payload_len = u16::from_be_bytes([len_hi, len_lo]) as u32;
    // Payload length 0 is a jumbogram: the general pipeline's.
    if version_class >> 4 != 6
        || payload_len == 0
        || payload_len + 40 > skb.len().saturating_sub(ip as u32)
    {
        return None;
    }
    let addr = |at: usize| -> Option<[u32; 4]> {
        Some([
            read(start, end, at)?,
            read(start, end, at + 4)?,
            read(start, end, at + 8)?,
            read(start, end, at + 12)?,
        ])
    };
    let flow = Flow {
        src: addr(ip + 8)?,
        dst: addr(ip + 24)?,
        src_port: 0,
        dst_port: 0,
        id: 0,
        proto: next,
        family: FAMILY_IPV6,
        tcp_flags: 0,
    };
    Some((flow, ip + 40, ip + 40 + payload_len as usize))
}

/// Whether a packet leaving the workload comes from one of its own addresses, as
/// `source_is_own` decides it (a host-network workload's are left to that).
#[inline(always)]
fn source_is_own(workload: &WorkloadConfig, flow: &Flow) -> bool {
    let flags = workload.flags;
    if flags & workload_flags::HOST_SOURCE != 0 {
        return false;
    }
    if flow.family == FAMILY_IPV4 {
        return flags & workload_flags::HAS_IPV4 != 0
            && flow.src[0] == u32::from_ne_bytes(workload.ipv4);
    }
    let [first, second, _, _] = flow.src[0].to_ne_bytes();
    // SAFETY: `ipv6` is 16 bytes at a 4-aligned offset of the map value (checked below).
    let own: [u32; 4] = unsafe { *(workload.ipv6.as_ptr() as *const [u32; 4]) };
    (flags & workload_flags::HAS_IPV6 != 0 && flow.src == own)
        || (first == 0xfe && second & 0xc0 == 0x80)
}
const _: () = assert!(core::mem::offset_of!(WorkloadConfig, ipv6).is_multiple_of(4));

/// Counts and passes the packet if it belongs to a tracked TCP or UDP flow of the workload
/// whose decision stands (allowed, or a would-drop in log mode), moving the flow's state as
/// the general pipeline would; a bare SYN is that pipeline's.
#[inline(always)]
pub fn pass(
    skb: &SkBuff,
    l3: u32,
    direction: u8,
    slot: u32,
    workload: &WorkloadConfig,
) -> FastPath {
    match try_pass(skb, l3, direction, slot, workload) {
        Some(outcome) => outcome,
        None => FastPath::General,
    }
}

#[inline(always)]
fn try_pass(
    skb: &SkBuff,
    l3: u32,
    direction: u8,
    slot: u32,
    workload: &WorkloadConfig,
) -> Option<FastPath> {
    // SAFETY: context field reads.
    let (protocol, start, end) = unsafe {
        let s = &*skb.skb;
        (s.protocol, s.data as usize, s.data_end as usize)
    };
    // Loopback (cgroup hooks only) is the general pipeline's to decide.
    if l3 == 0 && crate::on_loopback(skb) {
        return None;
    }
    let ip = l3 as usize;
    let (mut flow, l4, ip_end) = if protocol == ETH_P_IP_BE {
        ipv4_flow(skb, start, end, ip)?
    } else if protocol == ETH_P_IPV6_BE {
        ipv6_flow(skb, start, end, ip)?
    } else {
        return None;
    };
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return None;
    }
    // The general pipeline reads 14 bytes of a TCP header and 4 of a UDP one, within the IP
    // packet's own length (`parse::load`): so must this one, to agree on what is truncated.
    let header = if flow.proto == PROTO_TCP { 14 } else { 4 };
    if l4 + header > ip_end {
        return None;
    }
    let [sp_hi, sp_lo, dp_hi, dp_lo] = read::<u32>(start, end, l4)?.to_ne_bytes();
    flow.src_port = u16::from_be_bytes([sp_hi, sp_lo]);
    flow.dst_port = u16::from_be_bytes([dp_hi, dp_lo]);
    if flow.src_port == DNS_PORT || flow.dst_port == DNS_PORT {
        return None;
    }
    // A pod's tunnel packets are the general pipeline's to drop, tracked or not.
    if direction == DIR_EGRESS && flow.proto == PROTO_UDP && crate::is_tunnel_port(flow.dst_port) {
        return None;
    }
    if flow.proto == PROTO_TCP {
        flow.tcp_flags = read(start, end, l4 + 13)?;
    }
    if direction == DIR_EGRESS && !source_is_own(workload, &flow) {
        return None;
    }

    let mut key = MaybeUninit::<CtKey>::uninit();
    let local_mask = if workload.flags & workload_flags::HOST_SOURCE != 0 {
        0
    } else {
        u32::MAX
    };
    write_key(&mut key, slot, &flow, direction, local_mask);
    // SAFETY: every byte written just above.
    let key = unsafe { key.assume_init_ref() };

    let config = CONFIG.get(0)?;
    let now = now_ns(config);
    // A workload past its share of the main table records its new flows in the overflow
    // table (`conntrack::track`): their packets take this path too.
    let Some(entry) = CONNTRACK
        .get_ptr_mut(key)
        .or_else(|| conntrack::overflow_entry(slot, key))
    else {
        return Some(FastPath::Untracked(flow));
    };
    let (proto, tcp_flags) = (flow.proto, flow.tcp_flags);
    if conntrack::opens_tcp(proto, tcp_flags) {
        return None;
    }
    // SAFETY: a value of a successful lookup, valid for the program run; the state and the
    // expiry are written, each whole, as the general pipeline does.
    let entry: &mut CtEntry = unsafe { &mut *entry };
    // A drop needs its event: the general pipeline's.
    let verdict = crate::verdict_of(entry.decision, workload.mode);
    if verdict == VERDICT_DROPPED {
        return None;
    }
    if entry.expires_ns <= now
        || entry.generation != workload.generation
        || entry.epoch != conntrack::epoch_for(workload, entry.peer)
    {
        return None;
    }
    conntrack::advance(
        config,
        entry,
        proto,
        tcp_flags,
        direction == entry.origin,
        now,
    );

    let segs = crate::segments(skb);
    let bytes = skb.len().saturating_sub(l3);
    counters::count(slot, direction, verdict, segs, bytes);
    counters::count_flow(
        &FlowCounterKey {
            slot,
            peer: entry.peer,
            port: key.counted_port(entry.origin),
            proto,
            direction,
            verdict,
            origin: entry.origin,
            _pad: [0; 2],
        },
        segs,
        bytes,
    );
    Some(FastPath::Passed)
}
