//! What the agent observed: per-workload counters read from the maps, the kernel's per-flow
//! counters folded into peer-pair series, would-drop times, the flow log's own counts. The
//! observer holds its own read handles on the pinned maps and the latest published
//! [`View`], so metrics, `status` and `flows` never wait on the controller.
//!
//! User-space counts are persisted in the state directory (before every scrape and every
//! few seconds) so they never go backwards across restarts.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use agent_common::{
    DIR_EGRESS, DIR_INGRESS, FlowCounterKey, VERDICT_ALLOWED, VERDICT_DROPPED, VERDICT_WOULD_DROP,
    diag,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    admin::{self, DirectionCounters, FlowRow, Flows, Status, WorkloadStatus},
    compile::advise::{ObservedFlow, WORLD_ADDRESSES_KEPT},
    controller::View,
    flowlog::{FlowRecord, protocol_name},
    maps::{MapReaders, WorkloadCounters},
    metrics::Snapshot,
    recorder::EventStats,
};

/// Counters kept in user space, persisted in the state directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Persisted {
    flow_log_written: u64,
    flow_log_lost: u64,
    policy_errors: u64,
    /// Kubernetes Events by outcome, in `EventStats::outcomes` order.
    #[serde(default)]
    kube_events: Vec<u64>,
    flow_overflow: u64,
    /// Packets per flow series (labels in `SERIES_LABELS` order).
    flow_series: Vec<(Vec<String>, u64)>,
    /// Last value read per kernel flow counter: (slot, peer, port, proto, direction, verdict,
    /// origin) -> packets.
    flow_last_seen: Vec<([u32; 7], u64)>,
    /// Direct-mapped flow series buckets: (bucket, key as above, last value read).
    #[serde(default)]
    series_buckets: Vec<(u32, [u32; 7], u64)>,
    /// Unix seconds of the last would-drop, by NAMESPACE/POD.
    last_would_drop: BTreeMap<String, u64>,
    /// What was seen of each workload, by NAMESPACE/WORKLOAD.
    #[serde(default)]
    workloads: BTreeMap<String, WorkloadRecord>,
    /// Would-drops each pod (NAMESPACE/POD) had counted at the last poll: a restarted agent
    /// adds only what came after.
    #[serde(default)]
    pod_would_drops: BTreeMap<String, u64>,
    /// Packets of peer pairs the observed-flow record did not take (`make_room`).
    #[serde(default)]
    record_refused: u64,
    /// Flow series given up for new ones, with their values (`Observer::retired`).
    #[serde(default)]
    retired_series: Vec<(Vec<String>, u64)>,
    /// The kernel's id of the `COUNTERS` map the counts below were read from.
    #[serde(default)]
    counters_map_id: u32,
    /// Per pod (NAMESPACE/POD), the kernel's counters as last read and what pins made
    /// before them had counted: exported counters are their sum, so they never go back
    /// when the pins are made anew.
    #[serde(default)]
    pod_counts: BTreeMap<String, CarriedCounts>,
    /// The same for the datapath diagnostics, by `diag` index: (last read, carried).
    #[serde(default)]
    diag_counts: Vec<(u64, u64)>,
    /// Peer pairs seen, as agents before `observed.json` kept them (read, never written).
    #[serde(default, skip_serializing)]
    observed: Vec<ObservedFlow>,
}

/// Packets and bytes by direction and verdict, as `WorkloadCounters`.
type Counts = [[[u64; 2]; agent_common::VERDICTS]; agent_common::DIRECTIONS];

/// A pod's kernel counters as last read (`last`) and the counts of earlier pins or slots
/// (`carried`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct CarriedCounts {
    last: Counts,
    carried: Counts,
    /// The same for the pod's other per-slot counters, `SLOT_COUNTERS` in order.
    #[serde(default)]
    slot_last: [u64; SLOT_COUNTERS],
    #[serde(default)]
    slot_carried: [u64; SLOT_COUNTERS],
    /// When the pod was last seen detached (Unix seconds), while it is: its counts are
    /// kept a while, so a pod deleted and made again under its name (a StatefulSet's)
    /// continues its series instead of starting them over.
    #[serde(default)]
    detached_since: Option<u64>,
}

impl CarriedCounts {
    /// The kernel counts from zero again: what it had counted is carried.
    fn carry(&mut self) {
        let last = self.last.iter_mut().flatten();
        for (carried, last) in self.carried.iter_mut().flatten().zip(last) {
            carried[0] += last[0];
            carried[1] += last[1];
            *last = [0, 0];
        }
        for (carried, last) in self.slot_carried.iter_mut().zip(&mut self.slot_last) {
            *carried += std::mem::take(last);
        }
    }
}

/// Per-slot counters besides the packet counts, carried like them: packets sent from
/// addresses not the pod's own, and new connections to a learned address whose name had
/// expired.
const SLOT_COUNTERS: usize = 2;

/// Detached pods' counts at most kept (the most recently detached), about 200 bytes each
/// in `state.json`.
const DETACHED_COUNTS_KEPT: usize = 2_000;

/// A pod no longer attached has its counts carried (its slot counts from zero when it comes
/// back) and kept until `oldest` (`--record-retention`), at most `DETACHED_COUNTS_KEPT` of
/// them: its series continue if a pod of its name comes back.
fn keep_detached_counts(
    pod_counts: &mut BTreeMap<String, CarriedCounts>,
    attached: &std::collections::BTreeSet<String>,
    now: u64,
    oldest: u64,
) {
    for (id, counts) in pod_counts.iter_mut() {
        if attached.contains(id) {
            counts.detached_since = None;
        } else if counts.detached_since.is_none() {
            counts.carry();
            counts.detached_since = Some(now);
        }
    }
    pod_counts.retain(|_, c| c.detached_since.is_none_or(|t| t >= oldest));
    let detached = pod_counts
        .values()
        .filter(|c| c.detached_since.is_some())
        .count();
    if detached > DETACHED_COUNTS_KEPT {
        let mut times: Vec<u64> = pod_counts
            .values()
            .filter_map(|c| c.detached_since)
            .collect();
        times.sort_unstable();
        let cutoff = times[detached - DETACHED_COUNTS_KEPT];
        pod_counts.retain(|_, c| c.detached_since.is_none_or(|t| t >= cutoff));
    }
}

/// When the pins were made anew since the counts were persisted (another `COUNTERS` map),
/// what the old ones had counted is carried: the kernel counts from zero again.
fn carry_over_new_pins(persisted: &mut Persisted, counters_map_id: Option<u32>) {
    let Some(id) = counters_map_id else {
        return;
    };
    if persisted.counters_map_id != 0 && persisted.counters_map_id != id {
        for counts in persisted.pod_counts.values_mut() {
            counts.carry();
        }
        for (last, carried) in &mut persisted.diag_counts {
            *carried += std::mem::take(last);
        }
        // The per-flow counters start from zero too: what was last read from the old ones
        // is no baseline (a new count above it would lose that much).
        persisted.flow_last_seen.clear();
        persisted.series_buckets.clear();
        info!("the datapath's counters were pinned anew: exported counters continue");
    }
    persisted.counters_map_id = id;
}

/// The budget of the observed-flow and workload records (`--record-retention`,
/// `--record-capacity`).
#[derive(Clone, Copy, Debug)]
pub struct RecordLimits {
    /// What was last seen longer ago is forgotten: peer pairs, workloads gone from the node,
    /// hours of would-drops.
    pub retention: std::time::Duration,
    /// Peer pairs held at most. When full, a tenth goes at a time (`make_room`): first
    /// pairs seen at one poll only (a scan's), then those seen over the fewest hours
    /// (never-allowed before allowed among equals), the longest unseen first; a peer's
    /// pairs of one protocol (and DNS name) hold at most `RECORD_PORTS_PER_PEER` ports. So
    /// a scan neither fills the record for good nor pushes out the rarely used pairs it
    /// exists to remember. About 200 bytes each in memory and in observed.json (up to about
    /// 550 with the 8 addresses kept of a peer outside the cluster).
    pub capacity: usize,
}

/// Ports one peer pair (direction, source, destination, protocol) holds in the record: a
/// port scan between two workloads adds at most this many pairs.
pub const RECORD_PORTS_PER_PEER: usize = 64;

