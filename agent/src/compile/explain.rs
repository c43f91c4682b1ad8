//! Why a flow is denied, and the smallest change that would allow it: the side that denied
//! it (the source's egress or the destination's ingress), the policies that isolate that
//! side, and either labels to add to the peer's workload (so a rule that already exists
//! selects it) or the rule to add to one of those policies.

use std::{collections::BTreeMap, net::IpAddr};

use agent_common::{DIR_EGRESS, DIR_INGRESS};

use super::model::{ClusterState, Labels, PeerSpec, PodInfo, Policy, PortRef, Protocol, Selector};

/// Labels the controllers set per pod or per revision: never a peer's identity.
const UNSTABLE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
    "batch.kubernetes.io/job-completion-index",
    // A CronJob's Jobs: each run has a name (and these labels) of its own.
    "job-name",
    "batch.kubernetes.io/job-name",
];

/// Labels that name an application, tried first as a one-label selector.
const NAME_LABELS: &[&str] = &["app.kubernetes.io/name", "app", "k8s-app", "name"];

/// The other end of a denied flow, as the denying side sees it.
#[derive(Clone, Debug)]
pub enum Peer<'a> {
    Pod(&'a PodInfo),
    Address(IpAddr),
}

/// The smallest change that would allow a denied flow.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Fix {
    /// Add labels to the peer's workload: an existing rule of `policy` then selects it.
    Labels {
        policy: String,
        workload: String,
        labels: BTreeMap<String, String>,
    },
    /// Add a rule (flow-style YAML, an item of `ingress` or `egress`) to `policy`; first,
    /// when the peer's pods share no label that selects them, `label_first` on them.
    Rule {
        policy: String,
        direction: &'static str,
        rule: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        label_first: Option<WorkloadLabels>,
        /// `rule` in parts, so rules for several peers of one denied flow merge into one.
        #[serde(skip)]
        parts: RuleParts,
    },
    /// Add an entry (flow-style YAML, an item of `spec.egress`) to EgressAllowlist
    /// `allowlist`, for a DNS name outside the cluster.
    Domain { allowlist: String, rule: String },
    /// An address outside the cluster from a workload an EgressAllowlist selects: allowed
    /// only once the workload resolves an allowed name to it (or by a NetworkPolicy
    /// ipBlock); `check` the name instead.
    ResolveName { allowlist: String },
    /// A Service whose backends include addresses outside the cluster (`outside`), from a
    /// workload an EgressAllowlist selects: kube-proxy would take the connection there, so
    /// only a NetworkPolicy ipBlock for those addresses allows it.
    ServiceOutside {
        allowlist: String,
        outside: Vec<String>,
    },
    /// A DNS name outside the cluster from a workload no EgressAllowlist selects: its
    /// NetworkPolicies allow addresses, not names. `rule` is the allowlist entry.
    NameWithoutAllowlist {
        name: String,
        workload: String,
        policy: String,
        rule: String,
    },
    /// A Service address on a port the Service does not expose (`exposed`: the ones it
    /// does, as `PORT/PROTOCOL`), or one with no ready backend (`exposed` empty).
    ServicePort { exposed: Vec<String> },
    /// An address resolved from `name`, which EgressAllowlist `allowlist` allows, used for
    /// a new connection after its DNS answer had expired: no policy change is missing.
    Expired { allowlist: String, name: String },
}

/// Labels to add to a workload's pods.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadLabels {
    /// `NAMESPACE/WORKLOAD`.
    pub workload: String,
    pub labels: BTreeMap<String, String>,
}

/// A rule as its parts: `to` or `from`, its peers and its ports (flow-style YAML).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleParts {
    key: &'static str,
    peers: Vec<String>,
    ports: Option<String>,
}

impl RuleParts {
    fn yaml(&self) -> String {
        let peers = self.peers.join(", ");
        match &self.ports {
            Some(ports) => format!("{{{}: [{peers}], ports: [{ports}]}}", self.key),
            None => format!("{{{}: [{peers}]}}", self.key),
        }
    }
}

