//! What a real node adds to the lab, and what a pod author or a hostile pod could do with it:
//! the node's own traffic (kubelet probes, host-network pods) always passes; other nodes are
//! just addresses; attachments go only where they provably belong; a pod may only make its
//! own mode stricter; spoofed sources, ICMP errors that do not fit their flow and full maps
//! change nothing they should not. Each on real traffic, through `tollgate run`.

use std::{net::IpAddr, time::Duration};

use agent_common::{PROTO_TCP, PolicyKey, PolicyValue, map_names};
use aya::maps::{Map, MapData};
use tollgate_tests::{
    Lab, Pod,
    agent::{Agent, measure, sample},
    cluster, packets,
    support::{FAIL_FAST, PATIENT, Scratch, temp_dir},
    traffic, wait_for,
};

fn start(lab: &Lab, dir: &std::path::Path, extra: &[&str]) -> Agent {
    let mut args = vec!["--cgroup-root", lab.cgroup_dir.to_str().unwrap()];
    args.extend(extra);
    let mut agent = Agent::start(lab, dir, &args);
    agent.wait_ready();
    agent
}

const DENY_ALL_INGRESS: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";

fn udp_target(pod: &Pod, v6: bool, port: u16) -> String {
    match pod.addr(v6) {
        IpAddr::V4(a) => format!("{a}:{port}/udp"),
        IpAddr::V6(a) => format!("[{a}]:{port}/udp"),
    }
}

fn tcp_target(pod: &Pod, v6: bool, port: u16) -> String {
    udp_target(pod, v6, port).replace("/udp", "/tcp")
}

