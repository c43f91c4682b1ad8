//! The offline evaluator behind `tollgate check`: the kernel's decision procedure run over the
//! very map entries the agent would write, with the LPM lookups done in memory.

use std::{collections::BTreeMap, net::IpAddr};

use agent_common::{
    DIR_EGRESS, DIR_INGRESS, FAMILY_IPV4, FAMILY_IPV6, IDENTITY_WORLD, LPM_ADDR_FIXED_BITS,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, is_service_identity,
};
use ipnet::IpNet;

use super::rules::{addr_bytes, family_of};
use super::{
    explain::{self, Explanation},
    model::{ClusterState, NamedPort, PodInfo, Protocol},
    policy::{Compiled, NodeAddresses, PodKey},
    rules::{AllowRule, CidrSetIds, RuleError, RulesetEntries, compile_ruleset},
    services::Frontend,
};

/// A decision on one side of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideDecision {
    pub allowed: bool,
    /// The policies that decided: the one whose rule allowed, or every policy isolating the
    /// pod in that direction when none did. Empty when no policy isolates the pod.
    pub policies: Vec<String>,
}

/// Evaluates flows the way the datapath does.
pub struct Evaluator {
    pub compiled: Compiled,
    entries: BTreeMap<PodKey, [RulesetEntries; 2]>,
    /// The node addresses of each pod's node (traffic with them is always allowed).
    nodes: NodeAddresses,
    /// Each pod's workload name and node (`spec.nodeName`).
    pods: BTreeMap<PodKey, (String, Option<String>)>,
    named_ports: BTreeMap<PodKey, Vec<NamedPort>>,
    /// The EgressAllowlists that select each pod, merged.
    allowlists: BTreeMap<PodKey, crate::dns::Allowlist>,
    /// The workloads' resolvers (`reconcile::resolvers_of`): DNS to them on port 53 is never
    /// isolated by an allowlist.
    resolvers: std::collections::BTreeSet<IpAddr>,
    /// What `compiled` came from: explanations read its policies and labels.
    pub state: ClusterState,
    /// Every Service's NodePorts (`Compiled::node_ports`).
    node_ports: crate::maps::NodePorts,
    /// The hostPorts of each node's pods (`Compiled::host_ports`), by node: the pod behind
    /// each and where it leads.
    host_ports:
        BTreeMap<(String, agent_common::NodePortKey), (PodKey, agent_common::NodePortTarget)>,
}

/// The `NODE_PORTS` key of a connection to `peer` on `port`.
fn node_port_key(peer: IpAddr, proto: u8, port: u16) -> agent_common::NodePortKey {
    agent_common::NodePortKey {
        port,
        proto,
        family: family_of(peer),
    }
}

const INGRESS_RULESET: u32 = 0;
const EGRESS_RULESET: u32 = 1;

impl Evaluator {
    /// Compiles every pod's rulesets into entries. `state` is what `compiled` came from;
    /// `nodes` says which addresses are each pod's node.
    pub fn new(
        compiled: Compiled,
        state: &ClusterState,
        nodes: NodeAddresses,
    ) -> Result<Self, (PodKey, RuleError)> {
        let mut entries = BTreeMap::new();
        for (key, pod) in &compiled.pods {
            let mut ids = CidrSetIds::default();
            let ingress = compile_ruleset(INGRESS_RULESET, &pod.ingress, &mut ids)
                .map_err(|e| (key.clone(), e))?;
            let egress_rules: Vec<AllowRule> =
                pod.egress.iter().chain(&pod.services).cloned().collect();
            let egress = compile_ruleset(EGRESS_RULESET, &egress_rules, &mut ids)
                .map_err(|e| (key.clone(), e))?;
            entries.insert(key.clone(), [ingress, egress]);
        }
        let pods = state
            .pods
            .iter()
            .map(|(k, p)| (k.clone(), (p.workload.clone(), p.node_name.clone())))
            .collect();
        let named_ports = state
            .pods
            .iter()
            .map(|(k, p)| (k.clone(), p.ports.clone()))
            .collect();
        let allowlists = state
            .pods
            .iter()
            .filter_map(|(k, p)| {
                crate::dns::Allowlist::for_pod(p, state.egress_allowlists.values())
                    .map(|a| (k.clone(), a))
            })
            .collect();
        // Each node's hostPorts as its agent writes them (`Compiled::host_ports`).
        let mut pods_of_node: BTreeMap<&String, Vec<(&PodKey, &PodInfo)>> = BTreeMap::new();
        for (key, pod) in &state.pods {
            if let Some(node) = &pod.node_name {
                pods_of_node.entry(node).or_default().push((key, pod));
            }
        }
        let mut host_ports = BTreeMap::new();
        for (node, pods) in pods_of_node {
            for (port, claim) in compiled.host_port_claims(pods) {
                host_ports.insert((node.clone(), port), claim);
            }
        }
        Ok(Evaluator {
            node_ports: compiled.node_ports(),
            host_ports,
            compiled,
            entries,
            nodes,
            pods,
            named_ports,
            allowlists,
            resolvers: crate::reconcile::resolvers_of(&[], state),
            state: state.clone(),
        })
    }

