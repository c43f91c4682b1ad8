//! Least-privilege NetworkPolicies from observed traffic (`tollgate advise`): per workload
//! and direction, one rule per peer workload (selected by its stable labels, its namespace by
//! name) with the ports it used; peers outside the cluster by port only. Then the replay
//! proof: every observed flow run through the same evaluator as `tollgate check`, against
//! the policies in force plus the advised ones, must be allowed at the enforcement point
//! that observed it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::{
    eval::{Endpoint, Evaluator},
    explain::{flow_map, pod_peer, stable_selector},
    model::{ClusterState, PodInfo},
    policy::{self, PodKey},
};

/// A peer pair the agent observed, at workload level (as `tollgate_flow_packets_total` names
/// it): `world` for addresses outside the cluster, `host` for the node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObservedFlow {
    /// The enforcement point that saw it: `egress` at the source, `ingress` at the
    /// destination.
    pub direction: String,
    pub src_namespace: String,
    pub src_workload: String,
    pub dst_namespace: String,
    pub dst_workload: String,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`.
    pub protocol: String,
    /// The port of the side that accepted the flow; 0 for ICMP.
    pub port: u16,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// Packets by verdict: allowed, would_drop, dropped.
    pub packets: [u64; 3],
    /// For `world` destinations, the DNS name the source resolved them from ("" unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst_domain: String,
    /// For a `world` peer, the addresses it was seen at, most recent last (at most
    /// `WORLD_ADDRESSES_KEPT`): from live tracked flows at each conntrack census and from
    /// would-drop events, so possibly not every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub world_addresses: Vec<IpAddr>,
    /// Unix seconds of its last would-drop (0: none seen), for `--if-quiet`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_would_drop: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// How many addresses of a `world` peer an observed-flow record keeps.
pub const WORLD_ADDRESSES_KEPT: usize = 8;

impl ObservedFlow {
    /// (namespace, workload) of the enforcement point that saw it (the destination at
    /// ingress, the source at egress), then of its peer.
    pub fn local_and_peer(&self) -> ((&str, &str), (&str, &str)) {
        let src = (self.src_namespace.as_str(), self.src_workload.as_str());
        let dst = (self.dst_namespace.as_str(), self.dst_workload.as_str());
        if self.direction == "ingress" {
            (dst, src)
        } else {
            (src, dst)
        }
    }

    /// `would-drop: DIRECTION SRC -> DST PORT/PROTOCOL (N packets), denied at the DIRECTION
    /// of LOCAL`: a peer pair of an `--if-quiet` refusal.
    pub fn would_drop_line(&self) -> String {
        let ((ns, workload), _) = self.local_and_peer();
        format!(
            "would-drop: {} ({} packets), denied at the {} of {ns}/{workload}",
            describe(self),
            self.packets[1],
            self.direction
        )
    }

    /// Seen only denied (as would_drop or dropped): a peer the policies in force refuse.
    pub fn only_denied(&self) -> bool {
        self.packets[0] == 0
    }

    /// Notes an address the `world` peer was seen at: kept most recent last, the oldest
    /// going past `WORLD_ADDRESSES_KEPT`. Whether it is new to the record.
    pub fn note_world_address(&mut self, address: IpAddr) -> bool {
        let before = self.world_addresses.len();
        self.world_addresses.retain(|a| *a != address);
        let new = self.world_addresses.len() == before;
        self.world_addresses.push(address);
        if self.world_addresses.len() > WORLD_ADDRESSES_KEPT {
            self.world_addresses.remove(0);
        }
        new
    }
}

/// What to advise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdviseOptions {
    /// Only workloads of this namespace.
    pub namespace: Option<String>,
    /// Only this workload (or pod), `NAMESPACE/WORKLOAD`.
    #[serde(default)]
    pub workload: Option<String>,
    /// Also allow peers seen only as would_drop (or dropped).
    pub include_denied: bool,
    /// Explain each flow left out as denied: the side, its policies, what would allow it.
    #[serde(default)]
    pub explain: bool,
    #[serde(default)]
    pub style: Style,
    /// The agent's `--dns-server`s: DNS to them is never isolated by an EgressAllowlist,
    /// so the proof replays it as the datapath decides it.
    #[serde(default)]
    pub dns_servers: Vec<IpAddr>,
}

/// How the advice is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// One NetworkPolicy per workload and direction seen.
    #[default]
    Policies,
    /// One file per allowed edge, `service.SRC/egress/service.DST.rule` (SRC and DST as
    /// `NAMESPACE.WORKLOAD`), besides the policies.
    RuleFiles,
    /// One identical ingress policy per destination, selecting its callers by the label
    /// `egress.tollgate.io/NAMESPACE.WORKLOAD: "true"`, and the labels each caller needs.
    Labels,
}

/// The advice: policies, and the proof that they allow what was observed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Advice {
    /// One policy per workload, as `kubectl apply` takes them (`---` between).
    pub yaml: String,
    /// `NAMESPACE/NAME` of each advised policy.
    pub policies: Vec<String>,
    /// `NAMESPACE/NAME` of each advised EgressAllowlist (names outside the cluster).
    #[serde(default)]
    pub allowlists: Vec<String>,
    /// Observed flows replayed, and those still denied (with the side), if any.
    pub replayed: usize,
    pub denied: Vec<String>,
    /// What was left out and why.
    pub notes: Vec<String>,
    /// With `explain`: each flow left out as denied, with why and what would allow it.
    #[serde(default)]
    pub explanations: Vec<String>,
    /// `--style rule-files`: (relative path, content), one per edge.
    #[serde(default)]
    pub files: Vec<(String, String)>,
    /// `--style labels`: the labels each caller workload (`NAMESPACE/WORKLOAD`) needs on its
    /// pod template.
    #[serde(default)]
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// The ports (protocol, port) each DNS name outside the cluster was reached on.
type DomainPorts = BTreeMap<String, BTreeSet<(String, u16)>>;

/// The ports (protocol, port; 0 for ICMP) each peer used.
type PeerPorts = BTreeMap<AdvisedPeer, BTreeSet<(String, u16)>>;

/// A peer of a rule: a workload (namespace, name) or everything outside the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum AdvisedPeer {
    Workload(String, String),
    World,
}

/// Whether `name` is empty or a host name an EgressAllowlist can hold as itself: labels of
/// letters, digits, `-` and `_`, nothing that reads as a wildcard.
fn plain_host_name(name: &str) -> bool {
    name.is_empty()
        || (name.len() <= 253
            && name.trim_end_matches('.').split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            }))
}