#[test]
fn the_nodes_own_traffic_always_passes_and_other_nodes_are_only_addresses() {
    let mut lab = Lab::new();
    let uplink = lab.add_uplink();
    let web = lab.add_pod("web");
    let client = lab.add_pod("client");
    let exporter = lab.add_host_pod("exporter");
    let kubelet = lab.node_process("kubelet");
    lab.serve(&web, &[8080], &[5353]);
    lab.serve(&exporter, &[], &[7070]);
    let dir = temp_dir("node-traffic");
    let agent = start(&lab, &dir, &[]);
    let on_node = |yaml: String| cluster::on_node(&yaml, "lab-node");
    let yaml = cluster::namespace("shop", "{}", "{tollgate.io/mode: drop}")
        + &on_node(cluster::pod(&web, "shop", "web-0", "{app: web}", "{}", &[]))
        + &on_node(cluster::pod(
            &client,
            "shop",
            "client-0",
            "{app: client}",
            "{}",
            &[],
        ))
        + &on_node(cluster::pod(
            &exporter,
            "shop",
            "exporter-0",
            "{app: exporter}",
            "{}",
            &[],
        ))
        + &cluster::node(
            "lab-node",
            &[
                IpAddr::V4(uplink.ipv4),
                IpAddr::V6(uplink.ipv6),
                "10.77.0.1".parse().unwrap(),
            ],
        )
        + &cluster::node("node-b", &[IpAddr::V4(uplink.far.ipv4)])
        + DENY_ALL_INGRESS;
    agent.apply(&yaml, &["web-0", "client-0", "exporter-0"]);
    let status = agent.status();
    let exporter_status = agent.workload("exporter-0").unwrap();
    assert_eq!(
        exporter_status["attach"], "cgroup",
        "a host-network pod is attached on its own cgroup"
    );
    let host: Vec<&str> = status["host_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for own in ["169.254.1.1", "10.250.0.1", "fd77:250::1", "10.77.0.1"] {
        assert!(host.contains(&own), "{own} is the node's: {host:?}");
    }
    assert!(
        !host.contains(&"10.250.0.2"),
        "another node's address is not: {host:?}"
    );

    // Kubelet-style probes from every address of the node pass web's drop-mode isolation,
    // UDP (exact counts) and TCP.
    let [web_got, exporter_got] = measure(&lab, &agent, ["web-0", "exporter-0"], || {
        for (bind, v6) in [
            ("169.254.1.1", false),
            ("10.250.0.1", false),
            ("fd77:250::1", true),
        ] {
            let got = traffic::probe_from(
                &kubelet,
                &[bind.parse().unwrap()],
                &[udp_target(&web, v6, 5353), tcp_target(&web, v6, 8080)],
                PATIENT,
            );
            assert_eq!(got, vec![true, true], "probe from {bind}");
        }
        // A host-network pod shares the node's addresses: it is the node too.
        let r = traffic::udp(&exporter, web.addr(false), 5353, 2, 64, PATIENT);
        assert_eq!(r.echoed, 2, "{r:?}");
    });
    // The deny-all policy selects the host-network pod too (podSelector {}), yet a pod of
    // this node reaching it on a node address is node traffic for that pod: it passes, as
    // it must at the pod's end. Another node is only an address: denied.
    assert_eq!(
        traffic::probe(&client, &["169.254.1.1:7070/udp".to_string()], PATIENT),
        vec![true],
        "a local pod to the host-network pod"
    );
    assert_eq!(
        traffic::probe(&uplink.far, &["10.250.0.1:7070/udp".to_string()], FAIL_FAST),
        vec![false],
        "another node to the host-network pod"
    );
    assert_eq!(
        [web_got[1], web_got[2], web_got[4], web_got[5]],
        [0, 0, 0, 0],
        "nothing denied: {web_got:?}"
    );
    assert!(web_got[0] >= 5 && web_got[3] >= 5, "{web_got:?}");
    assert_eq!(
        exporter_got,
        [2, 0, 0, 2, 0, 0],
        "the host-network pod's own socket traffic, counted on its cgroup"
    );
    let m = agent.metrics_text();
    assert_eq!(
        sample(
            &m,
            "tollgate_flow_packets_total",
            &[
                ("direction", "ingress"),
                ("verdict", "allowed"),
                ("src_namespace", "host"),
                ("src_workload", "host"),
                ("dst_workload", "web-0"),
                ("protocol", "udp"),
                ("port", "5353"),
            ]
        ),
        Some(10.0),
        "3 probes and 2 datagrams of the host-network pod, with their echoes, from peer host\n{m}"
    );

    // A pod of the cluster, and another node (matched by ipBlock like any address outside the
    // pod network): both denied.
    let [web_got] = measure(&lab, &agent, ["web-0"], || {
        assert_eq!(
            traffic::probe(&client, &[udp_target(&web, false, 5353)], FAIL_FAST),
            vec![false]
        );
        assert_eq!(
            traffic::probe(&uplink.far, &[udp_target(&web, false, 5353)], FAIL_FAST),
            vec![false],
            "another node's address is no host of web"
        );
    });
    assert_eq!(web_got, [0, 0, 2, 0, 0, 0]);

    // `tollgate check` knows each pod's node from the Node objects.
    let answers = agent.check(
        "10.77.0.1 shop/web-0 5353/udp\n10.250.0.2 shop/web-0 5353/udp\nshop/web-0 10.250.0.1 53/udp\n",
    );
    let verdicts: Vec<&str> = answers
        .iter()
        .map(|a| a["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["allowed", "denied", "allowed"], "{answers:?}");
}

#[test]
fn attachments_go_only_where_they_provably_belong() {
    let mut lab = Lab::new();
    let uplink = lab.add_uplink();
    let ledger = lab.add_pod("ledger");
    let pot = lab.add_pod("pot");
    let evil = lab.add_pod("evil");
    let evilcg = lab.add_pod("evilcg");
    let loop_pod = lab.add_pod("looppod");
    let up_pod = lab.add_pod("uppod");
    let away = lab.add_pod("away");
    lab.serve(&ledger, &[], &[5353]);
    let dir = temp_dir("node-attach");
    let mut agent = start(&lab, &dir, &[]);
    let honest = cluster::namespace("bank", "{}", "{tollgate.io/mode: drop}")
        + &cluster::pod(&ledger, "bank", "ledger-0", "{app: ledger}", "{}", &[])
        + &cluster::pod(&pot, "bank", "pot-0", "{app: pot}", "{}", &[])
        + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ledger, namespace: bank}\nspec:\n  podSelector: {matchLabels: {app: ledger}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: pot}}}]}]\n";
    let hostile = cluster::pod(
        &evil,
        "bank",
        "evil-0",
        "{app: evil}",
        &format!("{{tollgate.io/interface: {}}}", ledger.host_if),
        &[],
    ) + &cluster::pod(
        &evilcg,
        "bank",
        "evilcg-0",
        "{app: evil}",
        &format!("{{tollgate.io/cgroup: {}}}", ledger.cgroup.display()),
        &[],
    ) + &cluster::pod(
        &loop_pod,
        "bank",
        "loop-0",
        "{app: evil}",
        "{tollgate.io/interface: lo}",
        &[],
    ) + &cluster::pod(
        &up_pod,
        "bank",
        "uplink-0",
        "{app: evil}",
        &format!("{{tollgate.io/interface: {}}}", uplink.iface),
        &[],
    ) + &cluster::on_node(
        &cluster::pod(&away, "bank", "away-0", "{app: away}", "{}", &[]),
        "node-b",
    );
    agent.apply(&format!("{honest}{hostile}"), &["ledger-0", "pot-0"]);
    let refused = wait_for(Duration::from_secs(5), "four refusals", || {
        let r = agent.status()["refused"].as_array().cloned()?;
        (r.len() == 4).then_some(r)
    });
    let refusal = |pod: &str| {
        refused
            .iter()
            .map(|r| r.as_str().unwrap())
            .find(|r| r.starts_with(&format!("bank/{pod}:")))
            .unwrap_or_else(|| panic!("{pod} refused: {refused:?}"))
            .to_string()
    };
    for (pod, claimed) in [
        ("evil-0", ledger.host_if.clone()),
        ("evilcg-0", ledger.cgroup.display().to_string()),
    ] {
        let why = refusal(pod);
        assert!(
            why.contains(&claimed) && why.contains("bank/ledger-0"),
            "the refusal names both: {why}"
        );
    }
    assert!(refusal("loop-0").contains("loopback"), "{refused:?}");
    assert!(refusal("uplink-0").contains("node address"), "{refused:?}");
    let attached: Vec<String> = agent.status()["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pod"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        attached,
        ["ledger-0", "pot-0"],
        "none of the claimers, nor the pod of another node"
    );
    let ledger_status = agent.workload("ledger-0").unwrap();
    assert_eq!(ledger_status["attached_at"], ledger.host_if.as_str());

    let enforced = |agent: &Agent| {
        let [got] = measure(&lab, agent, ["ledger-0"], || {
            let r = traffic::udp(&pot, ledger.addr(false), 5353, 4, 64, PATIENT);
            assert_eq!(r.echoed, 4, "{r:?}");
            let r = traffic::udp(&evil, ledger.addr(false), 5353, 3, 64, FAIL_FAST);
            assert_eq!(r.echoed, 0, "{r:?}");
        });
        assert_eq!(got, [4, 0, 3, 4, 0, 0], "the ledger's own policy, exactly");
    };
    enforced(&agent);

    // A restarted agent adopts the ledger's programs; the claims are refused again.
    agent.kill9();
    agent.restart();
    wait_for(Duration::from_secs(5), "refusals after restart", || {
        (agent.status()["refused"].as_array()?.len() == 4).then_some(())
    });
    enforced(&agent);

    // The claims go away: the owner keeps its programs, slot and counters.
    let before = agent.counters("ledger-0");
    std::fs::write(agent.cluster_state.join("cluster.yaml"), &honest).unwrap();
    wait_for(Duration::from_secs(5), "no refusals", || {
        agent.status()["refused"]
            .as_array()?
            .is_empty()
            .then_some(())
    });
    let after = agent.counters("ledger-0");
    assert_eq!(after, before, "nothing detached or reset");
    enforced(&agent);
}

