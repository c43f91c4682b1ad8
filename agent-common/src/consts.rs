//! Map names, capacities and the numeric codes both sides agree on.

/// Workload slots per node. Slot 0 is reserved: packets seen at an attachment point that has
/// no workload registered are counted there and always pass.
pub const MAX_WORKLOADS: u32 = 1024;
/// The slot that collects traffic of attachment points with no registered workload.
pub const SLOT_UNREGISTERED: u32 = 0;

/// Capacity of the peer address to identity trie (pod IPs and CIDRs).
pub const IDENTITY_CAPACITY: u32 = 1 << 17;
/// Capacity of the policy trie (ruleset, peer, protocol, port prefix).
pub const POLICY_CAPACITY: u32 = 1 << 18;
/// Rulesets (`ruleset_of`: two per slot), each with a policy trie and an ipBlock trie of
/// its own once it has entries for them.
pub const RULESET_CAPACITY: u32 = 2 * MAX_WORKLOADS;
/// Capacity of the per-ruleset ipBlock trie.
pub const CIDR_RULE_CAPACITY: u32 = 1 << 15;
/// Default capacity of the connection tracking LRU; the agent may size it at load time.
pub const CONNTRACK_CAPACITY: u32 = 1 << 18;
/// Capacity of the per-flow counters (LRU: the agent reads them every few seconds, so an
/// eviction loses at most the packets of one interval).
pub const FLOW_COUNTER_CAPACITY: u32 = 1 << 16;
/// Buckets of the direct-mapped flow series table (`FLOW_SERIES`): peer pairs the agent
/// has seen get a bucket there, so their packets are counted with array lookups instead of
/// a hash lookup. A power of two.
pub const FLOW_SERIES_CAPACITY: u32 = 1 << 14;
/// Buckets of the direct-mapped routing caches (`TC_SLOT_CACHE`, `CGROUP_SLOT_CACHE`) in
/// front of `TC_SLOTS` and `CGROUP_SLOTS`. A power of two.
pub const SLOT_CACHE_CAPACITY: u32 = 4 * MAX_WORKLOADS;
/// Default share of the connection tracking table one workload may fill, in percent; its
/// flows beyond that go to the overflow table (`CT_OVERFLOW`).
pub const CONNTRACK_SHARE_PERCENT: u32 = 25;
/// Capacity of the overflow table relative to the main one (divisor).
pub const CONNTRACK_OVERFLOW_DIVISOR: u32 = 4;
/// Capacity of the first-fragment port cache.
pub const FRAGMENT_CAPACITY: u32 = 8192;
/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 1 << 18;
/// How many cgroup ancestors the cgroup program walks to find the workload of a socket that
/// lives in a child cgroup of the attached directory (a container inside a pod).
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// How many IPv6 extension headers the parser skips before giving up.
pub const MAX_IPV6_EXT_HEADERS: u32 = 6;