/// Makes room in the record for `key` if it is new to it. `false` when it must not be added:
/// its peer already holds `RECORD_PORTS_PER_PEER` ports of the protocol.
fn make_room(
    observed: &mut BTreeMap<ObservedKey, ObservedFlow>,
    key: &ObservedKey,
    limits: &RecordLimits,
    now: u64,
) -> bool {
    if observed.contains_key(key) {
        return true;
    }
    // One peer: the same ends, protocol and DNS name (each name outside the cluster is a
    // peer of its own), any port.
    let same_peer = |k: &ObservedKey| {
        (&k.0, &k.1, &k.2, &k.3, &k.4, &k.5) == (&key.0, &key.1, &key.2, &key.3, &key.4, &key.5)
    };
    let first = (
        key.0.clone(),
        key.1.clone(),
        key.2.clone(),
        key.3.clone(),
        key.4.clone(),
        key.5.clone(),
        0,
        String::new(),
    );
    if observed
        .range(first..)
        .take_while(|(k, _)| same_peer(k))
        .filter(|(k, _)| k.7 == key.7)
        .count()
        >= RECORD_PORTS_PER_PEER
    {
        return false;
    }
    let capacity = limits.capacity.max(1);
    if observed.len() < capacity {
        return true;
    }
    let oldest = now.saturating_sub(limits.retention.as_secs());
    observed.retain(|_, f| f.last_seen >= oldest);
    if observed.len() >= capacity {
        // A tenth at a time, so a flood of new pairs does not sort on every one: first
        // what was seen at one poll only (a scan's), then by the hours between first and
        // last seen, never allowed before allowed among equals, the longest unseen first.
        // A pair seen over days stays, allowed or not (a nightly job the policies do not
        // allow yet is what a flip must not miss).
        let worth = |f: &ObservedFlow| {
            let span = f.last_seen.saturating_sub(f.first_seen);
            (span > 0, span / 3600, !f.only_denied(), f.last_seen)
        };
        let mut ranked: Vec<_> = observed.values().map(worth).collect();
        ranked.sort_unstable();
        let cut = ranked[(capacity / 10).min(ranked.len() - 1)];
        observed.retain(|_, f| worth(f) > cut);
    }
    true
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            retention: std::time::Duration::from_secs(RECORD_RETENTION_SECS),
            capacity: 20_000,
        }
    }
}

/// (direction, src namespace, src workload, dst namespace, dst workload, protocol, port,
/// dst domain).
type ObservedKey = (String, String, String, String, String, String, u16, String);

/// How often the observed-flow record (up to a few MB) is written to `observed.json`; the
/// counters in `state.json` are written at every poll. A graceful stop writes both.
pub const RECORD_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The default retention of the records (`--record-retention`).
pub const RECORD_RETENTION_SECS: u64 = 35 * 86_400;

/// What the observer saw of one workload: its pods come and go with rollouts, its record
/// stays. Safe-to-flip questions are answered from it (`quiet`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct WorkloadRecord {
    /// Unix seconds when a pod of it was first seen attached here.
    observed_since: u64,
    /// Unix seconds of the last poll that saw a pod of it.
    last_seen: u64,
    last_would_drop: Option<u64>,
    /// (unix hour, would-drops counted in it), oldest first; only hours that had any.
    hourly: VecDeque<(u64, u64)>,
}