#[test]
fn a_pods_own_mode_annotation_may_only_make_it_stricter() {
    let mut lab = Lab::new();
    let relaxed = lab.add_pod("relaxed");
    let tight = lab.add_pod("tight");
    let bogus = lab.add_pod("bogus");
    let peer = lab.add_pod("peer");
    for p in [&relaxed, &tight, &bogus] {
        lab.serve(p, &[], &[5353]);
    }
    let dir = temp_dir("node-modes");
    let deny = |ns: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: {ns}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}\n"
        )
    };
    let yaml = cluster::namespace("strict", "{}", "{tollgate.io/mode: drop}")
        + &cluster::namespace("lenient", "{}", "{tollgate.io/mode: log}")
        + &cluster::pod(
            &relaxed,
            "strict",
            "relaxed-0",
            "{app: a}",
            "{tollgate.io/mode: log}",
            &[],
        )
        + &cluster::pod(
            &bogus,
            "strict",
            "bogus-0",
            "{app: b}",
            "{tollgate.io/mode: block}",
            &[],
        )
        + &cluster::pod(
            &tight,
            "lenient",
            "tight-0",
            "{app: c}",
            "{tollgate.io/mode: drop}",
            &[],
        )
        + &cluster::pod(&peer, "lenient", "peer-0", "{app: peer}", "{}", &[])
        + &deny("strict")
        + &deny("lenient");
    let pods = ["relaxed-0", "bogus-0", "tight-0"];
    let run = |extra: &[&str], expect: [(&str, &str); 3]| {
        let mut agent = start(&lab, &dir, extra);
        agent.apply(&yaml, &pods);
        for (pod, (mode, source)) in pods.iter().zip(expect) {
            let w = agent.workload(pod).unwrap();
            assert_eq!(
                (
                    w["mode"].as_str().unwrap(),
                    w["mode_source"].as_str().unwrap()
                ),
                (mode, source),
                "{pod} with {extra:?}"
            );
        }
        let got = measure(&lab, &agent, pods, || {
            for p in [&relaxed, &bogus, &tight] {
                traffic::udp(&peer, p.addr(false), 5353, 2, 64, FAIL_FAST);
            }
        });
        let warnings = agent.status()["warnings"].to_string();
        assert!(
            warnings.contains("bogus-0")
                && warnings.contains("block")
                && warnings.contains("ignored"),
            "an invalid mode is reported: {warnings}"
        );
        agent.stop();
        got
    };
    // The namespace's drop stands against the pod's log; a pod may tighten a lenient
    // namespace; an invalid value is ignored, the pod enforced by its namespace.
    let got = run(
        &[],
        [
            ("drop", "namespace"),
            ("drop", "namespace"),
            ("drop", "pod"),
        ],
    );
    for (pod, g) in pods.iter().zip(got) {
        assert_eq!(g, [0, 0, 2, 0, 0, 0], "{pod} drops");
    }
    // With --pod-mode-annotations=any the pod's word wins.
    let got = run(
        &["--pod-mode-annotations", "any"],
        [("log", "pod"), ("drop", "namespace"), ("drop", "pod")],
    );
    assert_eq!(got[0], [0, 2, 0, 0, 2, 0], "relaxed-0 only logs");
}

