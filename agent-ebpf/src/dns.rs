//! DNS to and from a workload's resolvers: copied to the agent through `DNS_EVENTS`, which
//! learns what each workload's names resolve to (`LEARNED`). Answers to a workload that an
//! EgressAllowlist selects are held (dropped here) and handed back by the agent once it has
//! written what they taught: the first connection after a lookup is decided with it.
//!
//! Only while the agent says it is there (`DnsControl::hold_until_ns`): a stopped agent
//! never stalls DNS.

use agent_common::{
    DIR_EGRESS, DIR_INGRESS, DNS_CAPTURE_BYTES, DNS_PORT, DNS_REINJECT_MARK, DnsCapture,
    LEARNED_PORT_RANGES, LearnedKey, LearnedValue, ResolverKey, WorkloadConfig, capture_kind, diag,
    workload_flags,
};
use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::sk_buff::SkBuff};

use crate::{DNS_CONTROL, DNS_EVENTS, DNS_RESOLVERS, LEARNED, counters, parse::Packet};

/// Whether `addr` is one of the resolvers workloads are configured with.
#[inline(always)]
pub fn is_resolver(family: u8, addr: &[u8; 16]) -> bool {
    let key = ResolverKey {
        family,
        _pad0: 0,
        _pad1: 0,
        addr: *addr,
    };
    // SAFETY: presence check only.
    unsafe { DNS_RESOLVERS.get(&key) }.is_some()
}

/// Copies a UDP or TCP packet to or from port 53 of a resolver to the agent. Returns true
/// when the packet is held: the caller drops it and the agent hands it back.
#[inline(always)]
pub fn observe(
    skb: &SkBuff,
    l3: u32,
    direction: u8,
    slot: u32,
    workload: &WorkloadConfig,
    pkt: &Packet,
    now: u64,
) -> bool {
    let (resolver, port) = if direction == DIR_INGRESS {
        (&pkt.tuple.src, pkt.tuple.src_port)
    } else {
        (&pkt.tuple.dst, pkt.tuple.dst_port)
    };
    if port != DNS_PORT || !is_resolver(pkt.family, resolver) {
        return false;
    }
    // The first fragment holds part of a message (later ones never come here): passed on,
    // never held, not learned from. Held, it would reach the pod after the fragments
    // behind it, which its reassembly would have to wait for in vain.
    if pkt.first_fragment {
        counters::diag(diag::DNS_TOO_LONG);
        return false;
    }
    // SAFETY: context field read.
    let mark = unsafe { (*skb.skb).mark };
    if direction == DIR_INGRESS && mark == DNS_REINJECT_MARK {
        // Handed back by the agent after learning from it.
        return false;
    }
    // Holding needs an interface to hand the answer back to (TC attachments), and a frame
    // it takes back whole: an aggregate of several TCP segments (GSO, GRO) is larger than
    // its MTU, so it is copied instead.
    // SAFETY: context field read.
    let aggregate = unsafe { (*skb.skb).gso_segs } > 1;
    let hold = direction == DIR_INGRESS
        && l3 != 0
        && !aggregate
        && workload.flags & workload_flags::EGRESS_ALLOWLIST != 0
        && DNS_CONTROL.get(0).is_some_and(|c| c.hold_until_ns > now);
    let kind = if direction == DIR_EGRESS {
        capture_kind::QUERY
    } else if hold {
        capture_kind::ANSWER_HELD
    } else {
        capture_kind::ANSWER_COPIED
    };
    let len = skb.len();
    if len == 0 || len as usize > DNS_CAPTURE_BYTES {
        counters::diag(diag::DNS_TOO_LONG);
        return false;
    }
    let Some(mut entry) = DNS_EVENTS.reserve::<DnsCapture>(0) else {
        counters::diag(diag::DNS_LOST);
        return false;
    };
    // The same length, masked so the verifier can see it fits the record: a volatile read
    // keeps the compiler from dropping the mask it can prove redundant.
    // SAFETY: a read of a local.
    let fitted =
        ((unsafe { core::ptr::read_volatile(&len) } - 1) & (DNS_CAPTURE_BYTES as u32 - 1)) + 1;
    let capture = entry.as_mut_ptr();
    // SAFETY: the reserved record is ours until submitted or discarded; every header field
    // is written before submission, and `len` bytes (checked against the record's size
    // above) of `data` are filled by the helper.
    let loaded = unsafe {
        (*capture).slot = slot;
        (*capture).generation = workload.generation;
        (*capture).ifindex = (*skb.skb).ifindex;
        (*capture).len = len;
        (*capture).l3_offset = l3 as u8;
        (*capture).kind = kind;
        (*capture)._pad = [0; 2];
        bpf_skb_load_bytes(
            skb.skb.cast(),
            0,
            core::ptr::addr_of_mut!((*capture).data).cast(),
            fitted,
        )
    };
    if loaded != 0 {
        entry.discard(0);
        counters::diag(diag::DNS_LOST);
        return false;
    }
    entry.submit(0);
    counters::diag(diag::DNS_CAPTURED);
    if hold {
        counters::diag(diag::DNS_HELD);
    }
    hold
}

/// What the workload learned about `addr` from its DNS answers, if anything.
#[inline(always)]
pub fn learned(
    slot: u32,
    workload: &WorkloadConfig,
    family: u8,
    addr: &[u8; 16],
) -> Option<&'static LearnedValue> {
    let key = LearnedKey {
        slot,
        generation: workload.generation,
        family,
        _pad0: 0,
        _pad1: 0,
        addr: *addr,
    };
    // SAFETY: read-only use of the value for the program run.
    unsafe { LEARNED.get(&key) }
}

/// Whether one of the entry's port ranges takes `proto`/`port`.
#[inline(always)]
pub fn ports_allow(value: &LearnedValue, proto: u8, port: u16) -> bool {
    for i in 0..LEARNED_PORT_RANGES {
        if i as u32 >= value.port_count {
            return false;
        }
        if value.ports[i].allows(proto, port) {
            return true;
        }
    }
    false
}