impl Fix {
    /// Takes `other` into this fix when both add a rule with the same ports to the same
    /// policy, for other peers (the backends of a Service with different labels): one rule
    /// for all of them. False when they do not combine.
    pub fn absorb(&mut self, other: &Fix) -> bool {
        let (
            Fix::Rule {
                policy,
                direction,
                rule,
                label_first: None,
                parts,
            },
            Fix::Rule {
                policy: other_policy,
                direction: other_direction,
                label_first: None,
                parts: other_parts,
                ..
            },
        ) = (self, other)
        else {
            return false;
        };
        if policy != other_policy
            || direction != other_direction
            || parts.key != other_parts.key
            || parts.ports != other_parts.ports
            || parts.key.is_empty()
        {
            return false;
        }
        for peer in &other_parts.peers {
            if !parts.peers.contains(peer) {
                parts.peers.push(peer.clone());
            }
        }
        *rule = parts.yaml();
        true
    }
}

/// Explanations of the denied pairs of one flow (the pods of a workload, the backends of a
/// Service): each change once, rules with the same ports for the same policy merged into one,
/// so that applying every change listed allows every pair.
pub fn merge(explanations: impl IntoIterator<Item = Explanation>) -> Vec<Explanation> {
    let mut out: Vec<Explanation> = Vec::new();
    'next: for e in explanations {
        for kept in &mut out {
            if kept.side == e.side && (kept.fix == e.fix || kept.fix.absorb(&e.fix)) {
                continue 'next;
            }
        }
        out.push(e);
    }
    out
}

/// The EgressAllowlist entry (flow-style YAML, an item of `spec.egress`) that allows `name`
/// on `port` of `protocol`, or on everything for a protocol without ports (`None`).
pub fn domain_entry(name: &str, protocol: Option<Protocol>, port: u16) -> String {
    match protocol {
        Some(p) => format!(
            "{{domains: [{name}], ports: [{{port: {port}, protocol: {}}}]}}",
            p.as_str()
        ),
        None => format!("{{domains: [{name}]}}"),
    }
}

/// One denied side of a flow.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// `egress` (at the source) or `ingress` (at the destination).
    pub side: &'static str,
    /// `NAMESPACE/POD` whose policies denied it.
    pub pod: String,
    /// The policies that isolate that pod in that direction.
    pub isolated_by: Vec<String>,
    pub fix: Fix,
}

