//! `tollgate run`: the agent. Loads the cluster state, keeps the datapath reconciled with it,
//! serves metrics and the admin socket, writes the flow log, and leaves enforcement in place
//! when it stops (only `--detach-on-exit` takes the programs off).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_common::{
    Config, DIR_EGRESS, DIR_INGRESS, FlowCounterKey, IDENTITY_HOST, IDENTITY_WORLD,
    VERDICT_ALLOWED, VERDICT_DROPPED, VERDICT_WOULD_DROP, diag,
};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tracing::{error, info, warn};

use crate::{
    Datapath, DatapathOptions,
    admin::{
        self, AuditRecord, FlowRow, Flows, ModeChange, Overrides, Request, Response, Status, Target,
    },
    attach::{AttachPoint, TcMode},
    compile::{
        model::ClusterState,
        policy::PodModeAnnotations,
        services::{Frontend, FrontendPort},
    },
    flowlog::{Endpoint, FlowRecord, Naming, SlotNames, protocol_name},
    maps::Mode,
    metrics::Snapshot,
    reconcile::{Reconciler, ReconcilerOptions},
    sources::FileSource,
};

/// Options of `tollgate run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub cluster_state: PathBuf,
    pub metrics_addr: SocketAddr,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub default_mode: Mode,
    pub flow_log: Option<PathBuf>,
    pub log_rate: u32,
    pub log_burst: u32,
    pub max_flow_series: usize,
    pub detach_on_exit: bool,
    pub reset_state: bool,
    pub node_name: String,
    pub poll_interval: Duration,
    pub tc_mode: TcMode,
    pub conntrack_capacity: u32,
    pub pod_mode_annotations: PodModeAnnotations,
    /// The cgroup v2 mount the kubepods hierarchy lives under.
    pub cgroup_root: PathBuf,
}

/// Counters kept in user space, persisted in the state directory before every scrape (and
/// every few seconds) so they never go backwards across restarts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Persisted {
    flow_log_written: u64,
    flow_log_lost: u64,
    policy_errors: u64,
    flow_overflow: u64,
    /// Packets per flow series (labels in `SERIES_LABELS` order).
    flow_series: Vec<(Vec<String>, u64)>,
    /// Last value read per kernel flow counter: (slot, peer, port, proto, direction, verdict,
    /// origin) -> packets.
    flow_last_seen: Vec<([u32; 7], u64)>,
    /// Unix seconds of the last would-drop, by NAMESPACE/POD.
    last_would_drop: BTreeMap<String, u64>,
}

const SERIES_LABELS: [&str; 8] = [
    "direction",
    "verdict",
    "src_namespace",
    "src_workload",
    "dst_namespace",
    "dst_workload",
    "protocol",
    "port",
];

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

struct Shared {
    rec: Reconciler,
    source: FileSource,
    state: ClusterState,
    errors: Vec<String>,
    /// Notes on the cluster state that are not errors (ignored annotations, SCTP).
    warnings: Vec<String>,
    /// The cluster state itself cannot be read (the last known state stays in force).
    source_degraded: bool,
    ready: bool,
    persisted: Persisted,
    series: BTreeMap<Vec<String>, u64>,
    last_seen: HashMap<[u32; 7], u64>,
    slot_would_drop: HashMap<u32, u64>,
    naming: Naming,
    recent_denied: VecDeque<FlowRecord>,
    sync_seconds: prometheus_client::metrics::histogram::Histogram,
    options: RunOptions,
    last_sync: Instant,
    pending_errors: bool,
}

