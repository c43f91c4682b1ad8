//! Services on a node wired like a real one: kube-proxy's own iptables rules in the node
//! namespace DNAT each ClusterIP to one of its backends (`-m statistic`), after Tollgate's
//! hook has seen the packet. The flow is decided at the client's egress as a flow to the
//! backends on their target ports (a named `targetPort` resolved per backend), replies from
//! the Service address pass as replies, and the backends' ingress sees what it always saw.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tollgate_tests::{
    Lab, Pod,
    agent::{self, Agent, sample},
    cluster,
    kube_proxy::{self, Proto, ServicePort},
    packets,
    support::{FAIL_FAST, PATIENT, Scratch, temp_dir},
    traffic, wait_for,
};

const LEDGER_V4: &str = "10.96.0.50";
const LEDGER_V6: &str = "fd77:96::50";
const OTHER_V4: &str = "10.96.0.60";
const OTHER_V6: &str = "fd77:96::60";

/// bank/client (isolated both ways: egress to the stable ledger pods on `http`/`dns` only,
/// ingress from nobody), the ledger's two stable pods (`http` is 8080 on one and 8081 on the
/// other, as in the middle of a rollout that changed it), a canary ledger pod and bank/other.
struct Bank {
    lab: Lab,
    client: Pod,
    ledger_a: Pod,
    ledger_b: Pod,
    canary: Pod,
    other: Pod,
    dir: Scratch,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn bank(tag: &str) -> Bank {
    let mut lab = Lab::new();
    let client = lab.add_pod("client");
    let ledger_a = lab.add_pod("ledgera");
    let ledger_b = lab.add_pod("ledgerb");
    let canary = lab.add_pod("canary");
    let other = lab.add_pod("other");
    lab.serve(&ledger_a, &[8080], &[5353]);
    lab.serve(&ledger_b, &[8081], &[5353]);
    lab.serve(&canary, &[8080], &[5353]);
    lab.serve(&other, &[8080], &[5353]);
    let dir = temp_dir(tag);
    Bank {
        lab,
        client,
        ledger_a,
        ledger_b,
        canary,
        other,
        dir,
    }
}

const CLIENT_POLICY: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client, namespace: bank}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress, Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: ledger, track: stable}}}]\n    ports: [{port: http}, {port: dns, protocol: UDP}]\n";
const LEDGER_POLICY: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ledger, namespace: bank}\nspec:\n  podSelector: {matchLabels: {app: ledger}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n";
const OTHER_POLICY: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: other, namespace: bank}\nspec:\n  podSelector: {matchLabels: {app: other}}\n  ingress: []\n";

impl Bank {
    /// The cluster state; `canary_ready` adds the canary to the ledger's endpoints.
    fn yaml(&self, mode: &str, canary_ready: bool) -> String {
        let ports = |http: u16| [("http", http, "TCP"), ("dns", 5353, "UDP")];
        let mut y = cluster::namespace("bank", "{}", &format!("{{tollgate.io/mode: {mode}}}"));
        y += &cluster::pod(&self.client, "bank", "client-0", "{app: client}", "{}", &[]);
        y += &cluster::pod(
            &self.ledger_a,
            "bank",
            "ledger-a",
            "{app: ledger, track: stable}",
            "{}",
            &ports(8080),
        );
        y += &cluster::pod(
            &self.ledger_b,
            "bank",
            "ledger-b",
            "{app: ledger, track: stable}",
            "{}",
            &ports(8081),
        );
        y += &cluster::pod(
            &self.canary,
            "bank",
            "ledger-canary",
            "{app: ledger, track: canary}",
            "{}",
            &ports(8080),
        );
        y += &cluster::pod(
            &self.other,
            "bank",
            "other-0",
            "{app: other}",
            "{}",
            &ports(8080),
        );
        let svc_ports = [("web", 80, "TCP", "http"), ("dns", 53, "UDP", "dns")];
        y += &cluster::service(
            "bank",
            "ledger",
            &[ip(LEDGER_V4), ip(LEDGER_V6)],
            "{app: ledger}",
            &svc_ports,
        );
        y += &cluster::service(
            "bank",
            "other",
            &[ip(OTHER_V4), ip(OTHER_V6)],
            "{app: other}",
            &svc_ports,
        );
        // The EndpointSlice controller puts backends with different port numbers into
        // different slices.
        for v6 in [false, true] {
            let family = if v6 { "v6" } else { "v4" };
            let slice_ports = |http: u16| [("web", http, "TCP"), ("dns", 5353, "UDP")];
            let mut on_8080 = vec![(self.ledger_a.addr(v6), "ledger-a")];
            if canary_ready {
                on_8080.push((self.canary.addr(v6), "ledger-canary"));
            }
            y += &cluster::endpoint_slice(
                "bank",
                &format!("ledger-{family}-a"),
                "ledger",
                &on_8080,
                &slice_ports(8080),
            );
            y += &cluster::endpoint_slice(
                "bank",
                &format!("ledger-{family}-b"),
                "ledger",
                &[(self.ledger_b.addr(v6), "ledger-b")],
                &slice_ports(8081),
            );
            y += &cluster::endpoint_slice(
                "bank",
                &format!("other-{family}"),
                "other",
                &[(self.other.addr(v6), "other-0")],
                &slice_ports(8080),
            );
        }
        y + CLIENT_POLICY + LEDGER_POLICY + OTHER_POLICY
    }

