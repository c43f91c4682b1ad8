//! Services: a flow to a Service's virtual address is decided at the source's egress as a flow
//! to the Service's backends, on their target port, the way it looks after kube-proxy's
//! DNAT. See `docs/services.md` for why the decision is taken here and not after the DNAT.
//!
//! Each (Service, address family) gets an identity of its own (`IDENTITY_SERVICE_BASE` and
//! up), its virtual addresses map to it in the identity trie, and a source workload's egress
//! ruleset gets one entry per Service port whose every backend its egress rules allow. Which
//! backend kube-proxy picks is random per connection (`-m statistic`), so a port is allowed
//! only when the policy allows all of them: the decision never depends on the draw.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use agent_common::{IDENTITY_HOST, IDENTITY_WORLD};
use imbl::OrdMap;
use ipnet::IpNet;

use super::{
    model::{
        ClusterState, EndpointSliceInfo, Labels, PodInfo, Protocol, ServiceInfo, ServicePort,
        TargetPort,
    },
    policy::PodKey,
    rules::{AllowRule, Peer, PortMatch},
};

/// One backend of a Service port: where kube-proxy may DNAT a connection to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: IpAddr,
    /// The target port, resolved for this backend (named `targetPort`s per pod).
    pub port: u16,
    /// The pod behind the address, when it is one of the cluster's.
    pub pod: Option<PodKey>,
}

/// One port of a Service frontend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrontendPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// The NodePort that leads to this port too, on the node's addresses of this family.
    pub node_port: Option<u16>,
    /// Ready backends of this family (serving, terminating ones when none is ready, as
    /// kube-proxy does). Empty: connections are rejected by kube-proxy, and denied here.
    pub backends: Vec<Backend>,
}

/// The virtual addresses of one Service in one address family, and its ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// (namespace, name) of the Service.
    pub service: (String, String),
    pub identity: u32,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<FrontendPort>,
}

impl Frontend {
    /// `NAMESPACE/NAME` of the Service.
    pub fn service_id(&self) -> String {
        format!("{}/{}", self.service.0, self.service.1)
    }

    /// The port of the frontend a flow to `port`/`proto` uses.
    pub fn port(&self, proto: u8, port: u16) -> Option<&FrontendPort> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol.number() == proto)
    }
}

/// Stable identities of (namespace, Service, IPv6?), from `IDENTITY_SERVICE_BASE` up, never
/// reused while the Service exists.
#[derive(Clone, Debug, Default)]
pub struct ServiceIdentities {
    ids: BTreeMap<(String, String, bool), u32>,
    next: u32,
    /// The numbers an earlier agent gave Service addresses (`seed`), taken again by the
    /// Services that still have them.
    previous: BTreeMap<IpAddr, u32>,
    /// Numbers taken from `previous`.
    taken: std::collections::BTreeSet<u32>,
}

impl ServiceIdentities {
    fn get(&mut self, service: &ServiceInfo, addresses: &[IpAddr], v6: bool) -> u32 {
        let key = (service.namespace.clone(), service.name.clone(), v6);
        if let Some(id) = self.ids.get(&key) {
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
                agent_common::IDENTITY_SERVICE_BASE + self.next - 1
            }
        };
        self.ids.insert(key, id);
        id
    }

    /// Takes up the Service identities an earlier agent left in the maps (by address), so
    /// what it counted and tracked keeps its meaning; new ones are numbered after them.
    pub(crate) fn seed(&mut self, previous: BTreeMap<IpAddr, u32>) {
        if let Some(max) = previous.values().max() {
            self.next = self.next.max(max + 1 - agent_common::IDENTITY_SERVICE_BASE);
        }
        self.previous = previous;
    }

    /// The first compile is done: the earlier agent's numbers are all taken up or gone.
    pub(crate) fn forget_previous(&mut self) {
        self.previous.clear();
        self.taken.clear();
    }

    pub(crate) fn retain(&mut self, used: &BTreeSet<u32>) {
        self.ids.retain(|_, id| used.contains(id));
    }

    /// Releases the identities of a Service's address families that have no frontend now.
    pub fn release_unused(&mut self, service: &(String, String), frontends: &[Frontend]) {
        for v6 in [false, true] {
            let key = (service.0.clone(), service.1.clone(), v6);
            if let Some(id) = self.ids.get(&key)
                && !frontends.iter().any(|f| f.identity == *id)
            {
                self.ids.remove(&key);
            }
        }
    }
}

