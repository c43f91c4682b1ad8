//! The controller: one thread owns the reconciler and the source and takes commands (mode
//! changes, shutdown). After every change it publishes a [`View`], which metrics, status,
//! flows and the flow log read: no reader ever waits on a reconcile, and no reconcile waits
//! on a scrape.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant, SystemTime},
};

use agent_common::IDENTITY_HOST;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AuditRecord, ModeChange, Target},
    attach::AttachPoint,
    compile::{
        model::{ClusterState, Mode, ModeOverrideInfo},
        services::{Frontend, FrontendPort},
    },
    flowlog::{Endpoint, Naming, SlotNames},
    reconcile::Reconciler,
    sources::Source,
};

/// How often the agent reconciles even when the cluster state did not change (interfaces,
/// routes and cgroups appear after the pods that use them).
const RESYNC: Duration = Duration::from_secs(10);
/// The first wait before reconciling again after a reconcile that left errors.
const RETRY_FIRST: Duration = Duration::from_secs(1);

/// After the source signals news, how long the controller waits to let more of a burst
/// arrive before it syncs (and the least time between two such syncs).
const WAKE_DELAY: Duration = Duration::from_millis(20);

/// What the controller is asked to do.
pub enum Command {
    /// Sets (mode `Some`) or clears (`None`) a node-local override.
    SetMode {
        target: String,
        mode: Option<Mode>,
        who: String,
        reply: oneshot::Sender<Result<ModeChange, String>>,
    },
    /// Why each denied flow record was denied, and what would allow it (one sentence each,
    /// `None` where the workload or policies are gone).
    Explain {
        flows: Vec<crate::flowlog::FlowRecord>,
        reply: oneshot::Sender<Vec<Option<String>>>,
    },
    /// Why each observed peer pair is denied at its enforcement point, and what would allow
    /// it, on the state in force (empty where it is allowed or its workloads are gone).
    ExplainObserved {
        flows: Vec<crate::compile::advise::ObservedFlow>,
        reply: oneshot::Sender<Vec<Vec<String>>>,
    },
    /// Policies from observed peer pairs, with their replay proof, on the state in force.
    Advise {
        observed: Vec<crate::compile::advise::ObservedFlow>,
        options: crate::compile::advise::AdviseOptions,
        reply: oneshot::Sender<crate::compile::advise::Advice>,
    },
    /// The source has news: sync soon (within `WAKE_DELAY`), not at the next poll.
    Wake,
    /// Stops the controller; with `detach`, takes every program off and removes the pins.
    Shutdown {
        detach: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// One attached workload, as published.
#[derive(Clone, Debug)]
pub struct WorkloadView {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub workload: String,
    pub slot: u32,
    /// `tcx`, `clsact` or `cgroup`.
    pub attach: &'static str,
    pub attached_at: String,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    pub mode: Mode,
    pub mode_source: &'static str,
    pub degraded: Option<String>,
    /// The EgressAllowlists that select it, merged.
    pub egress_allowlist: Option<Arc<crate::dns::Allowlist>>,
}

/// Names of a flow counter's peer identity: (namespace, workload) of workloads, and for a
/// Service, its backends' workload and target port per Service port.
#[derive(Clone, Debug, Default)]
pub struct PeerNames {
    identities: HashMap<u32, (String, String)>,
    services: HashMap<u32, ServicePeer>,
    /// Names of identities and Services gone from the cluster state, for
    /// `RETIRED_NAMES_KEEP` since: their numbers are never given again, and packets the
    /// kernel counted for them just before (harvested at the next poll) still name them.
    retired_identities: HashMap<u32, ((String, String), Instant)>,
    retired_services: HashMap<u32, (ServicePeer, Instant)>,
}

/// How long the names of a peer gone from the cluster state are kept.
const RETIRED_NAMES_KEEP: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Default)]
struct ServicePeer {
    namespace: String,
    /// The Service's own name, for ports it does not have.
    name: String,
    /// (protocol, port) -> (backends' namespace and workload, `world` outside the cluster,
    /// their target port when they share one).
    ports: HashMap<(u8, u16), (String, String, Option<u16>)>,
}

impl PeerNames {
    /// (namespace, workload) of a peer identity, and the port to name the flow by. A flow to
    /// a Service counts against its backend workload on the backends' target port (when they
    /// agree on one).
    pub fn name(&self, identity: u32, proto: u8, port: u16) -> (String, String, u16) {
        if agent_common::is_world(identity) {
            return ("world".into(), "world".into(), port);
        }
        if identity == IDENTITY_HOST {
            return ("host".into(), "host".into(), port);
        }
        let service = self
            .services
            .get(&identity)
            .or_else(|| self.retired_services.get(&identity).map(|(svc, _)| svc));
        if let Some(svc) = service {
            return match svc.ports.get(&(proto, port)) {
                Some((namespace, workload, target)) => {
                    (namespace.clone(), workload.clone(), target.unwrap_or(port))
                }
                None => (svc.namespace.clone(), svc.name.clone(), port),
            };
        }
        let names = self
            .identities
            .get(&identity)
            .or_else(|| self.retired_identities.get(&identity).map(|(n, _)| n));
        match names {
            Some((ns, wl)) => (ns.clone(), wl.clone(), port),
            None => ("unknown".into(), "unknown".into(), port),
        }
    }