    /// kube-proxy's rules for both Services in both families.
    fn kube_proxy(&self, canary_ready: bool) {
        self.kube_proxy_with(canary_ready, Vec::new());
    }

    /// kube-proxy's rules for both Services in both families, and for `extra`.
    fn kube_proxy_with(&self, canary_ready: bool, extra: Vec<ServicePort>) {
        let mut ports = extra;
        for v6 in [false, true] {
            let (ledger, other) = if v6 {
                (LEDGER_V6, OTHER_V6)
            } else {
                (LEDGER_V4, OTHER_V4)
            };
            let mut web = vec![
                (self.ledger_a.addr(v6), 8080),
                (self.ledger_b.addr(v6), 8081),
            ];
            let mut dns = vec![
                (self.ledger_a.addr(v6), 5353),
                (self.ledger_b.addr(v6), 5353),
            ];
            if canary_ready {
                web.push((self.canary.addr(v6), 8080));
                dns.push((self.canary.addr(v6), 5353));
            }
            let port = |service: &str, name: &str, proto, vip: &str, port, endpoints| ServicePort {
                namespace: "bank".into(),
                service: service.into(),
                port_name: name.into(),
                protocol: proto,
                cluster_ip: ip(vip),
                port,
                endpoints,
                node_port: None,
                external_ips: vec![],
            };
            ports.push(port("ledger", "web", Proto::Tcp, ledger, 80, web));
            ports.push(port("ledger", "dns", Proto::Udp, ledger, 53, dns));
            ports.push(port(
                "other",
                "web",
                Proto::Tcp,
                other,
                80,
                vec![(self.other.addr(v6), 8080)],
            ));
            ports.push(port(
                "other",
                "dns",
                Proto::Udp,
                other,
                53,
                vec![(self.other.addr(v6), 5353)],
            ));
        }
        kube_proxy::apply(&self.lab.node, &ports, "10.1.0.0/24", "fd77:1::/64");
    }

    fn start(&self, mode: &str) -> Agent {
        self.kube_proxy(false);
        let mut agent = Agent::start(
            &self.lab,
            &self.dir,
            &["--cgroup-root", self.lab.cgroup_dir.to_str().unwrap()],
        );
        agent.wait_ready();
        agent.apply(
            &self.yaml(mode, false),
            &[
                "client-0",
                "ledger-a",
                "ledger-b",
                "ledger-canary",
                "other-0",
            ],
        );
        agent
    }
}

/// Counters of `pod` that `action` adds.
fn measure(bank: &Bank, agent: &Agent, pod: &str, action: impl FnOnce()) -> [u64; 6] {
    agent::measure(&bank.lab, agent, [pod], action)[0]
}