fn ready_backends<'a>(
    slices: &[&'a EndpointSliceInfo],
    name: &str,
    protocol: Protocol,
    v6: bool,
) -> Vec<(IpAddr, u16, Option<&'a PodKey>, bool)> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
        else {
            continue;
        };
        for e in &slice.endpoints {
            for ip in e.addresses.iter().filter(|ip| ip.is_ipv6() == v6) {
                // (ready, or serving while terminating: the fallback kube-proxy uses when a
                // Service has no ready endpoint at all)
                if e.ready || (e.serving && e.terminating) {
                    out.push((*ip, port.port, e.pod.as_ref(), e.ready));
                }
            }
        }
    }
    if out.iter().any(|b| b.3) {
        out.retain(|b| b.3);
    }
    out
}

/// The backends of a Service port without EndpointSlices in the cluster state: the endpoints
/// the EndpointSlice controller would write for the pods its selector picks (a host-network
/// pod at its node's addresses; ready: the pod is ready and not being deleted; serving and
/// terminating: ready and being deleted), of which kube-proxy takes the ready ones, or with
/// none ready the serving ones that are terminating, as `ready_backends` does for slices.
fn selected_backends(
    state: &ClusterState,
    svc: &ServiceInfo,
    selector: &Labels,
    port: &ServicePort,
    v6: bool,
) -> Vec<Backend> {
    let mut out = Vec::new();
    let mut any_ready = false;
    // Pods are keyed by (namespace, name): the namespace's pods are one range.
    let candidates = state
        .pods
        .range((svc.namespace.clone(), String::new())..)
        .take_while(|((ns, _), _)| *ns == svc.namespace);
    for (key, pod) in candidates {
        if pod.unready || !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
            continue;
        }
        let target = match &port.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Named(name) => pod.named_port(name, port.protocol),
        };
        let Some(target) = target else { continue };
        // A host-network pod's address is its node's first of the family (kubelet's
        // `status.podIPs` for it).
        let addresses: Vec<IpAddr> = if pod.host_network {
            pod.node_name
                .as_ref()
                .and_then(|n| state.nodes.get(n))
                .and_then(|node| node.addresses.iter().find(|ip| ip.is_ipv6() == v6))
                .into_iter()
                .copied()
                .collect()
        } else {
            pod.ips.clone()
        };
        let ready = !pod.terminating;
        for ip in addresses.iter().filter(|ip| ip.is_ipv6() == v6) {
            any_ready |= ready;
            out.push((
                ready,
                Backend {
                    ip: *ip,
                    port: target,
                    pod: Some(key.clone()),
                },
            ));
        }
    }
    out.into_iter()
        .filter(|(ready, _)| *ready || !any_ready)
        .map(|(_, b)| b)
        .collect()
}

/// Whether `pod` holds `ip`: one of its own addresses, or for a host-network pod one of its
/// node's.
fn holds(state: &ClusterState, pod: &PodInfo, ip: IpAddr) -> bool {
    pod.ips.contains(&ip)
        || (pod.host_network
            && pod
                .node_name
                .as_ref()
                .and_then(|n| state.nodes.get(n))
                .is_some_and(|node| node.addresses.contains(&ip)))
}

/// The frontends of one Service (one per address family it has a virtual address in).
/// Backends come from the Service's EndpointSlices (what kube-proxy programs); a Service that
/// has none in the cluster state but a selector gets the pods it selects, with named target
/// ports resolved per pod. Identities are allocated as
/// needed; releasing those of a family that went is the caller's.
pub fn service_frontends(
    state: &ClusterState,
    svc: &ServiceInfo,
    own_slices: &[&EndpointSliceInfo],
    address_pods: &OrdMap<IpAddr, PodKey>,
    ids: &mut ServiceIdentities,
) -> Vec<Frontend> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let addresses: Vec<IpAddr> = svc
            .cluster_ips
            .iter()
            .filter(|ip| ip.is_ipv6() == v6)
            .copied()
            .collect();
        if addresses.is_empty() {
            continue;
        }
        let identity = ids.get(svc, &addresses, v6);
        let ports = svc
            .ports
            .iter()
            .map(|p| {
                let mut backends: Vec<Backend> = if !own_slices.is_empty() {
                    ready_backends(own_slices, &p.name, p.protocol, v6)
                        .into_iter()
                        .map(|(ip, port, pod, _)| Backend {
                            ip,
                            port,
                            // kube-proxy forwards to the address: the backend is the pod
                            // holding it. The slice's `targetRef` only tells apart pods that
                            // share one (host-network pods share their node's), and only
                            // when the pod it names holds the address: whoever writes a
                            // slice (for a Service without a selector, its namespace's
                            // users) must not pass one pod's address off as another's.
                            pod: pod
                                .filter(|k| state.pods.get(*k).is_some_and(|p| holds(state, p, ip)))
                                .cloned()
                                .or_else(|| address_pods.get(&ip).cloned()),
                        })
                        .collect()
                } else if let Some(selector) = &svc.selector {
                    selected_backends(state, svc, selector, p, v6)
                } else {
                    Vec::new()
                };
                backends.sort();
                backends.dedup();
                FrontendPort {
                    name: p.name.clone(),
                    protocol: p.protocol,
                    port: p.port,
                    node_port: p.node_port,
                    backends,
                }
            })
            .collect();
        out.push(Frontend {
            service: (svc.namespace.clone(), svc.name.clone()),
            identity,
            addresses,
            ports,
        });
    }
    out
}