    /// Keeps the names `before` had that these lack, for `RETIRED_NAMES_KEEP`.
    fn retire_from(&mut self, before: &PeerNames, now: Instant) {
        retire(
            &self.identities,
            &mut self.retired_identities,
            &before.identities,
            &before.retired_identities,
            now,
        );
        retire(
            &self.services,
            &mut self.retired_services,
            &before.services,
            &before.retired_services,
            now,
        );
    }
}

/// Into `retired`: what `was` named that `current` no longer does (retired `now`), and what
/// `was_retired` still holds younger than `RETIRED_NAMES_KEEP` that `current` lacks.
fn retire<V: Clone>(
    current: &HashMap<u32, V>,
    retired: &mut HashMap<u32, (V, Instant)>,
    was: &HashMap<u32, V>,
    was_retired: &HashMap<u32, (V, Instant)>,
    now: Instant,
) {
    for (id, v) in was {
        if !current.contains_key(id) {
            retired.insert(*id, (v.clone(), now));
        }
    }
    for (id, (v, at)) in was_retired {
        if !current.contains_key(id) && now.duration_since(*at) < RETIRED_NAMES_KEEP {
            retired.entry(*id).or_insert_with(|| (v.clone(), *at));
        }
    }
}

/// What the controller publishes after every change.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub node: String,
    /// Policy synced and programs attached at least once.
    pub ready: bool,
    /// Why not ready yet, if not.
    pub not_ready: Option<String>,
    pub workloads: Vec<WorkloadView>,
    pub policies: usize,
    pub policy_errors: Vec<String>,
    pub warnings: Vec<String>,
    pub refused: Vec<String>,
    /// Why the agent is degraded (workloads, identities, source); empty when all is in force.
    pub degraded: Vec<String>,
    pub source_degraded: bool,
    pub host_addresses: Vec<String>,
    pub node_overrides: BTreeMap<String, Mode>,
    pub cluster_overrides: Vec<ModeOverrideInfo>,
    pub naming: Arc<Naming>,
    pub peers: Arc<PeerNames>,
}

impl View {
    /// The published workload of a pod.
    pub fn workload(&self, namespace: &str, pod: &str) -> Option<&WorkloadView> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.pod == pod)
    }
}

/// A mode change the controller applied, for the audit log and Kubernetes Events.
#[derive(Clone, Debug)]
pub struct ModeNotice {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub old: Mode,
    pub new: Mode,
    /// What changed it (`ModeOverride NAME`, `node-local override`...).
    pub by: String,
}

impl ModeNotice {
    /// As the audit log and `ModeChange` list it: (`NAMESPACE/POD`, old, new).
    fn change(&self) -> (String, Mode, Mode) {
        (
            format!("{}/{}", self.namespace, self.pod),
            self.old,
            self.new,
        )
    }
}

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub poll_interval: Duration,
}

/// Owns the reconciler and the source.
pub struct Controller {
    rec: Reconciler,
    source: Box<dyn Source>,
    options: ControllerOptions,
    view: watch::Sender<Arc<View>>,
    /// `tollgate_policy_errors_total`, shared with the metrics.
    pub policy_errors: Arc<AtomicU64>,
    sync_seconds: crate::metrics::SyncHistogram,
    last_sync: Instant,
    /// While the last reconcile left errors (a workload not attached, rules that do not
    /// fit): when to try again, and the wait after that one if it fails too.
    retry: Option<(Instant, Duration)>,
    reconciled: bool,
    /// Another agent's programs were looked for after a reconcile that attached everything.
    stale_links_swept: bool,
    cluster_overrides: BTreeMap<String, ModeOverrideInfo>,
    notices: Option<tokio::sync::mpsc::Sender<ModeNotice>>,
    /// The source's (degraded, not ready) reasons at the last sync: a change is published.
    source_health: (Option<String>, Option<String>),
    /// A wake-up from the source is queued.
    wake_pending: Arc<std::sync::atomic::AtomicBool>,
}

impl Controller {
    /// A controller over a reconciler and a source; `view` is where it publishes.
    pub fn new(
        rec: Reconciler,
        source: Box<dyn Source>,
        options: ControllerOptions,
        view: watch::Sender<Arc<View>>,
        sync_seconds: crate::metrics::SyncHistogram,
        policy_errors: Arc<AtomicU64>,
    ) -> Controller {
        let cluster_overrides = load_cluster_overrides(&options.state_dir);
        Controller {
            rec,
            source,
            options,
            view,
            policy_errors,
            sync_seconds,
            last_sync: Instant::now(),
            retry: None,
            reconciled: false,
            stale_links_swept: false,
            cluster_overrides,
            notices: None,
            source_health: (None, None),
            wake_pending: Arc::default(),
        }
    }

