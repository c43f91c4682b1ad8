//! The fast path: a packet of an IPv4 TCP or UDP flow that connection tracking already holds,
//! whose cached decision stands and whose state does not move. Most packets are such, and
//! the general pipeline (a `Packet` built field by field, fragments, DNS, ICMP errors, the
//! 44-byte key copied a byte at a time) costs them more than the lookup itself.
//!
//! Anything else falls through to the general pipeline, which decides it exactly as before:
//! this path only ever takes a packet the general one would pass with the same counts.

use agent_common::{
    CtEntry, CtKey, DECISION_ALLOW, DIR_EGRESS, DNS_PORT, FAMILY_IPV4, FlowCounterKey, MODE_LOG,
    PROTO_TCP, PROTO_UDP, VERDICT_ALLOWED, VERDICT_WOULD_DROP, WorkloadConfig, workload_flags,
};
use core::mem::MaybeUninit;

use aya_ebpf::programs::sk_buff::SkBuff;

use crate::{
    CONFIG, CONNTRACK, conntrack, counters, now_ns,
    parse::{self, Packet},
};

/// `__sk_buff::protocol`: the ethertype in network order.
const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
/// Version 4, header length 5 words: no options.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// TCP flags that may change a tracked connection's state (the rest never do).
const TCP_STATE_FLAGS: u8 = parse::TCP_SYN | parse::TCP_FIN | parse::TCP_RST;

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

