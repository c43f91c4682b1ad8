//! EgressAllowlists on real DNS: dnsmasq in a pod namespace answers test names with
//! documentation addresses, "internet" namespaces serve on them, and workloads look names
//! up and connect at once. The agent learns from the answers each workload receives, and
//! only from its resolvers.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use tollgate_tests::{
    Lab, Pod,
    agent::{Agent, measure, sample},
    support::{FAIL_FAST, PATIENT, Scratch, temp_dir},
    traffic, wait_for,
};

/// A payments namespace whose `card` pods may reach a few names on 443, `other` with no
/// allowlist, a cluster DNS (dnsmasq) behind Service kube-system/kube-dns, and hosts
/// outside the cluster.
struct Internet {
    lab: Lab,
    card: Pod,
    card2: Pod,
    other: Pod,
    dns: Pod,
    hostile: Pod,
    rogue: Pod,
    sites: Vec<(&'static str, Pod)>,
    dir: Scratch,
}

/// Names dnsmasq knows, each on a host of its own (`*` lines are allowed for `card`).
const SITES: &[&str] = &[
    "api.example.com",      // allowed, exact
    "edge.cdn.example.net", // the target of alias.example.com (allowed through the CNAME)
    "x.one.example.com",    // allowed by *.one.example.com
    "a.b.one.example.com",  // not: one label too many
    "a.b.many.example.com", // allowed by **.many.example.com
    "tcp.example.com",      // allowed, looked up over TCP only
    "blocked.example.com",  // not allowed
    "short.example.com",    // allowed, TTL 1
    "evil.test",            // what the hostile server answers with
    "rogue.test",           // what an unconfigured server answers with
];

const ALLOWLIST: &str = "---\napiVersion: tollgate.io/v1alpha1\nkind: EgressAllowlist\nmetadata: {name: card-egress, namespace: pay}\nspec:\n  podSelector: {matchLabels: {app: card}}\n  egress:\n  - domains: [api.example.com, alias.example.com, '*.one.example.com', '**.many.example.com', tcp.example.com, Short.Example.com., '**.evil.test', good.rogue.test]\n    ports: [{port: 443}]\n";

fn pod_yaml(pod: &Pod, ns: &str, name: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {}\n  labels: {labels}\nspec:\n  containers: [{{name: c, image: i}}]\nstatus:\n  phase: Running\n  podIPs: [{{ip: {}}}, {{ip: {}}}]\n",
        pod.uid, pod.ipv4, pod.ipv6
    )
}

impl Internet {
    fn new(tag: &str) -> Internet {
        let mut lab = Lab::new();
        let card = lab.add_pod("card");
        let card2 = lab.add_pod("card2");
        let other = lab.add_pod("other");
        let dns = lab.add_pod("dns");
        let hostile = lab.add_pod("hostile");
        let rogue = lab.add_pod("rogue");
        let mut sites = Vec::new();
        for (i, name) in SITES.iter().enumerate() {
            let site = lab.add_outside(&format!("site{i}"));
            lab.serve(&site, &[443], &[]);
            sites.push((*name, site));
        }
        let ip = |n: &str| sites.iter().find(|(s, _)| *s == n).unwrap().1.ipv4;
        let ip6 = |n: &str| sites.iter().find(|(s, _)| *s == n).unwrap().1.ipv6;
        let mut records: Vec<String> = SITES
            .iter()
            .map(|name| {
                let ttl = if *name == "short.example.com" { 1 } else { 60 };
                format!("--host-record={name},{},{},{ttl}", ip(name), ip6(name))
            })
            .collect();
        records.push("--cname=alias.example.com,edge.cdn.example.net,60".into());
        lab.spawn_dnsmasq(&dns, &records);
        // An unconfigured server that answers everything under rogue.test.
        lab.spawn_dnsmasq(
            &rogue,
            &[format!("--address=/rogue.test/{}", ip("rogue.test"))],
        );
        let evil = ip("evil.test").to_string();
        lab.spawn_ready(
            &hostile,
            traffic::helper(),
            &["dns-hostile", "--address", &evil],
        );
        let world = Internet {
            lab,
            card,
            card2,
            other,
            dns,
            hostile,
            rogue,
            sites,
            dir: temp_dir(tag),
        };
        wait_for(Duration::from_secs(10), "dnsmasq answering", || {
            (world.resolve(&world.other, "api.example.com", None, 1)["resolved"] == 1).then_some(())
        });
        wait_for(
            Duration::from_secs(10),
            "the rogue server answering",
            || {
                let rogue = IpAddr::V4(world.rogue.ipv4);
                (world.resolve_at(&world.other, rogue, "good.rogue.test", None, 1, false)["resolved"]
                == 1)
                .then_some(())
            },
        );
        world
    }