#[test]
fn spoofed_sources_are_counted_never_believed_and_dropped() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    let c = lab.add_pod("c");
    lab.serve(&b, &[], &[5353]);
    let dir = temp_dir("node-spoof");
    let agent = start(&lab, &dir, &[]);
    let yaml = |a_policy: &str| {
        cluster::namespace("x", "{}", "{tollgate.io/mode: drop}")
            + &cluster::pod(&a, "x", "a-0", "{app: a}", "{}", &[])
            + &cluster::pod(&b, "x", "b-0", "{app: b}", "{}", &[])
            + &cluster::pod(&c, "x", "c-0", "{app: c}", "{}", &[])
            + a_policy
    };
    agent.apply(&yaml(""), &["a-0", "b-0", "c-0"]);
    // b's echoes to made-up addresses vanish on the node without an ICMP error back.
    for (family, addr) in [("-4", "10.1.0.99/32"), ("-6", "fd77:1::99/128")] {
        tollgate_tests::run(
            "ip",
            &["-n", &lab.node, family, "route", "add", "blackhole", addr],
        );
    }
    // To b's echo server; from a's own address to a closed port, so no echo comes back for
    // a's kernel to answer with a port unreachable of its own.
    let udp4 = |src: &str| {
        let port = if src == a.ipv4.to_string() {
            5354
        } else {
            5353
        };
        packets::ipv4_udp(src.parse().unwrap(), b.ipv4, 40000, port, b"spoof")
    };
    let spoofed_metric = || {
        sample(
            &agent.metrics_text(),
            "tollgate_spoofed_packets_total",
            &[("pod", "a-0")],
        )
        .unwrap()
    };

    // a is not isolated. A source not its own is dropped in any mode (its interface carries
    // its own addresses only), made up or claiming another workload's or the node's, and
    // counted spoofed; its own address is a normal flow.
    let [a_got, b_got] = measure(&lab, &agent, ["a-0", "b-0"], || {
        for (src, count) in [
            ("10.1.0.99", 3),
            (c.ipv4.to_string().as_str(), 3),
            ("169.254.1.1", 3),
            (a.ipv4.to_string().as_str(), 3),
        ] {
            let r = traffic::raw(&a, &[udp4(src)], count);
            assert_eq!(r.sent, count, "{r:?}");
        }
        let v6 = packets::ipv6_udp("fd77:1::99".parse().unwrap(), b.ipv6, 40000, 5353, b"x");
        assert_eq!(traffic::raw(&a, &[v6], 2).sent, 2);
    });
    assert_eq!(
        [a_got[3], a_got[4], a_got[5]],
        [3, 0, 3 + 3 + 3 + 2],
        "a's egress: its own source passes, every other is dropped"
    );
    assert_eq!(b_got[0], 3, "what b received");
    assert_eq!(spoofed_metric(), 3.0 + 3.0 + 3.0 + 2.0);
    let m = agent.metrics_text();
    assert_eq!(
        sample(
            &m,
            "tollgate_flow_packets_total",
            &[("src_workload", "c-0")]
        ),
        None,
        "nothing was counted as c's\n{m}"
    );
    assert!(
        sample(
            &m,
            "tollgate_datapath_diagnostics_total",
            &[("reason", "spoofed")]
        )
        .unwrap()
            >= 11.0
    );

    // Isolated for egress in drop mode: the same.
    let egress = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: b}}}]}]\n";
    std::fs::write(agent.cluster_state.join("cluster.yaml"), yaml(egress)).unwrap();
    wait_for(Duration::from_secs(5), "a isolated for egress", || {
        (agent.workload("a-0")?["isolated_egress"] == true).then_some(())
    });
    let [a_got] = measure(&lab, &agent, ["a-0"], || {
        traffic::raw(&a, &[udp4("10.1.0.99")], 3);
        traffic::raw(&a, &[udp4(&a.ipv4.to_string())], 2);
    });
    assert_eq!([a_got[3], a_got[5]], [2, 3]);

    // Deleted and made again under its name (a StatefulSet's pod): its count goes on where
    // it was, as its packet counts do, though its slot counts from zero.
    let total = spoofed_metric();
    assert_eq!(total, 11.0 + 3.0);
    let without_a = cluster::namespace("x", "{}", "{tollgate.io/mode: drop}")
        + &cluster::pod(&b, "x", "b-0", "{app: b}", "{}", &[])
        + &cluster::pod(&c, "x", "c-0", "{app: c}", "{}", &[]);
    std::fs::write(agent.cluster_state.join("cluster.yaml"), without_a).unwrap();
    wait_for(Duration::from_secs(10), "a detached", || {
        agent.workload("a-0").is_none().then_some(())
    });
    agent.apply(&yaml(egress), &["a-0", "b-0", "c-0"]);
    assert_eq!(spoofed_metric(), total, "continued, not started over");
    traffic::raw(&a, &[udp4("10.1.0.99")], 1);
    lab.settle();
    assert_eq!(spoofed_metric(), total + 1.0);
}

