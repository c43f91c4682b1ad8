//! Tollgate's kernel programs.
//!
//! Four entry points share one pipeline: find the workload of the attachment point, parse,
//! track the connection, decide new flows by policy, count, sample would-drops and drops.
//! - `tc_from_pod` / `tc_to_pod`: TC (TCX or clsact) on the host side of a workload's
//!   interface. Host ingress is the workload's egress and the other way round.
//! - `cg_ingress` / `cg_egress`: cgroup_skb on the workload's cgroup v2 directory.
//!
//! User space decides everything it can (identities, rules, isolation, mode) and hands it
//! down as map entries; this side stays small and bounded.
#![no_std]
#![no_main]
// Atomic adds into shared map values (`counters::atomic_add`): core's atomic types have no
// read-modify-write operations on the BPF target.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod counters;
mod dns;
mod established;
mod events;
mod identity;
mod parse;
mod policy;

use agent_common::{
    CIDR_RULE_CAPACITY, CONNTRACK_CAPACITY, CONNTRACK_OVERFLOW_DIVISOR, COUNTERS_PER_SLOT, Config,
    Counter, CtEntry, CtKey, DECISION_ALLOW, DECISION_DENY, DIR_EGRESS, DIR_INGRESS,
    DNS_RESOLVER_CAPACITY, DNS_RING_BYTES, DnsControl, EVENT_RING_BYTES, EventBucket, FAMILY_IPV4,
    FLOW_COUNTER_CAPACITY, FLOW_SERIES_CAPACITY, FRAGMENT_CAPACITY, FlowCounterKey, FragKey,
    FragPorts, IDENTITY_CAPACITY, IDENTITY_HOST, IDENTITY_WORLD, LEARNED_CAPACITY, LearnedKey,
    LearnedValue, LpmAddr, MAX_CGROUP_DEPTH, MAX_WORKLOADS, MODE_LOG, NODE_PORTS_CAPACITY,
    NodePortKey, NodePortTarget, POLICY_CAPACITY, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue,
    RULESET_CAPACITY, ResolverKey, SERVICES_OUTSIDE_CAPACITY, SLOT_CACHE_CAPACITY,
    SLOT_UNREGISTERED, SlotRoute, VERDICT_ALLOWED, VERDICT_DROPPED, VERDICT_WOULD_DROP,
    WorkloadConfig, diag, is_service_identity, slot_cache_bucket, workload_flags,
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC},
    btf_maps::{ArrayOfMaps, LpmTrie as BtfLpmTrie},
    helpers::{
        bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{btf_map, cgroup_skb, classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, TcContext, sk_buff::SkBuff},
};

use core::mem::MaybeUninit;

use crate::{
    established::FastPath,
    parse::{Kind, Packet, ParseError},
};

/// Per-workload configuration, by slot.
#[map]
static WORKLOADS: Array<WorkloadConfig> = Array::pinned(MAX_WORKLOADS, 0);
/// Host-side interface index to workload slot (TC attachments).
#[map]
static TC_SLOTS: HashMap<u32, u32> = HashMap::pinned(MAX_WORKLOADS, 0);
/// cgroup v2 id to workload slot (cgroup attachments).
#[map]
static CGROUP_SLOTS: HashMap<u64, u32> = HashMap::pinned(MAX_WORKLOADS, 0);
/// Direct-mapped caches in front of `TC_SLOTS` and `CGROUP_SLOTS` (bucket = id modulo the
/// capacity): an array lookup the verifier inlines instead of a hash lookup per packet.
/// The agent fills a bucket when it is free; a colliding id is found in the hash.
#[map]
static TC_SLOT_CACHE: Array<SlotRoute> = Array::pinned(SLOT_CACHE_CAPACITY, 0);
#[map]
static CGROUP_SLOT_CACHE: Array<SlotRoute> = Array::pinned(SLOT_CACHE_CAPACITY, 0);
/// Peer address prefix to identity: the prefixes shorter than an address (CIDRs the agent
/// names). Looked up when `IDENTITIES_EXACT` has no entry.
#[map]
static IDENTITIES: LpmTrie<LpmAddr, u32> = LpmTrie::pinned(IDENTITY_CAPACITY, 0);
/// Peer address to identity for single addresses (/32, /128: pods, Service frontends, the
/// node's addresses), nearly every entry: one hash lookup, where a trie of 20,000 pod
/// addresses is about 15 levels deep. Allocated as written (only user space writes it).
#[map]
static IDENTITIES_EXACT: HashMap<LpmAddr, u32> =
    HashMap::pinned(IDENTITY_CAPACITY, BPF_F_NO_PREALLOC);
