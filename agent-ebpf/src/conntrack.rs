//! Connection tracking: one LRU entry per (workload, flow), keyed from the workload's side
//! so both directions of a connection find it with one lookup.
//!
//! An entry caches the policy decision of its flow. The mode is applied per packet, so a flip
//! from log to drop takes effect on established would-drop flows at once; a change of the
//! workload's epoch (its rules, isolation or peers changed) re-evaluates the flow on its next
//! packet.

use agent_common::{
    Config, CtEntry, CtKey, DECISION_ALLOW, DIR_EGRESS, MODE_LOG, PROTO_TCP, WorkloadConfig,
    is_service_identity, tcp_state,
};

use crate::{
    CONNTRACK, CT_OVERFLOW, CT_OVERFLOWED, CT_SHARES,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple},
    policy::{self, Decision},
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// The tracking key of a packet seen by workload `slot` in `direction`. A host-network
/// pod's (`host_source`) keys leave the local address out: every address of the node is its
/// own, and its answers as a Service backend from a socket without a peer do not say which
/// one a client's call was sent to (`parse::socket_answer_port`).
#[inline(always)]
pub fn key_of(t: &Tuple, family: u8, slot: u32, direction: u8, host_source: bool) -> CtKey {
    let mut key = directed_key(t, family, slot, direction);
    if host_source {
        key.local = [0; 16];
    }
    key
}

#[inline(always)]
fn directed_key(t: &Tuple, family: u8, slot: u32, direction: u8) -> CtKey {
    // The end that sent an echo flow's requests, from the workload's side: leaving it, the
    // source is the local end (`ECHO_FROM_SRC` is `echo_end::LOCAL`); arriving, the other
    // way round. Bit operations: branches here multiply the verifier's states.
    let echo = if direction == DIR_EGRESS {
        t.echo
    } else {
        crate::parse::turned_around(t.echo)
    };
    if direction == DIR_EGRESS {
        CtKey {
            local: t.src,
            remote: t.dst,
            slot,
            local_port: t.src_port,
            remote_port: t.dst_port,
            proto: t.proto,
            family,
            echo,
            _pad: 0,
        }
    } else {
        CtKey {
            local: t.dst,
            remote: t.src,
            slot,
            local_port: t.dst_port,
            remote_port: t.src_port,
            proto: t.proto,
            family,
            echo,
            _pad: 0,
        }
    }
}

/// The epoch a decision about `peer` depends on: flows to a Service only on the workload's
/// own rules (a change of backends must not cut established connections), every other flow
/// also on the identities of its peers.
#[inline(always)]
pub fn epoch_for(workload: &WorkloadConfig, peer: u32) -> u32 {
    if is_service_identity(peer) {
        workload.rules_epoch
    } else {
        workload.epoch
    }
}

#[inline(always)]
fn lifetime_ns(config: &Config, proto: u8, state: u8) -> u64 {
    let seconds = if proto != PROTO_TCP {
        config.ct_other_s
    } else if state & tcp_state::RST != 0
        || state & (tcp_state::FIN_ORIGIN | tcp_state::FIN_REPLY)
            == (tcp_state::FIN_ORIGIN | tcp_state::FIN_REPLY)
    {
        config.ct_tcp_closing_s
    } else if state & tcp_state::ESTABLISHED != 0 {
        config.ct_tcp_established_s
    } else {
        config.ct_tcp_opening_s
    };
    seconds as u64 * NS_PER_SEC
}

#[inline(always)]
pub fn next_state(state: u8, proto: u8, flags: u8, from_origin: bool) -> u8 {
    if proto != PROTO_TCP {
        return state;
    }
    let mut s = state;
    if !from_origin {
        s |= tcp_state::REPLY_SEEN;
    } else if state & tcp_state::REPLY_SEEN != 0 && flags & TCP_ACK != 0 {
        s |= tcp_state::ESTABLISHED;
    }
    if flags & TCP_RST != 0 {
        s |= tcp_state::RST;
    }
    if flags & TCP_FIN != 0 {
        s |= if from_origin {
            tcp_state::FIN_ORIGIN
        } else {
            tcp_state::FIN_REPLY
        };
    }
    s
}

/// Outcome of tracking one packet.
pub struct Tracked {
    pub decision: Decision,
    /// Direction of the packet that opened the flow.
    pub origin: u8,
    /// The packet opened a flow (or re-opened one whose decision was stale): worth an event.
    pub new_flow: bool,
}