/// The hardware address of `iface` in network namespace `netns`.
fn mac_of(netns: &str, iface: &str) -> [u8; 6] {
    let out = tollgate_tests::run("ip", &["-n", netns, "-j", "link", "show", iface]);
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j link");
    let text = links[0]["address"].as_str().expect("a hardware address");
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("6 bytes")
}

#[test]
fn a_pod_may_claim_only_its_own_addresses_on_its_link() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let c = lab.add_pod("c");
    let dir = temp_dir("node-link-claims");
    let agent = start(&lab, &dir, &[]);
    // Log mode, nothing isolated: a false claim is dropped in either mode.
    agent.apply(
        &(cluster::namespace("x", "{}", "{}")
            + &cluster::pod(&a, "x", "a-0", "{app: a}", "{}", &[])
            + &cluster::pod(&c, "x", "c-0", "{app: c}", "{}", &[])),
        &["a-0", "c-0"],
    );
    let a_mac = mac_of(&a.netns, "eth0");
    let node_mac = mac_of(&lab.node, &a.host_if);
    let gateway: std::net::Ipv4Addr = "169.254.1.1".parse().unwrap();
    // What a's frames say, each believed by the node only if it reaches it: its own
    // addresses, c's, the node's gateway address, made-up ones.
    let arp = |ip| packets::arp_reply(a_mac, ip, node_mac, gateway);
    // Hardware type IEEE 802 in place of Ethernet, which Linux takes on Ethernet too.
    let arp_ieee802 = |ip| {
        let mut f = arp(ip);
        f[15] = 6;
        f
    };
    let made_up: std::net::Ipv4Addr = "10.1.0.99".parse().unwrap();
    // Behind two VLAN 0 tags: the kernel takes the outer one off before the hooks, and the
    // inner one after them.
    let stacked: std::net::Ipv4Addr = "10.1.0.98".parse().unwrap();
    let arp_stacked = |ip| {
        let mut f = arp(ip);
        f.splice(12..12, [0x81, 0x00, 0, 0, 0x81, 0x00, 0, 0]);
        f
    };
    let na = |target| packets::neighbour_advertisement(a_mac, a.ipv6, target);
    let claims: [(IpAddr, Vec<u8>, bool); 7] = [
        (a.ipv4.into(), arp_ieee802(a.ipv4), true),
        (c.ipv4.into(), arp(c.ipv4), false),
        (gateway.into(), arp(gateway), false),
        (made_up.into(), arp_ieee802(made_up), false),
        (stacked.into(), arp_stacked(stacked), false),
        (a.ipv6.into(), na(a.ipv6), true),
        (c.ipv6.into(), na(c.ipv6), false),
    ];
    // The node's neighbour entries on a's interface, each at a decoy address first: an
    // entry the node already has is what a claim overrides.
    let decoy = "02:00:00:00:00:99";
    for (ip, _, _) in &claims {
        tollgate_tests::run(
            "ip",
            &[
                "-n",
                &lab.node,
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                decoy,
                "dev",
                &a.host_if,
                "nud",
                "stale",
            ],
        );
    }
    // An ARP reply overrides an entry only once it is a second old (`locktime`).
    std::thread::sleep(Duration::from_millis(1500));
    let frames: Vec<Vec<u8>> = claims.iter().map(|(_, f, _)| f.clone()).collect();
    let sent = traffic::frames(&a, "eth0", &frames, 1);
    assert_eq!(sent.sent, 7, "{sent:?}");
    // A router advertisement from a link-local address, as a router's would come.
    let ra = packets::router_advertisement(a_mac, "fe80::bad".parse().unwrap());
    assert_eq!(traffic::frames(&a, "eth0", &[ra], 1).sent, 1);
    lab.settle();

    let neighbours: serde_json::Value = serde_json::from_str(&tollgate_tests::run(
        "ip",
        &["-n", &lab.node, "-j", "neigh", "show", "dev", &a.host_if],
    ))
    .unwrap();
    let a_mac_text = a_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for (ip, _, own) in &claims {
        let entry = neighbours
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["dst"] == ip.to_string())
            .unwrap_or_else(|| panic!("an entry for {ip}: {neighbours}"));
        let expected = if *own { a_mac_text.as_str() } else { decoy };
        assert_eq!(
            entry["lladdr"],
            expected,
            "{ip}: a's claim {} the node",
            if *own { "reached" } else { "must never reach" }
        );
    }
    let spoofed = sample(
        &agent.metrics_text(),
        "tollgate_spoofed_packets_total",
        &[("pod", "a-0")],
    );
    assert_eq!(
        spoofed,
        Some(6.0),
        "c's two addresses, the gateway, two made-up addresses, the router"
    );
}

