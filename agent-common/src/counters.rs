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

user_pod!(Counter);
