//! NetworkPolicy semantics: which policies select a pod, whether that isolates it in a
//! direction, and the union of their rules as allow rules over identities and ipBlocks.
//!
//! Traffic between two pods is decided twice: at the source's egress and at the
//! destination's ingress. Each pod's rules here cover one side.

use std::{
    cell::OnceCell,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use agent_common::IDENTITY_FIRST_WORKLOAD;
use imbl::OrdMap;
use ipnet::IpNet;

use super::model::{MODE_ANNOTATION, WorkloadAddresses};
use super::{
    model::{
        ChangeSet, ClusterState, EndpointSliceInfo, Labels, LogPosition, Mode, NamedPort, PeerSpec,
        PodInfo, Policy, PortRef, PortSpec, Protocol, RuleSpec, Selector, ServiceInfo,
    },
    rules::{self, AllowRule, Peer, PortMatch},
    services::{self, Backend, Frontend, ServiceIdentities},
};

/// (namespace, name) of a pod.
pub type PodKey = (String, String);

/// Identities: pods of one workload with the same namespace and labels share one number
/// (two workloads whose pods carry the same labels get one each, so what the kernel counts
/// per peer names the right one); each Service has one per address family. Numbers are
/// stable while the (namespace, labels, workload) or the Service exists and never reused
/// afterwards.
#[derive(Clone, Debug, Default)]
pub struct IdentityAllocator {
    /// By namespace, then labels, then workload: looked up without building a key (20,000
    /// pods per compile).
    ids: BTreeMap<String, BTreeMap<Labels, BTreeMap<String, u32>>>,
    next: u32,
    services: ServiceIdentities,
    /// The numbers an earlier agent gave pod addresses (`seed`), until the first compile
    /// has taken them up.
    previous: BTreeMap<IpAddr, u32>,
    /// Numbers taken from `previous` (a second pod of the same address cannot take one).
    taken: BTreeSet<u32>,
}

impl IdentityAllocator {
    /// The identity of (namespace, labels, workload) for a pod with `addresses`, allocated
    /// on first use: a new one takes the number an earlier agent gave one of them, if
    /// another has not taken it already.
    pub fn get_for(
        &mut self,
        namespace: &str,
        labels: &Labels,
        workload: &str,
        addresses: &[IpAddr],
    ) -> u32 {
        if self.next < IDENTITY_FIRST_WORKLOAD {
            self.next = IDENTITY_FIRST_WORKLOAD;
        }
        if let Some(id) = self
            .ids
            .get(namespace)
            .and_then(|m| m.get(labels))
            .and_then(|w| w.get(workload))
        {
            return *id;
        }
        let previous = addresses
            .iter()
            .filter_map(|ip| self.previous.get(ip))
            .find(|id| !self.taken.contains(*id))
            .copied();
        let id = match previous {
            Some(id) => {
                self.taken.insert(id);
                id
            }
            None => {
                self.next += 1;
                self.next - 1
            }
        };
        self.ids
            .entry(namespace.to_string())
            .or_default()
            .entry(labels.clone())
            .or_default()
            .insert(workload.to_string(), id);
        id
    }

    /// Takes up the identities an earlier agent left in the maps, by address, so that the
    /// first compile gives unchanged pods and Services the numbers they had: the kernel
    /// counted and tracked flows by them while no agent ran, and keeps them after. New
    /// numbers come after every earlier one (never reused).
    pub fn seed(&mut self, previous: BTreeMap<IpAddr, u32>) {
        // Only the two ranges this allocator hands out (not `host`, nor anything else).
        let (services, pods): (BTreeMap<IpAddr, u32>, BTreeMap<IpAddr, u32>) = previous
            .into_iter()
            .filter(|(_, id)| {
                *id >= IDENTITY_FIRST_WORKLOAD
                    && (*id < agent_common::IDENTITY_SERVICE_BASE
                        || agent_common::is_service_identity(*id))
            })
            .partition(|(_, id)| agent_common::is_service_identity(*id));
        if let Some(max) = pods.values().max() {
            self.next = self.next.max(IDENTITY_FIRST_WORKLOAD).max(max + 1);
        }
        self.previous = pods;
        self.services.seed(services);
    }

    /// After the first compile: numbers of the earlier agent not taken up are never given.
    pub fn forget_previous(&mut self) {
        self.previous.clear();
        self.taken.clear();
        self.services.forget_previous();
    }

    /// Forgets (namespace, labels, workload) once no pod has them; the number is never
    /// reused.
    fn release(&mut self, namespace: &str, labels: &Labels, workload: &str) {
        if let Some(m) = self.ids.get_mut(namespace) {
            if let Some(w) = m.get_mut(labels) {
                w.remove(workload);
                if w.is_empty() {
                    m.remove(labels);
                }
            }
            if m.is_empty() {
                self.ids.remove(namespace);
            }
        }
    }

    fn retain(&mut self, used: &BTreeSet<u32>) {
        for m in self.ids.values_mut() {
            for w in m.values_mut() {
                w.retain(|_, id| used.contains(id));
            }
            m.retain(|_, w| !w.is_empty());
        }
        self.ids.retain(|_, m| !m.is_empty());
    }
}

/// One identity and the pods that have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    pub namespace: String,
    pub labels: Labels,
    /// The workload of its pods (`PodInfo::workload`).
    pub workload: String,
    /// Its pods with addresses (shared: several maps hold the same identities).
    pub pods: Arc<Vec<PodKey>>,
}

/// What policy says about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    pub mode: Mode,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    pub ingress: Vec<AllowRule>,
    pub egress: Vec<AllowRule>,
    /// Egress rules toward Service frontends, derived from `egress` and the backends.
    pub services: Vec<AllowRule>,
    /// Policies that select the pod for ingress / egress (`NAMESPACE/NAME`).
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    /// The addresses the pod sends from.
    pub addresses: WorkloadAddresses,
}

impl PodPolicy {
    /// The policies that isolate the pod at its ingress (`ingress`) or egress.
    pub fn isolating(&self, ingress: bool) -> &[String] {
        if ingress {
            &self.ingress_policies
        } else {
            &self.egress_policies
        }
    }
}

/// Whose word a pod's own `tollgate.io/mode` annotation is (`--pod-mode-annotations`). The
/// security team owns enforcement through namespaces and overrides; a pod author only writes
/// the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PodModeAnnotations {
    /// A pod's annotation may only make it stricter (`drop` over `log`).
    #[default]
    Stricter,
    /// A pod's annotation wins either way.
    Any,
}

/// Addresses that are "the node" for a pod: its traffic with them is always allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeAddresses {
    /// The agent: every compiled pod runs on this node, whose addresses these are.
    This(BTreeSet<IpAddr>),
    /// Offline (`check`): each pod's node by `spec.nodeName`, from the Node objects.
    PerNode(BTreeMap<String, BTreeSet<IpAddr>>),
}

impl Default for NodeAddresses {
    fn default() -> Self {
        NodeAddresses::This(BTreeSet::new())
    }
}

impl NodeAddresses {
    /// The addresses of the Node objects of a cluster state, by node name.
    pub fn from_nodes(state: &ClusterState) -> Self {
        NodeAddresses::PerNode(
            state
                .nodes
                .iter()
                .map(|(n, info)| (n.clone(), info.addresses.iter().copied().collect()))
                .collect(),
        )
    }

    /// The addresses of the node a pod scheduled on `node` (`spec.nodeName`) runs on.
    pub fn of(&self, node: Option<&str>) -> Option<&BTreeSet<IpAddr>> {
        match self {
            NodeAddresses::This(set) => Some(set),
            NodeAddresses::PerNode(by_node) => node.and_then(|n| by_node.get(n)),
        }
    }
}

/// How the compiler decides modes and what the node is.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Mode of pods without annotations (`--default-mode`).
    pub default_mode: Mode,
    pub pod_mode_annotations: PodModeAnnotations,
    pub node_addresses: NodeAddresses,
}

/// The compiled cluster. The identity and frontend maps are persistent (`imbl`): shared
/// between compiles, and changed in place, node by node, for the pods and Services that
/// changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Pod address (/32, /128) to identity: the `IDENTITIES` map.
    pub addresses: OrdMap<IpNet, u32>,
    /// Service virtual address (/32, /128) to the frontend's identity, also in `IDENTITIES`.
    pub service_addresses: OrdMap<IpNet, u32>,
    /// Service frontends (one per Service and address family with a virtual address), by
    /// identity.
    pub frontends: OrdMap<u32, Frontend>,
    pub pod_identity: OrdMap<PodKey, u32>,
    pub identities: OrdMap<u32, IdentityInfo>,
    /// Per compiled pod.
    pub pods: BTreeMap<PodKey, PodPolicy>,
    /// Per frontend with such backends: its backend addresses that no pod of the cluster
    /// holds (a slice written by hand, or a node's address without a `targetRef`). Those
    /// that are not the source's node are outside the cluster: an EgressAllowlist's to
    /// decide (`outside_services`).
    pub podless_backends: OrdMap<u32, Vec<IpAddr>>,
    /// Rule ids (map values) to the policy they came from (empty: a free id).
    pub rule_policies: Arc<Vec<Arc<str>>>,
    /// Pod addresses to their pod.
    pub address_pods: OrdMap<IpAddr, PodKey>,
    /// Numbers the compiles of one cache, so a reader of `address_changes` knows whether
    /// it holds the compile they are relative to.
    pub generation: u64,
    /// The addresses (pod or Service) whose identity may differ from compile
    /// `since`'s; `None` after a rebuild: compare everything.
    pub address_changes: Option<AddressChanges>,
}

/// Addresses whose identity may differ from an earlier compile's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressChanges {
    pub since: u64,
    pub nets: BTreeSet<IpNet>,
}

impl Compiled {
    /// The policy a rule id came from.
    pub fn policy_of_rule(&self, rule: u32) -> Option<&str> {
        self.rule_policies
            .get(rule as usize)
            .map(|name| &**name)
            .filter(|name| !name.is_empty())
    }

    /// The NodePorts of every Service, per family: the frontend of that family each leads
    /// to and the Service port. Two Services cannot share a NodePort (the API server
    /// allocates each once); should a cluster state hold such, the first by identity wins.
    pub fn node_ports(&self) -> crate::maps::NodePorts {
        let mut out = crate::maps::NodePorts::new();
        for (identity, frontend) in &self.frontends {
            let Some(first) = frontend.addresses.first() else {
                continue;
            };
            let family = rules::family_of(*first);
            for p in &frontend.ports {
                let Some(node_port) = p.node_port else {
                    continue;
                };
                let key = agent_common::NodePortKey {
                    port: node_port,
                    proto: p.protocol.number(),
                    family,
                };
                out.entry(key).or_insert(agent_common::NodePortTarget {
                    identity: *identity,
                    port: p.port,
                    _pad: 0,
                });
            }
        }
        out
    }