/// A source's egress rules, indexed for "does any rule allow this backend?".
pub struct RuleIndex<'a> {
    by_identity: HashMap<u32, Vec<(PortMatch, u32)>>,
    cidrs: Vec<(&'a IpNet, &'a [IpNet], PortMatch, u32)>,
}

fn port_matches(m: PortMatch, proto: u8, port: u16) -> bool {
    match m {
        PortMatch::Any => true,
        PortMatch::Protocol(p) => p == proto,
        PortMatch::Range {
            proto: p,
            first,
            last,
        } => p == proto && (first..=last).contains(&port),
    }
}

impl<'a> RuleIndex<'a> {
    pub fn new(rules: &'a [AllowRule]) -> Self {
        let mut index = RuleIndex {
            by_identity: HashMap::new(),
            cidrs: Vec::new(),
        };
        for r in rules {
            match &r.peer {
                Peer::Identity(id) => index
                    .by_identity
                    .entry(*id)
                    .or_default()
                    .push((r.ports, r.rule_id)),
                Peer::Cidr { net, except } => index.cidrs.push((net, except, r.ports, r.rule_id)),
            }
        }
        index
    }

    /// The rule that allows a backend (identity and address) on `proto`/`port`, if any.
    fn allows(&self, identity: u32, ip: &IpAddr, proto: u8, port: u16) -> Option<u32> {
        if identity != IDENTITY_WORLD
            && let Some(found) = self
                .by_identity
                .get(&identity)
                .and_then(|v| v.iter().find(|(m, _)| port_matches(*m, proto, port)))
        {
            return Some(found.1);
        }
        self.cidrs
            .iter()
            .find(|(net, except, m, _)| {
                port_matches(*m, proto, port)
                    && net.contains(ip)
                    && !except.iter().any(|e| e.contains(ip))
            })
            .map(|c| c.3)
    }
}

/// Why a Service port is not allowed for a source: no backend, or the backends its egress
/// rules do not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceDecision {
    /// Every backend is allowed; the rule that allowed the first one.
    Allowed(u32),
    NoBackends,
    Denied(Vec<Backend>),
}

/// Decides one Service port for a source with egress `rules`. Backends at an address of
/// the source's node (`host`) are the node itself: always allowed.
pub fn decide_port(
    rules: &[AllowRule],
    port: &FrontendPort,
    identity_of: &impl Fn(&Backend) -> u32,
) -> ServiceDecision {
    decide_with(&RuleIndex::new(rules), port, identity_of)
}

fn decide_with(
    index: &RuleIndex,
    port: &FrontendPort,
    identity_of: &impl Fn(&Backend) -> u32,
) -> ServiceDecision {
    if port.backends.is_empty() {
        return ServiceDecision::NoBackends;
    }
    let proto = port.protocol.number();
    let mut first = None;
    let mut denied = Vec::new();
    for b in &port.backends {
        let identity = identity_of(b);
        // The node (or the source itself) is allowed by no rule: it names no policy.
        if identity == IDENTITY_HOST {
            continue;
        }
        match index.allows(identity, &b.ip, proto, b.port) {
            Some(rule) => {
                first.get_or_insert(rule);
            }
            None => denied.push(b.clone()),
        }
    }
    if denied.is_empty() {
        ServiceDecision::Allowed(first.unwrap_or(NO_RULE))
    } else {
        ServiceDecision::Denied(denied)
    }
}

/// The rule id of a Service port allowed because every backend is the node or the source
/// itself: no policy's (`Compiled::policy_of_rule` names none).
pub const NO_RULE: u32 = u32::MAX;

/// The egress allow rules toward Service frontends for a source whose egress rules are
/// `rules`: one per Service port all of whose backends `rules` allow.
pub fn service_rules<'f>(
    rules: &[AllowRule],
    frontends: impl IntoIterator<Item = &'f Frontend>,
    identity_of: &impl Fn(&Backend) -> u32,
) -> Vec<AllowRule> {
    let index = RuleIndex::new(rules);
    frontends
        .into_iter()
        .flat_map(|f| frontend_rules(&index, f, identity_of))
        .collect()
}