/// Policies that allow exactly the `observed` flows whose enforcement side is a workload of
/// `state` (the local side of each record), and the replay of those flows.
pub fn advise(state: &ClusterState, observed: &[ObservedFlow], options: &AdviseOptions) -> Advice {
    // A name that is no plain host name (a literal `*`, escaped bytes: a query can ask
    // anything) would read back as a wildcard or not at all: such a flow is advised by its
    // addresses, as one whose name is unknown.
    let plain: Vec<ObservedFlow>;
    let observed = if observed.iter().any(|f| !plain_host_name(&f.dst_domain)) {
        plain = observed
            .iter()
            .cloned()
            .map(|mut f| {
                if !plain_host_name(&f.dst_domain) {
                    f.dst_domain.clear();
                }
                f
            })
            .collect();
        &plain[..]
    } else {
        observed
    };
    let mut advice = Advice::default();
    // (namespace, workload) -> direction -> peer -> ports (protocol, port; port 0: none).
    let mut wanted: BTreeMap<(String, String), BTreeMap<&str, PeerPorts>> = BTreeMap::new();
    // (namespace, workload) -> DNS name -> ports: destinations outside the cluster the
    // workload reached by name, for its EgressAllowlist.
    let mut named: BTreeMap<(String, String), DomainPorts> = BTreeMap::new();
    // (namespace, workload, ingress) -> addresses outside the cluster seen without a name:
    // shown beside the rule that allows `world`, for whoever narrows it.
    let mut world_seen: BTreeMap<(String, String, bool), BTreeSet<IpAddr>> = BTreeMap::new();
    let mut replay = Vec::new();
    let mut left_out = Vec::new();
    // (namespace, workload) -> whether stable labels select it.
    let mut selectable: BTreeMap<(String, String), bool> = BTreeMap::new();
    let resolvers = crate::reconcile::resolvers_of(&options.dns_servers, state);
    // Workloads an EgressAllowlist selects once this advice is applied: the ones selected
    // now, and those it writes one for (names reached outside the cluster).
    let allowlisted: BTreeSet<(String, String)> = observed
        .iter()
        .filter(|f| {
            f.direction == "egress"
                && !f.dst_domain.is_empty()
                && (options.include_denied || !f.only_denied())
        })
        .map(|f| (f.src_namespace.clone(), f.src_workload.clone()))
        .collect();
    let is_allowlisted = |ns: &str, wl: &str| {
        allowlisted.contains(&(ns.to_string(), wl.to_string()))
            || pod_of(state, ns, wl).is_some_and(|p| {
                crate::dns::Allowlist::for_pod(p, state.egress_allowlists.values()).is_some()
            })
    };
    for flow in observed {
        let ingress = flow.direction == "ingress";
        let (local, peer) = flow.local_and_peer();
        if options.namespace.as_ref().is_some_and(|ns| ns != local.0)
            || options
                .workload
                .as_ref()
                .is_some_and(|w| *w != format!("{}/{}", local.0, local.1))
        {
            continue;
        }
        if flow.only_denied() && !options.include_denied {
            advice.notes.push(format!(
                "left out (seen only denied; --include-denied allows it): {}",
                describe(flow)
            ));
            left_out.push(flow);
            continue;
        }
        // DNS of a workload an EgressAllowlist selects to its resolvers outside the cluster:
        // never isolated by the allowlist, so no rule is needed (one would isolate it).
        if !ingress
            && peer == ("world", "world")
            && flow.port == agent_common::DNS_PORT
            && !flow.world_addresses.is_empty()
            && flow.world_addresses.iter().all(|a| resolvers.contains(a))
            && is_allowlisted(local.0, local.1)
        {
            continue;
        }
        let peer = match peer {
            ("host", "host") => continue, // the node: always allowed
            ("world", "world") => AdvisedPeer::World,
            (ns, name) if pod_of(state, ns, name).is_some() => {
                AdvisedPeer::Workload(ns.into(), name.into())
            }
            _ => {
                advice.notes.push(format!(
                    "left out (the peer workload is no longer in the cluster state): {}",
                    describe(flow)
                ));
                continue;
            }
        };
        if pod_of(state, local.0, local.1).is_none() {
            advice.notes.push(format!(
                "left out (the workload is no longer in the cluster state): {}",
                describe(flow)
            ));
            continue;
        }
        // A workload whose stable labels do not select its pods alone (none shared, or
        // shared with another workload) could only be selected with other pods: a policy
        // for it would isolate them, a rule for it allow them. Left out and said, never
        // widened.
        let unselectable = [
            Some(local),
            match &peer {
                AdvisedPeer::Workload(ns, wl) => Some((ns.as_str(), wl.as_str())),
                AdvisedPeer::World => None,
            },
        ]
        .into_iter()
        .flatten()
        .find(|(ns, wl)| {
            !*selectable
                .entry((ns.to_string(), wl.to_string()))
                .or_insert_with(|| {
                    pod_of(state, ns, wl).is_some_and(|p| !stable_selector(state, p).is_empty())
                })
        });
        if let Some((ns, wl)) = unselectable {
            advice.notes.push(format!(
                "left out ({ns}/{wl}: no label its pods share (but those set per pod or revision) selects them alone: a selector would take in other pods of its namespace; label its pods and advise again): {}",
                describe(flow)
            ));
            // Still replayed: the other advice may isolate its workload, and the proof must
            // then say it is denied.
            replay.push(flow);
            continue;
        }
        if !ingress && peer == AdvisedPeer::World && !flow.dst_domain.is_empty() {
            named
                .entry((local.0.to_string(), local.1.to_string()))
                .or_default()
                .entry(flow.dst_domain.clone())
                .or_default()
                .insert((flow.protocol.clone(), flow.port));
            replay.push(flow);
            continue;
        }
        if peer == AdvisedPeer::World {
            world_seen
                .entry((local.0.to_string(), local.1.to_string(), ingress))
                .or_default()
                .extend(flow.world_addresses.iter().copied());
        }
        wanted
            .entry((local.0.to_string(), local.1.to_string()))
            .or_default()
            .entry(if ingress { "ingress" } else { "egress" })
            .or_default()
            .entry(peer)
            .or_default()
            .insert((flow.protocol.clone(), flow.port));
        replay.push(flow);
    }

    for ((namespace, workload), directions) in &wanted {
        let local = pod_of(state, namespace, workload).expect("checked above");
        let name = advised_name(state, namespace, workload, workload, false);
        let mut yaml = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  annotations:\n    tollgate.io/advised-for: {namespace}/{workload}\nspec:\n  podSelector:\n    matchLabels: {}\n  policyTypes: [{}]\n",
            flow_map(&stable_selector(state, local)),
            directions
                .keys()
                .map(|d| if *d == "ingress" { "Ingress" } else { "Egress" })
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (direction, peers) in directions {
            let key = if *direction == "ingress" {
                "from"
            } else {
                "to"
            };
            yaml += &format!("  {direction}:\n");
            for (peer, ports) in peers {
                if *peer == AdvisedPeer::World
                    && let Some(seen) = world_seen.get(&(
                        namespace.clone(),
                        workload.clone(),
                        *direction == "ingress",
                    ))
                    && !seen.is_empty()
                {
                    let seen: Vec<String> = seen.iter().map(|a| a.to_string()).collect();
                    yaml += &format!(
                        "  # outside the cluster, seen at (sampled): {}\n",
                        seen.join(", ")
                    );
                }
                yaml += &format!(
                    "  - {key}: [{}]\n",
                    peer_of(state, namespace, peer).join(", ")
                );
                if ports.iter().any(|(p, _)| !has_ports(p)) {
                    yaml += "    # ICMP (or another protocol without ports) was observed: only a rule without ports allows it\n";
                } else {
                    let ports: Vec<String> = ports
                        .iter()
                        .map(|(p, n)| {
                            format!("{{protocol: {}, port: {n}}}", p.to_ascii_uppercase())
                        })
                        .collect();
                    yaml += &format!("    ports: [{}]\n", ports.join(", "));
                }
            }
        }
        if !advice.yaml.is_empty() {
            advice.yaml += "---\n";
        }
        advice.yaml += &yaml;
        advice.policies.push(format!("{namespace}/{name}"));
    }

    // In-cluster edges (caller, callee) with their ports, for the other styles. They allow
    // at both ends, so an edge whose record at one end was left out (seen only denied
    // there) is no edge: the other end's record alone must not bring it back.
    let key = |f: &ObservedFlow| {
        (
            f.src_namespace.clone(),
            f.src_workload.clone(),
            f.dst_namespace.clone(),
            f.dst_workload.clone(),
            f.protocol.clone(),
            f.port,
        )
    };
    let denied_somewhere: BTreeSet<_> = left_out.iter().map(|f| key(f)).collect();
    let mut edges: BTreeMap<(PodKey, PodKey), BTreeSet<(String, u16)>> = BTreeMap::new();
    // Edges to a DNS name outside the cluster, apart: the name is what a reviewer allows
    // (an EgressAllowlist's domain), not `world`.
    let mut named_edges: BTreeMap<(PodKey, String), BTreeSet<(String, u16)>> = BTreeMap::new();
    for flow in replay
        .iter()
        .filter(|f| !denied_somewhere.contains(&key(f)))
    {
        if flow.direction == "egress"
            && (flow.dst_namespace.as_str(), flow.dst_workload.as_str()) == ("world", "world")
            && !flow.dst_domain.is_empty()
        {
            named_edges
                .entry((
                    (flow.src_namespace.clone(), flow.src_workload.clone()),
                    flow.dst_domain.to_ascii_lowercase(),
                ))
                .or_default()
                .insert((flow.protocol.clone(), flow.port));
            continue;
        }
        edges
            .entry((
                (flow.src_namespace.clone(), flow.src_workload.clone()),
                (flow.dst_namespace.clone(), flow.dst_workload.clone()),
            ))
            .or_default()
            .insert((flow.protocol.clone(), flow.port));
    }
    // A protocol without ports (ICMP) is an entry of its own: an edge of ICMP alone must
    // not read as one with no ports named.
    let ports_yaml = |ports: &BTreeSet<(String, u16)>| {
        let ports: Vec<String> = ports
            .iter()
            .map(|(p, n)| match has_ports(p) {
                true => format!("{{protocol: {}, port: {n}}}", p.to_ascii_uppercase()),
                false => format!("{{protocol: {}}}", p.to_ascii_uppercase()),
            })
            .collect();
        format!("[{}]", ports.join(", "))
    };
    let mut labelled = state.clone();
    match options.style {
        Style::Policies => {}
        Style::RuleFiles => {
            for (((sns, swl), (dns, dwl)), ports) in &edges {
                if (sns.as_str(), swl.as_str()) == ("host", "host") {
                    continue;
                }
                let name = |ns: &str, wl: &str| {
                    if ns == "world" && wl == "world" {
                        "world".to_string()
                    } else {
                        format!("service.{ns}.{wl}")
                    }
                };
                advice.files.push((
                    format!("{}/egress/{}.rule", name(sns, swl), name(dns, dwl)),
                    format!(
                        "# {sns}/{swl} may call {dns}/{dwl} (observed; tollgate advise --style rule-files)\nsource: {{namespace: {sns}, workload: {swl}}}\ndestination: {{namespace: {dns}, workload: {dwl}}}\nports: {}\n",
                        ports_yaml(ports)
                    ),
                ));
            }
            for (((sns, swl), domain), ports) in &named_edges {
                // A name from a series is not trusted to be a file name: anything but a
                // DNS name's characters becomes `_`.
                let file: String = domain
                    .chars()
                    .map(|c| match c {
                        'a'..='z' | '0'..='9' | '-' | '.' | '*' | '_' => c,
                        _ => '_',
                    })
                    .collect();
                advice.files.push((
                    format!("service.{sns}.{swl}/egress/world.{file}.rule"),
                    format!(
                        "# {sns}/{swl} may call {domain} outside the cluster (observed; tollgate advise --style rule-files)\nsource: {{namespace: {sns}, workload: {swl}}}\ndestination: {{domain: {}}}\nports: {}\n",
                        super::explain::quoted(domain),
                        ports_yaml(ports)
                    ),
                ));
            }
        }
        Style::Labels => {
            // One identical ingress policy per destination; callers carry its label.
            let mut callers: BTreeMap<(String, String), BTreeSet<(String, u16)>> = BTreeMap::new();
            // Callers from outside the cluster carry no label: an ipBlock rule keeps them.
            let mut world_callers: BTreeMap<(String, String), BTreeSet<(String, u16)>> =
                BTreeMap::new();
            let mut yaml = String::new();
            let mut policies = Vec::new();
            for (((sns, swl), (dns, dwl)), ports) in &edges {
                let outside =
                    |ns: &str, wl: &str| matches!((ns, wl), ("world", "world") | ("host", "host"));
                if outside(dns, dwl) || outside(sns, swl) {
                    if outside(dns, dwl) && (dns.as_str(), dwl.as_str()) == ("world", "world") {
                        advice.notes.push(format!(
                            "left out (--style labels covers destinations in the cluster): {sns}/{swl} -> world"
                        ));
                    } else if (sns.as_str(), swl.as_str()) == ("world", "world")
                        && !outside(dns, dwl)
                        && pod_of(state, dns, dwl)
                            .is_some_and(|p| !stable_selector(state, p).is_empty())
                    {
                        world_callers
                            .entry((dns.clone(), dwl.clone()))
                            .or_default()
                            .extend(ports.iter().cloned());
                    }
                    continue;
                }
                // As in the default style: a destination whose pods share no stable label
                // could only be selected with its whole namespace. Left out and said.
                if pod_of(state, dns, dwl).is_none_or(|p| stable_selector(state, p).is_empty()) {
                    advice.notes.push(format!(
                        "left out ({dns}/{dwl}: no label its pods share (but those set per pod or revision) selects them alone: a selector would take in other pods of its namespace; label its pods and advise again): {sns}/{swl} -> {dns}/{dwl}"
                    ));
                    continue;
                }
                let key = caller_label(dns, dwl);
                advice
                    .labels
                    .entry(format!("{sns}/{swl}"))
                    .or_default()
                    .insert(key, "true".into());
                callers
                    .entry((dns.clone(), dwl.clone()))
                    .or_default()
                    .extend(ports.iter().cloned());
            }
            let ports_line = |ports: &BTreeSet<(String, u16)>| {
                if ports.iter().any(|(p, _)| !has_ports(p)) {
                    "    # ICMP was observed: only a rule without ports allows it\n".to_string()
                } else {
                    format!("    ports: {}\n", ports_yaml(ports))
                }
            };
            let destinations: BTreeSet<&(String, String)> =
                callers.keys().chain(world_callers.keys()).collect();
            for (dns, dwl) in destinations {
                let Some(pod) = pod_of(state, dns, dwl) else {
                    continue;
                };
                let name = advised_name(state, dns, &format!("{dwl}-callers"), dwl, false);
                if !yaml.is_empty() {
                    yaml += "---\n";
                }
                yaml += &format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {dns}\n  annotations:\n    tollgate.io/advised-for: {dns}/{dwl}\nspec:\n  podSelector:\n    matchLabels: {}\n  policyTypes: [Ingress]\n  ingress:\n",
                    flow_map(&stable_selector(state, pod)),
                );
                let key = (dns.clone(), dwl.clone());
                if let Some(ports) = callers.get(&key) {
                    yaml += &format!(
                        "  - from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{{}: \"true\"}}}}}}]\n{}",
                        caller_label(dns, dwl),
                        ports_line(ports)
                    );
                }
                if let Some(ports) = world_callers.get(&key) {
                    let world = peer_of(state, dns, &AdvisedPeer::World).join(", ");
                    yaml += &format!(
                        "  # callers outside the cluster\n  - from: [{world}]\n{}",
                        ports_line(ports)
                    );
                }
                policies.push(format!("{dns}/{name}"));
            }
            advice.yaml = yaml;
            advice.policies = policies;
            // The proof runs with the callers labelled.
            for (workload, labels) in &advice.labels {
                let (ns, wl) = workload.split_once('/').expect("NAMESPACE/WORKLOAD");
                for pod in labelled.pods.values_mut() {
                    if pod.namespace == ns && (pod.workload == wl || pod.name == wl) {
                        for (k, v) in labels {
                            pod.labels.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
        }
    }

    // Names outside the cluster: one EgressAllowlist per workload, names with the same
    // ports in one entry.
    for ((namespace, workload), domains) in &named {
        let Some(local) = pod_of(state, namespace, workload) else {
            continue;
        };
        let name = advised_name(state, namespace, workload, workload, true);
        let mut by_ports: BTreeMap<&BTreeSet<(String, u16)>, Vec<&str>> = BTreeMap::new();
        for (domain, ports) in domains {
            by_ports.entry(ports).or_default().push(domain);
        }
        let mut yaml = format!(
            "apiVersion: tollgate.io/v1alpha1\nkind: EgressAllowlist\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  annotations:\n    tollgate.io/advised-for: {namespace}/{workload}\nspec:\n  podSelector:\n    matchLabels: {}\n  egress:\n",
            flow_map(&stable_selector(state, local)),
        );
        for (ports, domains) in by_ports {
            let domains: Vec<String> = domains.iter().map(|d| super::explain::quoted(d)).collect();
            yaml += &format!("  - domains: [{}]\n", domains.join(", "));
            if ports.iter().all(|(p, _)| has_ports(p)) {
                yaml += &format!("    ports: {}\n", ports_yaml(ports));
            } else {
                yaml += "    # ICMP (or another protocol without ports) was observed: only an entry without ports allows it\n";
            }
        }
        if !advice.yaml.is_empty() {
            advice.yaml += "---\n";
        }
        advice.yaml += &yaml;
        advice.allowlists.push(format!("{namespace}/{name}"));
    }

    // The replay runs what `kubectl apply` would get: the YAML, read back by the same
    // parser as the cluster state.
    let mut with_advice = labelled;
    let parsed = crate::sources::files::parse_file(&advice.yaml, std::path::Path::new("advice"))
        .map_err(|e| e.to_string())
        .and_then(|objects| {
            objects
                .into_iter()
                .map(|o| o.map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, String>>()
        });
    match parsed {
        Ok(objects) => {
            for (_, object) in objects {
                match object {
                    crate::sources::store::Object::Policy(p) => {
                        with_advice
                            .policies
                            .insert((p.namespace.clone(), p.name.clone()), p);
                    }
                    crate::sources::store::Object::EgressAllowlist(a) => {
                        with_advice
                            .egress_allowlists
                            .insert((a.namespace.clone(), a.name.clone()), a);
                    }
                    _ => {}
                }
            }
        }
        Err(e) => {
            advice
                .denied
                .push(format!("the advice does not read back: {e}"));
            return advice;
        }
    }

    // The replay proof, with the same compiler and evaluator as `tollgate check`.
    let replayer = match Replayer::new(&with_advice, replay.iter().chain(&left_out).copied()) {
        Ok(r) => r.with_dns_servers(&options.dns_servers),
        Err(e) => {
            advice.denied.push(e);
            return advice;
        }
    };
    // Explained against the policies in force: the advice does not allow them either, and
    // its names would send the operator to policies the cluster does not have.
    if options.explain {
        let in_force = match Replayer::new(state, left_out.iter().copied()) {
            Ok(r) => r.with_dns_servers(&options.dns_servers),
            Err(e) => {
                advice.denied.push(e);
                return advice;
            }
        };
        for flow in &left_out {
            for why in in_force.explain(flow) {
                advice
                    .explanations
                    .push(format!("{}: {why}", describe(flow)));
            }
        }
    }
    for flow in replay {
        advice.replayed += 1;
        advice.denied.extend(replayer.still_denied(flow));
    }
    advice
}

/// Observed-flow records run through the compiler and evaluator of `tollgate check`,
/// against one cluster state: each record at its enforcement point, for every pod of its
/// workload.
pub struct Replayer<'a> {
    state: &'a ClusterState,
    ev: Evaluator,
}

impl<'a> Replayer<'a> {
    /// Compiles the rules of the workloads at either end of `flows`.
    /// Replays DNS to these resolvers (beside kube-dns) as the datapath decides it.
    pub fn with_dns_servers(mut self, dns_servers: &[IpAddr]) -> Self {
        self.ev = self.ev.with_dns_servers(dns_servers);
        self
    }

    pub fn new<'f>(
        state: &'a ClusterState,
        flows: impl Iterator<Item = &'f ObservedFlow>,
    ) -> Result<Replayer<'a>, String> {
        let mut targets = BTreeSet::new();
        for flow in flows {
            for (ns, name) in [
                (&flow.src_namespace, &flow.src_workload),
                (&flow.dst_namespace, &flow.dst_workload),
            ] {
                for p in pods_of(state, ns, name) {
                    targets.insert((p.namespace.clone(), p.name.clone()));
                }
            }
        }
        let mut allocator = policy::IdentityAllocator::default();
        let compile_options = policy::CompileOptions {
            node_addresses: policy::NodeAddresses::from_nodes(state),
            ..Default::default()
        };
        let compiled = policy::compile(state, &mut allocator, Some(&targets), &compile_options);
        let ev = Evaluator::new(compiled, state, compile_options.node_addresses)
            .map_err(|((ns, name), e)| format!("the rules of {ns}/{name} do not compile: {e}"))?;
        Ok(Replayer { state, ev })
    }

    /// Whether a record's `world` peer is replayed at the addresses it was seen at; else a
    /// documentation address stands for the unknown one (advised rules allow any, by
    /// port), and a name is replayed as a name.
    fn seen_at(flow: &ObservedFlow) -> bool {
        !flow.world_addresses.is_empty() && flow.dst_domain.is_empty()
    }

    fn outside_addresses(flow: &ObservedFlow) -> Vec<IpAddr> {
        if Self::seen_at(flow) {
            flow.world_addresses.clone()
        } else {
            vec![IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 1))]
        }
    }

    /// The ends of one end of a record: every pod of its workload (at the address of the
    /// family `outside` has, when it has one), or the address or name outside the cluster.
    fn endpoints(&self, ns: &str, name: &str, outside: IpAddr, domain: &str) -> Vec<Endpoint> {
        if ns == "world" && name == "world" {
            return vec![Endpoint {
                ip: if domain.is_empty() {
                    outside
                } else {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                },
                pod: None,
                domain: (!domain.is_empty()).then(|| domain.to_string()),
            }];
        }
        pods_of(self.state, ns, name)
            .filter_map(|p| {
                let ip = p
                    .ips
                    .iter()
                    .find(|ip| ip.is_ipv4() == outside.is_ipv4())
                    .or(p.ips.first())?;
                Some(Endpoint {
                    ip: *ip,
                    pod: Some((p.namespace.clone(), p.name.clone())),
                    domain: None,
                })
            })
            .collect()
    }

    /// The (source, destination) pairs a record is replayed as: each pod of the enforcing
    /// workload with the peer's first pod, and the first of it with each of the peer's.
    fn ends(&self, flow: &ObservedFlow, outside: IpAddr) -> Vec<(Endpoint, Endpoint)> {
        let src = self.endpoints(&flow.src_namespace, &flow.src_workload, outside, "");
        let dst = self.endpoints(
            &flow.dst_namespace,
            &flow.dst_workload,
            outside,
            &flow.dst_domain,
        );
        let (Some(first_src), Some(first_dst)) = (src.first(), dst.first()) else {
            return Vec::new();
        };
        let mut pairs: Vec<(Endpoint, Endpoint)> =
            src.iter().map(|s| (s.clone(), first_dst.clone())).collect();
        pairs.extend(dst.iter().skip(1).map(|d| (first_src.clone(), d.clone())));
        pairs
    }

    /// What still denies a record at its enforcement point, one line per pair of ends (none
    /// when the record is allowed).
    pub fn still_denied(&self, flow: &ObservedFlow) -> Vec<String> {
        let mut denied = Vec::new();
        for outside in Self::outside_addresses(flow) {
            let pairs = self.ends(flow, outside);
            if pairs.is_empty() {
                denied.push(format!(
                    "{}: an end has no address to replay it with",
                    describe(flow)
                ));
                break;
            }
            for (src, dst) in pairs {
                let proto = protocol_number(&flow.protocol, src.ip);
                let pods = match (&src.pod, &dst.pod) {
                    (Some(s), Some(d)) => format!(" ({}/{} -> {}/{})", s.0, s.1, d.0, d.1),
                    _ => String::new(),
                };
                let at = if Self::seen_at(flow) {
                    format!(" (at {outside})")
                } else {
                    String::new()
                };
                // A record is one enforcement point's decision: replayed there.
                let (egress, ingress) = self.ev.flow(src, dst, proto, flow.port);
                let allowed = if flow.direction == "ingress" {
                    ingress.allowed
                } else {
                    egress.allowed
                };
                if !allowed {
                    denied.push(format!(
                        "{}{at}{pods}: still denied at the {}",
                        describe(flow),
                        flow.direction
                    ));
                }
            }
        }
        denied
    }

    /// Why a record is denied at its enforcement point and the smallest change that would
    /// allow it, for the first pair of its ends denied there (nothing when all are allowed).
    pub fn explain(&self, flow: &ObservedFlow) -> Vec<String> {
        let outside = *Self::outside_addresses(flow).last().expect("at least one");
        for (src, dst) in self.ends(flow, outside) {
            let proto = protocol_number(&flow.protocol, src.ip);
            let protocol = super::model::Protocol::parse(&flow.protocol.to_ascii_uppercase());
            let why: Vec<String> = self
                .ev
                .explain(&src, &dst, proto, protocol, flow.port, None)
                .into_iter()
                .filter(|e| e.side == flow.direction)
                .map(|e| e.summary())
                .collect();
            if !why.is_empty() {
                return why;
            }
        }
        Vec::new()
    }
}

