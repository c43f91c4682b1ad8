//! Egress allowlists by DNS name: what each workload's DNS answers teach.
//!
//! The datapath copies every DNS packet between a workload and its resolvers to the agent
//! (`DNS_EVENTS`), and holds the answers to workloads an EgressAllowlist selects until the
//! agent hands them back. For each answer to a query the workload really asked, the
//! [`Learner`] writes every address of the answer (following its CNAME chain) into that
//! workload's own entries of `LEARNED`: the name it came from (which names the
//! destination in flow counters and the flow log), and, when an allowlist rule matches the
//! name, the ports it may be reached on until the TTL (with floor and grace) runs out.
//! See `docs/egress-allowlists.md` for why answers are held rather than raced.

pub mod domains;
pub mod runtime;
pub mod wire;

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use agent_common::{
    DOMAIN_ID_MASK, DnsCapture, LEARNED_PORT_RANGES, LearnedKey, LearnedValue, PROTO_TCP,
    PROTO_UDP, PortRange, capture_kind,
};

pub use domains::{DomainPattern, PatternError};

use crate::compile::model::{EgressAllowlistInfo, PodInfo, PortRef, PortSpec};

/// The allowlist rules in force for one workload: every EgressAllowlist of its namespace
/// that selects it, merged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Allowlist {
    /// `NAMESPACE/NAME` of the allowlists, sorted.
    pub names: Vec<String>,
    pub rules: Vec<(DomainPattern, Vec<PortRange>)>,
}

impl Allowlist {
    /// The allowlists of the pod's namespace that select it, merged; `None` when none does.
    pub fn for_pod<'a>(
        pod: &PodInfo,
        allowlists: impl IntoIterator<Item = &'a EgressAllowlistInfo>,
    ) -> Option<Allowlist> {
        let mut out = Allowlist::default();
        let mut selected = false;
        for a in allowlists {
            if a.namespace != pod.namespace || !a.pod_selector.matches(&pod.labels) {
                continue;
            }
            selected = true;
            out.names.push(a.id());
            for rule in &a.egress {
                let ports = port_ranges(&rule.ports);
                for d in &rule.domains {
                    out.rules.push((d.clone(), ports.clone()));
                }
            }
        }
        out.names.sort();
        selected.then_some(out)
    }

    /// The ports `name` (normalized) may be reached on: `None` when no rule matches it.
    pub fn ports_for(&self, name: &str) -> Option<Vec<PortRange>> {
        let mut out: Vec<PortRange> = Vec::new();
        let mut matched = false;
        for (pattern, ports) in &self.rules {
            if pattern.matches(name) {
                matched = true;
                for p in ports {
                    if !out.contains(p) {
                        out.push(*p);
                    }
                }
            }
        }
        matched.then_some(out)
    }

    /// Whether a rule allows `name` on `proto`/`port` (what `tollgate check` asks).
    pub fn allows(&self, name: &str, proto: u8, port: u16) -> bool {
        self.ports_for(&domains::normalize(name))
            .is_some_and(|ports| ports.iter().any(|p| p.allows(proto, port)))
    }
}

/// A rule's ports as ranges; no ports: every protocol and port.
fn port_ranges(ports: &[PortSpec]) -> Vec<PortRange> {
    if ports.is_empty() {
        return vec![PortRange::ANY];
    }
    ports
        .iter()
        .map(|p| {
            let (lo, hi) = match p.port {
                PortRef::Range(lo, hi) => (lo, hi),
                // Refused when converted; every port of the protocol otherwise.
                PortRef::Any | PortRef::Named(_) => (0, u16::MAX),
            };
            PortRange {
                lo,
                hi,
                proto: p.protocol.number(),
                _pad: 0,
            }
        })
        .collect()
}

/// How long what an answer taught lasts.
#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// Floor of an answer's TTL (`--dns-min-ttl`).
    pub min_ttl: Duration,
    /// Added after the TTL for new connections (`--dns-grace`).
    pub grace: Duration,
    /// Addresses kept per workload (`--dns-max-per-workload`); what does not fit is counted.
    pub max_per_workload: usize,
    /// How long an expired address is remembered: connections to it keep their name and
    /// are counted as expired instead of unknown.
    pub retain: Duration,
    /// Tests only (`--dns-learn-delay`, hidden): time taken before learning from each
    /// answer, as a loaded agent would. Held answers wait for it; the first connection
    /// after a lookup must still be decided with what the answer taught.
    pub learn_delay: Duration,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            min_ttl: Duration::from_secs(30),
            grace: Duration::from_secs(60),
            max_per_workload: 1024,
            retain: Duration::from_secs(3600),
            learn_delay: Duration::ZERO,
        }
    }
}

