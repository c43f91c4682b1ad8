//! The desired-state model the compiler works on: namespaces, pods, validated
//! NetworkPolicies, Services with their EndpointSlices, and Nodes, independent of where they
//! came from (files, the Kubernetes API).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use ipnet::IpNet;

/// Labels of a pod or namespace: a few pairs, sorted by key. A vector, not a `BTreeMap`: a
/// map's node costs over 500 bytes even for two labels, and 20,000 pods carry them.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn new() -> Labels {
        Labels(Vec::new())
    }

    /// The value of a label.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets a label; returns the value it had.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// (key, value) pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Labels {
        let map: BTreeMap<String, String> = iter.into_iter().collect();
        Labels::from(map)
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Labels {
        let mut v: Vec<(String, String)> = map.into_iter().collect();
        v.shrink_to_fit();
        Labels(v)
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Labels {
        pairs.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// The label the API server gives every namespace, its name as the value.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A label selector (`matchLabels` AND every `matchExpressions` requirement). The empty
/// selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub expressions: Vec<Requirement>,
}

/// One `matchExpressions` requirement.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

/// Operators of `matchExpressions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Whether the selector selects an object with `labels`.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // NotIn also holds when the label is absent, as in Kubernetes.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// Transport protocols of NetworkPolicy ports.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    Tcp,
    Udp,
    /// Accepted, compiled, but this kernel has no SCTP: reported as unsupported.
    Sctp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => agent_common::PROTO_TCP,
            Protocol::Udp => agent_common::PROTO_UDP,
            Protocol::Sctp => agent_common::PROTO_SCTP,
        }
    }

    /// Kubernetes spelling: `TCP`, `UDP`, `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses the Kubernetes spelling.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// The port part of a NetworkPolicy port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRef {
    /// No `port`: every port of the protocol.
    Any,
    /// `port` (with `endPort`: `first..=last`).
    Range(u16, u16),
    /// A named container port, resolved against each destination pod.
    Named(String),
}

/// One entry of a rule's `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortRef,
}

/// One entry of a rule's `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerSpec {
    /// Pods chosen by selectors. `namespaces: None` means the policy's own namespace;
    /// `pods: None` means every pod of the chosen namespaces.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// Addresses in `cidr` but in none of `except`, pods included.
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

/// One ingress or egress rule. Empty `peers`: every peer. Empty `ports`: every port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleSpec {
    pub peers: Vec<PeerSpec>,
    pub ports: Vec<PortSpec>,
}

/// A validated NetworkPolicy, its policyTypes already defaulted: `ingress` is `Some` when
/// the policy applies to ingress (possibly with no rules: deny all), likewise `egress`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub ingress: Option<Vec<RuleSpec>>,
    pub egress: Option<Vec<RuleSpec>>,
    /// `tollgate.io/advised-for`: the workload (`NAMESPACE/NAME`) `tollgate advise` wrote
    /// it for, so advising again updates it instead of writing a second one.
    pub advised_for: Option<String>,
}

impl Policy {
    /// `NAMESPACE/NAME`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A named container port of a pod.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod as policy sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`: names the pod's cgroup directory on its node.
    pub uid: String,
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
    /// Pod IPs (`status.podIPs`); empty while pending. Host-network pods share the node's
    /// addresses, which are not theirs to name: they have none here.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    /// The top owning controller (see `workload_name`).
    pub workload: String,
    pub host_network: bool,
    pub node_name: Option<String>,
    /// Being deleted (`metadata.deletionTimestamp`): its addresses may be another pod's
    /// already.
    pub terminating: bool,
    /// Its `Ready` condition is there and not `True` (a pod written without conditions
    /// counts as ready): the EndpointSlice controller would not make it a ready endpoint.
    #[serde(default)]
    pub unready: bool,
    /// `metadata.creationTimestamp`, seconds since 1970 (0 when not written).
    pub created: i64,
    /// `hostPort`s on every address of its node (no `hostIP`): protocol, host port and
    /// container port. The CNI's portmap DNATs a connection to one to the pod.
    #[serde(default)]
    pub host_ports: Vec<(Protocol, u16, u16)>,
    /// `hostPort`s bound to one address of the node (`hostIP`, not loopback): protocol,
    /// host port, container port and that address.
    #[serde(default)]
    pub host_ports_bound: Vec<(Protocol, u16, u16, IpAddr)>,
}

