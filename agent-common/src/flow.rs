//! Connection tracking and fragment keys.

use crate::user_pod;

/// Connection tracking key, always oriented from the workload's side so that both
/// directions of a connection find the same entry with one lookup.
///
/// IPv4 addresses use the first four bytes of the 16-byte fields, the rest zero.
/// For ICMP echo both ports hold the echo identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    /// Workload slot: two workloads on one node each track their own view of a flow.
    pub slot: u32,
    pub local_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    pub family: u8,
    /// For an ICMP echo flow, which end sent the requests (`echo_end`): a request and its
    /// replies share a key, a request the other way is another flow. 0 for any other.
    pub echo: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 44);

/// `CtKey::echo`: the requests of an ICMP echo flow come from its local end, or its remote.
pub mod echo_end {
    pub const LOCAL: u8 = 1;
    pub const REMOTE: u8 = 2;
}

impl CtKey {
    /// The port of the side that accepted the flow (`origin`: the direction of the packet
    /// that opened it): the one policy is decided on.
    #[inline(always)]
    pub fn service_port(&self, origin: u8) -> u16 {
        if origin == crate::DIR_EGRESS {
            self.remote_port
        } else {
            self.local_port
        }
    }

    /// The port flow counters carry: the service port for TCP, UDP and SCTP, 0 for
    /// protocols without ports (an ICMP echo's identifier is not a port).
    #[inline(always)]
    pub fn counted_port(&self, origin: u8) -> u16 {
        match self.proto {
            crate::PROTO_TCP | crate::PROTO_UDP | crate::PROTO_SCTP => self.service_port(origin),
            _ => 0,
        }
    }
}

/// TCP state bits of a tracked connection.
pub mod tcp_state {
    /// A packet in the reply direction was seen.
    pub const REPLY_SEEN: u8 = 1 << 0;
    /// FIN sent by the side that opened the connection.
    pub const FIN_ORIGIN: u8 = 1 << 1;
    /// FIN sent by the other side.
    pub const FIN_REPLY: u8 = 1 << 2;
    /// RST seen in either direction.
    pub const RST: u8 = 1 << 3;
    /// The opening side acknowledged after the reply was seen: the handshake completed
    /// (until then a flow keeps the opening lifetime, so a SYN flood that the listener
    /// answers does not hold the table for the established one).
    pub const ESTABLISHED: u8 = 1 << 4;
}

/// Policy decision cached in a connection tracking entry.
pub const DECISION_ALLOW: u8 = 0;
pub const DECISION_DENY: u8 = 1;

/// Connection tracking entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// The programs' clock (CLOCK_MONOTONIC_COARSE ns, from jiffies: `Config::ns_per_jiffy`)
    /// after which the entry is stale and the next packet is a new flow.
    pub expires_ns: u64,
    /// Workload policy epoch the decision was taken at; a different epoch re-evaluates.
    pub epoch: u32,
    /// Direction of the packet that opened the flow (the workload's direction).
    pub origin: u8,
    /// `DECISION_ALLOW` or `DECISION_DENY`; the mode is applied per packet.
    pub decision: u8,
    /// `tcp_state` bits.
    pub tcp_state: u8,
    pub _pad: u8,
    /// Identity of the remote side when the decision was taken.
    pub peer: u32,
    /// `WorkloadConfig::generation` of the slot when the flow was tracked: an entry of an
    /// earlier generation belongs to a workload that is gone.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 24);

/// Key of the fragment cache: one IP datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification (32 bits).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Ports of a datagram, learnt from its first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub expires_ns: u64,
    pub src_port: u16,
    pub dst_port: u16,
    /// `Tuple::echo` of an ICMP echo message's first fragment.
    pub echo: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragPorts>() == 16);

/// Node-wide datapath settings (single entry of the `CONFIG` array).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Lifetime of a TCP connection once the reply direction was seen.
    pub ct_tcp_established_s: u32,
    /// Lifetime of a TCP connection before any reply (SYN sent).
    pub ct_tcp_opening_s: u32,
    /// Lifetime of a TCP connection after RST or FIN from both sides.
    pub ct_tcp_closing_s: u32,
    /// Lifetime of UDP, ICMP and other flows.
    pub ct_other_s: u32,
    /// Minimum spacing of flow events per workload, in ns (1e9 / rate); 0 disables events.
    pub event_interval_ns: u64,
    /// Events a workload may emit back to back before the rate applies.
    pub event_burst: u32,
    /// How long a fragment's ports are remembered.
    pub fragment_timeout_s: u32,
    /// Entries of the main connection tracking table one workload may hold; its new flows
    /// beyond that go to the overflow table. 0: no limit.
    pub ct_share: u32,
    /// Length of a kernel tick in ns, with `clock_offset_ns`: the programs' clock is
    /// `jiffies * ns_per_jiffy + clock_offset_ns`, CLOCK_MONOTONIC_COARSE to within two
    /// ticks and never ahead of CLOCK_MONOTONIC. Set by the agent at load (it measures
    /// both); 0: the programs read the coarse clock itself.
    pub ns_per_jiffy: u32,
    pub clock_offset_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 48);

impl Default for Config {
    fn default() -> Self {
        Config {
            ct_tcp_established_s: 6 * 3600,
            ct_tcp_opening_s: 60,
            ct_tcp_closing_s: 10,
            ct_other_s: 60,
            event_interval_ns: 1_000_000_000 / 10,
            event_burst: 20,
            fragment_timeout_s: 30,
            ct_share: crate::CONNTRACK_CAPACITY / 100 * crate::CONNTRACK_SHARE_PERCENT,
            ns_per_jiffy: 0,
            clock_offset_ns: 0,
        }
    }
}

user_pod!(CtKey, CtEntry, FragKey, FragPorts, Config);