impl WorkloadRecord {
    /// Would-drops counted in the hours that overlap the last `secs` seconds.
    fn would_drops_within(&self, now: u64, secs: u64) -> u64 {
        let from = now.saturating_sub(secs) / 3600;
        self.hourly
            .iter()
            .filter(|(hour, _)| *hour >= from)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Why a workload is not yet safe to flip to drop (`Observer::quiet`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NotQuiet {
    /// One line per workload: what it lacks.
    pub reasons: Vec<String>,
    /// Its latest would-drop flows within the window (flow log records, newest last).
    pub flows: Vec<FlowRecord>,
    /// Its peer pairs with would-drops within the window, from the observed-flow record:
    /// the `REFUSAL_PAIRS_SHOWN` latest, and how many more there are.
    pub pairs: Vec<ObservedFlow>,
    pub more_pairs: usize,
}

/// Would-drop peer pairs a refusal names (and explains).
pub const REFUSAL_PAIRS_SHOWN: usize = 20;

/// The labels of `tollgate_flow_packets_total`, in the order the observer keeps them.
pub const SERIES_LABELS: [&str; 9] = [
    "direction",
    "verdict",
    "src_namespace",
    "src_workload",
    "dst_namespace",
    "dst_workload",
    "protocol",
    "port",
    "dst_domain",
];

/// How many flow log records `flows` keeps.
const RECENT_DENIED: usize = 50;

fn observed_key(f: &ObservedFlow) -> ObservedKey {
    (
        f.direction.clone(),
        f.src_namespace.clone(),
        f.src_workload.clone(),
        f.dst_namespace.clone(),
        f.dst_workload.clone(),
        f.protocol.clone(),
        f.port,
        f.dst_domain.clone(),
    )
}

/// Persisted series with every label of `SERIES_LABELS`: those of agents before
/// `dst_domain` get it, empty.
fn with_every_label<T: FromIterator<(Vec<String>, u64)>>(series: &[(Vec<String>, u64)]) -> T {
    series
        .iter()
        .cloned()
        .map(|(mut labels, v)| {
            labels.resize(SERIES_LABELS.len(), String::new());
            (labels, v)
        })
        .collect()
}

/// The record key of a peer pair between a local workload (namespace, workload) and
/// `world`, as the counters name it: `ingress` when the flow came from outside.
fn world_pair_key(
    ingress: bool,
    local: (&str, &str),
    protocol: String,
    port: u16,
    domain: String,
) -> ObservedKey {
    let world = ("world".to_string(), "world".to_string());
    let here = (local.0.to_string(), local.1.to_string());
    let (src, dst) = if ingress {
        (world, here)
    } else {
        (here, world)
    };
    (
        if ingress { "ingress" } else { "egress" }.to_string(),
        src.0,
        src.1,
        dst.0,
        dst.1,
        protocol,
        port,
        domain,
    )
}

fn key_array(k: &FlowCounterKey) -> [u32; 7] {
    [
        k.slot,
        k.peer,
        k.port as u32,
        k.proto as u32,
        k.direction as u32,
        k.verdict as u32,
        k.origin as u32,
    ]
}

/// A duration as people read it: `2h 5m`, `40s`.
fn human(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The name of a verdict code.
pub fn verdict_name(v: u8) -> &'static str {
    match v {
        VERDICT_WOULD_DROP => "would_drop",
        VERDICT_DROPPED => "dropped",
        _ => "allowed",
    }
}

/// What the flow log task counts, apart from the observer so writing a line never waits on
/// a scrape.
#[derive(Debug, Default)]
pub struct FlowLogStats {
    pub written: AtomicU64,
    pub lost: AtomicU64,
    recent: Mutex<VecDeque<FlowRecord>>,
    /// Addresses of `world` peers seen in flow events, by the observed-flow record they
    /// belong to, until the observer's next poll files them (`Observer::file_world_addresses`).
    world_addresses: Mutex<HashMap<ObservedKey, (Vec<IpAddr>, std::time::Instant)>>,
}

/// Peer pairs whose `world` addresses wait for their record at most (a port scan of the
/// internet cannot grow the table); and how long one waits for the counters to name it.
const PENDING_WORLD_PAIRS: usize = 4096;
const PENDING_WORLD_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl FlowLogStats {
    /// The would-drop records kept for `tollgate flows`, oldest first.
    pub fn recent_would_drops(&self) -> Vec<FlowRecord> {
        self.recent
            .lock()
            .expect("recent")
            .iter()
            .filter(|r| r.verdict == "would_drop")
            .cloned()
            .collect()
    }

    /// Notes the address of a `world` peer (`peer_identity` is the event's) for the
    /// observed-flow record of its peer pair. The kernel's flow counters name the peer
    /// `world` (or its DNS name) without an address: the sampled events are where
    /// addresses come from.
    pub fn note_world_peer(&self, record: &FlowRecord, peer_identity: u32) {
        if !agent_common::is_world(peer_identity) {
            return;
        }
        let ingress = record.direction == "ingress";
        let (local, address) = if ingress {
            (record.dst.as_ref(), &record.src_ip)
        } else {
            (record.src.as_ref(), &record.dst_ip)
        };
        let (Some(local), Ok(address)) = (local, address.parse::<IpAddr>()) else {
            return;
        };
        let key = world_pair_key(
            ingress,
            (&local.namespace, &local.workload),
            record.protocol.clone(),
            record.dst_port,
            record.dst_domain.clone().unwrap_or_default(),
        );
        let mut pending = self.world_addresses.lock().expect("world addresses");
        if pending.len() >= PENDING_WORLD_PAIRS && !pending.contains_key(&key) {
            return;
        }
        let (addresses, at) = pending
            .entry(key)
            .or_insert_with(|| (Vec::new(), std::time::Instant::now()));
        *at = std::time::Instant::now();
        if !addresses.contains(&address) && addresses.len() < WORLD_ADDRESSES_KEPT {
            addresses.push(address);
        }
    }

    /// Keeps a record for `tollgate flows`.
    pub fn remember(&self, record: FlowRecord) {
        let mut recent = self.recent.lock().expect("recent");
        recent.push_back(record);
        if recent.len() > RECENT_DENIED {
            recent.pop_front();
        }
    }
}

/// How often map occupancy (`tollgate_map_entries`) is counted and the connection tracking
/// census taken. Counting a hash map walks its keys, one system call each: a million
/// tracked flows take about a second, which a scrape must never wait for.
pub const OCCUPANCY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Map occupancy and the connection tracking census as last taken, shared between their
/// task and the scrapes.
pub type Occupancy = std::sync::Arc<Mutex<Counted>>;

/// What the background walk found.
#[derive(Clone, Debug, Default)]
pub struct Counted {
    /// (map, entries, capacity).
    pub maps: Vec<(&'static str, u64, u64)>,
    /// Live tracked flows per slot, both tables.
    pub conntrack_per_slot: HashMap<u32, u64>,
    /// Peers outside the cluster the live flows talk to, until the observer files them.
    pub world_peers: std::collections::HashSet<crate::maps::WorldPeer>,
}

/// CLOCK_MONOTONIC in ns: the clock of the programs' timestamps.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC_COARSE in ns: what the programs' clock is tied to (`Config::ns_per_jiffy`).
pub fn coarse_monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every `interval`, with its own map handles and off every lock a scrape, a flip or a
/// sync takes: the connection tracking census (dead entries deleted, each workload's share
/// count corrected, `ConntrackCensus`) and map occupancy. The first count waits for the
/// first reconcile: taken before, it would show maps about to be filled as empty for a
/// whole interval.
pub async fn count_occupancy(
    readers: MapReaders,
    into: Occupancy,
    interval: std::time::Duration,
    mut view: tokio::sync::watch::Receiver<std::sync::Arc<crate::controller::View>>,
) {
    // Closed (the controller is gone): the agent is stopping.
    if view.wait_for(|v| v.ready).await.is_err() {
        return;
    }
    let mut readers = Some(readers);
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let Some(mut r) = readers.take() else {
            return;
        };
        let walked = tokio::task::spawn_blocking(move || {
            let census = r.conntrack_census(monotonic_ns());
            let mut maps = r.occupancy();
            for (name, entries, _) in maps.iter_mut() {
                match *name {
                    agent_common::map_names::CONNTRACK => *entries = census.main,
                    agent_common::map_names::CT_OVERFLOW => *entries = census.overflow,
                    _ => {}
                }
            }
            (r, maps, census)
        })
        .await;
        // A panic in the walk ends the task, which the daemon reports as fatal.
        let Ok((r, maps, census)) = walked else {
            return;
        };
        readers = Some(r);
        let mut counted = into.lock().expect("occupancy");
        // Peers the observer has not filed yet stay (bounded by the census's own bound).
        let mut world_peers = std::mem::take(&mut counted.world_peers);
        if world_peers.len() < crate::maps::WORLD_PEERS_PER_CENSUS {
            world_peers.extend(census.world_peers);
        } else {
            world_peers = census.world_peers;
        }
        *counted = Counted {
            maps,
            conntrack_per_slot: census.per_slot,
            world_peers,
        };
    }
}

/// A peer pair with a direct-mapped bucket, as the observer tracks it.
#[derive(Clone, Debug)]
struct SeriesBucket {
    key: FlowCounterKey,
    /// Packets read at the last poll.
    last: u64,
    /// When its count last moved.
    last_change: std::time::Instant,
    /// Its key was taken away at the last poll; one more read, then the bucket is free.
    retiring: bool,
}

/// A bucket whose count has not moved for this long goes back to the hash, making room for
/// pairs that are busy now.
const SERIES_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Reads counters and keeps the flow series.
pub struct Observer {
    readers: MapReaders,
    state_file: PathBuf,
    max_flow_series: usize,
    persisted: Persisted,
    series: BTreeMap<Vec<String>, u64>,
    /// When each series last grew: once `max_flow_series` is reached, a new series takes
    /// the place of the one idle longest (idle at least `series_idle`).
    series_grew: HashMap<Vec<String>, std::time::Instant>,
    series_idle: std::time::Duration,
    /// Values of series given up for new ones (at most `retired_capacity`): a series that
    /// comes back continues from there, never backwards.
    retired: BTreeMap<Vec<String>, u64>,
    /// `max_flow_series`, or more when an agent with a higher limit left more series than
    /// that: every one of them keeps its value across the restart.
    retired_capacity: usize,
    last_seen: HashMap<[u32; 7], u64>,
    /// Peer pairs counted in direct-mapped buckets (`FLOW_SERIES`), by bucket.
    buckets: HashMap<u32, SeriesBucket>,
    /// The bucket of each peer pair in `buckets`.
    bucket_of: HashMap<FlowCounterKey, u32>,
    /// Map occupancy, counted in the background (`count_occupancy`).
    pub occupancy: Occupancy,
    /// The observed-flow record by peer pair, in `observed.json`.
    observed: BTreeMap<ObservedKey, ObservedFlow>,
    observed_file: PathBuf,
    /// When the record was last written, and whether it changed since.
    observed_written: Option<std::time::Instant>,
    observed_changed: bool,
    limits: RecordLimits,
    /// The flow log's counts, and the `world` addresses its events saw.
    log: std::sync::Arc<FlowLogStats>,
    /// The Kubernetes Events' counts (`--kubernetes`).
    events: std::sync::Arc<EventStats>,
}

/// Where the flow log keeps its counts of lines written and lost, 16 bytes rewritten in
/// place with every batch (`FlowLogCounts`).
pub fn flow_log_counts_file(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("flow-log-counts")
}

fn read_flow_log_counts(path: &std::path::Path) -> (u64, u64) {
    match std::fs::read(path) {
        Ok(b) if b.len() == 16 => (
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        ),
        _ => (0, 0),
    }
}

/// The flow log's counts of lines written and lost, kept as it writes: the lines of the
/// last second before a kill -9 are in the file, and so are their counts.
pub struct FlowLogCounts {
    file: Option<std::fs::File>,
}

impl FlowLogCounts {
    pub fn open(state_dir: &std::path::Path) -> FlowLogCounts {
        let path = flow_log_counts_file(state_dir);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(
                |e| warn!(error = %e, path = %path.display(), "cannot keep the flow log's counts"),
            )
            .ok();
        FlowLogCounts { file }
    }

    /// One write of both counts in place (no rename: one syscall per batch of lines).
    pub fn store(&self, log: &FlowLogStats) {
        use std::os::unix::fs::FileExt as _;
        let Some(file) = &self.file else { return };
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&log.written.load(Ordering::Relaxed).to_le_bytes());
        bytes[8..].copy_from_slice(&log.lost.load(Ordering::Relaxed).to_le_bytes());
        let _ = file.write_all_at(&bytes, 0);
    }
}

impl Observer {
    /// An observer over the pinned maps, continuing the counts persisted in `state_dir`.
    /// Returns the flow log's and policy errors' counts to continue from too.
    pub fn new(
        readers: MapReaders,
        state_dir: &std::path::Path,
        max_flow_series: usize,
        series_idle: std::time::Duration,
        limits: RecordLimits,
        log: std::sync::Arc<FlowLogStats>,
        events: std::sync::Arc<EventStats>,
    ) -> (Observer, u64) {
        let state_file = state_dir.join("state.json");
        let observed_file = state_dir.join("observed.json");
        let persisted: Persisted = admin::read_kept(&state_file, "user-space counters");
        // The flow log's own record of its counts is written with every batch of lines,
        // where `state.json` is written every poll: after a kill -9 it is the later one.
        let (written, lost) = read_flow_log_counts(&flow_log_counts_file(state_dir));
        log.written
            .store(persisted.flow_log_written.max(written), Ordering::Relaxed);
        log.lost
            .store(persisted.flow_log_lost.max(lost), Ordering::Relaxed);
        events.continue_from(&persisted.kube_events);
        let policy_errors = persisted.policy_errors;
        let mut persisted = persisted;
        carry_over_new_pins(&mut persisted, readers.counters_map_id());
        // Buckets live in the pinned maps across restarts: continue from what was last read
        // for the same pair, or from what the bucket holds now (never count twice).
        let remembered: HashMap<(u32, [u32; 7]), u64> = persisted
            .series_buckets
            .iter()
            .map(|(b, k, v)| ((*b, *k), *v))
            .collect();
        let mut buckets = HashMap::new();
        let mut bucket_of = HashMap::new();
        for (bucket, key) in readers.flow_series_keys() {
            let last = match remembered.get(&(bucket, key_array(&key))) {
                Some(v) => *v,
                None => readers.flow_series(bucket).map(|c| c.packets).unwrap_or(0),
            };
            buckets.insert(
                bucket,
                SeriesBucket {
                    key,
                    last,
                    last_change: std::time::Instant::now(),
                    retiring: false,
                },
            );
            bucket_of.insert(key, bucket);
        }
        let mut observer = Observer {
            buckets,
            bucket_of,
            readers,
            state_file,
            max_flow_series,
            series_grew: persisted
                .flow_series
                .iter()
                .map(|(l, _)| (l.clone(), std::time::Instant::now()))
                .collect(),
            series_idle,
            limits,
            retired: with_every_label(&persisted.retired_series),
            retired_capacity: max_flow_series,
            series: with_every_label(&persisted.flow_series),
            last_seen: persisted.flow_last_seen.iter().cloned().collect(),
            observed: std::fs::read(&observed_file)
                .ok()
                .and_then(|data| {
                    serde_json::from_slice::<Vec<ObservedFlow>>(&data)
                        .inspect_err(|e| {
                            warn!(
                                "{}: unreadable ({e}); the observed-flow record behind advise, graph and --if-quiet starts afresh",
                                observed_file.display()
                            );
                        })
                        .ok()
                })
                .unwrap_or_else(|| persisted.observed.clone())
                .into_iter()
                .map(|mut f| {
                    // Written before records kept it: its last sighting stands in.
                    if f.last_would_drop == 0 && f.packets[1] > 0 {
                        f.last_would_drop = f.last_seen;
                    }
                    (observed_key(&f), f)
                })
                .collect(),
            observed_file,
            observed_written: None,
            observed_changed: false,
            persisted,
            occupancy: Occupancy::default(),
            log,
            events,
        };
        observer.fit_restored_series();
        (observer, policy_errors)
    }

    /// Fits the series restored from the last agent to `--max-flow-series`. Beyond it (an
    /// agent with a higher limit), the largest stay exported and the rest are retired with
    /// their values, every one of them: a series that comes back continues from there.
    /// Below it (a higher limit now), the largest retired series are exported again at
    /// their values.
    fn fit_restored_series(&mut self) {
        let excess = self.series.len().saturating_sub(self.max_flow_series);
        self.retired_capacity = self
            .max_flow_series
            .max(self.retired.len().saturating_add(excess));
        let room = self.max_flow_series.saturating_sub(self.series.len());
        if room > 0 && !self.retired.is_empty() {
            let mut by_value: Vec<(Vec<String>, u64)> =
                self.retired.iter().map(|(l, v)| (l.clone(), *v)).collect();
            by_value.sort_by_key(|(_, v)| std::cmp::Reverse(*v));
            let now = std::time::Instant::now();
            for (labels, value) in by_value.into_iter().take(room) {
                self.retired.remove(&labels);
                self.series_grew.insert(labels.clone(), now);
                self.series.insert(labels, value);
            }
        }
        if excess == 0 {
            return;
        }
        let mut by_value: Vec<(Vec<String>, u64)> =
            self.series.iter().map(|(l, v)| (l.clone(), *v)).collect();
        by_value.sort_by_key(|(_, v)| *v);
        for (labels, value) in by_value.into_iter().take(excess) {
            self.series.remove(&labels);
            self.series_grew.remove(&labels);
            self.retire(labels, value);
        }
        info!(
            retired = excess,
            max_flow_series = self.max_flow_series,
            "restored flow series beyond --max-flow-series retired"
        );
    }

    /// Writes the observed-flow record if it changed, at most every
    /// `RECORD_WRITE_INTERVAL` unless `now`.
    pub fn persist_record(&mut self, now: bool) {
        let due = self
            .observed_written
            .is_none_or(|t| t.elapsed() >= RECORD_WRITE_INTERVAL);
        if !self.observed_changed || !(due || now) {
            return;
        }
        let flows: Vec<&ObservedFlow> = self.observed.values().collect();
        let data = serde_json::to_vec(&flows).expect("serializable");
        match admin::write_atomic(&self.observed_file, &data) {
            Ok(()) => {
                self.observed_written = Some(std::time::Instant::now());
                self.observed_changed = false;
            }
            Err(e) => warn!(error = %e, "could not persist the observed-flow record"),
        }
    }

    /// Writes the user-space counts to the state directory (the observed-flow record at
    /// most every `RECORD_WRITE_INTERVAL`).
    pub fn persist(&mut self, log: &FlowLogStats, policy_errors: u64) {
        self.persist_record(false);
        self.persisted.flow_series = self.series.iter().map(|(k, v)| (k.clone(), *v)).collect();
        self.persisted.flow_last_seen = self.last_seen.iter().map(|(k, v)| (*k, *v)).collect();
        self.persisted.series_buckets = self
            .buckets
            .iter()
            .filter(|(_, b)| !b.retiring)
            .map(|(i, b)| (*i, key_array(&b.key), b.last))
            .collect();
        self.persisted.retired_series = self.retired.iter().map(|(k, v)| (k.clone(), *v)).collect();
        self.persisted.flow_log_written = log.written.load(Ordering::Relaxed);
        self.persisted.flow_log_lost = log.lost.load(Ordering::Relaxed);
        self.persisted.kube_events = self.events.outcomes().iter().map(|(_, n)| *n).collect();
        self.persisted.policy_errors = policy_errors;
        let data = serde_json::to_vec(&self.persisted).expect("serializable");
        if let Err(e) = admin::write_atomic(&self.state_file, &data) {
            warn!(error = %e, "could not persist counters");
        }
    }

    /// Folds the kernel's per-flow counters into the flow series, and notes would-drops.
    ///
    /// A peer pair is counted in the LRU hash (`FLOW_COUNTERS`) until the observer gives it
    /// a direct-mapped bucket (`FLOW_SERIES`), where established packets cost two array
    /// lookups instead of a hash lookup; both places are read and their deltas added, so a
    /// pair moving between them loses nothing.
    pub fn poll(&mut self, view: &View) {
        // Before the first reconcile the view is empty: nothing to learn, nothing to forget.
        // What the kernel counted meanwhile (while no agent ran, too) is read once the slots
        // and identities have names, never consumed without them.
        if !view.ready {
            return;
        }
        let slots: HashMap<u32, (&str, &str)> = view
            .workloads
            .iter()
            .map(|w| (w.slot, (w.namespace.as_str(), w.workload.as_str())))
            .collect();
        let current = self.readers.flow_counters();
        let mut seen = HashMap::with_capacity(current.len());
        let mut deltas: Vec<(FlowCounterKey, u64)> = Vec::new();
        let mut busy_in_hash: Vec<FlowCounterKey> = Vec::new();
        for (key, counter) in current {
            let id = key_array(&key);
            let last = self.last_seen.get(&id).copied().unwrap_or(0);
            // A value below the last one: the entry was evicted and created again.
            let delta = if counter.packets >= last {
                counter.packets - last
            } else {
                counter.packets
            };
            seen.insert(id, counter.packets);
            if delta > 0 {
                deltas.push((key, delta));
                if !self.bucket_of.contains_key(&key) && slots.contains_key(&key.slot) {
                    busy_in_hash.push(key);
                }
            }
        }
        self.last_seen = seen;

        let now = std::time::Instant::now();
        let mut freed = Vec::new();
        let mut retire = Vec::new();
        for (bucket, state) in self.buckets.iter_mut() {
            let Ok(c) = self.readers.flow_series(*bucket) else {
                continue;
            };
            let delta = c.packets.saturating_sub(state.last);
            state.last = c.packets;
            if delta > 0 {
                deltas.push((state.key, delta));
                state.last_change = now;
            }
            if state.retiring {
                freed.push(*bucket);
            } else if !slots.contains_key(&state.key.slot)
                || now.duration_since(state.last_change) > SERIES_IDLE
            {
                retire.push(*bucket);
            }
        }
        for bucket in freed {
            if let Some(state) = self.buckets.remove(&bucket) {
                self.bucket_of.remove(&state.key);
            }
        }
        for bucket in retire {
            if self.readers.retire_flow_series(bucket).is_ok()
                && let Some(state) = self.buckets.get_mut(&bucket)
            {
                // Packets counted before the programs saw the key go are read once more at
                // the next poll.
                state.retiring = true;
            }
        }
        for key in busy_in_hash {
            let buckets = &self.buckets;
            match self
                .readers
                .assign_flow_series(&key, |b| buckets.contains_key(&b))
            {
                Ok(Some(bucket)) => {
                    self.buckets.insert(
                        bucket,
                        SeriesBucket {
                            key,
                            last: 0,
                            last_change: now,
                            retiring: false,
                        },
                    );
                    self.bucket_of.insert(key, bucket);
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "could not give a flow series its bucket"),
            }
        }

        for (key, delta) in deltas {
            let Some((ns, workload)) = slots.get(&key.slot) else {
                continue;
            };
            let (peer_ns, peer_wl, port) = view.peers.name(key.peer, key.proto, key.port);
            let local = (ns.to_string(), workload.to_string());
            let (src, dst) = if key.origin == DIR_EGRESS {
                (local, (peer_ns, peer_wl))
            } else {
                ((peer_ns, peer_wl), local)
            };
            // `direction` names the enforcement point that saw the flow: egress at its
            // source, ingress at its destination; both sides' packets of the flow count there.
            let labels = vec![
                if key.origin == DIR_INGRESS {
                    "ingress"
                } else {
                    "egress"
                }
                .to_string(),
                verdict_name(key.verdict).to_string(),
                src.0,
                src.1,
                dst.0,
                dst.1,
                protocol_name(key.proto),
                if port == 0 {
                    String::new()
                } else {
                    port.to_string()
                },
                crate::dns::peer_domain(key.peer),
            ];
            self.observe(&labels, key.verdict, delta);
            if let Some(v) = self.series.get_mut(&labels) {
                *v += delta;
                self.series_grew.insert(labels, now);
                continue;
            }
            if self.series.len() >= self.max_flow_series {
                self.retire_idle_series(now);
            }
            if self.series.len() < self.max_flow_series {
                let from = self.retired.remove(&labels).unwrap_or(0);
                self.series.insert(labels.clone(), from + delta);
                self.series_grew.insert(labels, now);
            } else {
                self.persisted.flow_overflow += delta;
            }
        }
        self.file_world_addresses(&slots);
        // Would-drops per pod and workload, for `status`, the safe-to-flip check and the
        // last-would-drop gauge.
        let now = unix_now();
        let mut attached = std::collections::BTreeSet::new();
        self.diagnostics();
        for w in &view.workloads {
            let Some(c) = self.pod_counters(&w.namespace, &w.pod, w.slot) else {
                continue;
            };
            // Read at every poll, not only when scraped: what a slot counted is carried
            // when its pod goes, up to the last read.
            self.pod_slot_counters(&w.namespace, &w.pod, w.slot);
            let id = format!("{}/{}", w.namespace, w.pod);
            let would = c[0][VERDICT_WOULD_DROP as usize].packets
                + c[1][VERDICT_WOULD_DROP as usize].packets;
            // A pod not seen before counts what it has (its counters start with its slot),
            // unless an agent before this one noted its last would-drop already.
            let new = match self.persisted.pod_would_drops.insert(id.clone(), would) {
                Some(before) if would >= before => would - before,
                None if self.persisted.last_would_drop.contains_key(&id) => 0,
                _ => would,
            };
            let record = self
                .persisted
                .workloads
                .entry(format!("{}/{}", w.namespace, w.workload))
                .or_insert_with(|| WorkloadRecord {
                    observed_since: now,
                    ..WorkloadRecord::default()
                });
            record.last_seen = now;
            if new > 0 {
                record.last_would_drop = Some(now);
                match record.hourly.back_mut() {
                    Some((hour, n)) if *hour == now / 3600 => *n += new,
                    _ => record.hourly.push_back((now / 3600, new)),
                }
                self.persisted.last_would_drop.insert(id.clone(), now);
            }
            attached.insert(id);
        }
        self.persisted
            .pod_would_drops
            .retain(|id, _| attached.contains(id));
        let oldest = now.saturating_sub(self.limits.retention.as_secs());
        keep_detached_counts(&mut self.persisted.pod_counts, &attached, now, oldest);
        self.persisted
            .workloads
            .retain(|_, r| r.last_seen >= oldest);
        let before = self.observed.len();
        self.observed.retain(|_, f| f.last_seen >= oldest);
        self.observed_changed |= self.observed.len() != before;
        for r in self.persisted.workloads.values_mut() {
            while r
                .hourly
                .front()
                .is_some_and(|(hour, _)| hour * 3600 < oldest)
            {
                r.hourly.pop_front();
            }
        }
        self.persisted
            .last_would_drop
            .retain(|id, t| attached.contains(id) || *t >= oldest);
    }

    /// Puts the `world` addresses the census found in live flows, and those the flow log
    /// saw in events (would-drops), into the records of their peer pairs. An event may come
    /// before the counters name its pair: it waits a while for it.
    fn file_world_addresses(&mut self, slots: &HashMap<u32, (&str, &str)>) {
        let found = std::mem::take(&mut self.occupancy.lock().expect("occupancy").world_peers);
        for peer in found {
            let Some((ns, workload)) = slots.get(&peer.slot) else {
                continue;
            };
            let key = world_pair_key(
                peer.origin == DIR_INGRESS,
                (ns, workload),
                protocol_name(peer.proto),
                peer.port,
                crate::dns::peer_domain(peer.identity),
            );
            if let Some(flow) = self.observed.get_mut(&key) {
                self.observed_changed |= flow.note_world_address(peer.address);
            }
        }
        let mut pending = self.log.world_addresses.lock().expect("world addresses");
        pending.retain(|key, (addresses, at)| match self.observed.get_mut(key) {
            Some(flow) => {
                for a in addresses.drain(..) {
                    self.observed_changed |= flow.note_world_address(a);
                }
                false
            }
            None => at.elapsed() < PENDING_WORLD_WAIT,
        });
    }

    /// Makes room for a new flow series: the one idle longest goes, if it has been idle at
    /// least `series_idle` (a port scan's series give way to live traffic), its value kept
    /// in `retired` so it continues if it comes back.
    fn retire_idle_series(&mut self, now: std::time::Instant) {
        let idle = self
            .series_grew
            .iter()
            .filter(|(l, _)| self.series.contains_key(*l))
            .min_by_key(|(_, t)| **t)
            .filter(|(_, t)| now.duration_since(**t) >= self.series_idle)
            .map(|(l, _)| l.clone());
        let Some(labels) = idle else {
            return;
        };
        self.series_grew.remove(&labels);
        if let Some(value) = self.series.remove(&labels) {
            self.retire(labels, value);
        }
    }

    /// Keeps a series given up with its value, among at most `retired_capacity` retired
    /// ones: when full, the smallest go (their loss costs the least).
    fn retire(&mut self, labels: Vec<String>, value: u64) {
        if self.retired.len() >= self.retired_capacity
            && let Some(smallest) = self
                .retired
                .iter()
                .min_by_key(|(_, v)| **v)
                .map(|(l, _)| l.clone())
        {
            if self.retired[&smallest] > value {
                return;
            }
            self.retired.remove(&smallest);
        }
        self.retired.insert(labels, value);
    }

    /// Adds packets of a flow series (labels in `SERIES_LABELS` order) to the observed-flow
    /// record, dated now; ages out what was last seen beyond the retention, and makes room
    /// by forgetting the pairs seen longest ago.
    fn observe(&mut self, labels: &[String], verdict: u8, packets: u64) {
        let now = unix_now();
        let key: ObservedKey = (
            labels[0].clone(),
            labels[2].clone(),
            labels[3].clone(),
            labels[4].clone(),
            labels[5].clone(),
            labels[6].clone(),
            labels[7].parse().unwrap_or(0),
            labels.get(8).cloned().unwrap_or_default(),
        );
        if !make_room(&mut self.observed, &key, &self.limits, now) {
            self.persisted.record_refused += packets;
            return;
        }
        let flow = self
            .observed
            .entry(key.clone())
            .or_insert_with(|| ObservedFlow {
                direction: key.0.clone(),
                src_namespace: key.1.clone(),
                src_workload: key.2.clone(),
                dst_namespace: key.3.clone(),
                dst_workload: key.4.clone(),
                protocol: key.5.clone(),
                port: key.6,
                first_seen: now,
                last_seen: now,
                packets: [0; 3],
                dst_domain: key.7.clone(),
                world_addresses: Vec::new(),
                last_would_drop: 0,
            });
        flow.last_seen = now;
        self.observed_changed = true;
        let index = match verdict {
            VERDICT_WOULD_DROP => 1,
            VERDICT_DROPPED => 2,
            _ => 0,
        };
        flow.packets[index] += packets;
        if index == 1 {
            flow.last_would_drop = now;
        }
    }

    /// The observed peer pairs last seen within `window` seconds (`tollgate advise`).
    pub fn observed(&mut self, view: &View, window: u64) -> Vec<ObservedFlow> {
        self.poll(view);
        let since = unix_now().saturating_sub(window);
        self.observed
            .values()
            .filter(|f| f.last_seen >= since)
            .cloned()
            .collect()
    }

    /// The record of a pod's workload.
    fn record(&self, namespace: &str, workload: &str) -> Option<&WorkloadRecord> {
        self.persisted
            .workloads
            .get(&format!("{namespace}/{workload}"))
    }

    /// Whether the workloads `target` matches on this node are safe to flip to drop: each
    /// observed for at least `window` seconds, none with a would-drop within it. `Ok` names
    /// the workloads checked.
    pub fn quiet(
        &mut self,
        view: &View,
        log: &FlowLogStats,
        target: &admin::Target,
        window: u64,
    ) -> Result<Vec<String>, NotQuiet> {
        self.poll(view);
        let now = unix_now();
        let matched: Vec<&crate::controller::WorkloadView> = view
            .workloads
            .iter()
            .filter(|w| match target {
                admin::Target::All => true,
                admin::Target::Namespace(ns) => *ns == w.namespace,
                admin::Target::Named(ns, name) => {
                    *ns == w.namespace && (*name == w.pod || *name == w.workload)
                }
            })
            .collect();
        let mut refusal = NotQuiet::default();
        if matched.is_empty() {
            refusal.reasons.push(format!(
                "no workload on this node matches {target}: nothing has been observed"
            ));
            return Err(refusal);
        }
        let mut workloads: Vec<(String, String)> = matched
            .iter()
            .map(|w| (w.namespace.clone(), w.workload.clone()))
            .collect();
        workloads.dedup();
        let pods: std::collections::BTreeSet<(&str, &str)> = matched
            .iter()
            .map(|w| (w.namespace.as_str(), w.pod.as_str()))
            .collect();
        for (ns, workload) in &workloads {
            // No record yet (its counters could not be read): observed for no time at all.
            let Some(r) = self.record(ns, workload) else {
                refusal.reasons.push(format!(
                    "{ns}/{workload}: not observed yet, less than {}",
                    human(window)
                ));
                continue;
            };
            let observed = now.saturating_sub(r.observed_since);
            if observed < window {
                refusal.reasons.push(format!(
                    "{ns}/{workload}: observed for {} only, less than {}",
                    human(observed),
                    human(window)
                ));
            }
            if let Some(last) = r
                .last_would_drop
                .filter(|t| now.saturating_sub(*t) < window)
            {
                // Counts are kept by clock hour: a shorter window gets the count of the
                // hours it overlaps, said as such.
                let counted = r.would_drops_within(now, window).max(1);
                refusal.reasons.push(if window < 3600 {
                    format!(
                        "{ns}/{workload}: would-drop packet(s) within {}, the last {} ago ({counted} counted in the clock hours it overlaps)",
                        human(window),
                        human(now.saturating_sub(last))
                    )
                } else {
                    format!(
                        "{ns}/{workload}: {counted} would-drop packet(s) within {}, the last {} ago",
                        human(window),
                        human(now.saturating_sub(last))
                    )
                });
            }
        }
        if refusal.reasons.is_empty() {
            return Ok(workloads
                .into_iter()
                .map(|(ns, w)| format!("{ns}/{w}"))
                .collect());
        }
        let since = SystemTime::now() - std::time::Duration::from_secs(window);
        let ours = |e: &Option<crate::flowlog::Endpoint>| {
            e.as_ref()
                .is_some_and(|e| pods.contains(&(e.namespace.as_str(), e.pod.as_str())))
        };
        refusal.flows = log
            .recent
            .lock()
            .expect("recent")
            .iter()
            .filter(|r| r.verdict == "would_drop")
            .filter(|r| {
                let mine = if r.direction == "egress" {
                    &r.src
                } else {
                    &r.dst
                };
                ours(mine)
            })
            .filter(|r| humantime::parse_rfc3339(&r.time).is_ok_and(|t| t >= since))
            .cloned()
            .collect();
        // The record's would-drop peer pairs: kept across restarts, where the flow log's
        // recent records are not.
        let after = now.saturating_sub(window);
        refusal.pairs = self
            .observed
            .values()
            .filter(|f| f.last_would_drop > after)
            .filter(|f| {
                let (local, _) = f.local_and_peer();
                workloads
                    .iter()
                    .any(|(ns, w)| (ns.as_str(), w.as_str()) == local)
            })
            .cloned()
            .collect();
        // The latest first, a page of them (a scan's pairs are many).
        refusal
            .pairs
            .sort_by_key(|f| std::cmp::Reverse(f.last_would_drop));
        refusal.more_pairs = refusal.pairs.len().saturating_sub(REFUSAL_PAIRS_SHOWN);
        refusal.pairs.truncate(REFUSAL_PAIRS_SHOWN);
        Err(refusal)
    }

    /// A pod's counters as exported: the kernel's, plus what pins made before them had
    /// counted for the pod.
    fn pod_counters(&mut self, namespace: &str, pod: &str, slot: u32) -> Option<WorkloadCounters> {
        let mut c = self.readers.counters(slot).ok()?;
        let counts = self
            .persisted
            .pod_counts
            .entry(format!("{namespace}/{pod}"))
            .or_default();
        // Below what was last read: the pod was attached anew (a new interface, the same
        // name) and its slot counts from zero; what it had counted is carried.
        let reset = c
            .iter()
            .flatten()
            .zip(counts.last.iter().flatten())
            .any(|(now, last)| now.packets < last[0] || now.bytes < last[1]);
        if reset {
            counts.carry();
        }
        for (d, per_direction) in c.iter_mut().enumerate() {
            for (v, counter) in per_direction.iter_mut().enumerate() {
                counts.last[d][v] = [counter.packets, counter.bytes];
                counter.packets += counts.carried[d][v][0];
                counter.bytes += counts.carried[d][v][1];
            }
        }
        Some(c)
    }

    /// A pod's spoofed-source packets and expired-name connections as exported: the
    /// kernel's, plus what its earlier slots or pins counted.
    fn pod_slot_counters(&mut self, namespace: &str, pod: &str, slot: u32) -> [u64; SLOT_COUNTERS] {
        let read = [
            self.readers.spoofed(slot).ok(),
            self.readers.egress_expired(slot).ok(),
        ];
        let counts = self
            .persisted
            .pod_counts
            .entry(format!("{namespace}/{pod}"))
            .or_default();
        let mut out = [0; SLOT_COUNTERS];
        for (i, now) in read.into_iter().enumerate() {
            if let Some(now) = now {
                // Below what was last read: the slot counts from zero again.
                if now < counts.slot_last[i] {
                    counts.slot_carried[i] += counts.slot_last[i];
                }
                counts.slot_last[i] = now;
            }
            out[i] = counts.slot_last[i] + counts.slot_carried[i];
        }
        out
    }

    /// The datapath diagnostics as exported: the kernel's plus what earlier pins counted.
    fn diagnostics(&mut self) -> [u64; diag::COUNT as usize] {
        let counts = &mut self.persisted.diag_counts;
        counts.resize(diag::COUNT as usize, (0, 0));
        let read = self.readers.diag().ok();
        let mut out = [0u64; diag::COUNT as usize];
        for (i, (last, carried)) in counts.iter_mut().enumerate() {
            if let Some(d) = read {
                *last = d[i];
            }
            out[i] = *last + *carried;
        }
        out
    }

    /// Everything a scrape reports.
    pub fn metrics(&mut self, view: &View, log: &FlowLogStats, policy_errors: u64) -> Snapshot {
        self.poll(view);
        let mut s = Snapshot::default();
        for w in &view.workloads {
            let (ns, name) = (&w.namespace, &w.pod);
            if let Some(c) = self.pod_counters(ns, name, w.slot) {
                for (d, dir) in [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
                    for v in [VERDICT_ALLOWED, VERDICT_WOULD_DROP, VERDICT_DROPPED] {
                        let counter = c[d as usize][v as usize];
                        s.packets.push((
                            vec![
                                ("namespace".into(), ns.clone()),
                                ("pod".into(), name.clone()),
                                ("direction".into(), dir.into()),
                                ("verdict".into(), verdict_name(v).into()),
                            ],
                            counter.packets,
                            counter.bytes,
                        ));
                    }
                }
            }
            s.modes.push((ns.clone(), name.clone(), w.mode.as_str()));
            s.isolated
                .push((ns.clone(), name.clone(), "ingress", w.isolated_ingress));
            s.isolated
                .push((ns.clone(), name.clone(), "egress", w.isolated_egress));
            // The workload's record: a pod of a rollout inherits how long its workload has
            // been watched and quiet.
            let record = self.record(ns, &w.workload);
            let last = record.and_then(|r| r.last_would_drop).or_else(|| {
                self.persisted
                    .last_would_drop
                    .get(&format!("{ns}/{name}"))
                    .copied()
            });
            if let Some(t) = last {
                s.last_would_drop.push((ns.clone(), name.clone(), t));
            }
            if let Some(r) = record {
                s.observed_since.push((
                    ns.clone(),
                    name.clone(),
                    w.workload.clone(),
                    r.observed_since,
                ));
            }
            s.degraded
                .push((ns.clone(), name.clone(), w.degraded.is_some()));
            let [spoofed, expired] = self.pod_slot_counters(ns, name, w.slot);
            s.spoofed.push((ns.clone(), name.clone(), spoofed));
            if w.egress_allowlist.is_some() {
                s.egress_expired
                    .push((ns.clone(), name.clone(), w.workload.clone(), expired));
            }
        }
        s.workloads = view.workloads.len() as u64;
        s.source_degraded = view.source_degraded;
        s.ready = view.ready && view.degraded.is_empty();
        s.node_overrides = view
            .node_overrides
            .iter()
            .map(|(t, m)| (t.clone(), m.as_str()))
            .collect();
        s.flow_packets = self
            .series
            .iter()
            .map(|(l, v)| {
                (
                    SERIES_LABELS
                        .iter()
                        .map(|n| n.to_string())
                        .zip(l.iter().cloned())
                        .collect(),
                    *v,
                )
            })
            .collect();
        s.flow_overflow = self.persisted.flow_overflow;
        s.record_pairs = self.observed.len() as u64;
        s.record_capacity = self.limits.capacity as u64;
        s.record_refused = self.persisted.record_refused;
        let d = self.diagnostics();
        s.flow_log_written = log.written.load(Ordering::Relaxed);
        s.flow_log_rate_limited = d[diag::EVENT_RATE_LIMITED as usize];
        s.flow_log_lost = log.lost.load(Ordering::Relaxed) + d[diag::EVENT_LOST as usize];
        s.policy_errors = policy_errors;
        {
            let counted = self.occupancy.lock().expect("occupancy");
            s.maps = counted.maps.clone();
            for w in &view.workloads {
                s.conntrack_entries.push((
                    w.namespace.clone(),
                    w.pod.clone(),
                    counted
                        .conntrack_per_slot
                        .get(&w.slot)
                        .copied()
                        .unwrap_or(0),
                ));
            }
        }
        s.diagnostics = diag::NAMES.iter().copied().zip(d).collect();
        // After the reads: what was exported is what a restart continues from.
        self.persist(log, policy_errors);
        s
    }

    /// `tollgate status`.
    pub fn status(&mut self, view: &View) -> Status {
        self.poll(view);
        let now = unix_now();
        let workloads = view
            .workloads
            .iter()
            .map(|w| {
                let c = self
                    .pod_counters(&w.namespace, &w.pod, w.slot)
                    .unwrap_or_default();
                let [spoofed, egress_expired] =
                    self.pod_slot_counters(&w.namespace, &w.pod, w.slot);
                let record = self.record(&w.namespace, &w.workload);
                let dir = |d: usize| DirectionCounters {
                    allowed: c[d][0].packets,
                    would_drop: c[d][1].packets,
                    dropped: c[d][2].packets,
                    allowed_bytes: c[d][0].bytes,
                    would_drop_bytes: c[d][1].bytes,
                    dropped_bytes: c[d][2].bytes,
                };
                WorkloadStatus {
                    namespace: w.namespace.clone(),
                    pod: w.pod.clone(),
                    workload: w.workload.clone(),
                    attach: w.attach.into(),
                    attached_at: w.attached_at.clone(),
                    isolated_ingress: w.isolated_ingress,
                    isolated_egress: w.isolated_egress,
                    mode: w.mode,
                    mode_source: w.mode_source.into(),
                    ingress: dir(0),
                    egress: dir(1),
                    seconds_since_would_drop: record
                        .and_then(|r| r.last_would_drop)
                        .or_else(|| {
                            let id = format!("{}/{}", w.namespace, w.pod);
                            self.persisted.last_would_drop.get(&id).copied()
                        })
                        .map(|t| now.saturating_sub(t)),
                    observed_seconds: record.map(|r| now.saturating_sub(r.observed_since)),
                    would_drop_last_hour: record.map_or(0, |r| r.would_drops_within(now, 3600)),
                    would_drop_last_day: record.map_or(0, |r| r.would_drops_within(now, 86_400)),
                    latest_would_drop: None,
                    latest_would_drop_explanation: None,
                    spoofed,
                    egress_allowlists: w
                        .egress_allowlist
                        .as_ref()
                        .map(|a| a.names.clone())
                        .unwrap_or_default(),
                    egress_expired,
                    degraded: w.degraded.clone(),
                }
            })
            .collect();
        Status {
            node: view.node.clone(),
            // What `/readyz` says: synced and nothing degraded.
            ready: view.ready && view.degraded.is_empty(),
            workloads,
            policies: view.policies,
            policy_errors: view.policy_errors.clone(),
            overrides: view.node_overrides.clone(),
            cluster_overrides: view
                .cluster_overrides
                .iter()
                .map(|o| admin::ClusterOverride {
                    name: o.name.clone(),
                    target: o.target.to_string(),
                    mode: o.mode,
                    reason: o.reason.clone(),
                })
                .collect(),
            warnings: view.warnings.clone(),
            refused: view.refused.clone(),
            degraded: view.degraded.clone(),
            host_addresses: view.host_addresses.clone(),
        }
    }

    /// `tollgate flows`: the busiest series and the latest would-drops.
    pub fn flows(&mut self, view: &View, log: &FlowLogStats, limit: usize) -> Flows {
        self.poll(view);
        let mut rows: Vec<FlowRow> = self
            .series
            .iter()
            .map(|(l, v)| FlowRow {
                direction: l[0].clone(),
                verdict: l[1].clone(),
                src: format!("{}/{}", l[2], l[3]),
                dst: match l.get(8).filter(|d| !d.is_empty()) {
                    Some(domain) if l[4] == "world" => format!("world:{domain}"),
                    _ => format!("{}/{}", l[4], l[5]),
                },
                protocol: l[6].clone(),
                port: l[7].clone(),
                packets: *v,
                dst_domain: l.get(8).cloned().unwrap_or_default(),
                explanation: None,
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.packets));
        rows.truncate(limit);
        Flows {
            busiest: rows,
            recent_denied: log
                .recent
                .lock()
                .expect("recent")
                .iter()
                .map(|r| serde_json::to_value(r).expect("serializable"))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(peer: &str, port: u16, first_seen: u64, last_seen: u64, allowed: u64) -> ObservedFlow {
        ObservedFlow {
            direction: "ingress".into(),
            src_namespace: "bank".into(),
            src_workload: peer.into(),
            dst_namespace: "bank".into(),
            dst_workload: "ledger".into(),
            protocol: "tcp".into(),
            port,
            first_seen,
            last_seen,
            packets: [allowed, if allowed == 0 { 1 } else { 0 }, 0],
            dst_domain: String::new(),
            last_would_drop: 0,
            world_addresses: Vec::new(),
        }
    }

    /// A detached pod's counts are carried at once and kept for the retention, at most
    /// `DETACHED_COUNTS_KEPT` of them, the most recently detached.
    /// Pins made anew (`--reset-state`, a reboot): the per-flow counters count from zero,
    /// so the values last read from the old ones are dropped as baselines.
    #[test]
    fn new_pins_drop_the_old_per_flow_baselines() {
        let mut persisted = Persisted {
            counters_map_id: 7,
            flow_last_seen: vec![([1, 2, 3, 4, 5, 6, 7], 10)],
            series_buckets: vec![(3, [1, 2, 3, 4, 5, 6, 7], 10)],
            ..Persisted::default()
        };
        carry_over_new_pins(&mut persisted, Some(7));
        assert_eq!(persisted.flow_last_seen.len(), 1, "the same pins: kept");
        carry_over_new_pins(&mut persisted, Some(8));
        assert!(persisted.flow_last_seen.is_empty());
        assert!(persisted.series_buckets.is_empty());
        assert_eq!(persisted.counters_map_id, 8);
    }

    #[test]
    fn detached_pods_keep_their_counts_a_while() {
        let mut counts = BTreeMap::new();
        let mut c = CarriedCounts::default();
        c.last[1][0] = [5, 500];
        counts.insert("bank/ledger-0".to_string(), c);
        let none = std::collections::BTreeSet::new();
        keep_detached_counts(&mut counts, &none, 100, 0);
        let c = &counts["bank/ledger-0"];
        assert_eq!((c.last[1][0], c.carried[1][0]), ([0, 0], [5, 500]));
        // Seen again: kept, not carried twice.
        let attached = ["bank/ledger-0".to_string()].into();
        keep_detached_counts(&mut counts, &attached, 101, 0);
        keep_detached_counts(&mut counts, &none, 102, 0);
        assert_eq!(counts["bank/ledger-0"].carried[1][0], [5, 500]);
        // Past the retention: gone.
        keep_detached_counts(&mut counts, &none, 200, 150);
        assert!(counts.is_empty());
        // Bounded: the oldest detached go first.
        for i in 0..DETACHED_COUNTS_KEPT as u64 + 10 {
            counts.insert(format!("churn/p-{i}"), CarriedCounts::default());
            keep_detached_counts(&mut counts, &none, 1000 + i, 0);
        }
        assert_eq!(counts.len(), DETACHED_COUNTS_KEPT);
        assert!(!counts.contains_key("churn/p-0"));
        assert!(counts.contains_key(&format!("churn/p-{}", DETACHED_COUNTS_KEPT + 9)));
    }

    /// Counts read from pins made anew (another map id) are carried; from the same pins, or
    /// from pins never recorded, they are not.
    #[test]
    fn counts_of_pins_made_anew_are_carried_once() {
        let mut persisted = Persisted::default();
        let mut counts = CarriedCounts::default();
        counts.last[0][1] = [7, 700];
        persisted.pod_counts.insert("bank/ledger-0".into(), counts);
        persisted.diag_counts = vec![(3, 0)];
        carry_over_new_pins(&mut persisted, Some(11));
        assert_eq!(persisted.pod_counts["bank/ledger-0"].carried[0][1], [0, 0]);
        assert_eq!(persisted.counters_map_id, 11);
        carry_over_new_pins(&mut persisted, Some(11));
        assert_eq!(persisted.pod_counts["bank/ledger-0"].last[0][1], [7, 700]);
        carry_over_new_pins(&mut persisted, Some(12));
        let counts = &persisted.pod_counts["bank/ledger-0"];
        assert_eq!(
            (counts.carried[0][1], counts.last[0][1]),
            ([7, 700], [0, 0])
        );
        assert_eq!(persisted.diag_counts, vec![(0, 3)]);
        carry_over_new_pins(&mut persisted, None);
        assert_eq!(
            persisted.counters_map_id, 12,
            "unreadable id: nothing changes"
        );
    }

    /// Records `f` as `Observer::observe` does: room first, then the pair.
    fn record(
        book: &mut BTreeMap<ObservedKey, ObservedFlow>,
        f: ObservedFlow,
        limits: &RecordLimits,
    ) -> bool {
        let key = observed_key(&f);
        let now = f.last_seen;
        if !make_room(book, &key, limits, now) {
            return false;
        }
        book.entry(key).or_insert(f);
        true
    }

    #[test]
    fn a_port_scan_neither_fills_the_record_nor_pushes_out_the_rarely_used_pairs() {
        let limits = RecordLimits {
            retention: std::time::Duration::from_secs(RECORD_RETENTION_SECS),
            capacity: 1_000,
        };
        let day = 86_400;
        let now = 100 * day;
        let mut book = BTreeMap::new();
        let add = |book: &mut BTreeMap<_, _>, f: ObservedFlow| record(book, f, &limits);
        // The nightly batch: seen a month ago first, last seen three days ago; and a nightly
        // caller the policies do not allow yet (a would-drop only: what a flip must not
        // miss).
        assert!(add(
            &mut book,
            pair("batch", 5432, now - 30 * day, now - 3 * day, 40)
        ));
        assert!(add(
            &mut book,
            pair("report", 8443, now - 20 * day, now - 2 * day, 0)
        ));
        // Busy callers, seen over the last week.
        for i in 0..600 {
            let caller = pair(&format!("caller-{i}"), 8080, now - 7 * day, now - 60, 1_000);
            assert!(add(&mut book, caller));
        }
        // A scanner walks every port of the ledger: its peer keeps 64 ports, the rest is
        // refused (and counted by the caller).
        let taken = (1..=5_000u16)
            .filter(|p| add(&mut book, pair("scanner", *p, now, now, 1)))
            .count();
        assert_eq!(taken, RECORD_PORTS_PER_PEER);
        // Scanners from many pods: 3,000 pairs denied, 1,500 allowed (pods no policy
        // isolates), all seen once, far more than the record has room for.
        for i in 0..1_500 {
            for port in [22, 23] {
                assert!(add(&mut book, pair(&format!("bot-{i}"), port, now, now, 0)));
            }
            assert!(add(&mut book, pair(&format!("open-{i}"), 22, now, now, 1)));
        }
        assert!(book.len() <= 1_000, "{}", book.len());
        let kept = |peer: &str| book.values().any(|f| f.src_workload == peer);
        assert!(kept("batch"), "the rarely used pair stays");
        assert!(kept("report"), "the rarely seen would-drop stays");
        assert_eq!(
            (0..600).filter(|i| kept(&format!("caller-{i}"))).count(),
            600,
            "every caller seen over days stays"
        );
        // Pairs seen twice, a minute apart, allowed: the would-drop seen over days outlasts
        // them all.
        let mut rare = BTreeMap::new();
        assert!(add(
            &mut rare,
            pair("report", 8443, now - 20 * day, now - 2 * day, 0)
        ));
        for i in 0..1_500 {
            assert!(add(
                &mut rare,
                pair(&format!("chatty-{i}"), 80, now - 60, now, 5)
            ));
        }
        assert!(rare.values().any(|f| f.src_workload == "report"));
        // A pair seen again is never refused, whatever its peer holds.
        assert!(add(&mut book, pair("scanner", 1, now, now + 1, 1)));
        // Names outside the cluster are peers of their own: 100 names on 443 all fit.
        let mut named = BTreeMap::new();
        for i in 0..100 {
            let mut f = pair("world", 443, now, now, 1);
            f.dst_domain = format!("api-{i}.example.com");
            assert!(add(&mut named, f), "api-{i}");
        }
        // What was last seen beyond the retention makes room first.
        let short = RecordLimits {
            retention: std::time::Duration::from_secs(day),
            capacity: book.len(),
        };
        let fresh = pair("new", 443, now + 2 * day, now + 2 * day, 1);
        assert!(record(&mut book, fresh, &short));
        assert_eq!(book.len(), 1, "only the new pair is within a day");
    }
}