/// The label that lets a workload call `NAMESPACE/WORKLOAD` in `--style labels`; a name
/// longer than a label allows is cut and ended with a hash of the whole.
fn caller_label(namespace: &str, workload: &str) -> String {
    let name = format!("{namespace}.{workload}");
    let name = if name.len() <= 63 {
        name
    } else {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        format!("{}-{:08x}", &name[..54], h.finish() as u32)
    };
    format!("egress.tollgate.io/{name}")
}

/// The pods of a workload (or the pod of that name), by name.
pub fn pods_of<'s, 'w>(
    state: &'s ClusterState,
    namespace: &str,
    workload: &'w str,
) -> impl Iterator<Item = &'s PodInfo> + use<'s, 'w> {
    let namespace = namespace.to_string();
    state
        .pods
        .range((namespace.clone(), String::new())..)
        .take_while(move |((ns, _), _)| *ns == namespace)
        .map(|(_, p)| p)
        .filter(move |p| p.workload == workload || p.name == workload)
}

/// A pod of a workload (or the pod of that name): its labels stand for the workload's.
fn pod_of<'a>(state: &'a ClusterState, namespace: &str, workload: &str) -> Option<&'a PodInfo> {
    pods_of(state, namespace, workload)
        .min_by_key(|p| (p.workload != workload, p.ips.is_empty(), p.name.clone()))
}