    /// Where mode changes are reported (Kubernetes Events), if anywhere.
    pub fn notify_mode_changes(&mut self, tx: tokio::sync::mpsc::Sender<ModeNotice>) {
        self.notices = Some(tx);
    }

    /// Makes the source wake the controller through `commands` when it has news, so a
    /// change reaches the datapath in milliseconds instead of at the next poll. Wake-ups
    /// coalesce: one is pending at a time.
    pub fn wake_on_source_changes(&mut self, commands: std::sync::mpsc::Sender<Command>) {
        let pending = self.wake_pending.clone();
        let commands = std::sync::Mutex::new(commands);
        self.source.on_change(Arc::new(move || {
            if !pending.swap(true, Ordering::AcqRel)
                && let Ok(tx) = commands.lock()
            {
                let _ = tx.send(Command::Wake);
            }
        }));
    }

    /// Runs until shut down (or every sender of commands is gone).
    pub fn run(mut self, commands: Receiver<Command>) {
        self.sync(true);
        let mut next_tick = Instant::now() + self.options.poll_interval;
        let mut last_sync = Instant::now();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(Command::SetMode {
                    target,
                    mode,
                    who,
                    reply,
                }) => {
                    let result = self.set_mode(&target, mode, who);
                    self.publish();
                    let _ = reply.send(result);
                }
                Ok(Command::Advise {
                    observed,
                    options,
                    reply,
                }) => {
                    // The proof compiles the cluster (about 0.25 s at the bank's size): on a
                    // thread of its own, from a copy of the state (about 40 ms), so a
                    // reconcile waits for the copy at most, never for the advice.
                    let state = self.source.state().clone();
                    let mut options = options;
                    options.dns_servers = self.rec.options.dns_servers.clone();
                    let spawned =
                        std::thread::Builder::new()
                            .name("advise".into())
                            .spawn(move || {
                                let _ = reply.send(crate::compile::advise::advise(
                                    &state, &observed, &options,
                                ));
                            });
                    if let Err(e) = spawned {
                        warn!(error = %e, "could not start the advice thread");
                    }
                }
                Ok(Command::Explain { flows, reply }) => {
                    let _ = reply.send(flows.iter().map(|f| self.explain(f)).collect());
                }
                Ok(Command::ExplainObserved { flows, reply }) => {
                    let _ = reply.send(flows.iter().map(|f| self.explain_observed(f)).collect());
                }
                Ok(Command::Shutdown { detach, reply }) => {
                    let _ = reply.send(self.shutdown(detach));
                    return;
                }
                Ok(Command::Wake) => {
                    next_tick = next_tick.min(last_sync.max(Instant::now()) + WAKE_DELAY);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_tick {
                // Cleared before the sync: news that arrives during it wakes us again.
                self.wake_pending.store(false, Ordering::Release);
                self.sync(false);
                last_sync = Instant::now();
                next_tick = last_sync + self.options.poll_interval;
            }
        }
    }

