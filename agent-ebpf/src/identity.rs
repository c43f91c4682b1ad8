//! Peer address to identity: one LPM trie holds every pod IP (as /32 or /128) and any
//! CIDR the agent wants named. Anything else is `world`.

use agent_common::{IDENTITY_WORLD, LPM_ADDR_FIXED_BITS, LpmAddr};
use aya_ebpf::maps::lpm_trie::Key;

use crate::IDENTITIES;

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

/// Identity of a peer address.
#[inline(always)]
pub fn identity_of(family: u8, addr: &[u8; 16]) -> u32 {
    match IDENTITIES.get(lpm_key(0, family, addr)) {
        Some(id) => *id,
        None => IDENTITY_WORLD,
    }
}