#[test]
fn icmp_errors_must_travel_between_the_ends_of_the_flow_they_quote() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    let c = lab.add_pod("c");
    lab.serve(&b, &[], &[5353]);
    let dir = temp_dir("node-icmp");
    let agent = start(&lab, &dir, &[]);
    let yaml = cluster::namespace("x", "{}", "{tollgate.io/mode: drop}")
        + &cluster::pod(&a, "x", "a-0", "{app: a}", "{}", &[])
        + &cluster::pod(&b, "x", "b-0", "{app: b}", "{}", &[])
        + &cluster::pod(&c, "x", "c-0", "{app: c}", "{}", &[])
        + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 5353, protocol: UDP}]}]\n";
    agent.apply(&yaml, &["a-0", "b-0", "c-0"]);
    let diag = |reason: &str| {
        sample(
            &agent.metrics_text(),
            "tollgate_datapath_diagnostics_total",
            &[("reason", reason)],
        )
        .unwrap()
    };

    for v6 in [false, true] {
        // An allowed flow a:40000 -> b:5353 (and b's echo back).
        let r = traffic::udp_from(&a, b.addr(v6), 5353, 1, 16, PATIENT, Some(40000));
        assert_eq!(r.echoed, 1, "{r:?}");
        // a reports b's echo as unreachable: the quoted packet b:5353 -> a:40000.
        let quoted = if v6 {
            packets::ipv6_udp(b.ipv6, a.ipv6, 5353, 40000, &[0; 16])
        } else {
            packets::ipv4_udp(b.ipv4, a.ipv4, 5353, 40000, &[0; 16])
        };
        let error = |to: &Pod| {
            if v6 {
                packets::icmpv6_error(a.ipv6, to.ipv6, 1, 4, &quoted)
            } else {
                packets::icmpv4_error(a.ipv4, to.ipv4, 3, 3, &quoted)
            }
        };
        let (related, foreign) = (diag("icmp_related"), diag("icmp_foreign"));
        let [a_got, c_got] = measure(&lab, &agent, ["a-0", "c-0"], || {
            // To the flow's peer: related to the flow, allowed with it.
            assert_eq!(traffic::raw(&a, &[error(&b)], 2).sent, 2);
            // The same quote sent to c: not related to anything c or a's flow has; a's egress
            // evaluates it as ICMP to c, which a may not send: dropped.
            assert_eq!(traffic::raw(&a, &[error(&c)], 3).sent, 3);
        });
        assert_eq!(
            [a_got[3], a_got[4], a_got[5]],
            [2, 0, 3],
            "v6 {v6}: 2 related errors allowed, 3 foreign ones dropped"
        );
        assert_eq!(c_got, [0; 6], "v6 {v6}: nothing reached c");
        assert_eq!(
            diag("icmp_related") - related,
            4.0,
            "each related error seen leaving a and arriving at b"
        );
        assert_eq!(diag("icmp_foreign") - foreign, 3.0);
    }
}