    fn shutdown(&mut self, detach: bool) -> Result<(), String> {
        if detach {
            self.rec.detach_all().map_err(|e| e.to_string())?;
            self.rec
                .datapath
                .detach_and_unpin()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Takes in what the source has and reconciles when something changed, every `RESYNC`,
    /// and at every poll while a workload could not be attached.
    fn sync(&mut self, force: bool) {
        let due = force
            || self.last_sync.elapsed() >= RESYNC
            || self.retry.is_some_and(|(at, _)| Instant::now() >= at);
        let refresh = self.source.refresh(force);
        let source_health = (self.source.degraded(), self.source.ready());
        let health_changed = source_health != self.source_health;
        self.source_health = source_health;
        if !due
            && !refresh.changed
            && !health_changed
            && !self.rec.node_changed(self.source.state())
        {
            return;
        }
        for e in &refresh.new_errors {
            warn!(error = %e, "rejected object");
        }
        self.policy_errors
            .fetch_add(refresh.new_errors.len() as u64, Ordering::Relaxed);
        if let Some(why) = self.source.ready() {
            // Never reconcile on a state that is not complete: it would detach workloads
            // that are only not listed yet.
            info!(why, "waiting for the cluster state");
            self.publish();
            return;
        }
        self.last_sync = Instant::now();
        let started = Instant::now();
        let before = self.modes();
        self.apply();
        self.report_mode_changes(&before);
        // Parsing a large cluster state leaves megabytes of freed trees in the heap; hand
        // them back to the system instead of keeping them resident.
        // SAFETY: glibc call without arguments that matter.
        unsafe { libc::malloc_trim(0) };
        self.sync_seconds.observe(started.elapsed().as_secs_f64());
        self.publish();
    }

    fn apply(&mut self) {
        match self.rec.reconcile(self.source.state()) {
            Ok(report) => {
                for e in &report.errors {
                    warn!(error = %e, "workload not reconciled; retrying");
                }
                self.retry_later(!report.errors.is_empty());
                // Until every workload is attached: one that failed the first time gets its
                // sweep when a retry attaches it.
                if !self.stale_links_swept {
                    self.remove_stale_links();
                    self.stale_links_swept = report.errors.is_empty();
                }
                self.reconciled = true;
            }
            Err(e) => {
                self.retry_later(true);
                error!(error = %e, "reconcile failed; will retry");
            }
        }
    }

    /// Once the workloads are attached: another agent's programs still linked at their
    /// attachment points (an earlier agent with another `--bpffs`) come off, or they would
    /// go on enforcing that agent's last rules beside ours.
    fn remove_stale_links(&self) {
        let sweep = self.rec.datapath.remove_stale_links();
        for link in sweep.removed {
            warn!(
                link = link.link_id,
                program = %link.prog,
                program_id = link.prog_id,
                at = ?link.at,
                "detached another agent's program from a workload this agent attached (an earlier agent with another --bpffs?)"
            );
        }
        for e in sweep.errors {
            warn!(error = %e, "could not look for or detach another agent's programs");
        }
    }

    /// Schedules the next try after a reconcile that left errors: 1 s, then twice as long
    /// each time up to `RESYNC`, so a state that cannot fit (a policy of 50,000 ipBlocks)
    /// is not compiled again at every poll, holding up mode changes and the other work of
    /// this thread.
    fn retry_later(&mut self, failed: bool) {
        self.retry = failed.then(|| {
            let wait = self
                .retry
                .map_or(RETRY_FIRST, |(_, wait)| (wait * 2).min(RESYNC));
            (Instant::now() + wait, wait)
        });
    }

    fn modes(&self) -> BTreeMap<(String, String), Mode> {
        self.rec
            .workloads()
            .iter()
            .map(|(k, w)| (k.clone(), w.policy.mode))
            .collect()
    }

    /// Audits what cluster `ModeOverride`s changed, with the workloads of this node whose
    /// mode they changed, and reports those changes as notices.
    fn report_mode_changes(&mut self, before: &BTreeMap<(String, String), Mode>) {
        let state = self.source.state();
        let now = &state.mode_overrides;
        let mut touched: Vec<(String, Option<&ModeOverrideInfo>, Option<&ModeOverrideInfo>)> =
            Vec::new();
        let names: BTreeSet<&String> = now.keys().chain(self.cluster_overrides.keys()).collect();
        for name in names {
            let (old, new) = (self.cluster_overrides.get(name), now.get(name));
            if old != new {
                touched.push((name.clone(), old, new));
            }
        }
        let changed_pods = self.mode_changes(before);
        for (name, old, new) in &touched {
            let target = new
                .or(*old)
                .map(|o| o.target.to_string())
                .unwrap_or_default();
            let parsed = Target::parse(&target).ok();
            let changed: Vec<(String, Mode, Mode)> = changed_pods
                .iter()
                .filter(|n| {
                    let pod = &self.rec.workloads()[&(n.namespace.clone(), n.pod.clone())].pod;
                    parsed.as_ref().is_some_and(|t| t.matches(pod))
                })
                .map(ModeNotice::change)
                .collect();
            let reason = new.or(*old).map(|o| o.reason.clone()).unwrap_or_default();
            let record = AuditRecord {
                time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                who: if reason.is_empty() {
                    format!("ModeOverride {name} (cluster)")
                } else {
                    format!("ModeOverride {name} (cluster): {reason}")
                },
                target,
                old_mode: old.map(|o| o.mode),
                new_mode: new.map(|o| o.mode),
                changed,
            };
            self.audit(&record);
            info!(
                name,
                target = record.target,
                old = ?record.old_mode,
                new = ?record.new_mode,
                changed = record.changed.len(),
                "cluster mode override"
            );
        }
        if !touched.is_empty() {
            self.cluster_overrides = now.clone();
            save_cluster_overrides(&self.options.state_dir, &self.cluster_overrides);
        }
        self.notify(changed_pods);
    }

    /// The workloads whose mode differs from `before`, and what set it.
    fn mode_changes(&self, before: &BTreeMap<(String, String), Mode>) -> Vec<ModeNotice> {
        let state = self.source.state();
        self.rec
            .workloads()
            .iter()
            .filter_map(|(key, w)| {
                let old = *before.get(key)?;
                (old != w.policy.mode).then(|| ModeNotice {
                    namespace: key.0.clone(),
                    pod: key.1.clone(),
                    uid: w.pod.uid.clone(),
                    old,
                    new: w.policy.mode,
                    by: match w.mode_source {
                        "cluster-override" => state
                            .mode_override_for(&w.pod)
                            .map(|o| format!("ModeOverride {}", o.name))
                            .unwrap_or_else(|| "ModeOverride".into()),
                        "node-override" => "a node-local override".into(),
                        other => format!("the {other} mode"),
                    },
                })
            })
            .collect()
    }

    /// Hands mode changes to the Events recorder, if there is one (never waiting).
    fn notify(&self, notices: Vec<ModeNotice>) {
        if let Some(tx) = &self.notices {
            for n in notices {
                let _ = tx.try_send(n);
            }
        }
    }

    fn audit(&self, record: &AuditRecord) {
        if let Err(e) = admin::audit(&self.options.state_dir.join("audit.log"), record) {
            warn!(error = %e, "could not write the audit log");
        }
    }

    /// Explains a denied flow at `local`, a pod of this node, toward `peer`, with the cluster
    /// state and compile in force (no compile of its own: the controller's loop stays free).
    fn explain_at(
        &self,
        local: &crate::compile::policy::PodKey,
        ingress: bool,
        peer: &crate::compile::explain::Peer,
        protocol: Option<crate::compile::model::Protocol>,
        port: u16,
    ) -> Option<String> {
        let state = self.source.state();
        let pod = state.pods.get(local)?;
        let policy = self.rec.compiled().pods.get(local)?;
        Some(
            crate::compile::explain::explain(
                state,
                pod,
                direction_of(ingress),
                policy.isolating(ingress),
                peer,
                protocol,
                port,
                None,
            )
            .summary(),
        )
    }

    /// Explains an observed peer pair the policies in force still deny at its enforcement
    /// point: at the first pod of its workload on this node they isolate there, toward the
    /// peer's first pod, the latest address it was seen at, or (from a pod an
    /// EgressAllowlist selects) the name it was resolved from. Nothing when they allow it
    /// now, or when the peer is an address never seen (a made-up one would mislead).
    fn explain_observed(&self, flow: &crate::compile::advise::ObservedFlow) -> Vec<String> {
        use crate::compile::{
            advise::pods_of,
            explain::{Explanation, Fix, Peer, rules_allow},
            model::Protocol,
        };
        let state = self.source.state();
        let compiled = self.rec.compiled();
        let ingress = flow.direction == "ingress";
        let ((lns, lwl), (pns, pwl)) = flow.local_and_peer();
        let protocol = Protocol::parse(&flow.protocol.to_ascii_uppercase());
        // A name reached from a pod an EgressAllowlist selects is decided by the allowlist
        // (whether or not a NetworkPolicy isolates the pod's egress); anything else by the
        // policies that isolate the side.
        let named = !ingress && (pns, pwl) == ("world", "world") && !flow.dst_domain.is_empty();
        // The first pod of the workload on this node that is isolated on this side.
        let local = pods_of(state, lns, lwl).find_map(|pod| {
            let key = (pod.namespace.clone(), pod.name.clone());
            let policy = compiled.pods.get(&key)?;
            let allowlist = if named {
                Some(crate::dns::Allowlist::for_pod(
                    pod,
                    state.egress_allowlists.values(),
                )?)
            } else {
                None
            };
            (named || !policy.isolating(ingress).is_empty())
                .then_some((key, pod, policy, allowlist))
        });
        let Some((key, pod, policy, allowlist)) = local else {
            return Vec::new();
        };
        let isolated_by = policy.isolating(ingress);
        if let Some(allowlist) = allowlist {
            // A name from a pod an EgressAllowlist selects: the fix is an entry for it.
            let proto = protocol.map_or(0, Protocol::number);
            let allowed = allowlist
                .ports_for(&flow.dst_domain)
                .is_some_and(|ports| ports.iter().any(|p| p.allows(proto, flow.port)));
            let (Some(first), false) = (allowlist.names.first(), allowed) else {
                return Vec::new();
            };
            let rule = crate::compile::explain::domain_entry(&flow.dst_domain, protocol, flow.port);
            let explanation = Explanation {
                side: "egress",
                pod: format!("{}/{}", pod.namespace, pod.name),
                isolated_by: allowlist.names.iter().chain(isolated_by).cloned().collect(),
                fix: Fix::Domain {
                    allowlist: first.clone(),
                    rule,
                },
            };
            return vec![explanation.summary()];
        }
        let peer = match (pns, pwl) {
            ("world", "world") => match flow.world_addresses.last() {
                Some(address) => Peer::Address(*address),
                None => return Vec::new(),
            },
            ("host", "host") => return Vec::new(),
            _ => match pods_of(state, pns, pwl).next() {
                Some(peer) => {
                    if rules_allow(
                        state,
                        pod,
                        direction_of(ingress),
                        isolated_by,
                        peer,
                        protocol,
                        flow.port,
                    ) {
                        return Vec::new();
                    }
                    Peer::Pod(peer)
                }
                None => return Vec::new(),
            },
        };
        self.explain_at(&key, ingress, &peer, protocol, flow.port)
            .into_iter()
            .collect()
    }

    /// Explains a denied flow record at the workload of this node that denied it, with the
    /// cluster state and compile in force (a flow to a Service address: at its first backend).
    fn explain(&self, record: &crate::flowlog::FlowRecord) -> Option<String> {
        use crate::compile::{explain::Peer, model::Protocol};
        let state = self.source.state();
        let compiled = self.rec.compiled();
        let ingress = record.direction == "ingress";
        let local = if ingress { &record.dst } else { &record.src }.as_ref()?;
        let key = (local.namespace.clone(), local.pod.clone());
        let peer_ip: std::net::IpAddr = if ingress {
            &record.src_ip
        } else {
            &record.dst_ip
        }
        .parse()
        .ok()?;
        let protocol = Protocol::parse(&record.protocol.to_ascii_uppercase());
        // Outside the cluster (no pod, Service or node names the address) from a pod an
        // EgressAllowlist selects: the allowlist decided, and the fix is an entry for the
        // name it was resolved from, or a name instead of a bare address.
        if !ingress
            && record.dst.is_none()
            && let Some(pod) = state.pods.get(&key)
            && let Some(allowlist) =
                crate::dns::Allowlist::for_pod(pod, state.egress_allowlists.values())
            && let Some(first) = allowlist.names.first()
        {
            use crate::compile::explain::{Explanation, Fix};
            let isolating = compiled
                .pods
                .get(&key)
                .map_or(&[][..], |p| p.isolating(false));
            let allows = |name: &str| {
                let proto = protocol.map_or(0, Protocol::number);
                allowlist
                    .ports_for(name)
                    .is_some_and(|ports| ports.iter().any(|p| p.allows(proto, record.dst_port)))
            };
            let fix = match record.dst_domain.as_deref().filter(|d| !d.is_empty()) {
                // Allowed by name and port: denied only because the answer had expired.
                Some(name) if allows(name) => Fix::Expired {
                    allowlist: first.clone(),
                    name: name.to_string(),
                },
                Some(name) => Fix::Domain {
                    allowlist: first.clone(),
                    rule: crate::compile::explain::domain_entry(name, protocol, record.dst_port),
                },
                None => Fix::ResolveName {
                    allowlist: first.clone(),
                },
            };
            let explanation = Explanation {
                side: "egress",
                pod: format!("{}/{}", pod.namespace, pod.name),
                isolated_by: allowlist.names.iter().chain(isolating).cloned().collect(),
                fix,
            };
            return Some(explanation.summary());
        }
        let mut port = record.dst_port;
        let mut peer_pod = compiled
            .pod_of_address(peer_ip)
            .and_then(|k| state.pods.get(k));
        if !ingress
            && let Some(backend) = compiled
                .frontend_of_address(peer_ip)
                .and_then(|f| f.port(protocol.map_or(0, Protocol::number), port))
                .and_then(|p| p.backends.first())
        {
            port = backend.port;
            peer_pod = backend.pod.as_ref().and_then(|k| state.pods.get(k));
        }
        let peer = match peer_pod {
            Some(p) => Peer::Pod(p),
            None => Peer::Address(peer_ip),
        };
        self.explain_at(&key, ingress, &peer, protocol, port)
    }

    fn set_mode(
        &mut self,
        target: &str,
        mode: Option<Mode>,
        who: String,
    ) -> Result<ModeChange, String> {
        let parsed = Target::parse(target)?;
        let before = self.modes();
        let old = match mode {
            Some(m) => self.rec.overrides.targets.insert(target.to_string(), m),
            None => self.rec.overrides.targets.remove(target),
        };
        if let Err(e) = self
            .rec
            .overrides
            .save(&self.options.state_dir.join("overrides.json"))
        {
            // Not saved, not in force: a change a restart would undo must not apply now
            // (nor at the next reconcile), and it has no audit record.
            match old {
                Some(m) => self.rec.overrides.targets.insert(target.to_string(), m),
                None => self.rec.overrides.targets.remove(target),
            };
            return Err(format!("persist overrides: {e} (nothing changed)"));
        }
        self.rec
            .apply_modes(self.source.state())
            .map_err(|e| format!("apply the mode: {e}"))?;
        let matched = self
            .rec
            .workloads()
            .values()
            .filter(|w| parsed.matches(&w.pod))
            .count();
        let notices = self.mode_changes(&before);
        let changed: Vec<(String, Mode, Mode)> = notices.iter().map(ModeNotice::change).collect();
        let record = AuditRecord {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            who,
            target: target.into(),
            old_mode: old,
            new_mode: mode,
            changed: changed.clone(),
        };
        self.audit(&record);
        info!(target, ?old, new = ?mode, changed = changed.len(), "node-local mode override");
        self.notify(notices);
        Ok(ModeChange {
            target: target.into(),
            old,
            new: mode,
            changed,
            matched,
        })
    }

    /// Publishes what readers need.
    fn publish(&self) {
        let state = self.source.state();
        let degraded_workloads = self.rec.degraded();
        let workloads = self
            .rec
            .workloads()
            .iter()
            .map(|((ns, name), w)| WorkloadView {
                namespace: ns.clone(),
                pod: name.clone(),
                uid: w.pod.uid.clone(),
                workload: w.pod.workload.clone(),
                slot: w.slot,
                attach: w.method.as_str(),
                attached_at: match &w.point {
                    AttachPoint::Tc { iface } => iface.clone(),
                    AttachPoint::Cgroup { path } => path.display().to_string(),
                },
                isolated_ingress: w.policy.isolated_ingress,
                // An EgressAllowlist isolates its workloads for egress (outside the
                // cluster): they have something to drop.
                isolated_egress: w.policy.isolated_egress || w.policy.egress_allowlist.is_some(),
                mode: w.policy.mode,
                mode_source: w.mode_source,
                degraded: degraded_workloads.get(&(ns.clone(), name.clone())).cloned(),
                egress_allowlist: w.policy.egress_allowlist.clone(),
            })
            .collect();
        let mut degraded: Vec<String> = degraded_workloads
            .iter()
            .map(|((ns, pod), why)| format!("{ns}/{pod}: {why}"))
            .collect();
        if let Some(why) = self.rec.identities_degraded() {
            degraded.push(why.to_string());
        }
        let source_degraded = self.source.degraded();
        degraded.extend(source_degraded.clone());
        let view = View {
            node: self.options.node_name.clone(),
            ready: self.reconciled,
            not_ready: self.source.ready(),
            workloads,
            policies: state.policies.len(),
            policy_errors: self
                .source
                .errors()
                .iter()
                .map(ToString::to_string)
                .collect(),
            warnings: self.source.warnings().to_vec(),
            refused: self
                .rec
                .refused()
                .iter()
                .map(|((ns, pod), why)| format!("{ns}/{pod}: {why}"))
                .collect(),
            degraded,
            source_degraded: source_degraded.is_some(),
            host_addresses: self
                .rec
                .host_addresses()
                .iter()
                .map(ToString::to_string)
                .collect(),
            node_overrides: self.rec.overrides.targets.clone(),
            cluster_overrides: state.mode_overrides.values().cloned().collect(),
            naming: Arc::new(self.naming(state)),
            peers: Arc::new(self.peer_names(state)),
        };
        self.view.send_replace(Arc::new(view));
    }

    fn naming(&self, state: &ClusterState) -> Naming {
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
                    egress_allowlists: w
                        .policy
                        .egress_allowlist
                        .as_ref()
                        .map(|a| a.names.clone())
                        .unwrap_or_default(),
                },
            );
        }
        for pod in state.pods.values() {
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
        for frontend in self.rec.compiled().frontends.values() {
            let backends = backends_endpoint(state, frontend, frontend.ports.iter());
            for ip in &frontend.addresses {
                naming
                    .services
                    .insert(*ip, (frontend.service_id(), backends.clone()));
            }
            if let Some(ip) = frontend.addresses.first() {
                naming.service_addresses.insert(frontend.identity, *ip);
            }
        }
        naming.host = self.rec.host_addresses().iter().copied().collect();
        let compiled = self.rec.compiled();
        let outside = compiled.outside_services(Some(self.rec.host_addresses()));
        naming.services_outside = outside
            .iter()
            .filter_map(|id| compiled.frontends.get(id))
            .flat_map(|f| f.addresses.iter().copied())
            .collect();
        naming
    }

