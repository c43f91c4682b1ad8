//! The upstream Kubernetes NetworkPolicy e2e model as data: namespaces x, y, z, each with pods
//! a, b, c (label `pod: NAME`, namespace labels `ns: NAME` and
//! `kubernetes.io/metadata.name: NAME`), serving TCP and UDP on ports 80 and 81 (named
//! `serve-80-tcp` ...). A scenario is a set of policies plus the expected 9x9 reachability
//! matrix, written as rules over a default of "allowed", the way upstream builds them.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use serde::Deserialize;

/// The nine pods, in matrix order.
pub const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

/// One probe: a port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Probe {
    pub port: u16,
    pub udp: bool,
}

impl Probe {
    pub fn parse(s: &str) -> Probe {
        let (port, proto) = s.split_once('/').expect("PORT/PROTO");
        Probe {
            port: port.parse().expect("port"),
            udp: proto.eq_ignore_ascii_case("udp"),
        }
    }
    pub fn proto(&self) -> &'static str {
        if self.udp { "udp" } else { "tcp" }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.proto().to_uppercase())
    }
}

/// A scenario as written in `tests/conformance/scenarios.yaml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// NetworkPolicy YAML; `{{ip:NS/POD}}` stands for a pod's IPv4 address.
    pub policies: String,
    /// Extra namespace labels, by namespace.
    #[serde(default, rename = "namespaceLabels")]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Extra pod labels, by NS/POD.
    #[serde(default, rename = "podLabels")]
    pub pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Probes, `PORT/PROTO`; default `80/TCP`.
    #[serde(default)]
    pub probes: Vec<String>,
    /// `FROM -> TO: allow|deny`, optionally `FROM -> TO @ PORT/PROTO: ...`, applied in order
    /// over "everything allowed". Patterns: `*`, `x/*`, `*/a`, `x/a`.
    pub expect: Vec<String>,
}

/// Loads every scenario.
pub fn scenarios() -> Vec<Scenario> {
    let text = include_str!("../conformance/scenarios.yaml");
    serde_norway::from_str(text).expect("scenarios.yaml")
}

impl Scenario {
    pub fn probes(&self) -> Vec<Probe> {
        if self.probes.is_empty() {
            vec![Probe {
                port: 80,
                udp: false,
            }]
        } else {
            self.probes.iter().map(|p| Probe::parse(p)).collect()
        }
    }

    /// The expected matrix for one probe: `[from][to]`.
    pub fn expected(&self, probe: Probe) -> [[bool; 9]; 9] {
        let mut m = [[true; 9]; 9];
        for rule in &self.expect {
            let (lhs, verdict) = rule
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("{}: bad rule {rule:?}", self.name));
            let allow = match verdict.trim() {
                "allow" => true,
                "deny" => false,
                other => panic!("{}: verdict {other:?}", self.name),
            };
            let (pair, only) = match lhs.split_once('@') {
                Some((pair, p)) => (pair, Some(Probe::parse(p.trim()))),
                None => (lhs, None),
            };
            if only.is_some_and(|p| p != probe) {
                continue;
            }
            let (from, to) = pair
                .split_once("->")
                .unwrap_or_else(|| panic!("{}: bad rule {rule:?}", self.name));
            for (i, src) in PODS.iter().enumerate() {
                for (j, dst) in PODS.iter().enumerate() {
                    if matches(from.trim(), src) && matches(to.trim(), dst) {
                        m[i][j] = allow;
                    }
                }
            }
        }
        m
    }
}

fn matches(pattern: &str, pod: &str) -> bool {
    let (pns, pname) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let (ns, name) = pod.split_once('/').expect("ns/pod");
    (pns == "*" || pns == ns) && (pname == "*" || pname == name)
}

/// The IPv4 address of a pod in the lab and in the cluster state: 10.1.0.10 + index.
pub fn pod_ipv4(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 10 + index as u8)
}

/// The IPv6 address of a pod: fd77:1::(10 + index).
pub fn pod_ipv6(index: usize) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 10 + index as u16)
}

/// The cluster state of a scenario as Kubernetes YAML: namespaces, pods (with
/// `status.podIPs` and, when `interfaces` is given, a `tollgate.io/interface` annotation)
/// and the scenario's policies.
pub fn cluster_yaml(scenario: &Scenario, interfaces: Option<&[String]>) -> String {
    let mut y = String::new();
    for ns in ["x", "y", "z"] {
        let mut labels = BTreeMap::from([
            ("ns".to_string(), ns.to_string()),
            ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
        ]);
        labels.extend(
            scenario
                .namespace_labels
                .get(ns)
                .cloned()
                .unwrap_or_default(),
        );
        writeln!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:"
        )
        .unwrap();
        for (k, v) in labels {
            writeln!(y, "    {k}: {v:?}").unwrap();
        }
    }
    for (i, pod) in PODS.iter().enumerate() {
        let (ns, name) = pod.split_once('/').unwrap();
        let mut labels = BTreeMap::from([("pod".to_string(), name.to_string())]);
        labels.extend(scenario.pod_labels.get(*pod).cloned().unwrap_or_default());
        writeln!(y, "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:").unwrap();
        for (k, v) in labels {
            writeln!(y, "    {k}: {v:?}").unwrap();
        }
        if let Some(ifaces) = interfaces {
            writeln!(
                y,
                "  annotations:\n    tollgate.io/interface: {}",
                ifaces[i]
            )
            .unwrap();
        }
        writeln!(
            y,
            "spec:\n  containers:\n  - name: c\n    image: agnhost\n    ports:"
        )
        .unwrap();
        for port in [80, 81] {
            for proto in ["TCP", "UDP"] {
                writeln!(
                    y,
                    "    - {{containerPort: {port}, protocol: {proto}, name: serve-{port}-{}}}",
                    proto.to_lowercase()
                )
                .unwrap();
            }
        }
        writeln!(
            y,
            "status:\n  phase: Running\n  podIPs:\n  - ip: {}\n  - ip: {}",
            pod_ipv4(i),
            pod_ipv6(i)
        )
        .unwrap();
    }
    let mut policies = scenario.policies.clone();
    for (i, pod) in PODS.iter().enumerate() {
        policies = policies.replace(&format!("{{{{ip:{pod}}}}}"), &pod_ipv4(i).to_string());
    }
    if !policies.trim().is_empty() {
        writeln!(y, "---\n{}", policies.trim_end()).unwrap();
    }
    y
}

/// A matrix as text, rows from, columns to; `.` allowed, `X` denied, `*` marks a cell that
/// differs from `other`.
pub fn render(m: &[[bool; 9]; 9], other: Option<&[[bool; 9]; 9]>) -> String {
    let mut s = String::from("      ");
    for p in PODS {
        write!(s, "{p:<5}").unwrap();
    }
    s.push('\n');
    for (i, src) in PODS.iter().enumerate() {
        write!(s, "{src:<6}").unwrap();
        for j in 0..9 {
            let c = if i == j {
                '-'
            } else if m[i][j] {
                '.'
            } else {
                'X'
            };
            let diff = other.is_some_and(|o| i != j && o[i][j] != m[i][j]);
            write!(s, "{c}{}   ", if diff { '*' } else { ' ' }).unwrap();
        }
        s.push('\n');
    }
    s
}

/// Whether two matrices agree off the diagonal (a pod's traffic to itself never leaves it,
/// as upstream's `AllowLoopback`).
pub fn agree(a: &[[bool; 9]; 9], b: &[[bool; 9]; 9]) -> bool {
    (0..9).all(|i| (0..9).all(|j| i == j || a[i][j] == b[i][j]))
}
