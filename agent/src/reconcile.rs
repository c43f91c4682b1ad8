//! Reconcile: desired cluster state in, datapath changed to match, without transient drops.
//!
//! One reconcile finds this node's pods and where each attaches (only at points that are
//! provably its own, never at one another workload holds), compiles the cluster for them and
//! applies the difference in phases, so a flow allowed before and after never meets a deny in
//! between:
//! 1. make: every workload's new policy entries are written next to the old ones;
//! 2. new and changed addresses (pods, Service frontends, the node's own) get identities;
//! 3. workload configurations (isolation, mode, addresses) are written, new workloads
//!    attached;
//! 4. break: stale policy entries and identities of addresses that are gone are removed;
//! 5. workloads whose rules or peers changed get a new epoch: tracked flows are decided
//!    again, against the final state, on their next packet (flows to a Service only when the
//!    workload's own rules changed, never because the Service's backends did).
//!
//! When map writes fail (a full map, a kernel error) nothing half-written stays: a workload
//! keeps its last complete rules, or, if new, is attached isolated with no rules (it denies
//! in its mode) until they fit; either way it is reported degraded.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
};

use ipnet::IpNet;
use tracing::{debug, info, info_span, warn};

use crate::{
    Datapath, DatapathError,
    admin::Overrides,
    attach::{
        self, AttachMethod, AttachPoint,
        points::{self, NodeNetwork, PodCgroups},
    },
    compile::{
        model::{ClusterState, LogPosition, PodInfo},
        policy::{
            CompileCache, CompileOptions, Compiled, IdentityAllocator, NodeAddresses, PodKey,
            PodModeAnnotations, compile_cached, mode_and_source,
        },
    },
    maps::{MapsError, Mode, WorkloadPolicy},
    sources::convert::{CGROUP_ANNOTATION, INTERFACE_ANNOTATION},
};

/// A workload attached on this node.
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    pub slot: u32,
    pub point: AttachPoint,
    pub method: AttachMethod,
    pub pod: PodInfo,
    pub policy: WorkloadPolicy,
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    /// Where the mode comes from: `override`, `pod`, `namespace` or `default`.
    pub mode_source: &'static str,
}

/// What one reconcile did.
#[derive(Clone, Debug, Default)]
pub struct ReconcileReport {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub updated: Vec<String>,
    pub identities_changed: usize,
    /// Policy, ipBlock and identity entries this reconcile wrote and removed.
    pub entries_written: u64,
    pub entries_removed: u64,
    /// Workloads that could not be attached or programmed, with the reason. The rest of the
    /// node was reconciled; these keep their previous state and are retried next time.
    pub errors: Vec<String>,
    /// Pods refused an attachment point that is not provably theirs (`NAMESPACE/POD: why`).
    /// Not retried until something changes: the claim itself is wrong.
    pub refused: Vec<String>,
}

/// Options of the reconciler.
#[derive(Clone, Debug)]
pub struct ReconcilerOptions {
    /// Mode of workloads without a mode annotation on the pod or its namespace.
    pub default_mode: Mode,
    /// Whether a pod's own mode annotation may relax its namespace's mode.
    pub pod_mode_annotations: PodModeAnnotations,
    /// This node: pods whose `spec.nodeName` names another node are never attached, and the
    /// Node object of this name adds its addresses to the node's own.
    pub node_name: Option<String>,
    /// Root of the cgroup v2 hierarchy: where the kubepods hierarchy and relative
    /// `tollgate.io/cgroup` annotations are.
    pub cgroup_root: PathBuf,
    /// Whether the `tollgate.io/interface` and `tollgate.io/cgroup` annotations are read at
    /// all (they are checked either way). The file source trusts them; the Kubernetes source
    /// only with `--trust-attach-annotations`.
    pub trust_attach_annotations: bool,
    /// Resolvers workloads use besides Service `kube-system/kube-dns` (`--dns-server`).
    pub dns_servers: Vec<IpAddr>,
}

impl Default for ReconcilerOptions {
    fn default() -> Self {
        ReconcilerOptions {
            default_mode: Mode::Log,
            pod_mode_annotations: PodModeAnnotations::Stricter,
            node_name: None,
            cgroup_root: default_cgroup_root(),
            trust_attach_annotations: true,
            dns_servers: vec![],
        }
    }
}

/// The cgroup v2 mount: `/sys/fs/cgroup/unified` on hybrid hosts, else `/sys/fs/cgroup`.
pub fn default_cgroup_root() -> PathBuf {
    let unified = std::path::Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.into()
    } else {
        "/sys/fs/cgroup".into()
    }
}

/// The identity entries as last written: pods, Service frontends and the node's addresses.
#[derive(Default)]
struct WrittenIdentities {
    /// The compile whose addresses these are (`Compiled::generation`; 0: none yet).
    generation: u64,
    host: BTreeSet<IpAddr>,
    /// What the `IDENTITIES` map holds.
    merged: BTreeMap<IpNet, u32>,
    /// Entries no longer wanted, removed in phase 4 (after the rules stop naming them).
    stale: Vec<IpNet>,
}