    /// The hostPorts of `pods` (one node's): the CNI's portmap DNATs a connection to one on
    /// the node's addresses to the pod, past the caller's hooks, as kube-proxy does a
    /// NodePort's; it leads to the pod's identity and container port.
    pub fn host_ports<'a>(
        &self,
        pods: impl IntoIterator<Item = (&'a PodKey, &'a PodInfo)>,
    ) -> crate::maps::NodePorts {
        self.host_port_claims(pods)
            .into_iter()
            .map(|(key, (_, target))| (key, target))
            .collect()
    }

    /// `host_ports`, with the pod behind each.
    ///
    /// The map's keys name no address, so a hostPort bound to one address (`hostIP`) is
    /// taken on every address of its family: stricter on the node's other addresses (a
    /// call to the port there is decided as one to the pod), where leaving it out would let
    /// a call to the bound address pass as one to the node. One port bound to different
    /// addresses leads nowhere (no one pod and port are behind it: decided as the node's,
    /// which is allowed); a hostPort on every address wins over one bound to a single
    /// address; of two on every address (which the scheduler never places on one node) the
    /// first pod's is kept.
    pub fn host_port_claims<'a>(
        &self,
        pods: impl IntoIterator<Item = (&'a PodKey, &'a PodInfo)>,
    ) -> BTreeMap<agent_common::NodePortKey, (PodKey, agent_common::NodePortTarget)> {
        let mut every = BTreeMap::new();
        let mut bound = BTreeMap::new();
        for (key, pod) in pods {
            // Most pods have no hostPort: they cost no lookup among the cluster's pods.
            if pod.host_network || (pod.host_ports.is_empty() && pod.host_ports_bound.is_empty()) {
                continue;
            }
            let Some(identity) = self.pod_identity.get(key) else {
                continue;
            };
            let families: BTreeSet<u8> = pod.ips.iter().copied().map(rules::family_of).collect();
            let claim = |protocol: &Protocol, port: u16, family: u8, container_port: u16| {
                let target = agent_common::NodePortTarget {
                    identity: *identity,
                    port: container_port,
                    _pad: 0,
                };
                let port = agent_common::NodePortKey {
                    port,
                    proto: protocol.number(),
                    family,
                };
                (port, (key.clone(), target))
            };
            for family in &families {
                for (protocol, host_port, container_port) in &pod.host_ports {
                    let (port, claim) = claim(protocol, *host_port, *family, *container_port);
                    every.entry(port).or_insert(claim);
                }
            }
            for (protocol, host_port, container_port, ip) in &pod.host_ports_bound {
                let family = rules::family_of(*ip);
                if !families.contains(&family) {
                    continue;
                }
                let (port, claim) = claim(protocol, *host_port, family, *container_port);
                // 0.0.0.0 and :: are every address of their family.
                if ip.is_unspecified() {
                    every.entry(port).or_insert(claim);
                    continue;
                }
                bound
                    .entry(port)
                    .and_modify(|c: &mut Option<(PodKey, agent_common::NodePortTarget)>| {
                        if c.as_ref() != Some(&claim) {
                            *c = None;
                        }
                    })
                    .or_insert(Some(claim));
            }
        }
        for (port, claim) in bound {
            if let Some(claim) = claim {
                every.entry(port).or_insert(claim);
            }
        }
        every
    }

    /// The frontends with a backend outside the cluster for a source on the node whose
    /// addresses are `node` (a backend there is the node itself).
    pub fn outside_services(&self, node: Option<&BTreeSet<IpAddr>>) -> BTreeSet<u32> {
        self.podless_backends
            .keys()
            .filter(|id| self.outside_backends(**id, node).next().is_some())
            .copied()
            .collect()
    }

    /// The backends of a frontend that are outside the cluster for a source on the node
    /// whose addresses are `node`.
    pub fn outside_backends<'a>(
        &'a self,
        frontend: u32,
        node: Option<&'a BTreeSet<IpAddr>>,
    ) -> impl Iterator<Item = IpAddr> + 'a {
        self.podless_backends
            .get(&frontend)
            .into_iter()
            .flatten()
            .filter(move |ip| node.is_none_or(|n| !n.contains(ip)))
            .copied()
    }

    /// The pod that owns an address, if any.
    pub fn pod_of_address(&self, ip: IpAddr) -> Option<&PodKey> {
        self.address_pods.get(&ip)
    }

    /// The frontend of a Service virtual address, if it is one.
    pub fn frontend_of_address(&self, ip: IpAddr) -> Option<&Frontend> {
        self.service_addresses
            .get(&single_address(ip))
            .and_then(|id| self.frontends.get(id))
    }

    /// The frontend of a Service identity.
    pub fn frontend(&self, identity: u32) -> Option<&Frontend> {
        self.frontends.get(&identity)
    }
}

/// The mode a pod runs in, from annotations: pod, then namespace, then the default.
pub fn mode_of(state: &ClusterState, pod: &PodInfo, options: &CompileOptions) -> Mode {
    mode_and_source(state, pod, options).0
}

/// The mode of a pod and where it comes from: `cluster-override` (a `ModeOverride`), `pod`,
/// `namespace` or `default`. The namespace's annotation is authoritative; the pod's own may
/// only make it stricter unless `PodModeAnnotations::Any`. Values that are not modes are
/// ignored. (A node-local override, above all of these, is the reconciler's.)
pub fn mode_and_source(
    state: &ClusterState,
    pod: &PodInfo,
    options: &CompileOptions,
) -> (Mode, &'static str) {
    if let Some(o) = state.mode_override_for(pod) {
        return (o.mode, "cluster-override");
    }
    let parse = |a: Option<&String>| a.and_then(|v| v.parse::<Mode>().ok());
    let base = match state
        .namespaces
        .get(&pod.namespace)
        .and_then(|ns| parse(ns.annotations.get(MODE_ANNOTATION)))
    {
        Some(m) => (m, "namespace"),
        None => (options.default_mode, "default"),
    };
    // The pod's own annotation is the source whenever it holds (the same mode as its
    // namespace or default included), as the precedence goes: pod before namespace. A
    // `log` annotation holds only with `--pod-mode-annotations=any`: otherwise it is
    // ignored, whatever mode its namespace gives.
    match parse(pod.annotations.get(MODE_ANNOTATION)) {
        Some(Mode::Drop) => (Mode::Drop, "pod"),
        Some(Mode::Log) if options.pod_mode_annotations == PodModeAnnotations::Any => {
            (Mode::Log, "pod")
        }
        _ => base,
    }
}

/// The addresses a pod sends from: its pod IPs, or the node's for a host-network pod.
fn addresses_of(pod: &PodInfo) -> WorkloadAddresses {
    if pod.host_network {
        WorkloadAddresses::Host
    } else {
        WorkloadAddresses::Pod(pod.ips.clone())
    }
}

struct Context<'a> {
    state: &'a ClusterState,
    /// Every identity; those without addressed pods are never peers.
    identities: &'a OrdMap<u32, IdentityInfo>,
    rule_ids: &'a BTreeMap<String, u32>,
    /// Labels of every namespace that has pods, computed once per compile.
    namespace_labels: &'a BTreeMap<String, Labels>,
    /// Identities that can be peers, by namespace: built when a pod is first compiled, so
    /// a peer's namespaces are matched once, not once per identity.
    peers_by_namespace: OnceCell<BTreeMap<&'a str, Vec<(u32, &'a IdentityInfo)>>>,
}

impl Context<'_> {
    /// Whether a pod peer of a policy in `policy_ns` selects the pods of an identity.
    fn peer_selects(
        &self,
        policy_ns: &str,
        namespaces: &Option<Selector>,
        pods: &Option<Selector>,
        info: &IdentityInfo,
    ) -> bool {
        self.namespace_selected(policy_ns, namespaces, &info.namespace)
            && pods.as_ref().is_none_or(|sel| sel.matches(&info.labels))
    }

    /// Whether a peer's namespaceSelector (its policy's namespace when it has none) takes
    /// in `namespace`.
    fn namespace_selected(
        &self,
        policy_ns: &str,
        namespaces: &Option<Selector>,
        namespace: &str,
    ) -> bool {
        match namespaces {
            None => namespace == policy_ns,
            Some(sel) => match self.namespace_labels.get(namespace) {
                Some(labels) => sel.matches(labels),
                // An identity that just went with the last pods of its namespace.
                None => sel.matches(&self.state.namespace_labels(namespace)),
            },
        }
    }

    /// Identities selected by a pod peer of a policy in `policy_ns`.
    fn selected_identities(
        &self,
        policy_ns: &str,
        namespaces: &Option<Selector>,
        pods: &Option<Selector>,
    ) -> Vec<u32> {
        let by_namespace = self.peers_by_namespace.get_or_init(|| {
            let mut index: BTreeMap<&str, Vec<(u32, &IdentityInfo)>> = BTreeMap::new();
            for (id, info) in self.identities.iter().filter(|(_, i)| !i.pods.is_empty()) {
                index.entry(&info.namespace).or_default().push((*id, info));
            }
            index
        });
        let mut selected: Vec<u32> = by_namespace
            .iter()
            .filter(|(ns, _)| self.namespace_selected(policy_ns, namespaces, ns))
            .flat_map(|(_, identities)| identities)
            .filter(|(_, info)| pods.as_ref().is_none_or(|sel| sel.matches(&info.labels)))
            .map(|(id, _)| *id)
            .collect();
        selected.sort_unstable();
        selected
    }

    fn pod(&self, key: &PodKey) -> Option<&PodInfo> {
        self.state.pods.get(key)
    }
}

fn port_match(spec: &PortSpec, number: Option<u16>) -> Option<PortMatch> {
    let proto = spec.protocol.number();
    match (&spec.port, number) {
        (PortRef::Any, _) => Some(PortMatch::Protocol(proto)),
        (PortRef::Range(first, last), _) => Some(PortMatch::Range {
            proto,
            first: *first,
            last: *last,
        }),
        (PortRef::Named(_), Some(n)) => Some(PortMatch::Range {
            proto,
            first: n,
            last: n,
        }),
        (PortRef::Named(_), None) => None,
    }
}

