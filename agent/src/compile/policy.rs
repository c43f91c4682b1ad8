//! NetworkPolicy semantics: which policies select a pod, whether that isolates it in a
//! direction, and the union of their rules as allow rules over identities and ipBlocks.
//!
//! Traffic between two pods is decided twice: at the source's egress and at the
//! destination's ingress. Each pod's rules here cover one side.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use agent_common::IDENTITY_FIRST_WORKLOAD;
use ipnet::IpNet;

use super::model::{MODE_ANNOTATION, WorkloadAddresses};
use super::{
    model::{ClusterState, Labels, Mode, PeerSpec, PodInfo, Policy, PortRef, PortSpec, RuleSpec},
    rules::{AllowRule, Peer, PortMatch},
    services::{self, Backend, Frontend, ServiceIdentities},
};

/// (namespace, name) of a pod.
pub type PodKey = (String, String);

/// Identities: pods with the same namespace and labels share one number; each Service has
/// one per address family. Numbers are stable while the (namespace, labels) or the Service
/// exists and never reused afterwards.
#[derive(Clone, Debug, Default)]
pub struct IdentityAllocator {
    /// By namespace, then labels: looked up without building a key (20,000 pods per
    /// compile).
    ids: BTreeMap<String, BTreeMap<Labels, u32>>,
    next: u32,
    services: ServiceIdentities,
}

impl IdentityAllocator {
    /// The identity of (namespace, labels), allocated on first use.
    pub fn get(&mut self, namespace: &str, labels: &Labels) -> u32 {
        if self.next < IDENTITY_FIRST_WORKLOAD {
            self.next = IDENTITY_FIRST_WORKLOAD;
        }
        if let Some(id) = self.ids.get(namespace).and_then(|m| m.get(labels)) {
            return *id;
        }
        let id = self.next;
        self.next += 1;
        self.ids
            .entry(namespace.to_string())
            .or_default()
            .insert(labels.clone(), id);
        id
    }

    fn retain(&mut self, used: &BTreeSet<u32>) {
        for m in self.ids.values_mut() {
            m.retain(|_, id| used.contains(id));
        }
        self.ids.retain(|_, m| !m.is_empty());
    }
}

/// One identity and the pods that have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    pub namespace: String,
    pub labels: Labels,
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

/// The compiled cluster. The identity maps are shared (`Arc`) between compiles that found
/// no pod or namespace change, so an unrelated policy change neither rebuilds nor diffs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Pod address (/32, /128) to identity: the `IDENTITIES` map.
    pub addresses: Arc<BTreeMap<IpNet, u32>>,
    /// Service virtual address (/32, /128) to the frontend's identity, also in `IDENTITIES`.
    pub service_addresses: Arc<BTreeMap<IpNet, u32>>,
    /// Service frontends (one per Service and address family with a virtual address).
    pub frontends: Arc<Vec<Frontend>>,
    pub pod_identity: Arc<BTreeMap<PodKey, u32>>,
    pub identities: Arc<BTreeMap<u32, IdentityInfo>>,
    /// Per compiled pod.
    pub pods: BTreeMap<PodKey, PodPolicy>,
    /// Rule ids (map values) to the policy they came from.
    pub rule_policies: Vec<String>,
    /// Pod addresses to their pod.
    pub address_pods: Arc<BTreeMap<IpAddr, PodKey>>,
}

impl Compiled {
    /// The policy a rule id came from.
    pub fn policy_of_rule(&self, rule: u32) -> Option<&str> {
        self.rule_policies.get(rule as usize).map(String::as_str)
    }

    /// The pod that owns an address, if any.
    pub fn pod_of_address(&self, ip: IpAddr) -> Option<&PodKey> {
        self.address_pods.get(&ip)
    }

    /// The frontend of a Service virtual address, if it is one.
    pub fn frontend_of_address(&self, ip: IpAddr) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.addresses.contains(&ip))
    }

    /// The frontend of a Service identity.
    pub fn frontend(&self, identity: u32) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.identity == identity)
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
    match parse(pod.annotations.get(MODE_ANNOTATION)) {
        Some(m) if m == base.0 => base,
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
    identities: &'a BTreeMap<u32, IdentityInfo>,
    rule_ids: BTreeMap<String, u32>,
    /// Labels of every namespace that has pods, computed once per compile.
    namespace_labels: BTreeMap<String, Labels>,
}