/// Looks up the packet's flow, evaluates policy when the flow is new or its decision stale,
/// and records the flow. Denied flows of a workload in drop mode are not recorded: they
/// have no replies, and a flood of them must not evict live connections.
///
/// A workload holds at most `Config::ct_share` entries of the main table; its new flows
/// beyond that go to `CT_OVERFLOW`, so a flood toward one workload evicts that workload's
/// flows (and other flooders'), never the established flows of the rest.
///
/// `untracked`: the caller found no entry for `key` in either table just before (the fast
/// path, `established::pass`).
/// `origin`: the direction a new flow is decided and recorded in: `direction`, but for the
/// answer to a host-network pod's call that left DNATed (`parse::socket_called_source`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn track(
    config: &Config,
    workload: &WorkloadConfig,
    slot: u32,
    key: &CtKey,
    direction: u8,
    origin: u8,
    tcp_flags: u8,
    now: u64,
    untracked: bool,
) -> Tracked {
    // 1 when the main table holds an entry of this workload under the key that no longer
    // holds (expired, a TCP connection opened again): counted in its share already, and
    // the new flow replaces it (`insert`). Only ever used in arithmetic, never in a branch,
    // so the verifier need not tell the two cases apart through the policy evaluation.
    let mut replacing = 0u64;
    if !untracked && let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        if let Some(t) = established(config, workload, key, entry, direction, tcp_flags, now) {
            return t;
        }
        // SAFETY: from a successful lookup, valid for the program run.
        replacing = (unsafe { (*entry).generation } == workload.generation) as u64;
    }
    if !untracked
        && let Some(entry) = overflow_entry(slot, key)
        && let Some(t) = established(config, workload, key, entry, direction, tcp_flags, now)
    {
        return t;
    }

    let decision = policy::evaluate(
        workload,
        slot,
        origin,
        key.family,
        &key.remote,
        key.proto,
        key.service_port(origin),
        now,
        false,
    );
    if decision.decision == DECISION_ALLOW || workload.mode == MODE_LOG as u32 {
        let state = next_state(0, key.proto, tcp_flags, origin == direction);
        let entry = CtEntry {
            expires_ns: now + lifetime_ns(config, key.proto, state),
            epoch: epoch_for(workload, decision.peer),
            origin,
            decision: decision.decision,
            tcp_state: state,
            _pad: 0,
            peer: decision.peer,
            generation: workload.generation,
        };
        insert(config, slot, key, &entry, replacing);
    }
    Tracked {
        decision,
        origin,
        new_flow: true,
    }
}

/// The entry of `key` in the overflow table, looked up only for a workload that has put
/// flows there.
#[inline(always)]
pub fn overflow_entry(slot: u32, key: &CtKey) -> Option<*mut CtEntry> {
    if CT_OVERFLOWED.get(slot).is_some_and(|o| *o != 0) {
        CT_OVERFLOW.get_ptr_mut(key)
    } else {
        None
    }
}

/// Records a new flow in the main table, or in the overflow table once the workload holds
/// its share of the main one.
///
/// `replacing` (0 or 1): the flow replaces an entry of the workload in the main table,
/// counted in its share already. It is counted once, and stays in the main table: a
/// client reusing its ports would otherwise count every connection again until the next
/// census, and have its flows sent to the overflow table while it holds a few entries.
#[inline(always)]
fn insert(config: &Config, slot: u32, key: &CtKey, entry: &CtEntry, replacing: u64) {
    if let Some(entries) = CT_SHARES.get_ptr_mut(slot) {
        // Out of a replacement's reach (bit 63 set), without a branch on `replacing`.
        let limit = config.ct_share as u64 | replacing << 63;
        // SAFETY: a value of a successful array lookup, valid for the program run.
        if config.ct_share != 0 && unsafe { *entries } >= limit {
            crate::counters::diag(agent_common::diag::CT_OVERFLOW);
            if let Some(flag) = CT_OVERFLOWED.get_ptr_mut(slot) {
                // SAFETY: as above; a whole u32 written, the same value by every CPU. Read
                // first: a store on every insert would take the line from the other CPUs
                // that read it for every packet they miss.
                unsafe {
                    if *flag == 0 {
                        *flag = 1;
                    }
                }
            }
            if CT_OVERFLOW.insert(key, entry, 0).is_err() {
                crate::counters::diag(agent_common::diag::CT_INSERT_FAILED);
            }
            return;
        }
        // SAFETY: as above; CPUs share the count, so it is added atomically (0 for a
        // replacement).
        unsafe { crate::counters::atomic_add(entries, 1 - replacing) };
    }
    if CONNTRACK.insert(key, entry, 0).is_err() {
        crate::counters::diag(agent_common::diag::CT_INSERT_FAILED);
    }
}