    fn site(&self, name: &str) -> IpAddr {
        IpAddr::V4(self.sites.iter().find(|(s, _)| *s == name).unwrap().1.ipv4)
    }

    fn cluster_yaml(&self) -> String {
        let mut y = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: pay}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n",
        );
        // Two workloads (bare pods) the allowlist selects together; each has a label of its
        // own, or no selector could take in one without the other (`advise` leaves such
        // workloads out).
        y += &pod_yaml(&self.card, "pay", "card", "{app: card, replica: one}");
        y += &pod_yaml(&self.card2, "pay", "card2", "{app: card, replica: two}");
        y += &pod_yaml(&self.other, "pay", "other", "{app: other}");
        // A DNS server in the cluster that is nobody's resolver.
        y += &pod_yaml(&self.rogue, "pay", "rogue", "{app: rogue}");
        y += &pod_yaml(&self.dns, "kube-system", "coredns", "{k8s-app: kube-dns}");
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {{k8s-app: kube-dns}}\n  ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kube-dns-x1\n  namespace: kube-system\n  labels: {{kubernetes.io/service-name: kube-dns}}\naddressType: IPv4\nendpoints: [{{addresses: ['{}'], conditions: {{ready: true}}}}]\nports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]\n",
            self.dns.ipv4
        );
        y += ALLOWLIST;
        y
    }

    fn start(&self, extra: &[&str]) -> Agent {
        let hostile = self.hostile.ipv4.to_string();
        let mut args = vec!["--dns-server", &hostile];
        args.extend_from_slice(extra);
        let mut agent = Agent::start(&self.lab, &self.dir, &args);
        agent.wait_ready();
        agent.apply(&self.cluster_yaml(), &["card", "card2", "other", "rogue"]);
        wait_for(
            Duration::from_secs(10),
            "card isolated by its allowlist",
            || {
                agent.workload("card")?["egress_allowlists"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|_| ())
            },
        );
        agent
    }

    /// `tg-traffic resolve --aaaa` from `pod` at the cluster DNS: IPv6 addresses.
    fn resolve6(&self, pod: &Pod, name: &str, port: Option<u16>, times: u32) -> serde_json::Value {
        let mut cmd = pod.command(traffic::helper());
        cmd.args(["resolve", "--aaaa", "--server", &self.dns.ipv4.to_string()])
            .args(["--name", name, "--times", &times.to_string()]);
        if let Some(p) = port {
            cmd.args(["--port", &p.to_string()]);
        }
        let out = cmd.output().expect("run tg-traffic resolve");
        serde_json::from_slice(&out.stdout).expect("resolve output")
    }

    /// `tg-traffic resolve` from `pod` at the cluster DNS (or `server`).
    fn resolve_at(
        &self,
        pod: &Pod,
        server: IpAddr,
        name: &str,
        port: Option<u16>,
        times: u32,
        tcp: bool,
    ) -> serde_json::Value {
        let mut cmd = pod.command(traffic::helper());
        cmd.args(["resolve", "--server", &server.to_string(), "--name", name])
            .args(["--times", &times.to_string(), "--timeout-ms", "1000"]);
        if let Some(p) = port {
            cmd.args(["--port", &p.to_string()]);
        }
        if tcp {
            cmd.arg("--tcp");
        }
        let out = cmd.output().expect("run tg-traffic resolve");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("resolve output")
    }

    fn resolve(&self, pod: &Pod, name: &str, port: Option<u16>, times: u32) -> serde_json::Value {
        self.resolve_at(pod, IpAddr::V4(self.dns.ipv4), name, port, times, false)
    }
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&agent.metrics_text(), name, labels).unwrap_or(0.0)
}