/// Allowed (ruleset, peer, protocol, port prefix): rules without ports, with a protocol
/// only, or with a port range. One trie per ruleset, by ruleset (the agent creates it when
/// the ruleset first has such a rule): a lookup walks its own ruleset's entries only, where
/// one shared trie got deeper with every other workload's rules.
#[btf_map]
static POLICY: ArrayOfMaps<
    BtfLpmTrie<PolicyKey, PolicyValue, { POLICY_CAPACITY as usize }>,
    { RULESET_CAPACITY as usize },
> = ArrayOfMaps::new();
/// Allowed (ruleset, peer, protocol, port) for single ports, most rules: one hash lookup,
/// flat in the number of rules, where the trie gets deeper as it fills. Allocated as
/// written, like the tries (only user space writes it).
#[map]
static POLICY_EXACT: HashMap<PolicyKey, PolicyValue> =
    HashMap::pinned(POLICY_CAPACITY, BPF_F_NO_PREALLOC);
/// (ruleset, address prefix) to the ipBlock set it falls in, a peer of `POLICY`: one trie
/// per ruleset too.
#[btf_map]
static CIDR_RULES: ArrayOfMaps<
    BtfLpmTrie<LpmAddr, u32, { CIDR_RULE_CAPACITY as usize }>,
    { RULESET_CAPACITY as usize },
> = ArrayOfMaps::new();
/// Connection tracking.
#[map]
static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CONNTRACK_CAPACITY, 0);
/// Connection tracking for the new flows of workloads that hold their whole share of
/// `CONNTRACK`: a flood evicts its own flows here, never other workloads' there.
#[map]
static CT_OVERFLOW: LruHashMap<CtKey, CtEntry> =
    LruHashMap::pinned(CONNTRACK_CAPACITY / CONNTRACK_OVERFLOW_DIVISOR, 0);
/// Entries each slot holds in `CONNTRACK`: added atomically here, set to the live count by
/// the agent's periodic census (which also accounts for evictions).
#[map]
static CT_SHARES: Array<u64> = Array::pinned(MAX_WORKLOADS, 0);
/// Non-zero once a flow of the slot went to `CT_OVERFLOW`: only then is that table
/// searched for the slot's packets. Written here, reset by the agent when the slot is freed.
#[map]
static CT_OVERFLOWED: Array<u32> = Array::pinned(MAX_WORKLOADS, 0);
/// Ports of fragmented datagrams, from their first fragment.
#[map]
static FRAGMENTS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(FRAGMENT_CAPACITY, 0);
/// Packets and bytes by (slot, direction, verdict).
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_WORKLOADS * COUNTERS_PER_SLOT, 0);
/// Packets each slot sent from an address that is not its own.
#[map]
static SPOOFED: PerCpuArray<u64> = PerCpuArray::pinned(MAX_WORKLOADS, 0);
/// Packets and bytes per peer pair at workload level.
#[map]
static FLOW_COUNTERS: LruPerCpuHashMap<FlowCounterKey, Counter> =
    LruPerCpuHashMap::pinned(FLOW_COUNTER_CAPACITY, 0);
/// Peer pairs the agent moved to direct-mapped buckets (`flow_series_bucket`): their
/// packets are counted in `FLOW_SERIES` with two array lookups instead of a hash lookup.
/// Written only by the agent; an all-zero key is a free bucket.
#[map]
static FLOW_SERIES_KEYS: Array<FlowCounterKey> = Array::pinned(FLOW_SERIES_CAPACITY, 0);
/// Packets and bytes of the peer pair in the same bucket of `FLOW_SERIES_KEYS`.
#[map]
static FLOW_SERIES: PerCpuArray<Counter> = PerCpuArray::pinned(FLOW_SERIES_CAPACITY, 0);
/// Sampled would-drop and drop events.
#[map]
static EVENTS: RingBuf = RingBuf::pinned(EVENT_RING_BYTES, 0);
/// Event token bucket per slot.
#[map]
static EVENT_BUCKETS: Array<EventBucket> = Array::pinned(MAX_WORKLOADS, 0);
/// Node-wide settings (one entry).
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
/// Datapath diagnostics (`agent_common::diag`).
#[map]
static DIAG: PerCpuArray<u64> = PerCpuArray::pinned(diag::COUNT, 0);