    fn peer_names(&self, state: &ClusterState) -> PeerNames {
        let compiled = self.rec.compiled();
        let mut peers = PeerNames::default();
        for (id, info) in compiled.identities.iter() {
            // One workload per identity: pods of two workloads never share one.
            let workload = info.workload.clone();
            peers
                .identities
                .insert(*id, (info.namespace.clone(), workload));
        }
        for frontend in compiled.frontends.values() {
            let mut svc = ServicePeer {
                namespace: frontend.service.0.clone(),
                name: frontend.service.1.clone(),
                ports: HashMap::new(),
            };
            for port in &frontend.ports {
                let targets: BTreeSet<u16> = port.backends.iter().map(|b| b.port).collect();
                let target = (targets.len() == 1).then(|| *targets.first().expect("one"));
                // Backends outside the cluster: `world`, as their addresses are.
                let (namespace, workload) =
                    match backends_endpoint(state, frontend, std::iter::once(port)) {
                        Some(ep) => (ep.namespace, ep.workload),
                        None => ("world".to_string(), "world".to_string()),
                    };
                // A call to its NodePort is counted with the NodePort as its port: named
                // the same.
                if let Some(node_port) = port.node_port {
                    svc.ports.insert(
                        (port.protocol.number(), node_port),
                        (namespace.clone(), workload.clone(), target),
                    );
                }
                svc.ports.insert(
                    (port.protocol.number(), port.port),
                    (namespace, workload, target),
                );
            }
            peers.services.insert(frontend.identity, svc);
        }
        peers.retire_from(&self.view.borrow().peers, Instant::now());
        peers
    }
}