/// `WORKLOAD-observed`, unless an object of that kind and name advised for another
/// workload, or written by hand, has it: then numbered. One advised for the same workload
/// keeps its name, so applying the advice again replaces it.
fn advised_name(
    state: &ClusterState,
    namespace: &str,
    workload: &str,
    for_workload: &str,
    allowlist: bool,
) -> String {
    // An object name is 253 characters at most: a long workload name is cut to leave room
    // for the suffix and a number (a cut that meets another's is numbered like any).
    const NAME_MAX: usize = 253;
    let suffix = "-observed";
    let keep = NAME_MAX - suffix.len() - "-99".len();
    let cut = workload
        .char_indices()
        .nth(keep)
        .map_or(workload, |(at, _)| &workload[..at])
        .trim_end_matches(['-', '.']);
    let base = format!("{cut}{suffix}");
    let target = format!("{namespace}/{for_workload}");
    let taken = |name: &str| {
        let key = (namespace.to_string(), name.to_string());
        let origin = if allowlist {
            state.egress_allowlists.get(&key).map(|a| &a.advised_for)
        } else {
            state.policies.get(&key).map(|p| &p.advised_for)
        };
        origin.is_some_and(|o| o.as_deref() != Some(target.as_str()))
    };
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken(n))
        .expect("a free name")
}