/// Version of the map layout: bumped by hand when a map's meaning changes, and mixed with
/// the sizes of every shared type so a changed struct cannot slip through. Pinned maps of
/// another layout are never adopted.
pub const LAYOUT_VERSION: u64 = {
    use core::mem::size_of;
    let manual: u64 = 9;
    let sizes = [
        size_of::<crate::CtKey>(),
        size_of::<crate::CtEntry>(),
        size_of::<crate::FragKey>(),
        size_of::<crate::FragPorts>(),
        size_of::<crate::Config>(),
        size_of::<crate::WorkloadConfig>(),
        size_of::<crate::LpmAddr>(),
        size_of::<crate::PolicyKey>(),
        size_of::<crate::PolicyValue>(),
        size_of::<crate::Counter>(),
        size_of::<crate::FlowCounterKey>(),
        size_of::<crate::FlowEvent>(),
        size_of::<crate::EventBucket>(),
        size_of::<crate::SlotRoute>(),
        size_of::<crate::DnsCapture>(),
        size_of::<crate::LearnedKey>(),
        size_of::<crate::LearnedValue>(),
        size_of::<crate::ResolverKey>(),
        size_of::<crate::DnsControl>(),
        FLOW_SERIES_CAPACITY as usize,
        SLOT_CACHE_CAPACITY as usize,
        MAX_WORKLOADS as usize,
        diag::COUNT as usize,
        IDENTITY_HOST as usize,
        IDENTITY_SERVICE_BASE as usize,
    ];
    // FNV-1a over the sizes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ manual;
    let mut i = 0;
    while i < sizes.len() {
        h ^= sizes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
};

/// Map names as they appear in the object file (and as pin names under bpffs).
pub mod map_names {
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const TC_SLOTS: &str = "TC_SLOTS";
    pub const CGROUP_SLOTS: &str = "CGROUP_SLOTS";
    pub const TC_SLOT_CACHE: &str = "TC_SLOT_CACHE";
    pub const CGROUP_SLOT_CACHE: &str = "CGROUP_SLOT_CACHE";
    pub const IDENTITIES: &str = "IDENTITIES";
    pub const IDENTITIES_EXACT: &str = "IDENTITIES_EXACT";
    pub const POLICY: &str = "POLICY";
    pub const POLICY_EXACT: &str = "POLICY_EXACT";
    pub const CIDR_RULES: &str = "CIDR_RULES";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const CT_OVERFLOW: &str = "CT_OVERFLOW";
    pub const CT_SHARES: &str = "CT_SHARES";
    pub const CT_OVERFLOWED: &str = "CT_OVERFLOWED";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SPOOFED: &str = "SPOOFED";
    pub const FLOW_COUNTERS: &str = "FLOW_COUNTERS";
    pub const FLOW_SERIES_KEYS: &str = "FLOW_SERIES_KEYS";
    pub const FLOW_SERIES: &str = "FLOW_SERIES";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUCKETS: &str = "EVENT_BUCKETS";
    pub const CONFIG: &str = "CONFIG";
    pub const DIAG: &str = "DIAG";
    pub const DNS_EVENTS: &str = "DNS_EVENTS";
    pub const DNS_RESOLVERS: &str = "DNS_RESOLVERS";
    pub const DNS_CONTROL: &str = "DNS_CONTROL";
    pub const LEARNED: &str = "LEARNED";
    pub const EGRESS_EXPIRED: &str = "EGRESS_EXPIRED";
    pub const SERVICES_OUTSIDE: &str = "SERVICES_OUTSIDE";
    pub const NODE_PORTS: &str = "NODE_PORTS";
    /// One u64: `LAYOUT_VERSION` of the agent that created the pins.
    pub const LAYOUT: &str = "LAYOUT";
}

/// Program names in the object file.
pub mod program_names {
    /// TC on the host side of the workload's interface, host ingress = workload egress.
    pub const TC_FROM_POD: &str = "tc_from_pod";
    /// TC on the host side of the workload's interface, host egress = workload ingress.
    pub const TC_TO_POD: &str = "tc_to_pod";
    /// cgroup_skb ingress on the workload's cgroup v2 directory.
    pub const CG_INGRESS: &str = "cg_ingress";
    /// cgroup_skb egress on the workload's cgroup v2 directory.
    pub const CG_EGRESS: &str = "cg_egress";
    /// An empty TC program, the baseline of benchmarks; never attached.
    pub const TC_BASELINE: &str = "tc_baseline";
    /// Writes the kernel's jiffies into the packet: run by the agent to tie them to
    /// CLOCK_MONOTONIC_COARSE (`Config::ns_per_jiffy`). Never attached.
    pub const TC_JIFFIES: &str = "tc_jiffies";
    /// A connection tracking lookup and insert and nothing else: what the kernel's table
    /// costs a new flow, for the benchmark. Never attached.
    pub const TC_TABLE_FLOOR: &str = "tc_table_floor";
}

/// Direction, always the workload's: ingress is traffic into the workload.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;
pub const DIRECTIONS: usize = 2;

/// Verdict of a packet.
pub const VERDICT_ALLOWED: u8 = 0;
pub const VERDICT_WOULD_DROP: u8 = 1;
pub const VERDICT_DROPPED: u8 = 2;
pub const VERDICTS: usize = 3;

/// Mode of a workload.
pub const MODE_LOG: u8 = 0;
pub const MODE_DROP: u8 = 1;

/// Address families as stored in keys (the IP version number).
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers the datapath understands.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Identity of addresses that belong to no workload: "outside the cluster".
/// Only ipBlock rules match it.
pub const IDENTITY_WORLD: u32 = 1;
/// Identity of the node's own addresses (and so of host-network pods on this node): traffic
/// between a workload and its node is always allowed, in both directions and both modes.
pub const IDENTITY_HOST: u32 = 2;
/// `LpmAddr::scope` of the `IDENTITIES_EXACT` keys that name the address of a pod attached
/// on this node (value: its slot). A host-network workload shares the node's addresses, so
/// its traffic with such a pod is the node's own traffic for that pod, always allowed: both
/// ends decide it the same way.
pub const LOCAL_POD_SCOPE: u32 = 1;
/// Identities at or above this value (and below `PEER_CIDR_SET_BASE`) name a Service's
/// virtual addresses of one family: a flow to one is allowed only by the `POLICY` entries the
/// agent writes for it after checking every backend, never by an ipBlock on the virtual
/// address itself.
pub const IDENTITY_SERVICE_BASE: u32 = 0x4000_0000;
/// Capacity of `SERVICES_OUTSIDE`: Services with a backend outside the cluster (an
/// EndpointSlice written by hand that points out of it).
pub const SERVICES_OUTSIDE_CAPACITY: u32 = 1 << 14;
/// Capacity of `NODE_PORTS`: the NodePorts of every Service and the hostPorts of this
/// node's pods, both families and every protocol (the default NodePort range holds 2,768
/// ports of each protocol).
pub const NODE_PORTS_CAPACITY: u32 = 1 << 14;
/// First identity the agent hands out to a set of workloads (namespace + labels).
pub const IDENTITY_FIRST_WORKLOAD: u32 = 256;
/// Peers of the policy trie at or above this value are ipBlock sets of one ruleset (the CIDR
/// trie maps an address to one of them), not workload identities.
pub const PEER_CIDR_SET_BASE: u32 = 0x8000_0000;

/// Whether an identity names a Service's virtual addresses.
#[inline(always)]
pub const fn is_service_identity(identity: u32) -> bool {
    identity >= IDENTITY_SERVICE_BASE && identity < PEER_CIDR_SET_BASE
}

/// Datapath diagnostics: indices of the per-CPU `DIAG` array.
pub mod diag {
    /// Frames that are neither IP nor ARP (LLDP, VLAN-tagged, ...): counted per workload,
    /// denied where the workload is isolated in that direction.
    pub const NON_IP: u32 = 0;
    /// Headers shorter than they claim or than the packet: counted, verdict by isolation.
    pub const TRUNCATED: u32 = 1;
    /// IPv4 header length or version that makes no sense.
    pub const BAD_HEADER: u32 = 2;
    /// More IPv6 extension headers than the parser follows, or ESP.
    pub const IPV6_EXT_UNPARSED: u32 = 3;
    /// A non-first fragment whose first fragment was never seen.
    pub const FRAGMENT_UNKNOWN: u32 = 4;
    /// A non-first fragment that got its ports from the first one.
    pub const FRAGMENT_MATCHED: u32 = 5;
    /// Connection tracking insert failed.
    pub const CT_INSERT_FAILED: u32 = 6;
    /// Flow events written to the ring buffer.
    pub const EVENT_EMITTED: u32 = 7;
    /// Flow events suppressed by the per-workload token bucket.
    pub const EVENT_RATE_LIMITED: u32 = 8;
    /// Flow events lost because the ring buffer was full.
    pub const EVENT_LOST: u32 = 9;
    /// IPv6 neighbour discovery and MLD: always passed, not counted per workload.
    pub const ICMPV6_LINK_CONTROL: u32 = 10;
    /// ICMP errors that matched a tracked flow.
    pub const ICMP_RELATED: u32 = 11;
    /// Packets at an attachment point with no registered workload.
    pub const UNREGISTERED: u32 = 12;
    /// ARP: link plumbing, always passed, not counted per workload.
    pub const ARP: u32 = 13;
    /// Packets leaving a workload from an address that is not the workload's.
    pub const SPOOFED: u32 = 14;
    /// ICMP errors quoting a flow whose outer addresses do not fit that flow: evaluated as
    /// ICMP packets of their own.
    pub const ICMP_FOREIGN: u32 = 15;
    /// New flows tracked in the overflow table because their workload held its whole
    /// share of the main one.
    pub const CT_OVERFLOW: u32 = 16;
    /// DNS queries and answers copied to the agent (held or not).
    pub const DNS_CAPTURED: u32 = 17;
    /// DNS answers held until the agent learned from them.
    pub const DNS_HELD: u32 = 18;
    /// DNS packets not captured because the DNS ring buffer was full: passed on unheld.
    pub const DNS_LOST: u32 = 19;
    /// DNS packets longer than a capture: passed on unheld, not learned from.
    pub const DNS_TOO_LONG: u32 = 20;
    /// New connections to an address whose learned name had expired.
    pub const EGRESS_EXPIRED: u32 = 21;
    /// Number of diagnostic counters.
    pub const COUNT: u32 = 22;

    /// Names, in index order, for metrics and `status`.
    pub const NAMES: [&str; COUNT as usize] = [
        "non_ip",
        "truncated",
        "bad_header",
        "ipv6_ext_unparsed",
        "fragment_unknown",
        "fragment_matched",
        "ct_insert_failed",
        "event_emitted",
        "event_rate_limited",
        "event_lost",
        "icmpv6_link_control",
        "icmp_related",
        "unregistered",
        "arp",
        "spoofed",
        "icmp_foreign",
        "ct_overflow",
        "dns_captured",
        "dns_held",
        "dns_lost",
        "dns_too_long",
        "egress_expired",
    ];
}