impl PodInfo {
    /// `NAMESPACE/NAME`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The number of a named port for a protocol.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// A namespace as policy sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
}

/// The port a Service port forwards to on its backends.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum TargetPort {
    Number(u16),
    /// A named container port, resolved per backend pod.
    Named(String),
}

/// One port of a Service.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ServicePort {
    /// `name`, empty for a Service with a single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target: TargetPort,
    /// `nodePort` of a NodePort or LoadBalancer Service.
    #[serde(default)]
    pub node_port: Option<u16>,
}

/// A Service as policy sees it: its virtual addresses and ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (or `clusterIP`), then its external IPs and load-balancer
    /// addresses (which kube-proxy DNATs alike); empty for headless and ExternalName
    /// Services, which have no virtual address to decide.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `spec.selector`; `None` for a Service whose endpoints are managed by hand.
    pub selector: Option<Labels>,
}

impl ServiceInfo {
    /// `NAMESPACE/NAME`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (unset counts as ready, as in Kubernetes).
    pub ready: bool,
    /// `conditions.serving` (unset: as `ready`).
    pub serving: bool,
    pub terminating: bool,
    /// `targetRef` when it names a Pod: (namespace, name), the slice's namespace when the
    /// reference names none. A claim only: the backend is whoever holds the address
    /// (`services::service_frontends`).
    pub pod: Option<(String, String)>,
}

/// One port of an EndpointSlice: the backends' port for the Service port of that name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A `discovery.k8s.io/v1` EndpointSlice: backends of one Service, as kube-proxy sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct EndpointSliceInfo {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

/// A Node: its name and addresses (`status.addresses` that are IP addresses).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`): the networks its pods are addressed from.
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

/// Enforcement mode of a workload.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Mode {
    /// Evaluate, count and sample would-drops, let them pass.
    #[default]
    Log,
    /// Drop what policy does not allow.
    Drop,
}

impl Mode {
    /// `log` or `drop`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Log => "log",
            Mode::Drop => "drop",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "log" => Ok(Mode::Log),
            "drop" => Ok(Mode::Drop),
            other => Err(format!("unknown mode {other:?} (expected log or drop)")),
        }
    }
}

/// A pod's own mode annotation key (and its namespace's).
pub const MODE_ANNOTATION: &str = "tollgate.io/mode";

/// What a mode override applies to: `*`, `NAMESPACE/*`, or `NAMESPACE/NAME` (a workload:
/// every pod of that Deployment, StatefulSet..., now and after its rollouts; or a pod of
/// that name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    All,
    Namespace(String),
    Named(String, String),
}

impl Target {
    /// Parses a target, with a clear error for anything else.
    pub fn parse(s: &str) -> Result<Target, String> {
        if s == "*" {
            return Ok(Target::All);
        }
        match s.split_once('/') {
            Some((ns, "*")) if dns_label(ns) => Ok(Target::Namespace(ns.into())),
            Some((ns, name)) if dns_label(ns) && valid_name(name) => {
                Ok(Target::Named(ns.into(), name.into()))
            }
            _ => Err(format!(
                "{s:?} is not a target: use NAMESPACE/NAME (a workload or a pod), NAMESPACE/* or *"
            )),
        }
    }

    /// How specific the target is for a pod it matches (higher wins): a pod's own name over
    /// its workload's, over its namespace, over everything.
    pub fn rank(&self, pod: &PodInfo) -> u8 {
        match self {
            Target::All => 0,
            Target::Namespace(_) => 1,
            Target::Named(_, name) if *name == pod.name => 3,
            Target::Named(..) => 2,
        }
    }

    /// Whether the target covers a pod.
    pub fn matches(&self, pod: &PodInfo) -> bool {
        match self {
            Target::All => true,
            Target::Namespace(ns) => *ns == pod.namespace,
            Target::Named(ns, name) => {
                *ns == pod.namespace && (*name == pod.name || *name == pod.workload)
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::All => f.write_str("*"),
            Target::Namespace(ns) => write!(f, "{ns}/*"),
            Target::Named(ns, name) => write!(f, "{ns}/{name}"),
        }
    }
}

/// A Kubernetes object name (a DNS subdomain).
pub fn valid_name(s: &str) -> bool {
    dns_subdomain(s)
}

/// A DNS label as Kubernetes checks it (namespace names): 1 to 63 lowercase letters, digits
/// and `-`, a letter or digit at both ends.
pub fn dns_label(s: &str) -> bool {
    s.len() <= 63 && dns_part(s)
}

/// A DNS subdomain as Kubernetes checks it (most object names, label key prefixes): parts
/// as in a DNS label joined by `.`, at most 253 characters in all (Kubernetes does not
/// limit a part to 63 here).
pub fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_part)
}

