//! Sampled flow events through the ring buffer, limited per workload by a token bucket
//! (GCRA: one timestamp per workload, no timers).

use agent_common::{Config, EventBucket, FlowEvent, diag};

use crate::{EVENT_BUCKETS, EVENTS, counters, parse::Packet};

/// What the event says beyond the packet itself.
pub struct EventInfo {
    pub slot: u32,
    pub direction: u8,
    pub verdict: u8,
    pub peer: u32,
    pub epoch: u32,
    pub len: u32,
}

/// Takes a token from the workload's bucket. Concurrent CPUs may both take the last token:
/// the limit can overshoot by one event per CPU, never undershoot.
#[inline(always)]
fn take_token(config: &Config, slot: u32, now: u64) -> bool {
    let interval = config.event_interval_ns;
    if interval == 0 {
        return false;
    }
    let Some(bucket) = EVENT_BUCKETS.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: the pointer comes from a successful map lookup.
    let bucket: &mut EventBucket = unsafe { &mut *bucket };
    let tat = if bucket.tat_ns > now {
        bucket.tat_ns
    } else {
        now
    };
    let next = tat + interval;
    if next - now > config.event_burst as u64 * interval {
        // Per-workload figure for `status` (added atomically: CPUs share the bucket); the
        // node-wide count is the per-CPU diag.
        // SAFETY: an aligned u64 of the map value, valid for the program run.
        unsafe { counters::atomic_add(&mut bucket.suppressed, 1) };
        counters::diag(diag::EVENT_RATE_LIMITED);
        return false;
    }
    bucket.tat_ns = next;
    true
}

/// Emits a flow event if the workload's bucket has a token.
#[inline(always)]
pub fn emit(config: &Config, pkt: &Packet, info: &EventInfo, now: u64) {
    if !take_token(config, info.slot, now) {
        return;
    }
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            entry.write(FlowEvent {
                time_ns: now,
                slot: info.slot,
                peer_identity: info.peer,
                src: pkt.tuple.src,
                dst: pkt.tuple.dst,
                src_port: pkt.tuple.src_port,
                dst_port: pkt.tuple.dst_port,
                proto: pkt.tuple.proto,
                family: pkt.family,
                direction: info.direction,
                verdict: info.verdict,
                len: info.len,
                epoch: info.epoch,
            });
            entry.submit(0);
            counters::diag(diag::EVENT_EMITTED);
        }
        None => counters::diag(diag::EVENT_LOST),
    }
}
