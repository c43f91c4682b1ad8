//! Traffic between two network-namespace workloads over veth, side by side in one run:
//! no program, Tollgate in log and in drop mode with a 9,300-connection policy set, an
//! iptables rule set built the way Calico (plus calico-accountant) does the job, and
//! nftables with sets. Every figure is a ratio to the no-program baseline of the same run.

use std::{fmt::Write as _, net::Ipv4Addr, process::Command, time::Duration};

use agent_common::PROTO_TCP;
use ipnet::IpNet;
use serde::Serialize;
use tollgate::{
    Datapath, Mode, WorkloadPolicy,
    attach::TcMode,
    compile::{AllowRule, Peer, PortMatch},
};

use crate::{Lab, Pod, support::attach_tc};

/// One configuration's figures (medians over the runs).
#[derive(Clone, Debug, Serialize)]
pub struct NetFigure {
    pub config: String,
    pub rules: usize,
    pub tcp_gbps: Option<f64>,
    pub udp_kpps: Option<f64>,
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
    pub new_connections_per_s: f64,
    /// Each metric's (min, max) over the runs, in the same order.
    pub spread: Vec<(String, f64, f64)>,
}

struct Samples {
    tcp: Vec<f64>,
    udp: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    crr: Vec<f64>,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(s[s.len() / 2])
}

fn spread(name: &str, v: &[f64]) -> Option<(String, f64, f64)> {
    let min = v.iter().copied().reduce(f64::min)?;
    let max = v.iter().copied().reduce(f64::max)?;
    Some((name.into(), min, max))
}