/// How often the agent reconciles even when the cluster state did not change.
const RESYNC: Duration = Duration::from_secs(10);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Shared {
    fn state_file(&self) -> PathBuf {
        self.options.state_dir.join("state.json")
    }

    fn overrides_file(&self) -> PathBuf {
        self.options.state_dir.join("overrides.json")
    }

    fn persist(&mut self) {
        self.persisted.flow_series = self.series.iter().map(|(k, v)| (k.clone(), *v)).collect();
        self.persisted.flow_last_seen = self.last_seen.iter().map(|(k, v)| (*k, *v)).collect();
        let data = serde_json::to_vec(&self.persisted).expect("serializable");
        if let Err(e) = admin::write_atomic(&self.state_file(), &data) {
            warn!(error = %e, "could not persist counters");
        }
    }

    /// Re-reads the cluster state if it changed and reconciles. Also reconciles every
    /// `RESYNC` without a change, and at every poll while a workload could not be attached:
    /// interfaces, routes and cgroups appear after the pods that use them.
    fn sync(&mut self, force: bool) {
        let due = self.last_sync.elapsed() >= RESYNC || self.pending_errors;
        if !force && !due && !self.source.changed() && !self.rec.node_addresses_changed(&self.state)
        {
            return;
        }
        self.last_sync = Instant::now();
        let started = Instant::now();
        let loaded = self.source.load();
        for e in &loaded.new_errors {
            warn!(error = %e, "rejected object");
        }
        for w in &loaded.warnings {
            warn!(warning = %w, "cluster state");
        }
        self.persisted.policy_errors += loaded.new_errors.len() as u64;
        self.errors = loaded.errors.iter().map(ToString::to_string).collect();
        self.warnings = loaded.warnings;
        self.source_degraded = loaded
            .errors
            .iter()
            .any(|e| e.object.is_none() && e.file == self.source.path());
        self.state = loaded.state;
        // Parsing a large cluster state leaves megabytes of freed YAML trees in the heap;
        // hand them back to the system instead of keeping them resident.
        // SAFETY: glibc call without arguments that matter.
        unsafe { libc::malloc_trim(0) };
        self.apply();
        self.sync_seconds.observe(started.elapsed().as_secs_f64());
    }

    fn apply(&mut self) {
        match self.rec.reconcile(&self.state) {
            Ok(report) => {
                for e in &report.errors {
                    warn!(error = %e, "workload not reconciled; retrying");
                }
                self.pending_errors = !report.errors.is_empty();
                self.ready = true;
            }
            Err(e) => {
                self.pending_errors = true;
                error!(error = %e, "reconcile failed; will retry");
            }
        }
        self.refresh_naming();
    }

    fn refresh_naming(&mut self) {
        let mut naming = Naming {
            node: self.options.node_name.clone(),
            ..Default::default()
        };
        for ((ns, name), w) in self.rec.workloads() {
            naming.slots.insert(
                w.slot,
                SlotNames {
                    endpoint: Some(Endpoint {
                        namespace: ns.clone(),
                        pod: name.clone(),
                        workload: w.pod.workload.clone(),
                    }),
                    ingress_policies: w.ingress_policies.clone(),
                    egress_policies: w.egress_policies.clone(),
                },
            );
        }
        for pod in self.state.pods.values() {
            for ip in &pod.ips {
                naming.addresses.insert(
                    *ip,
                    Endpoint {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        workload: pod.workload.clone(),
                    },
                );
            }
        }
        for frontend in self.rec.compiled().frontends.iter() {
            let backends = self.backends_endpoint(frontend, frontend.ports.iter());
            for ip in &frontend.addresses {
                naming
                    .services
                    .insert(*ip, (frontend.service_id(), backends.clone()));
            }
        }
        naming.host = self.rec.host_addresses().iter().copied().collect();
        self.naming = naming;
    }

    /// The backends of some ports of a Service as one endpoint: the pod when there is
    /// one, else the workload they all belong to (pod empty), else every workload's name
    /// joined with `+`.
    fn backends_endpoint<'a>(
        &self,
        frontend: &Frontend,
        ports: impl Iterator<Item = &'a FrontendPort>,
    ) -> Endpoint {
        let mut pods = std::collections::BTreeSet::new();
        for b in ports.flat_map(|p| &p.backends) {
            if let Some(k) = &b.pod {
                pods.insert(k.clone());
            }
        }
        let workloads: std::collections::BTreeSet<String> = pods
            .iter()
            .filter_map(|k| self.state.pods.get(k))
            .map(|p| p.workload.clone())
            .collect();
        let workload = if workloads.is_empty() {
            frontend.service.1.clone()
        } else {
            workloads.into_iter().collect::<Vec<_>>().join("+")
        };
        Endpoint {
            namespace: frontend.service.0.clone(),
            pod: match pods.len() {
                1 => pods.into_iter().next().map(|k| k.1).unwrap_or_default(),
                _ => String::new(),
            },
            workload,
        }
    }

    /// (namespace, workload) of a peer identity, and the port to name the flow by. A flow to
    /// a Service counts against its backend workload on the backends' target port (when they
    /// agree on one).
    fn peer_names(&self, identity: u32, proto: u8, port: u16) -> (String, String, u16) {
        if identity == IDENTITY_WORLD {
            return ("world".into(), "world".into(), port);
        }
        if identity == IDENTITY_HOST {
            return ("host".into(), "host".into(), port);
        }
        let compiled = self.rec.compiled();
        if let Some(frontend) = compiled.frontend(identity) {
            let fport = frontend.port(proto, port);
            let ep = self.backends_endpoint(frontend, fport.into_iter());
            let targets: std::collections::BTreeSet<u16> = fport
                .iter()
                .flat_map(|p| p.backends.iter().map(|b| b.port))
                .collect();
            let target = match targets.len() {
                1 => targets.into_iter().next().unwrap_or(port),
                _ => port,
            };
            return (ep.namespace, ep.workload, target);
        }
        let (ns, wl) = self.identity_names(identity);
        (ns, wl, port)
    }

    /// (namespace, workload) of a workload identity.
    fn identity_names(&self, identity: u32) -> (String, String) {
        let compiled = self.rec.compiled();
        match compiled.identities.get(&identity) {
            Some(info) => {
                let workload = info
                    .pods
                    .first()
                    .and_then(|k| self.state.pods.get(k))
                    .map(|p| p.workload.clone())
                    .unwrap_or_else(|| "unknown".into());
                (info.namespace.clone(), workload)
            }
            None => ("unknown".into(), "unknown".into()),
        }
    }

    /// Folds the kernel's per-flow counters into the flow series, and notes would-drops.
    fn poll_flows(&mut self) {
        let slots: HashMap<u32, (String, String, String)> = self
            .rec
            .workloads()
            .iter()
            .map(|((ns, name), w)| (w.slot, (ns.clone(), name.clone(), w.pod.workload.clone())))
            .collect();
        let current = self.rec.datapath.maps.flow_counters();
        let mut seen = HashMap::with_capacity(current.len());
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
            if delta == 0 {
                continue;
            }
            let Some((ns, _pod, workload)) = slots.get(&key.slot) else {
                continue;
            };
            let (peer_ns, peer_wl, port) = self.peer_names(key.peer, key.proto, key.port);
            let (src, dst) = if key.origin == DIR_EGRESS {
                ((ns.clone(), workload.clone()), (peer_ns, peer_wl))
            } else {
                ((peer_ns, peer_wl), (ns.clone(), workload.clone()))
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
            ];
            let series_count = self.series.len();
            match self.series.get_mut(&labels) {
                Some(v) => *v += delta,
                None if series_count < self.options.max_flow_series => {
                    self.series.insert(labels, delta);
                }
                None => self.persisted.flow_overflow += delta,
            }
        }
        self.last_seen = seen;
        // Would-drops per workload, for `status` and the last-would-drop gauge.
        let now = unix_now();
        for ((ns, name), w) in self.rec.workloads() {
            if let Ok(c) = self.rec.datapath.maps.counters(w.slot) {
                let would = c[0][VERDICT_WOULD_DROP as usize].packets
                    + c[1][VERDICT_WOULD_DROP as usize].packets;
                let before = self.slot_would_drop.insert(w.slot, would);
                if before.is_some_and(|b| would > b)
                    || (before.is_none()
                        && would > 0
                        && !self
                            .persisted
                            .last_would_drop
                            .contains_key(&format!("{ns}/{name}")))
                {
                    self.persisted
                        .last_would_drop
                        .insert(format!("{ns}/{name}"), now);
                }
            }
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        self.poll_flows();
        self.persist();
        let mut s = Snapshot::default();
        for ((ns, name), w) in self.rec.workloads() {
            if let Ok(c) = self.rec.datapath.maps.counters(w.slot) {
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
            s.modes
                .push((ns.clone(), name.clone(), w.policy.mode.as_str()));
            s.isolated.push((
                ns.clone(),
                name.clone(),
                "ingress",
                w.policy.isolated_ingress,
            ));
            s.isolated
                .push((ns.clone(), name.clone(), "egress", w.policy.isolated_egress));
            if let Some(t) = self.persisted.last_would_drop.get(&format!("{ns}/{name}")) {
                s.last_would_drop.push((ns.clone(), name.clone(), *t));
            }
        }
        s.workloads = self.rec.workloads().len() as u64;
        let degraded = self.rec.degraded();
        for ((ns, name), w) in self.rec.workloads() {
            let key = (ns.clone(), name.clone());
            s.degraded
                .push((ns.clone(), name.clone(), degraded.contains_key(&key)));
            s.spoofed.push((
                ns.clone(),
                name.clone(),
                self.rec.datapath.maps.spoofed(w.slot).unwrap_or(0),
            ));
        }
        s.source_degraded = self.source_degraded;
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
        let d = self
            .rec
            .datapath
            .maps
            .diag()
            .unwrap_or([0; diag::COUNT as usize]);
        s.flow_log_written = self.persisted.flow_log_written;
        s.flow_log_rate_limited = d[diag::EVENT_RATE_LIMITED as usize];
        s.flow_log_lost = self.persisted.flow_log_lost + d[diag::EVENT_LOST as usize];
        s.policy_errors = self.persisted.policy_errors;
        s.maps = self.rec.datapath.maps.occupancy();
        s.diagnostics = diag::NAMES.iter().copied().zip(d).collect();
        s
    }

    fn status(&mut self) -> Status {
        self.poll_flows();
        let now = unix_now();
        let workloads = self
            .rec
            .workloads()
            .iter()
            .map(|((ns, name), w)| {
                let c = self.rec.datapath.maps.counters(w.slot).unwrap_or_default();
                let dir = |d: usize| admin::DirectionCounters {
                    allowed: c[d][0].packets,
                    would_drop: c[d][1].packets,
                    dropped: c[d][2].packets,
                    allowed_bytes: c[d][0].bytes,
                    would_drop_bytes: c[d][1].bytes,
                    dropped_bytes: c[d][2].bytes,
                };
                admin::WorkloadStatus {
                    namespace: ns.clone(),
                    pod: name.clone(),
                    workload: w.pod.workload.clone(),
                    attach: w.method.as_str().into(),
                    attached_at: match &w.point {
                        AttachPoint::Tc { iface } => iface.clone(),
                        AttachPoint::Cgroup { path } => path.display().to_string(),
                    },
                    isolated_ingress: w.policy.isolated_ingress,
                    isolated_egress: w.policy.isolated_egress,
                    mode: w.policy.mode,
                    mode_source: w.mode_source.into(),
                    ingress: dir(0),
                    egress: dir(1),
                    seconds_since_would_drop: self
                        .persisted
                        .last_would_drop
                        .get(&format!("{ns}/{name}"))
                        .map(|t| now.saturating_sub(*t)),
                    spoofed: self.rec.datapath.maps.spoofed(w.slot).unwrap_or(0),
                    degraded: self
                        .rec
                        .degraded()
                        .get(&(ns.clone(), name.clone()))
                        .cloned(),
                }
            })
            .collect();
        Status {
            node: self.options.node_name.clone(),
            ready: self.ready,
            workloads,
            policies: self.state.policies.len(),
            policy_errors: self.errors.clone(),
            overrides: self.rec.overrides.targets.clone(),
            warnings: self.warnings.clone(),
            refused: self
                .rec
                .refused()
                .iter()
                .map(|((ns, pod), why)| format!("{ns}/{pod}: {why}"))
                .collect(),
            degraded: self.degraded_reasons(),
            host_addresses: self
                .rec
                .host_addresses()
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }

    /// Why the agent is degraded, if it is: workloads whose rules are incomplete, identities
    /// out of date, a cluster state that cannot be read. Empty when all is in force.
    fn degraded_reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rec
            .degraded()
            .iter()
            .map(|((ns, pod), why)| format!("{ns}/{pod}: {why}"))
            .collect();
        if let Some(why) = self.rec.identities_degraded() {
            out.push(why.to_string());
        }
        if self.source_degraded {
            out.push(format!(
                "cluster state {} cannot be read; the last known state stays in force",
                self.source.path().display()
            ));
        }
        out
    }

    fn set_mode(
        &mut self,
        target: &str,
        mode: Option<Mode>,
        who: String,
    ) -> Result<ModeChange, String> {
        Target::parse(target)?;
        let before: BTreeMap<String, Mode> = self
            .rec
            .workloads()
            .iter()
            .map(|((ns, n), w)| (format!("{ns}/{n}"), w.policy.mode))
            .collect();
        let old = match mode {
            Some(m) => self.rec.overrides.targets.insert(target.to_string(), m),
            None => self.rec.overrides.targets.remove(target),
        };
        let overrides = self.rec.overrides.clone();
        overrides
            .save(&self.overrides_file())
            .map_err(|e| format!("persist overrides: {e}"))?;
        let state = std::mem::take(&mut self.state);
        let applied = self.rec.apply_modes(&state);
        self.state = state;
        applied.map_err(|e| format!("apply the mode: {e}"))?;
        let target_parsed = Target::parse(target)?;
        let matched = self
            .rec
            .workloads()
            .keys()
            .filter(|k| match &target_parsed {
                Target::All => true,
                Target::Namespace(ns) => *ns == k.0,
                Target::Pod(ns, p) => *ns == k.0 && *p == k.1,
            })
            .count();
        let changed: Vec<(String, Mode, Mode)> = self
            .rec
            .workloads()
            .iter()
            .filter_map(|((ns, n), w)| {
                let id = format!("{ns}/{n}");
                let was = before.get(&id).copied()?;
                (was != w.policy.mode).then_some((id, was, w.policy.mode))
            })
            .collect();
        let record = AuditRecord {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            who,
            target: target.into(),
            old_mode: old,
            new_mode: mode,
            changed: changed.clone(),
        };
        if let Err(e) = admin::audit(&self.options.state_dir.join("audit.log"), &record) {
            warn!(error = %e, "could not write the audit log");
        }
        info!(target, ?old, new = ?mode, changed = changed.len(), "mode override");
        Ok(ModeChange {
            target: target.into(),
            old,
            new: mode,
            changed,
            matched,
        })
    }

    fn flows(&mut self, limit: usize) -> Flows {
        self.poll_flows();
        let mut rows: Vec<FlowRow> = self
            .series
            .iter()
            .map(|(l, v)| FlowRow {
                direction: l[0].clone(),
                verdict: l[1].clone(),
                src: format!("{}/{}", l[2], l[3]),
                dst: format!("{}/{}", l[4], l[5]),
                protocol: l[6].clone(),
                port: l[7].clone(),
                packets: *v,
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.packets));
        rows.truncate(limit);
        Flows {
            busiest: rows,
            recent_denied: self
                .recent_denied
                .iter()
                .map(|r| serde_json::to_value(r).expect("serializable"))
                .collect(),
        }
    }
}