#[test]
fn calls_through_a_cluster_ip_are_decided_by_the_backends_in_log_and_drop_mode() {
    let bank = bank("services");
    let agent = bank.start("log");

    // UDP to the ledger's Service, both families: allowed at the client's egress (the
    // policy allows both stable backends on their `dns` port), the echoes pass as replies
    // although the client admits nothing new. No phantom would-drop.
    for vip in [LEDGER_V4, LEDGER_V6] {
        let got = measure(&bank, &agent, "client-0", || {
            let r = traffic::udp(&bank.client, ip(vip), 53, 6, 64, PATIENT);
            assert_eq!(r.echoed, 6, "{vip}: {r:?}");
        });
        assert_eq!(got, [6, 0, 0, 6, 0, 0], "{vip}: client's packets");
    }

    // TCP on the port whose `targetPort: http` is 8080 on one backend and 8081 on the other:
    // 16 connections, kube-proxy spreads them over both, every packet allowed.
    let a_before = bank.lab.link_stats(&bank.ledger_a);
    let b_before = bank.lab.link_stats(&bank.ledger_b);
    let client_link = bank.lab.link_stats(&bank.client);
    let got = measure(&bank, &agent, "client-0", || {
        for _ in 0..16 {
            let r = traffic::tcp(&bank.client, ip(LEDGER_V4), 80, 2, PATIENT);
            assert_eq!(r.echoed, 2, "{r:?}");
        }
    });
    let client_after = bank.lab.link_stats(&bank.client);
    assert_eq!(got[1] + got[2] + got[4] + got[5], 0, "{got:?}");
    assert_eq!(
        (got[0], got[3]),
        (
            client_after.tx_packets - client_link.tx_packets,
            client_after.rx_packets - client_link.rx_packets
        ),
        "every packet counted as allowed, as the interface saw them"
    );
    assert!(
        bank.lab.link_stats(&bank.ledger_a).tx_packets > a_before.tx_packets
            && bank.lab.link_stats(&bank.ledger_b).tx_packets > b_before.tx_packets,
        "both backends got connections"
    );

    // kube-proxy's IPVS mode binds every ClusterIP to the node: such an address is still the
    // Service's, never the node's own (which would always be allowed).
    tollgate_tests::run(
        "ip",
        &[
            "-n",
            &bank.lab.node,
            "addr",
            "add",
            &format!("{OTHER_V4}/32"),
            "dev",
            "lo",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let host = agent.status()["host_addresses"].to_string();
    assert!(!host.contains(OTHER_V4), "{host}");

    // The other Service: its backend is not allowed. Would-drops at the client's egress
    // (the echoes of a would-drop flow count as would-drops too) and at other's ingress,
    // which sees the backend address after the DNAT.
    let [got, other_got] = agent::measure(&bank.lab, &agent, ["client-0", "other-0"], || {
        let r = traffic::udp(&bank.client, ip(OTHER_V4), 53, 4, 64, PATIENT);
        assert_eq!(r.echoed, 4, "log mode lets them pass: {r:?}");
    });
    assert_eq!(got, [0, 4, 0, 0, 4, 0]);
    assert_eq!(other_got, [0, 4, 0, 0, 4, 0]);

    // Named by the Service and counted against the backend workload.
    let record = wait_for(Duration::from_secs(5), "the flow log record", || {
        agent
            .flow_records()
            .into_iter()
            .find(|r| r["dst_ip"] == OTHER_V4 && r["direction"] == "egress")
    });
    assert_eq!(record["verdict"], "would_drop");
    assert_eq!(record["dst_service"], "bank/other");
    assert_eq!(record["dst"]["workload"], "other-0");
    assert_eq!(record["src"]["pod"], "client-0");
    let m = agent.metrics_text();
    let series = |verdict: &str, dst: &str, proto: &str, port: &str| {
        sample(
            &m,
            "tollgate_flow_packets_total",
            &[
                ("direction", "egress"),
                ("verdict", verdict),
                ("src_workload", "client-0"),
                ("dst_namespace", "bank"),
                ("dst_workload", dst),
                ("protocol", proto),
                ("port", port),
            ],
        )
    };
    assert_eq!(
        series("allowed", "ledger-a+ledger-b", "udp", "5353"),
        Some(24.0),
        "6 datagrams and 6 echoes per family, on the backends' port\n{m}"
    );
    assert_eq!(series("would_drop", "other-0", "udp", "5353"), Some(8.0));

    // `tollgate check` gives the same answers for the Service addresses.
    let answers = agent.check(
        &format!(
            "bank/client-0 {LEDGER_V4} 80/tcp\nbank/client-0 {LEDGER_V6} dns/udp\nbank/client-0 {OTHER_V4} web/tcp\n"
        ),
    );
    assert_eq!(answers[0]["verdict"], "allowed", "{:?}", answers[0]);
    assert_eq!(answers[0]["dst_service"], "bank/ledger");
    assert_eq!(answers[1]["verdict"], "allowed", "{:?}", answers[1]);
    assert_eq!(answers[1]["port"], 53);
    assert_eq!(answers[2]["egress"], "denied", "{:?}", answers[2]);
    assert_eq!(answers[2]["ingress"], "denied", "other admits nobody");
    assert_eq!(answers[2]["dst_service"], "bank/other");

    // Drop mode: the calls the policy denies fail, the allowed ones are untouched.
    let out = agent.cli(&["mode", "set", "bank/client-0", "drop"]);
    assert!(out.status.success(), "{out:?}");
    let got = measure(&bank, &agent, "client-0", || {
        let r = traffic::udp(&bank.client, ip(OTHER_V6), 53, 3, 64, FAIL_FAST);
        assert_eq!(r.echoed, 0, "{r:?}");
        let r = traffic::udp(&bank.client, ip(LEDGER_V6), 53, 3, 64, PATIENT);
        assert_eq!(r.echoed, 3, "{r:?}");
        let r = traffic::tcp(&bank.client, ip(LEDGER_V6), 80, 1, PATIENT);
        assert_eq!(r.echoed, 1, "{r:?}");
    });
    assert_eq!(
        (got[1], got[2], got[4], got[5]),
        (0, 0, 0, 3),
        "3 datagrams to the other Service dropped, nothing else"
    );
}

#[test]
fn a_change_of_backends_decides_new_connections_and_leaves_established_ones() {
    let bank = bank("service-backends");
    let agent = bank.start("drop");
    let allowed = || traffic::udp(&bank.client, ip(LEDGER_V4), 53, 1, 64, FAIL_FAST).echoed == 1;
    assert!(allowed());

    // A connection that keeps talking, one echo every 300 ms for 3 s.
    let talking = traffic::tcp_talking(
        &bank.client,
        ip(LEDGER_V4),
        80,
        10,
        Duration::from_millis(300),
    );
    std::thread::sleep(Duration::from_millis(500));

    // The canary becomes ready: a backend the client's policy does not allow. kube-proxy
    // may now pick it, so new connections to the Service are denied (dropped in drop mode).
    let changed = Instant::now();
    bank.kube_proxy(true);
    std::fs::write(
        agent.cluster_state.join("cluster.yaml"),
        bank.yaml("drop", true),
    )
    .unwrap();
    wait_for(Duration::from_secs(5), "new connections denied", || {
        (!allowed()).then_some(())
    });
    let took = changed.elapsed();
    let r = traffic::tcp(&bank.client, ip(LEDGER_V4), 80, 1, FAIL_FAST);
    assert!(!r.connected, "a new connection: {r:?}");

    let r = traffic::finish(talking);
    assert_eq!(
        (r.connected, r.echoed),
        (true, 10),
        "the established connection is not disturbed: {r:?}"
    );

    // The canary goes away again: new connections are allowed again.
    bank.kube_proxy(false);
    std::fs::write(
        agent.cluster_state.join("cluster.yaml"),
        bank.yaml("drop", false),
    )
    .unwrap();
    wait_for(Duration::from_secs(5), "new connections allowed", || {
        allowed().then_some(())
    });
    let r = traffic::tcp(&bank.client, ip(LEDGER_V4), 80, 2, PATIENT);
    assert_eq!(r.echoed, 2, "{r:?}");
    eprintln!("a change of backends took {took:?} to decide new connections");
}

/// A Service without a selector gets the EndpointSlices its owners write, `targetRef`
/// included. A slice that names a pod the client may reach (ledger-a) at another pod's
/// address (other-0's) must not pass the client's calls as ledger-a's: kube-proxy forwards
/// them to the address, and the backend is the pod that holds it. The same slice naming
/// ledger-a at its own address is ledger-a.
#[test]
fn a_slice_naming_an_allowed_pod_at_another_pods_address_is_decided_by_the_address() {
    const GENUINE_V4: &str = "10.96.0.70";
    const DISGUISED_V4: &str = "10.96.0.71";
    // The ledger by number: a named port resolves per pod, and so would tell the two
    // addresses apart on its own.
    const CLIENT_TO_8080: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-8080, namespace: bank}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: ledger, track: stable}}}]\n    ports: [{port: 8080}]\n";
    let bank = bank("service-disguised");
    let agent = bank.start("drop");
    let handwritten = |name: &str, vip: &str, backend: &Pod| {
        cluster::service(
            "bank",
            name,
            &[ip(vip)],
            "null",
            &[("web", 80, "TCP", "8080")],
        ) + &cluster::endpoint_slice(
            "bank",
            &format!("{name}-v4"),
            name,
            &[(backend.addr(false), "ledger-a")],
            &[("web", 8080, "TCP")],
        )
    };
    let port = |name: &str, vip: &str, backend: &Pod| ServicePort {
        namespace: "bank".into(),
        service: name.into(),
        port_name: "web".into(),
        protocol: Proto::Tcp,
        cluster_ip: ip(vip),
        port: 80,
        endpoints: vec![(backend.addr(false), 8080)],
        node_port: None,
        external_ips: vec![],
    };
    bank.kube_proxy_with(
        false,
        vec![
            port("genuine", GENUINE_V4, &bank.ledger_a),
            port("disguised", DISGUISED_V4, &bank.other),
        ],
    );
    let yaml = bank.yaml("drop", false)
        + CLIENT_TO_8080
        + &handwritten("genuine", GENUINE_V4, &bank.ledger_a)
        + &handwritten("disguised", DISGUISED_V4, &bank.other);
    std::fs::write(agent.cluster_state.join("cluster.yaml"), yaml).unwrap();
    // Both Services came with one write: once the genuine one passes, both are in force.
    wait_for(
        Duration::from_secs(10),
        "the genuine Service allowed",
        || (traffic::tcp(&bank.client, ip(GENUINE_V4), 80, 1, FAIL_FAST).echoed == 1).then_some(()),
    );

    let got = measure(&bank, &agent, "client-0", || {
        let r = traffic::tcp(&bank.client, ip(DISGUISED_V4), 80, 1, FAIL_FAST);
        assert!(!r.connected, "{r:?}");
    });
    assert_eq!(got[3], 0, "nothing allowed at the client's egress: {got:?}");
    assert!(
        got[5] > 0,
        "the SYN dropped at the client's egress: {got:?}"
    );
}