fn single_address(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Whether an address is in an ipBlock: inside `cidr`, outside every `except`.
fn in_block(cidr: &IpNet, except: &[IpNet], ip: &IpAddr) -> bool {
    cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
}

/// Rules allowing each address of `pod` (those `keep` accepts) on the pod's own number for
/// the named port `name`, if it has one.
fn per_address_rules(
    pod: &PodInfo,
    spec: &PortSpec,
    name: &str,
    rule_id: u32,
    keep: impl Fn(&IpAddr) -> bool,
    out: &mut Vec<AllowRule>,
) {
    let Some(n) = pod.named_port(name, spec.protocol) else {
        return;
    };
    for ip in pod.ips.iter().filter(|ip| keep(ip)) {
        out.push(AllowRule {
            peer: Peer::Cidr {
                net: single_address(*ip),
                except: vec![],
            },
            ports: port_match(spec, Some(n)).expect("resolved"),
            rule_id,
        });
    }
}

/// Allow rules of one ingress rule of `policy` for pod `target`.
fn ingress_rules(
    ctx: &Context,
    policy: &Policy,
    rule: &RuleSpec,
    target: &PodInfo,
    rule_id: u32,
    out: &mut Vec<AllowRule>,
) {
    // Named ports resolve against the destination: the pod itself.
    let ports: Vec<PortMatch> = if rule.ports.is_empty() {
        vec![PortMatch::Any]
    } else {
        rule.ports
            .iter()
            .filter_map(|p| {
                let named = match &p.port {
                    PortRef::Named(n) => target.named_port(n, p.protocol),
                    _ => None,
                };
                port_match(p, named)
            })
            .collect()
    };
    if ports.is_empty() {
        return;
    }
    let peers = peers_of(ctx, policy, rule);
    for peer in peers {
        for ports in &ports {
            out.push(AllowRule {
                peer: peer.clone(),
                ports: *ports,
                rule_id,
            });
        }
    }
}

/// The peers a rule names: identities and ipBlocks; everyone when it names none.
fn peers_of(ctx: &Context, policy: &Policy, rule: &RuleSpec) -> Vec<Peer> {
    if rule.peers.is_empty() {
        return Peer::everyone().to_vec();
    }
    let mut out = Vec::new();
    for peer in &rule.peers {
        match peer {
            PeerSpec::Pods { namespaces, pods } => out.extend(
                ctx.selected_identities(&policy.namespace, namespaces, pods)
                    .into_iter()
                    .map(Peer::Identity),
            ),
            PeerSpec::IpBlock { cidr, except } => out.push(Peer::Cidr {
                net: *cidr,
                except: except.clone(),
            }),
        }
    }
    out
}

/// Allow rules of one egress rule. Named ports resolve against each destination pod: where
/// the pods of one identity disagree on the number, the rule goes per pod address.
fn egress_rules(
    ctx: &Context,
    policy: &Policy,
    rule: &RuleSpec,
    rule_id: u32,
    out: &mut Vec<AllowRule>,
) {
    let (numbered, named): (Vec<&PortSpec>, Vec<&PortSpec>) = rule
        .ports
        .iter()
        .partition(|p| !matches!(p.port, PortRef::Named(_)));
    if rule.ports.is_empty() || !numbered.is_empty() {
        let ports: Vec<PortMatch> = if rule.ports.is_empty() {
            vec![PortMatch::Any]
        } else {
            numbered
                .iter()
                .filter_map(|p| port_match(p, None))
                .collect()
        };
        for peer in peers_of(ctx, policy, rule) {
            for ports in &ports {
                out.push(AllowRule {
                    peer: peer.clone(),
                    ports: *ports,
                    rule_id,
                });
            }
        }
    }
    if named.is_empty() {
        return;
    }
    // Destination pods of the rule, grouped by identity.
    let mut groups: BTreeMap<u32, Vec<&PodInfo>> = BTreeMap::new();
    let mut block_pods: Vec<&PodInfo> = Vec::new();
    let everyone = rule.peers.is_empty();
    for (id, info) in ctx.identities.iter().filter(|(_, i)| !i.pods.is_empty()) {
        let selected = everyone
            || rule.peers.iter().any(|p| match p {
                PeerSpec::Pods { namespaces, pods } => {
                    ctx.peer_selects(&policy.namespace, namespaces, pods, info)
                }
                PeerSpec::IpBlock { .. } => false,
            });
        if selected {
            groups.insert(*id, info.pods.iter().filter_map(|k| ctx.pod(k)).collect());
        }
    }
    for p in rule.peers.iter() {
        if let PeerSpec::IpBlock { cidr, except } = p {
            for pod in ctx.state.pods.values() {
                if pod.ips.iter().any(|ip| in_block(cidr, except, ip)) {
                    block_pods.push(pod);
                }
            }
        }
    }
    for spec in named {
        let PortRef::Named(name) = &spec.port else {
            continue;
        };
        for (id, pods) in &groups {
            let numbers: BTreeSet<Option<u16>> = pods
                .iter()
                .map(|p| p.named_port(name, spec.protocol))
                .collect();
            match numbers.iter().collect::<Vec<_>>().as_slice() {
                [Some(n)] => out.push(AllowRule {
                    peer: Peer::Identity(*id),
                    ports: port_match(spec, Some(*n)).expect("resolved"),
                    rule_id,
                }),
                _ => {
                    for pod in pods {
                        per_address_rules(pod, spec, name, rule_id, |_| true, out);
                    }
                }
            }
        }
        for pod in &block_pods {
            let in_a_block = |ip: &IpAddr| {
                rule.peers.iter().any(|p| match p {
                    PeerSpec::IpBlock { cidr, except } => in_block(cidr, except, ip),
                    _ => false,
                })
            };
            per_address_rules(pod, spec, name, rule_id, in_a_block, out);
        }
    }
}

/// What a pod's compiled policy depends on beyond its own policies: the identities (with the
/// namespace labels they are matched by) and, for named ports and ipBlocks, every pod's
/// addresses and ports. When this and a pod's inputs are unchanged, its result is reused.
#[derive(Clone, Debug, Default)]
pub struct CompileCache {
    universe: u64,
    /// Per pod: what its result was compiled from, and the result.
    pods: BTreeMap<PodKey, (PodInputs, PodPolicy)>,
    policy_versions: PolicyVersions,
    /// Where the parts below stand in the source's change log.
    position: Option<LogPosition>,
    /// Identities as of the last compile, and the `pods_version` they came from.
    identities: Option<(u64, IdentityPart)>,
    frontends: Option<FrontendsPart>,
    services: BTreeMap<PodKey, ServiceRulesCache>,
    rule_ids: RuleIds,
    /// Of the last compile's address maps (`Compiled::generation`).
    generation: u64,
    /// The policies with an egress rule to a named port (their pods' rules depend on every
    /// pod's named ports); `None` until the first compile.
    named_egress_ports: Option<BTreeSet<PodKey>>,
    /// The options a mode is worked out with, as of the last compile.
    mode_options: Option<(Mode, PodModeAnnotations)>,
}

/// What a pod's result was compiled from, besides the identities (`depends_on`). Compared
/// field by field: cheaper than hashing them, and no collision can keep a stale result.
#[derive(Clone, Debug)]
struct PodInputs {
    labels: Labels,
    ports: Vec<NamedPort>,
    ips: Vec<IpAddr>,
    host_network: bool,
    /// Versions (`PolicyVersions`) of the policies that select it, in key order.
    policies: Vec<u64>,
    /// Those policies by (namespace, name).
    selecting: Vec<PodKey>,
    mode: Mode,
}

impl PodInputs {
    fn of(pod: &PodInfo, selecting: &[&Policy], policies: Vec<u64>, mode: Mode) -> PodInputs {
        PodInputs {
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
            ips: pod.ips.clone(),
            host_network: pod.host_network,
            policies,
            selecting: selecting
                .iter()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect(),
            mode,
        }
    }

    fn same(&self, pod: &PodInfo, policies: &[u64], mode: Mode) -> bool {
        self.policies == policies
            && self.mode == mode
            && self.host_network == pod.host_network
            && self.ips == pod.ips
            && self.labels == pod.labels
            && self.ports == pod.ports
    }
}

/// A version number per policy that selects a compiled pod: it moves when the policy
/// changes, or the namespaces its namespaceSelectors match do. Found by comparing the policy
/// with the one of the last compile (a fraction of the cost of hashing it); selectors are
/// matched again only when namespace labels changed.
#[derive(Clone, Debug, Default)]
struct PolicyVersions {
    /// By namespace and name: the policy, the `namespaces_version` and the namespaces its
    /// selectors matched then, its version.
    by_policy: BTreeMap<String, BTreeMap<String, PolicyVersion>>,
    next: u64,
}

#[derive(Clone, Debug)]
struct PolicyVersion {
    policy: Policy,
    namespaces_version: u64,
    namespaces: Vec<u64>,
    version: u64,
}

impl PolicyVersions {
    fn version(
        &mut self,
        policy: &Policy,
        namespaces_version: u64,
        namespaces: impl FnOnce() -> Vec<u64>,
    ) -> u64 {
        let known = self
            .by_policy
            .get_mut(&policy.namespace)
            .and_then(|by_name| by_name.get_mut(&policy.name))
            .filter(|known| known.policy == *policy);
        if let Some(known) = known {
            if known.namespaces_version == namespaces_version {
                return known.version;
            }
            let namespaces = namespaces();
            known.namespaces_version = namespaces_version;
            if known.namespaces == namespaces {
                return known.version;
            }
            self.next += 1;
            known.namespaces = namespaces;
            known.version = self.next;
            return self.next;
        }
        self.next += 1;
        let known = PolicyVersion {
            policy: policy.clone(),
            namespaces_version,
            namespaces: namespaces(),
            version: self.next,
        };
        self.by_policy
            .entry(policy.namespace.clone())
            .or_default()
            .insert(policy.name.clone(), known);
        self.next
    }

    /// Forgets those of the policies `changed` that are gone.
    fn forget_gone(&mut self, policies: &BTreeMap<PodKey, Policy>, changed: &BTreeSet<PodKey>) {
        for key in changed.iter().filter(|k| !policies.contains_key(*k)) {
            if let Some(by_name) = self.by_policy.get_mut(&key.0) {
                by_name.remove(&key.1);
                if by_name.is_empty() {
                    self.by_policy.remove(&key.0);
                }
            }
        }
    }

    /// Forgets the policies that are gone.
    fn retain(&mut self, policies: &BTreeMap<PodKey, Policy>) {
        self.by_policy.retain(|namespace, by_name| {
            by_name.retain(|name, _| policies.contains_key(&(namespace.clone(), name.clone())));
            !by_name.is_empty()
        });
    }
}

/// An egress-isolated pod's Service rules by frontend, with a hash of what all of them
/// depend on (its egress rules, its node's addresses) and the compile that wrote them.
#[derive(Clone, Debug, Default)]
struct ServiceRulesCache {
    input: u64,
    generation: u64,
    by_frontend: BTreeMap<u32, Vec<AllowRule>>,
}

/// Rule ids (the value of `POLICY` entries, naming the policy that allowed a flow): a policy
/// keeps its id while it exists, so adding or deleting one policy changes no other pod's
/// compiled rules, and their map entries are not rewritten. Ids of deleted policies are
/// reused: a pod whose rules held one is recompiled anyway (its selecting policies changed).
#[derive(Clone, Debug, Default)]
struct RuleIds {
    ids: BTreeMap<String, u32>,
    /// The policies `ids` was last brought in line with.
    keys: BTreeSet<PodKey>,
    free: Vec<u32>,
    next: u32,
    /// Id to policy (`Compiled::rule_policies`). Names are shared: the previous compile
    /// still holds the list when a policy comes or goes, and copying it copies pointers.
    policies: Arc<Vec<Arc<str>>>,
}

impl RuleIds {
    /// Brings the ids in line with the policies that exist now: one walk of both key sets
    /// (same order), then only the policies added or gone are looked at.
    fn sync(&mut self, policies: &BTreeMap<PodKey, Policy>) {
        let (mut added, mut gone) = (Vec::new(), Vec::new());
        let mut old = self.keys.iter().peekable();
        for key in policies.keys() {
            while let Some(o) = old.next_if(|o| *o < key) {
                gone.push(o.clone());
            }
            if old.next_if(|o| *o == key).is_none() {
                added.push(key.clone());
            }
        }
        gone.extend(old.cloned());
        self.apply(added, gone);
    }

    /// `sync` when only the policies `changed` (the change log's) may have come or gone.
    fn sync_changed(&mut self, policies: &BTreeMap<PodKey, Policy>, changed: &BTreeSet<PodKey>) {
        let (mut added, mut gone) = (Vec::new(), Vec::new());
        for key in changed {
            match (policies.contains_key(key), self.keys.contains(key)) {
                (true, false) => added.push(key.clone()),
                (false, true) => gone.push(key.clone()),
                _ => {}
            }
        }
        self.apply(added, gone);
    }

    fn apply(&mut self, added: Vec<PodKey>, gone: Vec<PodKey>) {
        if added.is_empty() && gone.is_empty() {
            return;
        }
        let name = |(ns, name): &PodKey| format!("{ns}/{name}");
        let by_id = Arc::make_mut(&mut self.policies);
        for key in gone {
            if let Some(id) = self.ids.remove(&name(&key)) {
                self.free.push(id);
                by_id[id as usize] = Arc::from("");
            }
            self.keys.remove(&key);
        }
        // Lowest free ids first, so the id space stays dense.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        for key in added {
            let id = self.free.pop().unwrap_or_else(|| {
                self.next += 1;
                self.next - 1
            });
            if by_id.len() <= id as usize {
                by_id.resize(id as usize + 1, Arc::from(""));
            }
            let name = name(&key);
            by_id[id as usize] = Arc::from(name.as_str());
            self.ids.insert(name, id);
            self.keys.insert(key);
        }
        while by_id.last().is_some_and(|name| name.is_empty()) {
            by_id.pop();
        }
    }
}

fn next_namespaces_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Which of the pods claiming one address names it (normally there is one; two while an
/// address is reused before the old pod's deletion is seen, or when a pod is written with
/// another's address): a pod not being deleted over one that is, then the newer, then the
/// greater `NAMESPACE/NAME`. So a stale or terminating pod, or an old object naming a live
/// pod's address, never lends that pod its labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct ClaimRank {
    live: bool,
    created: i64,
}

impl ClaimRank {
    fn of(pod: &PodInfo) -> ClaimRank {
        ClaimRank {
            live: !pod.terminating,
            created: pod.created,
        }
    }
}

/// Everything derived from pods and namespaces alone, kept up to date pod by pod when the
/// source's change log says which pods changed, rebuilt when it cannot. The maps are
/// persistent (`imbl`): handing them to a compile result is O(1), and one pod changes
/// O(log n) nodes of them, where copying them cost milliseconds at 20,000 pods.
#[derive(Clone, Debug, Default)]
struct IdentityPart {
    addresses: OrdMap<IpNet, u32>,
    pod_identity: OrdMap<PodKey, u32>,
    identities: OrdMap<u32, IdentityInfo>,
    address_pods: OrdMap<IpAddr, PodKey>,
    /// Every pod claiming an address (normally one), by rank: the greatest wins.
    claims: BTreeMap<IpAddr, BTreeSet<(ClaimRank, PodKey)>>,
    /// The rank each pod claimed its addresses with.
    ranks: BTreeMap<PodKey, ClaimRank>,
    /// Per pod: the addresses it claimed and a hash of its named ports.
    seen: BTreeMap<PodKey, (Vec<IpAddr>, u64)>,
    /// Per identity: how many pods have it, addressed or not. It is released at zero.
    members: BTreeMap<u32, usize>,
    namespace_labels: BTreeMap<String, Labels>,
    /// Moves whenever `namespace_labels` changes (unique across parts, as a rebuild starts
    /// a new one): what namespaceSelectors match is worked out again only then.
    namespaces_version: u64,
    /// Hash of the identities that can be peers (with pods that have addresses), as of the
    /// last rebuild: a rebuild that finds them changed recompiles every pod. Changes applied
    /// in place leave it, and recompile the pods whose policies select a moved identity.
    peers_key: u64,
    /// Hash of every pod's addresses and named ports, likewise (named egress ports are
    /// resolved on the destination pods).
    ports_key: u64,
    /// Changes were applied in place since the rebuild (`peers_key` and `ports_key` are
    /// stale): the next rebuild recompiles every pod.
    changed_in_place: bool,
}