/// Where the cluster overrides this agent last applied are kept, so a restart audits only
/// what changed while it was away.
const CLUSTER_OVERRIDES_FILE: &str = "cluster-overrides.json";

/// (name, target, mode, reason) of each override, as persisted.
type PersistedOverride = (String, String, Mode, String);

fn load_cluster_overrides(state_dir: &std::path::Path) -> BTreeMap<String, ModeOverrideInfo> {
    let Ok(text) = std::fs::read_to_string(state_dir.join(CLUSTER_OVERRIDES_FILE)) else {
        return BTreeMap::new();
    };
    let list: Vec<PersistedOverride> = serde_json::from_str(&text).unwrap_or_default();
    list.into_iter()
        .filter_map(|(name, target, mode, reason)| {
            let target = Target::parse(&target).ok()?;
            Some((
                name.clone(),
                ModeOverrideInfo {
                    name,
                    target,
                    mode,
                    reason,
                },
            ))
        })
        .collect()
}

fn save_cluster_overrides(
    state_dir: &std::path::Path,
    overrides: &BTreeMap<String, ModeOverrideInfo>,
) {
    let list: Vec<PersistedOverride> = overrides
        .values()
        .map(|o| {
            (
                o.name.clone(),
                o.target.to_string(),
                o.mode,
                o.reason.clone(),
            )
        })
        .collect();
    let data = serde_json::to_vec(&list).expect("serializable");
    if let Err(e) = admin::write_atomic(&state_dir.join(CLUSTER_OVERRIDES_FILE), &data) {
        warn!(error = %e, "could not persist the cluster overrides applied");
    }
}