fn verdict_name(v: u8) -> &'static str {
    match v {
        VERDICT_WOULD_DROP => "would_drop",
        VERDICT_DROPPED => "dropped",
        _ => "allowed",
    }
}

/// Removes pins and attachments an earlier agent left (`--reset-state`).
fn reset_state(bpffs: &std::path::Path) -> anyhow::Result<()> {
    use aya::maps::{HashMap as AyaHashMap, Map, MapData};
    let tc_slots = bpffs.join(agent_common::map_names::TC_SLOTS);
    if let Ok(data) = MapData::from_pin(&tc_slots)
        && let Ok(slots) = AyaHashMap::<_, u32, u32>::try_from(Map::HashMap(data))
    {
        for (ifindex, _) in slots.iter().filter_map(Result::ok) {
            if let Some(iface) = crate::attach::ifname(ifindex) {
                for (t, p) in [
                    (
                        aya::programs::TcAttachType::Ingress,
                        agent_common::program_names::TC_FROM_POD,
                    ),
                    (
                        aya::programs::TcAttachType::Egress,
                        agent_common::program_names::TC_TO_POD,
                    ),
                ] {
                    let _ = aya::programs::tc::qdisc_detach_program(&iface, t, p);
                }
            }
        }
    }
    crate::pins::remove_pins(bpffs).with_context(|| format!("remove {}", bpffs.display()))?;
    warn!(bpffs = %bpffs.display(), "reset: removed the earlier agent's programs and pins");
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.state_dir)
        .with_context(|| format!("create state directory {}", options.state_dir.display()))?;
    if options.reset_state {
        reset_state(&options.bpffs)?;
    }
    if !options.cluster_state.exists() {
        anyhow::bail!(
            "--cluster-state {}: no such file or directory",
            options.cluster_state.display()
        );
    }
    let mut dp_options = DatapathOptions::new(&options.bpffs);
    dp_options.tc_mode = options.tc_mode;
    dp_options.conntrack_capacity = options.conntrack_capacity;
    let mut datapath = Datapath::load(dp_options).context("loading the datapath")?;
    let adopted = datapath.attached().len();
    if adopted > 0 {
        info!(workloads = adopted, "adopted the running datapath");
    }
    let mut config = datapath.maps.config()?;
    config.event_interval_ns = if options.log_rate == 0 {
        0
    } else {
        1_000_000_000 / options.log_rate as u64
    };
    config.event_burst = options.log_burst.max(1);
    datapath.maps.set_config(&Config { ..config })?;
    let events = datapath.events()?;

    let mut rec = Reconciler::new(
        datapath,
        ReconcilerOptions {
            default_mode: options.default_mode,
            pod_mode_annotations: options.pod_mode_annotations,
            node_name: Some(options.node_name.clone()),
            cgroup_root: options.cgroup_root.clone(),
            // The file source's annotations are the operator's own (labs, hand-written state).
            trust_attach_annotations: true,
        },
    );
    rec.overrides = Overrides::load(&options.state_dir.join("overrides.json"))?;
    let persisted: Persisted = match std::fs::read(options.state_dir.join("state.json")) {
        Ok(data) => serde_json::from_slice(&data).unwrap_or_else(|e| {
            warn!(error = %e, "state.json unreadable; user-space counters start from zero");
            Persisted::default()
        }),
        Err(_) => Persisted::default(),
    };
    let series = persisted.flow_series.iter().cloned().collect();
    let last_seen = persisted.flow_last_seen.iter().cloned().collect();
    let sync_seconds = prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
    );
    let shared = Arc::new(Mutex::new(Shared {
        rec,
        source: FileSource::new(&options.cluster_state),
        state: ClusterState::default(),
        errors: vec![],
        warnings: vec![],
        source_degraded: false,
        ready: false,
        persisted,
        series,
        last_seen,
        slot_would_drop: HashMap::new(),
        naming: Naming::default(),
        recent_denied: VecDeque::new(),
        sync_seconds: sync_seconds.clone(),
        options: options.clone(),
        last_sync: Instant::now(),
        pending_errors: false,
    }));
    shared.lock().expect("lock").sync(true);
    info!(
        workloads = shared.lock().expect("lock").rec.workloads().len(),
        metrics = %options.metrics_addr,
        admin = %options.admin_socket.display(),
        "tollgate running"
    );

    let mut registry = prometheus_client::registry::Registry::default();
    registry.register(
        "tollgate_policy_sync_seconds",
        "Time to load, compile and apply the cluster state",
        sync_seconds,
    );
    registry.register_collector(Box::new(Collector(shared.clone())));
    let registry = Arc::new(registry);

    let metrics = tokio::spawn(serve_metrics(
        options.metrics_addr,
        registry,
        shared.clone(),
    ));
    let admin_task = tokio::spawn(serve_admin(options.admin_socket.clone(), shared.clone()));
    let events_task = tokio::spawn(flow_log(events, shared.clone(), options.flow_log.clone()));
    let sync_shared = shared.clone();
    let poll = options.poll_interval;
    let sync_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        let mut flows_tick = Instant::now();
        loop {
            tick.tick().await;
            let mut s = sync_shared.lock().expect("lock");
            s.sync(false);
            if flows_tick.elapsed() >= Duration::from_secs(2) {
                s.poll_flows();
                s.persist();
                flows_tick = Instant::now();
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
        r = metrics => error!(result = ?r, "metrics server stopped"),
        r = admin_task => error!(result = ?r, "admin socket stopped"),
    }
    sync_task.abort();
    events_task.abort();
    let mut s = shared.lock().expect("lock");
    s.poll_flows();
    s.persist();
    let _ = std::fs::remove_file(&options.admin_socket);
    if options.detach_on_exit {
        s.rec.detach_all()?;
        s.rec.datapath.detach_and_unpin()?;
        info!("--detach-on-exit: programs detached, pins removed");
    } else {
        info!(
            "stopped; enforcement stays in place (pinned under {})",
            options.bpffs.display()
        );
    }
    Ok(())
}

