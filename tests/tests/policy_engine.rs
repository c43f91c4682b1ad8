//! The policy engine end to end: cluster-state files compiled and applied by the reconciler
//! to the loaded programs, with real traffic.
//! - churn: many policy, label, namespace and pod changes while traffic keeps flowing; a flow
//!   allowed before and after every change is never dropped or counted as would_drop;
//! - incremental: a change rewrites only the entries it affects;
//! - differential: random policies, labels and flows; `tollgate check` must say what the
//!   kernel does to a real packet.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use agent_common::{DECISION_ALLOW, DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP};
use tollgate::{
    Mode,
    attach::TcMode,
    cli::{check_line, evaluator_for},
    maps::addr_from_bytes,
    reconcile::{Reconciler, ReconcilerOptions},
    sources::FileSource,
};
use tollgate_tests::{
    Lab, Pod,
    conformance::{PODS, Scenario, cluster_yaml},
    support::temp_dir,
    support::{PATIENT, Packets},
    traffic,
};

fn reconciler(lab: &Lab, mode: Mode) -> Reconciler {
    Reconciler::new(
        lab.datapath(TcMode::Auto),
        ReconcilerOptions {
            default_mode: mode,
            ..Default::default()
        },
    )
}

// --- churn ---------------------------------------------------------------------------------

struct Churn {
    ns1_labels: &'static str,
    a_labels: &'static str,
    c_labels: &'static str,
    with_d: bool,
    policies: Vec<&'static str>,
}

const SERVER_FROM_CLIENTS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-from-clients, namespace: ns1}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80, protocol: UDP}, {port: 80, protocol: TCP}]}]\n";
const SERVER_FROM_CLIENTS_MORE_PORTS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-from-clients, namespace: ns1}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80, protocol: UDP}, {port: 80, endPort: 90, protocol: TCP}, {port: 8080}]}]\n";
const SERVER_FROM_CORE_NS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-from-core, namespace: ns1}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: core}}}]}]\n";
const CLIENT_TO_SERVER: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-egress, namespace: ns1}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: server}}}]}]\n";
const CLIENT_TO_CORE_NS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-egress, namespace: ns1}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ns1}}}], ports: [{protocol: UDP}, {protocol: TCP}]}]\n";
const UNRELATED: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: unrelated, namespace: ns2}\nspec: {podSelector: {matchLabels: {app: other}}, policyTypes: [Ingress]}\n";
const ALLOW_IP_BLOCK: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-from-block, namespace: ns1}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{ipBlock: {cidr: 10.1.0.0/24, except: [10.1.0.12/32]}}]}]\n";

fn churn_yaml(lab_pods: &[Pod], c: &Churn) -> String {
    let pod = |p: &Pod, ns: &str, labels: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {ns}, labels: {labels}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: {}}}]}}\n",
            p.name, p.ipv4
        )
    };
    let mut y = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: Namespace, metadata: {{name: ns1, labels: {}}}}}\n- {{apiVersion: v1, kind: Namespace, metadata: {{name: ns2}}}}\n",
        c.ns1_labels
    );
    y += &pod(&lab_pods[0], "ns1", c.a_labels);
    y += &pod(&lab_pods[1], "ns1", "{app: server}");
    y += &pod(&lab_pods[2], "ns2", c.c_labels);
    if c.with_d {
        y += &pod(&lab_pods[3], "ns2", "{app: other}");
    }
    for p in &c.policies {
        y += "---\n";
        y += p;
    }
    y
}