/// Keeps the datapath in line with the cluster state.
pub struct Reconciler {
    pub datapath: Datapath,
    pub options: ReconcilerOptions,
    allocator: IdentityAllocator,
    cache: CompileCache,
    workloads: BTreeMap<PodKey, LocalWorkload>,
    identities: WrittenIdentities,
    compiled: Compiled,
    /// Workloads whose rules could not be written in full, with the reason.
    degraded: BTreeMap<PodKey, String>,
    /// Why the node's identity entries could not be updated, if they could not.
    identities_degraded: Option<String>,
    /// Pods refused an attachment point, with the reason.
    refused: BTreeMap<PodKey, String>,
    /// Where each pod of the last reconcile attaches: a policy change at 20,000 pods never
    /// looks at each pod again, a pod change at the pods that changed.
    placements: Option<Placements>,
    /// The Services' NodePorts, and the frontends they were read from.
    service_node_ports: Option<(
        imbl::OrdMap<u32, crate::compile::services::Frontend>,
        crate::maps::NodePorts,
    )>,
    /// Runtime mode overrides (set through the admin socket), above annotations.
    pub overrides: Overrides,
    /// Called before workloads are detached and their slots cleared: the agent reads what
    /// their slots counted since its last read, while they still have their names.
    pub before_detach: Option<Box<dyn FnMut() + Send>>,
}

/// Where each pod of the last reconcile attaches (pods elsewhere left out), and what that
/// was worked out from.
struct Placements {
    /// Hash of the node's network and cgroups and the options placement reads.
    node: u64,
    /// The source's fingerprint of the pods, and where its change log stood.
    pods_version: Option<u64>,
    position: Option<LogPosition>,
    placed: BTreeMap<PodKey, Placement>,
}

/// A pod that attaches on this node: where, and the pod as the cluster state has it (looked
/// up once per reconcile: among 20,000 pods a lookup by name costs about a microsecond).
struct LocalPod<'s> {
    point: AttachPoint,
    pod: &'s PodInfo,
}