#[test]
fn a_full_policy_map_leaves_the_last_complete_rules_in_force() {
    let mut lab = Lab::new();
    let ledger = lab.add_pod("ledger");
    let late = lab.add_pod("late");
    let pot = lab.add_pod("pot");
    let frontend = lab.add_pod("frontend");
    lab.serve(&ledger, &[8080], &[5353]);
    lab.serve(&late, &[8080], &[5353]);
    let dir = temp_dir("node-full-map");
    let agent = start(&lab, &dir, &[]);
    let policy = |name: &str, app: &str, from: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: bank}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: app, operator: In, values: [{from}]}}]}}}}], ports: [{{port: 5353, protocol: UDP}}, {{port: 8080}}]}}]\n"
        )
    };
    let base = cluster::namespace("bank", "{}", "{tollgate.io/mode: drop}")
        + &cluster::pod(&ledger, "bank", "ledger-0", "{app: ledger}", "{}", &[])
        + &cluster::pod(&pot, "bank", "pot-0", "{app: pot}", "{}", &[])
        + &cluster::pod(
            &frontend,
            "bank",
            "frontend-0",
            "{app: frontend}",
            "{}",
            &[],
        );
    agent.apply(
        &format!("{base}{}", policy("ledger", "ledger", "pot")),
        &["ledger-0", "pot-0", "frontend-0"],
    );
    let reaches = |from: &Pod, to: &Pod| {
        traffic::udp(from, to.addr(false), 5353, 1, 64, FAIL_FAST).echoed == 1
    };
    assert!(reaches(&pot, &ledger));
    assert!(!reaches(&frontend, &ledger));

    // Another agent's worth of single-port rules fills their map up to one free entry.
    let exact = || {
        let data = MapData::from_pin(agent.bpffs.join(map_names::POLICY_EXACT))
            .expect("pinned POLICY_EXACT");
        aya::maps::HashMap::<_, PolicyKey, PolicyValue>::try_from(Map::HashMap(data)).unwrap()
    };
    let mut filler = exact();
    let mut filled = Vec::new();
    let capacity = agent_common::POLICY_CAPACITY as usize;
    let in_use = filler.keys().count();
    for i in 0..(capacity - in_use - 1) as u32 {
        let key = PolicyKey {
            ruleset: 0x7000_0000 + i / 60000,
            peer: i % 60000,
            proto: PROTO_TCP,
            port: [0, 1],
            kind: 0,
        };
        filler
            .insert(key, PolicyValue { rule: 0 }, 0)
            .unwrap_or_else(|e| panic!("filler entry {i}: {e}"));
        filled.push(key);
    }
    let full = filler.keys().count();
    assert_eq!(full, capacity - 1);

    // Now the ledger should admit the frontend too, and a new pod arrives with rules of its
    // own: each change needs two entries, and there is room for one.
    std::fs::write(
        agent.cluster_state.join("cluster.yaml"),
        format!(
            "{base}{}{}{}",
            policy("ledger", "ledger", "pot, frontend"),
            cluster::pod(&late, "bank", "late-0", "{app: late}", "{}", &[]),
            policy("late", "late", "pot"),
        ),
    )
    .unwrap();
    let degraded = wait_for(Duration::from_secs(10), "both degraded", || {
        let d = agent.status()["degraded"].as_array().cloned()?;
        (d.len() == 2).then_some(d)
    });
    assert!(
        degraded
            .iter()
            .any(|d| d.as_str().unwrap().starts_with("bank/ledger-0:")),
        "{degraded:?}"
    );
    assert_eq!(
        exact().keys().count(),
        full,
        "nothing half-written is left behind"
    );
    let readyz = agent.http("/readyz").unwrap();
    assert_eq!(readyz.0, 503, "{readyz:?}");
    assert!(readyz.1.contains("ledger-0"), "{readyz:?}");
    let m = agent.metrics_text();
    for pod in ["ledger-0", "late-0"] {
        assert_eq!(
            sample(&m, "tollgate_workload_degraded", &[("pod", pod)]),
            Some(1.0),
            "{pod}"
        );
    }
    assert!(
        agent.workload("ledger-0").unwrap()["degraded"].is_string(),
        "status marks the workload"
    );
    // The ledger keeps its last complete rules; the new pod denies in its mode.
    let [ledger_got, late_got] = measure(&lab, &agent, ["ledger-0", "late-0"], || {
        assert!(reaches(&pot, &ledger));
        assert!(!reaches(&frontend, &ledger), "the new rule is not in force");
        assert!(
            !reaches(&pot, &late),
            "the new pod denies until its rules fit"
        );
    });
    assert_eq!(ledger_got, [1, 0, 1, 1, 0, 0]);
    assert_eq!(late_got, [0, 0, 1, 0, 0, 0]);

    // Room again: the rules go in at the next poll, and the agent is whole.
    for key in &filled {
        filler.remove(key).unwrap();
    }
    wait_for(Duration::from_secs(10), "degraded cleared", || {
        agent.status()["degraded"]
            .as_array()?
            .is_empty()
            .then_some(())
    });
    assert_eq!(agent.http("/readyz").map(|r| r.0), Some(200));
    assert!(reaches(&frontend, &ledger));
    assert!(reaches(&pot, &late));
    let _: Scratch = dir;
}