impl Explanation {
    /// One sentence for people.
    pub fn summary(&self) -> String {
        let fix = match &self.fix {
            Fix::Labels {
                policy,
                workload,
                labels,
            } => format!(
                "add the label{} {} to {workload}, which a rule of {policy} then selects",
                if labels.len() == 1 { "" } else { "s" },
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Fix::Rule {
                policy,
                direction,
                rule,
                label_first: None,
                ..
            } => format!("add to {policy} the {direction} rule {rule}"),
            Fix::Rule {
                policy,
                direction,
                rule,
                label_first: Some(WorkloadLabels { workload, labels }),
                ..
            } => format!(
                "add the label {} to {workload} (its pods share no label that selects them alone), then add to {policy} the {direction} rule {rule}",
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Fix::Domain { allowlist, rule } => {
                format!("add to EgressAllowlist {allowlist} the entry {rule}")
            }
            Fix::Expired { allowlist, name } => format!(
                "nothing is missing from EgressAllowlist {allowlist}, which allows {name}: the workload connected to an address its DNS answer for {name} gave after that answer had expired (its TTL, at least --dns-min-ttl, plus --dns-grace); have it resolve the name again before it connects (tollgate_egress_expired_total counts these)"
            ),
            Fix::ServiceOutside { allowlist, outside } => format!(
                "the Service's backends {} are outside the cluster, where EgressAllowlist {allowlist} isolates the workload: add an ipBlock for them to a NetworkPolicy selecting it (which isolates its egress), or reach the outside by a name the allowlist allows",
                outside.join(", ")
            ),
            Fix::ResolveName { allowlist } => format!(
                "reach it by a name EgressAllowlist {allowlist} allows (an address is allowed once the workload's own DNS answer for an allowed name gives it), or add an ipBlock for it to a NetworkPolicy"
            ),
            Fix::NameWithoutAllowlist {
                name,
                workload,
                policy,
                rule,
            } => format!(
                "select {workload} with an EgressAllowlist holding the entry {rule} (a NetworkPolicy allows addresses, not names), or add to {policy} an egress rule with an ipBlock of every address {name} resolves to"
            ),
            Fix::ServicePort { exposed } if exposed.is_empty() => {
                "give the Service a ready backend: it has none on that port".to_string()
            }
            Fix::ServicePort { exposed } => format!(
                "use a port the Service exposes ({}): kube-proxy forwards no other",
                exposed.join(", ")
            ),
        };
        let isolated_by = if self.isolated_by.is_empty() {
            String::new()
        } else {
            format!(" (isolated by {})", self.isolated_by.join(", "))
        };
        format!(
            "denied at the {} of {}{isolated_by}; to allow it, {fix}",
            self.side, self.pod,
        )
    }
}

/// Explains why `pod` denied a new flow in `direction` with `peer` on `port` (`protocol`
/// `None`: a protocol without ports, such as ICMP). `isolated_by` are the policies
/// isolating it in that direction (`NAMESPACE/NAME`). `port_name`: the flow's port was named
/// (a container port of the destination pod), so a rule names it too: a name can stand for
/// other numbers on the workload's other pods.
#[allow(clippy::too_many_arguments)]
pub fn explain(
    state: &ClusterState,
    pod: &PodInfo,
    direction: u8,
    isolated_by: &[String],
    peer: &Peer,
    protocol: Option<Protocol>,
    port: u16,
    port_name: Option<&str>,
) -> Explanation {
    let policies: Vec<&Policy> = policies_of(state, isolated_by).collect();
    let side = if direction == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    };
    let fix = match peer {
        Peer::Pod(peer) => label_fix(state, pod, direction, &policies, peer, protocol, port),
        Peer::Address(_) => None,
    }
    .unwrap_or_else(|| {
        let (parts, label_first) = rule_for(state, pod, direction, peer, protocol, port, port_name);
        Fix::Rule {
            policy: isolated_by.first().cloned().unwrap_or_default(),
            direction: side,
            rule: parts.yaml(),
            label_first,
            parts,
        }
    });
    Explanation {
        side,
        pod: format!("{}/{}", pod.namespace, pod.name),
        isolated_by: isolated_by.to_vec(),
        fix,
    }
}

/// Whether a rule of the policies `isolated_by` (`NAMESPACE/NAME`) that isolate `pod` in
/// `direction` already allows `peer` on `port`: a flow denied earlier that the policies in
/// force allow now needs no change.
pub fn rules_allow(
    state: &ClusterState,
    pod: &PodInfo,
    direction: u8,
    isolated_by: &[String],
    peer: &PodInfo,
    protocol: Option<Protocol>,
    port: u16,
) -> bool {
    let policies: Vec<&Policy> = policies_of(state, isolated_by).collect();
    fitting_rules(&policies, direction, pod, peer, protocol, port).any(|(policy, rule)| {
        rule.peers.is_empty()
            || rule.peers.iter().any(|spec| match spec {
                PeerSpec::Pods { namespaces, pods } => {
                    namespace_takes(state, policy, namespaces, peer)
                        && pods.as_ref().is_none_or(|sel| sel.matches(&peer.labels))
                }
                PeerSpec::IpBlock { cidr, except } => peer
                    .ips
                    .iter()
                    .any(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))),
            })
    })
}

/// The policies named `NAMESPACE/NAME` in `ids`, as the state has them.
fn policies_of<'a>(state: &'a ClusterState, ids: &'a [String]) -> impl Iterator<Item = &'a Policy> {
    ids.iter()
        .filter_map(|id| id.split_once('/'))
        .filter_map(|(ns, name)| state.policies.get(&(ns.to_string(), name.to_string())))
}

/// The rules of `policies` in `direction` whose ports take in the flow between `pod` and
/// `peer` (named ports resolved on the destination: the pod itself at ingress), each with
/// its policy.
fn fitting_rules<'a>(
    policies: &'a [&'a Policy],
    direction: u8,
    pod: &'a PodInfo,
    peer: &'a PodInfo,
    protocol: Option<Protocol>,
    port: u16,
) -> impl Iterator<Item = (&'a Policy, &'a super::model::RuleSpec)> {
    let destination = if direction == DIR_INGRESS { pod } else { peer };
    policies.iter().flat_map(move |policy| {
        let rules = if direction == DIR_INGRESS {
            &policy.ingress
        } else {
            &policy.egress
        };
        rules
            .iter()
            .flatten()
            .filter(move |rule| ports_fit(&rule.ports, destination, protocol, port))
            .map(move |rule| (*policy, rule))
    })
}