/// The backends of some ports of a Service as one endpoint: the pod when there is one, else
/// the workload they all belong to (pod empty), else every workload's name joined with `+`;
/// a Service without backends is named after itself. `None` when every backend is outside
/// the cluster (addresses no pod has): the flow's far end is then no workload.
fn backends_endpoint<'a>(
    state: &ClusterState,
    frontend: &Frontend,
    ports: impl Iterator<Item = &'a FrontendPort>,
) -> Option<Endpoint> {
    let mut pods = BTreeSet::new();
    let mut backends = 0;
    for b in ports.flat_map(|p| &p.backends) {
        backends += 1;
        if let Some(k) = &b.pod {
            pods.insert(k.clone());
        }
    }
    if backends > 0 && pods.is_empty() {
        return None;
    }
    let workloads: BTreeSet<String> = pods
        .iter()
        .filter_map(|k| state.pods.get(k))
        .map(|p| p.workload.clone())
        .collect();
    let workload = if workloads.is_empty() {
        frontend.service.1.clone()
    } else {
        workloads.into_iter().collect::<Vec<_>>().join("+")
    };
    Some(Endpoint {
        namespace: frontend.service.0.clone(),
        pod: match pods.len() {
            1 => pods.into_iter().next().map(|k| k.1).unwrap_or_default(),
            _ => String::new(),
        },
        workload,
    })
}