/// The Service rules of one frontend for a source whose egress rules are `index`.
pub fn frontend_rules(
    index: &RuleIndex,
    f: &Frontend,
    identity_of: &impl Fn(&Backend) -> u32,
) -> Vec<AllowRule> {
    let mut out = Vec::new();
    for p in &f.ports {
        if let ServiceDecision::Allowed(rule_id) = decide_with(index, p, identity_of) {
            out.push(AllowRule {
                peer: Peer::Identity(f.identity),
                ports: PortMatch::Range {
                    proto: p.protocol.number(),
                    first: p.port,
                    last: p.port,
                },
                rule_id,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::model::{Labels, NamedPort, ServicePort, SliceEndpoint, SlicePort};

    /// The frontends of every Service in a state.
    fn frontends(
        state: &ClusterState,
        address_pods: &OrdMap<IpAddr, PodKey>,
        ids: &mut ServiceIdentities,
    ) -> Vec<Frontend> {
        let mut out = Vec::new();
        for svc in state.services.values() {
            let own: Vec<&EndpointSliceInfo> = state
                .endpoint_slices
                .values()
                .filter(|s| s.namespace == svc.namespace && s.service == svc.name)
                .collect();
            out.extend(service_frontends(state, svc, &own, address_pods, ids));
        }
        out
    }

    fn pod(ns: &str, name: &str, app: &str, ip: &str, http: u16) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: Labels::from([("app".to_string(), app.to_string())]),
            ips: vec![ip.parse().unwrap()],
            ports: vec![NamedPort {
                name: "http".into(),
                port: http,
                protocol: Protocol::Tcp,
            }],
            workload: app.into(),
            ..Default::default()
        }
    }

    fn service(target: TargetPort) -> ServiceInfo {
        ServiceInfo {
            namespace: "bank".into(),
            name: "ledger".into(),
            cluster_ips: vec![
                "10.96.0.50".parse().unwrap(),
                "fd77:96::50".parse().unwrap(),
            ],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target,
                node_port: None,
            }],
            selector: Some(Labels::from([("app".to_string(), "ledger".to_string())])),
        }
    }

    fn state(pods: Vec<PodInfo>, svc: ServiceInfo) -> ClusterState {
        let mut s = ClusterState::default();
        for p in pods {
            s.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        s.services.insert(("bank".into(), "ledger".into()), svc);
        s
    }

    #[test]
    fn named_target_ports_resolve_per_backend_pod() {
        let s = state(
            vec![
                pod("bank", "ledger-a", "ledger", "10.1.0.10", 8080),
                pod("bank", "ledger-b", "ledger", "10.1.0.11", 8081),
                pod("bank", "pot", "pot", "10.1.0.12", 9000),
            ],
            service(TargetPort::Named("http".into())),
        );
        let f = frontends(&s, &OrdMap::new(), &mut ServiceIdentities::default());
        assert_eq!(f.len(), 2, "one frontend per family");
        assert_ne!(f[0].identity, f[1].identity);
        let ports: Vec<u16> = f[0].ports[0].backends.iter().map(|b| b.port).collect();
        assert_eq!(ports, vec![8080, 8081]);
        assert!(
            f[1].ports[0].backends.is_empty(),
            "no IPv6 pod: the IPv6 frontend has no backends"
        );
    }

    /// Without slices, the backends are the endpoints the EndpointSlice controller would
    /// write for the selected pods.
    #[test]
    fn the_selector_picks_the_endpoints_the_slice_controller_would_write() {
        let backends = |pods: Vec<PodInfo>| {
            let mut s = state(pods, service(TargetPort::Number(8080)));
            s.nodes.insert(
                "n2".into(),
                crate::compile::model::NodeInfo {
                    name: "n2".into(),
                    addresses: vec![
                        "10.250.0.2".parse().unwrap(),
                        "203.0.113.9".parse().unwrap(),
                    ],
                    pod_cidrs: vec![],
                },
            );
            let f = frontends(&s, &OrdMap::new(), &mut ServiceIdentities::default());
            f[0].ports[0]
                .backends
                .iter()
                .map(|b| b.ip.to_string())
                .collect::<Vec<_>>()
        };
        let ready = pod("bank", "ledger-a", "ledger", "10.1.0.10", 8080);
        let unready = PodInfo {
            unready: true,
            ..pod("bank", "ledger-b", "ledger", "10.1.0.11", 8080)
        };
        let leaving = PodInfo {
            terminating: true,
            ..pod("bank", "ledger-c", "ledger", "10.1.0.12", 8080)
        };
        let exporter = PodInfo {
            ips: vec![],
            host_network: true,
            node_name: Some("n2".into()),
            ..pod("bank", "ledger-h", "ledger", "10.1.0.13", 8080)
        };
        // Ready pods only; a terminating one (serving) only when none is ready.
        assert_eq!(
            backends(vec![ready.clone(), unready.clone(), leaving.clone()]),
            ["10.1.0.10"]
        );
        assert_eq!(
            backends(vec![unready.clone(), leaving.clone()]),
            ["10.1.0.12"]
        );
        assert!(backends(vec![unready]).is_empty());
        // A host-network pod at its node's first address of the family.
        assert_eq!(backends(vec![ready, exporter]), ["10.1.0.10", "10.250.0.2"]);
        // An empty selector is none: no backends (the API's "external process").
        let mut s = state(
            vec![pod("bank", "ledger-a", "ledger", "10.1.0.10", 8080)],
            ServiceInfo {
                selector: None,
                ..service(TargetPort::Number(8080))
            },
        );
        s.endpoint_slices.clear();
        let f = frontends(&s, &OrdMap::new(), &mut ServiceIdentities::default());
        assert!(f[0].ports[0].backends.is_empty());
    }

    #[test]
    fn endpoint_slices_win_over_the_selector_and_ready_endpoints_over_terminating() {
        let mut s = state(
            vec![pod("bank", "ledger-a", "ledger", "10.1.0.10", 8080)],
            service(TargetPort::Number(8080)),
        );
        let endpoint = |ip: &str, ready: bool| SliceEndpoint {
            addresses: vec![ip.parse().unwrap()],
            ready,
            serving: true,
            terminating: !ready,
            pod: None,
        };
        s.endpoint_slices.insert(
            ("bank".into(), "ledger-x1".into()),
            EndpointSliceInfo {
                namespace: "bank".into(),
                name: "ledger-x1".into(),
                service: "ledger".into(),
                endpoints: vec![endpoint("10.1.0.20", true), endpoint("10.1.0.21", false)],
                ports: vec![SlicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 9999,
                }],
            },
        );
        let f = frontends(&s, &OrdMap::new(), &mut ServiceIdentities::default());
        let v4 = f.iter().find(|f| f.addresses[0].is_ipv4()).unwrap();
        assert_eq!(
            v4.ports[0].backends,
            vec![Backend {
                ip: "10.1.0.20".parse().unwrap(),
                port: 9999,
                pod: None
            }]
        );
    }

    #[test]
    fn a_port_is_allowed_only_when_every_backend_is() {
        let port = FrontendPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            node_port: None,
            port: 80,
            backends: vec![
                Backend {
                    ip: "10.1.0.10".parse().unwrap(),
                    port: 8080,
                    pod: None,
                },
                Backend {
                    ip: "10.1.0.11".parse().unwrap(),
                    port: 8080,
                    pod: None,
                },
            ],
        };
        let identity = |b: &Backend| {
            if b.ip.to_string().ends_with(".10") {
                300
            } else {
                301
            }
        };
        let allow = |id: u32| AllowRule {
            peer: Peer::Identity(id),
            ports: PortMatch::Range {
                proto: agent_common::PROTO_TCP,
                first: 8080,
                last: 8080,
            },
            rule_id: id,
        };
        assert_eq!(
            decide_port(&[allow(300), allow(301)], &port, &identity),
            ServiceDecision::Allowed(300)
        );
        match decide_port(&[allow(300)], &port, &identity) {
            ServiceDecision::Denied(d) => assert_eq!(d.len(), 1),
            other => panic!("{other:?}"),
        }
        // The node (or the source itself) is allowed by no policy: a port whose every
        // backend is names none, and one with another backend names that backend's rule.
        let on_the_node = |_: &Backend| IDENTITY_HOST;
        assert_eq!(
            decide_port(&[allow(300)], &port, &on_the_node),
            ServiceDecision::Allowed(NO_RULE)
        );
        let first_on_the_node = |b: &Backend| {
            if b.ip.to_string().ends_with(".10") {
                IDENTITY_HOST
            } else {
                301
            }
        };
        assert_eq!(
            decide_port(&[allow(300), allow(301)], &port, &first_on_the_node),
            ServiceDecision::Allowed(301)
        );
        let empty = FrontendPort {
            backends: vec![],
            ..port
        };
        assert_eq!(
            decide_port(&[allow(300)], &empty, &identity),
            ServiceDecision::NoBackends
        );
    }
}