/// The networks pods are addressed from, by family (IPv4 first): the Nodes' podCIDRs when
/// the state has them, else the /16 (IPv4) or /64 (IPv6) around each pod address. An ipBlock
/// standing for `world` leaves them out: it would let in every pod too.
fn pod_networks(state: &ClusterState) -> [Vec<ipnet::IpNet>; 2] {
    let from_nodes: Vec<ipnet::IpNet> = state
        .nodes
        .values()
        .flat_map(|n| n.pod_cidrs.iter().copied())
        .collect();
    let networks: Vec<ipnet::IpNet> = if from_nodes.is_empty() {
        state
            .pods
            .values()
            .filter(|p| !p.host_network)
            .flat_map(|p| p.ips.iter())
            .filter_map(|ip| {
                let bits = if ip.is_ipv4() { 16 } else { 64 };
                ipnet::IpNet::new(*ip, bits).ok().map(|n| n.trunc())
            })
            .collect()
    } else {
        from_nodes
    };
    let mut out: [Vec<ipnet::IpNet>; 2] = Default::default();
    for net in ipnet::IpNet::aggregate(&networks) {
        // `except` must be a strict subset of its /0.
        if net.prefix_len() > 0 {
            out[usize::from(net.addr().is_ipv6())].push(net);
        }
    }
    out
}

/// An ipBlock for `world` of one family: everything but the pod networks.
fn world_block(all: &str, except: &[ipnet::IpNet]) -> String {
    if except.is_empty() {
        format!("{{ipBlock: {{cidr: \"{all}\"}}}}")
    } else {
        let except: Vec<String> = except.iter().map(|n| format!("\"{n}\"")).collect();
        format!(
            "{{ipBlock: {{cidr: \"{all}\", except: [{}]}}}}",
            except.join(", ")
        )
    }
}

/// The peers of a rule, as flow-style YAML.
fn peer_of(state: &ClusterState, namespace: &str, peer: &AdvisedPeer) -> Vec<String> {
    match peer {
        AdvisedPeer::World => {
            let [v4, v6] = pod_networks(state);
            vec![world_block("0.0.0.0/0", &v4), world_block("::/0", &v6)]
        }
        AdvisedPeer::Workload(ns, name) => {
            let pod = pod_of(state, ns, name).expect("checked when gathered");
            vec![pod_peer(state, namespace, pod)]
        }
    }
}

/// Whether NetworkPolicy ports can name the protocol (else only a rule without ports
/// allows it: ICMP, or any other protocol the datapath names by number).
fn has_ports(protocol: &str) -> bool {
    matches!(protocol, "tcp" | "udp" | "sctp")
}

fn protocol_number(protocol: &str, ip: IpAddr) -> u8 {
    match protocol {
        "tcp" => agent_common::PROTO_TCP,
        "udp" => agent_common::PROTO_UDP,
        "sctp" => agent_common::PROTO_SCTP,
        "icmp" | "icmpv6" if ip.is_ipv6() => agent_common::PROTO_ICMPV6,
        "icmp" | "icmpv6" => agent_common::PROTO_ICMP,
        // The datapath names other protocols by number.
        other => other.parse().unwrap_or(agent_common::PROTO_ICMP),
    }
}

fn describe(flow: &ObservedFlow) -> String {
    format!(
        "{} {}/{} -> {}/{} {}{}",
        flow.direction,
        flow.src_namespace,
        flow.src_workload,
        flow.dst_namespace,
        flow.dst_workload,
        if flow.port == 0 {
            String::new()
        } else {
            format!("{}/", flow.port)
        },
        flow.protocol
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::store::Store;

    fn state(yaml: &str) -> ClusterState {
        Store::from_yaml(yaml).into_state()
    }

    const SHOP: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f-a
  namespace: shop
  labels: {app: web, pod-template-hash: 7d9f}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, uid: u, controller: true}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db, "tier": "1"}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: scraper-0, namespace: ops, labels: {app: scraper}}