impl Context<'_> {
    /// Whether a pod peer of a policy in `policy_ns` selects the pods of an identity.
    fn peer_selects(
        &self,
        policy_ns: &str,
        namespaces: &Option<super::model::Selector>,
        pods: &Option<super::model::Selector>,
        info: &IdentityInfo,
    ) -> bool {
        (match namespaces {
            None => info.namespace == policy_ns,
            Some(sel) => sel.matches(&self.namespace_labels[&info.namespace]),
        }) && pods.as_ref().is_none_or(|sel| sel.matches(&info.labels))
    }

    /// Identities selected by a pod peer of a policy in `policy_ns`.
    fn selected_identities(
        &self,
        policy_ns: &str,
        namespaces: &Option<super::model::Selector>,
        pods: &Option<super::model::Selector>,
    ) -> Vec<u32> {
        self.identities
            .iter()
            .filter(|(_, info)| self.peer_selects(policy_ns, namespaces, pods, info))
            .map(|(id, _)| *id)
            .collect()
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
    for (id, info) in ctx.identities {
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
    /// Per pod: hash of (pod inputs, selecting policies), and the result.
    pods: BTreeMap<PodKey, (u64, PodPolicy)>,
    /// Identities as of the last compile, and a hash of the pods and namespaces they came from.
    identities: Option<(u64, Arc<IdentityPart>)>,
    /// Service frontends as of the last compile, and a hash of what they came from.
    frontends: Option<(u64, FrontendsPart)>,
    /// Per pod: hash of (egress rules, frontends, node addresses) and its Service rules.
    services: BTreeMap<PodKey, (u64, Vec<AllowRule>)>,
    rule_ids: RuleIds,
}

/// Rule ids (the value of `POLICY` entries, naming the policy that allowed a flow): a policy
/// keeps its id while it exists, so adding or deleting one policy changes no other pod's
/// compiled rules, and their map entries are not rewritten. Ids of deleted policies are
/// reused: a pod whose rules held one is recompiled anyway (its selecting policies changed).
#[derive(Clone, Debug, Default)]
struct RuleIds {
    ids: BTreeMap<String, u32>,
    free: Vec<u32>,
    next: u32,
}

impl RuleIds {
    /// Brings the ids in line with the policies that exist now.
    fn update(&mut self, policies: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .ids
            .keys()
            .filter(|p| !policies.contains(*p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(id) = self.ids.remove(&p) {
                self.free.push(id);
            }
        }
        // Lowest free ids first, so the id space stays dense.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        for p in policies {
            if !self.ids.contains_key(p) {
                let id = self.free.pop().unwrap_or_else(|| {
                    self.next += 1;
                    self.next - 1
                });
                self.ids.insert(p.clone(), id);
            }
        }
    }
}

/// Service frontends and their virtual addresses (to identities).
#[derive(Clone, Debug, Default)]
struct FrontendsPart {
    frontends: Arc<Vec<Frontend>>,
    addresses: Arc<BTreeMap<IpNet, u32>>,
}

/// Everything derived from pods and namespaces alone.
#[derive(Debug, Default)]
struct IdentityPart {
    addresses: Arc<BTreeMap<IpNet, u32>>,
    pod_identity: Arc<BTreeMap<PodKey, u32>>,
    identities: Arc<BTreeMap<u32, IdentityInfo>>,
    address_pods: Arc<BTreeMap<IpAddr, PodKey>>,
    peer_identities: BTreeMap<u32, IdentityInfo>,
    namespace_labels: BTreeMap<String, Labels>,
}

fn identity_part(state: &ClusterState, allocator: &mut IdentityAllocator) -> IdentityPart {
    let mut pod_identity = BTreeMap::new();
    let mut members: BTreeMap<u32, (&PodInfo, Vec<PodKey>)> = BTreeMap::new();
    let mut addresses = BTreeMap::new();
    let mut address_pods = BTreeMap::new();
    for (key, pod) in &state.pods {
        let id = allocator.get(&pod.namespace, &pod.labels);
        pod_identity.insert(key.clone(), id);
        let (_, pods) = members.entry(id).or_insert_with(|| (pod, Vec::new()));
        if !pod.ips.is_empty() {
            pods.push(key.clone());
        }
        for ip in &pod.ips {
            addresses.insert(single_address(*ip), id);
            address_pods.insert(*ip, key.clone());
        }
    }
    let identities: BTreeMap<u32, IdentityInfo> = members
        .into_iter()
        .map(|(id, (first, pods))| {
            let info = IdentityInfo {
                namespace: first.namespace.clone(),
                labels: first.labels.clone(),
                pods: Arc::new(pods),
            };
            (id, info)
        })
        .collect();
    allocator.retain(&identities.keys().copied().collect());
    // Identities without addressed pods cannot be peers.
    let peer_identities: BTreeMap<u32, IdentityInfo> = identities
        .iter()
        .filter(|(_, i)| !i.pods.is_empty())
        .map(|(id, i)| (*id, i.clone()))
        .collect();
    let namespace_labels: BTreeMap<String, Labels> = peer_identities
        .values()
        .map(|i| i.namespace.clone())
        .chain(state.namespaces.keys().cloned())
        .map(|ns| {
            let labels = state.namespace_labels(&ns);
            (ns, labels)
        })
        .collect();
    IdentityPart {
        addresses: Arc::new(addresses),
        pod_identity: Arc::new(pod_identity),
        identities: Arc::new(identities),
        address_pods: Arc::new(address_pods),
        peer_identities,
        namespace_labels,
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
/// change: a policy change recompiles only the pods that policy selects (before or after).
pub fn compile_cached(
    state: &ClusterState,
    allocator: &mut IdentityAllocator,
    targets: Option<&BTreeSet<PodKey>>,
    options: &CompileOptions,
    cache: &mut CompileCache,
) -> Compiled {
    let mut compiled = Compiled::default();
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
    let part = match &cache.identities {
        Some((h, part)) if *h == pods_hash => part.clone(),
        _ => {
            let part = Arc::new(identity_part(state, allocator));
            cache.identities = Some((pods_hash, part.clone()));
            part
        }
    };
    compiled.addresses = part.addresses.clone();
    compiled.pod_identity = part.pod_identity.clone();
    compiled.identities = part.identities.clone();
    compiled.address_pods = part.address_pods.clone();

    // Service frontends depend on Services, EndpointSlices and (for selectors, named target
    // ports and backend pods) the pods.
    let frontends_hash = hash_of(&(pods_hash, &state.services, &state.endpoint_slices));
    let services_part = match &cache.frontends {
        Some((h, part)) if *h == frontends_hash => part.clone(),
        _ => {
            let f = services::frontends(state, &part.address_pods, &mut allocator.services);
            let addresses = f
                .iter()
                .flat_map(|f| {
                    f.addresses
                        .iter()
                        .map(|ip| (single_address(*ip), f.identity))
                })
                .collect();
            let built = FrontendsPart {
                frontends: Arc::new(f),
                addresses: Arc::new(addresses),
            };
            cache.frontends = Some((frontends_hash, built.clone()));
            built
        }
    };
    let frontends = services_part.frontends.clone();
    compiled.frontends = services_part.frontends;
    compiled.service_addresses = services_part.addresses;

    let peer_identities = &part.peer_identities;
    let namespace_labels = part.namespace_labels.clone();
    let mut ctx = Context {
        state,
        identities: peer_identities,
        rule_ids: BTreeMap::new(),
        namespace_labels,
    };
    cache
        .rule_ids
        .update(&state.policies.values().map(Policy::id).collect());
    ctx.rule_ids = cache.rule_ids.ids.clone();
    compiled.rule_policies = {
        let len = ctx.rule_ids.values().max().map_or(0, |m| *m as usize + 1);
        let mut v = vec![String::new(); len];
        for (name, id) in &ctx.rule_ids {
            v[*id as usize] = name.clone();
        }
        v
    };

    // The universe every pod's result depends on.
    let uses_pod_ports = state.policies.values().any(|p| {
        p.egress.iter().flatten().any(|r| {
            r.ports
                .iter()
                .any(|port| matches!(port.port, PortRef::Named(_)))
        })
    });
    // Namespace labels are not part of it: a pod depends only on which namespaces its
    // policies' namespaceSelectors match (`namespace_matches` below), so relabelling a
    // namespace recompiles only the pods whose selectors it moves.
    let universe = hash_of(&(
        peer_identities
            .iter()
            .map(|(id, i)| (*id, &i.namespace, &i.labels))
            .collect::<Vec<_>>(),
        uses_pod_ports.then(|| {
            state
                .pods
                .values()
                .map(|p| (&p.ips, &p.ports))
                .collect::<Vec<_>>()
        }),
    ));
    if universe != cache.universe {
        cache.pods.clear();
        cache.universe = universe;
    }

    let mut policies_by_namespace: BTreeMap<&str, Vec<&Policy>> = BTreeMap::new();
    for p in state.policies.values() {
        policies_by_namespace
            .entry(p.namespace.as_str())
            .or_default()
            .push(p);
    }
    let mut namespace_matches: BTreeMap<String, u64> = BTreeMap::new();
    let pods: Box<dyn Iterator<Item = (&PodKey, &PodInfo)>> = match targets {
        Some(t) => Box::new(t.iter().filter_map(|k| state.pods.get_key_value(k))),
        None => Box::new(state.pods.iter()),
    };
    for (key, pod) in pods {
        let selecting: Vec<&Policy> = policies_by_namespace
            .get(pod.namespace.as_str())
            .into_iter()
            .flatten()
            .filter(|p| p.pod_selector.matches(&pod.labels))
            .copied()
            .collect();
        let mode = mode_of(state, pod, options);
        let namespaces: Vec<u64> = selecting
            .iter()
            .map(|p| {
                *namespace_matches
                    .entry(p.id())
                    .or_insert_with(|| hash_of(&matched_namespaces(p, &ctx.namespace_labels)))
            })
            .collect();
        let input = hash_of(&(
            &pod.labels,
            &pod.ports,
            &pod.ips,
            pod.host_network,
            &selecting,
            mode as u8,
            namespaces,
        ));
        let mut result = match cache.pods.get(key) {
            Some((h, cached)) if *h == input => cached.clone(),
            _ => {
                let result = compile_pod(&ctx, pod, &selecting, mode);
                cache.pods.insert(key.clone(), (input, result.clone()));
                result
            }
        };
        if result.isolated_egress {
            let node = options.node_addresses.of(pod.node_name.as_deref());
            let service_input = hash_of(&(&result.egress, frontends_hash, node));
            result.services = match cache.services.get(key) {
                Some((h, rules)) if *h == service_input => rules.clone(),
                _ => {
                    let identity_of = |b: &Backend| {
                        // A pod reaching itself through its Service is not enforced
                        // (upstream's AllowLoopback), like the node itself.
                        if b.pod.as_ref() == Some(key) {
                            agent_common::IDENTITY_HOST
                        } else {
                            backend_identity(&part, node, b)
                        }
                    };
                    let rules = services::service_rules(&result.egress, &frontends, &identity_of);
                    cache
                        .services
                        .insert(key.clone(), (service_input, rules.clone()));
                    rules
                }
            };
        }
        compiled.pods.insert(key.clone(), result);
    }
    if let Some(t) = targets {
        cache.pods.retain(|k, _| t.contains(k));
        cache.services.retain(|k, _| t.contains(k));
    }
    compiled
}

/// For each namespaceSelector of a policy's peers, the namespaces it matches: all a compiled
/// pod's rules depend on of the namespaces' labels.
fn matched_namespaces<'a>(
    policy: &Policy,
    namespace_labels: &'a BTreeMap<String, Labels>,
) -> Vec<Vec<&'a String>> {
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
            } => Some(
                namespace_labels
                    .iter()
                    .filter(|(_, labels)| selector.matches(labels))
                    .map(|(name, _)| name)
                    .collect(),
            ),
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

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_policy_keeps_its_rule_id_while_others_come_and_go() {
        let mut ids = RuleIds::default();
        ids.update(&set(&["a/x", "b/y", "c/z"]));
        let before = ids.ids.clone();
        // A policy added before the others in order does not move them.
        ids.update(&set(&["a/a", "a/x", "b/y", "c/z"]));
        for (p, id) in &before {
            assert_eq!(ids.ids[p], *id, "{p}");
        }
        assert_eq!(ids.ids["a/a"], 3);
        // A deleted policy's id is reused by the next new one; the rest stay.
        ids.update(&set(&["a/a", "a/x", "c/z"]));
        ids.update(&set(&["a/a", "a/x", "c/z", "d/w"]));
        assert_eq!(ids.ids["d/w"], before["b/y"]);
        assert_eq!(ids.ids["c/z"], before["c/z"]);
        assert_eq!(ids.ids.len(), 4);
    }
}
