//! New-flow verdict: is the peer the node itself (always allowed), is the workload isolated in
//! this direction, and if so does any rule of its ruleset allow the peer (by identity, or by
//! ipBlock) on this protocol and port?
//!
//! A Service's virtual address has an identity of its own: the agent writes an allow entry
//! for it only when the policy allows the Service's backends, so no ipBlock ever matches
//! the virtual address itself.

use agent_common::{
    DECISION_ALLOW, DECISION_DENY, IDENTITY_HOST, IDENTITY_WORLD, POLICY_PREFIX_FULL, PolicyKey,
    WorkloadConfig, is_service_identity, workload_flags,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{CIDR_RULES, POLICY, identity};

/// A policy decision and the peer identity it was taken for.
pub struct Decision {
    pub decision: u8,
    pub peer: u32,
}

/// Whether the ruleset allows `peer` on `proto`/`port`. Port-less rules and ranges are
/// shorter prefixes of the same key, so one lookup answers all of them.
#[inline(always)]
fn allows(ruleset: u32, peer: u32, proto: u8, port: u16) -> bool {
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey {
            ruleset,
            peer,
            proto,
            port: port.to_be_bytes(),
            _pad: 0,
        },
    );
    POLICY.get(&key).is_some()
}

/// Decides a new flow of the workload in `direction` with `remote`, to `port` (the port of
/// the side that accepted the flow).
#[inline(always)]
pub fn evaluate(
    workload: &WorkloadConfig,
    direction: u8,
    family: u8,
    remote: &[u8; 16],
    proto: u8,
    port: u16,
) -> Decision {
    let peer = identity::identity_of(family, remote);
    // The node's own traffic (kubelet probes, host-network pods) can never be blocked.
    if peer == IDENTITY_HOST || workload.flags & workload_flags::isolated(direction) == 0 {
        return Decision {
            decision: DECISION_ALLOW,
            peer,
        };
    }
    let ruleset = workload.ruleset[(direction & 1) as usize];
    // World is matched by ipBlock only; branch on each lookup on its own (the verifier
    // rejects the pointer OR that `a || b` over two lookups can compile into).
    if peer != IDENTITY_WORLD && allows(ruleset, peer, proto, port) {
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
    if let Some(set) = CIDR_RULES.get(identity::lpm_key(ruleset, family, remote))
        && allows(ruleset, *set, proto, port)
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
