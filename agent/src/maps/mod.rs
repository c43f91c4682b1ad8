//! Typed handles on the datapath's maps, and diff-and-apply of compiled entries.
//!
//! Updates are make-before-break: new entries are written before stale ones are removed, and
//! a workload's configuration (which points at its rulesets and carries its epoch) is written
//! after its rules, so no packet ever sees a half-applied change as a deny.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::net::IpAddr;

use agent_common::{
    COUNTERS_PER_SLOT, Config, Counter, CtEntry, CtKey, DIRECTIONS, EventBucket, FlowCounterKey,
    LAYOUT_VERSION, LpmAddr, MAX_WORKLOADS, MODE_DROP, MODE_LOG, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PolicyKey, PolicyValue, SlotRoute, VERDICTS,
    WorkloadConfig, counter_index, diag, map_names, policy_kind, slot_cache_bucket, workload_flags,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
};
use ipnet::IpNet;

mod tries;

use tries::RulesetTries;
pub use tries::pin_map_of_tries;

use crate::compile::{
    AllowRule, CidrSetIds, RuleError, RulesetEntries, compile_ruleset,
    rules::{LpmKeyOrd, lpm_addr},
};

/// Errors of map access.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from the object")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("slot {slot} is out of range (1..{MAX_WORKLOADS})")]
    BadSlot { slot: u32 },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rules of slot {slot}: {source}")]
    Rules {
        slot: u32,
        #[source]
        source: RuleError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

pub use crate::compile::model::Mode;

/// The kernel's code for a mode.
fn mode_code(mode: Mode) -> u32 {
    match mode {
        Mode::Log => MODE_LOG as u32,
        Mode::Drop => MODE_DROP as u32,
    }
}

pub use crate::compile::model::WorkloadAddresses;

impl From<&crate::compile::policy::PodPolicy> for WorkloadPolicy {
    /// The datapath's view of what policy says about a pod.
    fn from(p: &crate::compile::policy::PodPolicy) -> Self {
        WorkloadPolicy {
            mode: p.mode,
            isolated_ingress: p.isolated_ingress,
            isolated_egress: p.isolated_egress,
            ingress: p.ingress.clone(),
            egress: p.egress.clone(),
            services: p.services.clone(),
            addresses: p.addresses.clone(),
            egress_allowlist: None,
        }
    }
}

/// Everything the datapath needs to know to enforce one workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadPolicy {
    pub mode: Mode,
    /// Isolated for ingress: only `ingress` rules allow traffic in.
    pub isolated_ingress: bool,
    /// Isolated for egress: only `egress` and `services` rules allow traffic out.
    pub isolated_egress: bool,
    pub ingress: Vec<AllowRule>,
    pub egress: Vec<AllowRule>,
    /// Egress rules toward Service frontends: part of the egress ruleset, kept apart because
    /// a change of backends alone must not re-decide established connections.
    pub services: Vec<AllowRule>,
    /// Where the workload's packets may come from.
    pub addresses: WorkloadAddresses,
    /// The EgressAllowlists that select it, merged: it is isolated for egress to addresses
    /// outside the cluster, which its DNS answers then allow.
    pub egress_allowlist: Option<std::sync::Arc<crate::dns::Allowlist>>,
}

impl WorkloadPolicy {
    /// A workload no policy selects: everything is allowed and counted.
    pub fn open(mode: Mode) -> Self {
        WorkloadPolicy {
            mode,
            ..Default::default()
        }
    }

    /// The same policy for a workload that sends from `addresses`.
    pub fn sending_from(mut self, addresses: &[IpAddr]) -> Self {
        self.addresses = WorkloadAddresses::Pod(addresses.to_vec());
        self
    }

    /// Whether anything but the Service rules differs from `other`: what decides whether
    /// established connections to Services are decided again.
    pub fn differs_beyond_services(&self, other: &WorkloadPolicy) -> bool {
        self.mode != other.mode
            || self.isolated_ingress != other.isolated_ingress
            || self.isolated_egress != other.isolated_egress
            || self.ingress != other.ingress
            || self.egress != other.egress
            || self.addresses != other.addresses
            || self.egress_allowlist != other.egress_allowlist
    }
}

/// How many map entries updates wrote and removed: what "incremental" means, measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub written: u64,
    pub removed: u64,
}

/// Rules of a workload written but not yet in force (see `DatapathMaps::stage_rules`).
#[derive(Debug)]
pub struct StagedRules {
    rulesets: Vec<(u32, RulesetEntries)>,
}

/// What one staging wrote over: each key with the value it had (`None`: it was new).
#[derive(Default)]
struct Undo {
    policy: Vec<(LpmKeyOrd<PolicyKey>, Option<u32>)>,
    cidr: Vec<(LpmKeyOrd<LpmAddr>, Option<u32>)>,
}

/// Packets and bytes of a workload, by direction then verdict.
pub type WorkloadCounters = [[Counter; VERDICTS]; DIRECTIONS];

/// Ruleset of a slot's direction: two per slot, never shared, so a workload's update never
/// touches another's entries.
pub const fn ruleset_of(slot: u32, direction: u8) -> u32 {
    slot * 2 + direction as u32
}

/// The NodePorts of every Service and the frontend port each leads to (`NODE_PORTS`).
pub type NodePorts =
    std::collections::BTreeMap<agent_common::NodePortKey, agent_common::NodePortTarget>;

/// Typed handles on every map of the datapath. Reads go through [`MapReaders`] (which it
/// derefs to), so an observer can hold its own read handles, opened from the pins.
pub struct DatapathMaps {
    r: MapReaders,
    event_buckets: Array<MapData, EventBucket>,
    config: Array<MapData, Config>,
    /// The programs' clock (`Config::ns_per_jiffy`, `clock_offset_ns`), kept across
    /// `set_config`.
    clock: (u32, u64),
    dns_resolvers: HashMap<MapData, agent_common::ResolverKey, u8>,
    /// What `set_resolvers` last made `DNS_RESOLVERS`: an unchanged set costs nothing.
    resolvers_written: Option<std::collections::BTreeSet<IpAddr>>,
    services_outside: HashMap<MapData, u32, u8>,
    /// What `set_services_outside` last made `SERVICES_OUTSIDE`.
    services_outside_written: Option<std::collections::BTreeSet<u32>>,
    node_ports: HashMap<MapData, agent_common::NodePortKey, agent_common::NodePortTarget>,
    /// What `set_node_ports` last made `NODE_PORTS`.
    node_ports_written: Option<NodePorts>,
    /// What this process wrote per ruleset, to diff the next update against.
    written: StdHashMap<u32, RulesetEntries>,
    /// Which lookups the newest staged entries of each ruleset need
    /// (`workload_flags::lookups`), for `write_config`.
    lookups: StdHashMap<u32, u32>,
    set_ids: CidrSetIds,
    /// Map entries written and removed since load (policy, ipBlock and identity entries).
    pub stats: WriteStats,
    next_epoch: u32,
}

impl std::ops::Deref for DatapathMaps {
    type Target = MapReaders;
    fn deref(&self) -> &MapReaders {
        &self.r
    }
}

impl std::ops::DerefMut for DatapathMaps {
    fn deref_mut(&mut self) -> &mut MapReaders {
        &mut self.r
    }
}