/// What became of DNS messages, for `tollgate_dns_messages_total{outcome}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DnsStats {
    pub queries: u64,
    /// Answers to a query the workload asked, learned from.
    pub answers: u64,
    /// Answers nobody asked for (spoofed, late, or to another port or id): ignored.
    pub unsolicited: u64,
    /// Messages that do not parse (truncated, loops, bad pointers...): ignored.
    pub malformed: u64,
    /// Addresses learned (new or refreshed).
    pub addresses: u64,
    /// Addresses that did not fit a workload's bound.
    pub overflow: u64,
    /// Queries not waited for: their workload had `MAX_PENDING_PER_SLOT` waiting, or the
    /// node `MAX_PENDING` (their answers then teach nothing).
    pub queries_not_followed: u64,
    /// Queries no longer waited for, the oldest of the workload holding the most, to make
    /// room for another workload's when the node's table was full.
    pub queries_evicted: u64,
    /// DNS-over-TCP streams read no further after a gap, or seen first mid-way.
    pub tcp_streams_lost: u64,
}

/// One address a workload learned.
#[derive(Clone, Debug)]
struct Entry {
    domain: u32,
    allow_until_ns: u64,
    forget_at_ns: u64,
    ports: Vec<PortRange>,
}

#[derive(Debug, Default)]
struct Workload {
    generation: u32,
    entries: HashMap<IpAddr, Entry>,
    allowlist: Option<Arc<Allowlist>>,
    overflow: u64,
}

/// A query waiting for its answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct QueryKey {
    slot: u32,
    generation: u32,
    resolver: IpAddr,
    client_port: u16,
    proto: u8,
    id: u16,
}

/// A DNS-over-TCP byte stream of one direction, put back together in order.
#[derive(Debug, Default)]
struct Stream {
    next_seq: Option<u32>,
    buf: Vec<u8>,
    /// Its framing is lost (a gap, or data before any SYN was seen): nothing more is read
    /// from it until it starts again. Guessing where a message starts would read whatever
    /// the bytes there say, such as a message a pod hid in an answer's data.
    lost: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StreamKey {
    slot: u32,
    resolver: IpAddr,
    client_port: u16,
    answer: bool,
}

/// A map change the caller applies to `LEARNED`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LearnedWrite {
    Put(LearnedKey, LearnedValue),
    Delete(LearnedKey),
}

const MAX_PENDING: usize = 16_384;
/// Queries one workload may have waiting for their answers: a pod flooding its resolver
/// with queries must not fill the table the answers of every other pod are matched in.
const MAX_PENDING_PER_SLOT: usize = 1024;
const PENDING_TIMEOUT_NS: u64 = 30_000_000_000;
const MAX_STREAMS: usize = 1024;
/// DNS-over-TCP streams of one workload followed at once.
const MAX_STREAMS_PER_SLOT: usize = 64;
const MAX_DOMAINS: usize = 1 << 16;

/// Everything the agent learned from DNS, per workload.
#[derive(Debug, Default)]
pub struct Learner {
    options: DnsOptions,
    pending: HashMap<QueryKey, (String, u64)>,
    pending_order: VecDeque<(QueryKey, u64)>,
    /// Queries waiting per slot (`MAX_PENDING_PER_SLOT`).
    pending_per_slot: HashMap<u32, usize>,
    workloads: HashMap<u32, Workload>,
    streams: HashMap<StreamKey, Stream>,
    pub stats: DnsStats,
}

/// A packet's addresses, ports and L4 payload.
struct Decoded<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    src_port: u16,
    dst_port: u16,
    payload: &'a [u8],
    tcp_seq: u32,
    tcp_flags: u8,
}

fn decode(ip: &[u8]) -> Option<Decoded<'_>> {
    let version = ip.first()? >> 4;
    let (src, dst, proto, l4) = match version {
        4 => {
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize;
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                *ip.get(9)?,
                ip.get(ihl..total.min(ip.len()))?,
            )
        }
        6 => {
            let payload = u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]) as usize;
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                *ip.get(6)?,
                ip.get(40..(40 + payload).min(ip.len()))?,
            )
        }
        _ => return None,
    };
    let port = |at: usize| Some(u16::from_be_bytes([*l4.get(at)?, *l4.get(at + 1)?]));
    match proto {
        PROTO_UDP => Some(Decoded {
            src,
            dst,
            proto,
            src_port: port(0)?,
            dst_port: port(2)?,
            payload: l4.get(8..)?,
            tcp_seq: 0,
            tcp_flags: 0,
        }),
        PROTO_TCP => {
            let offset = ((*l4.get(12)? >> 4) as usize) * 4;
            Some(Decoded {
                src,
                dst,
                proto,
                src_port: port(0)?,
                dst_port: port(2)?,
                payload: l4.get(offset..)?,
                tcp_seq: u32::from_be_bytes(l4.get(4..8)?.try_into().ok()?),
                tcp_flags: *l4.get(13)?,
            })
        }
        _ => None,
    }
}

fn ip_bytes(ip: &IpAddr) -> (u8, [u8; 16]) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (agent_common::FAMILY_IPV4, addr)
        }
        IpAddr::V6(v6) => (agent_common::FAMILY_IPV6, v6.octets()),
    }
}

fn learned_key(slot: u32, generation: u32, ip: &IpAddr) -> LearnedKey {
    let (family, addr) = ip_bytes(ip);
    LearnedKey {
        slot,
        generation,
        family,
        _pad0: 0,
        _pad1: 0,
        addr,
    }
}

impl Learner {
    pub fn options(&self) -> &DnsOptions {
        &self.options
    }

    pub fn new(options: DnsOptions) -> Learner {
        Learner {
            options,
            ..Learner::default()
        }
    }