/// The datapath's direction code of a side (`ingress`, else egress).
fn direction_of(ingress: bool) -> u8 {
    if ingress {
        agent_common::DIR_INGRESS
    } else {
        agent_common::DIR_EGRESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{
        model::{PodInfo, Protocol},
        services::Backend,
    };

    /// A Service's backends name a flow's far end: the pod, the workload, or, when every
    /// backend is outside the cluster, nobody (`null` in the flow log, `world` in flow
    /// series).
    #[test]
    fn a_services_backends_name_the_far_end() {
        let mut state = ClusterState::default();
        let key = ("shop".to_string(), "db-0".to_string());
        state.pods.insert(
            key.clone(),
            PodInfo {
                namespace: "shop".into(),
                name: "db-0".into(),
                workload: "db".into(),
                ..PodInfo::default()
            },
        );
        let frontend = |backends: Vec<Backend>| Frontend {
            service: ("shop".into(), "svc".into()),
            identity: 7,
            addresses: vec![],
            ports: vec![FrontendPort {
                name: "web".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
                backends,
            }],
        };
        let backend = |ip: &str, pod: Option<crate::compile::policy::PodKey>| Backend {
            ip: ip.parse().unwrap(),
            port: 8080,
            pod,
        };
        let name = |f: &Frontend| backends_endpoint(&state, f, f.ports.iter());

        let inside = frontend(vec![backend("10.1.0.5", Some(key.clone()))]);
        let ep = name(&inside).expect("a pod");
        assert_eq!((ep.pod.as_str(), ep.workload.as_str()), ("db-0", "db"));
        let outside = frontend(vec![backend("203.0.113.50", None)]);
        assert!(name(&outside).is_none(), "outside the cluster");
        let empty = frontend(vec![]);
        assert_eq!(name(&empty).expect("named").workload, "svc");
    }

    /// A peer deleted from the cluster state just after the kernel counted its packets is
    /// still named when the agent harvests them (not `unknown`), for a while.
    #[test]
    fn a_peer_gone_from_the_state_keeps_its_names_for_a_while() {
        let mut before = PeerNames::default();
        before.identities.insert(4242, ("shop".into(), "db".into()));
        let now = Instant::now();
        let mut after = PeerNames::default();
        after.retire_from(&before, now);
        assert_eq!(
            after.name(4242, 6, 5432),
            ("shop".into(), "db".into(), 5432)
        );
        // Carried from view to view, then let go.
        let mut later = PeerNames::default();
        later.retire_from(&after, now + Duration::from_secs(60));
        assert_eq!(later.name(4242, 6, 5432).1, "db");
        let mut much_later = PeerNames::default();
        much_later.retire_from(&later, now + RETIRED_NAMES_KEEP + Duration::from_secs(1));
        assert_eq!(much_later.name(4242, 6, 5432).1, "unknown");
    }
}