impl IdentityPart {
    fn rebuild(state: &ClusterState, allocator: &mut IdentityAllocator) -> IdentityPart {
        let mut part = IdentityPart::default();
        let mut ignored = BTreeSet::new();
        for (key, pod) in &state.pods {
            part.add_pod(key, pod, allocator, &mut ignored);
        }
        allocator.retain(&part.members.keys().copied().collect());
        part.peers_key = hash_of(
            &part
                .peers()
                .map(|(id, i)| (*id, &i.namespace, &i.labels))
                .collect::<Vec<_>>(),
        );
        part.ports_key = hash_of(&part.seen);
        part.namespace_labels = part.namespace_labels(state);
        part.namespaces_version = next_namespaces_version();
        part
    }

    /// Applies the pods that changed (added, removed, relabelled, readdressed) and the
    /// namespaces whose labels changed. `nets` gets every address whose identity may differ,
    /// `touched` every address a changed pod had or has.
    fn apply(
        &mut self,
        state: &ClusterState,
        changes: &ChangeSet,
        allocator: &mut IdentityAllocator,
        nets: &mut BTreeSet<IpNet>,
        touched: &mut BTreeSet<IpAddr>,
        moved: &mut BTreeMap<u32, IdentityInfo>,
    ) {
        let mut emptied = BTreeSet::new();
        for key in &changes.pods {
            if let Some(id) = self.pod_identity.get(key) {
                moved.insert(*id, self.identities[id].clone());
            }
            if let Some((ips, _)) = self.seen.get(key) {
                touched.extend(ips);
            }
            self.remove_pod(key, &mut emptied, nets);
            if let Some(pod) = state.pods.get(key) {
                touched.extend(&pod.ips);
                self.add_pod(key, pod, allocator, nets);
            }
            if let Some(id) = self.pod_identity.get(key) {
                moved.insert(*id, self.identities[id].clone());
            }
        }
        self.changed_in_place = true;
        // Released only now: a pod whose labels did not change keeps its identity.
        for id in emptied {
            if self.members.get(&id) == Some(&0) {
                self.members.remove(&id);
                if let Some(info) = self.identities.remove(&id) {
                    allocator.release(&info.namespace, &info.labels, &info.workload);
                }
            }
        }
        // Only namespaces that changed, or whose pods did, can enter, leave or relabel.
        let namespaces: BTreeSet<&String> = changes
            .namespaces
            .iter()
            .chain(changes.pods.iter().map(|(ns, _)| ns))
            .collect();
        for ns in namespaces {
            let listed =
                state.namespaces.contains_key(ns) || self.peers().any(|(_, i)| i.namespace == *ns);
            let labels = listed.then(|| state.namespace_labels(ns));
            if self.namespace_labels.get(ns) != labels.as_ref() {
                match labels {
                    Some(labels) => self.namespace_labels.insert(ns.clone(), labels),
                    None => self.namespace_labels.remove(ns),
                };
                self.namespaces_version = next_namespaces_version();
            }
        }
    }

    fn add_pod(
        &mut self,
        key: &PodKey,
        pod: &PodInfo,
        allocator: &mut IdentityAllocator,
        nets: &mut BTreeSet<IpNet>,
    ) {
        let id = allocator.get_for(&pod.namespace, &pod.labels, &pod.workload, &pod.ips);
        self.pod_identity.insert(key.clone(), id);
        *self.members.entry(id).or_default() += 1;
        let info = self.identities.entry(id).or_insert_with(|| IdentityInfo {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            workload: pod.workload.clone(),
            pods: Arc::new(Vec::new()),
        });
        if !pod.ips.is_empty() {
            let pods = Arc::make_mut(&mut info.pods);
            if let Err(at) = pods.binary_search(key) {
                pods.insert(at, key.clone());
            }
        }
        let rank = ClaimRank::of(pod);
        for ip in &pod.ips {
            self.claims
                .entry(*ip)
                .or_default()
                .insert((rank.clone(), key.clone()));
            self.settle(*ip, nets);
        }
        self.ranks.insert(key.clone(), rank);
        self.seen
            .insert(key.clone(), (pod.ips.clone(), hash_of(&pod.ports)));
    }

    fn remove_pod(
        &mut self,
        key: &PodKey,
        emptied: &mut BTreeSet<u32>,
        nets: &mut BTreeSet<IpNet>,
    ) {
        let Some(id) = self.pod_identity.remove(key) else {
            return;
        };
        let (ips, _) = self.seen.remove(key).unwrap_or_default();
        let rank = self.ranks.remove(key).unwrap_or_default();
        for ip in &ips {
            if let Some(claims) = self.claims.get_mut(ip) {
                claims.remove(&(rank.clone(), key.clone()));
                if claims.is_empty() {
                    self.claims.remove(ip);
                }
            }
            self.settle(*ip, nets);
        }
        if let Some(info) = self.identities.get_mut(&id)
            && let Ok(at) = info.pods.binary_search(key)
        {
            Arc::make_mut(&mut info.pods).remove(at);
        }
        if let Some(n) = self.members.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                emptied.insert(id);
            }
        }
    }

    /// Points an address at the pod that wins it, if any still claims it.
    fn settle(&mut self, ip: IpAddr, nets: &mut BTreeSet<IpNet>) {
        let net = single_address(ip);
        let winner = self.claims.get(&ip).and_then(|c| c.last()).map(|(_, k)| k);
        match winner.and_then(|w| Some((w, *self.pod_identity.get(w)?))) {
            Some((w, id)) => {
                if self.address_pods.get(&ip) != Some(w) {
                    self.address_pods.insert(ip, w.clone());
                }
                if self.addresses.get(&net) != Some(&id) {
                    self.addresses.insert(net, id);
                    nets.insert(net);
                }
            }
            None => {
                self.address_pods.remove(&ip);
                if self.addresses.remove(&net).is_some() {
                    nets.insert(net);
                }
            }
        }
    }

    /// Identities that can be peers: those with pods that have addresses.
    fn peers(&self) -> impl Iterator<Item = (&u32, &IdentityInfo)> {
        self.identities.iter().filter(|(_, i)| !i.pods.is_empty())
    }

    /// Labels of every namespace that has peers or is listed.
    fn namespace_labels(&self, state: &ClusterState) -> BTreeMap<String, Labels> {
        self.peers()
            .map(|(_, i)| &i.namespace)
            .chain(state.namespaces.keys())
            .map(|ns| (ns.clone(), state.namespace_labels(ns)))
            .collect()
    }
}

/// Service frontends and their virtual addresses, kept up to date Service by Service when
/// the change log says what changed, rebuilt when it cannot.
#[derive(Clone, Debug, Default)]
struct FrontendsPart {
    /// Hash of what a rebuild read (`None` once changed in place): a source without a log
    /// is compared by it.
    inputs: Option<u64>,
    frontends: OrdMap<u32, Frontend>,
    /// `Compiled::podless_backends`.
    podless: OrdMap<u32, Vec<IpAddr>>,
    addresses: OrdMap<IpNet, u32>,
    /// Per virtual address, every Service claiming it (normally one) with its identity; the
    /// greatest key wins, as it did when the map was built in Service order.
    claims: BTreeMap<IpNet, BTreeMap<PodKey, u32>>,
    /// Per Service: its frontends' identities and the addresses its slices name.
    by_service: BTreeMap<PodKey, ServiceIndexed>,
    /// Backend address: the frontends with a backend there (their decisions depend on the
    /// identity of that address and of its pod).
    backend_frontends: BTreeMap<IpAddr, BTreeSet<u32>>,
    /// Backend pod (a slice may name a pod at another address): its frontends.
    backend_pod_frontends: BTreeMap<PodKey, BTreeSet<u32>>,
    /// Address named in a slice: the Services whose slices name it.
    address_services: BTreeMap<IpAddr, BTreeSet<PodKey>>,
    /// EndpointSlice (namespace, name) to its Service, and back.
    slice_service: BTreeMap<PodKey, PodKey>,
    service_slices: BTreeMap<PodKey, BTreeSet<PodKey>>,
    /// Pod a slice's `targetRef` names: those slices, and back (whether the pod holds the
    /// address, a host-network pod its node's, decides whether the reference counts).
    target_slices: BTreeMap<PodKey, BTreeSet<PodKey>>,
    slice_targets: BTreeMap<PodKey, BTreeSet<PodKey>>,
}

/// What `FrontendsPart` indexed of one Service, to take it out again.
#[derive(Clone, Debug, Default)]
struct ServiceIndexed {
    ids: Vec<u32>,
    addresses: Vec<IpAddr>,
}

impl FrontendsPart {
    fn rebuild(
        state: &ClusterState,
        address_pods: &OrdMap<IpAddr, PodKey>,
        ids: &mut ServiceIdentities,
        inputs: u64,
    ) -> FrontendsPart {
        let mut part = FrontendsPart::default();
        for key in state.endpoint_slices.keys() {
            part.index_slice(state, key, &mut BTreeSet::new());
        }
        let mut ignored = BTreeSet::new();
        for key in state.services.keys() {
            part.recompute(state, key, address_pods, ids, &mut ignored);
        }
        ids.retain(&part.frontends.keys().copied().collect());
        part.inputs = Some(inputs);
        part
    }

    /// Recomputes the Services that changed, whose slices changed, whose slices hold an
    /// address a changed pod had or has or name a changed pod, or that select pods of a
    /// changed pod's namespace
    /// themselves (no slices: selectors and named target ports are resolved on the pods).
    /// Returns the frontends whose Service rules may differ now: changed ones (gone ones
    /// included) and those with a backend at a touched address or one whose identity moved.
    fn apply(
        &mut self,
        state: &ClusterState,
        changes: &ChangeSet,
        touched: &BTreeSet<IpAddr>,
        address_pods: &OrdMap<IpAddr, PodKey>,
        ids: &mut ServiceIdentities,
        nets: &mut BTreeSet<IpNet>,
    ) -> BTreeSet<u32> {
        let mut affected = changes.services.clone();
        for key in &changes.endpoint_slices {
            self.index_slice(state, key, &mut affected);
        }
        let namespaces: BTreeSet<&String> = changes.pods.iter().map(|(ns, _)| ns).collect();
        for ns in namespaces {
            let in_namespace = |(k, _): &(&PodKey, &ServiceInfo)| k.0 == *ns;
            affected.extend(
                state
                    .services
                    .range((ns.clone(), String::new())..)
                    .take_while(in_namespace)
                    .filter(|(k, svc)| {
                        svc.selector.is_some() && !self.service_slices.contains_key(*k)
                    })
                    .map(|(k, _)| k.clone()),
            );
        }
        // A backend's pod is whoever holds its address: a pod that came, went or moved has
        // its addresses touched. A slice's targetRef counts only for a pod that holds the
        // address (a host-network pod, its node's, which are not the pod's to touch): the
        // Services whose slices name a changed pod.
        for pod in &changes.pods {
            for slice in self.target_slices.get(pod).into_iter().flatten() {
                affected.extend(self.slice_service.get(slice).cloned());
            }
        }
        for ip in touched {
            affected.extend(self.address_services.get(ip).into_iter().flatten().cloned());
        }
        let mut dirty = BTreeSet::new();
        for key in &affected {
            if let Some(gone_or_changed) = self.recompute(state, key, address_pods, ids, nets) {
                dirty.extend(gone_or_changed);
            }
        }
        self.inputs = None;
        let moved = touched.iter().copied().chain(
            nets.iter()
                .filter(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr()),
        );
        for ip in moved {
            dirty.extend(self.backend_frontends.get(&ip).into_iter().flatten());
        }
        for pod in &changes.pods {
            dirty.extend(self.backend_pod_frontends.get(pod).into_iter().flatten());
        }
        dirty
    }

    /// Brings a slice's entry in the slice indexes up to date; its Services (before and
    /// after) go to `affected`.
    fn index_slice(&mut self, state: &ClusterState, key: &PodKey, affected: &mut BTreeSet<PodKey>) {
        if let Some(old) = self.slice_service.remove(key) {
            if let Some(slices) = self.service_slices.get_mut(&old) {
                slices.remove(key);
                if slices.is_empty() {
                    self.service_slices.remove(&old);
                }
            }
            affected.insert(old);
        }
        for pod in self.slice_targets.remove(key).unwrap_or_default() {
            if let Some(slices) = self.target_slices.get_mut(&pod) {
                slices.remove(key);
                if slices.is_empty() {
                    self.target_slices.remove(&pod);
                }
            }
        }
        if let Some(slice) = state.endpoint_slices.get(key) {
            let service = (slice.namespace.clone(), slice.service.clone());
            self.slice_service.insert(key.clone(), service.clone());
            self.service_slices
                .entry(service.clone())
                .or_default()
                .insert(key.clone());
            affected.insert(service);
            let targets: BTreeSet<PodKey> = slice
                .endpoints
                .iter()
                .filter_map(|e| e.pod.clone())
                .collect();
            for pod in &targets {
                self.target_slices
                    .entry(pod.clone())
                    .or_default()
                    .insert(key.clone());
            }
            if !targets.is_empty() {
                self.slice_targets.insert(key.clone(), targets);
            }
        }
    }