/// What one walk of the connection tracking tables found (`conntrack_census`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackCensus {
    /// Live entries per slot, both tables.
    pub per_slot: StdHashMap<u32, u64>,
    /// Live entries in the main table.
    pub main: u64,
    /// Live entries in the overflow table.
    pub overflow: u64,
    /// Expired entries and entries of freed slots deleted.
    pub deleted: u64,
    /// Peers outside the cluster that live flows talk to (at most `WORLD_PEERS_PER_CENSUS`):
    /// flow counters name them `world` without an address.
    pub world_peers: std::collections::HashSet<WorldPeer>,
}

/// How many `world` peers one census reports at most.
pub const WORLD_PEERS_PER_CENSUS: usize = 4096;

/// A peer outside the cluster a tracked flow talks to, with the flow counters' key parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorldPeer {
    pub slot: u32,
    /// Direction of the packet that opened the flow.
    pub origin: u8,
    pub proto: u8,
    /// The port of the side that accepted the flow (0 without ports), as the counters have it.
    pub port: u16,
    /// The identity the flow was decided with (`IDENTITY_WORLD` or a DNS-named one).
    pub identity: u32,
    pub address: std::net::IpAddr,
}

/// Read handles on the maps that counters, metrics and `status` read: the controller's own
/// (through [`DatapathMaps`]), or an observer's, opened from the pins so that reading never
/// waits on a reconcile.
pub struct MapReaders {
    workloads: Array<MapData, WorkloadConfig>,
    tc_slots: HashMap<MapData, u32, u32>,
    cgroup_slots: HashMap<MapData, u64, u32>,
    tc_slot_cache: Array<MapData, SlotRoute>,
    cgroup_slot_cache: Array<MapData, SlotRoute>,
    identities: LpmTrie<MapData, LpmAddr, u32>,
    identities_exact: HashMap<MapData, LpmAddr, u32>,
    policy: RulesetTries<PolicyKey, PolicyValue>,
    policy_exact: HashMap<MapData, PolicyKey, PolicyValue>,
    cidr_rules: RulesetTries<LpmAddr, u32>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ct_overflow: HashMap<MapData, CtKey, CtEntry>,
    ct_shares: Array<MapData, u64>,
    ct_overflowed: Array<MapData, u32>,
    counters: PerCpuArray<MapData, Counter>,
    flow_counters: PerCpuHashMap<MapData, FlowCounterKey, Counter>,
    flow_series_keys: Array<MapData, FlowCounterKey>,
    flow_series: PerCpuArray<MapData, Counter>,
    diag: PerCpuArray<MapData, u64>,
    spoofed: PerCpuArray<MapData, u64>,
    egress_expired: PerCpuArray<MapData, u64>,
    conntrack_capacity: u64,
    ct_overflow_capacity: u64,
}

/// A per-CPU counter summed over CPUs.
fn cpu_sum(values: &aya::maps::PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |sum, v| Counter {
        packets: sum.packets + v.packets,
        bytes: sum.bytes + v.bytes,
    })
}

/// The `LOCAL_POD_SCOPE` keys of a workload's addresses: those of an active pod that sends
/// from its own addresses, none for a host-network workload or an empty slot.
fn local_pod_keys(config: &WorkloadConfig) -> Vec<LpmAddr> {
    if config.flags & workload_flags::ACTIVE == 0 || config.flags & workload_flags::HOST_SOURCE != 0
    {
        return Vec::new();
    }
    let key = |family: u8, addr: [u8; 16]| LpmAddr {
        scope: agent_common::LOCAL_POD_SCOPE,
        family: family as u32,
        addr,
    };
    let mut out = Vec::new();
    if config.flags & workload_flags::HAS_IPV4 != 0 {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&config.ipv4);
        out.push(key(agent_common::FAMILY_IPV4, addr));
    }
    if config.flags & workload_flags::HAS_IPV6 != 0 {
        out.push(key(agent_common::FAMILY_IPV6, config.ipv6));
    }
    out
}

/// The `POLICY_EXACT` key of a compiled policy entry whose prefix is whole (a port, a
/// protocol, or neither), with the bits beyond the prefix cleared; `None` for a port range,
/// which stays in the ruleset's trie.
fn exact_policy_key(LpmKeyOrd(prefix, key): LpmKeyOrd<PolicyKey>) -> Option<PolicyKey> {
    match prefix {
        POLICY_PREFIX_FULL => Some(PolicyKey {
            kind: policy_kind::PORT,
            ..key
        }),
        POLICY_PREFIX_ANY_PORT => Some(PolicyKey {
            port: [0, 0],
            kind: policy_kind::ANY_PORT,
            ..key
        }),
        POLICY_PREFIX_ANY_PROTO => Some(PolicyKey {
            proto: 0,
            port: [0, 0],
            kind: policy_kind::ANY_PROTO,
            ..key
        }),
        _ => None,
    }
}

/// The compiled entry a `POLICY_EXACT` key stands for (the inverse of `exact_policy_key`).
fn compiled_policy_key(key: PolicyKey) -> LpmKeyOrd<PolicyKey> {
    let prefix = match key.kind {
        policy_kind::ANY_PORT => POLICY_PREFIX_ANY_PORT,
        policy_kind::ANY_PROTO => POLICY_PREFIX_ANY_PROTO,
        _ => POLICY_PREFIX_FULL,
    };
    LpmKeyOrd(prefix, PolicyKey { kind: 0, ..key })
}

impl MapReaders {
    /// Writes a policy entry where the programs look for it: a single port, every port of a
    /// protocol, or every protocol in the hash (`exact_policy_key`), a port range in the
    /// ruleset's trie.
    fn write_policy(&mut self, key: LpmKeyOrd<PolicyKey>, rule: u32) -> Result<(), MapsError> {
        let value = PolicyValue { rule };
        match exact_policy_key(key) {
            Some(exact) => self
                .policy_exact
                .insert(exact, value, 0)
                .map_err(map_err(map_names::POLICY_EXACT)),
            None => self.policy.insert(key.1.ruleset, key.0, key.1, value),
        }
    }

    /// Removes a policy entry written by `write_policy`; a missing one is not an error.
    fn remove_policy(&mut self, key: LpmKeyOrd<PolicyKey>) -> Result<(), MapsError> {
        match exact_policy_key(key) {
            Some(exact) => ignore_missing(self.policy_exact.remove(&exact))
                .map_err(map_err(map_names::POLICY_EXACT)),
            None => self.policy.remove(key.1.ruleset, key.0, key.1),
        }
    }

    /// The kernel's id of the pinned `COUNTERS` map: another id than before means the pins
    /// were made anew (`--reset-state`, a reboot) and the kernel counts from zero.
    pub fn counters_map_id(&self) -> Option<u32> {
        aya::maps::IterableMap::map(&self.counters)
            .info()
            .ok()
            .map(|i| i.id())
    }