/// Whether a rule's namespaceSelector (`None`: the policy's own namespace) takes in the
/// peer's namespace.
fn namespace_takes(
    state: &ClusterState,
    policy: &Policy,
    namespaces: &Option<Selector>,
    peer: &PodInfo,
) -> bool {
    match namespaces {
        None => peer.namespace == policy.namespace,
        Some(sel) => sel.matches(&state.namespace_labels(&peer.namespace)),
    }
}

/// The fewest labels that, added to the peer's workload, make a rule of one of `policies`
/// (with a port that fits the flow, and a namespace that takes the peer's in) select it.
fn label_fix(
    state: &ClusterState,
    pod: &PodInfo,
    direction: u8,
    policies: &[&Policy],
    peer: &PodInfo,
    protocol: Option<Protocol>,
    port: u16,
) -> Option<Fix> {
    let mut best: Option<(usize, Fix)> = None;
    for (policy, rule) in fitting_rules(policies, direction, pod, peer, protocol, port) {
        for spec in &rule.peers {
            let PeerSpec::Pods {
                namespaces,
                pods: Some(selector),
            } = spec
            else {
                continue;
            };
            let namespace_fits = namespace_takes(state, policy, namespaces, peer);
            let Some(missing) = missing_labels(selector, &peer.labels) else {
                continue;
            };
            if !namespace_fits || missing.is_empty() || selected_anew(state, peer, &missing) {
                continue;
            }
            if best.as_ref().is_none_or(|(n, _)| missing.len() < *n) {
                let fix = Fix::Labels {
                    policy: format!("{}/{}", policy.namespace, policy.name),
                    workload: format!("{}/{}", peer.namespace, peer.workload),
                    labels: missing.clone(),
                };
                best = Some((missing.len(), fix));
            }
        }
    }
    best.map(|(_, fix)| fix)
}

/// Whether `added` labels would make a NetworkPolicy or an EgressAllowlist of the peer's
/// namespace select it that does not now: it would be isolated where it is not today, which
/// could deny this very flow at its own end and others it has now.
fn selected_anew(state: &ClusterState, peer: &PodInfo, added: &BTreeMap<String, String>) -> bool {
    let mut labels = peer.labels.clone();
    for (k, v) in added {
        labels.insert(k.clone(), v.clone());
    }
    let in_namespace = |(ns, _): &(String, String)| *ns == peer.namespace;
    let anew = |selector: &Selector| !selector.matches(&peer.labels) && selector.matches(&labels);
    let from = (peer.namespace.clone(), String::new());
    state
        .policies
        .range(from.clone()..)
        .take_while(|(k, _)| in_namespace(k))
        .any(|(_, p)| anew(&p.pod_selector))
        || state
            .egress_allowlists
            .range(from..)
            .take_while(|(k, _)| in_namespace(k))
            .any(|(_, a)| anew(&a.pod_selector))
}

/// The matchLabels a pod lacks for `selector`; `None` when adding labels cannot make it
/// match (an expression, or a label the pod has with another value: changing it could
/// move the pod out of other policies).
fn missing_labels(selector: &Selector, labels: &Labels) -> Option<BTreeMap<String, String>> {
    if !selector.expressions.is_empty() {
        return None;
    }
    let mut missing = BTreeMap::new();
    for (k, v) in &selector.match_labels {
        match labels.get(k) {
            Some(have) if have == v => {}
            Some(_) => return None,
            None => {
                missing.insert(k.clone(), v.clone());
            }
        }
    }
    Some(missing)
}

/// Whether a rule's ports take in the flow (`protocol` `None`: no ports, only a rule
/// without ports does).
fn ports_fit(
    ports: &[super::model::PortSpec],
    destination: &PodInfo,
    protocol: Option<Protocol>,
    port: u16,
) -> bool {
    if ports.is_empty() {
        return true;
    }
    let Some(protocol) = protocol else {
        return false;
    };
    ports.iter().any(|p| {
        p.protocol == protocol
            && match &p.port {
                PortRef::Any => true,
                PortRef::Range(first, last) => (*first..=*last).contains(&port),
                PortRef::Named(name) => destination.named_port(name, protocol) == Some(port),
            }
    })
}