    /// The name `ip` was resolved from by the workload in `slot`, if it was.
    pub fn domain_of(&self, slot: u32, ip: &IpAddr) -> Option<String> {
        let e = self.workloads.get(&slot)?.entries.get(ip)?;
        domain_name(e.domain)
    }

    /// Takes back what an earlier agent wrote into `LEARNED` (domain ids as persisted by
    /// `Domains::load`), so a restart forgets nothing.
    pub fn adopt(&mut self, entries: impl IntoIterator<Item = (LearnedKey, LearnedValue)>) {
        for (key, value) in entries {
            let ip = crate::maps::addr_from_bytes(key.family, &key.addr);
            let w = self.workloads.entry(key.slot).or_default();
            w.generation = key.generation;
            w.entries.insert(
                ip,
                Entry {
                    domain: value.domain,
                    allow_until_ns: value.allow_until_ns,
                    forget_at_ns: value.allow_until_ns + self.options.retain.as_nanos() as u64,
                    ports: value.ports[..(value.port_count as usize).min(LEARNED_PORT_RANGES)]
                        .to_vec(),
                },
            );
        }
    }

    /// The addresses that did not fit, by slot and generation, for `restore_overflow`.
    pub fn overflow(&self) -> Vec<(u32, u32, u64)> {
        self.workloads
            .iter()
            .filter(|(_, w)| w.overflow > 0)
            .map(|(s, w)| (*s, w.generation, w.overflow))
            .collect()
    }

    /// Continues what did not fit as an earlier agent counted it, for the workloads still
    /// in their slots (the same generation); a new one there starts from zero.
    pub fn restore_overflow(&mut self, counts: &[(u32, u32, u64)]) {
        for (slot, generation, overflow) in counts {
            let w = self.workloads.entry(*slot).or_default();
            if w.entries.is_empty() || w.generation == *generation {
                w.generation = *generation;
                w.overflow = *overflow;
            }
        }
    }

    /// Addresses each slot keeps, and what did not fit, by slot.
    pub fn per_workload(&self) -> Vec<(u32, usize, u64)> {
        self.workloads
            .iter()
            .map(|(s, w)| (*s, w.entries.len(), w.overflow))
            .collect()
    }

    /// Brings a slot's workload and allowlist up to date (the reconciler's view). A new
    /// generation forgets what the slot's previous workload learned; a changed allowlist
    /// rewrites the ports of every address.
    pub fn set_workload(
        &mut self,
        slot: u32,
        generation: u32,
        allowlist: Option<Arc<Allowlist>>,
    ) -> Vec<LearnedWrite> {
        let mut writes = Vec::new();
        let w = self.workloads.entry(slot).or_default();
        if w.generation != generation {
            for ip in w.entries.keys() {
                writes.push(LearnedWrite::Delete(learned_key(slot, w.generation, ip)));
            }
            *w = Workload {
                generation,
                ..Workload::default()
            };
        }
        if w.allowlist != allowlist {
            w.allowlist = allowlist;
            for (ip, e) in w.entries.iter_mut() {
                let name = domain_name(e.domain).unwrap_or_default();
                e.ports = w
                    .allowlist
                    .as_ref()
                    .and_then(|a| a.ports_for(&name))
                    .unwrap_or_default();
                writes.push(LearnedWrite::Put(
                    learned_key(slot, generation, ip),
                    value_of(e),
                ));
            }
        }
        writes
    }

    /// Forgets a slot whose workload is gone.
    pub fn remove_workload(&mut self, slot: u32) -> Vec<LearnedWrite> {
        let Some(w) = self.workloads.remove(&slot) else {
            return vec![];
        };
        self.streams.retain(|k, _| k.slot != slot);
        w.entries
            .keys()
            .map(|ip| LearnedWrite::Delete(learned_key(slot, w.generation, ip)))
            .collect()
    }

    /// Slots the learner knows.
    pub fn slots(&self) -> Vec<u32> {
        self.workloads.keys().copied().collect()
    }

    /// Drops what is past remembering, and queries never answered.
    pub fn expire(&mut self, now_ns: u64) -> Vec<LearnedWrite> {
        let mut writes = Vec::new();
        for (slot, w) in self.workloads.iter_mut() {
            let generation = w.generation;
            w.entries.retain(|ip, e| {
                let keep = e.forget_at_ns > now_ns;
                if !keep {
                    writes.push(LearnedWrite::Delete(learned_key(*slot, generation, ip)));
                }
                keep
            });
        }
        while let Some((key, at)) = self.pending_order.front() {
            if at + PENDING_TIMEOUT_NS > now_ns && self.pending.len() <= MAX_PENDING {
                break;
            }
            if self.pending.get(key).is_some_and(|(_, t)| t == at) {
                let key = key.clone();
                self.unpend(&key);
            }
            self.pending_order.pop_front();
        }
        writes
    }