    /// Counters of a slot, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<WorkloadCounters, MapsError> {
        let mut out = [[Counter::default(); VERDICTS]; DIRECTIONS];
        for (direction, per_dir) in out.iter_mut().enumerate() {
            for (verdict, c) in per_dir.iter_mut().enumerate() {
                let index = counter_index(slot, direction as u8, verdict as u8);
                *c = cpu_sum(
                    &self
                        .counters
                        .get(&index, 0)
                        .map_err(map_err(map_names::COUNTERS))?,
                );
            }
        }
        Ok(out)
    }
    /// Entries of the main connection tracking table a slot holds by the datapath's count
    /// (`--conntrack-share`): set by every census, raised by each flow the slot records
    /// there since.
    pub fn conntrack_share_count(&self, slot: u32) -> Result<u64, MapsError> {
        self.ct_shares
            .get(&slot, 0)
            .map_err(map_err(map_names::CT_SHARES))
    }
    /// Packets a slot sent from addresses that are not its own, summed over CPUs.
    pub fn spoofed(&self, slot: u32) -> Result<u64, MapsError> {
        let values = self
            .spoofed
            .get(&slot, 0)
            .map_err(map_err(map_names::SPOOFED))?;
        Ok(values.iter().sum())
    }
    /// New connections of a slot to a learned address whose name had expired.
    pub fn egress_expired(&self, slot: u32) -> Result<u64, MapsError> {
        let values = self
            .egress_expired
            .get(&slot, 0)
            .map_err(map_err(map_names::EGRESS_EXPIRED))?;
        Ok(values.iter().sum())
    }

    /// Datapath diagnostics, summed over CPUs, in `diag::NAMES` order.
    pub fn diag(&self) -> Result<[u64; diag::COUNT as usize], MapsError> {
        let mut out = [0u64; diag::COUNT as usize];
        for (i, total) in out.iter_mut().enumerate() {
            let values = self
                .diag
                .get(&(i as u32), 0)
                .map_err(map_err(map_names::DIAG))?;
            *total = values.iter().sum();
        }
        Ok(out)
    }
    /// Per peer-pair counters, summed over CPUs. The walk is bounded as the census's is: a
    /// key the LRU evicts under it starts the walk over.
    pub fn flow_counters(&self) -> Vec<(FlowCounterKey, Counter)> {
        self.flow_counters
            .iter()
            .take(2 * agent_common::FLOW_COUNTER_CAPACITY as usize)
            .filter_map(Result::ok)
            .map(|(k, values)| (k, cpu_sum(&values)))
            .collect()
    }
    /// Packets and bytes counted in a direct-mapped flow series bucket, summed over CPUs.
    pub fn flow_series(&self, bucket: u32) -> Result<Counter, MapsError> {
        self.flow_series
            .get(&bucket, 0)
            .map(|values| cpu_sum(&values))
            .map_err(map_err(map_names::FLOW_SERIES))
    }

    /// The peer pairs that hold a direct-mapped bucket: (bucket, key).
    pub fn flow_series_keys(&self) -> Vec<(u32, FlowCounterKey)> {
        self.flow_series_keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| k.ok().map(|k| (i as u32, k)))
            .filter(|(_, k)| *k != FlowCounterKey::default())
            .collect()
    }

    /// Gives a peer pair a direct-mapped bucket (its first or second choice, whichever is
    /// free in the map and not `busy`), so the programs count it with array lookups: the
    /// bucket's counts are zeroed first, then the key written. `None` when both are taken;
    /// the pair stays in the LRU hash.
    pub fn assign_flow_series(
        &mut self,
        key: &FlowCounterKey,
        busy: impl Fn(u32) -> bool,
    ) -> Result<Option<u32>, MapsError> {
        let first = agent_common::flow_series_bucket(key);
        for bucket in [first, first ^ 1] {
            if busy(bucket) {
                continue;
            }
            let current = self
                .flow_series_keys
                .get(&bucket, 0)
                .map_err(map_err(map_names::FLOW_SERIES_KEYS))?;
            if current != FlowCounterKey::default() {
                continue;
            }
            let zero = zero_per_cpu::<Counter>().map_err(|source| MapsError::Io {
                what: "per-CPU counter values",
                source,
            })?;
            self.flow_series
                .set(bucket, zero, 0)
                .map_err(map_err(map_names::FLOW_SERIES))?;
            self.flow_series_keys
                .set(bucket, key, 0)
                .map_err(map_err(map_names::FLOW_SERIES_KEYS))?;
            return Ok(Some(bucket));
        }
        Ok(None)
    }

    /// Takes a bucket's key away: the programs count that pair in the hash again. Its
    /// counts stay readable until the bucket is given to another pair.
    pub fn retire_flow_series(&mut self, bucket: u32) -> Result<(), MapsError> {
        self.flow_series_keys
            .set(bucket, FlowCounterKey::default(), 0)
            .map_err(map_err(map_names::FLOW_SERIES_KEYS))
    }

    /// Walks both connection tracking tables once: deletes entries that are expired or
    /// belong to a workload generation that is gone, counts the live ones per slot, and sets
    /// each slot's share count (`CT_SHARES`) to its live entries in the main table (the
    /// programs count inserts, not evictions or expiry; this corrects them). `now_ns` is
    /// CLOCK_MONOTONIC, the clock of the entries' expiry.
    pub fn conntrack_census(&mut self, now_ns: u64) -> ConntrackCensus {
        let generations: Vec<Option<u32>> = self
            .workloads
            .iter()
            .map(|w| {
                w.ok()
                    .filter(|w| w.flags & workload_flags::ACTIVE != 0)
                    .map(|w| w.generation)
            })
            .collect();
        // Of the workload that holds the entry's slot now.
        let own = |k: &CtKey, e: &CtEntry| {
            generations.get(k.slot as usize).copied().flatten() == Some(e.generation)
        };
        let live = |k: &CtKey, e: &CtEntry| e.expires_ns > now_ns && own(k, e);
        let mut census = ConntrackCensus::default();
        let mut main = vec![0u64; MAX_WORKLOADS as usize];
        // The programs count on during the walk: what they add meanwhile is added to what
        // the walk counts (some of it twice, as the walk may see those flows too: the safe
        // side, as a count short of the entries would let a workload past its share).
        let shares = &self.ct_shares;
        let counted = |slot: usize| shares.get(&(slot as u32), 0).unwrap_or(0);
        let counted_before: Vec<u64> = generations
            .iter()
            .enumerate()
            .map(|(slot, g)| g.map_or(0, |_| counted(slot)))
            .collect();
        let limits = [self.conntrack_capacity, self.ct_overflow_capacity];
        for ((table, overflow), limit) in
            [(&mut self.conntrack, false), (&mut self.ct_overflow, true)]
                .into_iter()
                .zip(limits)
        {
            let mut dead = Vec::new();
            // A walk whose last key the datapath evicted meanwhile starts over from the
            // first (the kernel's next-key of a missing key): under a flood of new flows it
            // could go round for ever. Bounded, it ends; its counts are then approximate
            // until the next census.
            let walk_limit = (limit as usize).saturating_mul(2).max(1024);
            for (key, entry) in table.iter().take(walk_limit).filter_map(Result::ok) {
                if !live(&key, &entry) {
                    dead.push((key, own(&key, &entry)));
                    continue;
                }
                *census.per_slot.entry(key.slot).or_default() += 1;
                if agent_common::is_world(entry.peer)
                    && census.world_peers.len() < WORLD_PEERS_PER_CENSUS
                {
                    census.world_peers.insert(WorldPeer {
                        slot: key.slot,
                        origin: entry.origin,
                        proto: key.proto,
                        port: key.counted_port(entry.origin),
                        identity: entry.peer,
                        address: addr_from_bytes(key.family, &key.remote),
                    });
                }
                if overflow {
                    census.overflow += 1;
                } else {
                    census.main += 1;
                    if let Some(n) = main.get_mut(key.slot as usize) {
                        *n += 1;
                    }
                }
            }
            for (key, own) in dead {
                // Read again right before deleting: a packet may have tracked the flow anew
                // since the walk saw it, and a live entry must stay (its replies would be
                // decided as new flows).
                let Ok(entry) = table.get(&key, 0) else {
                    continue;
                };
                if !live(&key, &entry) {
                    if table.remove(&key).is_ok() {
                        census.deleted += 1;
                    }
                } else if own && !overflow {
                    // Opened again over the workload's own entry, which the programs do not
                    // count again (`conntrack::insert`): counted here.
                    if let Some(n) = main.get_mut(key.slot as usize) {
                        *n += 1;
                    }
                }
            }
        }
        let added: Vec<u64> = generations
            .iter()
            .enumerate()
            .map(|(slot, g)| g.map_or(0, |_| counted(slot).saturating_sub(counted_before[slot])))
            .collect();
        for (slot, generation) in generations.iter().enumerate() {
            if generation.is_some() {
                let _ = self.ct_shares.set(slot as u32, main[slot] + added[slot], 0);
            }
        }
        census
    }

    /// Entries in use and capacity of each map, for `tollgate_map_entries` and
    /// `tollgate_map_capacity`. Hash and trie sizes are counted by walking their keys; the
    /// connection tracking tables are left at 0 for the census to fill in.
    pub fn occupancy(&self) -> Vec<(&'static str, u64, u64)> {
        let count = |n: usize| n as u64;
        vec![
            (
                map_names::WORKLOADS,
                count(
                    self.workloads
                        .iter()
                        .filter_map(Result::ok)
                        .filter(|w| w.flags & workload_flags::ACTIVE != 0)
                        .count(),
                ),
                self.workloads.len() as u64,
            ),
            (
                map_names::TC_SLOTS,
                count(self.tc_slots.keys().count()),
                MAX_WORKLOADS as u64,
            ),
            (
                map_names::CGROUP_SLOTS,
                count(self.cgroup_slots.keys().count()),
                MAX_WORKLOADS as u64,
            ),
            (
                map_names::IDENTITIES,
                count(self.identities.keys().count()),
                agent_common::IDENTITY_CAPACITY as u64,
            ),
            (
                map_names::IDENTITIES_EXACT,
                count(self.identities_exact.keys().count()),
                agent_common::IDENTITY_CAPACITY as u64,
            ),
            // The tries of every ruleset together, against what all of them can hold (one
            // ruleset's trie holds `POLICY_CAPACITY`; a ruleset beyond it is refused as any
            // write that does not fit, and leaves its workload degraded).
            (
                map_names::POLICY,
                count(self.policy.count().unwrap_or(0)),
                agent_common::POLICY_CAPACITY as u64 * agent_common::RULESET_CAPACITY as u64,
            ),
            (
                map_names::POLICY_EXACT,
                count(self.policy_exact.keys().count()),
                agent_common::POLICY_CAPACITY as u64,
            ),
            (
                map_names::CIDR_RULES,
                count(self.cidr_rules.count().unwrap_or(0)),
                agent_common::CIDR_RULE_CAPACITY as u64 * agent_common::RULESET_CAPACITY as u64,
            ),
            // Counted by the census walk (`conntrack_census`), which runs beside this.
            (map_names::CONNTRACK, 0, self.conntrack_capacity),
            (map_names::CT_OVERFLOW, 0, self.ct_overflow_capacity),
            (
                map_names::FLOW_SERIES_KEYS,
                count(self.flow_series_keys().len()),
                agent_common::FLOW_SERIES_CAPACITY as u64,
            ),
            (
                map_names::FLOW_COUNTERS,
                count(
                    self.flow_counters
                        .keys()
                        .take(2 * agent_common::FLOW_COUNTER_CAPACITY as usize)
                        .count(),
                ),
                agent_common::FLOW_COUNTER_CAPACITY as u64,
            ),
        ]
    }

    /// Opens the pinned maps of a datapath (`--bpffs`) for reading.
    pub fn open(pin_dir: &std::path::Path) -> Result<MapReaders, MapsError> {
        MapReaders::from_maps(pin_dir, |name| {
            let data =
                MapData::from_pin(crate::pins::map_pin(pin_dir, name)).map_err(map_err(name))?;
            aya::maps::Map::from_map_data(data).map_err(map_err(name))
        })
    }

    /// The reader handles, each map from `get` by name: pinned maps opened, or maps taken out
    /// of a loaded object.
    fn from_maps(
        pin_dir: &std::path::Path,
        mut get: impl FnMut(&'static str) -> Result<aya::maps::Map, MapsError>,
    ) -> Result<MapReaders, MapsError> {
        fn typed<T>(map: aya::maps::Map, name: &'static str) -> Result<T, MapsError>
        where
            T: TryFrom<aya::maps::Map, Error = MapError>,
        {
            T::try_from(map).map_err(map_err(name))
        }
        macro_rules! map {
            ($name:expr) => {
                typed(get($name)?, $name)?
            };
        }
        // The capacities the maps were created with (the agent sizes connection tracking at
        // load time).
        let capacity = |map: &aya::maps::Map| match map {
            aya::maps::Map::LruHashMap(d) => d.info().ok().map(|i| i.max_entries() as u64),
            _ => None,
        };
        let conntrack = get(map_names::CONNTRACK)?;
        let conntrack_capacity =
            capacity(&conntrack).unwrap_or(agent_common::CONNTRACK_CAPACITY as u64);
        let ct_overflow = get(map_names::CT_OVERFLOW)?;
        let ct_overflow_capacity = capacity(&ct_overflow).unwrap_or(
            (agent_common::CONNTRACK_CAPACITY / agent_common::CONNTRACK_OVERFLOW_DIVISOR) as u64,
        );
        Ok(MapReaders {
            workloads: map!(map_names::WORKLOADS),
            tc_slots: map!(map_names::TC_SLOTS),
            cgroup_slots: map!(map_names::CGROUP_SLOTS),
            tc_slot_cache: map!(map_names::TC_SLOT_CACHE),
            cgroup_slot_cache: map!(map_names::CGROUP_SLOT_CACHE),
            identities: map!(map_names::IDENTITIES),
            identities_exact: map!(map_names::IDENTITIES_EXACT),
            policy: RulesetTries::new(
                map_names::POLICY,
                get(map_names::POLICY)?,
                agent_common::POLICY_CAPACITY,
                pin_dir,
            )?,
            policy_exact: map!(map_names::POLICY_EXACT),
            cidr_rules: RulesetTries::new(
                map_names::CIDR_RULES,
                get(map_names::CIDR_RULES)?,
                agent_common::CIDR_RULE_CAPACITY,
                pin_dir,
            )?,
            conntrack: typed(conntrack, map_names::CONNTRACK)?,
            ct_overflow: typed(ct_overflow, map_names::CT_OVERFLOW)?,
            ct_shares: map!(map_names::CT_SHARES),
            ct_overflowed: map!(map_names::CT_OVERFLOWED),
            counters: map!(map_names::COUNTERS),
            flow_counters: map!(map_names::FLOW_COUNTERS),
            flow_series_keys: map!(map_names::FLOW_SERIES_KEYS),
            flow_series: map!(map_names::FLOW_SERIES),
            diag: map!(map_names::DIAG),
            spoofed: map!(map_names::SPOOFED),
            egress_expired: map!(map_names::EGRESS_EXPIRED),
            conntrack_capacity,
            ct_overflow_capacity,
        })
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing { name })?;
    T::try_from(map).map_err(map_err(name))
}

impl DatapathMaps {
    /// Takes the maps out of a loaded object. The epoch counter continues after the highest
    /// epoch found, so flows tracked before a restart are re-evaluated, never trusted blindly.
    pub fn new(ebpf: &mut Ebpf, pin_dir: &std::path::Path) -> Result<Self, MapsError> {
        let r = MapReaders::from_maps(pin_dir, |name| {
            ebpf.take_map(name).ok_or(MapsError::Missing { name })
        })?;
        // Generations come from the same counter: a slot cleared before the restart keeps its
        // generation in the map, so the counter continues above it too.
        let max_epoch = r
            .workloads
            .iter()
            .filter_map(Result::ok)
            .map(|w| w.epoch.max(w.generation))
            .max()
            .unwrap_or(0);
        let mut maps = DatapathMaps {
            r,
            event_buckets: take(ebpf, map_names::EVENT_BUCKETS)?,
            config: take(ebpf, map_names::CONFIG)?,
            clock: (0, 0),
            dns_resolvers: take(ebpf, map_names::DNS_RESOLVERS)?,
            resolvers_written: None,
            services_outside: take(ebpf, map_names::SERVICES_OUTSIDE)?,
            services_outside_written: None,
            node_ports: take(ebpf, map_names::NODE_PORTS)?,
            node_ports_written: None,
            written: StdHashMap::new(),
            lookups: StdHashMap::new(),
            set_ids: CidrSetIds::default(),
            stats: WriteStats::default(),
            next_epoch: max_epoch.wrapping_add(1).max(1),
        };
        if maps.config()? == zeroed_config() {
            maps.set_config(&Config::default())?;
        }
        // Stamp the layout these maps were created with (see `Datapath::load`).
        let mut layout: Array<MapData, u64> = take(ebpf, map_names::LAYOUT)?;
        layout
            .set(0, LAYOUT_VERSION, 0)
            .map_err(map_err(map_names::LAYOUT))?;
        maps.rebuild_written()?;
        Ok(maps)
    }

    /// What an earlier agent wrote, read back from the tries, so the first update after a
    /// restart removes what is no longer wanted instead of leaking it.
    fn rebuild_written(&mut self) -> Result<(), MapsError> {
        for (ruleset, prefix, data, value) in self.r.policy.entries()? {
            self.written
                .entry(ruleset)
                .or_default()
                .policy
                .insert(LpmKeyOrd(prefix, data), value.rule);
        }
        for item in self.r.policy_exact.iter() {
            let (key, value) = item.map_err(map_err(map_names::POLICY_EXACT))?;
            self.written
                .entry(key.ruleset)
                .or_default()
                .policy
                .insert(compiled_policy_key(key), value.rule);
        }
        for (ruleset, prefix, data, set) in self.r.cidr_rules.entries()? {
            self.written
                .entry(ruleset)
                .or_default()
                .cidr
                .insert(LpmKeyOrd(prefix, data), set);
        }
        Ok(())
    }

    /// Makes `resolvers` the addresses workloads resolve through (`DNS_RESOLVERS`): what
    /// is missing is added, what is no longer wanted removed.
    pub fn set_resolvers(
        &mut self,
        resolvers: &std::collections::BTreeSet<IpAddr>,
    ) -> Result<(), MapsError> {
        if self.resolvers_written.as_ref() == Some(resolvers) {
            return Ok(());
        }
        let key = |ip: &IpAddr| agent_common::ResolverKey {
            family: crate::compile::rules::family_of(*ip),
            _pad0: 0,
            _pad1: 0,
            addr: addr_bytes(*ip),
        };
        let wanted: Vec<agent_common::ResolverKey> = resolvers.iter().map(key).collect();
        let present: Vec<agent_common::ResolverKey> =
            self.dns_resolvers.keys().filter_map(Result::ok).collect();
        for k in present.iter().filter(|k| !wanted.contains(k)) {
            self.dns_resolvers
                .remove(k)
                .map_err(map_err(map_names::DNS_RESOLVERS))?;
        }
        for k in wanted.iter().filter(|k| !present.contains(k)) {
            self.dns_resolvers
                .insert(k, 1, 0)
                .map_err(map_err(map_names::DNS_RESOLVERS))?;
        }
        self.resolvers_written = Some(resolvers.clone());
        Ok(())
    }

    /// Makes `services` the Service identities with a backend outside the cluster
    /// (`SERVICES_OUTSIDE`), added before anything is removed: what is missing is added,
    /// what is no longer wanted removed.
    pub fn set_services_outside(
        &mut self,
        services: &std::collections::BTreeSet<u32>,
    ) -> Result<(), MapsError> {
        if self.services_outside_written.as_ref() == Some(services) {
            return Ok(());
        }
        let present: std::collections::BTreeSet<u32> = self
            .services_outside
            .keys()
            .filter_map(Result::ok)
            .collect();
        for id in services.difference(&present) {
            self.services_outside
                .insert(id, 1, 0)
                .map_err(map_err(map_names::SERVICES_OUTSIDE))?;
        }
        for id in present.difference(services) {
            self.services_outside
                .remove(id)
                .map_err(map_err(map_names::SERVICES_OUTSIDE))?;
        }
        self.services_outside_written = Some(services.clone());
        Ok(())
    }

    /// Makes `ports` the NodePorts of the datapath (`NODE_PORTS`): what is no longer wanted
    /// is removed first (a full map must not keep stale ports for good), then every one
    /// wanted is written (a NodePort moved to another Service is overwritten in place,
    /// never missing for a moment).
    pub fn set_node_ports(&mut self, ports: &NodePorts) -> Result<(), MapsError> {
        if self.node_ports_written.as_ref() == Some(ports) {
            return Ok(());
        }
        let gone: Vec<agent_common::NodePortKey> = self
            .node_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !ports.contains_key(k))
            .collect();
        for key in gone {
            self.node_ports
                .remove(&key)
                .map_err(map_err(map_names::NODE_PORTS))?;
        }
        for (key, target) in ports {
            if self.node_ports.get(key, 0).ok().as_ref() != Some(target) {
                self.node_ports
                    .insert(key, target, 0)
                    .map_err(map_err(map_names::NODE_PORTS))?;
            }
        }
        self.node_ports_written = Some(ports.clone());
        Ok(())
    }

    /// The NodePorts in the datapath.
    pub fn node_ports(&self) -> NodePorts {
        self.node_ports.iter().filter_map(Result::ok).collect()
    }

    /// Node-wide datapath settings.
    pub fn config(&self) -> Result<Config, MapsError> {
        self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Replaces the node-wide datapath settings; the programs' clock stays as
    /// `set_clock` made it.
    pub fn set_config(&mut self, config: &Config) -> Result<(), MapsError> {
        let config = Config {
            ns_per_jiffy: self.clock.0,
            clock_offset_ns: self.clock.1,
            ..*config
        };
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    /// Sets the programs' clock: `jiffies * ns_per_jiffy + offset_ns` (0: the coarse clock).
    pub fn set_clock(&mut self, ns_per_jiffy: u32, offset_ns: u64) -> Result<(), MapsError> {
        self.clock = (ns_per_jiffy, offset_ns);
        let config = self.config()?;
        self.set_config(&config)
    }

    fn check_slot(slot: u32) -> Result<(), MapsError> {
        if slot == 0 || slot >= MAX_WORKLOADS {
            return Err(MapsError::BadSlot { slot });
        }
        Ok(())
    }

    /// Writes a workload's rules, isolation and mode, make-before-break: new entries, then
    /// the configuration, then removal of stale entries, then a new epoch so tracked flows
    /// are re-evaluated against exactly the new rules.
    pub fn set_workload(&mut self, slot: u32, policy: &WorkloadPolicy) -> Result<(), MapsError> {
        let staged = self.stage_rules(slot, policy)?;
        self.write_config(slot, policy)?;
        self.finish_rules(staged)?;
        self.bump_epoch(slot)
    }

    /// Phase 1 (make): compiles the workload's rules and writes every entry it did not have.
    /// Nothing is removed and nothing points at the new entries yet.
    pub fn stage_rules(
        &mut self,
        slot: u32,
        policy: &WorkloadPolicy,
    ) -> Result<StagedRules, MapsError> {
        Self::check_slot(slot)?;
        let mut rulesets = Vec::with_capacity(2);
        let egress: Vec<AllowRule>;
        let egress_rules = if policy.services.is_empty() {
            &policy.egress
        } else {
            egress = policy
                .egress
                .iter()
                .chain(&policy.services)
                .cloned()
                .collect();
            &egress
        };
        for (direction, rules) in [
            (agent_common::DIR_INGRESS, &policy.ingress),
            (agent_common::DIR_EGRESS, egress_rules),
        ] {
            let ruleset = ruleset_of(slot, direction);
            let entries = compile_ruleset(ruleset, rules, &mut self.set_ids)
                .map_err(|source| MapsError::Rules { slot, source })?;
            rulesets.push((ruleset, entries));
        }
        let mut undo = Undo::default();
        for (ruleset, entries) in &rulesets {
            if let Err(e) = self.write_new_entries(*ruleset, entries, &mut undo) {
                // Never a partial rule set: what this call wrote goes, what it replaced
                // comes back, and the workload keeps exactly the rules it had.
                self.undo(undo);
                return Err(e);
            }
        }
        // `rulesets` is in the order compiled above: ingress, then egress.
        for ((ruleset, entries), direction) in rulesets
            .iter()
            .zip([agent_common::DIR_INGRESS, agent_common::DIR_EGRESS])
        {
            let mut bits = 0;
            for LpmKeyOrd(prefix, _) in entries.policy.keys() {
                bits |= match *prefix {
                    POLICY_PREFIX_FULL => 0,
                    POLICY_PREFIX_ANY_PORT => workload_flags::any_port_rules(direction),
                    POLICY_PREFIX_ANY_PROTO => workload_flags::any_proto_rules(direction),
                    _ => workload_flags::prefix_rules(direction),
                };
            }
            if !entries.cidr.is_empty() {
                bits |= workload_flags::cidr_rules(direction);
            }
            self.lookups.insert(*ruleset, bits);
        }
        Ok(StagedRules { rulesets })
    }

    /// Reverts the entries one `stage_rules` call wrote.
    fn undo(&mut self, undo: Undo) {
        for (key, old) in undo.policy.into_iter().rev() {
            let _ = match old {
                Some(rule) => self.r.write_policy(key, rule),
                None => self.r.remove_policy(key),
            };
        }
        for (key, old) in undo.cidr.into_iter().rev() {
            let _ = match old {
                Some(set) => self.r.cidr_rules.insert(key.1.scope, key.0, key.1, set),
                None => self.r.cidr_rules.remove(key.1.scope, key.0, key.1),
            };
        }
    }

    /// Phase 2: the workload's isolation, mode and rulesets. The epoch stays (a slot that
    /// never had one gets its first), so tracked flows keep their decisions until
    /// `bump_epoch`.
    pub fn write_config(&mut self, slot: u32, policy: &WorkloadPolicy) -> Result<(), MapsError> {
        Self::check_slot(slot)?;
        let current = self.workload(slot)?;
        let mut flags = workload_flags::ACTIVE;
        if policy.isolated_ingress {
            flags |= workload_flags::ISOLATED_INGRESS;
        }
        if policy.isolated_egress {
            flags |= workload_flags::ISOLATED_EGRESS;
        }
        if policy.egress_allowlist.is_some() {
            flags |= workload_flags::EGRESS_ALLOWLIST;
        }
        // The lookups the staged rules need; every one until rules were staged.
        for direction in [agent_common::DIR_INGRESS, agent_common::DIR_EGRESS] {
            flags |= self
                .lookups
                .get(&ruleset_of(slot, direction))
                .copied()
                .unwrap_or(workload_flags::lookups(direction));
        }
        // A slot that becomes active gets a new generation: flows tracked for whatever held
        // it before never match this workload.
        let (epoch, rules_epoch, generation) =
            if current.flags & workload_flags::ACTIVE != 0 && current.epoch != 0 {
                (current.epoch, current.rules_epoch, current.generation)
            } else {
                let e = self.take_epoch();
                (e, e, e)
            };
        let mut config = WorkloadConfig {
            flags,
            mode: mode_code(policy.mode),
            ruleset: [
                ruleset_of(slot, agent_common::DIR_INGRESS),
                ruleset_of(slot, agent_common::DIR_EGRESS),
            ],
            epoch,
            rules_epoch,
            generation,
            ..WorkloadConfig::default()
        };
        match &policy.addresses {
            WorkloadAddresses::Host => config.flags |= workload_flags::HOST_SOURCE,
            WorkloadAddresses::Pod(ips) => {
                for ip in ips {
                    match ip {
                        IpAddr::V4(v4) if config.flags & workload_flags::HAS_IPV4 == 0 => {
                            config.flags |= workload_flags::HAS_IPV4;
                            config.ipv4 = v4.octets();
                        }
                        IpAddr::V6(v6) if config.flags & workload_flags::HAS_IPV6 == 0 => {
                            config.flags |= workload_flags::HAS_IPV6;
                            config.ipv6 = v6.octets();
                        }
                        _ => {}
                    }
                }
            }
        }
        if config != current {
            self.set_local_pod(slot, &current, &config)?;
            self.r
                .workloads
                .set(slot, config, 0)
                .map_err(map_err(map_names::WORKLOADS))?;
        }
        Ok(())
    }

    /// Names the addresses of the pod in `slot` as a pod of this node (`LOCAL_POD_SCOPE`),
    /// as `config` has them where `current` had others.
    fn set_local_pod(
        &mut self,
        slot: u32,
        current: &WorkloadConfig,
        config: &WorkloadConfig,
    ) -> Result<(), MapsError> {
        let (old, new) = (local_pod_keys(current), local_pod_keys(config));
        for key in new.iter().filter(|k| !old.contains(k)) {
            self.r
                .identities_exact
                .insert(key, slot, 0)
                .map_err(map_err(map_names::IDENTITIES_EXACT))?;
        }
        for key in old.iter().filter(|k| !new.contains(k)) {
            ignore_missing(self.r.identities_exact.remove(key))
                .map_err(map_err(map_names::IDENTITIES_EXACT))?;
        }
        Ok(())
    }

    /// Phase 3 (break): removes what the staged rules no longer contain.
    pub fn finish_rules(&mut self, staged: StagedRules) -> Result<(), MapsError> {
        for (ruleset, entries) in staged.rulesets {
            self.remove_stale_entries(ruleset, &entries)?;
            self.written.insert(ruleset, entries);
        }
        Ok(())
    }

    /// Phase 4: a new epoch for the workload: each tracked flow is decided again, against
    /// the current rules and identities, on its next packet.
    pub fn bump_epoch(&mut self, slot: u32) -> Result<(), MapsError> {
        self.bump(slot, true)
    }

    /// A new epoch for flows whose peers may have changed identity; flows to Services (whose
    /// peer is the Service) keep their decisions, so a change of backends alone never cuts
    /// an established connection.
    pub fn bump_peer_epoch(&mut self, slot: u32) -> Result<(), MapsError> {
        self.bump(slot, false)
    }

    fn bump(&mut self, slot: u32, rules: bool) -> Result<(), MapsError> {
        Self::check_slot(slot)?;
        let mut config = self.workload(slot)?;
        config.epoch = self.take_epoch();
        if rules {
            config.rules_epoch = config.epoch;
        }
        self.r
            .workloads
            .set(slot, config, 0)
            .map_err(map_err(map_names::WORKLOADS))
    }

    /// Whether the staged rules differ from those in force.
    pub fn rules_changed(&self, staged: &StagedRules) -> bool {
        staged
            .rulesets
            .iter()
            .any(|(ruleset, entries)| self.written.get(ruleset) != Some(entries))
    }

    /// Changes only the mode of a workload: one map write, no re-evaluation needed since
    /// the mode is applied per packet.
    pub fn set_mode(&mut self, slot: u32, mode: Mode) -> Result<(), MapsError> {
        Self::check_slot(slot)?;
        let mut config = self
            .r
            .workloads
            .get(&slot, 0)
            .map_err(map_err(map_names::WORKLOADS))?;
        config.mode = mode_code(mode);
        self.r
            .workloads
            .set(slot, config, 0)
            .map_err(map_err(map_names::WORKLOADS))
    }

    /// The configuration of a slot as the datapath sees it.
    pub fn workload(&self, slot: u32) -> Result<WorkloadConfig, MapsError> {
        self.r
            .workloads
            .get(&slot, 0)
            .map_err(map_err(map_names::WORKLOADS))
    }

    /// Removes a workload: its slot is inactive (packets count as unregistered), its rules,
    /// counters and event bucket are gone. Its tracked flows are left to the census
    /// (`conntrack_census`): they belong to a generation no workload has any more, so they
    /// never match, and deleting a workload does not walk the connection table.
    pub fn clear_workload(&mut self, slot: u32) -> Result<(), MapsError> {
        Self::check_slot(slot)?;
        let current = self.workload(slot)?;
        self.set_local_pod(slot, &current, &WorkloadConfig::default())?;
        let generation = current.generation;
        self.r
            .workloads
            .set(
                slot,
                WorkloadConfig {
                    generation,
                    ..WorkloadConfig::default()
                },
                0,
            )
            .map_err(map_err(map_names::WORKLOADS))?;
        self.r
            .ct_shares
            .set(slot, 0, 0)
            .map_err(map_err(map_names::CT_SHARES))?;
        self.r
            .ct_overflowed
            .set(slot, 0, 0)
            .map_err(map_err(map_names::CT_OVERFLOWED))?;
        for direction in [agent_common::DIR_INGRESS, agent_common::DIR_EGRESS] {
            let ruleset = ruleset_of(slot, direction);
            self.remove_stale_entries(ruleset, &RulesetEntries::default())?;
            self.written.remove(&ruleset);
            self.lookups.remove(&ruleset);
            self.set_ids.forget(ruleset);
        }
        for i in 0..COUNTERS_PER_SLOT {
            let zero = zero_per_cpu::<Counter>().map_err(|source| MapsError::Io {
                what: "per-CPU counter values",
                source,
            })?;
            self.r
                .counters
                .set(slot * COUNTERS_PER_SLOT + i, zero, 0)
                .map_err(map_err(map_names::COUNTERS))?;
        }
        self.event_buckets
            .set(slot, EventBucket::default(), 0)
            .map_err(map_err(map_names::EVENT_BUCKETS))?;
        let zero = || {
            zero_per_cpu::<u64>().map_err(|source| MapsError::Io {
                what: "per-CPU counter values",
                source,
            })
        };
        self.r
            .spoofed
            .set(slot, zero()?, 0)
            .map_err(map_err(map_names::SPOOFED))?;
        // A slot's next workload counts from zero (`flows` carries what this one counted).
        self.r
            .egress_expired
            .set(slot, zero()?, 0)
            .map_err(map_err(map_names::EGRESS_EXPIRED))?;
        Ok(())
    }

    fn take_epoch(&mut self) -> u32 {
        let epoch = self.next_epoch;
        self.next_epoch = self.next_epoch.wrapping_add(1).max(1);
        epoch
    }

    fn write_new_entries(
        &mut self,
        ruleset: u32,
        entries: &RulesetEntries,
        undo: &mut Undo,
    ) -> Result<(), MapsError> {
        let old = self.written.get(&ruleset);
        for (key, rule) in &entries.policy {
            let before = old.and_then(|o| o.policy.get(key)).copied();
            if before != Some(*rule) {
                self.r.write_policy(*key, *rule)?;
                undo.policy.push((*key, before));
                self.stats.written += 1;
            }
        }
        for (key, set) in &entries.cidr {
            let before = old.and_then(|o| o.cidr.get(key)).copied();
            if before != Some(*set) {
                self.r.cidr_rules.insert(key.1.scope, key.0, key.1, *set)?;
                undo.cidr.push((*key, before));
                self.stats.written += 1;
            }
        }
        Ok(())
    }

    fn remove_stale_entries(
        &mut self,
        ruleset: u32,
        new: &RulesetEntries,
    ) -> Result<(), MapsError> {
        let Some(old) = self.written.get(&ruleset) else {
            return Ok(());
        };
        let stale_cidr: Vec<_> = old
            .cidr
            .keys()
            .filter(|k| !new.cidr.contains_key(k))
            .copied()
            .collect();
        let stale_policy: Vec<_> = old
            .policy
            .keys()
            .filter(|k| !new.policy.contains_key(k))
            .copied()
            .collect();
        // Addresses first, so none points at a peer whose entries are being removed.
        self.stats.removed += (stale_cidr.len() + stale_policy.len()) as u64;
        for key in stale_cidr {
            self.r.cidr_rules.remove(key.1.scope, key.0, key.1)?;
        }
        for key in stale_policy {
            self.r.remove_policy(key)?;
        }
        Ok(())
    }

    /// Names an address or prefix as an identity (pod IPs as /32 and /128): a single
    /// address in the hash the programs look up first, a shorter prefix in the trie.
    pub fn set_identity(&mut self, net: IpNet, identity: u32) -> Result<(), MapsError> {
        let key = lpm_addr(0, &net);
        self.stats.written += 1;
        if net.prefix_len() == net.max_prefix_len() {
            self.r
                .identities_exact
                .insert(key.1, identity, 0)
                .map_err(map_err(map_names::IDENTITIES_EXACT))
        } else {
            self.r
                .identities
                .insert(&Key::new(key.0, key.1), identity, 0)
                .map_err(map_err(map_names::IDENTITIES))
        }
    }

    /// Forgets an identity entry; the address becomes `world` (or its next shorter prefix).
    pub fn remove_identity(&mut self, net: IpNet) -> Result<(), MapsError> {
        self.stats.removed += 1;
        let key = lpm_addr(0, &net);
        if net.prefix_len() == net.max_prefix_len() {
            ignore_missing(self.r.identities_exact.remove(&key.1))
                .map_err(map_err(map_names::IDENTITIES_EXACT))
        } else {
            remove_lpm(&mut self.r.identities, key, map_names::IDENTITIES)
        }
    }

    /// Identity entries as the datapath holds them (single addresses and prefixes alike).
    pub fn identities(&self) -> Result<BTreeMap<LpmKeyOrd<LpmAddr>, u32>, MapsError> {
        let mut out = BTreeMap::new();
        for item in self.r.identities.iter() {
            let (key, id) = item.map_err(map_err(map_names::IDENTITIES))?;
            out.insert(LpmKeyOrd(key.prefix_len(), key.data()), id);
        }
        for item in self.r.identities_exact.iter() {
            let (addr, id) = item.map_err(map_err(map_names::IDENTITIES_EXACT))?;
            // Local pods' entries are the workloads' (`set_local_pod`), not identities.
            if addr.scope != 0 {
                continue;
            }
            let bits = if addr.family == agent_common::FAMILY_IPV4 as u32 {
                32
            } else {
                128
            };
            out.insert(
                LpmKeyOrd(agent_common::LPM_ADDR_FIXED_BITS + bits, addr),
                id,
            );
        }
        Ok(out)
    }

    /// The identities of single addresses as pinned (by an earlier agent): empty when they
    /// cannot be read.
    pub fn pinned_identities(&self) -> BTreeMap<IpAddr, u32> {
        let entries = match self.identities() {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "pinned identities unreadable; numbering anew");
                return BTreeMap::new();
            }
        };
        entries
            .into_iter()
            .filter_map(|(LpmKeyOrd(prefix, addr), id)| {
                let ip = match (
                    addr.family,
                    prefix.checked_sub(agent_common::LPM_ADDR_FIXED_BITS)?,
                ) {
                    (f, 32) if f == agent_common::FAMILY_IPV4 as u32 => {
                        let b: [u8; 4] = addr.addr[..4].try_into().ok()?;
                        IpAddr::from(b)
                    }
                    (f, 128) if f == agent_common::FAMILY_IPV6 as u32 => IpAddr::from(addr.addr),
                    _ => return None,
                };
                Some((ip, id))
            })
            .collect()
    }

    /// Routes packets of a host-side interface to a slot.
    pub fn set_tc_slot(&mut self, ifindex: u32, slot: u32) -> Result<(), MapsError> {
        self.r
            .tc_slots
            .insert(ifindex, slot, 0)
            .map_err(map_err(map_names::TC_SLOTS))?;
        cache_route(&mut self.r.tc_slot_cache, ifindex as u64, Some(slot))
            .map_err(map_err(map_names::TC_SLOT_CACHE))
    }

    pub fn remove_tc_slot(&mut self, ifindex: u32) -> Result<(), MapsError> {
        // The cache first: a packet that misses it finds the hash entry until that goes.
        cache_route(&mut self.r.tc_slot_cache, ifindex as u64, None)
            .map_err(map_err(map_names::TC_SLOT_CACHE))?;
        ignore_missing(self.r.tc_slots.remove(&ifindex)).map_err(map_err(map_names::TC_SLOTS))
    }

    /// Routes packets of sockets in a cgroup (and its children) to a slot.
    pub fn set_cgroup_slot(&mut self, cgroup_id: u64, slot: u32) -> Result<(), MapsError> {
        self.r
            .cgroup_slots
            .insert(cgroup_id, slot, 0)
            .map_err(map_err(map_names::CGROUP_SLOTS))?;
        cache_route(&mut self.r.cgroup_slot_cache, cgroup_id, Some(slot))
            .map_err(map_err(map_names::CGROUP_SLOT_CACHE))
    }

    pub fn remove_cgroup_slot(&mut self, cgroup_id: u64) -> Result<(), MapsError> {
        cache_route(&mut self.r.cgroup_slot_cache, cgroup_id, None)
            .map_err(map_err(map_names::CGROUP_SLOT_CACHE))?;
        ignore_missing(self.r.cgroup_slots.remove(&cgroup_id))
            .map_err(map_err(map_names::CGROUP_SLOTS))
    }

    /// TC routing entries: (ifindex, slot).
    pub fn tc_routes(&self) -> Vec<(u32, u32)> {
        self.r.tc_slots.iter().filter_map(Result::ok).collect()
    }

    /// cgroup routing entries: (cgroup id, slot).
    pub fn cgroup_routes(&self) -> Vec<(u64, u32)> {
        self.r.cgroup_slots.iter().filter_map(Result::ok).collect()
    }

    /// Number of entries in the TC and cgroup routing maps (for leak checks).
    pub fn routing_entries(&self) -> (usize, usize) {
        (
            self.r.tc_slots.keys().count(),
            self.r.cgroup_slots.keys().count(),
        )
    }

    /// Event bucket of a slot (how many events it suppressed).
    pub fn event_bucket(&self, slot: u32) -> Result<EventBucket, MapsError> {
        self.event_buckets
            .get(&slot, 0)
            .map_err(map_err(map_names::EVENT_BUCKETS))
    }

    /// Tracked flows (all slots).
    pub fn conntrack(&self) -> Vec<(CtKey, CtEntry)> {
        self.r.conntrack.iter().filter_map(Result::ok).collect()
    }

    /// Forgets every tracked flow: each one is decided again from its next packet. Each
    /// workload's count of its flows in the main table starts over with them.
    pub fn flush_conntrack(&mut self) {
        for table in [&mut self.r.conntrack, &mut self.r.ct_overflow] {
            let keys: Vec<CtKey> = table.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = table.remove(&key);
            }
        }
        for slot in 0..MAX_WORKLOADS {
            let _ = self.r.ct_shares.set(slot, 0, 0);
            let _ = self.r.ct_overflowed.set(slot, 0, 0);
        }
    }

    /// Number of policy entries (single-port hash and prefix trie together) and ipBlock
    /// entries.
    pub fn policy_entries(&self) -> (usize, usize) {
        (
            self.r.policy.count().unwrap_or(0) + self.r.policy_exact.keys().count(),
            self.r.cidr_rules.count().unwrap_or(0),
        )
    }

    /// Writes raw policy entries (benchmarks fill the maps to a given size with this).
    pub fn insert_raw_policy(&mut self, prefix: u32, key: PolicyKey) -> Result<(), MapsError> {
        self.r.write_policy(LpmKeyOrd(prefix, key), 0)
    }

    /// Writes a raw connection tracking entry (benchmarks fill the table with this).
    pub fn insert_raw_conntrack(&mut self, key: CtKey, entry: CtEntry) -> Result<(), MapsError> {
        self.r
            .conntrack
            .insert(key, entry, 0)
            .map_err(map_err(map_names::CONNTRACK))
    }
}