    /// Points a virtual address at the frontend that wins it, if any still claims it.
    fn settle(&mut self, net: IpNet, nets: &mut BTreeSet<IpNet>) {
        match self.claims.get(&net).and_then(|c| c.last_key_value()) {
            Some((_, id)) => {
                if self.addresses.insert(net, *id) != Some(*id) {
                    nets.insert(net);
                }
            }
            None => {
                if self.addresses.remove(&net).is_some() {
                    nets.insert(net);
                }
            }
        }
    }

    /// Recomputes one Service's frontends. Returns the identities of its frontends before
    /// and after when they changed.
    fn recompute(
        &mut self,
        state: &ClusterState,
        key: &PodKey,
        address_pods: &OrdMap<IpAddr, PodKey>,
        ids: &mut ServiceIdentities,
        nets: &mut BTreeSet<IpNet>,
    ) -> Option<Vec<u32>> {
        let indexed = self.by_service.remove(key).unwrap_or_default();
        let old_ids = indexed.ids;
        for ip in &indexed.addresses {
            if let Some(services) = self.address_services.get_mut(ip) {
                services.remove(key);
                if services.is_empty() {
                    self.address_services.remove(ip);
                }
            }
        }

        let old: Vec<Frontend> = old_ids
            .iter()
            .filter_map(|id| self.frontends.remove(id))
            .collect();
        for id in &old_ids {
            self.podless.remove(id);
        }
        for f in &old {
            for b in f.ports.iter().flat_map(|p| &p.backends) {
                if let Some(fs) = self.backend_frontends.get_mut(&b.ip) {
                    fs.remove(&f.identity);
                    if fs.is_empty() {
                        self.backend_frontends.remove(&b.ip);
                    }
                }
                if let Some(pod) = &b.pod
                    && let Some(fs) = self.backend_pod_frontends.get_mut(pod)
                {
                    fs.remove(&f.identity);
                    if fs.is_empty() {
                        self.backend_pod_frontends.remove(pod);
                    }
                }
            }
        }
        for net in old
            .iter()
            .flat_map(|f| &f.addresses)
            .map(|a| single_address(*a))
        {
            if let Some(claims) = self.claims.get_mut(&net) {
                claims.remove(key);
                if claims.is_empty() {
                    self.claims.remove(&net);
                }
            }
            self.settle(net, nets);
        }
        let Some(svc) = state.services.get(key) else {
            ids.release_unused(key, &[]);
            return (!old.is_empty()).then_some(old_ids);
        };
        let slices: Vec<&EndpointSliceInfo> = self
            .service_slices
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| state.endpoint_slices.get(k))
            .collect();
        let new = services::service_frontends(state, svc, &slices, address_pods, ids);
        ids.release_unused(key, &new);
        let mut ips: Vec<IpAddr> = slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .flat_map(|e| &e.addresses)
            .copied()
            .collect();
        ips.sort_unstable();
        ips.dedup();
        for ip in &ips {
            self.address_services
                .entry(*ip)
                .or_default()
                .insert(key.clone());
        }

        for f in &new {
            for net in f.addresses.iter().map(|a| single_address(*a)) {
                self.claims
                    .entry(net)
                    .or_default()
                    .insert(key.clone(), f.identity);
                self.settle(net, nets);
            }
        }
        let changed = old != new;
        let new_ids: Vec<u32> = new.iter().map(|f| f.identity).collect();
        for f in new {
            let mut podless: Vec<IpAddr> = f
                .ports
                .iter()
                .flat_map(|p| &p.backends)
                .filter(|b| b.pod.is_none())
                .map(|b| b.ip)
                .collect();
            if !podless.is_empty() {
                podless.sort_unstable();
                podless.dedup();
                self.podless.insert(f.identity, podless);
            }
            for b in f.ports.iter().flat_map(|p| &p.backends) {
                self.backend_frontends
                    .entry(b.ip)
                    .or_default()
                    .insert(f.identity);
                if let Some(pod) = &b.pod {
                    self.backend_pod_frontends
                        .entry(pod.clone())
                        .or_default()
                        .insert(f.identity);
                }
            }
            self.frontends.insert(f.identity, f);
        }
        self.by_service.insert(
            key.clone(),
            ServiceIndexed {
                ids: new_ids.clone(),
                addresses: ips,
            },
        );
        changed.then(|| old_ids.into_iter().chain(new_ids).collect())
    }
}

fn hash_of(v: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher as _;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Compiles the cluster for the pods in `targets` (every pod when `None`).
pub fn compile(
    state: &ClusterState,
    allocator: &mut IdentityAllocator,
    targets: Option<&BTreeSet<PodKey>>,
    options: &CompileOptions,
) -> Compiled {
    compile_cached(
        state,
        allocator,
        targets,
        options,
        &mut CompileCache::default(),
    )
}

/// `compile`, reusing what `cache` holds from the previous compile where its inputs did not
/// change: a policy change recompiles only the pods that policy selects (before or after); a
/// pod, namespace, Service or EndpointSlice change that the source's change log names
/// updates the identities and frontends it touches, not all of them.
pub fn compile_cached(
    state: &ClusterState,
    allocator: &mut IdentityAllocator,
    targets: Option<&BTreeSet<PodKey>>,
    options: &CompileOptions,
    cache: &mut CompileCache,
) -> Compiled {
    let mut compiled = Compiled::default();
    let changes = state.changes.since(cache.position);
    cache.position = state.changes.position();
    // Addresses whose identity may have changed since the last compile; `None`: rebuilt.
    let mut nets = Some(BTreeSet::new());
    let mut touched = BTreeSet::new();
    // Identities whose pods changed (as they were and are): cached pod results whose
    // policies select one are recompiled.
    let mut moved = BTreeMap::new();

    // Identities depend on pods (namespace, labels, addresses) and namespaces only.
    let pods_hash = state.pods_version.unwrap_or_else(|| {
        hash_of(&(
            state
                .pods
                .iter()
                .map(|(k, p)| (k, &p.labels, &p.ips, &p.ports, p.host_network))
                .collect::<Vec<_>>(),
            &state
                .namespaces
                .iter()
                .map(|(n, ns)| (n, &ns.labels))
                .collect::<Vec<_>>(),
        ))
    });
    match (&mut cache.identities, &changes, &mut nets) {
        (Some((h, part)), Some(changes), Some(nets)) => {
            if !changes.pods.is_empty() || !changes.namespaces.is_empty() {
                part.apply(state, changes, allocator, nets, &mut touched, &mut moved);
            }
            *h = pods_hash;
        }
        (Some((h, _)), None, _) if *h == pods_hash => {}
        _ => {
            if cache
                .identities
                .as_ref()
                .is_some_and(|(_, p)| p.changed_in_place)
            {
                cache.pods.clear();
            }
            cache.identities = Some((pods_hash, IdentityPart::rebuild(state, allocator)));
            nets = None;
        }
    }
    let (_, part) = cache.identities.as_ref().expect("just set");
    compiled.addresses = part.addresses.clone();
    compiled.pod_identity = part.pod_identity.clone();
    compiled.identities = part.identities.clone();
    compiled.address_pods = part.address_pods.clone();

    // Service frontends depend on Services, EndpointSlices and (for selectors, named target
    // ports and backend pods) the pods.
    // Frontends whose Service rules may differ from the last compile's; `None`: all.
    let mut dirty_frontends = None;
    match (&mut cache.frontends, &changes, &mut nets) {
        (Some(f), Some(changes), Some(nets)) => {
            dirty_frontends = Some(f.apply(
                state,
                changes,
                &touched,
                &part.address_pods,
                &mut allocator.services,
                nets,
            ));
        }
        (previous, _, _) => {
            let inputs = match state.services_version {
                Some(version) => hash_of(&(pods_hash, version)),
                None => hash_of(&(pods_hash, &state.services, &state.endpoint_slices)),
            };
            if previous.as_ref().is_none_or(|f| f.inputs != Some(inputs)) {
                *previous = Some(FrontendsPart::rebuild(
                    state,
                    &part.address_pods,
                    &mut allocator.services,
                    inputs,
                ));
                nets = None;
            }
        }
    }
    let services_part = cache.frontends.as_ref().expect("just set");
    compiled.frontends = services_part.frontends.clone();
    compiled.podless_backends = services_part.podless.clone();
    compiled.service_addresses = services_part.addresses.clone();
    // Identities and frontends were brought up to date change by change, not rebuilt.
    let incremental = nets.is_some();
    compiled.generation = cache.generation + 1;
    compiled.address_changes = nets.map(|nets| AddressChanges {
        since: cache.generation,
        nets,
    });
    cache.generation += 1;

    let policy_changes = changes.as_ref().map(|c| &c.policies);
    match policy_changes {
        Some(changed) => cache.rule_ids.sync_changed(&state.policies, changed),
        None => cache.rule_ids.sync(&state.policies),
    }
    compiled.rule_policies = cache.rule_ids.policies.clone();
    let ctx = Context {
        state,
        identities: &part.identities,
        rule_ids: &cache.rule_ids.ids,
        namespace_labels: &part.namespace_labels,
        peers_by_namespace: OnceCell::new(),
    };

    // The universe every pod's result depends on.
    let named_egress_port = |p: &Policy| {
        p.egress.iter().flatten().any(|r| {
            r.ports
                .iter()
                .any(|port| matches!(port.port, PortRef::Named(_)))
        })
    };
    match (policy_changes, &mut cache.named_egress_ports) {
        (Some(changed), Some(named)) => {
            for key in changed {
                match state.policies.get(key) {
                    Some(p) if named_egress_port(p) => named.insert(key.clone()),
                    _ => named.remove(key),
                };
            }
        }
        (_, named) => {
            *named = Some(
                state
                    .policies
                    .iter()
                    .filter(|(_, p)| named_egress_port(p))
                    .map(|(k, _)| k.clone())
                    .collect(),
            )
        }
    }
    let uses_pod_ports = cache
        .named_egress_ports
        .as_ref()
        .is_some_and(|named| !named.is_empty());
    // Namespace labels are not part of it: a pod depends only on which namespaces its
    // policies' namespaceSelectors match (`PolicyVersions`), so relabelling a
    // namespace recompiles only the pods whose selectors it moves.
    let universe = hash_of(&(part.peers_key, uses_pod_ports.then_some(part.ports_key)));
    if universe != cache.universe {
        cache.pods.clear();
        cache.universe = universe;
    }

    let mut policy_index = PolicyIndex::new(&state.policies);
    // When the change log covers everything since the last compile and names no namespace
    // and no ModeOverride, and the mode options are the same, a pod the log does not name,
    // of a namespace none of whose policies it names, keeps its cached result unless a peer
    // of its policies selects an identity that moved: its labels, addresses, ports, mode and
    // the policies selecting it (and the namespaces their selectors match) are as they were.
    // Nothing of its policies is looked at: at 250 pods and 1,500 policies that look is
    // most of a compile.
    let mode_options = (options.default_mode, options.pod_mode_annotations);
    let steady = changes.as_ref().filter(|c| {
        incremental
            && c.namespaces.is_empty()
            && c.mode_overrides.is_empty()
            && cache.mode_options == Some(mode_options)
    });
    cache.mode_options = Some(mode_options);
    let policies_changed_in: BTreeSet<&str> = steady
        .map(|c| c.policies.iter().map(|(ns, _)| ns.as_str()).collect())
        .unwrap_or_default();
    // Per policy, worked out once per compile: a hash of it and of the namespaces each of
    // its namespaceSelectors matches (all its pods' rules depend on of namespace labels).
    let mut selector_matches = HashMap::new();
    let mut policy_inputs: HashMap<*const Policy, u64> = HashMap::new();
    let pods: Box<dyn Iterator<Item = (&PodKey, &PodInfo)>> = match targets {
        Some(t) => Box::new(t.iter().filter_map(|k| state.pods.get_key_value(k))),
        None => Box::new(state.pods.iter()),
    };
    for (key, pod) in pods {
        let unchanged = steady
            .filter(|c| {
                !c.pods.contains(key) && !policies_changed_in.contains(pod.namespace.as_str())
            })
            .and_then(|_| cache.pods.get(key))
            .filter(|(inputs, _)| {
                moved.is_empty()
                    || !inputs
                        .selecting
                        .iter()
                        .filter_map(|k| state.policies.get(k))
                        .any(|p| depends_on(&ctx, p, &moved, &touched))
            })
            .map(|(_, cached)| cached.clone());
        let mut result = match unchanged {
            Some(result) => result,
            None => {
                let selecting = policy_index.selecting(pod);
                let mode = mode_of(state, pod, options);
                let policies: Vec<u64> = selecting
                    .iter()
                    .map(|p| {
                        *policy_inputs.entry(*p as *const Policy).or_insert_with(|| {
                            cache
                                .policy_versions
                                .version(p, part.namespaces_version, || {
                                    matched_namespaces(
                                        p,
                                        ctx.namespace_labels,
                                        &mut selector_matches,
                                    )
                                })
                        })
                    })
                    .collect();
                match cache.pods.get(key) {
                    Some((inputs, cached))
                        if inputs.same(pod, &policies, mode)
                            && !selecting
                                .iter()
                                .any(|p| depends_on(&ctx, p, &moved, &touched)) =>
                    {
                        cached.clone()
                    }
                    _ => {
                        let result = compile_pod(&ctx, pod, &selecting, mode);
                        let inputs = PodInputs::of(pod, &selecting, policies, mode);
                        cache.pods.insert(key.clone(), (inputs, result.clone()));
                        result
                    }
                }
            }
        };
        if result.isolated_egress {
            let node = options.node_addresses.of(pod.node_name.as_deref());
            let identity_of = |b: &Backend| {
                // A pod reaching itself through its Service is not enforced (upstream's
                // AllowLoopback), like the node itself; for a host-network pod, a backend
                // on its node is that pod's node traffic, as it is directly
                // (`LOCAL_POD_SCOPE` in the datapath).
                let on_its_node = || {
                    pod.host_network
                        && pod.node_name.is_some()
                        && b.pod
                            .as_ref()
                            .and_then(|k| state.pods.get(k))
                            .is_some_and(|backend| backend.node_name == pod.node_name)
                };
                if b.pod.as_ref() == Some(key) || on_its_node() {
                    agent_common::IDENTITY_HOST
                } else {
                    backend_identity(part, node, b)
                }
            };
            // Per frontend, kept from the last compile unless the frontend or a backend's
            // identity changed: one new replica does not re-decide 1,500 Services.
            let input = hash_of(&(&result.egress, node));
            let index = services::RuleIndex::new(&result.egress);
            let entry = cache.services.entry(key.clone()).or_default();
            let reusable = entry.input == input && entry.generation == cache.generation - 1;
            match (&dirty_frontends, reusable) {
                (Some(dirty), true) => {
                    for id in dirty {
                        match services_part.frontends.get(id) {
                            Some(f) => {
                                entry
                                    .by_frontend
                                    .insert(*id, services::frontend_rules(&index, f, &identity_of));
                            }
                            None => {
                                entry.by_frontend.remove(id);
                            }
                        }
                    }
                }
                _ => {
                    entry.by_frontend = services_part
                        .frontends
                        .values()
                        .map(|f| {
                            (
                                f.identity,
                                services::frontend_rules(&index, f, &identity_of),
                            )
                        })
                        .collect();
                }
            }
            entry.input = input;
            entry.generation = cache.generation;
            result.services = entry.by_frontend.values().flatten().cloned().collect();
        }
        compiled.pods.insert(key.clone(), result);
    }
    match policy_changes {
        Some(changed) => cache.policy_versions.forget_gone(&state.policies, changed),
        None => cache.policy_versions.retain(&state.policies),
    }
    if let Some(t) = targets {
        cache.pods.retain(|k, _| t.contains(k));
        cache.services.retain(|k, _| t.contains(k));
    }
    compiled
}

/// The policies of each namespace, indexed by the first label their podSelector requires:
/// the policies selecting a pod are found among those its labels can match instead of among
/// all of its namespace's (a namespace of a large cluster holds hundreds of policies, most
/// selecting one app each).
struct PolicyIndex<'a> {
    policies: &'a BTreeMap<PodKey, Policy>,
    /// Built for a namespace when a pod of it is first looked at: a change that recompiles
    /// a few pods does not index the whole cluster's policies.
    by_namespace: HashMap<String, NamespacePolicies<'a>>,
}