struct Collector(Arc<Mutex<Shared>>);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collector")
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.lock().map_err(|_| std::fmt::Error)?.snapshot();
        snapshot.encode(encoder)
    }
}

async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<prometheus_client::registry::Registry>,
    shared: Arc<Mutex<Shared>>,
) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::{Response as HttpResponse, body::Bytes, service::service_fn};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr} (--metrics-addr)"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let registry = registry.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                let shared = shared.clone();
                async move {
                    let (status, content_type, body) = match req.uri().path() {
                        "/metrics" => {
                            let mut text = String::new();
                            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                                Ok(()) => (
                                    200,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    text,
                                ),
                                Err(_) => (500, "text/plain", "encoding failed\n".into()),
                            }
                        }
                        "/healthz" => (200, "text/plain", "ok\n".into()),
                        "/readyz" => {
                            let (ready, degraded) = shared
                                .lock()
                                .map(|s| (s.ready, s.degraded_reasons()))
                                .unwrap_or((false, vec!["agent state poisoned".into()]));
                            if !ready {
                                (
                                    503,
                                    "text/plain",
                                    "not ready: policy not synced yet\n".into(),
                                )
                            } else if !degraded.is_empty() {
                                (
                                    503,
                                    "text/plain",
                                    format!("degraded:\n{}\n", degraded.join("\n")),
                                )
                            } else {
                                (200, "text/plain", "ready\n".into())
                            }
                        }
                        _ => (404, "text/plain", "not found\n".into()),
                    };
                    HttpResponse::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn serve_admin(path: PathBuf, shared: Arc<Mutex<Shared>>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("bind the admin socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            use std::os::fd::AsFd as _;
            let creds = admin::peer_credentials(stream.as_fd());
            let (reader, mut writer) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(reader);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let response = match creds {
                Ok((0, pid)) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(&shared, req, pid),
                    Err(e) => Response::Error {
                        message: format!("bad request: {e}"),
                    },
                },
                Ok((uid, _)) => Response::Error {
                    message: format!("permission denied: uid {uid} is not root"),
                },
                Err(e) => Response::Error {
                    message: format!("peer credentials: {e}"),
                },
            };
            let mut out = serde_json::to_string(&response).expect("serializable");
            out.push('\n');
            let _ = writer.write_all(out.as_bytes()).await;
        });
    }
}

