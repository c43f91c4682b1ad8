//! Workload configuration, identity and policy keys.

use crate::user_pod;

/// Per-workload configuration, indexed by slot in the `WORKLOADS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// `workload_flags` bits.
    pub flags: u32,
    /// `MODE_LOG` or `MODE_DROP`.
    pub mode: u32,
    /// Ruleset of the policy trie for each direction (index `DIR_INGRESS` / `DIR_EGRESS`).
    pub ruleset: [u32; 2],
    /// Bumped by the agent whenever the workload's rules, isolation or peers change, so
    /// tracked flows are re-evaluated on their next packet. Never reused for a slot.
    pub epoch: u32,
    /// Bumped only when the workload's own rules or isolation change: what flows to a
    /// Service are re-evaluated on. A change of a Service's backends leaves established
    /// connections alone and decides new ones with the new backends.
    pub rules_epoch: u32,
    /// The workload's IPv4 address (`HAS_IPV4`): the only IPv4 source it may send from.
    pub ipv4: [u8; 4],
    /// Changes whenever the slot gets a new workload: tracked flows of another generation
    /// are someone else's and never match, so freeing a slot needs no table walk.
    pub generation: u32,
    /// The workload's IPv6 address (`HAS_IPV6`); link-local sources are always its own.
    pub ipv6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<WorkloadConfig>() == 48);

/// Bits of `WorkloadConfig::flags`.
pub mod workload_flags {
    /// The slot holds a workload.
    pub const ACTIVE: u32 = 1 << 0;
    /// At least one policy selects the workload for ingress.
    pub const ISOLATED_INGRESS: u32 = 1 << 1;
    /// At least one policy selects the workload for egress.
    pub const ISOLATED_EGRESS: u32 = 1 << 2;
    /// `WorkloadConfig::ipv4` holds the workload's IPv4 address.
    pub const HAS_IPV4: u32 = 1 << 3;
    /// `WorkloadConfig::ipv6` holds the workload's IPv6 address.
    pub const HAS_IPV6: u32 = 1 << 4;
    /// A host-network workload: it sends from the node's addresses (identity host).
    pub const HOST_SOURCE: u32 = 1 << 5;
    /// An EgressAllowlist selects the workload: egress to addresses outside the cluster
    /// is allowed only by ipBlock rules or by what its DNS answers taught (`LEARNED`), and
    /// the answers it gets are held until the agent has learned from them.
    pub const EGRESS_ALLOWLIST: u32 = 1 << 6;
    /// The ingress ruleset has entries in the `POLICY` trie (port ranges): without it, the
    /// trie is not looked up.
    pub const PREFIX_RULES_INGRESS: u32 = 1 << 7;
    /// As `PREFIX_RULES_INGRESS`, for the egress ruleset.
    pub const PREFIX_RULES_EGRESS: u32 = 1 << 8;
    /// The ingress ruleset has ipBlocks (`CIDR_RULES` entries): without it, the ipBlock
    /// trie is not looked up.
    pub const CIDR_RULES_INGRESS: u32 = 1 << 9;
    /// As `CIDR_RULES_INGRESS`, for the egress ruleset.
    pub const CIDR_RULES_EGRESS: u32 = 1 << 10;
    /// The ingress ruleset allows some peer every port of a protocol (`POLICY_EXACT` keys
    /// of kind `policy_kind::ANY_PORT`): without it, that key is not looked up.
    pub const ANY_PORT_RULES_INGRESS: u32 = 1 << 11;
    /// As `ANY_PORT_RULES_INGRESS`, for the egress ruleset.
    pub const ANY_PORT_RULES_EGRESS: u32 = 1 << 12;
    /// The ingress ruleset has rules without ports (`POLICY_EXACT` keys of kind
    /// `policy_kind::ANY_PROTO`): without it, that key is not looked up.
    pub const ANY_PROTO_RULES_INGRESS: u32 = 1 << 13;
    /// As `ANY_PROTO_RULES_INGRESS`, for the egress ruleset.
    pub const ANY_PROTO_RULES_EGRESS: u32 = 1 << 14;

    /// The isolation bit of a direction (`DIR_INGRESS` / `DIR_EGRESS`).
    pub const fn isolated(direction: u8) -> u32 {
        if direction == crate::DIR_INGRESS {
            ISOLATED_INGRESS
        } else {
            ISOLATED_EGRESS
        }
    }

    /// The prefix-rules bit of a direction.
    pub const fn prefix_rules(direction: u8) -> u32 {
        if direction == crate::DIR_INGRESS {
            PREFIX_RULES_INGRESS
        } else {
            PREFIX_RULES_EGRESS
        }
    }