/// The rule to add: the peer by its workload's stable labels (and its namespace by name when
/// it is another), or its address; the flow's port (by name when it was named). When the
/// peer's pods share no label that selects them, the label to give them first.
fn rule_for(
    state: &ClusterState,
    pod: &PodInfo,
    direction: u8,
    peer: &Peer,
    protocol: Option<Protocol>,
    port: u16,
    port_name: Option<&str>,
) -> (RuleParts, Option<WorkloadLabels>) {
    let (peer_yaml, label_first) = match peer {
        Peer::Pod(peer) => {
            let stable = stable_selector(state, peer);
            if stable.is_empty() {
                // An empty selector would take in every pod of the namespace.
                let labels = workload_label(state, peer);
                let yaml = peer_by_labels(&pod.namespace, peer, &labels);
                let first = WorkloadLabels {
                    workload: format!("{}/{}", peer.namespace, peer.workload),
                    labels,
                };
                (yaml, Some(first))
            } else {
                (peer_by_labels(&pod.namespace, peer, &stable), None)
            }
        }
        Peer::Address(ip) => {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            (format!("{{ipBlock: {{cidr: {ip}/{bits}}}}}"), None)
        }
    };
    let key = if direction == DIR_EGRESS {
        "to"
    } else {
        "from"
    };
    // ICMP and other protocols without ports: only a rule without ports allows them.
    let ports = protocol.map(|protocol| {
        let port = port_name.map_or_else(|| port.to_string(), quoted);
        format!("{{protocol: {}, port: {port}}}", protocol.as_str())
    });
    let parts = RuleParts {
        key,
        peers: vec![peer_yaml],
        ports,
    };
    (parts, label_first)
}

/// A label that would select exactly the pods of `peer`'s workload, for a workload whose pods
/// share none: the first of the naming labels none of them has, with the workload's name
/// (kept to a label value's 63 characters) as its value.
fn workload_label(state: &ClusterState, peer: &PodInfo) -> BTreeMap<String, String> {
    let value: String = peer
        .workload
        .chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    let key = NAME_LABELS
        .iter()
        .copied()
        .find(|key| {
            super::advise::pods_of(state, &peer.namespace, &peer.workload)
                .all(|p| p.labels.get(key).is_none())
        })
        .unwrap_or("tollgate.io/workload");
    BTreeMap::from([(key.to_string(), value)])
}

/// A pod peer of a rule of a policy in `policy_namespace`, as flow-style YAML: its
/// workload's stable labels, and its namespace by name when it is another.
pub(super) fn pod_peer(state: &ClusterState, policy_namespace: &str, peer: &PodInfo) -> String {
    peer_by_labels(policy_namespace, peer, &stable_selector(state, peer))
}

/// A pod peer selected by `labels`, and by its namespace's name when it is another.
fn peer_by_labels(
    policy_namespace: &str,
    peer: &PodInfo,
    labels: &BTreeMap<String, String>,
) -> String {
    let pods = format!("podSelector: {{matchLabels: {}}}", flow_map(labels));
    if peer.namespace == policy_namespace {
        format!("{{{pods}}}")
    } else {
        format!(
            "{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}, {pods}}}",
            quoted(&peer.namespace)
        )
    }
}

/// Labels as a flow-style YAML map that reads back as the same strings.
pub(super) fn flow_map(labels: &BTreeMap<String, String>) -> String {
    let items: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}: {}", quoted(v)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// A label value (or a name) as every YAML parser reads it back as the same string: plain