fn dns_part(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
}

/// The most specific of several (target, mode) pairs that covers a pod.
pub fn most_specific<'a, T: 'a>(
    pod: &PodInfo,
    targets: impl IntoIterator<Item = (&'a Target, T)>,
) -> Option<T> {
    targets
        .into_iter()
        .filter(|(t, _)| t.matches(pod))
        .max_by_key(|(t, _)| t.rank(pod))
        .map(|(_, v)| v)
}

/// A cluster-scoped `tollgate.io/v1alpha1` `ModeOverride`: the security team's decision for
/// a target, above every annotation, below only a node-local override.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeOverrideInfo {
    pub name: String,
    pub target: Target,
    pub mode: Mode,
    pub reason: String,
}

/// A `tollgate.io/v1alpha1` `EgressAllowlist`: domains the pods it selects (in its own
/// namespace) may reach outside the cluster, on top of what NetworkPolicies allow. It
/// isolates them for egress to addresses outside the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EgressAllowlistInfo {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub egress: Vec<AllowlistRule>,
    /// `tollgate.io/advised-for`, as on `Policy`.
    pub advised_for: Option<String>,
}

/// One `spec.egress[]` entry. Empty `ports`: every port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowlistRule {
    pub domains: Vec<crate::dns::DomainPattern>,
    pub ports: Vec<PortSpec>,
}

impl EgressAllowlistInfo {
    /// `NAMESPACE/NAME`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The addresses a workload may send from; a packet leaving it from any other is spoofed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadAddresses {
    /// Its pod IPs (at most one per family is kept: Kubernetes gives no more). With none
    /// known yet, every packet it sends counts as spoofed.
    Pod(Vec<IpAddr>),
    /// A host-network workload: any address of the node.
    Host,
}

impl Default for WorkloadAddresses {
    fn default() -> Self {
        WorkloadAddresses::Pod(Vec::new())
    }
}

/// Everything the compiler needs: the cluster as the sources see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// By (namespace, name).
    pub pods: BTreeMap<(String, String), PodInfo>,
    /// By (namespace, name).
    pub policies: BTreeMap<(String, String), Policy>,
    /// By (namespace, name).
    pub services: BTreeMap<(String, String), ServiceInfo>,
    /// By (namespace, name).
    pub endpoint_slices: BTreeMap<(String, String), EndpointSliceInfo>,
    /// By name.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Cluster mode overrides by object name.
    pub mode_overrides: BTreeMap<String, ModeOverrideInfo>,
    /// By (namespace, name).
    pub egress_allowlists: BTreeMap<(String, String), EgressAllowlistInfo>,
    /// A source's fingerprint of `namespaces` and `pods` (equal fingerprints, equal pods and
    /// namespaces), so the compiler need not hash 20,000 pods to learn they did not change.
    /// `None`: the compiler works it out itself.
    pub pods_version: Option<u64>,
    /// Likewise of `services` and `endpoint_slices`.
    pub services_version: Option<u64>,
    /// Which objects changed, change by change, as far back as the source keeps them: lets
    /// the compiler and the reconciler touch only those (a watch event changes one object in
    /// 20,000). Empty for a source that rebuilds the state from scratch.
    pub changes: ChangeLog,
}

/// An object the change log names: the kinds compiled results depend on object by object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Changed {
    Pod((String, String)),
    Namespace(String),
    Service((String, String)),
    EndpointSlice((String, String)),
    Policy((String, String)),
    ModeOverride(String),
}

/// The objects that changed since a position in a [`ChangeLog`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    pub pods: BTreeSet<(String, String)>,
    pub namespaces: BTreeSet<String>,
    pub services: BTreeSet<(String, String)>,
    pub endpoint_slices: BTreeSet<(String, String)>,
    pub policies: BTreeSet<(String, String)>,
    pub mode_overrides: BTreeSet<String>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
            && self.namespaces.is_empty()
            && self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && self.policies.is_empty()
            && self.mode_overrides.is_empty()
    }
}

/// Where a reader stands in a [`ChangeLog`]: compare with `ChangeLog::position`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LogPosition {
    log: u64,
    seq: u64,
}

