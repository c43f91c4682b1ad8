//! Per-CPU packet and byte counters.

use crate::{DIRECTIONS, VERDICTS, user_pod};

/// Packets and bytes of one (workload, direction, verdict). Bytes are L3 bytes (IP header
/// included, link-layer header not), the same for both attach kinds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets on the wire: a GSO/GRO aggregate counts as its segments.
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Entries of the `COUNTERS` array per workload slot.
pub const COUNTERS_PER_SLOT: u32 = (DIRECTIONS * VERDICTS) as u32;

/// Index of a (slot, direction, verdict) in the `COUNTERS` array.
#[inline(always)]
pub const fn counter_index(slot: u32, direction: u8, verdict: u8) -> u32 {
    slot * COUNTERS_PER_SLOT + direction as u32 * VERDICTS as u32 + verdict as u32
}

/// Key of the per-flow counters: one peer pair at workload level, by packet direction and
/// verdict. `port` is the port of the side that accepted the flow (0 for ICMP), `origin`
/// the direction of the packet that opened it (who is the client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowCounterKey {
    pub slot: u32,
    /// Identity of the peer (`IDENTITY_WORLD` outside the cluster).
    pub peer: u32,
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
    pub verdict: u8,
    pub origin: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowCounterKey>() == 16);

impl FlowCounterKey {
    /// The key as two words, for comparisons in the programs (no memcmp in BPF).
    #[inline(always)]
    pub const fn words(&self) -> (u64, u64) {
        (
            (self.slot as u64) << 32 | self.peer as u64,
            (self.port as u64) << 32
                | (self.proto as u64) << 24
                | (self.direction as u64) << 16
                | (self.verdict as u64) << 8
                | self.origin as u64,
        )
    }
}

/// First bucket of a peer pair in the direct-mapped `FLOW_SERIES` table (the second is this
/// one with the lowest bit flipped). The programs and the agent compute the same.
#[inline(always)]
pub const fn flow_series_bucket(key: &FlowCounterKey) -> u32 {
    let (a, b) = key.words();
    let h = (a ^ b.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((h >> 40) as u32) & (crate::FLOW_SERIES_CAPACITY - 1)
}

user_pod!(Counter, FlowCounterKey);