status: {podIP: 10.0.1.1}
"#;

    fn flow(
        direction: &str,
        src: (&str, &str),
        dst: (&str, &str),
        port: u16,
        packets: [u64; 3],
    ) -> ObservedFlow {
        ObservedFlow {
            direction: direction.into(),
            src_namespace: src.0.into(),
            src_workload: src.1.into(),
            dst_namespace: dst.0.into(),
            dst_workload: dst.1.into(),
            protocol: if port == 0 { "icmp" } else { "tcp" }.into(),
            port,
            first_seen: 1,
            last_seen: 2,
            packets,
            dst_domain: String::new(),
            world_addresses: Vec::new(),
            last_would_drop: 0,
        }
    }

    #[test]
    fn observed_peers_become_rules_by_stable_labels_and_the_replay_allows_them_all() {
        let state = state(SHOP);
        let observed = [
            flow(
                "ingress",
                ("shop", "web"),
                ("shop", "db-0"),
                5432,
                [10, 0, 0],
            ),
            flow(
                "ingress",
                ("ops", "scraper-0"),
                ("shop", "db-0"),
                9187,
                [4, 0, 0],
            ),
            flow(
                "ingress",
                ("ops", "scraper-0"),
                ("shop", "db-0"),
                0,
                [2, 0, 0],
            ),
            flow(
                "egress",
                ("shop", "web"),
                ("shop", "db-0"),
                5432,
                [10, 0, 0],
            ),
            flow(
                "egress",
                ("shop", "web"),
                ("world", "world"),
                443,
                [7, 0, 0],
            ),
            flow(
                "egress",
                ("shop", "web"),
                ("host", "host"),
                10250,
                [1, 0, 0],
            ),
            // Seen only as would-drop: left out unless asked.
            flow("ingress", ("shop", "web"), ("shop", "db-0"), 22, [0, 3, 0]),
        ];
        let advice = advise(&state, &observed, &AdviseOptions::default());
        assert_eq!(advice.policies, ["shop/db-0-observed", "shop/web-observed"]);
        assert!(advice.denied.is_empty(), "{:?}", advice.denied);
        assert_eq!(
            advice.replayed, 5,
            "every flow but the would-drop-only one and the node's (always allowed)"
        );
        assert!(
            advice.notes.iter().any(|n| n.contains("shop/db-0 22/tcp")),
            "{:?}",
            advice.notes
        );
        let docs: Vec<serde_json::Value> = advice
            .yaml
            .split("---\n")
            .map(|d| serde_norway::from_str(d).expect("valid YAML"))
            .collect();
        let db = &docs[0];
        assert_eq!(
            db["spec"]["podSelector"]["matchLabels"],
            serde_json::json!({"app": "db"})
        );
        assert_eq!(db["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        let rules = db["spec"]["ingress"].as_array().unwrap();
        assert_eq!(rules.len(), 2, "one rule per peer: {rules:?}");
        assert_eq!(
            rules[0]["from"][0],
            serde_json::json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}, "podSelector": {"matchLabels": {"app": "scraper"}}})
        );
        assert!(
            rules[0].get("ports").is_none(),
            "ICMP: a rule without ports"
        );
        assert_eq!(
            rules[1]["from"][0],
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}})
        );
        assert_eq!(
            rules[1]["ports"],
            serde_json::json!([{"protocol": "TCP", "port": 5432}])
        );
        let web = &docs[1];
        assert_eq!(
            web["spec"]["podSelector"]["matchLabels"],
            serde_json::json!({"app": "web"}),
            "no pod-template-hash"
        );
        assert_eq!(web["spec"]["policyTypes"], serde_json::json!(["Egress"]));
        // `world` is everything but the pod networks (no Node podCIDRs here: the /16 of
        // each pod address), which an ipBlock of /0 would let in too.
        assert_eq!(
            web["spec"]["egress"][1]["to"],
            serde_json::json!([
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/16"]}},
                {"ipBlock": {"cidr": "::/0"}}
            ])
        );
        assert_eq!(
            web["spec"]["egress"][1]["ports"],
            serde_json::json!([{"protocol": "TCP", "port": 443}])
        );

        let all = advise(
            &state,
            &observed,
            &AdviseOptions {
                include_denied: true,
                ..Default::default()
            },
        );
        assert_eq!(all.replayed, 6);
        assert!(all.yaml.contains("port: 22"), "{}", all.yaml);
        let only_ops = advise(
            &state,
            &observed,
            &AdviseOptions {
                namespace: Some("ops".into()),
                ..Default::default()
            },
        );
        assert!(only_ops.policies.is_empty());
        // One workload: only its own policy, and only its own flows replayed.
        let only_web = advise(
            &state,
            &observed,
            &AdviseOptions {
                workload: Some("shop/web".into()),
                ..Default::default()
            },
        );
        assert_eq!(only_web.policies, ["shop/web-observed"]);
        assert!(
            only_web.replayed > 0 && only_web.replayed < advice.replayed,
            "{} of {}",
            only_web.replayed,
            advice.replayed
        );
    }

    /// A workload of two pods, one a canary with a label of its own, calling a ledger
    /// whose policy takes only stable callers.
    const CANARY: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: pot-a
  namespace: bank
  labels: {app: pot, track: stable, pod-template-hash: 5c}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: pot-5c, uid: u, controller: true}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: pot-b
  namespace: bank
  labels: {app: pot, track: canary, pod-template-hash: 5c}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: pot-5c, uid: u, controller: true}]
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: ledger, namespace: bank, labels: {app: ledger}}
status: {podIP: 10.0.0.9}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ledger-stable-callers, namespace: bank}
spec:
  podSelector: {matchLabels: {app: ledger}}
  ingress: [{from: [{podSelector: {matchLabels: {app: pot, track: stable}}}], ports: [{port: 8080}]}]