/// The packet's part of a tracked flow, if `entry` is live: same workload generation, not
/// expired, not a TCP connection opened again after it closed.
#[inline(always)]
fn established(
    config: &Config,
    workload: &WorkloadConfig,
    key: &CtKey,
    entry: *mut CtEntry,
    direction: u8,
    tcp_flags: u8,
    now: u64,
) -> Option<Tracked> {
    // SAFETY: the pointer comes from a successful lookup; LRU values stay valid for the
    // program run. Concurrent CPUs may race on the plain fields (state bits, expiry, a
    // re-evaluated decision): each is written whole and the next packet corrects a stale
    // one. Packets are counted per CPU elsewhere (`counters`), never here: an established
    // packet writes into the shared entry only when its state or expiry moves.
    let entry: &mut CtEntry = unsafe { &mut *entry };
    // A bare SYN opens anew a connection that closed, and is decided on its own when it
    // comes from the side that did not open the flow: no TCP stack sends one there (short of
    // a simultaneous open), and taken as a reply it would let the flow's answering side open
    // connections its own policy denies.
    let reopened_tcp = opens_tcp(key.proto, tcp_flags)
        && (entry.tcp_state & (tcp_state::RST | tcp_state::FIN_ORIGIN | tcp_state::FIN_REPLY) != 0
            || direction != entry.origin);
    if entry.expires_ns <= now || entry.generation != workload.generation || reopened_tcp {
        return None;
    }
    let mut new_flow = false;
    if entry.epoch != epoch_for(workload, entry.peer) {
        let d = policy::evaluate(
            workload,
            key.slot,
            entry.origin,
            key.family,
            &key.remote,
            key.proto,
            key.service_port(entry.origin),
            now,
            true,
        );
        new_flow = d.decision != entry.decision;
        entry.decision = d.decision;
        entry.peer = d.peer;
        entry.epoch = epoch_for(workload, d.peer);
    }
    advance(
        config,
        entry,
        key.proto,
        tcp_flags,
        direction == entry.origin,
        now,
    );
    Some(Tracked {
        decision: Decision {
            decision: entry.decision,
            peer: entry.peer,
        },
        origin: entry.origin,
        new_flow,
    })
}

/// A bare SYN (no ACK): it opens a TCP connection, or opens again one whose tracked state
/// says it closed, to be decided anew (`established`).
#[inline(always)]
pub fn opens_tcp(proto: u8, tcp_flags: u8) -> bool {
    proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The packet's move of a live entry: its TCP state by the packet's flags and, with a new
/// state, the expiry of that state; else the expiry refreshed (`refresh`).
#[inline(always)]
pub fn advance(
    config: &Config,
    entry: &mut CtEntry,
    proto: u8,
    tcp_flags: u8,
    from_origin: bool,
    now: u64,
) {
    let state = next_state(entry.tcp_state, proto, tcp_flags, from_origin);
    if state != entry.tcp_state {
        entry.tcp_state = state;
        entry.expires_ns = now + lifetime_ns(config, proto, state);
    } else {
        refresh(config, entry, proto, now);
    }
}

/// Extends a live entry whose state stays as it is by its lifetime from `now`, writing into
/// the shared entry only when the expiry moves by more than a second (as Cilium does):
/// every packet of a busy flow on several CPUs would otherwise bounce its cache line.
#[inline(always)]
pub fn refresh(config: &Config, entry: &mut CtEntry, proto: u8, now: u64) {
    let expires = now + lifetime_ns(config, proto, entry.tcp_state);
    if expires > entry.expires_ns + NS_PER_SEC {
        entry.expires_ns = expires;
    }
}

/// The tracked flow of `key`, if it is live, as `Tracked`. `standing`: only if its decision
/// also stands, as for an ICMP error about the flow (a flow whose rules or peers changed
/// is decided again by its own next packet; its errors must not pass on the old decision
/// meanwhile).
#[inline(always)]
pub fn related(
    workload: &WorkloadConfig,
    key: &CtKey,
    now: u64,
    standing: bool,
) -> Option<Tracked> {
    // SAFETY: read-only use of a value from a successful lookup.
    let entry = match unsafe { CONNTRACK.get(key) } {
        Some(e) => e,
        // SAFETY: as above.
        None => unsafe { CT_OVERFLOW.get(key) }?,
    };
    if entry.expires_ns > now
        && entry.generation == workload.generation
        && (!standing || entry.epoch == epoch_for(workload, entry.peer))
    {
        Some(Tracked {
            decision: Decision {
                decision: entry.decision,
                peer: entry.peer,
            },
            origin: entry.origin,
            new_flow: false,
        })
    } else {
        None
    }
}
