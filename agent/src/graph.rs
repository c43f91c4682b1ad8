//! The observed service graph as Graphviz DOT (`tollgate graph`): workloads grouped by
//! namespace, `world` and the node as their own nodes, one edge per peer pair and verdict
//! labelled with the ports and protocols, coloured by verdict.

use std::collections::{BTreeMap, BTreeSet};

use crate::compile::advise::ObservedFlow;

/// Verdicts, worst last: a port seen both allowed and would-drop counts as would-drop.
pub const VERDICTS: [&str; 3] = ["allowed", "would_drop", "dropped"];

const COLOURS: [&str; 3] = ["#2e7d32", "#ef6c00", "#c62828"];

/// Ports an edge label lists; the rest are counted ("+N more") and listed in its tooltip.
const EDGE_PORTS_SHOWN: usize = 4;

/// Which edges to draw.
#[derive(Clone, Debug, Default)]
pub struct GraphFilter {
    /// Only edges with an end in one of these namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// Only edges of these verdicts (all when empty).
    pub verdicts: Vec<String>,
}

/// The worst verdict a record saw (index into `VERDICTS`).
fn worst(flow: &ObservedFlow) -> usize {
    (0..3).rev().find(|v| flow.packets[*v] > 0).unwrap_or(0)
}

fn node_id(namespace: &str, workload: &str) -> String {
    match (namespace, workload) {
        ("world", "world") => "world".into(),
        ("host", "host") => "host".into(),
        _ => format!("{namespace}/{workload}"),
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The DOT text of the observed flows that pass `filter`.
pub fn dot(observed: &[ObservedFlow], filter: &GraphFilter) -> String {
    // The same flow is seen at both of its ends: one verdict per (pair, port), the worst.
    let mut ports: BTreeMap<(String, String, String, u16), usize> = BTreeMap::new();
    for f in observed {
        // Destinations outside the cluster by the DNS name they were resolved from.
        let dst = match node_id(&f.dst_namespace, &f.dst_workload) {
            w if w == "world" && !f.dst_domain.is_empty() => format!("world:{}", f.dst_domain),
            id => id,
        };
        let key = (
            node_id(&f.src_namespace, &f.src_workload),
            dst,
            f.protocol.clone(),
            f.port,
        );
        let v = ports.entry(key).or_insert(0);
        *v = (*v).max(worst(f));
    }
    let in_namespaces = |id: &str| {
        filter.namespaces.is_empty()
            || filter
                .namespaces
                .iter()
                .any(|ns| id.split_once('/').is_some_and(|(n, _)| n == ns))
    };
    // (src, dst, verdict) -> "port/protocol" labels.
    let mut edges: BTreeMap<(String, String, usize), Vec<String>> = BTreeMap::new();
    for ((src, dst, protocol, port), verdict) in ports {
        if !(in_namespaces(&src) || in_namespaces(&dst)) {
            continue;
        }
        if !filter.verdicts.is_empty() && !filter.verdicts.iter().any(|v| v == VERDICTS[verdict]) {
            continue;
        }
        let label = if port == 0 {
            protocol
        } else {
            format!("{port}/{protocol}")
        };
        edges.entry((src, dst, verdict)).or_default().push(label);
    }
    // Readable at scale: an edge shows its first ports, its tooltip all of them.
    let shown = |labels: &[String]| {
        if labels.len() <= EDGE_PORTS_SHOWN {
            labels.join(", ")
        } else {
            format!(
                "{}, +{} more",
                labels[..EDGE_PORTS_SHOWN].join(", "),
                labels.len() - EDGE_PORTS_SHOWN
            )
        }
    };
    let mut by_namespace: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut outside = BTreeSet::new();
    for (src, dst, _) in edges.keys() {
        for id in [src, dst] {
            match id.split_once('/') {
                Some((ns, _)) => {
                    by_namespace
                        .entry(ns.into())
                        .or_default()
                        .insert(id.clone());
                }
                None => {
                    outside.insert(id.clone());
                }
            }
        }
    }
    let mut out = String::from(
        "digraph tollgate {\n  graph [rankdir=LR, nodesep=0.25, ranksep=1.5, fontname=\"Helvetica\", labelloc=t, label=\"Observed traffic (green: allowed, orange: would_drop, red: dropped)\"];\n  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f5f5f5\", fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n",
    );
    for (ns, ids) in &by_namespace {
        out += &format!(
            "  subgraph {} {{\n    label={};\n    style=\"rounded\";\n",
            quote(&format!("cluster_{ns}")),
            quote(ns)
        );
        for id in ids {
            let name = id.split_once('/').map_or(id.as_str(), |(_, w)| w);
            out += &format!("    {} [label={}];\n", quote(id), quote(name));
        }
        out += "  }\n";
    }
    for id in &outside {
        let label = match id.strip_prefix("world:") {
            Some(domain) => domain,
            None if id == "world" => "world (outside the cluster)",
            None => "the node",
        };
        out += &format!("  {} [label={}, shape=ellipse];\n", quote(id), quote(label));
    }
    for ((src, dst, verdict), labels) in &edges {
        out += &format!(
            "  {} -> {} [label={}, color={}, fontcolor={}, tooltip={}];\n",
            quote(src),
            quote(dst),
            quote(&shown(labels)),
            quote(COLOURS[*verdict]),
            quote(COLOURS[*verdict]),
            quote(&if labels.len() <= EDGE_PORTS_SHOWN {
                VERDICTS[*verdict].to_string()
            } else {
                format!("{}: {}", VERDICTS[*verdict], labels.join(", "))
            })
        );
    }
    out += "}\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(direction: &str, src: &str, dst: &str, port: u16, packets: [u64; 3]) -> ObservedFlow {
        let split = |s: &str| {
            let (a, b) = s.split_once('/').unwrap_or((s, s));
            (a.to_string(), b.to_string())
        };
        let (src_namespace, src_workload) = split(src);
        let (dst_namespace, dst_workload) = split(dst);
        ObservedFlow {
            direction: direction.into(),
            src_namespace,
            src_workload,
            dst_namespace,
            dst_workload,
            protocol: "tcp".into(),
            port,
            first_seen: 1,
            last_seen: 1,
            packets,
            dst_domain: String::new(),
            world_addresses: Vec::new(),
            last_would_drop: 0,
        }
    }

    #[test]
    fn destinations_outside_the_cluster_are_named_by_their_dns_name() {
        let mut stripe = flow("egress", "pay/card", "world", 443, [5, 0, 0]);
        stripe.dst_domain = "api.stripe.com".into();
        let mut evil = flow("egress", "pay/card", "world", 443, [0, 2, 0]);
        evil.dst_domain = "evil.example.org".into();
        let raw = flow("egress", "pay/card", "world", 22, [0, 1, 0]);
        let dot = dot(&[stripe, evil, raw], &GraphFilter::default());
        assert!(
            dot.contains(r#""world:api.stripe.com" [label="api.stripe.com", shape=ellipse];"#),
            "{dot}"
        );
        assert!(
            dot.contains(
                r##""pay/card" -> "world:api.stripe.com" [label="443/tcp", color="#2e7d32""##
            ),
            "{dot}"
        );
        assert!(
            dot.contains(r#""pay/card" -> "world:evil.example.org""#),
            "{dot}"
        );
        assert!(
            dot.contains(r#""pay/card" -> "world" [label="22/tcp""#),
            "{dot}"
        );
    }

    #[test]
    fn one_edge_per_pair_and_verdict_with_its_ports_grouped_by_namespace() {
        let observed = [
            // Seen at both ends: one edge, the worst verdict (ingress would-drop).
            flow("egress", "shop/web", "shop/db", 5432, [5, 0, 0]),
            flow("ingress", "shop/web", "shop/db", 5432, [0, 5, 0]),
            flow("egress", "shop/web", "shop/cache", 6379, [9, 0, 0]),
            flow("egress", "shop/web", "shop/cache", 6380, [9, 0, 0]),
            flow("egress", "shop/web", "world", 443, [3, 0, 0]),
            flow("ingress", "ops/scraper", "shop/db", 9187, [0, 0, 2]),
        ];
        let d = dot(&observed, &GraphFilter::default());
        let edges: Vec<&str> = d.lines().filter(|l| l.contains("->")).collect();
        assert_eq!(
            edges,
            [
                r##"  "ops/scraper" -> "shop/db" [label="9187/tcp", color="#c62828", fontcolor="#c62828", tooltip="dropped"];"##,
                r##"  "shop/web" -> "shop/cache" [label="6379/tcp, 6380/tcp", color="#2e7d32", fontcolor="#2e7d32", tooltip="allowed"];"##,
                r##"  "shop/web" -> "shop/db" [label="5432/tcp", color="#ef6c00", fontcolor="#ef6c00", tooltip="would_drop"];"##,
                r##"  "shop/web" -> "world" [label="443/tcp", color="#2e7d32", fontcolor="#2e7d32", tooltip="allowed"];"##,
            ]
        );
        assert!(d.contains("subgraph \"cluster_shop\""), "{d}");
        assert!(d.contains("\"world\" [label=\"world (outside the cluster)\", shape=ellipse];"));

        let filtered = dot(
            &observed,
            &GraphFilter {
                namespaces: vec!["ops".into()],
                verdicts: vec![],
            },
        );
        assert_eq!(filtered.matches("->").count(), 1, "{filtered}");
        let would = dot(
            &observed,
            &GraphFilter {
                namespaces: vec![],
                verdicts: vec!["would_drop".into(), "dropped".into()],
            },
        );
        assert_eq!(would.matches("->").count(), 2, "{would}");
        assert!(!would.contains("shop/cache"), "{would}");
    }

    /// 50 services in 5 namespaces, as a bank's are tiered (2 frontends, 3 APIs, 3
    /// backends, 2 databases per namespace; each API also calls its peer in the next
    /// namespace), 90 edges, one with 13 ports: every service drawn once, labels short, and
    /// graphviz lays it out on a page a screen can show (CI installs graphviz).
    #[test]
    fn fifty_services_render_readably() {
        let service = |ns: usize, i: usize| format!("ns{ns}/svc-{}", ns * 10 + i);
        let mut observed = Vec::new();
        let mut call = |from: String, to: String, port: u16, would_drop: bool| {
            let packets = if would_drop { [0, 3, 0] } else { [9, 0, 0] };
            observed.push(flow("egress", &from, &to, port, packets));
        };
        for ns in 0..5 {
            for frontend in 0..2 {
                for api in 2..5 {
                    call(service(ns, frontend), service(ns, api), 8080, false);
                }
            }
            for api in 2..5 {
                call(service(ns, api), service(ns, 5 + (api - 2)), 8080, false);
                call(
                    service(ns, api),
                    service(ns, 5 + (api - 1) % 3),
                    8080,
                    api == 4,
                );
                call(service(ns, api), service((ns + 1) % 5, api), 8443, false);
            }
            for backend in 5..8 {
                call(
                    service(ns, backend),
                    service(ns, 8 + backend % 2),
                    5432,
                    false,
                );
            }
        }
        for port in 9000..9012 {
            call(service(0, 2), service(0, 5), port, false);
        }
        let service = |i: usize| service(i / 10, i % 10);
        let d = dot(&observed, &GraphFilter::default());
        assert_eq!(d.matches(" -> ").count(), 90, "{d}");
        for i in 0..50 {
            let node = format!("    {:?} [label=\"svc-{i}\"];", service(i));
            assert_eq!(d.matches(&node).count(), 1, "{node}");
        }
        assert!(
            d.contains(r#"label="8080/tcp, 9000/tcp, 9001/tcp, 9002/tcp, +9 more""#),
            "{d}"
        );
        assert!(d.contains("tooltip=\"allowed: 8080/tcp, 9000/tcp"), "{d}");

        let mut render = std::process::Command::new("dot")
            .arg("-Tsvg")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("graphviz's dot (Debian package graphviz; the test setup installs it)");
        use std::io::Write as _;
        render
            .stdin
            .take()
            .unwrap()
            .write_all(d.as_bytes())
            .unwrap();
        let out = render.wait_with_output().unwrap();
        assert!(out.status.success());
        let svg = String::from_utf8(out.stdout).unwrap();
        assert_eq!(svg.matches("class=\"node\"").count(), 50);
        assert_eq!(svg.matches("class=\"edge\"").count(), 90);
        // The page in points (1/72 in): `<svg width="Wpt" height="Hpt"`.
        let size = |attr: &str| -> f64 {
            let at = svg.find(&format!("{attr}=\"")).unwrap() + attr.len() + 2;
            svg[at..].split("pt").next().unwrap().parse().unwrap()
        };
        let (width, height) = (size("width"), size("height"));
        assert!(width * height < 4.0e6, "{width} x {height} pt");
        assert!(width.max(height) < 4_000.0, "{width} x {height} pt");
    }
}