#[test]
fn allowed_names_pass_at_once_and_everything_else_is_denied() {
    let net = Internet::new("egress-names");
    // An agent that takes 5 ms over each answer (a loaded node): an answer that reached the
    // workload before its addresses were written would lose the race every time.
    // A census every second: the observed-flow record learns the addresses of live flows
    // to the internet from it.
    let mut agent = net.start(&[
        "--dns-learn-delay",
        "5ms",
        "--conntrack-census-interval",
        "1s",
    ]);
    let card = &net.card;
    // Selected by an allowlist alone (no NetworkPolicy): isolated for egress, and said so.
    assert_eq!(agent.workload("card").unwrap()["isolated_egress"], true);
    assert_eq!(agent.workload("other").unwrap()["isolated_egress"], false);
    assert_eq!(
        metric(
            &agent,
            "tollgate_workload_isolated",
            &[("pod", "card"), ("direction", "egress")]
        ),
        1.0
    );

    // The first connection right after each lookup: never a would-drop.
    let [counted] = measure(&net.lab, &agent, ["card"], || {
        let r = net.resolve(card, "api.example.com", Some(443), 40);
        assert_eq!(r["connected"], 40, "{r}\n{}", agent.log());
        for name in [
            "alias.example.com",
            "x.one.example.com",
            "a.b.many.example.com",
        ] {
            let r = net.resolve(card, name, Some(443), 5);
            assert_eq!(r["connected"], 5, "{name}: {r}");
        }
        let r = net.resolve_at(
            card,
            IpAddr::V4(net.dns.ipv4),
            "tcp.example.com",
            Some(443),
            5,
            true,
        );
        assert_eq!(r["connected"], 5, "over TCP: {r}");
        // AAAA: the IPv6 address of the name, connected over IPv6.
        let r = net.resolve6(card, "api.example.com", Some(443), 5);
        assert_eq!(r["connected"], 5, "AAAA: {r}");
        assert!(
            r["addresses"][0].as_str().unwrap().starts_with("2001:db8:"),
            "{r}"
        );
    });
    assert_eq!(
        counted[4], 0,
        "egress would_drop after lookups of allowed names: {counted:?}"
    );
    assert!(counted[3] > 0);
    let r = net.resolve(card, "alias.example.com", None, 1);
    assert_eq!(
        r["addresses"][0],
        net.site("edge.cdn.example.net").to_string()
    );

    // The same exchange with a name the allowlist does not take: the DNS query passes, the
    // connection is a would-drop, packet for packet.
    let [allowed] = measure(&net.lab, &agent, ["card"], || {
        assert_eq!(
            net.resolve(card, "api.example.com", Some(443), 1)["connected"],
            1
        );
    });
    let [denied] = measure(&net.lab, &agent, ["card"], || {
        assert_eq!(
            net.resolve(card, "blocked.example.com", Some(443), 1)["connected"],
            1
        );
    });
    assert_eq!(allowed[4], 0);
    assert!(denied[4] > 0, "{denied:?}");
    assert_eq!(
        denied[3] + denied[4],
        allowed[3] + allowed[4],
        "allowed {allowed:?}, denied {denied:?}"
    );
    // One label too many for `*.`; a raw address nobody resolved; an address another
    // workload learned.
    for (what, pod, run) in [
        ("a.b.one.example.com", card, true),
        ("raw", card, false),
        ("learned by card", &net.card2, false),
    ] {
        let [d] = measure(&net.lab, &agent, [pod.name.as_str()], || {
            if run {
                assert_eq!(net.resolve(pod, what, Some(443), 1)["connected"], 1);
            } else if what == "raw" {
                assert!(traffic::tcp(pod, net.site("evil.test"), 443, 1, PATIENT).connected);
            } else {
                assert!(traffic::tcp(pod, net.site("api.example.com"), 443, 1, PATIENT).connected);
            }
        });
        assert!(d[4] > 0, "{what}: not counted as would_drop: {d:?}");
    }

    // Destinations named by the name they were resolved from.
    let text = agent.metrics_text();
    let flows = |domain: &str, verdict: &str| {
        sample(
            &text,
            "tollgate_flow_packets_total",
            &[
                ("src_workload", "card"),
                ("dst_workload", "world"),
                ("dst_domain", domain),
                ("verdict", verdict),
                ("port", "443"),
            ],
        )
        .unwrap_or(0.0)
    };
    assert!(flows("api.example.com", "allowed") > 0.0, "{text}");
    assert!(flows("alias.example.com", "allowed") > 0.0);
    assert!(flows("blocked.example.com", "would_drop") > 0.0);
    assert_eq!(flows("blocked.example.com", "allowed"), 0.0);
    assert!(
        metric(
            &agent,
            "tollgate_dns_messages_total",
            &[("outcome", "answer")]
        ) >= 60.0
    );
    let records = wait_for(
        Duration::from_secs(5),
        "the would-drop in the flow log",
        || {
            let r = agent.flow_records();
            r.iter()
                .any(|r| r["dst_domain"] == "blocked.example.com" && r["verdict"] == "would_drop")
                .then_some(r)
        },
    );
    assert!(
        !records.iter().any(|r| r["dst_domain"] == "api.example.com"),
        "an allowed flow in the flow log"
    );
    // The allowlist is what isolates the workload toward the outside: the record names it.
    let blocked_record = records
        .iter()
        .find(|r| r["dst_domain"] == "blocked.example.com" && r["verdict"] == "would_drop")
        .unwrap();
    assert!(
        blocked_record["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "pay/card-egress")),
        "{blocked_record}"
    );
    // `tollgate flows` names them too.
    let out = agent.cli(&["flows", "--once"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("world:blocked.example.com"), "{table}");
    assert!(table.contains("world:api.example.com"), "{table}");
    let out = agent.cli(&["flows", "--once", "-o", "json"]);
    let flows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let recent = flows["recent_denied"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dst_domain"] == "blocked.example.com")
        .unwrap_or_else(|| panic!("{flows}"));
    // Explained by the allowlist that decided it, with the entry it lacks.
    let why = recent["explanation"].as_str().unwrap_or_default();
    assert!(
        why.contains("(isolated by pay/card-egress")
            && why.ends_with("to allow it, add to EgressAllowlist pay/card-egress the entry {domains: [blocked.example.com], ports: [{port: 443, protocol: TCP}]}"),
        "{recent}"
    );
    // The would-drop series of a name is explained by the entry its allowlist lacks, never
    // by an address.
    let blocked = flows["busiest"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dst"] == "world:blocked.example.com" && r["verdict"] == "would_drop")
        .unwrap_or_else(|| panic!("{flows}"));
    let why = blocked["explanation"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("denied at the egress of pay/")
            && why.ends_with("to allow it, add to EgressAllowlist pay/card-egress the entry {domains: [blocked.example.com], ports: [{port: 443, protocol: TCP}]}"),
        "{blocked}"
    );

    // The allowlist the workload needs, read off what it did.
    let out = agent.cli(&["advise", "--namespace", "pay"]);
    let advice = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(advice.contains("kind: EgressAllowlist"), "{advice}");
    for name in [
        "api.example.com",
        "alias.example.com",
        "x.one.example.com",
        "tcp.example.com",
    ] {
        assert!(
            advice.contains(name),
            "{name} missing from the advice:\n{advice}"
        );
    }
    assert!(!advice.contains("blocked.example.com"), "{advice}");
    // The raw address, a would-drop, is allowed only when asked, by port; the address it was
    // seen at (from its flow event) is written beside the rule.
    let out = agent.cli(&["advise", "--namespace", "pay", "--include-denied"]);
    let advice = String::from_utf8_lossy(&out.stdout);
    let seen = advice
        .lines()
        .find(|l| l.contains("# outside the cluster, seen at (sampled):"))
        .unwrap_or_else(|| panic!("no addresses beside the world rule:\n{advice}"));
    assert!(
        seen.contains(&net.site("evil.test").to_string()),
        "{seen}\n{advice}"
    );

    // Flip: allowed names still connect at once, the rest fail.
    let out = agent.cli(&["mode", "set", "pay/*", "drop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(5), "drop mode", || {
        (agent.workload("card")?["mode"] == "drop").then_some(())
    });
    let r = net.resolve(card, "api.example.com", Some(443), 20);
    assert_eq!(r["connected"], 20, "{r}");
    assert_eq!(
        net.resolve(card, "x.one.example.com", Some(443), 5)["connected"],
        5
    );
    for name in ["blocked.example.com", "a.b.one.example.com"] {
        let r = net.resolve(card, name, Some(443), 1);
        assert_eq!(
            (r["resolved"].as_u64(), r["connected"].as_u64()),
            (Some(1), Some(0)),
            "{name}: {r}"
        );
    }
    assert!(!traffic::tcp(card, net.site("evil.test"), 443, 1, FAIL_FAST).connected);
    assert!(!traffic::tcp(&net.card2, net.site("api.example.com"), 443, 1, FAIL_FAST).connected);
    assert_eq!(
        net.resolve6(card, "x.one.example.com", Some(443), 3)["connected"],
        3
    );
    let six = net.resolve6(card, "blocked.example.com", Some(443), 1);
    assert_eq!(six["connected"], 0, "{six}");
    // The allowlist isolates only what it selects, and only toward the internet.
    assert_eq!(
        net.resolve(&net.other, "blocked.example.com", Some(443), 1)["connected"],
        1
    );
    assert!(
        traffic::tcp(card, IpAddr::V4(net.other.ipv4), 443, 1, FAIL_FAST)
            .error
            .is_some()
    );
    let w = agent.workload("card").unwrap();
    assert_eq!(w["egress_allowlists"][0], "pay/card-egress", "{w}");
    agent.stop();

    // The observed-flow record keeps the name and the addresses the census found in the
    // live flows to it.
    let record: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(net.dir.join("state/observed.json")).expect("observed.json"),
    )
    .unwrap();
    let api = record
        .iter()
        .find(|f| {
            f["src_workload"] == "card" && f["dst_domain"] == "api.example.com" && f["port"] == 443
        })
        .unwrap_or_else(|| panic!("no record of card -> api.example.com: {record:?}"));
    let addresses: Vec<&str> = api["world_addresses"]
        .as_array()
        .unwrap_or_else(|| panic!("no addresses: {api}"))
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        addresses.contains(&net.site("api.example.com").to_string().as_str()),
        "{api}"
    );
}

#[test]
fn hostile_and_unsolicited_answers_teach_nothing() {
    let net = Internet::new("egress-hostile");
    let mut agent = net.start(&["--default-mode", "drop"]);
    let card = &net.card;
    let evil = net.site("evil.test");
    let hostile = IpAddr::V4(net.hostile.ipv4);
    let before = |outcome| {
        metric(
            &agent,
            "tollgate_dns_messages_total",
            &[("outcome", outcome)],
        )
    };
    let (malformed, unsolicited) = (before("malformed"), before("unsolicited"));
    for first in [
        "loop",
        "forward",
        "long",
        "short",
        "extra",
        "wrongid",
        "othername",
        "unrelated",
    ] {
        let name = format!("{first}.evil.test");
        net.resolve_at(card, hostile, &name, None, 1, false);
        assert!(
            !traffic::tcp(card, evil, 443, 1, FAIL_FAST).connected,
            "{name} taught the address"
        );
    }
    // An answer too big for one datagram reaches the pod in fragments: passed on whole,
    // never held (the pod's reassembly waits for every piece), not learned from.
    let diag = |reason| {
        metric(
            &agent,
            "tollgate_datapath_diagnostics_total",
            &[("reason", reason)],
        )
    };
    let too_long = diag("dns_too_long");
    let r = net.resolve_at(card, hostile, "big.evil.test", None, 1, false);
    assert_eq!(r["resolved"], 1, "the fragmented answer arrived: {r}");
    assert!(
        !traffic::tcp(card, evil, 443, 1, FAIL_FAST).connected,
        "a fragmented answer teaches nothing"
    );
    assert!(diag("dns_too_long") > too_long);
    // Over TCP the same answer reaches the pod's interface as one aggregate of segments,
    // larger than the interface takes back whole: copied, not held, and never lost.
    let r = net.resolve_at(card, hostile, "big.evil.test", None, 3, true);
    assert_eq!(r["resolved"], 3, "{r}");
    let handed_back_failed = || {
        metric(
            &agent,
            "tollgate_dns_answers_handed_back_total",
            &[("outcome", "failed")],
        )
    };
    assert_eq!(handed_back_failed(), 0.0);
    // An answer from a server the workload is not configured with.
    let r = net.resolve_at(
        card,
        IpAddr::V4(net.rogue.ipv4),
        "good.rogue.test",
        Some(443),
        1,
        false,
    );
    assert_eq!(
        (r["resolved"].as_u64(), r["connected"].as_u64()),
        (Some(1), Some(0)),
        "{r}"
    );
    assert_eq!(r["addresses"][0], net.site("rogue.test").to_string());
    wait_for(Duration::from_secs(5), "the answers counted", || {
        (before("malformed") - malformed >= 4.0 && before("unsolicited") - unsolicited >= 2.0)
            .then_some(())
    });
    // A pod that answers a query in the name of a resolver (its neighbour's, or its own sent
    // back to itself through its interface): the packet never gets past its own hook
    // (dropped as spoofed in either mode), so no learner ever sees it.
    let query_port = 40_053;
    let answer = tollgate::dns::wire::build::answer(
        7,
        "forged.evil.test",
        tollgate::dns::wire::TYPE_A,
        1,
        &[tollgate::dns::wire::build::record(
            &tollgate::dns::wire::build::QNAME,
            tollgate::dns::wire::TYPE_A,
            60,
            &net.site("rogue.test")
                .to_string()
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
                .octets(),
        )],
    );
    let forged = tollgate_tests::packets::ipv4_udp(
        net.hostile.ipv4,
        net.card2.ipv4,
        53,
        query_port,
        &answer,
    );
    let spoofed = || metric(&agent, "tollgate_spoofed_packets_total", &[("pod", "card")]);
    let captured = || {
        metric(
            &agent,
            "tollgate_datapath_diagnostics_total",
            &[("reason", "dns_captured")],
        )
    };
    let (spoofed_before, captured_before) = (spoofed(), captured());
    let sent = traffic::raw(card, &[forged], 3);
    assert_eq!(sent.sent, 3, "{sent:?}");
    let forged_counted = wait_for(Duration::from_secs(5), "the forged answers counted", || {
        let n = spoofed() - spoofed_before;
        (n >= 3.0).then_some(n)
    });
    assert_eq!(forged_counted, 3.0);
    assert_eq!(
        captured(),
        captured_before,
        "a forged answer reached the learner"
    );
    assert!(!traffic::tcp(card, net.site("rogue.test"), 443, 1, FAIL_FAST).connected);

    // Nothing stalled: good answers from both resolvers still teach at once.
    assert_eq!(
        net.resolve(card, "api.example.com", Some(443), 10)["connected"],
        10
    );
    let r = net.resolve_at(card, hostile, "ok.evil.test", Some(443), 1, false);
    assert_eq!(
        r["connected"], 1,
        "a good answer from the configured hostile server: {r}"
    );
    agent.stop();
}

#[test]
fn learned_addresses_expire_after_ttl_and_grace_without_cutting_connections() {
    let net = Internet::new("egress-ttl");
    let mut agent = net.start(&[
        "--default-mode",
        "drop",
        "--dns-min-ttl",
        "1s",
        "--dns-grace",
        "2s",
    ]);
    let card = &net.card;
    let short = net.site("short.example.com");
    let started = Instant::now();
    let r = net.resolve(card, "short.example.com", Some(443), 1);
    assert_eq!(r["connected"], 1, "{r}");
    // A long-lived connection opened now talks past the expiry.
    let talking = traffic::tcp_talking(card, short, 443, 6, Duration::from_secs(1));
    // Past the TTL (1 s), within the grace (2 s more): new connections still go through.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(started.elapsed()));
    assert!(
        traffic::tcp(card, short, 443, 1, PATIENT).connected,
        "within the grace"
    );
    // Past TTL and grace: a new connection is dropped and counted as expired.
    std::thread::sleep(Duration::from_millis(3600).saturating_sub(started.elapsed()));
    let expired = || {
        metric(
            &agent,
            "tollgate_egress_expired_total",
            &[("namespace", "pay"), ("pod", "card"), ("workload", "card")],
        )
    };
    assert_eq!(expired(), 0.0);
    assert!(
        !traffic::tcp(card, short, 443, 1, FAIL_FAST).connected,
        "after the grace"
    );
    wait_for(
        Duration::from_secs(5),
        "the expired connection counted",
        || (expired() == 1.0).then_some(()),
    );
    // Explained as what it is: the name is allowed, the answer had expired.
    let why = wait_for(Duration::from_secs(5), "the drop explained", || {
        let out = agent.cli(&["flows", "--once", "-o", "json"]);
        let flows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        flows["recent_denied"]
            .as_array()?
            .iter()
            .filter(|r| r["dst_domain"] == "short.example.com")
            .find_map(|r| r["explanation"].as_str().map(str::to_string))
    });
    assert!(
        why.contains("nothing is missing from EgressAllowlist pay/card-egress")
            && why.contains("had expired"),
        "{why}"
    );
    let done = traffic::finish(talking);
    assert_eq!(
        done.echoed, 6,
        "the long-lived connection was cut: {done:?}"
    );
    // Looking the name up again allows it again.
    assert_eq!(
        net.resolve(card, "short.example.com", Some(443), 1)["connected"],
        1
    );
    agent.stop();
}

#[test]
fn dns_keeps_working_while_the_agent_is_away_and_a_restart_forgets_nothing() {
    let net = Internet::new("egress-restart");
    let mut agent = net.start(&["--default-mode", "drop"]);
    let card = &net.card;
    assert_eq!(
        net.resolve(card, "api.example.com", Some(443), 3)["connected"],
        3
    );
    let dropped_before = agent.counters("card")[5];
    // The DNS counters as a scrape sees them before the agent goes.
    let counted = |agent: &Agent| {
        [
            metric(
                agent,
                "tollgate_dns_messages_total",
                &[("outcome", "query")],
            ),
            metric(
                agent,
                "tollgate_dns_messages_total",
                &[("outcome", "answer")],
            ),
            metric(
                agent,
                "tollgate_dns_answers_handed_back_total",
                &[("outcome", "ok")],
            ),
        ]
    };
    let scraped = wait_for(Duration::from_secs(5), "the lookups counted", || {
        let c = counted(&agent);
        (c[0] >= 3.0 && c[1] >= 3.0).then_some(c)
    });

    // Killed: answers are held for at most the lease; then DNS flows straight through.
    agent.kill9();
    let killed = Instant::now();
    wait_for(
        Duration::from_secs(5),
        "DNS answering with the agent gone",
        || (net.resolve(card, "x.one.example.com", None, 1)["resolved"] == 1).then_some(()),
    );
    let stalled = killed.elapsed();
    assert!(stalled < Duration::from_secs(4), "DNS stalled {stalled:?}");
    let r = net.resolve(card, "blocked.example.com", None, 20);
    assert_eq!(r["resolved"], 20, "{r}");
    // Enforcement stays: what was learned still allows, the rest is still dropped.
    assert!(traffic::tcp(card, net.site("api.example.com"), 443, 1, PATIENT).connected);
    assert!(!traffic::tcp(card, net.site("blocked.example.com"), 443, 1, FAIL_FAST).connected);

    // Back: what it learned before is adopted with its names, new lookups are learned.
    agent.restart();
    agent.wait_ready();
    let after = counted(&agent);
    for (before, after) in scraped.iter().zip(after) {
        assert!(
            after >= *before,
            "a DNS counter went back: {scraped:?} -> {after:?}"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        traffic::tcp(card, net.site("api.example.com"), 443, 1, PATIENT).connected,
        "what was learned before the restart was forgotten"
    );
    assert_eq!(
        net.resolve(card, "api.example.com", Some(443), 10)["connected"],
        10
    );
    assert_eq!(
        net.resolve(card, "tcp.example.com", Some(443), 3)["connected"],
        3
    );
    let text = agent.metrics_text();
    assert!(
        sample(
            &text,
            "tollgate_flow_packets_total",
            &[("dst_domain", "api.example.com")]
        )
        .is_some(),
        "{text}"
    );
    // Stopped gracefully: answers flow at once.
    agent.stop();
    let stopped = Instant::now();
    assert_eq!(net.resolve(card, "api.example.com", None, 1)["resolved"], 1);
    assert!(stopped.elapsed() < Duration::from_secs(2));
    let _ = dropped_before;
}