fn json_of(pod: &Pod, program: &str, args: &[&str]) -> serde_json::Value {
    let out = pod.command(program).args(args).output().expect(program);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{program} {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn tcp_gbps(client: &Pod, server: &Pod) -> f64 {
    let v = json_of(
        client,
        "iperf3",
        &["-c", &server.ipv4.to_string(), "-t", "2", "-J"],
    );
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

fn udp_kpps(client: &Pod, server: &Pod) -> f64 {
    let v = json_of(
        client,
        "iperf3",
        &[
            "-c",
            &server.ipv4.to_string(),
            "-u",
            "-b",
            "0",
            "-l",
            "64",
            "-t",
            "2",
            "-J",
        ],
    );
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(2.0).max(0.1);
    (packets - lost) / seconds / 1000.0
}

fn latency_us(client: &Pod, server: &Pod) -> (f64, f64) {
    let out = client
        .command("sockperf")
        .args([
            "ping-pong",
            "-i",
            &server.ipv4.to_string(),
            "-p",
            "11111",
            "-t",
            "2",
            "-m",
            "64",
        ])
        .output()
        .expect("sockperf");
    let text = String::from_utf8_lossy(&out.stdout);
    let pct = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p}")))
            .and_then(|l| l.rsplit('=').next()?.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (pct("50.000"), pct("99.000"))
}

fn crr(client: &Pod, server: &Pod) -> f64 {
    let v = json_of(
        client,
        crate::traffic::helper(),
        &[
            "crr",
            "--to",
            &server.ipv4.to_string(),
            "--port",
            "80",
            "--seconds",
            "2",
        ],
    );
    v["per_second"].as_f64().unwrap_or(0.0)
}

/// Addresses of the peers of the policy set other than the client: 10.200.x.y.
fn fake_peer(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250) as u8 + 1)
}

/// The rule set as Calico renders policy for one workload: a chain per workload and
/// direction, a counted rule per allowed peer (calico-accountant reads those counters), the
/// client's rule last (the worst case of a linear chain), conntrack accepting what is
/// established.
fn iptables_rules(lab: &Lab, client: &Pod, server: &Pod, rules: usize) -> String {
    let mut r = String::from("*filter\n:tg-to-b - [0:0]\n:tg-from-a - [0:0]\n");
    r += "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    writeln!(r, "-A FORWARD -o {} -j tg-to-b", server.host_if).unwrap();
    writeln!(r, "-A FORWARD -i {} -j tg-from-a", client.host_if).unwrap();
    for i in 0..rules.saturating_sub(1) {
        writeln!(r, "-A tg-to-b -s {}/32 -p tcp -j ACCEPT", fake_peer(i)).unwrap();
        writeln!(r, "-A tg-from-a -d {}/32 -p tcp -j ACCEPT", fake_peer(i)).unwrap();
    }
    writeln!(r, "-A tg-to-b -s {}/32 -j ACCEPT", client.ipv4).unwrap();
    writeln!(r, "-A tg-from-a -d {}/32 -j ACCEPT", server.ipv4).unwrap();
    r += "-A tg-to-b -j DROP\n-A tg-from-a -j DROP\nCOMMIT\n";
    let _ = lab;
    r
}

fn nft_rules(client: &Pod, server: &Pod, rules: usize) -> String {
    let peers = |last: Ipv4Addr| {
        (0..rules.saturating_sub(1))
            .map(|i| fake_peer(i).to_string())
            .chain(std::iter::once(last.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "table inet tg {{\n  set to_b {{ type ipv4_addr; elements = {{ {} }} }}\n  set from_a {{ type ipv4_addr; elements = {{ {} }} }}\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    ct state established,related accept\n    oifname \"{}\" ip saddr @to_b counter accept\n    oifname \"{}\" drop\n    iifname \"{}\" ip daddr @from_a counter accept\n    iifname \"{}\" drop\n  }}\n}}\n",
        peers(client.ipv4),
        peers(server.ipv4),
        server.host_if,
        server.host_if,
        client.host_if,
        client.host_if
    )
}

fn in_node(lab: &Lab, program: &str, args: &[&str], stdin: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.node, program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect(program);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{program} {args:?}");
}

/// Tollgate's policy: each workload isolated both ways, `rules` allowed peers each (the
/// client among them), TCP and UDP on every port the benchmark uses.
fn tollgate_policy(mode: Mode, peer_identity: u32, rules: usize, own: &Pod) -> WorkloadPolicy {
    let mut allow: Vec<AllowRule> = (0..rules.saturating_sub(1))
        .map(|i| AllowRule {
            peer: Peer::Identity(1000 + i as u32),
            ports: PortMatch::Protocol(PROTO_TCP),
            rule_id: 0,
        })
        .collect();
    allow.push(AllowRule {
        peer: Peer::Identity(peer_identity),
        ports: PortMatch::Any,
        rule_id: 0,
    });
    WorkloadPolicy {
        mode,
        isolated_ingress: true,
        isolated_egress: true,
        ingress: allow.clone(),
        egress: allow,
        ..WorkloadPolicy::default()
    }
    .sending_from(&own.addrs())
}

enum Config {
    Baseline,
    Tollgate(Mode, usize),
    Iptables(usize),
    Nftables(usize),
}

impl Config {
    fn name(&self) -> String {
        match self {
            Config::Baseline => "no program".into(),
            Config::Tollgate(Mode::Log, _) => "Tollgate, log mode".into(),
            Config::Tollgate(Mode::Drop, _) => "Tollgate, drop mode".into(),
            Config::Iptables(_) => "iptables (Calico-style chains, counted rule per peer)".into(),
            Config::Nftables(_) => "nftables with sets".into(),
        }
    }
    fn rules(&self) -> usize {
        match self {
            Config::Baseline => 0,
            Config::Tollgate(_, n) | Config::Iptables(n) | Config::Nftables(n) => *n,
        }
    }
}

/// Runs the traffic benchmark.
pub fn run(runs: usize) -> Vec<NetFigure> {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    lab.serve(&b, &[80], &[]);
    lab.spawn_background(&b, "iperf3", &["-s"]);
    lab.spawn_background(
        &b,
        "sockperf",
        &["server", "-i", &b.ipv4.to_string(), "-p", "11111"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut dp: Datapath = lab.datapath(TcMode::Auto);
    let (id_a, id_b) = (300u32, 301u32);
    for (pod, id) in [(&a, id_a), (&b, id_b)] {
        for ip in [
            std::net::IpAddr::V4(pod.ipv4),
            std::net::IpAddr::V6(pod.ipv6),
        ] {
            dp.maps.set_identity(IpNet::from(ip), id).unwrap();
        }
    }
    let configs = [
        Config::Baseline,
        Config::Tollgate(Mode::Log, 9300),
        Config::Tollgate(Mode::Drop, 9300),
        Config::Iptables(9300),
        Config::Nftables(9300),
        Config::Tollgate(Mode::Drop, 10),
        Config::Tollgate(Mode::Drop, 1000),
        Config::Iptables(10),
        Config::Iptables(1000),
    ];
    let mut samples: Vec<Samples> = configs
        .iter()
        .map(|_| Samples {
            tcp: vec![],
            udp: vec![],
            p50: vec![],
            p99: vec![],
            crr: vec![],
        })
        .collect();
    for run in 0..runs.max(1) {
        for (i, config) in configs.iter().enumerate() {
            // Set up.
            match config {
                Config::Baseline => {}
                Config::Tollgate(mode, rules) => {
                    dp.maps
                        .set_workload(1, &tollgate_policy(*mode, id_b, *rules, &a))
                        .unwrap();
                    dp.maps
                        .set_workload(2, &tollgate_policy(*mode, id_a, *rules, &b))
                        .unwrap();
                    attach_tc(&lab, &mut dp, 1, &a);
                    attach_tc(&lab, &mut dp, 2, &b);
                }
                Config::Iptables(rules) => in_node(
                    &lab,
                    "iptables-restore",
                    &[],
                    &iptables_rules(&lab, &a, &b, *rules),
                ),
                Config::Nftables(rules) => {
                    in_node(&lab, "nft", &["-f", "-"], &nft_rules(&a, &b, *rules))
                }
            }
            let full = i < 5;
            let s = &mut samples[i];
            s.crr.push(crr(&a, &b));
            if full {
                s.tcp.push(tcp_gbps(&a, &b));
                s.udp.push(udp_kpps(&a, &b));
                let (p50, p99) = latency_us(&a, &b);
                s.p50.push(p50);
                s.p99.push(p99);
            }
            eprintln!(
                "run {run} {:<55} rules {:>5}: crr {:.0}/s{}",
                config.name(),
                config.rules(),
                s.crr.last().unwrap(),
                if full {
                    format!(
                        ", tcp {:.2} Gbit/s, udp {:.0} kpps, p50 {:.1} us, p99 {:.1} us",
                        s.tcp.last().unwrap(),
                        s.udp.last().unwrap(),
                        s.p50.last().unwrap(),
                        s.p99.last().unwrap()
                    )
                } else {
                    String::new()
                }
            );
            // Tear down.
            match config {
                Config::Baseline => {}
                Config::Tollgate(..) => {
                    lab.in_node(|| {
                        dp.detach(1).unwrap();
                        dp.detach(2).unwrap();
                    });
                    dp.maps.clear_workload(1).unwrap();
                    dp.maps.clear_workload(2).unwrap();
                }
                Config::Iptables(_) => {
                    in_node(
                        &lab,
                        "iptables-restore",
                        &[],
                        "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n",
                    );
                    in_node(&lab, "iptables", &["-X"], "");
                }
                Config::Nftables(_) => in_node(&lab, "nft", &["delete", "table", "inet", "tg"], ""),
            }
        }
    }
    let figures = configs
        .iter()
        .zip(&samples)
        .map(|(c, s)| NetFigure {
            config: c.name(),
            rules: c.rules(),
            tcp_gbps: median(&s.tcp),
            udp_kpps: median(&s.udp),
            latency_p50_us: median(&s.p50),
            latency_p99_us: median(&s.p99),
            new_connections_per_s: median(&s.crr).unwrap_or(0.0),
            spread: [
                spread("tcp_gbps", &s.tcp),
                spread("udp_kpps", &s.udp),
                spread("latency_p50_us", &s.p50),
                spread("latency_p99_us", &s.p99),
                spread("new_connections_per_s", &s.crr),
            ]
            .into_iter()
            .flatten()
            .collect(),
        })
        .collect();
    lab.in_node(|| dp.remove()).unwrap();
    figures
}