/// A NodePort on the node's address leads where the Service's ClusterIP does: kube-proxy
/// DNATs the connection to a backend past the client's hook, and masquerades it, so the
/// backend sees the node, whose traffic it always allows. The client's egress is the only
/// place left to decide it: as a connection to the Service, by every backend. A pod's
/// hostPort is the same: the CNI's portmap DNATs it to the pod (keeping the source). (Until
/// late 2026-11-27 both were the node's own traffic: any pod reached them whatever its
/// policies.)
#[test]
fn a_nodeport_or_host_port_on_the_nodes_address_is_decided_as_where_it_leads() {
    const TO_LEDGER_V4: &str = "10.96.0.80";
    const TO_OTHER_V4: &str = "10.96.0.81";
    // The ledger's load-balancer address and the other's external IP: kube-proxy DNATs
    // (and masquerades) them inside the node like the ClusterIP.
    const TO_LEDGER_LB: &str = "203.0.113.80";
    const TO_OTHER_EXTERNAL: &str = "203.0.113.81";
    let node = ip("169.254.1.1");
    let bank = bank("services-nodeport");
    let agent = bank.start("drop");
    // Each Service's one backend by its EndpointSlice (no selector: ledger-b shares
    // ledger-a's labels, and its 8080 the client may not call).
    let node_port_service = |name: &str, vip: &str, node_port: u16, backend: &Pod, pod: &str| {
        let outside = if name == "to-ledger" {
            format!("status: {{loadBalancer: {{ingress: [{{ip: {TO_LEDGER_LB}}}]}}}}\n")
        } else {
            String::new()
        };
        let external = if name == "to-other" {
            format!("  externalIPs: [{TO_OTHER_EXTERNAL}]\n")
        } else {
            String::new()
        };
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bank}}\nspec:\n  type: LoadBalancer\n  clusterIP: {vip}\n{external}  ports: [{{name: web, port: 80, protocol: TCP, targetPort: 8080, nodePort: {node_port}}}]\n{outside}"
        ) + &cluster::endpoint_slice(
            "bank",
            &format!("{name}-v4"),
            name,
            &[(backend.addr(false), pod)],
            &[("web", 8080, "TCP")],
        )
    };
    let port = |name: &str, vip: &str, node_port: u16, backend: &Pod, outside: &str| ServicePort {
        namespace: "bank".into(),
        service: name.into(),
        port_name: "web".into(),
        protocol: Proto::Tcp,
        cluster_ip: ip(vip),
        port: 80,
        endpoints: vec![(backend.addr(false), 8080)],
        node_port: Some(node_port),
        external_ips: vec![ip(outside)],
    };
    bank.kube_proxy_with(
        false,
        vec![
            port(
                "to-ledger",
                TO_LEDGER_V4,
                30081,
                &bank.ledger_a,
                TO_LEDGER_LB,
            ),
            port(
                "to-other",
                TO_OTHER_V4,
                30080,
                &bank.other,
                TO_OTHER_EXTERNAL,
            ),
        ],
    );
    // The ledger's stable pods (only ledger-a serves 8080) are what the client may call;
    // the other pod is isolated for ingress and allows nobody.
    // hostPorts: 8089 to ledger-a's 8080, 8088 to the other pod's, as the portmap plugin
    // writes them (DNAT to the pod on the node's own addresses); 8087 to the canary's, bound
    // to the node's address (`hostIP`): the client may not call the canary (not stable),
    // whose ingress allows the client.
    let with_host_port = |yaml: String, pod: &str, host_port: u16, host_ip: Option<&str>| {
        let at = yaml.find(&format!("name: {pod}\n")).unwrap();
        let (head, tail) = yaml.split_at(at);
        let host_ip = host_ip.map_or(String::new(), |ip| format!(", hostIP: {ip}"));
        head.to_string()
            + &tail.replacen(
                "containerPort: 8080, protocol: TCP}",
                &format!("containerPort: 8080, protocol: TCP, hostPort: {host_port}{host_ip}}}"),
                1,
            )
    };
    let yaml = with_host_port(bank.yaml("drop", false), "ledger-a", 8089, None);
    let yaml = with_host_port(yaml, "ledger-canary", 8087, Some("169.254.1.1"));
    let yaml = with_host_port(yaml, "other-0", 8088, None)
        + &node_port_service("to-ledger", TO_LEDGER_V4, 30081, &bank.ledger_a, "ledger-a")
        + &node_port_service("to-other", TO_OTHER_V4, 30080, &bank.other, "other-0");
    for (host_port, pod, to) in [
        (8089, &bank.ledger_a, None),
        (8088, &bank.other, None),
        (8087, &bank.canary, Some(node)),
    ] {
        // Bound to one address, the rule matches that address alone.
        let matching = match to {
            Some(address) => format!("-d {address}"),
            None => "-m addrtype --dst-type LOCAL".into(),
        };
        let rule = format!(
            "-t nat -A PREROUTING {matching} -p tcp --dport {host_port} -j DNAT --to-destination {}:8080",
            pod.addr(false)
        );
        let mut args = vec!["netns", "exec", &bank.lab.node, "iptables", "-w"];
        args.extend(rule.split(' '));
        tollgate_tests::run("ip", &args);
    }
    std::fs::write(agent.cluster_state.join("cluster.yaml"), yaml).unwrap();
    // The NodePorts and hostPorts are written in the reconcile that gives the Service's
    // ClusterIP its identity, before it: once the ClusterIP is allowed, they are in force
    // (the node's address itself was allowed all along).
    wait_for(
        Duration::from_secs(10),
        "the to-ledger Service allowed",
        || {
            (traffic::tcp(&bank.client, ip(TO_LEDGER_V4), 80, 1, FAIL_FAST).echoed == 1)
                .then_some(())
        },
    );
    assert_eq!(
        traffic::tcp(&bank.client, node, 30081, 1, FAIL_FAST).echoed,
        1,
        "the ledger's NodePort"
    );
    // Its load-balancer address is the Service too: allowed (as an address outside the
    // cluster it would be denied, the client's egress allowing no ipBlock).
    assert_eq!(
        traffic::tcp(&bank.client, ip(TO_LEDGER_LB), 80, 1, FAIL_FAST).echoed,
        1,
        "the ledger's load-balancer address"
    );
    let r = traffic::tcp(&bank.client, ip(TO_OTHER_EXTERNAL), 80, 1, FAIL_FAST);
    assert!(!r.connected, "the other's external IP: {r:?}");
    // A call to the node's `port` that leads to the other pod: never connected, dropped at
    // the client's egress (nothing allowed there).
    let dropped_at_client_egress = |port: u16, through: &str| {
        let got = measure(&bank, &agent, "client-0", || {
            let r = traffic::tcp(&bank.client, node, port, 1, FAIL_FAST);
            assert!(
                !r.connected,
                "a pod the client may not call reached through its {through}: {r:?}"
            );
        });
        assert_eq!(got[3], 0, "nothing allowed at the client's egress: {got:?}");
        assert!(got[5] > 0, "dropped at the client's egress: {got:?}");
    };
    dropped_at_client_egress(30080, "NodePort");

    // The hostPorts: the ledger's is allowed (the client may call ledger-a on 8080, and
    // the ledger's ingress sees the client), the other pod's is not.
    assert_eq!(
        traffic::tcp(&bank.client, node, 8089, 1, FAIL_FAST).echoed,
        1,
        "the ledger's hostPort"
    );
    dropped_at_client_egress(8088, "hostPort");
    dropped_at_client_egress(8087, "hostPort on the node's address (hostIP)");
    let named = |flows: &str| {
        flows
            .lines()
            .any(|l| l.contains("\"dst_service\":\"bank/to-other\"") && l.contains("\"dropped\""))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut flows = String::new();
    while Instant::now() < deadline && !named(&flows) {
        std::thread::sleep(Duration::from_millis(100));
        flows = std::fs::read_to_string(&agent.flow_log).unwrap_or_default();
    }
    assert!(named(&flows), "the drop names the Service: {flows}");
}