/// An attachment point by its bytes, to group the pods that claim it: every point is an
/// interface name or a cgroup directory as the node's scan spells it (canonical), so equal
/// points have equal bytes, where a `Path` hashes component by component.
#[derive(PartialEq, Eq, Hash)]
enum PointBytes<'a> {
    Tc(&'a str),
    Cgroup(&'a [u8]),
}

impl<'a> PointBytes<'a> {
    fn of(point: &'a AttachPoint) -> PointBytes<'a> {
        match point {
            AttachPoint::Tc { iface } => PointBytes::Tc(iface),
            AttachPoint::Cgroup { path } => PointBytes::Cgroup(path.as_os_str().as_encoded_bytes()),
        }
    }
}

/// Where a pod attaches, or why it may not.
#[derive(Clone)]
enum Placement {
    /// Not on this node (or nothing of it is here yet).
    Elsewhere,
    At(AttachPoint),
    /// The pod claimed `claimed` (an interface, or a cgroup directory) and may not have it.
    Refused {
        claimed: AttachPoint,
        why: String,
    },
}

/// What an attachment point is called in messages: the interface or the cgroup directory.
fn subject(point: &AttachPoint) -> String {
    match point {
        AttachPoint::Tc { iface } => iface.clone(),
        AttachPoint::Cgroup { path } => path.display().to_string(),
    }
}

/// The pod an attachment point belongs to by what the node says (a host route to its IP,
/// a cgroup directory named for its UID), attached or not: whom a refused claim names.
fn rightful_owner(
    state: &ClusterState,
    network: &NodeNetwork,
    point: &AttachPoint,
) -> Option<PodKey> {
    let found = match point {
        AttachPoint::Tc { iface } => state
            .pods
            .iter()
            .find(|(_, p)| network.routes_to(iface, &p.ips)),
        AttachPoint::Cgroup { path } => {
            let uid = points::uid_of_cgroup(path)?;
            state.pods.iter().find(|(_, p)| p.uid == uid)
        }
    };
    found.map(|(k, _)| k.clone())
}

impl Reconciler {
    pub fn new(datapath: Datapath, options: ReconcilerOptions) -> Self {
        let mut allocator = IdentityAllocator::default();
        allocator.seed(datapath.maps.pinned_identities());
        Reconciler {
            datapath,
            options,
            allocator,
            cache: CompileCache::default(),
            workloads: BTreeMap::new(),
            identities: WrittenIdentities::default(),
            compiled: Compiled::default(),
            degraded: BTreeMap::new(),
            identities_degraded: None,
            refused: BTreeMap::new(),
            placements: None,
            service_node_ports: None,
            overrides: Overrides::default(),
            before_detach: None,
        }
    }

    /// Workloads attached on this node.
    pub fn workloads(&self) -> &BTreeMap<PodKey, LocalWorkload> {
        &self.workloads
    }

    /// The last compiled cluster.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// Workloads whose rules are not fully in force, with the reason.
    pub fn degraded(&self) -> &BTreeMap<PodKey, String> {
        &self.degraded
    }

    /// Why the identity entries are out of date, if they are.
    pub fn identities_degraded(&self) -> Option<&str> {
        self.identities_degraded.as_deref()
    }

    /// Pods refused an attachment point, with the reason.
    pub fn refused(&self) -> &BTreeMap<PodKey, String> {
        &self.refused
    }

    /// The node's own addresses as last written (its network namespace and Node object).
    pub fn host_addresses(&self) -> &BTreeSet<IpAddr> {
        &self.identities.host
    }

    fn compile_options(&self, host: BTreeSet<IpAddr>) -> CompileOptions {
        CompileOptions {
            default_mode: self.options.default_mode,
            pod_mode_annotations: self.options.pod_mode_annotations,
            node_addresses: NodeAddresses::This(host),
        }
    }

    /// Where a pod attaches on this node, checked: annotations (when trusted) choose the kind
    /// and the point, and must name the pod's own; without them its routed device, else its
    /// cgroup directory.
    fn placement(&self, pod: &PodInfo, network: &NodeNetwork, cgroups: &PodCgroups) -> Placement {
        if let (Some(node), Some(pod_node)) = (&self.options.node_name, &pod.node_name)
            && node != pod_node
        {
            return Placement::Elsewhere;
        }
        let trusted = |key: &str| {
            self.options
                .trust_attach_annotations
                .then(|| pod.annotations.get(key))
                .flatten()
        };
        if let Some(iface) = trusted(INTERFACE_ANNOTATION) {
            return match network.check_interface(iface, &pod.ips) {
                Ok(()) => Placement::At(AttachPoint::Tc {
                    iface: iface.clone(),
                }),
                Err(why) => Placement::Refused {
                    claimed: AttachPoint::Tc {
                        iface: iface.clone(),
                    },
                    why: format!("{INTERFACE_ANNOTATION}: {why}"),
                },
            };
        }
        if let Some(path) = trusted(CGROUP_ANNOTATION) {
            let root = &self.options.cgroup_root;
            return match cgroups.check(path, &pod.uid) {
                Ok(path) => Placement::At(AttachPoint::Cgroup { path }),
                Err(why) => Placement::Refused {
                    claimed: AttachPoint::Cgroup {
                        path: root
                            .join(path)
                            .canonicalize()
                            .unwrap_or_else(|_| path.into()),
                    },
                    why: format!("{CGROUP_ANNOTATION}: {why}"),
                },
            };
        }
        if let Some(iface) = network.pod_interface(&pod.ips) {
            return Placement::At(AttachPoint::Tc { iface });
        }
        match cgroups.get(&pod.uid) {
            Some(path) => Placement::At(AttachPoint::Cgroup { path: path.clone() }),
            None => Placement::Elsewhere,
        }
    }

    /// This node's pods and their attachment points. A point goes to the workload that holds
    /// it, else to the first pod that claims it; every other claimant is refused with both
    /// names, and the owner keeps its programs.
    fn local_points<'s>(
        &mut self,
        state: &'s ClusterState,
        network: &NodeNetwork,
    ) -> (BTreeMap<PodKey, LocalPod<'s>>, BTreeMap<PodKey, String>) {
        let cgroups = PodCgroups::scan(&self.options.cgroup_root);
        let node = self.node_fingerprint(network, &cgroups);
        // Placement reads one pod and the node: with the node unchanged, only the pods the
        // source's change log names (or none, when its fingerprint is unchanged) are placed
        // again; 20,000 pods are not looked at for one that changed.
        let mut placements = self.placements.take().filter(|p| p.node == node);
        let changed = placements.as_ref().and_then(|p| {
            if state.pods_version.is_some() && p.pods_version == state.pods_version {
                return Some(BTreeSet::new());
            }
            state.changes.since(p.position).map(|c| c.pods)
        });
        match (&mut placements, changed) {
            (Some(p), Some(changed)) => {
                for key in changed {
                    match state
                        .pods
                        .get(&key)
                        .map(|pod| self.placement(pod, network, &cgroups))
                    {
                        None | Some(Placement::Elsewhere) => p.placed.remove(&key),
                        Some(placement) => p.placed.insert(key, placement),
                    };
                }
            }
            _ => {
                placements = Some(Placements {
                    node,
                    pods_version: None,
                    position: None,
                    placed: state
                        .pods
                        .iter()
                        .filter_map(|(key, pod)| match self.placement(pod, network, &cgroups) {
                            Placement::Elsewhere => None,
                            p => Some((key.clone(), p)),
                        })
                        .collect(),
                })
            }
        }
        let mut placements = placements.expect("just set");
        placements.pods_version = state.pods_version;
        placements.position = state.changes.position();
        let placed = &placements.placed;
        let mut wanted: Vec<(&PodKey, &AttachPoint)> = Vec::new();
        let mut claims: Vec<(&PodKey, &AttachPoint, String)> = Vec::new();
        for (key, placement) in placed {
            match placement {
                Placement::Elsewhere => {}
                Placement::At(point) => wanted.push((key, point)),
                Placement::Refused { claimed, why } => claims.push((key, claimed, why.clone())),
            }
        }
        // Hashed by bytes, not ordered: ordering paths compares them component by component.
        let mut owners: HashMap<PointBytes, &PodKey> = HashMap::new();
        // Both in key order: walked side by side, not looked up.
        let mut held = self.workloads.iter().peekable();
        for (key, point) in &wanted {
            while held.next_if(|(k, _)| k < key).is_some() {}
            if held
                .next_if(|(k, w)| k == key && w.point == **point)
                .is_some()
            {
                owners.insert(PointBytes::of(point), key);
            }
        }
        let mut local = Vec::with_capacity(wanted.len());
        for (key, point) in wanted {
            let owner = *owners.entry(PointBytes::of(point)).or_insert(key);
            if std::ptr::eq(owner, key) {
                if let Some(pod) = state.pods.get(key) {
                    let point = point.clone();
                    local.push((key.clone(), LocalPod { point, pod }));
                }
            } else {
                let why = format!("{} is another workload's attachment point", subject(point));
                claims.push((key, point, why));
            }
        }
        let refused = claims
            .into_iter()
            .map(|(key, claimed, mut why)| {
                let owner = owners
                    .get(&PointBytes::of(claimed))
                    .map(|o| (*o).clone())
                    .or_else(|| rightful_owner(state, network, claimed));
                if let Some(owner) = owner.filter(|o| o != key) {
                    why.push_str(&format!(
                        "; it is {}/{}'s, which keeps it",
                        owner.0, owner.1
                    ));
                }
                (key.clone(), why)
            })
            .collect();
        self.placements = Some(placements);
        // In key order already: built in one pass, with no search per pod.
        (local.into_iter().collect(), refused)
    }

    /// The addresses workloads resolve through (`resolvers_of`).
    pub fn resolvers(&self, state: &ClusterState) -> BTreeSet<IpAddr> {
        resolvers_of(&self.options.dns_servers, state)
    }

    /// Whether the node's own addresses differ from those last written (an address was added
    /// or removed): one netlink dump, cheap enough for every poll.
    /// What placements depend on besides the pods: the node's interfaces and routes, its
    /// pod cgroups, the options.
    fn node_fingerprint(&self, network: &NodeNetwork, cgroups: &PodCgroups) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (network, cgroups, &self.options.node_name).hash(&mut h);
        self.options.trust_attach_annotations.hash(&mut h);
        h.finish()
    }

    /// Whether the node changed since the last reconcile in what that reconcile read of it:
    /// its own addresses (the `host` identity), or its interfaces, routes and pod cgroups
    /// (where pods attach: a pod's interface or cgroup that appears after the pod is attached
    /// at the next poll, not at the next resync).
    pub fn node_changed(&self, state: &ClusterState) -> bool {
        let Ok(network) = NodeNetwork::read() else {
            return false;
        };
        if self.node_addresses(state, network.addresses()) != self.identities.host {
            return true;
        }
        let Some(placed) = &self.placements else {
            return false;
        };
        let cgroups = PodCgroups::scan(&self.options.cgroup_root);
        self.node_fingerprint(&network, &cgroups) != placed.node
    }

    /// The node's own addresses: its network namespace's (`host`) and its Node object's.
    fn node_addresses(&self, state: &ClusterState, mut host: BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
        if let Some(node) = self
            .options
            .node_name
            .as_ref()
            .and_then(|n| state.nodes.get(n))
        {
            host.extend(node.addresses.iter().copied());
        }
        // kube-proxy's IPVS mode binds every ClusterIP to the node (kube-ipvs0): those are
        // Services, never the node's own addresses.
        let services = &self.compiled.service_addresses;
        host.retain(|ip| !services.contains_key(&IpNet::from(*ip)));
        host
    }

    /// Brings the datapath in line with `state`.
    pub fn reconcile(&mut self, state: &ClusterState) -> Result<ReconcileReport, DatapathError> {
        let span = info_span!(
            "reconcile",
            pods = state.pods.len(),
            policies = state.policies.len()
        );
        let _enter = span.enter();
        let mut report = ReconcileReport::default();
        let stats_before = self.datapath.maps.stats;

        let network = NodeNetwork::read().map_err(|source| {
            DatapathError::Maps(MapsError::Io {
                what: "read the node's interfaces and addresses",
                source,
            })
        })?;
        let host = self.node_addresses(state, network.addresses());
        let (local, refused) = self.local_points(state, &network);
        for (key, why) in &refused {
            if self.refused.get(key) != Some(why) {
                warn!(namespace = %key.0, pod = %key.1, reason = %why, "attachment refused");
            }
            report.refused.push(format!("{}/{}: {why}", key.0, key.1));
        }
        self.refused = refused;

        let targets: BTreeSet<PodKey> = local.keys().cloned().collect();
        let options = self.compile_options(host.clone());
        let mut compiled = compile_cached(
            state,
            &mut self.allocator,
            Some(&targets),
            &options,
            &mut self.cache,
        );
        self.allocator.forget_previous();
        let mut mode_sources = BTreeMap::new();
        for (key, p) in compiled.pods.iter_mut() {
            let Some(here) = local.get(key) else { continue };
            let source = match self.overrides.mode_for(here.pod) {
                Some(mode) => {
                    p.mode = mode;
                    "node-override"
                }
                None => mode_and_source(state, here.pod, &options).1,
            };
            mode_sources.insert(key.clone(), source);
        }

        // Workloads that are gone or moved: detach first, so nothing routes to a slot that
        // is being cleared.
        let gone: Vec<PodKey> = self
            .workloads
            .iter()
            .filter(|(k, w)| local.get(*k).is_none_or(|l| l.point != w.point))
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty()
            && let Some(read_counters) = &mut self.before_detach
        {
            read_counters();
        }
        for key in gone {
            let w = self.workloads.remove(&key).expect("listed");
            self.datapath.detach(w.slot)?;
            self.datapath.maps.clear_workload(w.slot)?;
            self.degraded.remove(&key);
            info!(namespace = %key.0, pod = %key.1, slot = w.slot, "detached");
            report.detached.push(format!("{}/{}", key.0, key.1));
        }
        self.degraded.retain(|k, _| local.contains_key(k));

        // 1. make
        let owned: BTreeSet<u32> = self.workloads.values().map(|w| w.slot).collect();
        let mut used = owned.clone();
        // Slots attached by an earlier agent (adopted at load) stay reserved until claimed.
        used.extend(self.datapath.attached().iter().map(|a| a.slot));
        let mut free = (1..agent_common::MAX_WORKLOADS).filter(|s| !used.contains(s));
        let mut staged = Vec::new();
        let mut adopted: BTreeMap<PodKey, AttachMethod> = BTreeMap::new();
        let mut unchanged: Vec<(PodKey, &PodInfo)> = Vec::new();
        for (key, LocalPod { point, pod }) in &local {
            let pod_policy = &compiled.pods[key];
            let mut policy = WorkloadPolicy::from(pod_policy);
            if !state.egress_allowlists.is_empty() {
                policy.egress_allowlist =
                    crate::dns::Allowlist::for_pod(pod, state.egress_allowlists.values())
                        .map(std::sync::Arc::new);
            }
            let slot = match self.workloads.get(key) {
                Some(w) => w.slot,
                None => {
                    let claimed = attach::point_key(point)
                        .ok()
                        .and_then(|route| self.datapath.claim(route, point, &owned));
                    match claimed {
                        Some((slot, method)) => {
                            info!(namespace = %key.0, pod = %key.1, slot, "adopted the running attachment");
                            adopted.insert(key.clone(), method);
                            slot
                        }
                        None => match free.next() {
                            Some(s) => s,
                            None => {
                                report
                                    .errors
                                    .push(format!("{}/{}: no free workload slot", key.0, key.1));
                                continue;
                            }
                        },
                    }
                }
            };
            // Nothing changed for this workload: no entries to stage (the common case of a
            // change elsewhere in a large cluster).
            if self.workloads.get(key).is_some_and(|w| w.policy == policy)
                && !self.degraded.contains_key(key)
            {
                unchanged.push((key.clone(), *pod));
                continue;
            }
            match self.datapath.maps.stage_rules(slot, &policy) {
                Ok(s) => {
                    self.degraded.remove(key);
                    staged.push((key.clone(), point.clone(), slot, policy, Some(s)));
                }
                Err(e) => {
                    warn!(namespace = %key.0, pod = %key.1, error = %e, "rules not applied; the last complete rules stay");
                    report.errors.push(format!("{}/{}: {e}", key.0, key.1));
                    self.degraded.insert(
                        key.clone(),
                        format!("rules could not be written ({e}); the last complete rules stay in force"),
                    );
                    if !self.workloads.contains_key(key) {
                        // New: attached isolated with no rules, denying in its mode.
                        let empty = WorkloadPolicy {
                            ingress: vec![],
                            egress: vec![],
                            services: vec![],
                            ..policy
                        };
                        staged.push((key.clone(), point.clone(), slot, empty, None));
                    }
                }
            }
        }

        // 2. identities of new and changed addresses
        // (Services new since the last compile, bound by IPVS too.)
        let mut host = host;
        host.retain(|ip| !compiled.service_addresses.contains_key(&IpNet::from(*ip)));
        let outside = compiled.outside_services(Some(&host));
        if let Err(e) = self.datapath.maps.set_services_outside(&outside) {
            warn!(error = %e, "Services with a backend outside the cluster not written");
            report
                .errors
                .push(format!("Services with a backend outside the cluster: {e}"));
        }
        // The Services' NodePorts change only with the frontends (1,500 of them at the
        // reference bank's size): the same map, the same ports.
        let mut node_ports = match &self.service_node_ports {
            Some((frontends, ports)) if frontends.ptr_eq(&compiled.frontends) => ports.clone(),
            _ => {
                let ports = compiled.node_ports();
                self.service_node_ports = Some((compiled.frontends.clone(), ports.clone()));
                ports
            }
        };
        // Every pod placed on this node, attached or refused: one whose attachment was
        // refused holds its hostPorts all the same, and two pods on one port must both be
        // seen for the port to be left out.
        let refused_here = self
            .refused
            .keys()
            .filter_map(|k| state.pods.get_key_value(k));
        // In key order, as `check` takes them: of two pods on one port the first is kept.
        let on_node: BTreeMap<&PodKey, &PodInfo> = local
            .iter()
            .map(|(k, l)| (k, l.pod))
            .chain(refused_here)
            .collect();
        for (port, target) in compiled.host_ports(on_node) {
            node_ports.entry(port).or_insert(target);
        }
        if let Err(e) = self.datapath.maps.set_node_ports(&node_ports) {
            warn!(error = %e, "NodePorts not written");
            report.errors.push(format!("NodePorts: {e}"));
        }
        let identities_changed = self.write_identities(&compiled, host, &mut report);
        let resolvers = self.resolvers(state);
        if let Err(e) = self.datapath.maps.set_resolvers(&resolvers) {
            report.errors.push(format!("DNS resolvers: {e}"));
        }

        // 3. configurations, then attachments of new workloads
        let mut bump_rules = Vec::new();
        let mut to_finish = Vec::new();
        for (key, point, slot, policy, staged_rules) in staged {
            let existing = self.workloads.get(&key);
            let fresh = existing.is_none();
            let rules_changed = existing.is_none_or(|w| w.policy.differs_beyond_services(&policy));
            if let Err(e) = self.datapath.maps.write_config(slot, &policy) {
                report.errors.push(format!("{}/{}: {e}", key.0, key.1));
                to_finish.extend(staged_rules);
                continue;
            }
            let method = match existing
                .map(|w| w.method)
                .or_else(|| adopted.get(&key).copied())
            {
                Some(m) => m,
                None => match self.datapath.attach(slot, &point) {
                    Ok(m) => {
                        info!(namespace = %key.0, pod = %key.1, slot, attach = m.as_str(), "attached");
                        report.attached.push(format!("{}/{}", key.0, key.1));
                        m
                    }
                    Err(e) => {
                        warn!(namespace = %key.0, pod = %key.1, error = %e, "attach failed");
                        report.errors.push(format!("{}/{}: {e}", key.0, key.1));
                        to_finish.extend(staged_rules);
                        // Leave nothing half-programmed for a workload that is not attached.
                        let _ = self.datapath.maps.clear_workload(slot);
                        self.degraded.remove(&key);
                        continue;
                    }
                },
            };
            if rules_changed || fresh {
                if !fresh {
                    report.updated.push(format!("{}/{}", key.0, key.1));
                }
                bump_rules.push(slot);
            }
            let pod_policy = &compiled.pods[&key];
            self.workloads.insert(
                key.clone(),
                LocalWorkload {
                    slot,
                    point,
                    method,
                    pod: state.pods[&key].clone(),
                    policy,
                    ingress_policies: pod_policy.ingress_policies.clone(),
                    egress_policies: pod_policy.egress_policies.clone(),
                    mode_source: mode_sources.get(&key).copied().unwrap_or("default"),
                },
            );
            to_finish.extend(staged_rules);
        }

        for (key, pod) in unchanged {
            let pod_policy = &compiled.pods[&key];
            let source = mode_sources.get(&key).copied().unwrap_or("default");
            if let Some(w) = self.workloads.get_mut(&key) {
                if w.pod != *pod {
                    w.pod = pod.clone();
                }
                w.ingress_policies.clone_from(&pod_policy.ingress_policies);
                w.egress_policies.clone_from(&pod_policy.egress_policies);
                w.mode_source = source;
            }
        }

        // Attachments adopted from an earlier agent that no local workload claimed.
        let claimed: BTreeSet<u32> = self.workloads.values().map(|w| w.slot).collect();
        for stale in self.datapath.attached() {
            if !claimed.contains(&stale.slot) {
                self.datapath.detach(stale.slot)?;
                self.datapath.maps.clear_workload(stale.slot)?;
                info!(
                    slot = stale.slot,
                    "detached an adopted attachment no pod claims"
                );
            }
        }

        // 4. break
        for staged_rules in to_finish {
            self.datapath.maps.finish_rules(staged_rules)?;
        }
        self.remove_stale_identities();

        // 5. re-evaluate tracked flows where decisions may differ
        for slot in &bump_rules {
            self.datapath.maps.bump_epoch(*slot)?;
        }
        if identities_changed > 0 {
            for w in self.workloads.values() {
                if !bump_rules.contains(&w.slot) {
                    self.datapath.maps.bump_peer_epoch(w.slot)?;
                }
            }
        }
        self.compiled = compiled;
        report.entries_written = self.datapath.maps.stats.written - stats_before.written;
        report.entries_removed = self.datapath.maps.stats.removed - stats_before.removed;
        // A reconcile that changed nothing (a retry of a refused attachment, every poll) is
        // not news.
        let changed = !report.attached.is_empty()
            || !report.detached.is_empty()
            || !report.updated.is_empty()
            || report.entries_written > 0
            || report.entries_removed > 0;
        if changed {
            info!(
                attached = report.attached.len(),
                detached = report.detached.len(),
                updated = report.updated.len(),
                written = report.entries_written,
                removed = report.entries_removed,
                "reconciled"
            );
        } else {
            debug!("reconciled: nothing changed");
        }
        Ok(report)
    }

    /// Phase 2: writes the identity entries that are new or changed (pods, Service frontends,
    /// the node's addresses, which win over anything else claiming them). Only the addresses
    /// the compile says may have changed are looked at, unless it rebuilt or follows another
    /// compile than the one written last. On a failed write the previous entries are put
    /// back and the node is marked degraded. Returns how many entries changed.
    fn write_identities(
        &mut self,
        compiled: &Compiled,
        host: BTreeSet<IpAddr>,
        report: &mut ReconcileReport,
    ) -> usize {
        let old = &self.identities;
        let delta = compiled.address_changes.as_ref().filter(|c| {
            c.since == old.generation && old.generation != 0 && self.identities_degraded.is_none()
        });
        let candidates: BTreeSet<IpNet> = match delta {
            Some(changes) => {
                let mut nets = changes.nets.clone();
                nets.extend(
                    old.host
                        .symmetric_difference(&host)
                        .map(|ip| IpNet::from(*ip)),
                );
                nets
            }
            None => old
                .merged
                .keys()
                .chain(compiled.addresses.keys())
                .chain(compiled.service_addresses.keys())
                .copied()
                .chain(host.iter().map(|ip| IpNet::from(*ip)))
                .collect(),
        };
        let wanted = |net: &IpNet| -> Option<u32> {
            if net.prefix_len() == net.max_prefix_len() && host.contains(&net.addr()) {
                return Some(agent_common::IDENTITY_HOST);
            }
            compiled
                .service_addresses
                .get(net)
                .or_else(|| compiled.addresses.get(net))
                .copied()
        };
        let mut writes: Vec<(IpNet, u32, Option<u32>)> = Vec::new();
        let mut gone: Vec<IpNet> = Vec::new();
        for net in &candidates {
            let before = old.merged.get(net).copied();
            match wanted(net) {
                want if want == before => {}
                None => gone.push(*net),
                Some(id) => writes.push((*net, id, before)),
            }
        }
        let mut written = self.try_identity_writes(&writes);
        if written.is_err() && !gone.is_empty() {
            // A full table: what is no longer wanted goes first (it is only removed after the
            // rules otherwise, so they never name a missing entry), then the writes again.
            // Without this a full table would stay full for good: the removals waited for
            // writes that could not happen.
            for net in std::mem::take(&mut gone) {
                match self.datapath.maps.remove_identity(net) {
                    Ok(()) => {
                        self.identities.merged.remove(&net);
                        report.identities_changed += 1;
                    }
                    Err(_) => gone.push(net),
                }
            }
            written = self.try_identity_writes(&writes);
        }
        if let Err(e) = written {
            warn!(error = %e, "identity entries not updated; the previous ones stay in force");
            report.errors.push(format!("identities: {e}"));
            self.identities_degraded = Some(format!(
                "identity entries could not be written ({e}); the previous ones stay in force"
            ));
            return report.identities_changed;
        }
        self.identities_degraded = None;
        let changed = report.identities_changed + writes.len() + gone.len();
        report.identities_changed = changed;
        let identities = &mut self.identities;
        for (net, id, _) in writes {
            identities.merged.insert(net, id);
        }
        for net in gone {
            identities.merged.remove(&net);
            identities.stale.push(net);
        }
        identities.generation = compiled.generation;
        identities.host = host;
        changed
    }

    /// Writes identity entries (address, identity, the one it had): all of them, or on the
    /// first failure none (those written are put back) and the error.
    fn try_identity_writes(
        &mut self,
        writes: &[(IpNet, u32, Option<u32>)],
    ) -> Result<(), crate::maps::MapsError> {
        for (done, &(net, id, _)) in writes.iter().enumerate() {
            if let Err(e) = self.datapath.maps.set_identity(net, id) {
                for &(net, _, before) in writes[..done].iter().rev() {
                    let _ = match before {
                        Some(id) => self.datapath.maps.set_identity(net, id),
                        None => self.datapath.maps.remove_identity(net),
                    };
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Phase 4 for identities: entries no longer wanted go (an address that came back in the
    /// meantime stays).
    fn remove_stale_identities(&mut self) {
        for net in std::mem::take(&mut self.identities.stale) {
            if self.identities.merged.contains_key(&net) {
                continue;
            }
            if let Err(e) = self.datapath.maps.remove_identity(net) {
                warn!(address = %net, error = %e, "stale identity not removed; retrying");
                self.identities.stale.push(net);
            }
        }
    }

    /// Applies the current overrides and annotations to the modes of attached workloads:
    /// one map write per workload whose mode changes, no recompile. What `tollgate mode`
    /// does, so a flip takes microseconds, not a reconcile.
    pub fn apply_modes(
        &mut self,
        state: &ClusterState,
    ) -> Result<Vec<(PodKey, Mode, Mode)>, MapsError> {
        let mut changed = Vec::new();
        let options = self.compile_options(BTreeSet::new());
        for (key, w) in self.workloads.iter_mut() {
            let Some(pod) = state.pods.get(key) else {
                continue;
            };
            let (mode, source) = match self.overrides.mode_for(pod) {
                Some(m) => (m, "node-override"),
                None => mode_and_source(state, pod, &options),
            };
            w.mode_source = source;
            if w.policy.mode != mode {
                self.datapath.maps.set_mode(w.slot, mode)?;
                changed.push((key.clone(), w.policy.mode, mode));
                w.policy.mode = mode;
            }
        }
        Ok(changed)
    }

    /// Detaches every workload and forgets its state (`--detach-on-exit`, tests).
    pub fn detach_all(&mut self) -> Result<(), MapsError> {
        for (_, w) in std::mem::take(&mut self.workloads) {
            let _ = self.datapath.detach(w.slot);
            self.datapath.maps.clear_workload(w.slot)?;
        }
        Ok(())
    }
}

/// The addresses workloads resolve through: every `--dns-server`, and the ClusterIPs and
/// endpoints of Service `kube-system/kube-dns` when the cluster state has it. Its endpoints
/// are its EndpointSlices' addresses or, when the state holds none (a `kubectl get` dump has
/// no slices), the pods its selector picks, as for any Service.
pub fn resolvers_of(dns_servers: &[IpAddr], state: &ClusterState) -> BTreeSet<IpAddr> {
    let mut out: BTreeSet<IpAddr> = dns_servers.iter().copied().collect();
    let kube_dns = ("kube-system".to_string(), "kube-dns".to_string());
    let Some(svc) = state.services.get(&kube_dns) else {
        return out;
    };
    out.extend(svc.cluster_ips.iter().copied());
    let mut slices = state
        .endpoint_slices
        .values()
        .filter(|s| s.namespace == svc.namespace && s.service == svc.name)
        .peekable();
    if slices.peek().is_some() {
        for slice in slices {
            for e in &slice.endpoints {
                out.extend(e.addresses.iter().copied());
            }
        }
    } else if let Some(selector) = &svc.selector {
        let pods = state
            .pods
            .range((svc.namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == svc.namespace)
            .map(|(_, pod)| pod)
            .filter(|pod| {
                !pod.host_network && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
            });
        for pod in pods {
            out.extend(pod.ips.iter().copied());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{files::parse_file, store::Store};

    fn state_of(yaml: &str) -> ClusterState {
        let mut store = Store::default();
        for item in parse_file(yaml, std::path::Path::new("t.yaml")).expect("YAML") {
            let (key, object) = item.expect("valid object");
            store.insert(key, object);
        }
        store.into_state()
    }

    /// kube-dns's endpoints are its EndpointSlices' addresses; a state without slices (a
    /// `kubectl get` dump) gets the pods its selector picks, as any Service does.
    #[test]
    fn kube_dns_endpoints_come_from_its_slices_else_its_selector() {
        let pod = |name: &str, labels: &str, ip: &str, host: bool| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: kube-system, labels: {labels}}}\nspec: {{hostNetwork: {host}, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: {ip}}}]}}\n"
            )
        };
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: kube-dns, namespace: kube-system}\nspec: {clusterIPs: [10.96.0.10], selector: {k8s-app: kube-dns}, ports: [{name: dns, port: 53, protocol: UDP}]}\n",
        );
        yaml += &pod("coredns-a", "{k8s-app: kube-dns}", "10.77.0.14", false);
        yaml += &pod("coredns-host", "{k8s-app: kube-dns}", "10.250.0.1", true);
        yaml += &pod("other", "{k8s-app: metrics}", "10.77.0.15", false);
        let servers: Vec<IpAddr> = vec!["203.0.113.53".parse().unwrap()];
        let ips =
            |s: &[&str]| -> BTreeSet<IpAddr> { s.iter().map(|a| a.parse().unwrap()).collect() };

        assert_eq!(
            resolvers_of(&servers, &state_of(&yaml)),
            ips(&["203.0.113.53", "10.96.0.10", "10.77.0.14"]),
            "the selector's pod, not the host-network one nor another app's"
        );
        yaml += "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: kube-dns-x, namespace: kube-system, labels: {kubernetes.io/service-name: kube-dns}}\naddressType: IPv4\nports: [{name: dns, port: 53, protocol: UDP}]\nendpoints: [{addresses: [10.77.0.20], conditions: {ready: true}}]\n";
        assert_eq!(
            resolvers_of(&servers, &state_of(&yaml)),
            ips(&["203.0.113.53", "10.96.0.10", "10.77.0.20"]),
            "slices win over the selector"
        );
        assert_eq!(
            resolvers_of(
                &servers,
                &state_of("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
            ),
            ips(&["203.0.113.53"]),
            "no kube-dns: the flags' servers only"
        );
    }
}
