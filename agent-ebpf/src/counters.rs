//! Per-CPU packet and byte counters by (workload, direction, verdict), and diagnostics.

use agent_common::{Counter, FlowCounterKey, counter_index, flow_series_bucket};

use crate::{COUNTERS, DIAG, FLOW_COUNTERS, FLOW_SERIES, FLOW_SERIES_KEYS, SPOOFED};

/// Adds a packet (or a GSO aggregate of `segments`) to its workload counter.
#[inline(always)]
pub fn count(slot: u32, direction: u8, verdict: u8, segments: u32, bytes: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(slot, direction, verdict)) {
        // SAFETY: per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe {
            let c: &mut Counter = &mut *c;
            c.packets += segments as u64;
            c.bytes += bytes as u64;
        }
    }
}

/// Adds to a u64 that other CPUs may update at the same time (a shared map value): one
/// atomic add instruction (`lock xadd`, BPF_ATOMIC ADD without fetch), no lost counts.
///
/// # Safety
/// `dst` must point to an aligned u64 in a map value that stays valid for the program run.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, value: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, value,
        );
    }
}

/// Bumps a `diag` counter.
#[inline(always)]
pub fn diag(index: u32) {
    if let Some(c) = DIAG.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 }
    }
}

/// Counts packets a workload sent from an address that is not its own.
#[inline(always)]
pub fn spoofed(slot: u32, segments: u32) {
    if let Some(c) = SPOOFED.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *c += segments as u64 }
    }
}

/// Adds a packet to its peer-pair counter: its direct-mapped bucket when the agent gave it
/// one (two array lookups), else the LRU hash, creating the entry on first use.
#[inline(always)]
pub fn count_flow(key: &FlowCounterKey, segments: u32, bytes: u32) {
    let words = key.words();
    let first = flow_series_bucket(key);
    for bucket in [first, first ^ 1] {
        if let Some(k) = FLOW_SERIES_KEYS.get(bucket)
            && k.words() == words
        {
            if let Some(c) = FLOW_SERIES.get_ptr_mut(bucket) {
                // SAFETY: per-CPU slot of a successful lookup.
                unsafe {
                    (*c).packets += segments as u64;
                    (*c).bytes += bytes as u64;
                }
            }
            return;
        }
    }
    match FLOW_COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU value of a successful lookup.
        Some(c) => unsafe {
            (*c).packets += segments as u64;
            (*c).bytes += bytes as u64;
        },
        None => {
            let c = Counter {
                packets: segments as u64,
                bytes: bytes as u64,
            };
            let _ = FLOW_COUNTERS.insert(key, c, 0);
        }
    }
}