/// only when it starts with a letter and holds nothing else than letters, digits and
/// `-_./`, and is no YAML 1.1 boolean or null (kubectl's parser reads `y` and `off` as
/// booleans); quoted otherwise (`"true"`, `"8080"`, `"0x1F"`, `"1_000"`, `"*.example.com"`).
pub(super) fn quoted(v: &str) -> String {
    let plain = v.starts_with(|c: char| c.is_ascii_alphabetic())
        && !["y", "n", "true", "false", "yes", "no", "on", "off", "null"]
            .contains(&v.to_ascii_lowercase().as_str())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if plain {
        return v.to_string();
    }
    // YAML's double-quoted escapes (Rust's `{:?}` writes `\u{1b}`, which YAML rejects).
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                out.push_str(&format!("\\u{:04X}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The labels that select a pod's workload: one naming label when it selects exactly the
/// workload's pods in their namespace, else every label all its pods share but those
/// controllers set per pod or revision (`pod-template-hash` and the like). A canary pod
/// with a label of its own does not narrow its workload's selector to itself. Empty when
/// those also select another workload's pods there (two Deployments labelled alike): a
/// selector of them would take in pods that never sent or received the flow.
pub fn stable_selector(state: &ClusterState, pod: &PodInfo) -> BTreeMap<String, String> {
    let namespace_pods = || {
        state
            .pods
            .range((pod.namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == pod.namespace)
            .map(|(_, p)| p)
    };
    let stable: BTreeMap<String, String> = pod
        .labels
        .iter()
        .filter(|(k, _)| !UNSTABLE_LABELS.contains(&k.as_str()))
        .filter(|(k, v)| {
            namespace_pods()
                .filter(|p| p.workload == pod.workload)
                .all(|p| p.labels.get(k.as_str()) == Some(*v))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for key in NAME_LABELS {
        let Some(value) = stable.get(*key) else {
            continue;
        };
        let selects_only_the_workload = namespace_pods()
            .filter(|p| p.labels.get(key) == Some(value))
            .all(|p| p.workload == pod.workload);
        if selects_only_the_workload {
            return BTreeMap::from([(key.to_string(), value.clone())]);
        }
    }
    let selects_only_the_workload = namespace_pods()
        .filter(|p| {
            stable
                .iter()
                .all(|(k, v)| p.labels.get(k.as_str()) == Some(v))
        })
        .all(|p| p.workload == pod.workload);
    if selects_only_the_workload {
        stable
    } else {
        BTreeMap::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::store::Store;

    fn state(yaml: &str) -> ClusterState {
        Store::from_yaml(yaml).into_state()
    }

    /// A rule fix as (policy, direction, rule, labels to add first).
    fn rule_fix(fix: &Fix) -> (&str, &str, &str, Option<&WorkloadLabels>) {
        let Fix::Rule {
            policy,
            direction,
            rule,
            label_first,
            ..
        } = fix
        else {
            panic!("not a rule: {fix:?}")
        };
        (policy, direction, rule, label_first.as_ref())
    }

    const CLUSTER: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web-7d9f-abc, namespace: shop, labels: {app: web, pod-template-hash: 7d9f}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db, tier: data}}
spec: {containers: [{name: db, ports: [{name: pg, containerPort: 5432}]}]}
status: {podIP: 10.0.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: db-client}}}]
    ports: [{port: pg}]
";

    #[test]
    fn a_missing_label_is_the_smallest_fix_when_a_rule_already_fits() {
        let state = state(CLUSTER);
        let db = &state.pods[&("shop".into(), "db-0".into())];
        let web = &state.pods[&("shop".into(), "web-7d9f-abc".into())];
        let e = explain(
            &state,
            db,
            DIR_INGRESS,
            &["shop/db-in".into()],
            &Peer::Pod(web),
            Some(Protocol::Tcp),
            5432,
            None,
        );
        assert_eq!(e.side, "ingress");
        assert_eq!(e.pod, "shop/db-0");
        assert_eq!(
            e.fix,
            Fix::Labels {
                policy: "shop/db-in".into(),
                workload: format!("shop/{}", web.workload),
                labels: BTreeMap::from([("role".into(), "db-client".into())]),
            }
        );
        assert!(e.summary().contains("role=db-client"), "{}", e.summary());
    }

    /// An earlier would-drop the policies in force allow now needs no change: by labels,
    /// by a named port, by an ipBlock; a port or peer no rule takes is still denied.
    #[test]
    fn rules_in_force_that_allow_a_flow_are_recognised() {
        let extra = "
---
apiVersion: v1
kind: Pod
metadata: {name: client-0, namespace: shop, labels: {app: client, role: db-client}}
status: {podIP: 10.0.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-web-block, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.1/32}}]
    ports: [{port: 6432}]
";
        let state = state(&format!("{CLUSTER}{extra}"));
        let pod = |name: &str| &state.pods[&("shop".to_string(), name.to_string())];
        let policies = ["shop/db-in".to_string(), "shop/db-web-block".to_string()];
        let allows = |peer: &str, port: u16| {
            rules_allow(
                &state,
                pod("db-0"),
                DIR_INGRESS,
                &policies,
                pod(peer),
                Some(Protocol::Tcp),
                port,
            )
        };
        assert!(allows("client-0", 5432), "labels and the named port pg");
        assert!(!allows("client-0", 5433), "a port no rule takes");
        assert!(!allows("web-7d9f-abc", 5432), "a peer no rule selects");
        assert!(
            allows("web-7d9f-abc", 6432),
            "an ipBlock holding its address"
        );
        assert!(!allows("client-0", 6432), "outside the ipBlock");
    }

    #[test]
    fn a_port_no_rule_takes_in_gets_a_rule_selecting_the_peer_by_stable_labels() {
        let state = state(CLUSTER);
        let db = &state.pods[&("shop".into(), "db-0".into())];
        let web = &state.pods[&("shop".into(), "web-7d9f-abc".into())];
        let e = explain(
            &state,
            db,
            DIR_INGRESS,
            &["shop/db-in".into()],
            &Peer::Pod(web),
            Some(Protocol::Tcp),
            8080,
            None,
        );
        assert_eq!(
            rule_fix(&e.fix),
            (
                "shop/db-in",
                "ingress",
                "{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{protocol: TCP, port: 8080}]}",
                None
            )
        );
    }

    #[test]
    fn an_address_outside_the_cluster_gets_an_ip_block_and_icmp_a_rule_without_ports() {
        let state = state(CLUSTER);
        let web = &state.pods[&("shop".into(), "web-7d9f-abc".into())];
        let peer = Peer::Address("203.0.113.7".parse().unwrap());
        let e = explain(
            &state,
            web,
            DIR_EGRESS,
            &["shop/x".into()],
            &peer,
            None,
            0,
            None,
        );
        assert_eq!(e.side, "egress");
        assert_eq!(
            rule_fix(&e.fix),
            (
                "shop/x",
                "egress",
                "{to: [{ipBlock: {cidr: 203.0.113.7/32}}]}",
                None
            )
        );
    }

    #[test]
    fn a_peer_in_another_namespace_is_named_by_its_namespace_and_all_its_stable_labels() {
        let yaml = format!(
            "{CLUSTER}---
apiVersion: v1
kind: Pod
metadata: {{name: job-x, namespace: ops, labels: {{app: report, team: fin, controller-uid: u1}}}}
status: {{podIP: 10.0.1.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: other, namespace: ops, labels: {{app: report}}}}
status: {{podIP: 10.0.1.2}}
"
        );
        let state = state(&yaml);
        let db = &state.pods[&("shop".into(), "db-0".into())];
        let job = &state.pods[&("ops".into(), "job-x".into())];
        let e = explain(
            &state,
            db,
            DIR_INGRESS,
            &["shop/db-in".into()],
            &Peer::Pod(job),
            Some(Protocol::Udp),
            53,
            None,
        );
        // `app: report` also selects another workload: every stable label, not the uid.
        let Fix::Rule { rule, .. } = &e.fix else {
            panic!("{:?}", e.fix)
        };
        assert_eq!(
            rule,
            "{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}, podSelector: {matchLabels: {app: report, team: fin}}}], ports: [{protocol: UDP, port: 53}]}"
        );
    }

    /// Values YAML 1.1 parsers (kubectl's among them) read as numbers, booleans or
    /// aliases are quoted; plain names stay plain. Either way they read back as written.
    #[test]
    fn values_are_quoted_wherever_a_yaml_parser_could_read_them_otherwise() {
        for (value, plain) in [
            ("web", true),
            ("v1.2", true),
            ("app.kubernetes.io", true),
            ("0x1F", false),
            ("1_000", false),
            ("8080", false),
            ("2026-11-27", false),
            ("y", false),
            ("Off", false),
            ("true", false),
            ("*.example.com", false),
            ("a: b", false),
            ("", false),
            ("ctl\u{1b}.org", false),
            ("say \"hi\" \\ back", false),
            ("line\u{2028}break", false),
        ] {
            let written = quoted(value);
            assert_eq!(written == value, plain, "{value:?} written as {written}");
            let read: String = serde_norway::from_str(&written).unwrap();
            assert_eq!(read, value);
        }
    }
}