fn handle(shared: &Arc<Mutex<Shared>>, req: Request, pid: i32) -> Response {
    let Ok(mut s) = shared.lock() else {
        return Response::Error {
            message: "agent state poisoned".into(),
        };
    };
    match req {
        Request::Status => Response::Status(s.status()),
        Request::Flows { limit } => Response::Flows(s.flows(limit)),
        Request::Mode { target, mode, who } => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let who = format!(
                "{}uid=0 pid={pid} ({})",
                who.map(|w| format!("{w} ")).unwrap_or_default(),
                comm.trim()
            );
            match s.set_mode(&target, mode, who) {
                Ok(change) => Response::Mode(change),
                Err(message) => Response::Error { message },
            }
        }
    }
}

async fn flow_log(
    reader: crate::flowlog::EventReader,
    shared: Arc<Mutex<Shared>>,
    path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut out: Box<dyn std::io::Write + Send> = match &path {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("open the flow log {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    // SAFETY: the AsyncFd owns the reader, so its descriptor stays open while registered.
    let mut async_fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("register the event ring buffer: {e}"))?;
    loop {
        let mut guard = async_fd.readable_mut().await?;
        let events = guard.get_inner_mut().drain();
        guard.clear_ready();
        if events.is_empty() {
            continue;
        }
        let mut s = shared.lock().expect("lock");
        for e in &events {
            let record = s.naming.record(e);
            let mut line = serde_json::to_string(&record).expect("serializable");
            line.push('\n');
            match out.write_all(line.as_bytes()) {
                Ok(()) => s.persisted.flow_log_written += 1,
                Err(_) => s.persisted.flow_log_lost += 1,
            }
            s.recent_denied.push_back(record);
            if s.recent_denied.len() > 50 {
                s.recent_denied.pop_front();
            }
        }
        let _ = out.flush();
    }
}