/// One namespace's policies, each with its place in the namespace's (key) order.
#[derive(Default)]
struct NamespacePolicies<'a> {
    /// By the first (key, value) of the podSelector's matchLabels.
    by_label: HashMap<(&'a str, &'a str), Vec<(usize, &'a Policy)>>,
    /// podSelectors that require no label value (empty, or expressions only).
    others: Vec<(usize, &'a Policy)>,
}

impl<'a> PolicyIndex<'a> {
    fn new(policies: &'a BTreeMap<PodKey, Policy>) -> PolicyIndex<'a> {
        PolicyIndex {
            policies,
            by_namespace: HashMap::new(),
        }
    }

    /// The policies of `namespace` (adjacent in key order), indexed.
    fn index(&self, namespace: &str) -> NamespacePolicies<'a> {
        let mut ns = NamespacePolicies::default();
        let first = (namespace.to_string(), String::new());
        let of_namespace = self
            .policies
            .range(first..)
            .take_while(|((n, _), _)| n == namespace);
        for (order, (_, policy)) in of_namespace.enumerate() {
            match policy.pod_selector.match_labels.iter().next() {
                Some((key, value)) => ns
                    .by_label
                    .entry((key.as_str(), value.as_str()))
                    .or_default()
                    .push((order, policy)),
                None => ns.others.push((order, policy)),
            }
        }
        ns
    }

    /// The policies whose podSelector selects `pod`, in the cluster state's order.
    fn selecting(&mut self, pod: &PodInfo) -> Vec<&'a Policy> {
        if !self.by_namespace.contains_key(pod.namespace.as_str()) {
            let index = self.index(&pod.namespace);
            self.by_namespace.insert(pod.namespace.clone(), index);
        }
        let ns = &self.by_namespace[pod.namespace.as_str()];
        let mut found = ns.others.clone();
        for (key, value) in pod.labels.iter() {
            if let Some(policies) = ns.by_label.get(&(key.as_str(), value.as_str())) {
                found.extend_from_slice(policies);
            }
        }
        found.retain(|(_, p)| p.pod_selector.matches(&pod.labels));
        found.sort_unstable_by_key(|(order, _)| *order);
        found.into_iter().map(|(_, p)| p).collect()
    }
}

/// Whether a pod's rules from `policy` may change when the pods of the `moved` identities
/// (with addresses `touched`) changed: a peer of it selects one of them, or (for named
/// ports, resolved on the destination pods) everyone or an ipBlock holding one of them.
fn depends_on(
    ctx: &Context,
    policy: &Policy,
    moved: &BTreeMap<u32, IdentityInfo>,
    touched: &BTreeSet<IpAddr>,
) -> bool {
    if moved.is_empty() {
        return false;
    }
    let ingress = policy.ingress.iter().flatten().map(|r| (r, false));
    let egress = policy.egress.iter().flatten().map(|r| {
        let named = r.ports.iter().any(|p| matches!(p.port, PortRef::Named(_)));
        (r, named)
    });
    ingress.chain(egress).any(|(rule, named)| {
        if rule.peers.is_empty() {
            return named;
        }
        rule.peers.iter().any(|peer| match peer {
            PeerSpec::Pods { namespaces, pods } => moved
                .values()
                .any(|info| ctx.peer_selects(&policy.namespace, namespaces, pods, info)),
            PeerSpec::IpBlock { cidr, except } => {
                named && touched.iter().any(|ip| in_block(cidr, except, ip))
            }
        })
    })
}

/// For each namespaceSelector of a policy's peers, a hash of the namespaces it matches: all
/// a compiled pod's rules depend on of the namespaces' labels. Selectors are matched once
/// per compile (`memo`): most policies of a cluster share a few of them.
fn matched_namespaces<'a>(
    policy: &'a Policy,
    namespace_labels: &BTreeMap<String, Labels>,
    memo: &mut HashMap<&'a Selector, u64>,
) -> Vec<u64> {
    policy
        .ingress
        .iter()
        .chain(policy.egress.iter())
        .flatten()
        .flat_map(|rule| &rule.peers)
        .filter_map(|peer| match peer {
            PeerSpec::Pods {
                namespaces: Some(selector),
                ..
            } => Some(*memo.entry(selector).or_insert_with(|| {
                hash_of(
                    &namespace_labels
                        .iter()
                        .filter(|(_, labels)| selector.matches(labels))
                        .map(|(name, _)| name)
                        .collect::<Vec<_>>(),
                )
            })),
            _ => None,
        })
        .collect()
}

/// The identity a backend is decided as: the node itself for an address of the source's
/// node (a host-network backend there), else its pod's, else whatever its address is.
fn backend_identity(part: &IdentityPart, node: Option<&BTreeSet<IpAddr>>, b: &Backend) -> u32 {
    if node.is_some_and(|n| n.contains(&b.ip)) {
        return agent_common::IDENTITY_HOST;
    }
    b.pod
        .as_ref()
        .and_then(|k| part.pod_identity.get(k))
        .or_else(|| part.addresses.get(&single_address(b.ip)))
        .copied()
        .unwrap_or(agent_common::IDENTITY_WORLD)
}