    /// The every-port-of-a-protocol bit of a direction.
    pub const fn any_port_rules(direction: u8) -> u32 {
        if direction == crate::DIR_INGRESS {
            ANY_PORT_RULES_INGRESS
        } else {
            ANY_PORT_RULES_EGRESS
        }
    }

    /// The rules-without-ports bit of a direction.
    pub const fn any_proto_rules(direction: u8) -> u32 {
        if direction == crate::DIR_INGRESS {
            ANY_PROTO_RULES_INGRESS
        } else {
            ANY_PROTO_RULES_EGRESS
        }
    }

    /// Every bit that says which policy lookups a ruleset of `direction` needs.
    pub const fn lookups(direction: u8) -> u32 {
        prefix_rules(direction)
            | cidr_rules(direction)
            | any_port_rules(direction)
            | any_proto_rules(direction)
    }

    /// The ipBlock-rules bit of a direction.
    pub const fn cidr_rules(direction: u8) -> u32 {
        if direction == crate::DIR_INGRESS {
            CIDR_RULES_INGRESS
        } else {
            CIDR_RULES_EGRESS
        }
    }
}

/// Data of an LPM trie key over an address: `{scope, family}` are always matched in full,
/// then the address bits. Prefix length = 64 + address prefix length.
///
/// `scope` is 0 in the identity trie and the ruleset in the ipBlock trie. IPv4 uses the
/// first four bytes of `addr`; `family` keeps `::/0` from matching IPv4 peers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LpmAddr {
    pub scope: u32,
    pub family: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<LpmAddr>() == 24);

/// Bits of `LpmAddr` before the address.
pub const LPM_ADDR_FIXED_BITS: u32 = 64;

/// One allowed (peer, protocol, port prefix) of a ruleset.
///
/// Prefix lengths: 64 = any protocol and port (a rule without ports), 72 = one protocol,
/// any port, 72 + n = the first n bits of the port (big-endian, so ranges split into
/// aligned blocks). The whole prefixes (88, 72 and 64) are keys of the `POLICY_EXACT`
/// hash, told apart by `kind` (`policy_kind`); port ranges are prefixes of the ruleset's
/// trie, where `kind` is 0 and beyond the prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub ruleset: u32,
    /// Workload identity, or `PEER_CIDR_SET_BASE | n` for ipBlock set n of the ruleset.
    pub peer: u32,
    pub proto: u8,
    /// Destination port, big-endian.
    pub port: [u8; 2],
    /// Which whole prefix a `POLICY_EXACT` key stands for (`policy_kind`); 0 in the tries.
    pub kind: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

/// `PolicyKey::kind` of a `POLICY_EXACT` key: one port, every port of a protocol (port 0),
/// or every protocol and port (protocol and port 0). A packet to port 0 thus never meets a
/// rule for every port by its exact key: the kinds differ.
pub mod policy_kind {
    pub const PORT: u8 = 0;
    pub const ANY_PORT: u8 = 1;
    pub const ANY_PROTO: u8 = 2;
}

/// Prefix lengths of `PolicyKey`.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 64;
pub const POLICY_PREFIX_ANY_PORT: u32 = 72;
pub const POLICY_PREFIX_FULL: u32 = 88;

/// Value of a policy trie entry: which compiled rule allowed it, for attribution.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 4);

/// One bucket of a direct-mapped routing cache: an interface index or cgroup id and the
/// slot of its workload. `id` 0 is an empty bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRoute {
    pub id: u64,
    pub slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SlotRoute>() == 16);

/// Bucket of an interface index or cgroup id in a routing cache.
#[inline(always)]
pub const fn slot_cache_bucket(id: u64) -> u32 {
    (id as u32) & (crate::SLOT_CACHE_CAPACITY - 1)
}

/// Key of `NODE_PORTS`: a Service's NodePort on the node's addresses of one family.
/// kube-proxy DNATs a connection to it, past the hooks of the pod that opens it, to a
/// backend of the Service, as it does one to the Service's ClusterIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodePortKey {
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<NodePortKey>() == 4);

/// Value of `NODE_PORTS`: the Service frontend of that family a NodePort leads to, and the
/// Service port of the NodePort (what the frontend's rules name).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodePortTarget {
    pub identity: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<NodePortTarget>() == 8);

user_pod!(
    WorkloadConfig,
    LpmAddr,
    PolicyKey,
    PolicyValue,
    SlotRoute,
    NodePortKey,
    NodePortTarget
);
