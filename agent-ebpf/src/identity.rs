//! Peer address to identity: one LPM trie holds every pod IP (as /32 or /128) and any
//! CIDR the agent wants named. Anything else is `world`.

use agent_common::{
    FAMILY_IPV4, IDENTITY_WORLD, LPM_ADDR_FIXED_BITS, LpmAddr, WorkloadConfig, workload_flags,
};
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

/// Two addresses of a key or packet, compared as two 64-bit words (no memcmp in BPF).
#[inline(always)]
pub fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    // SAFETY: both are 16 readable bytes; unaligned reads of plain integers.
    unsafe {
        let a = a.as_ptr().cast::<u64>();
        let b = b.as_ptr().cast::<u64>();
        a.read_unaligned() == b.read_unaligned()
            && a.add(1).read_unaligned() == b.add(1).read_unaligned()
    }
}

/// Whether `addr` is one of the workload's pod IPs.
#[inline(always)]
pub fn is_own_address(workload: &WorkloadConfig, family: u8, addr: &[u8; 16]) -> bool {
    if family == FAMILY_IPV4 {
        return workload.flags & workload_flags::HAS_IPV4 != 0
            && u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
                == u32::from_ne_bytes(workload.ipv4);
    }
    workload.flags & workload_flags::HAS_IPV6 != 0 && same_addr(addr, &workload.ipv6)
}