"#;

    #[test]
    fn the_replay_proof_fails_for_any_pod_of_a_workload_the_policies_still_deny() {
        let state = state(CANARY);
        let observed = [flow(
            "ingress",
            ("bank", "pot"),
            ("bank", "ledger"),
            8080,
            [5, 0, 0],
        )];
        // The policy in force, alone: the canary pod is denied, though the first pod (the
        // one a workload's labels were read from) is allowed.
        let replayer = Replayer::new(&state, observed.iter()).unwrap();
        assert_eq!(
            replayer.still_denied(&observed[0]),
            [
                "ingress bank/pot -> bank/ledger 8080/tcp (bank/pot-b -> bank/ledger): still denied at the ingress"
            ]
        );
        let why = replayer.explain(&observed[0]);
        assert!(
            !why.is_empty() && why.iter().all(|w| w.contains("bank/ledger-stable-callers")),
            "{why:?}"
        );
        // A caller observed only denied and left out: still denied, explained at its side.
        let denied_only = [flow(
            "ingress",
            ("bank", "pot"),
            ("bank", "ledger"),
            9090,
            [0, 3, 0],
        )];
        assert_eq!(replayer.still_denied(&denied_only[0]).len(), 2);

        // The advice selects the pot workload by what its pods share (app), never by the
        // canary's own label, and the proof replays both pods: all allowed.
        let advice = advise(&state, &observed, &AdviseOptions::default());
        assert!(
            advice
                .yaml
                .contains("from: [{podSelector: {matchLabels: {app: pot}}}]"),
            "{}",
            advice.yaml
        );
        assert_eq!(advice.replayed, 1);
        assert!(advice.denied.is_empty(), "{:?}", advice.denied);

        // Pods without a label of their own: the advice says it must select the namespace.
        let bare = Store::from_yaml(
            &CANARY
                .replace(
                    "{app: pot, track: stable, pod-template-hash: 5c}",
                    "{pod-template-hash: 5c}",
                )
                .replace(
                    "{app: pot, track: canary, pod-template-hash: 5c}",
                    "{pod-template-hash: 5c}",
                ),
        )
        .into_state();
        let advice = advise(&bare, &observed, &AdviseOptions::default());
        assert!(
            advice.notes.iter().any(|n| n.starts_with(
                "left out (bank/pot: no label its pods share (but those set per pod or revision) selects them alone"
            )),
            "{:?}",
            advice.notes
        );
        assert!(
            advice.policies.is_empty(),
            "never a namespace-wide selector: {}",
            advice.yaml
        );
        // The flow it leaves out is still replayed: the ledger's policy in force denies it,
        // and the proof says so.
        assert_eq!(advice.replayed, 1);
        assert_eq!(advice.denied.len(), 2, "{:?}", advice.denied);

        // Another Deployment labelled as pot is: no selector takes in pot alone, so the
        // flow is left out rather than allowed for pot-batch too, which never called.
        let twin = Store::from_yaml(&format!(
            "{CANARY}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pot-batch-x\n  namespace: bank\n  labels: {{app: pot, track: stable, pod-template-hash: 7d}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: pot-batch-7d, uid: v, controller: true}}]\nstatus: {{podIP: 10.0.0.3}}\n"
        ))
        .into_state();
        let advice = advise(&twin, &observed, &AdviseOptions::default());
        assert!(
            advice.notes.iter().any(|n| n.starts_with(
                "left out (bank/pot: no label its pods share (but those set per pod or revision) selects them alone"
            )),
            "{:?}",
            advice.notes
        );
        assert!(!advice.yaml.contains("app: pot"), "{}", advice.yaml);

        // `--style labels` labels the callers, but must still select the destination: a
        // ledger without a label of its own is left out the same way, never `{}`.
        let bare_ledger = Store::from_yaml(&CANARY.replace(
            "metadata: {name: ledger, namespace: bank, labels: {app: ledger}}",
            "metadata: {name: ledger, namespace: bank, labels: {}}",
        ))
        .into_state();
        let labels = advise(
            &bare_ledger,
            &observed,
            &AdviseOptions {
                style: Style::Labels,
                ..Default::default()
            },
        );
        assert!(labels.policies.is_empty(), "{}", labels.yaml);
        assert!(labels.labels.is_empty(), "{:?}", labels.labels);
        assert!(
            labels
                .notes
                .iter()
                .any(|n| n.starts_with("left out (bank/ledger:")),
            "{:?}",
            labels.notes
        );

        // A record whose peer has no address left (its pods pending) cannot be proven: the
        // advice says so rather than claim it allowed.
        let pending = Store::from_yaml(
            &CANARY
                .replace("status: {podIP: 10.0.0.1}", "status: {}")
                .replace("status: {podIP: 10.0.0.2}", "status: {}"),
        )
        .into_state();
        let advice = advise(&pending, &observed, &AdviseOptions::default());
        assert_eq!(
            advice.denied,
            ["ingress bank/pot -> bank/ledger 8080/tcp: an end has no address to replay it with"]
        );
    }

    /// A query can ask for any bytes: a literal `*.evil.net` or `**.com` observed is no
    /// wildcard to allow, and escaped bytes are no name to write. Such flows are advised by
    /// their addresses; the plain names beside them still make the allowlist.
    #[test]
    fn names_that_would_read_as_wildcards_are_never_advised_as_names() {
        let state = state(SHOP);
        let named = |domain: &str| ObservedFlow {
            dst_domain: domain.into(),
            world_addresses: vec!["203.0.113.7".parse().unwrap()],
            ..flow(
                "egress",
                ("shop", "web"),
                ("world", "world"),
                443,
                [9, 0, 0],
            )
        };
        let observed = [
            named("api.stripe.com"),
            named("*.evil.net"),
            named("**.com"),
            named("ctl\\027.org"),
        ];
        let advice = advise(&state, &observed, &AdviseOptions::default());
        let yaml = &advice.yaml;
        assert!(yaml.contains("domains: [api.stripe.com]"), "{yaml}");
        for odd in ["evil.net", "**", "ctl"] {
            assert!(!yaml.contains(odd), "{odd}: {yaml}");
        }
        // Their addresses are allowed as addresses, and the whole advice reads back.
        assert!(yaml.contains("203.0.113.7"), "{yaml}");
        assert!(advice.denied.is_empty(), "{:?}", advice.denied);
    }

    #[test]
    fn names_outside_the_cluster_become_an_egress_allowlist_the_replay_proves() {
        let state = state(SHOP);
        let named = |domain: &str, port: u16, packets: [u64; 3]| ObservedFlow {
            dst_domain: domain.into(),
            ..flow("egress", ("shop", "web"), ("world", "world"), port, packets)
        };
        let observed = [
            named("api.stripe.com", 443, [9, 0, 0]),
            named("hooks.stripe.com", 443, [3, 0, 0]),
            named("mirror.example.org", 80, [2, 0, 0]),
            // Seen only denied: left out unless asked.
            named("evil.example.org", 443, [0, 4, 0]),
            flow("egress", ("shop", "web"), ("shop", "db-0"), 5432, [5, 0, 0]),
        ];
        let advice = advise(&state, &observed, &AdviseOptions::default());
        assert_eq!(advice.allowlists, ["shop/web-observed"]);
        assert!(advice.denied.is_empty(), "{:?}", advice.denied);
        assert_eq!(advice.replayed, 4);
        let yaml = &advice.yaml;
        assert!(yaml.contains("kind: EgressAllowlist"), "{yaml}");
        assert!(
            yaml.contains("  - domains: [api.stripe.com, hooks.stripe.com]\n    ports: [{protocol: TCP, port: 443}]\n"),
            "{yaml}"
        );
        assert!(
            yaml.contains(
                "  - domains: [mirror.example.org]\n    ports: [{protocol: TCP, port: 80}]\n"
            ),
            "{yaml}"
        );
        assert!(!yaml.contains("evil.example.org"), "{yaml}");
        assert!(yaml.contains("matchLabels: {app: web}"), "{yaml}");
        // No ipBlock for what was reached by name.
        assert!(!yaml.contains("ipBlock"), "{yaml}");
        // What the replay runs through is the YAML read back: an allowlist that does not
        // allow the name would be caught.
        let with_denied = advise(
            &state,
            &observed,
            &AdviseOptions {
                include_denied: true,
                ..Default::default()
            },
        );
        assert!(with_denied.yaml.contains("evil.example.org"));
        assert!(with_denied.denied.is_empty());

        // DNS to a resolver outside the cluster: never isolated by the allowlist the advice
        // writes, so no NetworkPolicy rule for it (which would isolate web's egress).
        let resolver: IpAddr = "203.0.113.53".parse().unwrap();
        let mut with_dns = observed.to_vec();
        with_dns.push(ObservedFlow {
            protocol: "udp".into(),
            world_addresses: vec![resolver],
            ..flow("egress", ("shop", "web"), ("world", "world"), 53, [6, 0, 0])
        });
        let advice = advise(
            &state,
            &with_dns,
            &AdviseOptions {
                dns_servers: vec![resolver],
                ..Default::default()
            },
        );
        assert!(!advice.yaml.contains("port: 53"), "{}", advice.yaml);
        assert!(advice.denied.is_empty(), "{:?}", advice.denied);
    }

    #[test]
    fn addresses_seen_outside_the_cluster_are_shown_and_explained_at() {
        // web may reach 203.0.113.0/24 on 443, except 203.0.113.9.
        let state = state(&format!(
            "{SHOP}---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-out, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 203.0.113.0/24, except: [203.0.113.9/32]}}}}]
    ports: [{{protocol: TCP, port: 443}}]
"
        ));
        let seen = |port: u16, packets: [u64; 3], at: &[&str]| ObservedFlow {
            world_addresses: at.iter().map(|a| a.parse().unwrap()).collect(),
            ..flow("egress", ("shop", "web"), ("world", "world"), port, packets)
        };
        let observed = [
            seen(8443, [5, 0, 0], &["203.0.113.7", "2001:db8::7"]),
            seen(443, [0, 3, 0], &["203.0.113.9"]),
        ];
        let advice = advise(
            &state,
            &observed,
            &AdviseOptions {
                explain: true,
                ..Default::default()
            },
        );
        assert!(
            advice.yaml.contains(
                "  # outside the cluster, seen at (sampled): 203.0.113.7, 2001:db8::7\n  - to: [{ipBlock: {cidr: \"0.0.0.0/0\""
            ),
            "{}",
            advice.yaml
        );
        assert!(advice.denied.is_empty(), "{:?}", advice.denied);
        assert_eq!(advice.replayed, 1);
        // Explained at the address it was seen at: the `except`, not the /24 a stand-in
        // documentation address would fall in.
        assert_eq!(advice.explanations.len(), 1, "{:?}", advice.explanations);
        assert!(
            advice.explanations[0].contains("denied at the egress of shop/web-7d9f-a"),
            "{:?}",
            advice.explanations
        );

        // Bounded, most recent last, and new only once.
        let mut f = seen(443, [1, 0, 0], &[]);
        for i in 0..20u8 {
            assert!(f.note_world_address(IpAddr::from([203, 0, 113, i])));
        }
        assert!(!f.note_world_address(IpAddr::from([203, 0, 113, 15])));
        assert_eq!(f.world_addresses.len(), WORLD_ADDRESSES_KEPT);
        assert_eq!(
            f.world_addresses.last(),
            Some(&IpAddr::from([203, 0, 113, 15]))
        );
        assert!(!f.world_addresses.contains(&IpAddr::from([203, 0, 113, 0])));
    }

    #[test]
    fn a_protocol_without_ports_gets_a_rule_without_ports() {
        let state = state(SHOP);
        // GRE (47), named by number as the datapath names it.
        let gre = ObservedFlow {
            protocol: "47".into(),
            ..flow(
                "egress",
                ("shop", "web"),
                ("ops", "scraper-0"),
                0,
                [2, 0, 0],
            )
        };
        let advice = advise(
            &state,
            std::slice::from_ref(&gre),
            &AdviseOptions::default(),
        );
        assert!(
            advice.denied.is_empty(),
            "{:?}\n{}",
            advice.denied,
            advice.yaml
        );
        let policy: serde_json::Value = serde_norway::from_str(&advice.yaml).unwrap();
        let rule = &policy["spec"]["egress"][0];
        assert!(rule.get("ports").is_none(), "{}", advice.yaml);
        assert_eq!(advice.replayed, 1);
        // A rule file names the protocol: an edge of GRE alone is not one of no ports.
        let files = advise(
            &state,
            &[gre],
            &AdviseOptions {
                style: Style::RuleFiles,
                ..Default::default()
            },
        );
        let file: serde_json::Value = serde_norway::from_str(&files.files[0].1).unwrap();
        assert_eq!(
            file["ports"],
            serde_json::json!([{"protocol": 47}]),
            "{}",
            files.files[0].1
        );
    }

    #[test]
    fn rule_files_name_each_edge_and_labels_give_one_policy_per_destination() {
        let state = state(SHOP);
        let observed = [
            flow(
                "ingress",
                ("shop", "web"),
                ("shop", "db-0"),
                5432,
                [10, 0, 0],
            ),
            flow(
                "egress",
                ("shop", "web"),
                ("shop", "db-0"),
                5432,
                [10, 0, 0],
            ),
            flow(
                "ingress",
                ("ops", "scraper-0"),
                ("shop", "db-0"),
                9187,
                [4, 0, 0],
            ),
            flow(
                "egress",
                ("shop", "web"),
                ("world", "world"),
                443,
                [7, 0, 0],
            ),
            // Reached by name: the name is the rule's destination, not `world`.
            ObservedFlow {
                dst_domain: "API.Stripe.com".into(),
                ..flow(
                    "egress",
                    ("shop", "web"),
                    ("world", "world"),
                    443,
                    [3, 0, 0],
                )
            },
        ];
        let files = advise(
            &state,
            &observed,
            &AdviseOptions {
                style: Style::RuleFiles,
                ..Default::default()
            },
        );
        let paths: Vec<&str> = files.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "service.ops.scraper-0/egress/service.shop.db-0.rule",
                "service.shop.web/egress/service.shop.db-0.rule",
                "service.shop.web/egress/world.rule",
                "service.shop.web/egress/world.api.stripe.com.rule",
            ]
        );
        let rule: serde_json::Value = serde_norway::from_str(&files.files[1].1).unwrap();
        assert_eq!(
            rule["ports"],
            serde_json::json!([{"protocol": "TCP", "port": 5432}])
        );
        let named: serde_json::Value = serde_norway::from_str(&files.files[3].1).unwrap();
        assert_eq!(
            named["destination"],
            serde_json::json!({"domain": "api.stripe.com"})
        );
        assert_eq!(
            named["ports"],
            serde_json::json!([{"protocol": "TCP", "port": 443}])
        );
        assert!(files.denied.is_empty(), "{:?}", files.denied);

        // (The name reached outside the cluster comes as an EgressAllowlist in this style.)
        let labels = advise(
            &state,
            &observed[..4],
            &AdviseOptions {
                style: Style::Labels,
                ..Default::default()
            },
        );
        assert_eq!(labels.policies, ["shop/db-0-callers-observed"]);
        let policy: serde_json::Value = serde_norway::from_str(&labels.yaml).unwrap();
        assert_eq!(
            policy["spec"]["ingress"][0]["from"],
            serde_json::json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"egress.tollgate.io/shop.db-0": "true"}}}])
        );
        assert_eq!(
            policy["spec"]["ingress"][0]["ports"],
            serde_json::json!([{"protocol": "TCP", "port": 5432}, {"protocol": "TCP", "port": 9187}])
        );
        let wants = |w: &str| labels.labels[w].clone();
        assert_eq!(
            wants("shop/web"),
            BTreeMap::from([(
                "egress.tollgate.io/shop.db-0".to_string(),
                "true".to_string()
            )])
        );
        assert!(labels.labels.contains_key("ops/scraper-0"));
        // Proven with the callers labelled: the database's ingress allows both.
        assert!(labels.denied.is_empty(), "{:?}", labels.denied);
        assert!(
            labels.notes.iter().any(|n| n.contains("shop/web -> world")),
            "{:?}",
            labels.notes
        );

        // Callers from outside the cluster carry no label: an ipBlock rule keeps them.
        let mut with_world = observed[..4].to_vec();
        with_world.push(flow(
            "ingress",
            ("world", "world"),
            ("shop", "db-0"),
            5432,
            [3, 0, 0],
        ));
        let labels = advise(
            &state,
            &with_world,
            &AdviseOptions {
                style: Style::Labels,
                ..Default::default()
            },
        );
        let policy: serde_json::Value = serde_norway::from_str(&labels.yaml).unwrap();
        assert_eq!(
            policy["spec"]["ingress"][1],
            serde_json::json!({
                "from": [
                    {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/16"]}},
                    {"ipBlock": {"cidr": "::/0"}}
                ],
                "ports": [{"protocol": "TCP", "port": 5432}]
            }),
            "{}",
            labels.yaml
        );
        assert!(labels.denied.is_empty(), "{:?}", labels.denied);
    }

    /// Advice applied and advised again keeps its names, so applying it replaces what it
    /// wrote; a policy of that name written by hand (or for another workload) is never
    /// overwritten.
    #[test]
    fn advising_again_reuses_the_names_it_wrote() {
        let observed = [
            flow(
                "egress",
                ("shop", "web"),
                ("shop", "db-0"),
                5432,
                [10, 0, 0],
            ),
            flow(
                "ingress",
                ("shop", "web"),
                ("shop", "db-0"),
                5432,
                [10, 0, 0],
            ),
        ];
        let first = advise(&state(SHOP), &observed, &AdviseOptions::default());
        assert!(
            first.policies.contains(&"shop/web-observed".to_string()),
            "{:?}",
            first.policies
        );
        let applied = format!("{SHOP}\n---\n{}", first.yaml);
        let again = advise(&state(&applied), &observed, &AdviseOptions::default());
        assert_eq!(again.policies, first.policies);
        let by_hand = format!(
            "{SHOP}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web-observed, namespace: shop}}\nspec: {{podSelector: {{}}}}\n"
        );
        let beside = advise(&state(&by_hand), &observed, &AdviseOptions::default());
        assert!(
            beside.policies.contains(&"shop/web-observed-2".to_string()),
            "{:?}",
            beside.policies
        );
    }

    /// A workload name near the 253 characters of an object name is cut to leave room for
    /// the suffix: the advice stays valid.
    #[test]
    fn advised_names_stay_within_an_object_names_length() {
        let state = state(SHOP);
        let long = "w".repeat(250);
        let name = advised_name(&state, "shop", &format!("{long}-callers"), &long, false);
        assert!(name.len() <= 253 - 3, "{}", name.len());
        assert!(name.ends_with("-observed"), "{name}");
        assert_eq!(
            advised_name(&state, "shop", "web", "web", false),
            "web-observed"
        );
    }

    /// A call allowed at the caller's egress but seen only as a would-drop at the callee's
    /// ingress is left out by every style: the caller's record alone makes no edge.
    #[test]
    fn an_edge_denied_at_one_end_is_left_out_by_every_style() {
        let state = state(SHOP);
        let observed = [
            flow(
                "egress",
                ("ops", "scraper-0"),
                ("shop", "db-0"),
                5432,
                [4, 0, 0],
            ),
            flow(
                "ingress",
                ("ops", "scraper-0"),
                ("shop", "db-0"),
                5432,
                [0, 4, 0],
            ),
        ];
        for style in [Style::RuleFiles, Style::Labels] {
            let advice = advise(
                &state,
                &observed,
                &AdviseOptions {
                    style,
                    ..Default::default()
                },
            );
            assert!(advice.files.is_empty(), "{style:?}: {:?}", advice.files);
            assert!(
                !advice.policies.iter().any(|p| p.starts_with("shop/")),
                "{style:?}: nothing admits it at the database\n{}",
                advice.yaml
            );
            assert!(advice.labels.is_empty(), "{style:?}: {:?}", advice.labels);
            assert!(
                advice.notes.iter().any(|n| n.contains("seen only denied")),
                "{style:?}: {:?}",
                advice.notes
            );
        }
    }
}