/// A bounded log of changed objects, kept by a store that is updated in place (the
/// Kubernetes source). Each log has a process-unique id, so a position taken in one store's
/// log is never read against another's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeLog {
    /// 0: no log (every reader starts over).
    log: u64,
    /// Changes after `base` are all in `entries`.
    base: u64,
    seq: u64,
    entries: VecDeque<(u64, Changed)>,
}

impl ChangeLog {
    /// Beyond this many changes a reader that fell behind starts over: a relist, not a
    /// watch event.
    const KEEP: usize = 8192;

    /// A new, empty log.
    pub fn new() -> ChangeLog {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ChangeLog {
            log: NEXT.fetch_add(1, Ordering::Relaxed),
            ..ChangeLog::default()
        }
    }

    /// Unique in the process among logs made by `new` (0: no log).
    pub fn id(&self) -> u64 {
        self.log
    }

    pub fn record(&mut self, what: Changed) {
        if self.log == 0 {
            return;
        }
        self.seq += 1;
        self.entries.push_back((self.seq, what));
        if self.entries.len() > Self::KEEP
            && let Some((seq, _)) = self.entries.pop_front()
        {
            self.base = seq;
        }
    }

    /// Where the log stands now; `None` without a log.
    pub fn position(&self) -> Option<LogPosition> {
        (self.log != 0).then_some(LogPosition {
            log: self.log,
            seq: self.seq,
        })
    }

    /// The objects changed after `from`; `None` when the log does not reach back that far
    /// (or is another log), and the reader must start over.
    pub fn since(&self, from: Option<LogPosition>) -> Option<ChangeSet> {
        let from = from?;
        if self.log == 0 || from.log != self.log || from.seq < self.base || from.seq > self.seq {
            return None;
        }
        let mut set = ChangeSet::default();
        let skip = (from.seq - self.base) as usize;
        for (_, what) in self.entries.iter().skip(skip) {
            match what {
                Changed::Pod(k) => set.pods.insert(k.clone()),
                Changed::Namespace(n) => set.namespaces.insert(n.clone()),
                Changed::Service(k) => set.services.insert(k.clone()),
                Changed::EndpointSlice(k) => set.endpoint_slices.insert(k.clone()),
                Changed::Policy(k) => set.policies.insert(k.clone()),
                Changed::ModeOverride(n) => set.mode_overrides.insert(n.clone()),
            };
        }
        Some(set)
    }
}

impl ClusterState {
    /// The cluster `ModeOverride` that applies to a pod, if any: the most specific one (on a
    /// tie, the last by object name).
    pub fn mode_override_for(&self, pod: &PodInfo) -> Option<&ModeOverrideInfo> {
        most_specific(pod, self.mode_overrides.values().map(|o| (&o.target, o)))
    }

    /// Labels of a namespace. A namespace the state does not list still has the label
    /// `kubernetes.io/metadata.name`, which the API server sets on every namespace.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        let mut labels = self
            .namespaces
            .get(namespace)
            .map(|ns| ns.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), namespace.into());
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let l = labels(&[("app", "ledger"), ("tier", "db")]);
        assert!(Selector::default().matches(&l), "empty selects all");
        assert!(Selector::default().matches(&Labels::new()));
        let s = |expressions| Selector {
            match_labels: BTreeMap::new(),
            expressions,
        };
        assert!(s(vec![req("app", Operator::In, &["ledger", "pot"])]).matches(&l));
        assert!(!s(vec![req("app", Operator::In, &["pot"])]).matches(&l));
        assert!(!s(vec![req("app", Operator::NotIn, &["ledger"])]).matches(&l));
        assert!(
            s(vec![req("team", Operator::NotIn, &["x"])]).matches(&l),
            "absent key"
        );
        assert!(s(vec![req("tier", Operator::Exists, &[])]).matches(&l));
        assert!(!s(vec![req("team", Operator::Exists, &[])]).matches(&l));
        assert!(s(vec![req("team", Operator::DoesNotExist, &[])]).matches(&l));
        let both = Selector {
            match_labels: [("app".to_string(), "ledger".to_string())].into(),
            expressions: vec![req("tier", Operator::In, &["web"])],
        };
        assert!(!both.matches(&l), "matchLabels AND matchExpressions");
    }

    #[test]
    fn every_namespace_has_its_name_label() {
        let state = ClusterState::default();
        assert_eq!(
            state.namespace_labels("x").get(NAMESPACE_NAME_LABEL),
            Some(&"x".to_string())
        );
    }
}
