//! New-flow verdict: is the peer the node itself (always allowed), is the workload isolated in
//! this direction, and if so does any rule of its ruleset allow the peer (by identity, or by
//! ipBlock) on this protocol and port?
//!
//! A Service's virtual address has an identity of its own: the agent writes an allow entry
//! for it only when the policy allows the Service's backends, so no ipBlock ever matches
//! the virtual address itself.

use agent_common::{
    DECISION_ALLOW, DECISION_DENY, DIR_EGRESS, DNS_PORT, DOMAIN_ID_MASK, FAMILY_IPV4,
    IDENTITY_HOST, IDENTITY_WORLD, IDENTITY_WORLD_NAMED, NodePortKey, NodePortTarget,
    POLICY_PREFIX_FULL, PROTO_TCP, PROTO_UDP, PolicyKey, WorkloadConfig, diag, is_service_identity,
    policy_kind, workload_flags,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    CIDR_RULES, EGRESS_EXPIRED, NODE_PORTS, POLICY, POLICY_EXACT, SERVICES_OUTSIDE, counters, dns,
    identity,
};

/// Whether a Service identity has a backend outside the cluster.
#[inline(always)]
fn reaches_outside(service: u32) -> bool {
    // SAFETY: a read of a value the agent writes whole.
    unsafe { SERVICES_OUTSIDE.get(&service) }.is_some()
}

/// The Service frontend and port a NodePort of the node leads to.
#[inline(always)]
fn node_port(family: u8, proto: u8, port: u16) -> Option<NodePortTarget> {
    let key = NodePortKey {
        port,
        proto,
        family,
    };
    // SAFETY: a copy of a value the agent writes whole.
    unsafe { NODE_PORTS.get(&key) }.copied()
}

/// A policy decision and the peer identity it was taken for.
pub struct Decision {
    pub decision: u8,
    pub peer: u32,
}

/// Whether the ruleset allows `peer` on `proto`/`port`: a rule for the port, for every port
/// of the protocol, or without ports, each a key of the hash; else a port range, a shorter
/// prefix of the key in the ruleset's trie. `lookups`: the workload's flags, which say which
/// of these the ruleset of `direction` has (the single-port key is always looked up).
#[inline(always)]
fn allows(ruleset: u32, lookups: u32, direction: u8, peer: u32, proto: u8, port: u16) -> bool {
    let key = PolicyKey {
        ruleset,
        peer,
        proto,
        port: port.to_be_bytes(),
        kind: policy_kind::PORT,
    };
    // SAFETY (each lookup): only whether it found an entry is used.
    if unsafe { POLICY_EXACT.get(&key) }.is_some() {
        return true;
    }
    if lookups & workload_flags::any_port_rules(direction) != 0 {
        let any_port = PolicyKey {
            port: [0, 0],
            kind: policy_kind::ANY_PORT,
            ..key
        };
        if unsafe { POLICY_EXACT.get(&any_port) }.is_some() {
            return true;
        }
    }
    if lookups & workload_flags::any_proto_rules(direction) != 0 {
        let any_proto = PolicyKey {
            proto: 0,
            port: [0, 0],
            kind: policy_kind::ANY_PROTO,
            ..key
        };
        if unsafe { POLICY_EXACT.get(&any_proto) }.is_some() {
            return true;
        }
    }
    lookups & workload_flags::prefix_rules(direction) != 0
        && POLICY
            .get(ruleset)
            .is_some_and(|trie| trie.get(&Key::new(POLICY_PREFIX_FULL, key)).is_some())
}