#[test]
fn no_transient_drops_while_policies_labels_and_pods_churn() {
    let mut lab = Lab::new();
    let pods: Vec<Pod> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| lab.add_pod(n))
        .collect();
    lab.serve(&pods[1], &[80], &[80]);
    let mut rec = reconciler(&lab, Mode::Drop);
    let dir = temp_dir("churn");
    let file = dir.join("state.yaml");
    let mut source = FileSource::new(&*dir);

    let base = || Churn {
        ns1_labels: "{team: core}",
        a_labels: "{app: client}",
        c_labels: "{app: other}",
        with_d: true,
        policies: vec![SERVER_FROM_CLIENTS, CLIENT_TO_SERVER],
    };
    let steps: Vec<Churn> = vec![
        Churn {
            policies: vec![SERVER_FROM_CLIENTS, CLIENT_TO_SERVER, UNRELATED],
            ..base()
        },
        Churn {
            a_labels: "{app: client, version: v2}",
            ..base()
        },
        Churn {
            a_labels: "{app: client, version: v2}",
            policies: vec![SERVER_FROM_CLIENTS, SERVER_FROM_CORE_NS, CLIENT_TO_SERVER],
            ..base()
        },
        Churn {
            a_labels: "{app: client, version: v2}",
            policies: vec![SERVER_FROM_CORE_NS, CLIENT_TO_SERVER],
            ..base()
        },
        Churn {
            ns1_labels: "{team: core, env: prod}",
            a_labels: "{app: client, version: v3}",
            policies: vec![SERVER_FROM_CORE_NS, CLIENT_TO_SERVER],
            ..base()
        },
        Churn {
            ns1_labels: "{team: core, env: prod}",
            policies: vec![SERVER_FROM_CORE_NS, SERVER_FROM_CLIENTS, CLIENT_TO_CORE_NS],
            ..base()
        },
        Churn {
            c_labels: "{app: other, tier: x}",
            policies: vec![SERVER_FROM_CLIENTS_MORE_PORTS, CLIENT_TO_CORE_NS],
            ..base()
        },
        Churn {
            with_d: false,
            policies: vec![
                SERVER_FROM_CLIENTS_MORE_PORTS,
                ALLOW_IP_BLOCK,
                CLIENT_TO_SERVER,
            ],
            ..base()
        },
        Churn {
            with_d: false,
            a_labels: "{app: client, version: v4}",
            policies: vec![ALLOW_IP_BLOCK, CLIENT_TO_SERVER, UNRELATED],
            ..base()
        },
        Churn {
            policies: vec![ALLOW_IP_BLOCK, SERVER_FROM_CLIENTS, CLIENT_TO_SERVER],
            ..base()
        },
        base(),
    ];

    let apply = |rec: &mut Reconciler, source: &mut FileSource, c: &Churn| {
        std::fs::write(&file, churn_yaml(&pods, c)).unwrap();
        let loaded = source.load();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let report = lab.in_node(|| rec.reconcile(&loaded.state)).unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    };
    apply(&mut rec, &mut source, &base());
    let slot_of = |rec: &Reconciler, name: &str| {
        rec.workloads()
            .iter()
            .find(|(k, _)| k.1 == name)
            .map(|(_, w)| w.slot)
            .unwrap()
    };
    let (slot_a, slot_b) = (slot_of(&rec, "a"), slot_of(&rec, "b"));
    // The policy is in force: c may not reach b.
    let c_reaches_b = || {
        traffic::udp(
            &pods[2],
            pods[1].addr(false),
            80,
            1,
            64,
            Duration::from_millis(300),
        )
        .echoed
            > 0
    };
    assert!(!c_reaches_b());
    lab.settle();
    let (before_a, before_b) = (
        Packets::read(&rec.datapath, slot_a),
        Packets::read(&rec.datapath, slot_b),
    );

    let done = AtomicBool::new(false);
    let (udp_result, tcp_connects, changes) = std::thread::scope(|s| {
        // One long UDP flow (each datagram waits for its echo) and a stream of new TCP
        // connections, both allowed before and after every change.
        let udp = s.spawn(|| {
            traffic::udp_from(
                &pods[0],
                pods[1].addr(false),
                80,
                1500,
                64,
                PATIENT,
                Some(45000),
            )
        });
        let tcp = s.spawn(|| {
            let mut results = Vec::new();
            while !done.load(Ordering::Relaxed) {
                results.push(traffic::tcp(&pods[0], pods[1].addr(false), 80, 2, PATIENT));
            }
            results
        });
        let mut changes = 0;
        for _round in 0..4 {
            for step in &steps {
                apply(&mut rec, &mut source, step);
                changes += 1;
                std::thread::sleep(Duration::from_millis(15));
            }
        }
        done.store(true, Ordering::Relaxed);
        (udp.join().unwrap(), tcp.join().unwrap(), changes)
    });
    lab.settle();
    let got_a = Packets::read(&rec.datapath, slot_a).since(before_a);
    let got_b = Packets::read(&rec.datapath, slot_b).since(before_b);
    assert_eq!(changes, 44);
    assert_eq!(
        (udp_result.sent, udp_result.echoed),
        (1500, 1500),
        "{udp_result:?}"
    );
    assert!(
        tcp_connects.len() >= 10,
        "{} connections",
        tcp_connects.len()
    );
    assert!(
        tcp_connects.iter().all(|r| r.echoed == 2),
        "{:?}",
        tcp_connects.iter().find(|r| r.echoed != 2)
    );
    for (who, got) in [("a", got_a), ("b", got_b)] {
        assert_eq!(
            got.in_dropped + got.out_dropped + got.in_would_drop + got.out_would_drop,
            0,
            "{who}: {got:?}"
        );
    }
    assert!(got_b.in_allowed >= 1500);
    // And the final state still enforces: c may not reach b.
    assert!(!c_reaches_b());
    lab.in_node(|| rec.detach_all()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- incremental -----------------------------------------------------------------------------

#[test]
fn a_change_rewrites_only_the_entries_it_affects() {
    let mut lab = Lab::new();
    let pods: Vec<Pod> = PODS
        .iter()
        .map(|p| lab.add_pod(&p.replace('/', "")))
        .collect();
    let mut rec = reconciler(&lab, Mode::Log);
    let dir = temp_dir("incremental");
    let mut source = FileSource::new(&*dir);
    let mut scenario = Scenario {
        name: "incremental".into(),
        policies: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-from-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: z-deny, namespace: z}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n".into(),
        namespace_labels: BTreeMap::new(),
        pod_labels: BTreeMap::new(),
        probes: vec![],
        expect: vec![],
    };
    let mut apply = |s: &Scenario| {
        std::fs::write(dir.join("state.yaml"), cluster_yaml(s, None)).unwrap();
        let loaded = source.load();
        lab.in_node(|| rec.reconcile(&loaded.state)).unwrap()
    };
    let first = apply(&scenario);
    assert_eq!(first.attached.len(), 9);
    // The node's own addresses (169.254.1.1, and 127.0.0.1 and ::1 on its loopback).
    let host = lab.in_node(tollgate::attach::netlink::addresses).unwrap();
    assert_eq!(host.len(), 3, "{host:?}");
    // 9 pods x 2 addresses of identities, the node's 3, x/a's rules (3 identities of y on
    // TCP 80).
    assert_eq!(first.entries_written, 18 + 3 + 3);

    let again = apply(&scenario);
    assert_eq!(
        (again.entries_written, again.entries_removed),
        (0, 0),
        "nothing changed, nothing written"
    );
    assert!(again.updated.is_empty());

    // A label change on y/b: a new identity for its two addresses; x/a's rules gain the new
    // identity and lose the old one. Nothing else is touched.
    scenario
        .pod_labels
        .insert("y/b".into(), BTreeMap::from([("extra".into(), "1".into())]));
    let label = apply(&scenario);
    assert_eq!(label.entries_written, 2 + 1, "{label:?}");
    assert_eq!(label.entries_removed, 1, "{label:?}");
    assert_eq!(label.updated, vec!["x/a".to_string()]);

    // A namespace label change that no selector looks at changes nothing.
    scenario
        .namespace_labels
        .insert("z".into(), BTreeMap::from([("cost".into(), "low".into())]));
    let ns = apply(&scenario);
    assert_eq!((ns.entries_written, ns.entries_removed), (0, 0));

    // Changing the port of the one policy rewrites x/a's three entries.
    scenario.policies = scenario.policies.replace("port: 80", "port: 81");
    let port = apply(&scenario);
    assert_eq!((port.entries_written, port.entries_removed), (3, 3));
    assert_eq!(port.updated, vec!["x/a".to_string()]);
    let _ = pods;
    lab.in_node(|| rec.detach_all()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- differential ----------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_selector(rng: &mut Rng, key: &str, values: &[&str]) -> String {
    match rng.below(6) {
        0 => "{}".into(),
        1 => format!("{{matchLabels: {{{key}: {}}}}}", rng.pick(values)),
        2 => format!(
            "{{matchExpressions: [{{key: {key}, operator: In, values: [{}, {}]}}]}}",
            rng.pick(values),
            rng.pick(values)
        ),
        3 => format!(
            "{{matchExpressions: [{{key: {key}, operator: NotIn, values: [{}]}}]}}",
            rng.pick(values)
        ),
        4 => format!(
            "{{matchExpressions: [{{key: {}, operator: Exists}}]}}",
            rng.pick(&["color", key])
        ),
        _ => format!(
            "{{matchExpressions: [{{key: {}, operator: DoesNotExist}}]}}",
            rng.pick(&["color", "shape"])
        ),
    }
}

fn random_peer(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => format!(
            "{{podSelector: {}}}",
            random_selector(rng, "pod", &["a", "b", "c"])
        ),
        1 => format!(
            "{{namespaceSelector: {}}}",
            random_selector(rng, "ns", &["x", "y", "z"])
        ),
        2 => format!(
            "{{namespaceSelector: {}, podSelector: {}}}",
            random_selector(rng, "ns", &["x", "y", "z"]),
            random_selector(rng, "pod", &["a", "b", "c"])
        ),
        3 => format!(
            "{{ipBlock: {{cidr: 10.1.0.0/27, except: [10.1.0.{}/32]}}}}",
            10 + rng.below(9)
        ),
        _ => format!("{{ipBlock: {{cidr: 10.1.0.{}/31}}}}", 10 + 2 * rng.below(4)),
    }
}

fn random_port(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => "{port: 80}".into(),
        1 => "{port: 81, protocol: UDP}".into(),
        2 => format!(
            "{{port: {}}}",
            rng.pick(&["serve-80-tcp", "serve-81-tcp", "serve-80-udp"])
        ),
        3 => "{port: serve-81-udp, protocol: UDP}".into(),
        4 => "{port: 80, endPort: 81, protocol: TCP}".into(),
        _ => "{protocol: UDP}".into(),
    }
}