/// A pod whose cgroup the kubelet creates after the pod is in the cluster state is attached
/// at the next poll once it exists, not at the next resync (10 s): until then its traffic
/// would go unseen.
#[test]
fn a_pod_whose_cgroup_appears_later_is_attached_at_the_next_poll() {
    let mut lab = Lab::new();
    let exporter = lab.add_host_pod("exporter");
    std::fs::remove_dir(&exporter.cgroup).expect("no cgroup yet");
    let dir = temp_dir("node-cgroup-late");
    let agent = start(&lab, &dir, &[]);
    let yaml = cluster::namespace("shop", "{}", "{}")
        + &cluster::on_node(
            &cluster::pod(
                &exporter,
                "shop",
                "exporter-0",
                "{app: exporter}",
                "{}",
                &[],
            ),
            "lab-node",
        );
    std::fs::write(agent.cluster_state.join("cluster.yaml"), yaml).unwrap();
    wait_for(Duration::from_secs(5), "the agent read the pod", || {
        (agent.status()["ready"] == true).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.workload("exporter-0").is_none(),
        "no cgroup, nothing to attach"
    );
    std::fs::create_dir_all(&exporter.cgroup).unwrap();
    // Within a few polls (1 s each), well before the 10 s resync.
    let w = wait_for(Duration::from_secs(5), "attached on its cgroup", || {
        agent.workload("exporter-0")
    });
    assert_eq!(w["attach"], "cgroup");
}
