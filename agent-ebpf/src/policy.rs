//! New-flow verdict: is the peer the node itself (always allowed), is the workload isolated in
//! this direction, and if so does any rule of its ruleset allow the peer (by identity, or by
//! ipBlock) on this protocol and port?
//!
//! A Service's virtual address has an identity of its own: the agent writes an allow entry
//! for it only when the policy allows the Service's backends, so no ipBlock ever matches
//! the virtual address itself.

use agent_common::{
    DECISION_ALLOW, DECISION_DENY, DIR_EGRESS, DNS_PORT, DOMAIN_ID_MASK, IDENTITY_HOST,
    IDENTITY_WORLD, IDENTITY_WORLD_NAMED, POLICY_PREFIX_FULL, PolicyKey, WorkloadConfig, diag,
    is_service_identity, workload_flags,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{CIDR_RULES, EGRESS_EXPIRED, POLICY, POLICY_EXACT, counters, dns, identity};

/// A policy decision and the peer identity it was taken for.
pub struct Decision {
    pub decision: u8,
    pub peer: u32,
}

/// Whether the ruleset allows `peer` on `proto`/`port`: a single-port rule in the hash,
/// else (when the ruleset has any, `prefix_rules`) a port-less rule or a range, shorter
/// prefixes of the same key in the trie.
#[inline(always)]
fn allows(ruleset: u32, prefix_rules: bool, peer: u32, proto: u8, port: u16) -> bool {
    let key = PolicyKey {
        ruleset,
        peer,
        proto,
        port: port.to_be_bytes(),
        _pad: 0,
    };
    // SAFETY: only whether the lookup found an entry is used.
    if unsafe { POLICY_EXACT.get(&key) }.is_some() {
        return true;
    }
    prefix_rules
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
    // The node's own traffic (kubelet probes, host-network pods) can never be blocked.
    if peer == IDENTITY_HOST {
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
    let allowlisted =
        world && direction == DIR_EGRESS && workload.flags & workload_flags::EGRESS_ALLOWLIST != 0;
    if workload.flags & workload_flags::isolated(direction) == 0 {
        if !allowlisted {
            return Decision {
                decision: DECISION_ALLOW,
                peer,
            };
        }
    } else {
        let ruleset = workload.ruleset[(direction & 1) as usize];
        let prefix_rules = workload.flags & workload_flags::prefix_rules(direction) != 0;
        // World is matched by ipBlock only; branch on each lookup on its own (the verifier
        // rejects the pointer OR that `a || b` over two lookups can compile into).
        if !world && allows(ruleset, prefix_rules, peer, proto, port) {
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
            && allows(ruleset, prefix_rules, *set, proto, port)
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
    // Its resolvers are how it learns anything.
    if port == DNS_PORT && dns::is_resolver(family, remote) {
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