/// A host-network pod attached on its cgroup, isolated both ways in drop mode, calls the
/// ledger's ClusterIP and serves a Service of its own. Its hook sees its packets past the
/// node's netfilter: a call leaves with the backend's address (kube-proxy's DNAT in OUTPUT)
/// and its answer as a backend with the ClusterIP's (the DNAT undone in POSTROUTING),
/// while what arrives reads as its socket sees it; a listener's SYN-ACK and an unconnected
/// UDP socket's answer name only their local port. Both directions meet as the socket sees
/// them: nothing is dropped, nothing is taken for a spoof.
#[test]
fn a_host_network_pod_calls_and_serves_through_cluster_ips() {
    const METRICS_V4: &str = "10.96.0.70";
    let mut bank = bank("services-host-network");
    let exporter = bank.lab.add_host_pod("exporter");
    let uplink = bank.lab.add_uplink();
    bank.lab.serve(&exporter, &[9100], &[9101]);
    let agent = bank.start("drop");
    // The exporter's Service: its endpoint is the node's address, as a host-network pod's is.
    let ledger = |proto, port, endpoints| ServicePort {
        namespace: "bank".into(),
        service: "ledger".into(),
        port_name: if proto == Proto::Tcp { "web" } else { "dns" }.into(),
        protocol: proto,
        cluster_ip: ip(LEDGER_V4),
        port,
        endpoints,
        node_port: None,
        external_ips: vec![],
    };
    let stable = |port| {
        vec![
            (bank.ledger_a.addr(false), port),
            (
                bank.ledger_b.addr(false),
                if port == 8080 { 8081 } else { port },
            ),
        ]
    };
    kube_proxy::apply(
        &bank.lab.node,
        &[
            ledger(Proto::Tcp, 80, stable(8080)),
            ledger(Proto::Udp, 53, stable(5353)),
            ServicePort {
                namespace: "bank".into(),
                service: "other".into(),
                port_name: "web".into(),
                protocol: Proto::Tcp,
                cluster_ip: ip(OTHER_V4),
                port: 80,
                endpoints: vec![(bank.other.addr(false), 8080)],
                node_port: None,
                external_ips: vec![],
            },
            ServicePort {
                namespace: "bank".into(),
                service: "exporter".into(),
                port_name: "metrics".into(),
                protocol: Proto::Tcp,
                cluster_ip: ip(METRICS_V4),
                port: 80,
                endpoints: vec![(IpAddr::V4(exporter.ipv4), 9100)],
                node_port: None,
                external_ips: vec![],
            },
            ServicePort {
                namespace: "bank".into(),
                service: "exporter".into(),
                port_name: "stats".into(),
                protocol: Proto::Udp,
                cluster_ip: ip(METRICS_V4),
                port: 81,
                endpoints: vec![(IpAddr::V4(exporter.ipv4), 9101)],
                node_port: None,
                external_ips: vec![],
            },
            // The same ports on the Service as on the pod: only the source address differs.
            ServicePort {
                namespace: "bank".into(),
                service: "exporter".into(),
                port_name: "metrics-same".into(),
                protocol: Proto::Tcp,
                cluster_ip: ip(METRICS_V4),
                port: 9100,
                endpoints: vec![(IpAddr::V4(exporter.ipv4), 9100)],
                node_port: None,
                external_ips: vec![],
            },
            ServicePort {
                namespace: "bank".into(),
                service: "exporter".into(),
                port_name: "stats-same".into(),
                protocol: Proto::Udp,
                cluster_ip: ip(METRICS_V4),
                port: 9101,
                endpoints: vec![(IpAddr::V4(exporter.ipv4), 9101)],
                node_port: None,
                external_ips: vec![],
            },
        ],
        "10.1.0.0/24",
        "fd77:1::/64",
    );
    // A NodePort with externalTrafficPolicy Local, reduced to its DNAT: a client outside
    // keeps its address, and the answer leaves from the node port, not the pod's.
    tollgate_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &bank.lab.node,
            "iptables",
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "-i",
            &uplink.iface,
            "-p",
            "tcp",
            "--dport",
            "30100",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{}:9100", exporter.ipv4),
        ],
    );
    let exporter_policy = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: exporter, namespace: bank}\nspec:\n  podSelector: {matchLabels: {app: exporter}}\n  policyTypes: [Ingress, Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: ledger, track: stable}}}]\n    ports: [{port: http}, {port: dns, protocol: UDP}]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 9100}, {port: 9101, protocol: UDP}]\n  - from: [{ipBlock: {cidr: 10.250.0.2/32}}]\n    ports: [{port: 9100}]\n";
    let yaml = bank.yaml("drop", false)
        + &cluster::pod(
            &exporter,
            "bank",
            "exporter-0",
            "{app: exporter}",
            "{}",
            &[],
        )
        + &cluster::service(
            "bank",
            "exporter",
            &[ip(METRICS_V4)],
            "{app: exporter}",
            &[
                ("metrics", 80, "TCP", "9100"),
                ("stats", 81, "UDP", "9101"),
                ("metrics-same", 9100, "TCP", "9100"),
                ("stats-same", 9101, "UDP", "9101"),
            ],
        )
        + &cluster::endpoint_slice(
            "bank",
            "exporter-v4",
            "exporter",
            &[(IpAddr::V4(exporter.ipv4), "exporter-0")],
            &[
                ("metrics", 9100, "TCP"),
                ("stats", 9101, "UDP"),
                ("metrics-same", 9100, "TCP"),
                ("stats-same", 9101, "UDP"),
            ],
        )
        + exporter_policy;
    // Every pod on the lab's node, as the kubelet writes it.
    let yaml = yaml.replace(
        "\nspec:\n  hostNetwork:",
        "\nspec:\n  nodeName: lab-node\n  hostNetwork:",
    );
    agent.apply(&yaml, &["client-0", "ledger-a", "ledger-b", "exporter-0"]);
    assert_eq!(agent.workload("exporter-0").unwrap()["attach"], "cgroup");

    let spoofed = || {
        sample(
            &agent.metrics_text(),
            "tollgate_spoofed_packets_total",
            &[("pod", "exporter-0")],
        )
        .unwrap_or(0.0)
    };
    let spoofed_before = spoofed();
    let [got] = agent::measure(&bank.lab, &agent, ["exporter-0"], || {
        // Its calls: TCP spread over both stable backends, UDP to the `dns` port.
        for _ in 0..8 {
            let r = traffic::tcp(&exporter, ip(LEDGER_V4), 80, 2, PATIENT);
            assert_eq!(r.echoed, 2, "exporter to the ledger's ClusterIP: {r:?}");
        }
        let r = traffic::udp(&exporter, ip(LEDGER_V4), 53, 3, 64, PATIENT);
        assert_eq!(r.echoed, 3, "UDP to the ledger's ClusterIP: {r:?}");
        // A Service whose backend its egress does not name, on its node: the node's own
        // traffic, as directly.
        let r = traffic::tcp(&exporter, ip(OTHER_V4), 80, 2, PATIENT);
        assert_eq!(
            r.echoed, 2,
            "exporter to the other Service, on its node: {r:?}"
        );
        // Called: the client through the exporter's ClusterIP.
        for _ in 0..4 {
            let r = traffic::tcp(&bank.client, ip(METRICS_V4), 80, 2, PATIENT);
            assert_eq!(r.echoed, 2, "client to the exporter's ClusterIP: {r:?}");
        }
        // Answered from an unconnected UDP socket.
        for port in [81, 9101] {
            let r = traffic::udp(&bank.client, ip(METRICS_V4), port, 3, 64, PATIENT);
            assert_eq!(
                r.echoed, 3,
                "UDP to the exporter's ClusterIP, {port}: {r:?}"
            );
        }
        let r = traffic::tcp(&bank.client, ip(METRICS_V4), 9100, 2, PATIENT);
        assert_eq!(r.echoed, 2, "the exporter's ClusterIP on 9100: {r:?}");
        // From another node through the node port: allowed by its ipBlock, answered though
        // the exporter's egress allows only the ledger.
        let r = traffic::tcp(&uplink.far, IpAddr::V4(uplink.ipv4), 30100, 2, PATIENT);
        assert_eq!(r.echoed, 2, "the node port from outside: {r:?}");
    });
    assert_eq!(
        (got[1], got[2], got[4], got[5]),
        (0, 0, 0, 0),
        "nothing denied at the exporter: {got:?}"
    );
    assert!(got[0] > 0 && got[3] > 0, "{got:?}");
    assert_eq!(
        spoofed(),
        spoofed_before,
        "an answer as a backend is no spoof"
    );

    // What the socket says never vouches for what a packet carries: a connected UDP
    // socket's `sendto` elsewhere is decided where it goes (another node, which the
    // exporter's egress does not allow), and a raw socket connected to an allowed Service
    // writes a header with the exporter's Service as its source: a spoof.
    let ledger_dns = SocketAddr::new(ip(LEDGER_V4), 53);
    let far = IpAddr::V4(uplink.far.ipv4);
    let r = traffic::udp_from(
        &exporter,
        bank.ledger_a.addr(false),
        5353,
        1,
        64,
        PATIENT,
        Some(255),
    );
    assert_eq!(r.echoed, 1, "{r:?}");
    let [abuse] = agent::measure(&bank.lab, &agent, ["exporter-0"], || {
        let r = traffic::udp_past_peer(&exporter, ledger_dns, far, 7777, 3);
        assert_eq!(r.sent, 0, "each sendto refused at the cgroup hook: {r:?}");
        let forged = packets::ipv4_udp(
            METRICS_V4.parse().unwrap(),
            uplink.far.ipv4,
            80,
            7777,
            b"forged",
        );
        let r = traffic::raw_connected(&exporter, ledger_dns, &[forged], 1);
        assert_eq!(r.sent, 0, "refused at the cgroup hook: {r:?}");
        // A raw socket's port is its protocol (255): a flow tracked from that port to a
        // ledger pod (just before) does not make another pod's address an answer's source.
        let forged = packets::ipv4_udp(bank.client.ipv4, bank.ledger_a.ipv4, 4444, 5353, b"forged");
        let r = traffic::raw(&exporter, &[forged], 1);
        assert_eq!(r.sent, 0, "another pod's address, refused: {r:?}");
    });
    assert_eq!((abuse[0], abuse[3], abuse[4]), (0, 0, 0), "{abuse:?}");
    assert!(
        abuse[5] >= 3,
        "the datagrams past the peer dropped: {abuse:?}"
    );
    assert_eq!(
        spoofed() - spoofed_before,
        2.0,
        "the forged sources are spoofs"
    );
}