/// DNS queries and answers of workloads with their resolvers, for the agent (`dns`).
#[map]
static DNS_EVENTS: RingBuf = RingBuf::pinned(DNS_RING_BYTES, 0);
/// Addresses workloads resolve through.
#[map]
static DNS_RESOLVERS: HashMap<ResolverKey, u8> = HashMap::pinned(DNS_RESOLVER_CAPACITY, 0);
/// Whether the agent is there to hand held answers back (one entry).
#[map]
static DNS_CONTROL: Array<DnsControl> = Array::pinned(1, 0);
/// What each workload learned from its DNS answers: (slot, address) to name and ports.
#[map]
static LEARNED: HashMap<LearnedKey, LearnedValue> = HashMap::pinned(LEARNED_CAPACITY, 0);
/// Service identities with a backend outside the cluster: for a workload an EgressAllowlist
/// selects, a connection to them is one to the outside (`policy::evaluate`).
#[map]
static SERVICES_OUTSIDE: HashMap<u32, u8> = HashMap::pinned(SERVICES_OUTSIDE_CAPACITY, 0);
/// The NodePorts of every Service: a workload's connection to one on the node's address is
/// decided as one to the Service (`policy::evaluate`).
#[map]
static NODE_PORTS: HashMap<NodePortKey, NodePortTarget> = HashMap::pinned(NODE_PORTS_CAPACITY, 0);
/// New connections per slot to an address whose learned name had expired.
#[map]
static EGRESS_EXPIRED: PerCpuArray<u64> = PerCpuArray::pinned(MAX_WORKLOADS, 0);

/// `LAYOUT_VERSION` of the agent that created the pins; read by agents, never by programs.
#[map]
static LAYOUT: Array<u64> = Array::pinned(1, 0);

const ETH_HLEN: u32 = 14;

/// What to do with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Pass,
    Drop,
}

#[classifier]
// Each entry point inlines the whole pipeline (`#[inline(always)]` below each): left to
// itself LLVM made it a BPF-to-BPF call, 8 to 10 ns a packet.
#[inline(always)]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    tc_action(handle(&ctx.skb, ETH_HLEN, DIR_EGRESS, tc_slot(&ctx.skb)))
}

#[classifier]
#[inline(always)]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    tc_action(handle(&ctx.skb, ETH_HLEN, DIR_INGRESS, tc_slot(&ctx.skb)))
}

#[cgroup_skb(ingress)]
#[inline(always)]
pub fn cg_ingress(ctx: SkBuffContext) -> i32 {
    cgroup_action(handle(&ctx.skb, 0, DIR_INGRESS, cgroup_slot(&ctx.skb)))
}

#[cgroup_skb(egress)]
#[inline(always)]
pub fn cg_egress(ctx: SkBuffContext) -> i32 {
    cgroup_action(handle(&ctx.skb, 0, DIR_EGRESS, cgroup_slot(&ctx.skb)))
}

/// Does nothing: the baseline benchmarks measure the pipeline against (the cost of the
/// hook and of BPF_PROG_TEST_RUN itself). Never attached by the agent.
#[classifier]
pub fn tc_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// The connection tracking table's own cost for a new flow, for the benchmark to set
/// Tollgate's against: an IPv4 UDP frame's addresses and ports (no options) made into a
/// key, one lookup in `CONNTRACK`, and, unless the payload's first byte is 1, an insert when
/// it misses. Nothing else: no parse, no policy, no counters. Never attached.
#[classifier]
pub fn tc_table_floor(ctx: TcContext) -> i32 {
    const IP: usize = ETH_HLEN as usize;
    const PAYLOAD: usize = IP + 20 + 8;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + PAYLOAD + 1 > end {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: every read lies in [data, data_end), checked just above.
    let (src, dst, ports, lookup_only) = unsafe {
        (
            *((start + IP + 12) as *const [u8; 4]),
            *((start + IP + 16) as *const [u8; 4]),
            *((start + IP + 20) as *const [u16; 2]),
            *((start + PAYLOAD) as *const u8) == 1,
        )
    };
    let mut key = CtKey {
        local: [0; 16],
        remote: [0; 16],
        slot: 0,
        local_port: u16::from_be(ports[0]),
        remote_port: u16::from_be(ports[1]),
        proto: PROTO_UDP,
        family: FAMILY_IPV4,
        echo: 0,
        _pad: 0,
    };
    key.local[..4].copy_from_slice(&src);
    key.remote[..4].copy_from_slice(&dst);
    if CONNTRACK.get_ptr_mut(&key).is_none() && !lookup_only {
        let entry = CtEntry {
            expires_ns: u64::MAX,
            epoch: 0,
            origin: DIR_EGRESS,
            decision: DECISION_ALLOW,
            tcp_state: 0,
            _pad: 0,
            peer: 0,
            generation: 0,
        };
        let _ = CONNTRACK.insert(&key, &entry, 0);
    }
    TC_ACT_UNSPEC
}

/// Writes `bpf_jiffies64()` into the packet's first 8 bytes: the agent runs it with
/// BPF_PROG_TEST_RUN to tie jiffies to CLOCK_MONOTONIC_COARSE (`Config::ns_per_jiffy`).
/// Never attached.
#[classifier]
pub fn tc_jiffies(ctx: TcContext) -> i32 {
    // SAFETY: helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let _ = ctx.store(0, &jiffies, 0);
    TC_ACT_UNSPEC
}

/// Now, in CLOCK_MONOTONIC_COARSE ns (the clock of every expiry and deadline in the maps),
/// to within two ticks: from jiffies, one load, once the agent has tied them to that clock;
/// else from the coarse clock itself, a seqlock read of the timekeeper.
#[inline(always)]
fn now_ns(config: &Config) -> u64 {
    if config.ns_per_jiffy != 0 {
        // SAFETY: helper without arguments.
        unsafe { bpf_jiffies64() }
            .wrapping_mul(config.ns_per_jiffy as u64)
            .wrapping_add(config.clock_offset_ns)
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_coarse_ns() }
    }
}

