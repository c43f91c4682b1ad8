//! Peer address to identity: a hash holds every single address the agent names (pod IPs,
//! Service frontends, the node's addresses), an LPM trie any shorter CIDR. Anything else
//! is `world`.

use agent_common::{IDENTITY_WORLD, LOCAL_POD_SCOPE, LPM_ADDR_FIXED_BITS, LpmAddr};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{IDENTITIES, IDENTITIES_EXACT};

/// Full-length LPM key for an address, in the given scope (0, or a ruleset).
#[inline(always)]
pub fn lpm_key(scope: u32, family: u8, addr: &[u8; 16]) -> Key<LpmAddr> {
    Key::new(
        LPM_ADDR_FIXED_BITS + 128,
        LpmAddr {
            scope,
            family: family as u32,
            addr: *addr,
        },
    )
}

/// Whether the address is a pod attached on this node (`LOCAL_POD_SCOPE`).
#[inline(always)]
pub fn is_local_pod(family: u8, addr: &[u8; 16]) -> bool {
    let key = LpmAddr {
        scope: LOCAL_POD_SCOPE,
        family: family as u32,
        addr: *addr,
    };
    // SAFETY: only whether the lookup found an entry is used.
    unsafe { IDENTITIES_EXACT.get(&key) }.is_some()
}

/// Identity of a peer address.
#[inline(always)]
pub fn identity_of(family: u8, addr: &[u8; 16]) -> u32 {
    let exact = LpmAddr {
        scope: 0,
        family: family as u32,
        addr: *addr,
    };
    // SAFETY: the value is copied out at once.
    if let Some(id) = unsafe { IDENTITIES_EXACT.get(&exact) } {
        return *id;
    }
    match IDENTITIES.get(Key::new(LPM_ADDR_FIXED_BITS + 128, exact)) {
        Some(id) => *id,
        None => IDENTITY_WORLD,
    }
}