/// Decides a flow of the workload in `direction` with `remote`, to `port` (the port of the
/// side that accepted the flow). `established`: the flow is tracked and decided again
/// because the workload's rules changed (a learned address that expired since still
/// carries it).
///
/// An address outside the cluster that the workload resolved gets the identity of its name
/// (`IDENTITY_WORLD_NAMED`); for a workload an EgressAllowlist selects it is also what
/// allows it, besides ipBlock rules.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    workload: &WorkloadConfig,
    slot: u32,
    direction: u8,
    family: u8,
    remote: &[u8; 16],
    proto: u8,
    port: u16,
    now: u64,
    established: bool,
) -> Decision {
    let mut peer = identity::identity_of(family, remote);
    let host_source = workload.flags & workload_flags::HOST_SOURCE != 0;
    let mut port = port;
    // A pod's connection to a NodePort of the node is one to the Service: kube-proxy DNATs
    // it to a backend past this hook, as it does one to the ClusterIP. On any address of
    // 127.0.0.0/8 too: kube-proxy's rule takes every local address (and sets
    // `route_localnet`), where the node's own identity holds only the addresses it has.
    let loopback_v4 = family == FAMILY_IPV4 && remote[0] == 127;
    if (peer == IDENTITY_HOST || loopback_v4)
        && direction == DIR_EGRESS
        && !host_source
        && let Some(target) = node_port(family, proto, port)
    {
        peer = target.identity;
        port = target.port;
    }
    // The node's own traffic (kubelet probes, host-network pods) can never be blocked; and
    // a host-network workload's traffic with a pod of this node is that pod's node traffic.
    if peer == IDENTITY_HOST || (host_source && identity::is_local_pod(family, remote)) {
        return Decision {
            decision: DECISION_ALLOW,
            peer,
        };
    }
    let world = peer == IDENTITY_WORLD;
    let learned = if world && direction == DIR_EGRESS {
        dns::learned(slot, workload, family, remote)
    } else {
        None
    };
    if let Some(l) = learned {
        peer = IDENTITY_WORLD_NAMED | (l.domain & DOMAIN_ID_MASK);
    }
    // A Service with a backend outside the cluster is the outside too for an allowlisted
    // workload: kube-proxy's DNAT would take the connection there. (Where the workload's
    // NetworkPolicies isolate its egress, the Service's entry exists only when an ipBlock
    // allows every such backend.)
    let allowlisted = direction == DIR_EGRESS
        && workload.flags & workload_flags::EGRESS_ALLOWLIST != 0
        && (world || (is_service_identity(peer) && reaches_outside(peer)));
    if workload.flags & workload_flags::isolated(direction) == 0 {
        if !allowlisted {
            return Decision {
                decision: DECISION_ALLOW,
                peer,
            };
        }
    } else {
        let ruleset = workload.ruleset[(direction & 1) as usize];
        // World is matched by ipBlock only; branch on each lookup on its own (the verifier
        // rejects the pointer OR that `a || b` over two lookups can compile into).
        if !world && allows(ruleset, workload.flags, direction, peer, proto, port) {
            return Decision {
                decision: DECISION_ALLOW,
                peer,
            };
        }
        if is_service_identity(peer) {
            return Decision {
                decision: DECISION_DENY,
                peer,
            };
        }
        if workload.flags & workload_flags::cidr_rules(direction) != 0
            && let Some(trie) = CIDR_RULES.get(ruleset)
            && let Some(set) = trie.get(&identity::lpm_key(ruleset, family, remote))
            && allows(ruleset, workload.flags, direction, *set, proto, port)
        {
            return Decision {
                decision: DECISION_ALLOW,
                peer,
            };
        }
        if !allowlisted {
            return Decision {
                decision: DECISION_DENY,
                peer,
            };
        }
    }
    // Outside the cluster, from a workload an EgressAllowlist selects.
    if let Some(l) = learned
        && dns::ports_allow(l, proto, port)
    {
        if established || now < l.allow_until_ns {
            return Decision {
                decision: DECISION_ALLOW,
                peer,
            };
        }
        counters::diag(diag::EGRESS_EXPIRED);
        if let Some(c) = EGRESS_EXPIRED.get_ptr_mut(slot) {
            // SAFETY: per-CPU slot of a successful lookup.
            unsafe { *c += 1 };
        }
    }
    // Its resolvers are how it learns anything (over UDP or TCP: an ICMP echo's identifier
    // is no port).
    if port == DNS_PORT
        && (proto == PROTO_UDP || proto == PROTO_TCP)
        && dns::is_resolver(family, remote)
    {
        return Decision {
            decision: DECISION_ALLOW,
            peer,
        };
    }
    Decision {
        decision: DECISION_DENY,
        peer,
    }
}