fn random_rules(rng: &mut Rng, peer_field: &str) -> String {
    let mut rules = Vec::new();
    for _ in 0..rng.below(3) {
        let mut parts = Vec::new();
        if rng.chance(75) {
            let peers: Vec<String> = (0..1 + rng.below(2)).map(|_| random_peer(rng)).collect();
            parts.push(format!("{peer_field}: [{}]", peers.join(", ")));
        }
        if rng.chance(60) {
            let ports: Vec<String> = (0..1 + rng.below(2)).map(|_| random_port(rng)).collect();
            parts.push(format!("ports: [{}]", ports.join(", ")));
        }
        rules.push(format!("{{{}}}", parts.join(", ")));
    }
    format!("[{}]", rules.join(", "))
}

fn random_scenario(seed: u64) -> Scenario {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut policies = Vec::new();
    for i in 0..1 + rng.below(4) {
        let ns = *rng.pick(&["x", "y", "z"]);
        let types = *rng.pick(&["[Ingress]", "[Egress]", "[Ingress, Egress]"]);
        policies.push(format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: {ns}}}\nspec:\n  podSelector: {}\n  policyTypes: {types}\n  ingress: {}\n  egress: {}\n",
            random_selector(&mut rng, "pod", &["a", "b", "c"]),
            random_rules(&mut rng, "from"),
            random_rules(&mut rng, "to"),
        ));
    }
    let mut pod_labels = BTreeMap::new();
    for pod in PODS {
        if rng.chance(30) {
            pod_labels.insert(
                pod.to_string(),
                BTreeMap::from([("color".to_string(), rng.pick(&["red", "blue"]).to_string())]),
            );
        }
    }
    let mut namespace_labels = BTreeMap::new();
    if rng.chance(50) {
        namespace_labels.insert(
            rng.pick(&["x", "y", "z"]).to_string(),
            BTreeMap::from([("color".to_string(), "red".to_string())]),
        );
    }
    Scenario {
        name: format!("random-{seed}"),
        policies: policies.join("---\n"),
        namespace_labels,
        pod_labels,
        probes: vec![],
        expect: vec![],
    }
}