/// Writes the tracking key of an IPv4 flow a 32-bit word at a time, zeros included. Built
/// as a struct, LLVM merges its zero bytes into `memset`s, which the BPF backend emits as
/// calls to a byte loop: more than the rest of this path together.
#[inline(always)]
fn write_ipv4_key(
    key: &mut MaybeUninit<CtKey>,
    slot: u32,
    local: u32,
    remote: u32,
    local_port: u16,
    remote_port: u16,
    proto: u8,
) {
    let ports = u32::from_ne_bytes({
        let [l0, l1] = local_port.to_ne_bytes();
        let [r0, r1] = remote_port.to_ne_bytes();
        [l0, l1, r0, r1]
    });
    let words: [u32; 11] = [
        local,
        0,
        0,
        0,
        remote,
        0,
        0,
        0,
        slot,
        ports,
        u32::from_ne_bytes([proto, FAMILY_IPV4, 0, 0]),
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
    /// An IPv4 TCP or UDP packet the main tracking table has no entry for (a new flow, or
    /// a denied one drop mode never records): the general pipeline need not parse it
    /// (`Ipv4Flow::fill`) or look it up in the main table again.
    Untracked(Ipv4Flow),
    /// Anything else, for the general pipeline.
    General,
}

/// The header fields of an IPv4 TCP or UDP packet without options or fragmentation.
#[derive(Clone, Copy)]
pub struct Ipv4Flow {
    src: u32,
    dst: u32,
    src_port: u16,
    dst_port: u16,
    id: u16,
    proto: u8,
    tcp_flags: u8,
}

impl Ipv4Flow {
    /// Writes into an empty packet (`Packet::empty_in`) what `parse::parse` would have.
    #[inline(always)]
    pub fn fill(&self, pkt: &mut Packet) {
        pkt.family = FAMILY_IPV4;
        pkt.tuple.proto = self.proto;
        pkt.tuple.src[..4].copy_from_slice(&self.src.to_ne_bytes());
        pkt.tuple.dst[..4].copy_from_slice(&self.dst.to_ne_bytes());
        pkt.tuple.src_port = self.src_port;
        pkt.tuple.dst_port = self.dst_port;
        pkt.tcp_flags = self.tcp_flags;
        pkt.frag_id = self.id as u32;
    }
}

/// Counts and passes the packet if it belongs to a tracked IPv4 TCP or UDP flow of the
/// workload whose decision stands (allowed, or a would-drop in log mode) and whose state
/// needs no write.
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
    if protocol != ETH_P_IP_BE || (l3 == 0 && crate::on_loopback(skb)) {
        return Some(FastPath::General);
    }
    let ip = l3 as usize;
    // Words as they lie in the packet; their bytes taken apart with shifts.
    let [version_ihl, _, len_hi, len_lo] = read::<u32>(start, end, ip)?.to_ne_bytes();
    let [id_hi, id_lo, flags_offset_hi, offset_lo] = read::<u32>(start, end, ip + 4)?.to_ne_bytes();
    let proto: u8 = read(start, end, ip + 9)?;
    let src: u32 = read(start, end, ip + 12)?;
    let dst: u32 = read(start, end, ip + 16)?;
    let [sp_hi, sp_lo, dp_hi, dp_lo] = read::<u32>(start, end, ip + 20)?.to_ne_bytes();
    let total_len = u16::from_be_bytes([len_hi, len_lo]) as u32;
    // More fragments, or an offset: fragments take the general pipeline.
    if version_ihl != IPV4_NO_OPTIONS
        || flags_offset_hi & 0x3f != 0
        || offset_lo != 0
        || total_len < 20
        || total_len > skb.len().saturating_sub(l3)
        || (proto != PROTO_TCP && proto != PROTO_UDP)
    {
        return None;
    }
    let src_port = u16::from_be_bytes([sp_hi, sp_lo]);
    let dst_port = u16::from_be_bytes([dp_hi, dp_lo]);
    if src_port == DNS_PORT || dst_port == DNS_PORT {
        return None;
    }
    // The general pipeline reads 14 bytes of a TCP header: so must this one, to agree on
    // what is truncated.
    let tcp_flags: u8 = if proto == PROTO_TCP {
        read(start, end, ip + 20 + 13)?
    } else {
        0
    };
    let (local, remote, local_port, remote_port) = if direction == DIR_EGRESS {
        // Only the workload's own address may be the source (`source_is_own`).
        if workload.flags & (workload_flags::HOST_SOURCE | workload_flags::HAS_IPV4)
            != workload_flags::HAS_IPV4
            || src != u32::from_ne_bytes(workload.ipv4)
        {
            return None;
        }
        (src, dst, src_port, dst_port)
    } else {
        (dst, src, dst_port, src_port)
    };

    let mut key = MaybeUninit::<CtKey>::uninit();
    write_ipv4_key(
        &mut key,
        slot,
        local,
        remote,
        local_port,
        remote_port,
        proto,
    );
    // SAFETY: every byte written just above.
    let key = unsafe { key.assume_init_ref() };

    let config = CONFIG.get(0)?;
    let now = now_ns(config);
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Some(FastPath::Untracked(Ipv4Flow {
            src,
            dst,
            src_port,
            dst_port,
            id: u16::from_be_bytes([id_hi, id_lo]),
            proto,
            tcp_flags,
        }));
    };
    if tcp_flags & TCP_STATE_FLAGS != 0 {
        return None;
    }
    // SAFETY: a value of a successful lookup, valid for the program run; only the expiry is
    // written, whole, as the general pipeline does.
    let entry: &mut CtEntry = unsafe { &mut *entry };
    let verdict = if entry.decision == DECISION_ALLOW {
        VERDICT_ALLOWED
    } else if workload.mode == MODE_LOG as u32 {
        VERDICT_WOULD_DROP
    } else {
        return None;
    };
    if entry.expires_ns <= now
        || entry.generation != workload.generation
        || entry.epoch != conntrack::epoch_for(workload, entry.peer)
        || conntrack::next_state(entry.tcp_state, proto, tcp_flags, direction == entry.origin)
            != entry.tcp_state
    {
        return None;
    }
    let expires = now + conntrack::lifetime_ns(config, proto, entry.tcp_state);
    if expires > entry.expires_ns + conntrack::NS_PER_SEC {
        entry.expires_ns = expires;
    }

    // SAFETY: context field read.
    let segs = match unsafe { (*skb.skb).gso_segs } {
        0 | 1 => 1,
        n => n,
    };
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