/// A Service whose hand-written EndpointSlice points outside the cluster is the outside for
/// a workload an EgressAllowlist selects: kube-proxy's DNAT would take the connection there,
/// past the allowlist, if the Service's address were decided as inside the cluster.
#[test]
fn a_service_pointing_outside_the_cluster_is_the_outside_for_an_allowlisted_workload() {
    const VENDOR_V4: &str = "10.96.0.70";
    let mut bank = bank("service-outside");
    let site = bank.lab.add_outside("vendor");
    bank.lab.serve(&site, &[443], &[]);
    let site_ip = IpAddr::V4(site.ipv4);
    bank.kube_proxy_with(
        false,
        vec![ServicePort {
            namespace: "bank".into(),
            service: "vendor".into(),
            port_name: "".into(),
            protocol: Proto::Tcp,
            cluster_ip: ip(VENDOR_V4),
            port: 443,
            endpoints: vec![(site_ip, 443)],
            node_port: None,
            external_ips: vec![],
        }],
    );
    let mut agent = Agent::start(
        &bank.lab,
        &bank.dir,
        &["--cgroup-root", bank.lab.cgroup_dir.to_str().unwrap()],
    );
    agent.wait_ready();
    // bank/other: selected by an allowlist (and by no egress policy); the canary by none.
    let vendor = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: vendor, namespace: bank}}\nspec: {{clusterIP: {VENDOR_V4}, ports: [{{port: 443}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: vendor-1, namespace: bank, labels: {{kubernetes.io/service-name: vendor}}}}\naddressType: IPv4\nendpoints: [{{addresses: ['{site_ip}']}}]\nports: [{{name: '', port: 443, protocol: TCP}}]\n---\napiVersion: tollgate.io/v1alpha1\nkind: EgressAllowlist\nmetadata: {{name: other-egress, namespace: bank}}\nspec:\n  podSelector: {{matchLabels: {{app: other}}}}\n  egress: [{{domains: [api.example.com], ports: [{{port: 443}}]}}]\n"
    );
    agent.apply(
        &(bank.yaml("drop", false) + &vendor),
        &[
            "client-0",
            "ledger-a",
            "ledger-b",
            "ledger-canary",
            "other-0",
        ],
    );

    // The DNAT to the outside works: the canary, which no allowlist selects, gets through.
    let r = traffic::tcp(&bank.canary, ip(VENDOR_V4), 443, 1, PATIENT);
    assert_eq!(r.echoed, 1, "{r:?}");

    // bank/other may not reach it: dropped at its egress, in drop mode.
    let got = measure(&bank, &agent, "other-0", || {
        let r = traffic::tcp(&bank.other, ip(VENDOR_V4), 443, 1, FAIL_FAST);
        assert!(!r.connected, "{r:?}");
    });
    assert!(
        got[5] >= 1 && got[3] == 0,
        "dropped at its egress, none allowed: {got:?}"
    );
    let record = wait_for(Duration::from_secs(5), "the flow log record", || {
        agent
            .flow_records()
            .into_iter()
            .find(|r| r["dst_ip"] == VENDOR_V4 && r["src"]["pod"] == "other-0")
    });
    assert_eq!(record["verdict"], "dropped", "{record}");
    assert_eq!(record["dst_service"], "bank/vendor", "{record}");
    assert!(
        record["policies"].to_string().contains("bank/other-egress"),
        "{record}"
    );

    // `tollgate check` agrees, and says what would allow it.
    let answers = agent.check(&format!(
        "bank/other-0 {VENDOR_V4} 443/tcp\nbank/ledger-canary {VENDOR_V4} 443/tcp\n"
    ));
    assert_eq!(answers[0]["egress"], "denied", "{:?}", answers[0]);
    assert!(
        answers[0]["explanation"]
            .as_str()
            .is_some_and(|e| e.contains(&site_ip.to_string())),
        "{:?}",
        answers[0]
    );
    assert_eq!(answers[1]["verdict"], "allowed", "{:?}", answers[1]);
}