    /// Takes in one captured packet; returns the map writes to apply before the packet,
    /// if held, is handed back.
    pub fn packet(&mut self, capture: &DnsCapture, now_ns: u64) -> Vec<LearnedWrite> {
        let len = (capture.len as usize).min(capture.data.len());
        let Some(ip) = capture.data[..len].get(capture.l3_offset as usize..) else {
            self.stats.malformed += 1;
            return vec![];
        };
        let Some(pkt) = decode(ip) else {
            self.stats.malformed += 1;
            return vec![];
        };
        let query = capture.kind == capture_kind::QUERY;
        let (resolver, client_port) = if query {
            (pkt.dst, pkt.src_port)
        } else {
            (pkt.src, pkt.dst_port)
        };
        let messages: Vec<Vec<u8>> = if pkt.proto == PROTO_UDP {
            vec![pkt.payload.to_vec()]
        } else {
            self.tcp_messages(
                StreamKey {
                    slot: capture.slot,
                    resolver,
                    client_port,
                    answer: !query,
                },
                &pkt,
            )
        };
        let mut writes = Vec::new();
        for msg in messages {
            let key = |id| QueryKey {
                slot: capture.slot,
                generation: capture.generation,
                resolver,
                client_port,
                proto: pkt.proto,
                id,
            };
            if query {
                match wire::parse_question(&msg) {
                    Ok(q) if !q.response => {
                        self.stats.queries += 1;
                        if self.pending.len() >= MAX_PENDING {
                            self.make_room_for(capture.slot);
                        }
                        let waiting = self.pending_per_slot.entry(capture.slot).or_default();
                        if self.pending.len() < MAX_PENDING && *waiting < MAX_PENDING_PER_SLOT {
                            let k = key(q.id);
                            if self.pending.insert(k.clone(), (q.name, now_ns)).is_none() {
                                *waiting += 1;
                            }
                            self.pending_order.push_back((k, now_ns));
                        } else {
                            self.stats.queries_not_followed += 1;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => self.stats.malformed += 1,
                }
                continue;
            }
            let answer = match wire::parse_answer(&msg) {
                Ok(a) if a.question.response => a,
                Ok(_) => continue,
                Err(_) => {
                    self.stats.malformed += 1;
                    continue;
                }
            };
            match self.pending.get(&key(answer.question.id)) {
                Some((name, _)) if *name == answer.question.name => {
                    self.unpend(&key(answer.question.id));
                }
                _ => {
                    self.stats.unsolicited += 1;
                    continue;
                }
            }
            self.stats.answers += 1;
            writes.extend(self.learn(capture.slot, capture.generation, &answer, now_ns));
        }
        writes
    }

    /// A full table of waiting queries: the oldest query of the workload holding the most
    /// gives way to one of `slot`, when `slot` holds fewer. A few workloads flooding their
    /// resolver with queries never answered (every one up to its own limit) would otherwise
    /// fill the table, and every other workload's answers would teach nothing.
    fn make_room_for(&mut self, slot: u32) {
        let mine = self.pending_per_slot.get(&slot).copied().unwrap_or(0);
        let Some((&biggest, &most)) = self.pending_per_slot.iter().max_by_key(|(_, n)| **n) else {
            return;
        };
        if most <= mine + 1 {
            return;
        }
        let oldest = self
            .pending_order
            .iter()
            .find(|(key, at)| {
                key.slot == biggest && self.pending.get(key).is_some_and(|(_, t)| t == at)
            })
            .map(|(key, _)| key.clone());
        if let Some(key) = oldest {
            self.unpend(&key);
            self.stats.queries_evicted += 1;
        }
    }

    /// Takes a query off the waiting ones.
    fn unpend(&mut self, key: &QueryKey) {
        if self.pending.remove(key).is_some()
            && let Some(n) = self.pending_per_slot.get_mut(&key.slot)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_per_slot.remove(&key.slot);
            }
        }
    }

    fn tcp_messages(&mut self, key: StreamKey, pkt: &Decoded<'_>) -> Vec<Vec<u8>> {
        const SYN: u8 = 0x02;
        const FIN: u8 = 0x01;
        const RST: u8 = 0x04;
        if pkt.tcp_flags & RST != 0 {
            self.streams.remove(&key);
            return vec![];
        }
        if !self.streams.contains_key(&key) {
            // A flood of half-open streams: one of the flooder's own goes first (a workload
            // holds at most `MAX_STREAMS_PER_SLOT`), else any, never more than the cap.
            let own: Vec<StreamKey> = self
                .streams
                .keys()
                .filter(|k| k.slot == key.slot)
                .take(MAX_STREAMS_PER_SLOT)
                .cloned()
                .collect();
            let evict = if own.len() >= MAX_STREAMS_PER_SLOT {
                own.first().cloned()
            } else if self.streams.len() >= MAX_STREAMS {
                self.streams.keys().next().cloned()
            } else {
                None
            };
            if let Some(k) = evict {
                self.streams.remove(&k);
            }
        }
        let stream = self.streams.entry(key.clone()).or_default();
        if pkt.tcp_flags & SYN != 0 {
            stream.next_seq = Some(pkt.tcp_seq.wrapping_add(1));
            stream.buf.clear();
            stream.lost = false;
        }
        let mut out = Vec::new();
        if !pkt.payload.is_empty() && !stream.lost {
            match stream.next_seq {
                Some(expected) if pkt.tcp_seq == expected => {
                    stream.buf.extend_from_slice(pkt.payload);
                    stream.next_seq = Some(expected.wrapping_add(pkt.payload.len() as u32));
                }
                // A retransmission of what was read already.
                Some(expected) if (pkt.tcp_seq.wrapping_sub(expected) as i32) < 0 => {}
                // A gap, or data of a stream whose start was never seen: where its next
                // message starts is unknown, so it is read no further.
                _ => {
                    stream.lost = true;
                    stream.buf.clear();
                    self.stats.tcp_streams_lost += 1;
                }
            }
            while stream.buf.len() >= 2 {
                let n = u16::from_be_bytes([stream.buf[0], stream.buf[1]]) as usize;
                if stream.buf.len() < 2 + n {
                    break;
                }
                out.push(stream.buf[2..2 + n].to_vec());
                stream.buf.drain(..2 + n);
            }
        }
        if pkt.tcp_flags & FIN != 0 {
            self.streams.remove(&key);
        }
        out
    }