#[test]
fn check_agrees_with_the_kernel_on_random_policies_and_flows() {
    let mut lab = Lab::new();
    let pods: Vec<Pod> = PODS
        .iter()
        .map(|p| lab.add_pod(&p.replace('/', "")))
        .collect();
    for pod in &pods {
        lab.serve(pod, &[80, 81], &[80, 81]);
    }
    // Log mode: every packet passes, so both sides of every flow are observable.
    let mut rec = reconciler(&lab, Mode::Log);
    let dir = temp_dir("differential");
    let file = dir.join("state.yaml");
    let mut source = FileSource::new(&*dir);
    let mut compared = 0;
    let mut disagreements = Vec::new();
    for seed in 1..=30u64 {
        let scenario = random_scenario(seed);
        std::fs::write(&file, cluster_yaml(&scenario, None)).unwrap();
        let loaded = source.load();
        assert!(loaded.errors.is_empty(), "seed {seed}: {:?}", loaded.errors);
        lab.in_node(|| rec.reconcile(&loaded.state)).unwrap();
        let (ev, _) = evaluator_for(&file).unwrap();
        // Forget flows of earlier scenarios: what the table holds next is this one's.
        rec.datapath.maps.flush_conntrack();
        let slot = |i: usize| {
            let (ns, name) = PODS[i].split_once('/').unwrap();
            rec.workloads()[&(ns.to_string(), name.to_string())].slot
        };
        let mut rng = Rng(seed * 7919);
        let mut flows = Vec::new();
        for _ in 0..40 {
            let i = rng.below(9) as usize;
            let j = (i + 1 + rng.below(8) as usize) % 9;
            let (port, udp) = *rng.pick(&[(80u16, false), (81, false), (80, true), (81, true)]);
            let proto = if udp { "udp" } else { "tcp" };
            let line = format!("{} {} {port}/{proto}", PODS[i], PODS[j]);
            if udp {
                let r = traffic::udp(&pods[i], pods[j].addr(false), port, 1, 32, PATIENT);
                assert_eq!(r.echoed, 1, "log mode lets it through: {line}");
            } else {
                let r = traffic::tcp(&pods[i], pods[j].addr(false), port, 1, PATIENT);
                assert_eq!(r.echoed, 1, "log mode lets it through: {line}");
            }
            flows.push((i, j, port, if udp { PROTO_UDP } else { PROTO_TCP }, line));
        }
        // What the kernel decided, as its connection tracking table recorded it: the
        // source's egress decision and the destination's ingress decision of each flow.
        let table = rec.datapath.maps.conntrack();
        let decided =
            |slot: u32, origin: u8, remote: IpAddr, port: u16, proto: u8| -> &'static str {
                let decisions: BTreeSet<u8> = table
                    .iter()
                    .filter(|(k, e)| {
                        k.slot == slot
                            && k.proto == proto
                            && e.origin == origin
                            && addr_from_bytes(k.family, &k.remote) == remote
                            && (if origin == DIR_EGRESS {
                                k.remote_port
                            } else {
                                k.local_port
                            }) == port
                    })
                    .map(|(_, e)| e.decision)
                    .collect();
                match decisions.iter().collect::<Vec<_>>().as_slice() {
                    [d] if **d == DECISION_ALLOW => "allowed",
                    [_] => "denied",
                    [] => "untracked",
                    _ => "mixed",
                }
            };
        for (i, j, port, proto, line) in flows {
            let offline = check_line(&ev, &line, false).unwrap();
            let kernel = (
                decided(slot(i), DIR_EGRESS, pods[j].addr(false), port, proto),
                decided(slot(j), DIR_INGRESS, pods[i].addr(false), port, proto),
            );
            compared += 1;
            if kernel != (offline.egress, offline.ingress) {
                disagreements.push(format!(
                    "seed {seed}: {line}: check says egress {} ingress {}, kernel did egress {} ingress {}\npolicies:\n{}",
                    offline.egress, offline.ingress, kernel.0, kernel.1, scenario.policies
                ));
            }
        }
    }
    lab.in_node(|| rec.detach_all()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(compared, 1200);
    assert!(
        disagreements.is_empty(),
        "{} of {compared} flows disagree:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}

// --- a full identity table -------------------------------------------------------------

/// A full identity table does not stay full: when a new address cannot be written, the
/// addresses no longer wanted (a deleted pod's) are removed first and the write tried again.
/// They used to wait for the writes to succeed, which they never could: no new pod got an
/// identity again, even after whatever filled the table was deleted.
#[test]
fn a_full_identity_table_makes_room_from_the_addresses_no_longer_wanted() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let mut rec = reconciler(&lab, Mode::Log);
    let dir = temp_dir("identities-full");
    let mut source = FileSource::new(&*dir);
    let state = |elsewhere: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x, labels: {{app: a}}}}\nstatus: {{podIPs: [{{ip: {}}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: x, labels: {{app: b}}}}\nspec: {{nodeName: another-node}}\nstatus: {{podIPs: [{{ip: {elsewhere}}}]}}\n",
            a.ipv4
        )
    };
    let apply = |rec: &mut Reconciler, source: &mut FileSource, yaml: &str| {
        std::fs::write(dir.join("state.yaml"), yaml).unwrap();
        let loaded = source.load();
        lab.in_node(|| rec.reconcile(&loaded.state)).unwrap()
    };
    let (old, new): (IpAddr, IpAddr) = ("10.98.0.1".parse().unwrap(), "10.98.0.2".parse().unwrap());
    let first = apply(&mut rec, &mut source, &state("10.98.0.1"));
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    // Whatever fills it (a flood of Services, say): entries of an address range no pod has.
    let mut filled = 0u32;
    loop {
        let filler = ipnet::IpNet::from(IpAddr::from(std::net::Ipv4Addr::from(
            0x6440_0000u32 + filled,
        )));
        if rec.datapath.maps.set_identity(filler, 7).is_err() {
            break;
        }
        filled += 1;
        assert!(filled <= agent_common::IDENTITY_CAPACITY, "never full");
    }
    // b is deleted and comes back at another address (a new pod of its workload).
    let report = apply(&mut rec, &mut source, &state("10.98.0.2"));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let pinned = rec.datapath.maps.pinned_identities();
    assert!(
        pinned.contains_key(&new),
        "the new address has its identity"
    );
    assert!(!pinned.contains_key(&old), "the old one made room");
}