pub use crate::compile::rules::{addr_bytes, addr_from_bytes};

/// Points a routing cache bucket at `slot` for `id` when the bucket is free or already
/// `id`'s, or (`None`) frees it if it is `id`'s. A colliding id stays in the hash alone.
fn cache_route(
    cache: &mut Array<MapData, SlotRoute>,
    id: u64,
    slot: Option<u32>,
) -> Result<(), MapError> {
    let bucket = slot_cache_bucket(id);
    let current = cache.get(&bucket, 0)?;
    let value = match slot {
        Some(slot) if current.id == 0 || current.id == id => SlotRoute { id, slot, _pad: 0 },
        None if current.id == id => SlotRoute::default(),
        _ => return Ok(()),
    };
    cache.set(bucket, value, 0)
}

fn zeroed_config() -> Config {
    Config {
        ct_tcp_established_s: 0,
        ct_tcp_opening_s: 0,
        ct_tcp_closing_s: 0,
        ct_other_s: 0,
        event_interval_ns: 0,
        event_burst: 0,
        fragment_timeout_s: 0,
        ct_share: 0,
        ns_per_jiffy: 0,
        clock_offset_ns: 0,
    }
}

fn remove_lpm<K: aya::Pod, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, V>,
    key: LpmKeyOrd<K>,
    name: &'static str,
) -> Result<(), MapsError> {
    ignore_missing(trie.remove(&Key::new(key.0, key.1))).map_err(map_err(name))
}

fn zero_per_cpu<T: aya::Pod + Default>() -> Result<aya::maps::PerCpuValues<T>, std::io::Error> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    aya::maps::PerCpuValues::try_from(vec![T::default(); cpus])
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