    fn learn(
        &mut self,
        slot: u32,
        generation: u32,
        answer: &wire::Answer,
        now_ns: u64,
    ) -> Vec<LearnedWrite> {
        if answer.addresses.is_empty() {
            return vec![];
        }
        let domain = domain_id(&answer.question.name);
        let options = self.options.clone();
        let w = self.workloads.entry(slot).or_default();
        if w.generation != generation {
            // The reconciler has not told us about this workload yet: a fresh record.
            *w = Workload {
                generation,
                ..Workload::default()
            };
        }
        let ports = w
            .allowlist
            .as_ref()
            .and_then(|a| a.ports_for(&answer.question.name));
        let mut writes = Vec::new();
        for (ip, ttl) in &answer.addresses {
            let ttl = Duration::from_secs(*ttl as u64).max(options.min_ttl);
            let allow_until = now_ns + (ttl + options.grace).as_nanos() as u64;
            let forget_at = allow_until + options.retain.as_nanos() as u64;
            if !w.entries.contains_key(ip) && w.entries.len() >= options.max_per_workload {
                w.entries.retain(|_, e| e.forget_at_ns > now_ns);
                if w.entries.len() >= options.max_per_workload {
                    w.overflow += 1;
                    self.stats.overflow += 1;
                    continue;
                }
            }
            let e = w.entries.entry(*ip).or_insert(Entry {
                domain,
                allow_until_ns: 0,
                forget_at_ns: 0,
                ports: vec![],
            });
            let still_allowed = e.allow_until_ns > now_ns && !e.ports.is_empty();
            let mut merged = if still_allowed {
                e.ports.clone()
            } else {
                vec![]
            };
            if let Some(p) = &ports {
                for r in p {
                    if !merged.contains(r) && merged.len() < LEARNED_PORT_RANGES {
                        merged.push(*r);
                    }
                }
            }
            e.allow_until_ns = if ports.is_some() || !still_allowed {
                allow_until.max(if still_allowed { e.allow_until_ns } else { 0 })
            } else {
                e.allow_until_ns
            };
            e.forget_at_ns = e.forget_at_ns.max(forget_at);
            e.domain = domain;
            e.ports = merged;
            self.stats.addresses += 1;
            writes.push(LearnedWrite::Put(
                learned_key(slot, generation, ip),
                value_of(e),
            ));
        }
        writes
    }
}

/// Domain names by id (ids start at 1), shared by the learner and everything that names
/// flows; persisted so ids in pinned maps keep their names across restarts.
#[derive(Debug, Default)]
struct Domains {
    ids: HashMap<String, u32>,
    names: Vec<String>,
    /// Names added since the last save.
    dirty: bool,
}

static DOMAINS: std::sync::LazyLock<std::sync::RwLock<Domains>> =
    std::sync::LazyLock::new(Default::default);

/// The id of a name, handed out on first use; 0 once the table is full (the name is then
/// not told).
fn domain_id(name: &str) -> u32 {
    if let Some(id) = DOMAINS.read().expect("domains").ids.get(name) {
        return *id;
    }
    let mut d = DOMAINS.write().expect("domains");
    if let Some(id) = d.ids.get(name) {
        return *id;
    }
    if d.names.len() >= MAX_DOMAINS.min(DOMAIN_ID_MASK as usize) {
        return 0;
    }
    d.names.push(name.to_string());
    let id = d.names.len() as u32;
    d.ids.insert(name.to_string(), id);
    d.dirty = true;
    id
}

/// The name a domain id stands for.
pub fn domain_name(id: u32) -> Option<String> {
    let i = ((id & DOMAIN_ID_MASK) as usize).checked_sub(1)?;
    DOMAINS.read().expect("domains").names.get(i).cloned()
}

/// The DNS name of a peer identity (`IDENTITY_WORLD_NAMED`), or "".
pub fn peer_domain(identity: u32) -> String {
    if agent_common::is_world_named(identity) {
        domain_name(identity).unwrap_or_default()
    } else {
        String::new()
    }
}

/// Loads the names an earlier agent handed ids to (before anything is learned).
pub fn load_domains(path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let names: Vec<String> = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("read the DNS names in {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let mut d = DOMAINS.write().expect("domains");
    if d.names.is_empty() {
        d.ids = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32 + 1))
            .collect();
        d.names = names;
    }
    Ok(())
}