/// Pass means "no opinion" (`TC_ACT_UNSPEC`, TCX_NEXT): programs of other agents or the CNI
/// attached after ours still run.
#[inline(always)]
fn tc_action(action: Action) -> i32 {
    match action {
        Action::Pass => TC_ACT_UNSPEC,
        Action::Drop => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn cgroup_action(action: Action) -> i32 {
    match action {
        Action::Pass => 1,
        Action::Drop => 0,
    }
}

#[inline(always)]
fn tc_slot(skb: &SkBuff) -> u32 {
    // SAFETY: context field read.
    let ifindex = unsafe { (*skb.skb).ifindex };
    if let Some(route) = TC_SLOT_CACHE.get(slot_cache_bucket(ifindex as u64))
        && route.id == ifindex as u64
    {
        return route.slot;
    }
    // SAFETY: read-only use of the looked-up value.
    match unsafe { TC_SLOTS.get(ifindex) } {
        Some(slot) => *slot,
        None => SLOT_UNREGISTERED,
    }
}

/// The slot of a cgroup id, if it is registered: the cache bucket, then the hash.
#[inline(always)]
fn cgroup_route(id: u64) -> Option<u32> {
    if let Some(route) = CGROUP_SLOT_CACHE.get(slot_cache_bucket(id))
        && route.id == id
    {
        return Some(route.slot);
    }
    // SAFETY: read-only use of the looked-up value.
    unsafe { CGROUP_SLOTS.get(id) }.copied()
}

/// The workload of the socket's cgroup: the cgroup itself, or (for a container inside a pod
/// directory) the nearest registered ancestor. Nearest, not highest: a registered cgroup
/// above the pods must never take a pod's traffic.
#[inline(always)]
fn cgroup_slot(skb: &SkBuff) -> u32 {
    // SAFETY: helper call on the program's own context.
    let id = unsafe { bpf_skb_cgroup_id(skb.skb) };
    if let Some(slot) = cgroup_route(id) {
        return slot;
    }
    // Deepest level first; levels below the socket's own cgroup read as 0. Level 0 is the
    // root, never a workload.
    for i in 1..MAX_CGROUP_DEPTH {
        let level = MAX_CGROUP_DEPTH - i;
        // SAFETY: as above.
        let ancestor = unsafe { bpf_skb_ancestor_cgroup_id(skb.skb, level as i32) };
        if ancestor == 0 || ancestor == id {
            continue;
        }
        if let Some(slot) = cgroup_route(ancestor) {
            return slot;
        }
    }
    SLOT_UNREGISTERED
}

/// Whether the packet is on the loopback device (ifindex 1 in every network namespace).
#[inline(always)]
fn on_loopback(skb: &SkBuff) -> bool {
    // SAFETY: context field read.
    unsafe { (*skb.skb).ifindex == 1 }
}

/// Segments on the wire of this skb (GSO/GRO aggregates count as what they carry).
#[inline(always)]
fn segments(skb: &SkBuff) -> u32 {
    // SAFETY: context field read.
    let segs = unsafe { (*skb.skb).gso_segs };
    if segs > 1 { segs } else { 1 }
}

#[inline(always)]
fn verdict_of(decision: u8, mode: u32) -> u8 {
    if decision == DECISION_ALLOW {
        VERDICT_ALLOWED
    } else if mode == MODE_LOG as u32 {
        VERDICT_WOULD_DROP
    } else {
        VERDICT_DROPPED
    }
}

#[inline(always)]
fn handle(skb: &SkBuff, l3: u32, direction: u8, slot: u32) -> Action {
    let workload = WORKLOADS.get(slot);
    let mut fast = FastPath::General;
    if let Some(workload) = workload
        && slot != SLOT_UNREGISTERED
        && workload.flags & workload_flags::ACTIVE != 0
    {
        fast = established::pass(skb, l3, direction, slot, workload);
        if let FastPath::Passed = fast {
            return Action::Pass;
        }
    }
    let mut place = MaybeUninit::uninit();
    let pkt = Packet::empty_in(&mut place);
    let parsed = if let FastPath::Untracked(flow) = fast {
        flow.fill(pkt);
        Ok(())
    } else {
        parse::parse(skb, l3, pkt)
    };
    let bytes = skb.len().saturating_sub(l3);
    let segs = segments(skb);
    if parsed == Err(ParseError::Arp) {
        counters::diag(diag::ARP);
        // Leaving a pod's interface, for an address of the pod's only (or none: a probe
        // before it takes one): another's would have its neighbours send that address's
        // traffic here. A pod whose IPv4 address the agent does not know is held to the
        // rule of any packet from an address not its own.
        if direction == DIR_EGRESS
            && pkt.family == FAMILY_IPV4
            && !same_addr(&pkt.tuple.src, &[0; 16])
            && let Some(workload) = workload
            && slot != SLOT_UNREGISTERED
            && workload.flags & workload_flags::ACTIVE != 0
            && !source_is_own(workload, pkt)
        {
            if workload.flags & workload_flags::HAS_IPV4 == 0 {
                let isolated = workload.flags & workload_flags::isolated(direction) != 0;
                return spoofed(workload, slot, pkt, l3, isolated, segs, bytes);
            }
            return false_claim(slot, segs, bytes);
        }
        return Action::Pass;
    }

    let Some(workload) = workload else {
        return Action::Pass;
    };
    if slot == SLOT_UNREGISTERED || workload.flags & workload_flags::ACTIVE == 0 {
        counters::diag(diag::UNREGISTERED);
        counters::count(SLOT_UNREGISTERED, direction, VERDICT_ALLOWED, segs, bytes);
        return Action::Pass;
    }
    let isolated = workload.flags & workload_flags::isolated(direction) != 0;

    if let Err(err) = parsed {
        counters::diag(match err {
            ParseError::NonIp | ParseError::Stacked => diag::NON_IP,
            ParseError::Truncated => diag::TRUNCATED,
            ParseError::BadHeader => diag::BAD_HEADER,
            _ => diag::IPV6_EXT_UNPARSED,
        });
        // An IPv6 packet whose extension headers go on too long had its addresses read:
        // its source is checked like any other's. Leaving a pod, what it carries could be a
        // tunnel's (above): dropped in either mode; no stack sends so many headers.
        if err == ParseError::Ipv6ExtUnparsed && direction == DIR_EGRESS {
            if !source_is_own(workload, pkt) {
                return spoofed(workload, slot, pkt, l3, isolated, segs, bytes);
            }
            if workload.flags & workload_flags::HOST_SOURCE == 0 {
                counters::count(slot, DIR_EGRESS, VERDICT_DROPPED, segs, bytes);
                return Action::Drop;
            }
        }
        // A frame with VLAN tags left after the kernel took one off leaving a pod's
        // interface: what the node makes of it past this hook (it takes off further tags of
        // VLAN 0) is not what this hook sees, so it could carry any ARP or IP packet past
        // every check. No stack sends it: dropped in either mode, a spoof.
        if err == ParseError::Stacked && direction == DIR_EGRESS && l3 != 0 {
            return false_claim(slot, segs, bytes);
        }
        // No policy can allow what cannot be read (or is not IP at all): denied where the
        // workload is isolated.
        return finish_unmatched(workload, slot, direction, isolated, segs, bytes);
    }

    if pkt.kind == Kind::LinkControl {
        if direction == DIR_EGRESS && !link_claims_hold(workload, pkt) {
            // A workload whose IPv6 address the agent does not know: what it sends from or
            // for an address nobody holds is judged as any packet from an address not its
            // own. A router's message, or a claim on another's address, is false from anyone.
            if workload.flags & (workload_flags::HAS_IPV6 | workload_flags::HOST_SOURCE) == 0
                && !routing_message(pkt)
                && identity::identity_of(pkt.family, &pkt.related.src) == IDENTITY_WORLD
            {
                return spoofed(workload, slot, pkt, l3, isolated, segs, bytes);
            }
            return false_claim(slot, segs, bytes);
        }
        counters::diag(diag::ICMPV6_LINK_CONTROL);
        return Action::Pass;
    }
    // Loopback, which only cgroup hooks see (a veth pod's never reaches TC), carries traffic
    // between the processes of one network namespace: a pod with itself (its own address,
    // never enforced: upstream's AllowLoopback; 127.0.0.1, a sidecar), or for a
    // host-network pod the node's own, always allowed. Neither a spoof nor a peer. Arriving
    // on a real interface, the pod's own address as the source is a spoof, decided by policy.
    if l3 == 0 && on_loopback(skb) {
        counters::count(slot, direction, VERDICT_ALLOWED, segs, bytes);
        return Action::Pass;
    }
    let host_source = workload.flags & workload_flags::HOST_SOURCE != 0;
    // A host-network pod shares the node's netfilter, which its cgroup hooks see the far
    // side of: an answer it gives as the backend of a ClusterIP or NodePort leaves with the
    // Service's address or port again, and only its socket's port says which flow it
    // answers. A reply of a tracked flow only (below); else the packet as it is.
    let host_socket_flow = host_source
        && l3 == 0
        && pkt.kind == Kind::Flow
        && (pkt.tuple.proto == PROTO_TCP || pkt.tuple.proto == PROTO_UDP);
    let mut answer_port = 0u16;
    if host_socket_flow && direction == DIR_EGRESS {
        answer_port = parse::socket_answer_port(skb, pkt);
        if answer_port != 0 {
            // Only the sources the node's NAT gives an answer, the node's own (a NodePort)
            // or a Service's address (a ClusterIP): any other is checked as written.
            let source = identity::identity_of(pkt.family, &pkt.tuple.src);
            if source != IDENTITY_HOST && !is_service_identity(source) {
                answer_port = 0;
            } else {
                // The fast path looked the packet's own port up.
                fast = FastPath::General;
            }
        }
    }
    if direction == DIR_EGRESS && answer_port == 0 && !source_is_own(workload, &pkt) {
        return spoofed(workload, slot, pkt, l3, isolated, segs, bytes);
    }
    // A pod's tunnel packet (VXLAN, Geneve, IP in IP to anyone; GRE to its node) carries a
    // packet whose source nobody checks, which a node that decapsulates it (this one or
    // another: a CNI's VXLAN device) forwards to any pod as from any pod: dropped in either
    // mode, as Calico drops VXLAN and IP in IP from workloads, and counted as a spoof.
    if direction == DIR_EGRESS && !host_source && tunnels(pkt) {
        return false_claim(slot, segs, bytes);
    }

    let Some(config) = CONFIG.get(0) else {
        return Action::Pass;
    };
    // A tick's precision is enough for expiry and rate limits.
    let now = now_ns(config);
    if pkt.kind == Kind::LaterFragment {
        let fkey = frag_key(&pkt);
        // SAFETY: read-only use of the looked-up value.
        match unsafe { FRAGMENTS.get(fkey) } {
            Some(ports) if ports.expires_ns > now => {
                counters::diag(diag::FRAGMENT_MATCHED);
                pkt.tuple.src_port = ports.src_port;
                pkt.tuple.dst_port = ports.dst_port;
                pkt.tuple.echo = ports.echo;
            }
            _ => {
                counters::diag(diag::FRAGMENT_UNKNOWN);
                return finish_unmatched(workload, slot, direction, isolated, segs, bytes);
            }
        }
    }

    if pkt.kind == Kind::Flow
        && (pkt.tuple.proto == PROTO_UDP || pkt.tuple.proto == PROTO_TCP)
        && dns::observe(skb, l3, direction, slot, workload, &pkt, now)
    {
        // Held: the agent hands it back once it learned from it, and it is counted then.
        return Action::Drop;
    }

    if pkt.first_fragment {
        let ports = FragPorts {
            expires_ns: now + config.fragment_timeout_s as u64 * 1_000_000_000,
            src_port: pkt.tuple.src_port,
            dst_port: pkt.tuple.dst_port,
            echo: pkt.tuple.echo,
            _pad: [0; 3],
        };
        let _ = FRAGMENTS.insert(frag_key(&pkt), ports, 0);
    }

    let mut tracked = None;
    if answer_port != 0 {
        let sent_from = pkt.tuple.src_port;
        pkt.tuple.src_port = answer_port;
        let key = conntrack::key_of(&pkt.tuple, pkt.family, slot, direction, host_source);
        if conntrack::related(workload, &key, now, false).is_none() {
            // No such flow: the packet as it is, a spoof unless its source is the pod's.
            pkt.tuple.src_port = sent_from;
            if !source_is_own(workload, &pkt) {
                return spoofed(workload, slot, pkt, l3, isolated, segs, bytes);
            }
        }
    }
    let mut key = conntrack::key_of(&pkt.tuple, pkt.family, slot, direction, host_source);
    if pkt.kind == Kind::IcmpError {
        let related = conntrack::key_of(&pkt.related, pkt.family, slot, direction, host_source);
        if !error_fits_flow(&key, &related, direction) {
            // Quoting a tracked flow is not enough: an error must travel between that
            // flow's ends, or any pod could smuggle packets to anyone as "related".
            counters::diag(diag::ICMP_FOREIGN);
        } else if let Some(t) = conntrack::related(workload, &related, now, true) {
            counters::diag(diag::ICMP_RELATED);
            tracked = Some(t);
            key = related;
        }
    }
    let tracked = match tracked {
        Some(t) => t,
        None => {
            // The fast path looked this key up in both tables already, and missed.
            let untracked = matches!(fast, FastPath::Untracked(_));
            // From a ClusterIP a host-network pod's socket called: the call left DNATed and
            // was tracked with the backend's address; this answer opens the flow of the
            // call as its socket saw it, decided as that call (a flow to the Service).
            let origin = if host_socket_flow
                && direction == DIR_INGRESS
                && is_service_identity(identity::identity_of(pkt.family, &pkt.tuple.src))
                && parse::socket_called_source(skb, pkt)
            {
                DIR_EGRESS
            } else {
                direction
            };
            conntrack::track(
                config,
                workload,
                slot,
                &key,
                direction,
                origin,
                pkt.tcp_flags,
                now,
                untracked,
            )
        }
    };

    let verdict = verdict_of(tracked.decision.decision, workload.mode);
    counters::count(slot, direction, verdict, segs, bytes);
    counters::count_flow(
        &FlowCounterKey {
            slot,
            peer: tracked.decision.peer,
            port: key.counted_port(tracked.origin),
            proto: key.proto,
            direction,
            verdict,
            origin: tracked.origin,
            _pad: [0; 2],
        },
        segs,
        bytes,
    );
    if verdict == VERDICT_ALLOWED {
        return Action::Pass;
    }
    if tracked.new_flow || verdict == VERDICT_DROPPED {
        let info = events::EventInfo {
            slot,
            direction,
            verdict,
            peer: tracked.decision.peer,
            epoch: workload.epoch,
            len: bytes,
        };
        events::emit(config, &pkt, &info, now);
    }
    if verdict == VERDICT_DROPPED {
        Action::Drop
    } else {
        Action::Pass
    }
}

/// Two addresses of a key or packet, compared as two 64-bit words (no memcmp in BPF).
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    // SAFETY: both are 16 readable bytes; unaligned reads of plain integers.
    unsafe {
        let a = a.as_ptr().cast::<u64>();
        let b = b.as_ptr().cast::<u64>();
        a.read_unaligned() == b.read_unaligned()
            && a.add(1).read_unaligned() == b.add(1).read_unaligned()
    }
}

/// Whether a packet is a tunnel's that a CNI may decapsulate: UDP to the ports of VXLAN
/// (4789, and Linux's 8472) and Geneve (6081), IP in IP (4) and IPv6 in IP (41) to anyone,
/// and GRE (47) to the node (GRE elsewhere is also VPN clients' and stays policy's).
#[inline(always)]
fn tunnels(pkt: &Packet) -> bool {
    let t = &pkt.tuple;
    pkt.kind == Kind::Flow
        && (matches!(t.proto, 4 | 41)
            || (t.proto == PROTO_UDP && is_tunnel_port(t.dst_port))
            || (t.proto == 47 && identity::identity_of(pkt.family, &t.dst) == IDENTITY_HOST))
}

/// The UDP ports of VXLAN (4789, Linux's 8472) and Geneve (6081).
#[inline(always)]
pub fn is_tunnel_port(port: u16) -> bool {
    matches!(port, 4789 | 8472 | 6081)
}

/// Whether link plumbing leaving the workload claims only what is its own:
/// - sent from its own, a link-local or the unspecified address (duplicate address
///   detection): a forged source would make a neighbour cache take the packet as another's;
/// - a neighbour advertisement for its own or a link-local address: its target is the
///   address neighbours then reach at the sender;
/// - no router's message (`routing_message`): a pod is no router, and a neighbour that
///   takes router advertisements would route through it.
///
/// A host-network pod speaks for the node, which may run a router or hold addresses of
/// its own choosing (a load balancer's, VRRP's): only its source is checked. Link-local
/// addresses are not checked further: the agent does not know a pod's.
#[inline(always)]
fn link_claims_hold(workload: &WorkloadConfig, pkt: &Packet) -> bool {
    let host = workload.flags & workload_flags::HOST_SOURCE != 0;
    let source = on_link_source(&pkt.tuple.src) || source_is_own(workload, pkt);
    let target = &pkt.related.src;
    let advertised =
        host || same_addr(target, &[0; 16]) || address_is_own(workload, pkt.family, target);
    source & advertised & (host || !routing_message(pkt))
}

/// Link plumbing only a router sends: a router advertisement or a redirect, and neighbour
/// discovery between global addresses longer than its own needs (`parse::link_control`).
#[inline(always)]
fn routing_message(pkt: &Packet) -> bool {
    matches!(
        pkt.related.proto,
        parse::ICMPV6_ROUTER_ADVERTISEMENT
            | parse::ICMPV6_REDIRECT
            | parse::OVERSIZED_NEIGHBOUR_MESSAGE
    )
}

/// A packet leaving a workload with a claim that is not its to make (link plumbing against
/// `link_claims_hold`, an ARP sender address, a tunnel, stacked VLAN tags): counted as a
/// spoof and dropped in either mode. Nothing legitimate sends it, so no mode lets it pass.
#[inline(always)]
fn false_claim(slot: u32, segs: u32, bytes: u32) -> Action {
    counters::diag(diag::SPOOFED);
    counters::spoofed(slot, segs);
    counters::count(slot, DIR_EGRESS, VERDICT_DROPPED, segs, bytes);
    Action::Drop
}

/// An IPv6 source that names no routed address: unspecified (`::`) or link-local.
#[inline(always)]
fn on_link_source(a: &[u8; 16]) -> bool {
    parse::is_link_local(a) || same_addr(a, &[0; 16])
}

/// Whether a packet leaving the workload comes from one of its own addresses: its pod IPs
/// (an IPv6 link-local source never leaves the link), or any address of the node for a
/// host-network workload.
#[inline(always)]
fn source_is_own(workload: &WorkloadConfig, pkt: &Packet) -> bool {
    address_is_own(workload, pkt.family, &pkt.tuple.src)
}

/// Whether `src` is one of the workload's own addresses, as `source_is_own` takes them.
#[inline(always)]
fn address_is_own(workload: &WorkloadConfig, family: u8, src: &[u8; 16]) -> bool {
    if workload.flags & workload_flags::HOST_SOURCE != 0 {
        return identity::identity_of(family, src) == IDENTITY_HOST;
    }
    if family == FAMILY_IPV4 {
        return workload.flags & workload_flags::HAS_IPV4 != 0
            && u32::from_ne_bytes([src[0], src[1], src[2], src[3]])
                == u32::from_ne_bytes(workload.ipv4);
    }
    (workload.flags & workload_flags::HAS_IPV6 != 0 && same_addr(src, &workload.ipv6))
        || parse::is_link_local(src)
}

/// A packet leaving the workload from an address that is not its own: counted, never tracked
/// or counted as the flow of the identity it claims. Dropped in either mode when it claims
/// an address Tollgate knows (another workload, the node, a Service, a resolver), or leaves a
/// pod's own interface (TC) whose address of that family is known: a pod's interface
/// carries its own addresses only (as Calico's and Cilium's source checks hold), and a
/// forged outside source would pass an ipBlock rule at its peer or open a flow its peer
/// then "answers". At a cgroup (a host-network pod, a bridge CNI's, other interfaces of
/// the pod's namespace) by mode where the workload is isolated for egress.
#[inline(always)]
fn spoofed(
    workload: &WorkloadConfig,
    slot: u32,
    pkt: &Packet,
    l3: u32,
    isolated: bool,
    segs: u32,
    bytes: u32,
) -> Action {
    counters::diag(diag::SPOOFED);
    counters::spoofed(slot, segs);
    let own_family_known = if pkt.family == FAMILY_IPV4 {
        workload.flags & workload_flags::HAS_IPV4 != 0
    } else {
        workload.flags & workload_flags::HAS_IPV6 != 0
    };
    // Claiming a resolver's address: it could answer its own query and teach itself any
    // address (its packet to itself comes back through its own interface).
    if (l3 != 0 && own_family_known)
        || identity::identity_of(pkt.family, &pkt.tuple.src) != IDENTITY_WORLD
        || dns::is_resolver(pkt.family, &pkt.tuple.src)
    {
        counters::count(slot, DIR_EGRESS, VERDICT_DROPPED, segs, bytes);
        return Action::Drop;
    }
    finish_unmatched(workload, slot, DIR_EGRESS, isolated, segs, bytes)
}

/// Whether an ICMP error's outer addresses fit the flow it quotes (`related`, keyed from the
/// workload's side like `outer`). Leaving the workload it must go from the flow's local end
/// to its peer; arriving, it must be addressed to the flow's local end (routers on the way
/// may send it, so its source is free).
#[inline(always)]
fn error_fits_flow(outer: &CtKey, related: &CtKey, direction: u8) -> bool {
    if direction == DIR_EGRESS {
        same_addr(&outer.remote, &related.remote) && same_addr(&outer.local, &related.local)
    } else {
        same_addr(&outer.local, &related.local)
    }
}

/// Verdict of a packet no flow can be found for (unreadable, or a fragment whose first
/// fragment was never seen): allowed unless the workload is isolated in that direction.
#[inline(always)]
fn finish_unmatched(
    workload: &WorkloadConfig,
    slot: u32,
    direction: u8,
    isolated: bool,
    segs: u32,
    bytes: u32,
) -> Action {
    let decision = if isolated {
        DECISION_DENY
    } else {
        DECISION_ALLOW
    };
    let verdict = verdict_of(decision, workload.mode);
    counters::count(slot, direction, verdict, segs, bytes);
    if verdict == VERDICT_DROPPED {
        Action::Drop
    } else {
        Action::Pass
    }
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.tuple.src,
        dst: pkt.tuple.dst,
        id: pkt.frag_id,
        proto: pkt.tuple.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