    /// The resolvers beside Service `kube-system/kube-dns`: the agent's `--dns-server`s.
    pub fn with_dns_servers(mut self, dns_servers: &[IpAddr]) -> Self {
        self.resolvers = crate::reconcile::resolvers_of(dns_servers, &self.state);
        self
    }

    /// Identity of an address: longest prefix in the identity entries (pods, Service
    /// frontends), else world.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        self.compiled
            .addresses
            .iter()
            .chain(self.compiled.service_addresses.iter())
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or(IDENTITY_WORLD)
    }

    /// Whether `ip` is an address of the node `pod` runs on.
    fn is_node_of(&self, pod: &PodKey, ip: IpAddr) -> bool {
        let node = self.pods.get(pod).and_then(|(_, node)| node.as_deref());
        self.nodes.of(node).is_some_and(|set| set.contains(&ip))
    }

    /// The Service frontend and port a connection of `pod` to `peer` on `port` reaches when
    /// `peer` is an address of its node and `port` a NodePort, or the pod and port when it
    /// is a hostPort of a pod on that node (not for a host-network pod, which is the node).
    pub fn node_port_of(
        &self,
        pod: &PodKey,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<agent_common::NodePortTarget> {
        // Any address of 127.0.0.0/8 is the node's to kube-proxy, as in the datapath.
        let loopback_v4 = matches!(peer, IpAddr::V4(v4) if v4.is_loopback());
        if !(self.is_node_of(pod, peer) || loopback_v4)
            || self.state.pods.get(pod).is_some_and(|p| p.host_network)
        {
            return None;
        }
        let key = node_port_key(peer, proto, port);
        self.node_ports
            .get(&key)
            .copied()
            .or_else(|| self.host_port_on_node(pod, key).map(|(_, target)| *target))
    }

    /// The pod behind hostPort `key` on `pod`'s node, and where it leads.
    fn host_port_on_node(
        &self,
        pod: &PodKey,
        key: agent_common::NodePortKey,
    ) -> Option<&(PodKey, agent_common::NodePortTarget)> {
        let node = self.pods.get(pod)?.1.clone()?;
        self.host_ports.get(&(node, key))
    }

    /// The pod and container port a connection of `pod` to `peer` on `port` reaches when
    /// `peer` is an address of its node and `port` a hostPort of a pod there.
    fn host_port_pod(
        &self,
        pod: &PodKey,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<(PodKey, u16)> {
        let target = self.node_port_of(pod, peer, proto, port)?;
        if is_service_identity(target.identity) {
            return None;
        }
        let (target_pod, _) = self.host_port_on_node(pod, node_port_key(peer, proto, port))?;
        Some((target_pod.clone(), target.port))
    }

    /// Whether `pod` is a host-network pod and `peer` the address of a pod on its node:
    /// for that pod the flow is its node's own traffic, allowed at both ends (as in the
    /// datapath, `LOCAL_POD_SCOPE`).
    fn is_host_pod_with_local_peer(&self, pod: &PodKey, peer: IpAddr) -> bool {
        let node = |k: &PodKey| self.pods.get(k).and_then(|(_, node)| node.as_deref());
        self.state.pods.get(pod).is_some_and(|p| p.host_network)
            && self
                .compiled
                .pod_of_address(peer)
                .is_some_and(|other| node(other).is_some() && node(other) == node(pod))
    }

    /// The decision of `pod` in `direction` on a new flow with `peer`, to `port`.
    pub fn decide(
        &self,
        pod: &PodKey,
        direction: u8,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<SideDecision> {
        self.decide_named(pod, direction, peer, None, proto, port)
    }

    /// The EgressAllowlist that isolates `pod`'s egress toward `peer` on `port`, if one
    /// does: `peer` is outside the cluster and not the pod's node, or a Service (by its
    /// address or a NodePort) with a backend outside.
    fn allowlist_toward(
        &self,
        pod: &PodKey,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<&crate::dns::Allowlist> {
        let a = self.allowlists.get(pod)?;
        let identity = match self.node_port_of(pod, peer, proto, port) {
            Some(target) => target.identity,
            None => self.identity_of(peer),
        };
        let outside = if identity == IDENTITY_WORLD {
            !self.is_node_of(pod, peer)
        } else {
            // A Service with a backend outside the cluster, as in the datapath
            // (`SERVICES_OUTSIDE`): kube-proxy's DNAT takes the connection there.
            agent_common::is_service_identity(identity)
                && self.outside_backends(pod, identity).next().is_some()
        };
        outside.then_some(a)
    }

    /// The backends of Service frontend `identity` outside the cluster for `pod` (those on
    /// its node are the node).
    fn outside_backends(&self, pod: &PodKey, identity: u32) -> impl Iterator<Item = IpAddr> + '_ {
        let node = self.pods.get(pod).and_then(|(_, node)| node.as_deref());
        self.compiled
            .outside_backends(identity, self.nodes.of(node))
    }

    /// `decide`, with the DNS name the peer was reached by (`domain`: then `peer` is a
    /// placeholder outside the cluster, matched only by ipBlocks that hold every address).
    /// Toward addresses outside the cluster, the EgressAllowlists that select the pod add
    /// what their domains allow and isolate the pod.
    pub fn decide_named(
        &self,
        pod: &PodKey,
        direction: u8,
        peer: IpAddr,
        domain: Option<&str>,
        proto: u8,
        port: u16,
    ) -> Option<SideDecision> {
        let np = self.decide_policies(pod, direction, peer, domain.is_some(), proto, port)?;
        let Some(allowlist) = (direction == DIR_EGRESS)
            .then(|| self.allowlist_toward(pod, peer, proto, port))
            .flatten()
        else {
            return Some(np);
        };
        let policy = self.compiled.pods.get(pod)?;
        if np.allowed && policy.isolated_egress {
            return Some(np);
        }
        // Its resolvers are how it learns anything (as in the datapath).
        let to_resolver =
            domain.is_none() && port == agent_common::DNS_PORT && self.resolvers.contains(&peer);
        if to_resolver || domain.is_some_and(|d| allowlist.allows(d, proto, port)) {
            return Some(SideDecision {
                allowed: true,
                policies: allowlist.names.clone(),
            });
        }
        let mut policies = allowlist.names.clone();
        policies.extend(np.policies);
        Some(SideDecision {
            allowed: false,
            policies,
        })
    }

    /// What the NetworkPolicies alone decide. `any_address`: the peer is a DNS name, which
    /// may stand for any address outside the cluster (`peer` only gives its family): an
    /// ipBlock allows it only if its rules allow every address of that family.
    fn decide_policies(
        &self,
        pod: &PodKey,
        direction: u8,
        peer: IpAddr,
        any_address: bool,
        proto: u8,
        port: u16,
    ) -> Option<SideDecision> {
        let policy = self.compiled.pods.get(pod)?;
        let (isolated, isolating, ruleset) = if direction == DIR_INGRESS {
            (
                policy.isolated_ingress,
                &policy.ingress_policies,
                INGRESS_RULESET,
            )
        } else {
            (
                policy.isolated_egress,
                &policy.egress_policies,
                EGRESS_RULESET,
            )
        };
        // A NodePort on the pod's node is the Service it leads to, as in the datapath.
        let node_port = (direction == DIR_EGRESS)
            .then(|| self.node_port_of(pod, peer, proto, port))
            .flatten();
        if !isolated
            || (node_port.is_none() && self.is_node_of(pod, peer))
            || self.is_host_pod_with_local_peer(pod, peer)
        {
            return Some(SideDecision {
                allowed: true,
                policies: vec![],
            });
        }
        let entries = &self.entries.get(pod)?[(direction & 1) as usize];
        let (identity, port) = match node_port {
            Some(target) => (target.identity, target.port),
            None => (self.identity_of(peer), port),
        };
        let mut rule = None;
        if identity != IDENTITY_WORLD {
            rule = policy_lookup(entries, ruleset, identity, proto, port);
        }
        // A Service address is allowed by its own entries only, as in the datapath.
        if any_address {
            rule = every_address_rule(entries, ruleset, peer, proto, port);
        } else if rule.is_none()
            && !is_service_identity(identity)
            && let Some(set) = cidr_lookup(entries, ruleset, peer)
        {
            rule = policy_lookup(entries, ruleset, set, proto, port);
        }
        Some(match rule {
            Some(rule) => SideDecision {
                allowed: true,
                policies: self
                    .compiled
                    .policy_of_rule(rule)
                    .map(str::to_string)
                    .into_iter()
                    .collect(),
            },
            None => SideDecision {
                allowed: false,
                policies: isolating.clone(),
            },
        })
    }

    /// Both sides of a flow from `src` to `dst`. A side that is not a pod of the cluster has
    /// nothing to enforce there: it allows. A flow to a Service address is decided at the
    /// source's egress against the Service's backends (the entries the agent writes for it),
    /// and at the ingress of every backend, on its target port: allowed only when all allow,
    /// since kube-proxy may pick any of them.
    pub fn flow(
        &self,
        src: Endpoint,
        dst: Endpoint,
        proto: u8,
        port: u16,
    ) -> (SideDecision, SideDecision) {
        let open = || SideDecision {
            allowed: true,
            policies: vec![],
        };
        // A pod reaching itself is never enforced (upstream's AllowLoopback).
        if src.pod.is_some() && src.pod == dst.pod {
            return (open(), open());
        }
        let egress = match &src.pod {
            Some(pod) => self
                .decide_named(pod, DIR_EGRESS, dst.ip, dst.domain.as_deref(), proto, port)
                .unwrap_or_else(open),
            None => open(),
        };
        let ingress = match (&dst.pod, self.compiled.frontend_of_address(dst.ip)) {
            (Some(pod), _) => self
                .decide(pod, DIR_INGRESS, src.ip, proto, port)
                .unwrap_or_else(open),
            (None, Some(frontend)) => self.backends_ingress(frontend, &src, proto, port),
            // A hostPort of a pod on the source's node: the CNI's DNAT keeps the source, so
            // the pod's ingress decides it on its container port.
            (None, None) => match src
                .pod
                .as_ref()
                .and_then(|p| self.host_port_pod(p, dst.ip, proto, port))
            {
                Some((pod, container_port)) => self
                    .decide(&pod, DIR_INGRESS, src.ip, proto, container_port)
                    .unwrap_or_else(open),
                None => open(),
            },
        };
        (egress, ingress)
    }

    /// The ingress side of a flow to a Service: every backend's own decision.
    fn backends_ingress(
        &self,
        frontend: &Frontend,
        src: &Endpoint,
        proto: u8,
        port: u16,
    ) -> SideDecision {
        let Some(fport) = frontend.port(proto, port) else {
            return SideDecision {
                allowed: false,
                policies: vec![],
            };
        };
        // The policies that decided: of the backends that deny, when one does; else of all.
        let (mut allowing, mut denying) = (Vec::new(), Vec::new());
        let mut denied = fport.backends.is_empty();
        for b in &fport.backends {
            let Some(pod) = &b.pod else { continue };
            if src.pod.as_ref() == Some(pod) {
                continue;
            }
            if let Some(d) = self.decide(pod, DIR_INGRESS, src.ip, proto, b.port) {
                denied |= !d.allowed;
                let into = if d.allowed {
                    &mut allowing
                } else {
                    &mut denying
                };
                for p in d.policies {
                    if !into.contains(&p) {
                        into.push(p);
                    }
                }
            }
        }
        SideDecision {
            allowed: !denied,
            policies: if denied { denying } else { allowing },
        }
    }

    /// The pods of a `NAMESPACE/NAME` endpoint: the pod of that name, else every pod of the
    /// workload of that name.
    fn pods_named(&self, ns: &str, name: &str) -> Vec<PodKey> {
        let key = (ns.to_string(), name.to_string());
        if self.compiled.pods.contains_key(&key) {
            return vec![key];
        }
        self.pods
            .iter()
            .filter(|((pod_ns, _), (workload, _))| pod_ns == ns && workload == name)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Why a flow `flow` denied is denied, side by side, and what would allow it. At a
    /// Service address, every backend a side denies (with its target port), the changes
    /// merged where they can be. `protocol` is `None` for protocols without ports (ICMP). `port_name`:
    /// the port as the flow named it, a container port of the destination pod.
    pub fn explain(
        &self,
        src: &Endpoint,
        dst: &Endpoint,
        proto: u8,
        protocol: Option<Protocol>,
        port: u16,
        port_name: Option<&str>,
    ) -> Vec<Explanation> {
        let pod_of = |key: &PodKey| self.state.pods.get(key);
        // A host-network pod's address is its node's: rules take it by ipBlock only.
        let peer_of = |ep_pod: &Option<PodKey>, ip: IpAddr| match ep_pod.as_ref().and_then(pod_of) {
            Some(p) if !p.host_network => explain::Peer::Pod(p),
            _ => explain::Peer::Address(ip),
        };
        let frontend = match dst.pod {
            Some(_) => None,
            None => self
                .compiled
                .frontend_of_address(dst.ip)
                .and_then(|f| f.port(proto, port)),
        };
        // A Service's port name is no container port of its backends: rules take their
        // target ports by number.
        let port_name = port_name.filter(|_| frontend.is_none());
        // The peers a side decides on, as (address, pod, port on the policy's side).
        let targets: Vec<(IpAddr, Option<PodKey>, u16)> = match frontend {
            Some(fport) => fport
                .backends
                .iter()
                .filter(|b| b.pod.is_none() || b.pod != src.pod)
                .map(|b| (b.ip, b.pod.clone(), b.port))
                .collect(),
            None => vec![(dst.ip, dst.pod.clone(), port)],
        };
        let mut out = Vec::new();
        // A Service address on a port it does not expose, or with no ready backend there:
        // nothing behind it would ever answer, whatever the policies say.
        if dst.pod.is_none()
            && let Some(frontend) = self.compiled.frontend_of_address(dst.ip)
            && let exposing = frontend.port(proto, port)
            && exposing.is_none_or(|p| p.backends.is_empty())
        {
            let exposed = if exposing.is_some() {
                Vec::new()
            } else {
                frontend
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.protocol.as_str().to_ascii_lowercase()))
                    .collect()
            };
            out.push(Explanation {
                side: "ingress",
                pod: frontend.service_id(),
                isolated_by: vec![],
                fix: explain::Fix::ServicePort { exposed },
            });
            return out;
        }
        // Outside the cluster from a pod an EgressAllowlist selects: the fix is in the
        // allowlist (a name), or a name instead of an address.
        if let Some(pod) = src.pod.as_ref().and_then(pod_of)
            && let key = (pod.namespace.clone(), pod.name.clone())
            && let Some(allowlist) = self.allowlist_toward(&key, dst.ip, proto, port)
            && let Some(d) =
                self.decide_named(&key, DIR_EGRESS, dst.ip, dst.domain.as_deref(), proto, port)
            && !d.allowed
        {
            let service = self.compiled.frontend_of_address(dst.ip);
            let fix = match (&dst.domain, allowlist.names.first()) {
                (Some(name), Some(first)) => explain::Fix::Domain {
                    allowlist: first.clone(),
                    rule: explain::domain_entry(name, protocol, port),
                },
                (None, Some(first)) if service.is_some() => explain::Fix::ServiceOutside {
                    allowlist: first.clone(),
                    outside: service
                        .into_iter()
                        .flat_map(|f| self.outside_backends(&key, f.identity))
                        .map(|ip| ip.to_string())
                        .collect(),
                },
                (None, Some(first)) => explain::Fix::ResolveName {
                    allowlist: first.clone(),
                },
                _ => unreachable!("an allowlist has a name"),
            };
            out.push(Explanation {
                side: "egress",
                pod: format!("{}/{}", pod.namespace, pod.name),
                isolated_by: d.policies,
                fix,
            });
            return out;
        }
        if let Some(pod) = src.pod.as_ref().and_then(pod_of) {
            let key = (pod.namespace.clone(), pod.name.clone());
            let denied = targets.iter().filter_map(|(ip, target, port)| {
                // A name as the verdict took it: any address outside the cluster.
                let d =
                    self.decide_named(&key, DIR_EGRESS, *ip, dst.domain.as_deref(), proto, *port)?;
                (!d.allowed).then(|| (d, peer_of(target, *ip), *port))
            });
            for (d, peer, port) in denied {
                let mut explanation = explain::explain(
                    &self.state,
                    pod,
                    DIR_EGRESS,
                    &d.policies,
                    &peer,
                    protocol,
                    port,
                    port_name,
                );
                // A name has no address here: an ipBlock of the unspecified address would
                // allow nothing. Names are allowed by EgressAllowlists.
                if let Some(name) = &dst.domain {
                    explanation.fix = explain::Fix::NameWithoutAllowlist {
                        name: name.clone(),
                        workload: format!("{}/{}", pod.namespace, pod.workload),
                        policy: d.policies.first().cloned().unwrap_or_default(),
                        rule: explain::domain_entry(name, protocol, port),
                    };
                }
                out.push(explanation);
            }
        }
        // Every backend a side denies: a Service's backends may be selected by different
        // labels, and a fix for the first alone would leave the others denied.
        let denied = targets.iter().filter_map(|(_, target, port)| {
            let pod = target.as_ref().and_then(pod_of)?;
            let d = self.decide(target.as_ref()?, DIR_INGRESS, src.ip, proto, *port)?;
            (!d.allowed).then_some((pod, d, *port))
        });
        for (pod, d, port) in denied {
            out.push(explain::explain(
                &self.state,
                pod,
                DIR_INGRESS,
                &d.policies,
                &peer_of(&src.pod, src.ip),
                protocol,
                port,
                port_name,
            ));
        }
        explain::merge(out)
    }
}

impl Evaluator {
    /// The number of a pod's named container port.
    pub fn named_port(&self, pod: &PodKey, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .get(pod)?
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// One end of a flow: an address, and the pod it belongs to if any.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub pod: Option<PodKey>,
    /// A DNS name outside the cluster (then `ip` is unspecified).
    pub domain: Option<String>,
}

fn policy_lookup(
    entries: &RulesetEntries,
    ruleset: u32,
    peer: u32,
    proto: u8,
    port: u16,
) -> Option<u32> {
    entries
        .policy
        .iter()
        .filter(|(k, _)| k.1.ruleset == ruleset && k.1.peer == peer)
        .filter(|(k, _)| {
            let prefix = k.0;
            if prefix <= POLICY_PREFIX_ANY_PROTO {
                return true;
            }
            if k.1.proto != proto {
                return false;
            }
            let bits = prefix.saturating_sub(POLICY_PREFIX_ANY_PORT);
            if bits == 0 {
                return true;
            }
            let shift = 16 - bits;
            (u16::from_be_bytes(k.1.port) as u32 >> shift) == (port as u32 >> shift)
        })
        .max_by_key(|(k, _)| k.0)
        .map(|(_, rule)| *rule)
}

fn cidr_lookup(entries: &RulesetEntries, ruleset: u32, ip: IpAddr) -> Option<u32> {
    let family = family_of(ip) as u32;
    let addr = addr_bytes(ip);
    entries
        .cidr
        .iter()
        .filter(|(k, _)| k.1.scope == ruleset && k.1.family == family)
        .filter(|(k, _)| {
            let bits = (k.0 - LPM_ADDR_FIXED_BITS) as usize;
            prefix_matches(&k.1.addr, &addr, bits)
        })
        .max_by_key(|(k, _)| k.0)
        .map(|(_, set)| *set)
}

/// The rule that allows `proto`/`port` toward every address of `family_of`'s family, if
/// the ipBlocks of the ruleset do: every prefix of the family (an `except` is one too)
/// allows it, and together they cover the whole address space. The rule of the widest
/// prefix names it.
fn every_address_rule(
    entries: &RulesetEntries,
    ruleset: u32,
    family_of: IpAddr,
    proto: u8,
    port: u16,
) -> Option<u32> {
    let (family, width) = if family_of.is_ipv4() {
        (FAMILY_IPV4, 32)
    } else {
        (FAMILY_IPV6, 128)
    };
    let mut ranges = Vec::new();
    let mut widest: Option<(u32, u32)> = None;
    for (k, set) in entries
        .cidr
        .iter()
        .filter(|(k, _)| k.1.scope == ruleset && k.1.family == family as u32)
    {
        let rule = policy_lookup(entries, ruleset, *set, proto, port)?;
        let bits = k.0 - LPM_ADDR_FIXED_BITS;
        if widest.is_none_or(|(b, _)| bits < b) {
            widest = Some((bits, rule));
        }
        // The prefix as a range of the family's addresses, the address read as a number.
        let start = u128::from_be_bytes(k.1.addr) >> (128 - width);
        let span = if bits == 0 {
            u128::MAX >> (128 - width)
        } else {
            (1u128 << (width - bits)) - 1
        };
        ranges.push((start, start + span));
    }
    ranges.sort();
    // Covered when the sorted ranges leave no gap from the first address to the last.
    let last = u128::MAX >> (128 - width);
    let mut next = 0u128;
    for (start, end) in ranges {
        if start > next {
            return None;
        }
        if end >= last {
            return widest.map(|(_, rule)| rule);
        }
        next = next.max(end + 1);
    }
    None
}

fn prefix_matches(a: &[u8; 16], b: &[u8; 16], bits: usize) -> bool {
    let full = bits / 8;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || (a[full] >> (8 - rest)) == (b[full] >> (8 - rest))
}

/// A Service's DNS name inside the cluster (`NAME.NAMESPACE.svc`, and with the cluster's
/// domain after it, `cluster.local` or another): its virtual address, of the family asked
/// for when it has one, as the cluster's DNS answers. `None` for any other name.
fn service_by_dns_name(
    ev: &Evaluator,
    spec: &str,
    prefer_v6: bool,
) -> Result<Option<Endpoint>, String> {
    let lower = spec.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = lower.split('.').collect();
    let [name, namespace, "svc", ..] = labels.as_slice() else {
        return Ok(None);
    };
    let Some(service) = ev
        .state
        .services
        .get(&(namespace.to_string(), name.to_string()))
    else {
        return Err(format!(
            "{spec:?} names Service {namespace}/{name}, which is not in the cluster state"
        ));
    };
    let ip = service
        .cluster_ips
        .iter()
        .find(|ip| ip.is_ipv6() == prefer_v6)
        .or(service.cluster_ips.first())
        .ok_or_else(|| {
            format!(
                "{spec:?}: Service {namespace}/{name} has no virtual address (headless): give its pods"
            )
        })?;
    Ok(Some(Endpoint {
        ip: *ip,
        pod: None,
        domain: None,
    }))
}

/// Parses `NAMESPACE/POD` or an IP address into an endpoint of the evaluator's cluster; a
/// workload (`NAMESPACE/WORKLOAD`) gives its first pod.
pub fn endpoint(ev: &Evaluator, spec: &str, prefer_v6: bool) -> Result<Endpoint, String> {
    Ok(endpoints(ev, spec, prefer_v6)?.remove(0))
}

/// Parses `NAMESPACE/POD`, `NAMESPACE/WORKLOAD` (every pod of it that has an address) or an
/// IP address into the endpoints it stands for, never none.
pub fn endpoints(ev: &Evaluator, spec: &str, prefer_v6: bool) -> Result<Vec<Endpoint>, String> {
    if let Ok(ip) = spec.parse::<IpAddr>() {
        return Ok(vec![Endpoint {
            ip,
            pod: ev.compiled.pod_of_address(ip).cloned(),
            domain: None,
        }]);
    }
    if let Ok(net) = spec.parse::<IpNet>() {
        return Err(format!("{net}: give an address, not a prefix"));
    }
    let Some((ns, name)) = spec.split_once('/') else {
        // A DNS name outside the cluster; no top-level domain is all digits, so `999.1.1.1`
        // is a mistyped address, not a name.
        if spec
            .trim_end_matches('.')
            .rsplit('.')
            .next()
            .is_some_and(|tld| !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!(
                "{spec:?} is neither an IP address nor a DNS name (a top-level domain is never a number)"
            ));
        }
        if let Some(service) = service_by_dns_name(ev, spec, prefer_v6)? {
            return Ok(vec![service]);
        }
        return match crate::dns::DomainPattern::parse(spec) {
            Ok(crate::dns::DomainPattern::Exact(name)) if name.contains('.') => {
                Ok(vec![Endpoint {
                    ip: if prefer_v6 {
                        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                    } else {
                        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                    },
                    pod: None,
                    domain: Some(name),
                }])
            }
            _ => Err(format!(
                "{spec:?} is neither NAMESPACE/POD, NAMESPACE/WORKLOAD, an IP address nor a DNS name"
            )),
        };
    };
    let keys = ev.pods_named(ns, name);
    if keys.is_empty() {
        return Err(format!(
            "{spec} is not in the cluster state (no pod or workload of that name)"
        ));
    }
    let mut out = Vec::new();
    for key in keys {
        let mut ips: Vec<IpAddr> = ev
            .compiled
            .address_pods
            .iter()
            .filter(|(_, k)| **k == key)
            .map(|(ip, _)| *ip)
            .collect();
        // A host-network pod's addresses are its node's (from its Node object).
        if let Some(pod) = ev.state.pods.get(&key)
            && pod.host_network
        {
            match ev.nodes.of(pod.node_name.as_deref()) {
                Some(node) if !node.is_empty() => ips.extend(node.iter().copied()),
                _ => {
                    return Err(format!(
                        "{spec} is a host-network pod: its addresses are its node's, and the cluster state has no Node {} to take them from (give an address of the node instead)",
                        pod.node_name.as_deref().unwrap_or("(no spec.nodeName)")
                    ));
                }
            }
        }
        if let Some(ip) = ips
            .iter()
            .find(|ip| ip.is_ipv6() == prefer_v6)
            .or(ips.first())
        {
            out.push(Endpoint {
                ip: *ip,
                pod: Some(key),
                domain: None,
            });
        }
    }
    if out.is_empty() {
        return Err(format!("{spec} has no pod with an IP address"));
    }
    Ok(out)
}