/// The policy of one pod from the policies selecting it.
fn compile_pod(ctx: &Context, pod: &PodInfo, selecting: &[&Policy], mode: Mode) -> PodPolicy {
    let mut result = PodPolicy {
        mode,
        isolated_ingress: false,
        isolated_egress: false,
        ingress: vec![],
        egress: vec![],
        services: vec![],
        ingress_policies: vec![],
        egress_policies: vec![],
        addresses: addresses_of(pod),
    };
    for policy in selecting {
        let rule_id = ctx.rule_ids[&policy.id()];
        if let Some(rules) = &policy.ingress {
            result.isolated_ingress = true;
            result.ingress_policies.push(policy.id());
            for rule in rules {
                ingress_rules(ctx, policy, rule, pod, rule_id, &mut result.ingress);
            }
        }
        if let Some(rules) = &policy.egress {
            result.isolated_egress = true;
            result.egress_policies.push(policy.id());
            for rule in rules {
                egress_rules(ctx, policy, rule, rule_id, &mut result.egress);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sources::{Kind, Object, ObjectKey, files::parse_file, store::Store};

    /// The policy index finds exactly the policies whose podSelector selects a pod, in the
    /// cluster state's order, whatever the selector holds: labels, several labels, only
    /// expressions, nothing.
    #[test]
    fn the_policy_index_finds_what_a_walk_of_every_policy_finds() {
        let labels = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let selector =
            |pairs: &[(&str, &str)], expressions: Vec<super::super::model::Requirement>| Selector {
                match_labels: pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                expressions,
            };
        let not_in = |key: &str, value: &str| super::super::model::Requirement {
            key: key.into(),
            operator: super::super::model::Operator::NotIn,
            values: [value.to_string()].into(),
        };
        let policy = |ns: &str, name: &str, pod_selector: Selector| Policy {
            namespace: ns.into(),
            name: name.into(),
            pod_selector,
            ingress: Some(vec![]),
            egress: None,
            advised_for: None,
        };
        let policies: BTreeMap<PodKey, Policy> = [
            policy("a", "all", selector(&[], vec![])),
            policy("a", "web", selector(&[("app", "web")], vec![])),
            policy(
                "a",
                "web-prod",
                selector(&[("app", "web"), ("tier", "prod")], vec![]),
            ),
            policy("a", "tier-prod", selector(&[("tier", "prod")], vec![])),
            policy("a", "not-db", selector(&[], vec![not_in("app", "db")])),
            policy(
                "a",
                "web-not-canary",
                selector(&[("app", "web")], vec![not_in("track", "canary")]),
            ),
            policy("b", "web", selector(&[("app", "web")], vec![])),
        ]
        .into_iter()
        .map(|p| ((p.namespace.clone(), p.name.clone()), p))
        .collect();
        let mut index = PolicyIndex::new(&policies);
        for (ns, pod_labels) in [
            ("a", labels(&[])),
            ("a", labels(&[("app", "web")])),
            ("a", labels(&[("app", "web"), ("tier", "prod")])),
            (
                "a",
                labels(&[("app", "web"), ("tier", "prod"), ("track", "canary")]),
            ),
            ("a", labels(&[("app", "db"), ("tier", "prod")])),
            ("a", labels(&[("tier", "dev")])),
            ("b", labels(&[("app", "web")])),
            ("c", labels(&[("app", "web")])),
        ] {
            let pod = PodInfo {
                namespace: ns.into(),
                labels: pod_labels,
                ..PodInfo::default()
            };
            let walked: Vec<String> = policies
                .values()
                .filter(|p| p.namespace == pod.namespace && p.pod_selector.matches(&pod.labels))
                .map(Policy::id)
                .collect();
            let found: Vec<String> = index.selecting(&pod).into_iter().map(Policy::id).collect();
            assert_eq!(found, walked, "{ns} {:?}", pod.labels);
        }
    }

    /// A new agent gives pods the numbers the pinned maps hold for their addresses, each
    /// once; new identities come after every pinned one, also once the hints are gone.
    #[test]
    fn identities_keep_the_numbers_pinned_for_their_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let labels = |app: &str| -> Labels { [("app".to_string(), app.to_string())].into() };
        let mut allocator = IdentityAllocator::default();
        allocator.seed(
            [
                (ip("10.0.0.1"), 300),
                (ip("10.0.0.2"), 301),
                (ip("10.96.0.1"), agent_common::IDENTITY_SERVICE_BASE + 5),
                (ip("10.250.0.1"), agent_common::IDENTITY_HOST),
                (ip("10.9.9.9"), agent_common::PEER_CIDR_SET_BASE + 1),
            ]
            .into(),
        );
        // In order: a pinned number each; the same identity at another address; a new
        // identity after every pinned number; a relabelled pod whose number is taken.
        for (namespace, app, address, want) in [
            ("b", "two", "10.0.0.2", 301),
            ("a", "one", "10.0.0.1", 300),
            ("a", "one", "10.0.0.9", 300),
            ("c", "new", "10.0.0.3", 302),
            ("a", "relabelled", "10.0.0.1", 303),
        ] {
            assert_eq!(
                allocator.get_for(namespace, &labels(app), app, &[ip(address)]),
                want,
                "{namespace}/{app} at {address}"
            );
        }
        allocator.forget_previous();
        assert_eq!(
            allocator.get_for("d", &labels("x"), "x", &[ip("10.0.0.2")]),
            304
        );
        // The same labels in the same namespace, another workload: an identity of its own.
        assert_eq!(allocator.get_for("d", &labels("x"), "other", &[]), 305);
        assert_eq!(allocator.get_for("d", &labels("x"), "x", &[]), 304);
    }

    /// A small random number generator: the same cluster and changes every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    fn pod_yaml(ns: usize, svc: usize, r: usize, ip: &str, tier: usize) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: s{svc}-{r}, namespace: ns{ns}, uid: u-{svc}-{r}, labels: {{app: s{svc}, tier: t{tier}}}}}\nspec:\n  containers: [{{name: c, ports: [{{name: http, containerPort: {}}}]}}]\nstatus: {{phase: Running, podIPs: [{{ip: {ip}}}]}}\n",
            8000 + tier
        )
    }

    /// A cluster of `services` services in `namespaces` namespaces, `replicas` pods each,
    /// with Services, EndpointSlices, ingress policies selecting callers across namespaces
    /// and egress policies with named ports (every dependency the compiler has).
    fn cluster_yaml(namespaces: usize, services: usize, replicas: usize) -> String {
        let mut y = String::new();
        for n in 0..namespaces {
            y += &format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: t{}}}}}\n",
                n % 3
            );
        }
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for s in 0..services {
            let ns = s % namespaces;
            let mut endpoints = String::new();
            for r in 0..replicas {
                let ip = format!("10.{}.{}.{}", 1 + s / 200, s % 200, r + 1);
                y += &pod_yaml(ns, s, r, &ip, r % 2);
                endpoints += &format!(
                    "  - addresses: [{ip}]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: s{s}-{r}}}\n"
                );
            }
            y += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{s}, namespace: ns{ns}}}\nspec:\n  clusterIPs: [10.96.{}.{}]\n  selector: {{app: s{s}}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{s}-x, namespace: ns{ns}, labels: {{kubernetes.io/service-name: s{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8000}}]\nendpoints:\n{endpoints}",
                s / 200,
                s % 200 + 1
            );
            let caller = rng.below(services);
            y += &format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: in-s{s}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: s{s}}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchLabels: {{app: s{caller}}}}}}}]\n    ports: [{{port: http}}]\n",
                (caller % namespaces) % 3
            );
            if s % 3 == 0 {
                let callee = rng.below(services);
                y += &format!(
                    "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: out-s{s}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: s{s}}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: s{callee}}}}}}}]\n    ports: [{{port: http}}]\n  - to: [{{ipBlock: {{cidr: 10.0.0.0/8}}}}]\n    ports: [{{port: 53, protocol: UDP}}]\n"
                );
            }
        }
        y
    }

    fn objects(yaml: &str) -> Vec<(ObjectKey, Object)> {
        parse_file(yaml, std::path::Path::new("t.yaml"))
            .expect("YAML")
            .into_iter()
            .map(|p| p.expect("valid object"))
            .collect()
    }

    fn store_of(yaml: &str) -> Store {
        let mut store = Store::default();
        insert_yaml(&mut store, yaml);
        store
    }

    /// Applies objects written as YAML to a store, as watch events would.
    fn insert_yaml(store: &mut Store, yaml: &str) {
        for (key, object) in objects(yaml) {
            store.insert(key, object);
        }
    }

    fn key(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// One random change of the kind a watch delivers: pods come, go, move address (even
    /// onto another pod's) or change labels; namespaces are relabelled; Services and
    /// EndpointSlices change, go and come back.
    fn random_change(store: &mut Store, rng: &mut Rng, namespaces: usize, services: usize) {
        let s = rng.below(services);
        let ns = s % namespaces;
        match rng.below(13) {
            0 | 1 => {
                let r = 10 + rng.below(3);
                let ip = format!("10.{}.{}.{}", 1 + s / 200, s % 200, r);
                insert_yaml(store, &pod_yaml(ns, s, r, &ip, rng.below(2)));
            }
            2 => {
                let name = format!("s{s}-{}", rng.below(3));
                store.remove(&key(Kind::Pod, &format!("ns{ns}"), &name));
            }
            3 => {
                // An address another pod already has (a stale status), or a new label set.
                let other = rng.below(services);
                let ip = format!("10.{}.{}.1", 1 + other / 200, other % 200);
                let tier = 2 + rng.below(2);
                insert_yaml(store, &pod_yaml(ns, s, rng.below(3), &ip, tier));
            }
            4 => {
                let n = rng.below(namespaces);
                let team = rng.below(4);
                insert_yaml(
                    store,
                    &format!(
                        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: t{team}}}}}\n"
                    ),
                );
            }
            5 => {
                let ip = format!("10.{}.{}.{}", 1 + s / 200, s % 200, 1 + rng.below(12));
                insert_yaml(
                    store,
                    &format!(
                        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{s}-x, namespace: ns{ns}, labels: {{kubernetes.io/service-name: s{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8000}}]\nendpoints:\n  - addresses: [{ip}]\n    targetRef: {{kind: Pod, name: s{s}-0}}\n"
                    ),
                );
            }
            6 => {
                store.remove(&key(
                    Kind::EndpointSlice,
                    &format!("ns{ns}"),
                    &format!("s{s}-x"),
                ));
            }
            7 => {
                // A policy edited (another caller, another team), deleted, or back again.
                let name = format!("in-s{s}");
                if rng.below(3) == 0 {
                    store.remove(&key(Kind::NetworkPolicy, &format!("ns{ns}"), &name));
                } else {
                    let (caller, team) = (rng.below(services), rng.below(4));
                    insert_yaml(
                        store,
                        &format!(
                            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: s{s}}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: t{team}}}}}, podSelector: {{matchLabels: {{app: s{caller}}}}}}}]\n    ports: [{{port: http}}]\n"
                        ),
                    );
                }
            }
            9 => {
                // A pod's own mode annotation (`drop` holds; `log` only with
                // `--pod-mode-annotations=any`).
                let r = rng.below(3);
                let ip = format!("10.{}.{}.{}", 1 + s / 200, s % 200, r + 1);
                let mode = ["drop", "log"][rng.below(2)];
                let yaml = pod_yaml(ns, s, r, &ip, r % 2).replace(
                    ", labels:",
                    &format!(", annotations: {{tollgate.io/mode: {mode}}}, labels:"),
                );
                insert_yaml(store, &yaml);
            }
            10 => {
                // A namespace's mode, its labels as they are.
                let team = store.state().namespaces[&format!("ns{ns}")]
                    .labels
                    .get("team")
                    .cloned()
                    .unwrap_or_default();
                let mode = ["drop", "log", "none"][rng.below(3)];
                insert_yaml(
                    store,
                    &format!(
                        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{ns}, labels: {{team: {team}}}, annotations: {{tollgate.io/mode: {mode}}}}}\n"
                    ),
                );
            }
            11 => {
                // A ModeOverride for a pod or a namespace, or none.
                let name = format!("o{}", rng.below(3));
                let target = [format!("ns{ns}/s{s}-0"), format!("ns{ns}/*")][rng.below(2)].clone();
                if rng.below(3) == 0 {
                    store.remove(&key(Kind::ModeOverride, "", &name));
                } else {
                    let mode = ["drop", "log"][rng.below(2)];
                    insert_yaml(
                        store,
                        &format!(
                            "apiVersion: tollgate.io/v1alpha1\nkind: ModeOverride\nmetadata: {{name: {name}}}\nspec: {{target: \"{target}\", mode: {mode}}}\n"
                        ),
                    );
                }
            }
            12 => {
                // An egress policy to a named port (its pods depend on every pod's named
                // ports) deleted, or back.
                let name = format!("out-s{s}");
                if !store.remove(&key(Kind::NetworkPolicy, &format!("ns{ns}"), &name)) {
                    let callee = rng.below(services);
                    insert_yaml(
                        store,
                        &format!(
                            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: s{s}}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{podSelector: {{matchLabels: {{app: s{callee}}}}}}}]\n    ports: [{{port: http}}]\n"
                        ),
                    );
                }
            }
            _ => {
                if !store.remove(&key(Kind::Service, &format!("ns{ns}"), &format!("s{s}"))) {
                    insert_yaml(
                        store,
                        &format!(
                            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{s}, namespace: ns{ns}}}\nspec:\n  clusterIPs: [10.96.{}.{}]\n  selector: {{app: s{s}}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n",
                            s / 200,
                            1 + rng.below(250)
                        ),
                    );
                }
            }
        }
    }

    /// What a compile decides, without its bookkeeping.
    fn decided(c: &Compiled) -> Compiled {
        Compiled {
            generation: 0,
            address_changes: None,
            ..c.clone()
        }
    }

    /// Names the first thing two compiles decide differently.
    fn assert_same(now: &Compiled, full: &Compiled, step: usize) {
        fn first<K: Ord + Clone + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
            what: &str,
            step: usize,
            a: impl Iterator<Item = (K, V)>,
            b: impl Iterator<Item = (K, V)>,
        ) {
            let a: BTreeMap<K, V> = a.collect();
            let b: BTreeMap<K, V> = b.collect();
            for k in a.keys().chain(b.keys()) {
                assert_eq!(
                    a.get(k),
                    b.get(k),
                    "step {step}: {what} {k:?} (incremental, full)"
                );
            }
        }
        macro_rules! same {
            ($($field:ident),*) => {
                $(first(stringify!($field), step, now.$field.iter(), full.$field.iter());)*
            };
        }
        same!(
            addresses,
            pod_identity,
            identities,
            address_pods,
            frontends,
            service_addresses,
            pods
        );
        assert_eq!(decided(now), decided(full), "step {step}");
    }

    fn all_addresses(c: &Compiled) -> BTreeMap<IpNet, u32> {
        let mut m: BTreeMap<IpNet, u32> = c.addresses.clone().into_iter().collect();
        m.extend(c.service_addresses.clone());
        m
    }

    #[test]
    fn incremental_compiles_decide_exactly_what_a_full_compile_decides() {
        let (namespaces, services) = (5, 40);
        let mut store = store_of(&cluster_yaml(namespaces, services, 3));
        let options = CompileOptions::default();
        let mut allocator = IdentityAllocator::default();
        let mut cache = CompileCache::default();
        let mut previous =
            compile_cached(store.state(), &mut allocator, None, &options, &mut cache);
        assert!(
            previous.address_changes.is_none(),
            "the first compile rebuilds"
        );
        assert!(previous.frontends.len() == services && previous.identities.len() >= services);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // The mode options changed as an agent restarted with others would have them.
        let options_at = |step: usize| match step % 200 < 100 {
            true => options.clone(),
            false => CompileOptions {
                default_mode: Mode::Drop,
                pod_mode_annotations: PodModeAnnotations::Any,
                ..options.clone()
            },
        };
        let mut incremental = 0;
        for step in 0..1000 {
            for _ in 0..1 + rng.below(3) {
                random_change(&mut store, &mut rng, namespaces, services);
            }
            let state = store.state();
            // As on a node: this node's pods (replicas 0 and 1) every other step.
            let local: BTreeSet<PodKey> = state
                .pods
                .keys()
                .filter(|k| k.1.ends_with("-0") || k.1.ends_with("-1"))
                .cloned()
                .collect();
            let targets = (step % 2 == 0).then_some(&local);
            let options = options_at(step);
            let now = compile_cached(state, &mut allocator, targets, &options, &mut cache);
            // From scratch but for the rule ids, which a policy keeps while it exists (a
            // compile from nothing numbers them afresh).
            let mut fresh = CompileCache {
                rule_ids: cache.rule_ids.clone(),
                ..CompileCache::default()
            };
            let full = compile_cached(state, &mut allocator.clone(), targets, &options, &mut fresh);
            assert_same(&now, &full, step);
            // Every address whose identity moved is named as possibly changed.
            let changes = now.address_changes.as_ref().expect("the log reaches back");
            assert_eq!(changes.since, previous.generation);
            let (before, after) = (all_addresses(&previous), all_addresses(&now));
            for net in before.keys().chain(after.keys()) {
                if before.get(net) != after.get(net) {
                    assert!(changes.nets.contains(net), "step {step}: {net} not named");
                }
            }
            incremental += 1;
            previous = now;
        }
        assert_eq!(incremental, 1000);
        // A state the log does not cover (a source that rebuilds) is compiled in full.
        let mut rebuilt = store.state().clone();
        rebuilt.changes = Default::default();
        rebuilt.pods_version = Some(u64::MAX);
        let options = options_at(999);
        let now = compile_cached(&rebuilt, &mut allocator, None, &options, &mut cache);
        assert!(now.address_changes.is_none());
        assert_eq!(decided(&now), decided(&previous));
    }

    /// Policies named `NAMESPACE/NAME`, with nothing in them.
    fn policies(names: &[&str]) -> BTreeMap<PodKey, Policy> {
        names
            .iter()
            .map(|n| {
                let (namespace, name) = n.split_once('/').expect("NAMESPACE/NAME");
                let policy = Policy {
                    namespace: namespace.into(),
                    name: name.into(),
                    pod_selector: Selector::default(),
                    ingress: None,
                    egress: None,
                    advised_for: None,
                };
                ((namespace.into(), name.into()), policy)
            })
            .collect()
    }

    /// Two pods claiming one address: the live one, then the newer, names it, whatever
    /// their names; a full compile and an incremental one agree.
    #[test]
    fn an_address_is_named_by_its_live_newest_pod() {
        let pod = |name: &str, app: &str, created: &str, deleting: bool| {
            let deletion = if deleting {
                ", deletionTimestamp: \"2026-11-26T15:00:00Z\""
            } else {
                ""
            };
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: b, labels: {{app: {app}}}, creationTimestamp: \"{created}\"{deletion}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.10.1.13}}]}}\n"
            )
        };
        let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n".to_string();
        let live = pod("b3n", "gone", "2026-11-26T12:00:00Z", false);
        let owner_of = |compiled: &Compiled| {
            let id = compiled.addresses[&"10.10.1.13/32".parse::<IpNet>().unwrap()];
            compiled.identities[&id].labels.clone()
        };
        let gone: Labels = [("app".to_string(), "gone".to_string())].into();
        for other in [
            // Terminating, and sorted after the live pod, as it won before.
            pod("old-other", "other", "2026-11-20T12:00:00Z", true),
            // Terminating though newer.
            pod("old-other", "other", "2026-11-26T13:00:00Z", true),
            // Live but older: a pod of a lost node whose address was given again.
            pod("old-other", "other", "2026-11-20T12:00:00Z", false),
        ] {
            let full = store_of(&(namespace.clone() + &live + &other)).into_state();
            let compiled = compile(
                &full,
                &mut IdentityAllocator::default(),
                None,
                &Default::default(),
            );
            assert_eq!(owner_of(&compiled), gone, "{other}");

            // The same, the other pod arriving after the first compile.
            let mut store = store_of(&(namespace.clone() + &live));
            let (mut allocator, mut cache) =
                (IdentityAllocator::default(), CompileCache::default());
            let options = CompileOptions::default();
            compile_cached(store.state(), &mut allocator, None, &options, &mut cache);
            insert_yaml(&mut store, &other);
            let compiled =
                compile_cached(store.state(), &mut allocator, None, &options, &mut cache);
            assert_eq!(owner_of(&compiled), gone, "incremental: {other}");
        }
        // A newer live pod takes the address over.
        let newer = pod("a-new", "new", "2026-11-26T14:00:00Z", false);
        let state = store_of(&(namespace + &live + &newer)).into_state();
        let compiled = compile(
            &state,
            &mut IdentityAllocator::default(),
            None,
            &Default::default(),
        );
        assert_eq!(
            owner_of(&compiled),
            [("app".to_string(), "new".to_string())].into()
        );
    }

    /// A hostPort bound to one of the node's addresses (`hostIP`) leads to its pod from any
    /// address of that family (the map names no address); one port bound to two addresses,
    /// by two pods or by one to two container ports, leads nowhere; one on loopback nowhere
    /// (pods cannot reach it); 0.0.0.0 is every IPv4 address; and one on every address wins
    /// over one bound to a single address.
    #[test]
    fn host_ports_bound_to_one_address_lead_to_their_pod() {
        let pod = |name: &str, ips: &str, ports: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {name}}}}}\nspec:\n  nodeName: n1\n  containers: [{{name: c, image: i, ports: [{ports}]}}]\nstatus: {{podIPs: [{ips}]}}\n"
            )
        };
        let one = |ip: &str| format!("{{ip: '{ip}'}}");
        let dual = format!("{}, {}", one("10.1.0.9"), one("fd00:2::9"));
        let yaml = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n".to_string()
            + &pod(
                "bound",
                &one("10.1.0.1"),
                "{containerPort: 80, hostPort: 8001, hostIP: 10.0.0.5}",
            )
            + &pod(
                "v6-only",
                &one("10.1.0.2"),
                "{containerPort: 80, hostPort: 8002, hostIP: 'fd00:1::5'}",
            )
            + &pod(
                "loop",
                &one("10.1.0.3"),
                "{containerPort: 80, hostPort: 8003, hostIP: 127.0.0.1}",
            )
            + &pod(
                "left",
                &one("10.1.0.4"),
                "{containerPort: 80, hostPort: 8004, hostIP: 10.0.0.5}",
            )
            + &pod(
                "right",
                &one("10.1.0.5"),
                "{containerPort: 81, hostPort: 8004, hostIP: 10.0.0.6}",
            )
            + &pod(
                "every",
                &one("10.1.0.6"),
                "{containerPort: 90, hostPort: 8005}",
            )
            + &pod(
                "one",
                &one("10.1.0.7"),
                "{containerPort: 91, hostPort: 8005, hostIP: 10.0.0.5}",
            )
            + &pod(
                "twice",
                &one("10.1.0.8"),
                "{containerPort: 80, hostPort: 8006, hostIP: 10.0.0.5}, {containerPort: 81, hostPort: 8006, hostIP: 10.0.0.6}",
            )
            + &pod(
                "v4-any",
                &dual,
                "{containerPort: 92, hostPort: 8007, hostIP: 0.0.0.0}",
            );
        let state = store_of(&yaml).into_state();
        let compiled = compile(
            &state,
            &mut IdentityAllocator::default(),
            None,
            &Default::default(),
        );
        let ports = compiled.host_ports(&state.pods);
        let at = |port: u16, family: u8| {
            ports
                .get(&agent_common::NodePortKey {
                    port,
                    proto: agent_common::PROTO_TCP,
                    family,
                })
                .map(|t| (t.identity, t.port))
        };
        let v4 = |port: u16| at(port, agent_common::FAMILY_IPV4);
        let identity = |name: &str| compiled.pod_identity[&("x".to_string(), name.to_string())];
        assert_eq!(v4(8001), Some((identity("bound"), 80)));
        assert_eq!(v4(8002), None, "an IPv6 hostIP of a pod without IPv6");
        assert_eq!(v4(8003), None, "loopback");
        assert_eq!(v4(8004), None, "two pods behind one port");
        assert_eq!(v4(8005), Some((identity("every"), 90)));
        assert_eq!(v4(8006), None, "one pod's two ports behind one port");
        assert_eq!(v4(8007), Some((identity("v4-any"), 92)));
        assert_eq!(
            at(8007, agent_common::FAMILY_IPV6),
            None,
            "0.0.0.0 is IPv4 alone"
        );
        assert_eq!(ports.len(), 3, "{ports:?}");
    }

    #[test]
    fn a_policy_keeps_its_rule_id_while_others_come_and_go() {
        let mut ids = RuleIds::default();
        ids.sync(&policies(&["a/x", "b/y", "c/z"]));
        let before = ids.ids.clone();
        // A policy added before the others in order does not move them.
        ids.sync(&policies(&["a/a", "a/x", "b/y", "c/z"]));
        for (p, id) in &before {
            assert_eq!(ids.ids[p], *id, "{p}");
        }
        assert_eq!(ids.ids["a/a"], 3);
        // A deleted policy's id is reused by the next new one; the rest stay.
        ids.sync(&policies(&["a/a", "a/x", "c/z"]));
        assert_eq!(
            &*ids.policies[before["b/y"] as usize], "",
            "a gone policy names no id"
        );
        ids.sync(&policies(&["a/a", "a/x", "c/z", "d/w"]));
        assert_eq!(ids.ids["d/w"], before["b/y"]);
        assert_eq!(ids.ids["c/z"], before["c/z"]);
        assert_eq!(ids.ids.len(), 4);
        for (p, id) in &ids.ids {
            assert_eq!(
                &*ids.policies[*id as usize],
                p.as_str(),
                "rule id {id} names its policy"
            );
        }
        // The last id gone: the id-to-policy list ends with the last one used.
        ids.sync(&policies(&["a/x", "b/y", "c/z"]));
        assert_eq!(ids.policies.len(), 3);
        assert_eq!(ids.ids.len(), 3);
    }

    /// The pod's own annotation is the mode's source whenever it holds, the same mode as
    /// its namespace included; a `log` one holds only with `PodModeAnnotations::Any`.
    #[test]
    fn a_pods_annotation_is_the_source_whenever_it_holds() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: strict, annotations: {tollgate.io/mode: drop}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n";
        let pod = |ns: &str, name: &str, mode: Option<&str>| {
            let annotations = mode.map_or(String::new(), |m| {
                format!(", annotations: {{tollgate.io/mode: {m}}}")
            });
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{annotations}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.1.0.{}}}]}}\n",
                name.len()
            )
        };
        let yaml = yaml.to_string()
            + &pod("strict", "same", Some("drop"))
            + &pod("strict", "looser", Some("log"))
            + &pod("strict", "none", None)
            + &pod("plain", "default-too", Some("drop"))
            + &pod("lenient", "log-too", Some("log"));
        let yaml = yaml
            + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: lenient, annotations: {tollgate.io/mode: log}}\n";
        let state = store_of(&yaml).into_state();
        let source = |name: &str, annotations: PodModeAnnotations| {
            let options = CompileOptions {
                default_mode: Mode::Drop,
                pod_mode_annotations: annotations,
                node_addresses: NodeAddresses::default(),
            };
            let pod = state.pods.values().find(|p| p.name == name).unwrap();
            let (mode, source) = mode_and_source(&state, pod, &options);
            (mode.as_str(), source)
        };
        for annotations in [PodModeAnnotations::Stricter, PodModeAnnotations::Any] {
            assert_eq!(source("same", annotations), ("drop", "pod"));
            assert_eq!(source("none", annotations), ("drop", "namespace"));
            assert_eq!(source("default-too", annotations), ("drop", "pod"));
        }
        assert_eq!(
            source("looser", PodModeAnnotations::Stricter),
            ("drop", "namespace")
        );
        assert_eq!(source("looser", PodModeAnnotations::Any), ("log", "pod"));
        // A `log` annotation is ignored without `Any`, even where it agrees.
        assert_eq!(
            source("log-too", PodModeAnnotations::Stricter),
            ("log", "namespace")
        );
        assert_eq!(source("log-too", PodModeAnnotations::Any), ("log", "pod"));
    }
}