/// Saves the names if any were added since the last save (write, then rename).
pub fn save_domains(path: &std::path::Path) -> anyhow::Result<()> {
    let names = {
        let mut d = DOMAINS.write().expect("domains");
        if !d.dirty {
            return Ok(());
        }
        d.dirty = false;
        d.names.clone()
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&names)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn value_of(e: &Entry) -> LearnedValue {
    let mut ports = [PortRange::UNUSED; LEARNED_PORT_RANGES];
    for (slot, p) in ports.iter_mut().zip(&e.ports) {
        *slot = *p;
    }
    LearnedValue {
        allow_until_ns: e.allow_until_ns,
        domain: e.domain,
        port_count: e.ports.len().min(LEARNED_PORT_RANGES) as u32,
        ports,
    }
}

#[cfg(test)]
mod tests {
    use super::{wire::build, *};
    use crate::compile::model::Protocol;

    fn allowlist(rules: &[(&str, Option<u16>)]) -> Arc<Allowlist> {
        Arc::new(Allowlist {
            names: vec!["x/a".into()],
            rules: rules
                .iter()
                .map(|(d, port)| {
                    let ports = match port {
                        Some(p) => port_ranges(&[PortSpec {
                            protocol: Protocol::Tcp,
                            port: PortRef::Range(*p, *p),
                        }]),
                        None => vec![PortRange::ANY],
                    };
                    (DomainPattern::parse(d).unwrap(), ports)
                })
                .collect(),
        })
    }

    /// An IPv4 packet (no L2 header) of `proto` from `src` to `dst` carrying `l4`, as the
    /// datapath captures it.
    fn ipv4_capture(kind: u8, src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> DnsCapture {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(l4);
        let total = ip.len() as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let mut data = [0u8; agent_common::DNS_CAPTURE_BYTES];
        data[..ip.len()].copy_from_slice(&ip);
        DnsCapture {
            slot: 3,
            generation: 7,
            ifindex: 0,
            len: ip.len() as u32,
            l3_offset: 0,
            kind,
            _pad: [0; 2],
            data,
        }
    }

    /// A UDP packet (IPv4, no L2 header) from `src:sport` to `dst:dport` as the datapath
    /// captures it.
    fn capture(
        kind: u8,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        msg: &[u8],
    ) -> DnsCapture {
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&dport.to_be_bytes());
        udp.extend_from_slice(&((8 + msg.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(msg);
        ipv4_capture(kind, src, dst, PROTO_UDP, &udp)
    }

    const POD: [u8; 4] = [10, 1, 0, 10];
    const DNS: [u8; 4] = [10, 96, 0, 10];

    fn ask_and_answer(
        l: &mut Learner,
        id: u16,
        name: &str,
        ip: [u8; 4],
        ttl: u32,
    ) -> Vec<LearnedWrite> {
        let q = build::query(id, name, wire::TYPE_A);
        l.packet(&capture(capture_kind::QUERY, POD, 40000, DNS, 53, &q), 0);
        let a = build::answer(
            id,
            name,
            wire::TYPE_A,
            1,
            &[build::record(&build::QNAME, wire::TYPE_A, ttl, &ip)],
        );
        l.packet(
            &capture(capture_kind::ANSWER_HELD, DNS, 53, POD, 40000, &a),
            1_000,
        )
    }

    #[test]
    fn an_answered_query_teaches_the_allowed_ports_for_the_ttl_plus_grace() {
        let mut l = Learner::new(DnsOptions {
            min_ttl: Duration::from_secs(5),
            grace: Duration::from_secs(2),
            ..DnsOptions::default()
        });
        l.set_workload(3, 7, Some(allowlist(&[("api.example.com", Some(443))])));
        let writes = ask_and_answer(&mut l, 1, "API.example.com", [203, 0, 113, 7], 60);
        let [LearnedWrite::Put(key, value)] = writes.as_slice() else {
            panic!("{writes:?}")
        };
        assert_eq!(
            (key.slot, key.generation, &key.addr[..4]),
            (3, 7, &[203, 0, 113, 7][..])
        );
        assert_eq!(value.allow_until_ns, 1_000 + 62_000_000_000);
        assert_eq!(value.port_count, 1);
        assert!(value.ports[0].allows(PROTO_TCP, 443) && !value.ports[0].allows(PROTO_TCP, 80));
        assert_eq!(
            domain_name(value.domain).as_deref(),
            Some("api.example.com")
        );
        // A TTL below the floor gets the floor.
        let writes = ask_and_answer(&mut l, 2, "api.example.com", [203, 0, 113, 8], 1);
        let [LearnedWrite::Put(_, value)] = writes.as_slice() else {
            panic!()
        };
        assert_eq!(value.allow_until_ns, 1_000 + 7_000_000_000);
        // A name no rule takes is named, never allowed.
        let writes = ask_and_answer(&mut l, 3, "other.example.com", [203, 0, 113, 9], 60);
        let [LearnedWrite::Put(_, value)] = writes.as_slice() else {
            panic!()
        };
        assert_eq!(value.port_count, 0);
        assert_eq!(
            l.domain_of(3, &"203.0.113.9".parse().unwrap()).as_deref(),
            Some("other.example.com")
        );
    }

    #[test]
    fn answers_nobody_asked_for_teach_nothing() {
        let mut l = Learner::new(DnsOptions::default());
        l.set_workload(3, 7, Some(allowlist(&[("**.example.com", None)])));
        let a = build::answer(
            5,
            "x.example.com",
            wire::TYPE_A,
            1,
            &[build::record(
                &build::QNAME,
                wire::TYPE_A,
                60,
                &[203, 0, 113, 1],
            )],
        );
        // No query at all.
        assert!(
            l.packet(
                &capture(capture_kind::ANSWER_HELD, DNS, 53, POD, 40000, &a),
                0
            )
            .is_empty()
        );
        // A query from another port, another id, for another name, or to another server.
        let q = build::query(5, "x.example.com", wire::TYPE_A);
        l.packet(&capture(capture_kind::QUERY, POD, 40001, DNS, 53, &q), 0);
        assert!(
            l.packet(
                &capture(capture_kind::ANSWER_HELD, DNS, 53, POD, 40000, &a),
                0
            )
            .is_empty()
        );
        let q = build::query(6, "x.example.com", wire::TYPE_A);
        l.packet(&capture(capture_kind::QUERY, POD, 40000, DNS, 53, &q), 0);
        assert!(
            l.packet(
                &capture(capture_kind::ANSWER_HELD, DNS, 53, POD, 40000, &a),
                0
            )
            .is_empty()
        );
        let q = build::query(5, "y.example.com", wire::TYPE_A);
        l.packet(&capture(capture_kind::QUERY, POD, 40000, DNS, 53, &q), 0);
        assert!(
            l.packet(
                &capture(capture_kind::ANSWER_HELD, DNS, 53, POD, 40000, &a),
                0
            )
            .is_empty()
        );
        let q = build::query(5, "x.example.com", wire::TYPE_A);
        l.packet(
            &capture(capture_kind::QUERY, POD, 40000, [10, 96, 0, 11], 53, &q),
            0,
        );
        assert!(
            l.packet(
                &capture(capture_kind::ANSWER_HELD, DNS, 53, POD, 40000, &a),
                0
            )
            .is_empty()
        );
        assert_eq!(l.stats.unsolicited, 5);
        // The real one, once: a replay of it teaches nothing more.
        l.packet(&capture(capture_kind::QUERY, POD, 40000, DNS, 53, &q), 0);
        assert_eq!(
            l.packet(
                &capture(capture_kind::ANSWER_HELD, DNS, 53, POD, 40000, &a),
                0
            )
            .len(),
            1
        );
        assert!(
            l.packet(
                &capture(capture_kind::ANSWER_HELD, DNS, 53, POD, 40000, &a),
                0
            )
            .is_empty()
        );
    }

    /// A TCP segment (IPv4, no L2 header) as the datapath captures it.
    #[allow(clippy::too_many_arguments)]
    fn tcp_capture(
        kind: u8,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        seq: u32,
        flags: u8,
        data: &[u8],
    ) -> DnsCapture {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0, 5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend_from_slice(data);
        ipv4_capture(kind, src, dst, PROTO_TCP, &tcp)
    }

    /// A DNS message framed for TCP (its length first).
    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut f = (msg.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(msg);
        f
    }

    /// Over TCP a message is read only where the stream says one starts: from a SYN on, in
    /// order. After a gap, or on a stream whose start was never seen, where the next one
    /// starts is unknown, and a well-formed answer found there (one a pod could have hidden
    /// in the data of another answer, a TXT record) teaches nothing.
    #[test]
    fn a_tcp_stream_is_read_in_order_from_its_start_and_no_further_after_a_gap() {
        const SYN: u8 = 0x02;
        const ACK: u8 = 0x10;
        let mut l = Learner::new(DnsOptions::default());
        l.set_workload(3, 7, Some(allowlist(&[("api.example.com", Some(443))])));
        let q = framed(&build::query(1, "api.example.com", wire::TYPE_A));
        let a = framed(&build::answer(
            1,
            "api.example.com",
            wire::TYPE_A,
            1,
            &[build::record(
                &build::QNAME,
                wire::TYPE_A,
                60,
                &[203, 0, 113, 7],
            )],
        ));
        let ask = |l: &mut Learner, port: u16| {
            l.packet(
                &tcp_capture(capture_kind::QUERY, POD, port, DNS, 53, 100, SYN, &[]),
                0,
            );
            l.packet(
                &tcp_capture(capture_kind::QUERY, POD, port, DNS, 53, 101, ACK, &q),
                0,
            );
        };
        let answer = |l: &mut Learner, port: u16, seq: u32| {
            l.packet(
                &tcp_capture(capture_kind::ANSWER_HELD, DNS, 53, POD, port, seq, ACK, &a),
                0,
            )
        };
        // In order from the SYN-ACK: learned.
        ask(&mut l, 41000);
        l.packet(
            &tcp_capture(
                capture_kind::ANSWER_HELD,
                DNS,
                53,
                POD,
                41000,
                500,
                SYN | ACK,
                &[],
            ),
            0,
        );
        assert_eq!(answer(&mut l, 41000, 501).len(), 1);
        // A gap before it: not read, nor anything after on that stream.
        ask(&mut l, 41001);
        l.packet(
            &tcp_capture(
                capture_kind::ANSWER_HELD,
                DNS,
                53,
                POD,
                41001,
                500,
                SYN | ACK,
                &[],
            ),
            0,
        );
        assert!(answer(&mut l, 41001, 601).is_empty());
        assert!(answer(&mut l, 41001, 601 + a.len() as u32).is_empty());
        // A stream first seen mid-way (its SYN-ACK never captured): not read.
        ask(&mut l, 41002);
        assert!(answer(&mut l, 41002, 501).is_empty());
        assert_eq!(l.stats.tcp_streams_lost, 2);
        assert_eq!(l.stats.answers, 1);
    }

    /// One workload flooding its resolver with queries holds at most its share of the
    /// queries waiting for answers: another's answer is still matched and learned from.
    #[test]
    fn a_flood_of_queries_from_one_workload_leaves_room_for_the_others() {
        let mut l = Learner::new(DnsOptions::default());
        l.set_workload(3, 7, Some(allowlist(&[("api.example.com", Some(443))])));
        for i in 0..20_000u32 {
            let q = build::query(i as u16, "flood.example.com", wire::TYPE_A);
            let mut c = capture(
                capture_kind::QUERY,
                [10, 1, 0, 99],
                10_000 + (i / 65_536) as u16 + (i % 7) as u16,
                DNS,
                53,
                &q,
            );
            c.slot = 9;
            l.packet(&c, 0);
        }
        assert_eq!(l.stats.queries, 20_000);
        assert!(
            l.stats.queries_not_followed >= 20_000 - MAX_PENDING_PER_SLOT as u64,
            "{:?}",
            l.stats
        );
        let writes = ask_and_answer(&mut l, 1, "api.example.com", [203, 0, 113, 7], 60);
        assert_eq!(writes.len(), 1, "{writes:?}");
    }

    /// Many workloads flooding at once, each within its own limit, fill the node's table:
    /// a quiet workload's query then takes the place of the oldest of the biggest holder,
    /// and its answer is learned from.
    #[test]
    fn many_workloads_flooding_at_once_leave_room_for_a_quiet_one() {
        let mut l = Learner::new(DnsOptions::default());
        l.set_workload(3, 7, Some(allowlist(&[("api.example.com", Some(443))])));
        let flooders = (MAX_PENDING / MAX_PENDING_PER_SLOT + 4) as u32;
        for slot in 0..flooders {
            for i in 0..MAX_PENDING_PER_SLOT as u32 {
                let q = build::query(i as u16, "flood.example.com", wire::TYPE_A);
                let mut c = capture(capture_kind::QUERY, [10, 1, 0, 99], 10_000, DNS, 53, &q);
                c.slot = 100 + slot;
                l.packet(&c, 0);
            }
        }
        assert_eq!(l.pending.len(), MAX_PENDING, "the node's table is full");
        let writes = ask_and_answer(&mut l, 1, "api.example.com", [203, 0, 113, 7], 60);
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(l.stats.queries_evicted >= 1, "{:?}", l.stats);
        // The flooders only ever give way to one another's equals: none grows past them.
        assert!(
            l.pending_per_slot
                .values()
                .all(|n| *n <= MAX_PENDING_PER_SLOT)
        );
    }

    #[test]
    fn the_bound_per_workload_counts_what_does_not_fit() {
        let mut l = Learner::new(DnsOptions {
            max_per_workload: 2,
            ..DnsOptions::default()
        });
        for i in 0..5u8 {
            ask_and_answer(
                &mut l,
                i as u16,
                &format!("n{i}.example.com"),
                [203, 0, 113, i],
                60,
            );
        }
        assert_eq!(l.per_workload(), vec![(3, 2, 3)]);
        // A restarted agent continues the count for the same workload, not for a new one.
        let mut again = Learner::new(DnsOptions::default());
        again.restore_overflow(&l.overflow());
        again.set_workload(3, 7, None);
        assert_eq!(again.per_workload(), vec![(3, 0, 3)]);
        let mut replaced = Learner::new(DnsOptions::default());
        replaced.restore_overflow(&l.overflow());
        replaced.set_workload(3, 8, None);
        assert_eq!(replaced.per_workload(), vec![(3, 0, 0)]);
    }

    #[test]
    fn a_new_generation_or_allowlist_rewrites_the_slot() {
        let mut l = Learner::new(DnsOptions::default());
        l.set_workload(3, 7, None);
        ask_and_answer(&mut l, 1, "api.example.com", [203, 0, 113, 7], 60);
        let writes = l.set_workload(3, 7, Some(allowlist(&[("api.example.com", None)])));
        let [LearnedWrite::Put(_, v)] = writes.as_slice() else {
            panic!("{writes:?}")
        };
        assert_eq!(v.port_count, 1);
        let writes = l.set_workload(3, 8, None);
        assert!(matches!(writes.as_slice(), [LearnedWrite::Delete(k)] if k.generation == 7));
        assert_eq!(l.domain_of(3, &"203.0.113.7".parse().unwrap()), None);
    }
}
