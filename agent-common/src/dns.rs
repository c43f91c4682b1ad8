//! Egress allowlists by DNS name: the answers the datapath hands to the agent, and what the
//! agent learns from them.

use crate::user_pod;

/// Bytes of a packet a `DnsCapture` carries (from the start of the frame). Longer packets
/// are passed on without being held or learned from (counted as `diag::DNS_TOO_LONG`).
pub const DNS_CAPTURE_BYTES: usize = 2048;
/// Size of the DNS ring buffer in bytes (a power of two, a multiple of the page size):
/// room for about 500 packets in flight.
pub const DNS_RING_BYTES: u32 = 1 << 20;
/// Capacity of `LEARNED`: (workload, address) entries over every workload of the node.
pub const LEARNED_CAPACITY: u32 = 1 << 16;
/// Capacity of `DNS_RESOLVERS`.
pub const DNS_RESOLVER_CAPACITY: u32 = 64;
/// Port ranges one learned address carries (the union over the allowlist rules whose
/// domains matched). An allowlist rule with more ports is refused when compiled.
pub const LEARNED_PORT_RANGES: usize = 8;
/// `skb->mark` of answers the agent hands back after learning from them: the datapath lets
/// them through instead of holding them again. Packets arriving from a pod cross a network
/// namespace on the way, which clears the mark, so no workload can forge it.
pub const DNS_REINJECT_MARK: u32 = 0x5447_0053;
/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// Peer identities of addresses outside the cluster that a workload resolved from a DNS
/// name: `IDENTITY_WORLD_NAMED | domain id`. Used in connection tracking, flow counters and
/// events only (never as a policy key): the agent turns the id back into the name.
pub const IDENTITY_WORLD_NAMED: u32 = 0xc000_0000;
/// Domain ids the agent hands out (the low bits of `IDENTITY_WORLD_NAMED`).
pub const DOMAIN_ID_MASK: u32 = 0x00ff_ffff;

/// Whether a peer identity is an address outside the cluster named by a DNS answer.
#[inline(always)]
pub const fn is_world_named(identity: u32) -> bool {
    identity & 0xff00_0000 == IDENTITY_WORLD_NAMED
}

/// Whether a peer identity is an address outside the cluster, named by DNS or not: what
/// flow counters, the observed-flow record and `tollgate flows` call `world`.
#[inline(always)]
pub const fn is_world(identity: u32) -> bool {
    identity == crate::IDENTITY_WORLD || is_world_named(identity)
}

/// What a `DnsCapture` carries.
pub mod capture_kind {
    /// A query leaving a workload for one of its resolvers: copied, passed on.
    pub const QUERY: u8 = 0;
    /// An answer arriving from a resolver: copied, passed on (the workload has no
    /// allowlist, or the agent is not there to hand it back).
    pub const ANSWER_COPIED: u8 = 1;
    /// An answer held by the datapath: the agent learns from it, then hands it back to the
    /// workload's interface (`DNS_REINJECT_MARK`).
    pub const ANSWER_HELD: u8 = 2;
}

/// A DNS packet to or from a workload's resolver, through the `DNS_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsCapture {
    pub slot: u32,
    /// `WorkloadConfig::generation` of the slot.
    pub generation: u32,
    /// Interface the packet was seen on (TC), 0 for cgroup attachments.
    pub ifindex: u32,
    /// Bytes of `data` that hold the packet (from the frame's start for TC).
    pub len: u32,
    /// Offset of the IP header in `data` (14 for TC, 0 for cgroup).
    pub l3_offset: u8,
    /// `capture_kind`.
    pub kind: u8,
    pub _pad: [u8; 2],
    pub data: [u8; DNS_CAPTURE_BYTES],
}
const _: () = assert!(core::mem::size_of::<DnsCapture>() == 20 + DNS_CAPTURE_BYTES);

/// Single entry of `DNS_CONTROL`, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsControl {
    /// The datapath holds answers only while the monotonic coarse clock is below this:
    /// the agent moves it forward while it runs and sets it to 0 when it stops, so answers
    /// flow straight to workloads whenever the agent is not there to hand them back.
    pub hold_until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<DnsControl>() == 8);

/// Key of `DNS_RESOLVERS`: an address the workloads resolve through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResolverKey {
    pub family: u8,
    // Padding as scalars, not `[u8; 3]`: the programs' BPF backend turns a zeroed array into
    // a call to `memset` (a BPF-to-BPF call to a byte loop) on every lookup.
    pub _pad0: u8,
    pub _pad1: u16,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ResolverKey>() == 20);

/// Key of `LEARNED`: an address one workload got from its resolvers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub slot: u32,
    /// `WorkloadConfig::generation`: what a workload learned dies with it.
    pub generation: u32,
    pub family: u8,
    // Scalars, as in `ResolverKey`.
    pub _pad0: u8,
    pub _pad1: u16,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<LearnedKey>() == 28);
const _: () = assert!(core::mem::offset_of!(LearnedKey, addr) == 12);
const _: () = assert!(core::mem::offset_of!(ResolverKey, addr) == 4);

/// A protocol and port range an allowlist rule allows. `proto` 0 with `lo` 0 means every
/// protocol and port; an unused slot has `proto` 0 and `lo` 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PortRange>() == 6);

impl PortRange {
    pub const ANY: PortRange = PortRange {
        lo: 0,
        hi: 0xffff,
        proto: 0,
        _pad: 0,
    };
    pub const UNUSED: PortRange = PortRange {
        lo: 1,
        hi: 0,
        proto: 0,
        _pad: 0,
    };

    #[inline(always)]
    pub fn allows(&self, proto: u8, port: u16) -> bool {
        (self.proto == 0 && self.lo == 0)
            || (self.proto == proto && self.lo <= port && port <= self.hi)
    }
}

/// Value of `LEARNED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedValue {
    /// New connections are allowed while the coarse monotonic clock is below this (the
    /// answer's TTL, at least the floor, plus the grace period). Established connections
    /// keep going after it.
    pub allow_until_ns: u64,
    /// Domain id of the name the address was resolved from (`IDENTITY_WORLD_NAMED`).
    pub domain: u32,
    /// How many of `ports` are in use; 0 when no allowlist rule allows the name (the entry
    /// then only names the destination).
    pub port_count: u32,
    pub ports: [PortRange; LEARNED_PORT_RANGES],
}
const _: () = assert!(core::mem::size_of::<LearnedValue>() == 64);

user_pod!(
    DnsCapture,
    DnsControl,
    ResolverKey,
    LearnedKey,
    PortRange,
    LearnedValue
);
