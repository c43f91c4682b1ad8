//! Traffic between two network-namespace workloads over veth, side by side in one run:
//! no program, Tollgate in log and in drop mode with a 9,300-connection policy set, an
//! iptables rule set built the way Calico (plus calico-accountant) does the job, and
//! nftables with sets. Every figure is a ratio to the no-program baseline of the same run.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use agent_common::{
    DIR_EGRESS, DIR_INGRESS, FlowCounterKey, PROTO_TCP, PROTO_UDP, VERDICT_ALLOWED,
    VERDICT_DROPPED, VERDICT_WOULD_DROP, diag,
};
use ipnet::IpNet;
use serde::Serialize;
use tollgate::{
    Datapath, Mode, WorkloadPolicy,
    attach::TcMode,
    compile::{AllowRule, Peer, PortMatch},
};

use crate::{Lab, Pod, support::attach_tc};

/// One configuration's figures: medians of its samples, and medians of the ratios of each
/// sample to the no-program sample taken right beside it.
#[derive(Clone, Debug, Serialize)]
pub struct NetFigure {
    pub config: String,
    pub rules: usize,
    pub tcp_gbps: Option<f64>,
    pub udp_kpps: Option<f64>,
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
    pub new_connections_per_s: f64,
    /// Median over the pairs of this configuration's sample / the no-program sample beside
    /// it (1.0 for the baseline itself).
    pub tcp_ratio: Option<f64>,
    pub udp_ratio: Option<f64>,
    pub new_connections_ratio: Option<f64>,
    /// 95% confidence intervals of the two ratios' medians (`median_interval`): a goal
    /// inside one is neither met nor missed by this run.
    pub tcp_ratio_interval: Option<(f64, f64)>,
    pub new_connections_ratio_interval: Option<(f64, f64)>,
    /// Median over the pairs of this configuration's p99 minus the no-program p99 beside it.
    pub p99_added_us: Option<f64>,
    /// The no-program p99's own noise: the interquartile range of its samples.
    pub p99_noise_us: Option<f64>,
    /// Tollgate's programs during the TCP samples (kernel BPF run-time statistics): their
    /// run time as a share of the CPU time the machine had (wall time x CPUs), and per run.
    pub tcp_program_cpu_share: Option<f64>,
    pub tcp_program_ns_per_run: Option<f64>,
    /// The same during the new-connection samples.
    pub crr_program_cpu_share: Option<f64>,
    pub crr_program_ns_per_run: Option<f64>,
    /// Tollgate's own counts over the configuration's samples.
    pub checks: Option<Checks>,
    /// Each metric's and ratio's (min, max) over the samples.
    pub spread: Vec<(String, f64, f64)>,
}

/// What Tollgate counted over a configuration's samples, which must hold for its figures to
/// be those of allowed traffic tracked as the agent tracks it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Checks {
    /// Packets of both workloads counted as dropped or would-drop: 0, as the load is
    /// allowed traffic.
    pub denied: u64,
    /// New flows tracked in the overflow table (`tollgate_datapath_diagnostics{reason="ct_overflow"}`): 0
    /// while each workload holds no more than its share.
    pub overflowed: u64,
}

/// What one sample measures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Tcp,
    Udp,
    Latency,
    NewConnections,
}

/// One sample: throughput, packet rate, (p50, p99) or connections per second.
#[derive(Clone, Copy)]
enum Sample {
    Value(f64),
    Latency(f64, f64),
}

impl Sample {
    fn value(self) -> f64 {
        match self {
            Sample::Value(v) => v,
            Sample::Latency(_, p99) => p99,
        }
    }
}

/// Samples of one metric for one configuration, each with the no-program sample taken
/// beside it.
#[derive(Default)]
struct Pairs {
    config: Vec<Sample>,
    baseline: Vec<Sample>,
    /// What Tollgate's programs ran during the configuration's samples.
    programs: ProgramTime,
}

/// Run time and runs of Tollgate's programs over some samples, and the samples' wall time.
#[derive(Clone, Copy, Default)]
struct ProgramTime {
    run_ns: u64,
    runs: u64,
    wall_ns: u64,
}

impl ProgramTime {
    /// Share of the machine's CPU time (wall time x CPUs) the programs took.
    fn cpu_share(&self) -> Option<f64> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        (self.runs > 0).then(|| self.run_ns as f64 / (self.wall_ns as f64 * cpus))
    }
    fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_ns as f64 / self.runs as f64)
    }
}

/// Total run time (ns) and runs of the TC programs loaded now, from the kernel's BPF
/// statistics (counted while `aya::sys::enable_stats` is held).
fn tc_program_stats() -> (u64, u64) {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| {
            matches!(
                p.name_as_str(),
                Some("tc_from_pod" | "tc_to_pod" | "tc_baseline")
            )
        })
        .fold((0, 0), |(t, n), p| {
            (t + p.run_time().as_nanos() as u64, n + p.run_count())
        })
}

impl Pairs {
    fn values(v: &[Sample]) -> Vec<f64> {
        v.iter().map(|s| s.value()).collect()
    }
    fn p50s(v: &[Sample]) -> Vec<f64> {
        v.iter()
            .filter_map(|s| match s {
                Sample::Latency(p50, _) => Some(*p50),
                Sample::Value(_) => None,
            })
            .collect()
    }
    fn ratios(&self) -> Vec<f64> {
        self.config
            .iter()
            .zip(&self.baseline)
            .filter(|(_, b)| b.value() > 0.0)
            .map(|(c, b)| c.value() / b.value())
            .collect()
    }
    fn differences(&self) -> Vec<f64> {
        self.config
            .iter()
            .zip(&self.baseline)
            .map(|(c, b)| c.value() - b.value())
            .collect()
    }
}

/// Length of one sample, in seconds.
pub const SAMPLE_SECONDS: &str = "1";

/// The middle sample (the upper one of an even count).
fn median(v: &[f64]) -> Option<f64> {
    quantile(v, 0.5)
}

/// The value below which `q` of the samples lie (nearest rank).
fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((s.len() - 1) as f64 * q).round() as usize;
    Some(s[rank])
}

/// A 95% confidence interval of the median of `v`, from the order statistics (no
/// assumption on the samples' distribution, only that they are independent): the samples of
/// ranks j and n + 1 - j, for the largest j with P(Binomial(n, 1/2) < j) <= 2.5%. None for
/// fewer than 6 samples, too few for any interval at that level.
pub fn median_interval(v: &[f64]) -> Option<(f64, f64)> {
    let n = v.len();
    // P(X = i) for X ~ Binomial(n, 1/2), summed from i = 0 while it stays within 2.5%.
    let (mut below, mut p, mut j) = (0.0f64, 0.5f64.powi(n as i32), 0usize);
    while j < n / 2 && below + p <= 0.025 {
        below += p;
        p = p * (n - j) as f64 / (j + 1) as f64;
        j += 1;
    }
    if j == 0 {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some((s[j - 1], s[n - j]))
}

fn spread(name: &str, v: &[f64]) -> Option<(String, f64, f64)> {
    let min = v.iter().copied().reduce(f64::min)?;
    let max = v.iter().copied().reduce(f64::max)?;
    Some((name.into(), min, max))
}

/// The CPU the client's processes run on, and the server's: pinned, so that neither the
/// scheduler's placement (sharing a CPU or not) nor its moves land in one sample and not the
/// one beside it. The packets' softirq work, the programs included, runs on the sender's
/// CPU (veth hands a packet to the backlog of the CPU that sent it).
const CLIENT_CPU: &str = "0";
const SERVER_CPU: &str = "1";

/// A command in `pod`, pinned to `cpu` (`taskset`); its program is the first argument.
fn pinned(pod: &Pod, cpu: &str) -> Command {
    let mut cmd = pod.command("taskset");
    cmd.args(["-c", cpu]);
    cmd
}

/// One sample of a metric sampled whole: a one-second test from its start.
fn whole_sample(metric: Metric, a: &Pod, b: &Pod) -> Sample {
    match metric {
        Metric::Udp => Sample::Value(udp_kpps(a, b)),
        Metric::Latency => {
            let (p50, p99) = latency_us(a, b);
            Sample::Latency(p50, p99)
        }
        Metric::Tcp | Metric::NewConnections => unreachable!("measured in windows"),
    }
}

/// A load that runs in the client until it is stopped, for the metrics measured in
/// windows: one TCP stream, or connections back to back.
fn start_load(metric: Metric, client: &Pod, server: &Pod) -> std::process::Child {
    let to = server.ipv4.to_string();
    let mut cmd = pinned(client, CLIENT_CPU);
    match metric {
        Metric::Tcp => cmd.args(["iperf3", "-c", &to, "-t", "3600"]),
        Metric::NewConnections => cmd
            .args([crate::traffic::helper(), "crr", "--to", &to])
            .args(["--port", "80", "--seconds", "3600"]),
        Metric::Udp | Metric::Latency => unreachable!("sampled whole"),
    };
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the load")
}

/// Stops a load with SIGTERM (iperf3 then ends its test with the server cleanly; SIGINT
/// would do nothing when the benchmark was started in the background, which ignores it),
/// killing it if it has not gone within 5 s.
fn stop_load(mut load: std::process::Child) {
    // SAFETY: signalling a child we spawned and have not reaped.
    unsafe { libc::kill(load.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while load.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = load.kill();
            let _ = load.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // iperf3's server takes a moment before it accepts the next test.
    std::thread::sleep(Duration::from_millis(300));
}

/// What the server's namespace has received so far of what `metric` measures: bytes on its
/// interfaces (TCP) or connections accepted.
fn server_count(metric: Metric, server: &Pod) -> u64 {
    let _ns = crate::NetNsGuard::enter(&server.netns);
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
            .unwrap_or_else(|e| panic!("read /proc/net/{file}: {e}"))
    };
    // /proc/net/snmp: a header line of names, then a line of values, per protocol.
    let snmp = |protocol: &str, field: &str| {
        let text = read("snmp");
        let mut lines = text
            .lines()
            .filter(|l| l.starts_with(&format!("{protocol}: ")));
        let (names, values) = (
            lines.next().expect("snmp names"),
            lines.next().expect("snmp values"),
        );
        let i = names
            .split_whitespace()
            .position(|n| n == field)
            .expect(field);
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .expect(field)
    };
    match metric {
        Metric::Tcp => read("dev")
            .lines()
            .skip(2)
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.trim() != "lo")
            .filter_map(|(_, v)| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
        Metric::NewConnections => snmp("Tcp", "PassiveOpens"),
        Metric::Udp | Metric::Latency => unreachable!("sampled whole"),
    }
}

/// `metric`'s rate over `window`, in the unit the report gives (Gbit/s, per second).
fn rate_over(metric: Metric, server: &Pod, window: Duration) -> f64 {
    let (before, started) = (server_count(metric, server), Instant::now());
    std::thread::sleep(window);
    let (after, seconds) = (
        server_count(metric, server),
        started.elapsed().as_secs_f64(),
    );
    let per_second = after.saturating_sub(before) as f64 / seconds;
    match metric {
        Metric::Tcp => per_second * 8.0 / 1e9,
        _ => per_second,
    }
}

/// Length of one window of a load measured in windows.
pub const WINDOW: Duration = Duration::from_millis(500);
/// Length of the window in which the programs' run time is counted.
pub const STATS_WINDOW: Duration = Duration::from_secs(1);
/// Time a window waits after the configuration changed, before it counts.
pub const SETTLE: Duration = Duration::from_millis(100);

/// Measures `metric` in windows of one running load, the configuration set up and taken
/// down in turn: `pairs` pairs of adjacent windows, in turn first (so a trend weighs on
/// both sides alike). One stream from start to end, so no window holds a test's start (TCP's
/// slow start, process start-up), and a pair's two windows are a fraction of a second apart.
/// Then, for Tollgate and the empty program, the programs' run time over a window with the
/// kernel's BPF run-time statistics on: they cost two clock reads per run, so the windows of
/// the ratios are taken without them.
fn measure_in_windows(
    setup: &mut Setup,
    config: &Config,
    metric: Metric,
    pairs: usize,
    into: &mut Pairs,
) {
    let (a, b) = (setup.a.clone(), setup.b.clone());
    let load = start_load(metric, &a, &b);
    // The load has started when the server counts it.
    crate::wait_for(Duration::from_secs(10), "the load to start", || {
        (rate_over(metric, &b, Duration::from_millis(100)) > 0.0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    for k in 0..pairs {
        let config_first = k % 2 == 0;
        for config_turn in [config_first, !config_first] {
            if config_turn {
                apply(setup, config, true);
                std::thread::sleep(SETTLE);
                into.config
                    .push(Sample::Value(rate_over(metric, &b, WINDOW)));
                apply(setup, config, false);
            } else {
                std::thread::sleep(SETTLE);
                into.baseline
                    .push(Sample::Value(rate_over(metric, &b, WINDOW)));
            }
        }
    }
    if matches!(config, Config::Tollgate(..) | Config::EmptyProgram) {
        apply(setup, config, true);
        std::thread::sleep(SETTLE);
        // The kernel counts programs' run time only while someone holds this.
        let stats =
            aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF run-time statistics");
        let (time_before, runs_before) = tc_program_stats();
        let started = Instant::now();
        std::thread::sleep(STATS_WINDOW);
        let wall = started.elapsed();
        let (time_after, runs_after) = tc_program_stats();
        drop(stats);
        apply(setup, config, false);
        into.programs.run_ns += time_after.saturating_sub(time_before);
        into.programs.runs += runs_after.saturating_sub(runs_before);
        into.programs.wall_ns += wall.as_nanos() as u64;
    }
    stop_load(load);
}

fn json_of(pod: &Pod, program: &str, args: &[&str]) -> serde_json::Value {
    let out = pinned(pod, CLIENT_CPU)
        .arg(program)
        .args(args)
        .output()
        .expect(program);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{program} {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
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
            SAMPLE_SECONDS,
            "-J",
        ],
    );
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(1.0).max(0.1);
    (packets - lost) / seconds / 1000.0
}

fn latency_us(client: &Pod, server: &Pod) -> (f64, f64) {
    let out = pinned(client, CLIENT_CPU)
        .args([
            "sockperf",
            "ping-pong",
            "-i",
            &server.ipv4.to_string(),
            "-p",
            "11111",
            "-t",
            SAMPLE_SECONDS,
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
    /// `tc_baseline`, an empty program, where Tollgate's go: the hook's own cost.
    EmptyProgram,
    Tollgate(Mode, usize),
    Iptables(usize),
    Nftables(usize),
}

impl Config {
    fn name(&self) -> String {
        match self {
            Config::Baseline => "no program".into(),
            Config::EmptyProgram => "empty TC program".into(),
            Config::Tollgate(Mode::Log, _) => "Tollgate, log mode".into(),
            Config::Tollgate(Mode::Drop, _) => "Tollgate, drop mode".into(),
            Config::Iptables(_) => "iptables (Calico-style chains, counted rule per peer)".into(),
            Config::Nftables(_) => "nftables with sets".into(),
        }
    }
    fn rules(&self) -> usize {
        match self {
            Config::Baseline | Config::EmptyProgram => 0,
            Config::Tollgate(_, n) | Config::Iptables(n) | Config::Nftables(n) => *n,
        }
    }
}

/// Gives the benchmark's peer pairs (each slot with its `peer`, flows opened in `origin`)
/// direct-mapped flow series buckets, both directions, every port the benchmark uses: the
/// steady state the agent arranges at its next poll after seeing a pair (`Observer::poll`).
fn give_flow_series_buckets(dp: &mut Datapath, sides: [(u32, u32, u8); 2]) {
    // iperf3 (TCP control and data, UDP data), sockperf (UDP), the HTTP server (TCP).
    let services = [
        (PROTO_TCP, 5201),
        (PROTO_UDP, 5201),
        (PROTO_UDP, 11111),
        (PROTO_TCP, 80),
    ];
    for (slot, peer, origin) in sides {
        for (proto, port) in services {
            for direction in [DIR_EGRESS, DIR_INGRESS] {
                let series = FlowCounterKey {
                    slot,
                    peer,
                    port,
                    proto,
                    direction,
                    verdict: VERDICT_ALLOWED,
                    origin,
                    _pad: [0; 2],
                };
                dp.maps
                    .assign_flow_series(&series, |_| false)
                    .unwrap()
                    .expect("a free flow series bucket");
            }
        }
    }
}

/// The lab of the traffic benchmark: client `a`, server `b`, the datapath, and the empty
/// program's links while that configuration is up.
struct Setup {
    lab: Lab,
    dp: Datapath,
    a: Pod,
    b: Pod,
    empty_program: Vec<aya::programs::links::FdLink>,
}

/// Sets a configuration up (`up`) or takes it down (after it ran).
fn apply(setup: &mut Setup, config: &Config, up: bool) {
    let Setup {
        lab,
        dp,
        a,
        b,
        empty_program,
    } = setup;
    match (config, up) {
        (Config::Baseline, _) => {}
        (Config::EmptyProgram, true) => lab.in_node(|| {
            for pod in [&*a, &*b] {
                empty_program.extend(
                    dp.attach_empty_tc(&pod.host_if)
                        .expect("attach tc_baseline"),
                );
            }
        }),
        (Config::EmptyProgram, false) => empty_program.clear(),
        // The maps are written once per configuration; a sample attaches and detaches.
        (Config::Tollgate(..), true) => {
            attach_tc(lab, dp, 1, a);
            attach_tc(lab, dp, 2, b);
        }
        (Config::Tollgate(..), false) => lab.in_node(|| {
            dp.detach(1).unwrap();
            dp.detach(2).unwrap();
        }),
        (Config::Iptables(rules), true) => in_node(
            lab,
            "iptables-restore",
            &[],
            &iptables_rules(lab, a, b, *rules),
        ),
        (Config::Iptables(_), false) => {
            in_node(
                lab,
                "iptables-restore",
                &[],
                "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n",
            );
            in_node(lab, "iptables", &["-X"], "");
        }
        (Config::Nftables(rules), true) => {
            in_node(lab, "nft", &["-f", "-"], &nft_rules(a, b, *rules))
        }
        (Config::Nftables(_), false) => in_node(lab, "nft", &["delete", "table", "inet", "tg"], ""),
    }
}

/// Pairs a metric takes when the benchmark asks for `pairs`: UDP and latency take whole
/// one-second samples, `pairs` of them; TCP takes windows of half a second, twice as many,
/// and new connections twice that again: their ratio is the noisiest and sits closest to its
/// goal, so its median needs more pairs to mean anything.
pub fn pairs_for(metric: Metric, pairs: usize) -> usize {
    let pairs = pairs.max(1);
    match metric {
        Metric::Udp | Metric::Latency => pairs,
        Metric::Tcp => 2 * pairs,
        Metric::NewConnections => 4 * pairs,
    }
}

/// Runs the traffic benchmark: for each configuration and metric, `pairs` pairs of one-second
/// samples, the configuration's and the no-program baseline's back to back (in turn first,
/// so a trend of the machine's speed weighs on both sides alike). The machine's speed moves
/// by more than the goals' margins within a minute; a ratio of two samples a second apart
/// does not see that.
pub fn run(pairs: usize) -> Vec<NetFigure> {
    assert!(
        std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2,
        "the traffic benchmark pins its client and server to CPUs {CLIENT_CPU} and {SERVER_CPU}: it needs two"
    );
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    let helper = crate::traffic::helper();
    lab.spawn_ready(
        &b,
        "taskset",
        &["-c", SERVER_CPU, helper, "serve", "--tcp", "80"],
    );
    lab.spawn_background(&b, "taskset", &["-c", SERVER_CPU, "iperf3", "-s"]);
    let b_addr = b.ipv4.to_string();
    let sockperf = [
        "-c", SERVER_CPU, "sockperf", "server", "-i", &b_addr, "-p", "11111",
    ];
    lab.spawn_background(&b, "taskset", &sockperf);
    std::thread::sleep(Duration::from_millis(500));
    // The agent's defaults: connection tracking's capacity and each workload's share of it.
    let mut options = tollgate::DatapathOptions::new(&lab.pin_dir);
    options.tc_mode = TcMode::Auto;
    let mut dp = Datapath::load(options).expect("load the datapath");
    let (id_a, id_b) = (300u32, 301u32);
    for (pod, id) in [(&a, id_a), (&b, id_b)] {
        for ip in [
            std::net::IpAddr::V4(pod.ipv4),
            std::net::IpAddr::V6(pod.ipv6),
        ] {
            dp.maps.set_identity(IpNet::from(ip), id).unwrap();
        }
    }
    give_flow_series_buckets(&mut dp, [(1, id_b, DIR_EGRESS), (2, id_a, DIR_INGRESS)]);
    let mut setup = Setup {
        lab,
        dp,
        a,
        b,
        empty_program: vec![],
    };
    let configs = [
        Config::EmptyProgram,
        Config::Tollgate(Mode::Log, 9300),
        Config::Tollgate(Mode::Drop, 9300),
        Config::Iptables(9300),
        Config::Nftables(9300),
        Config::Tollgate(Mode::Drop, 10),
        Config::Tollgate(Mode::Drop, 1000),
        Config::Iptables(10),
        Config::Iptables(1000),
    ];
    let all = [
        Metric::NewConnections,
        Metric::Tcp,
        Metric::Udp,
        Metric::Latency,
    ];
    let mut figures = vec![];
    let mut baseline: [Vec<Sample>; 4] = Default::default();
    for (i, config) in configs.iter().enumerate() {
        let overflow_before = setup.dp.maps.diag().unwrap()[diag::CT_OVERFLOW as usize];
        let mut checks = None;
        if let Config::Tollgate(mode, rules) = config {
            let (a, b) = (&setup.a, &setup.b);
            let maps = &mut setup.dp.maps;
            maps.set_workload(1, &tollgate_policy(*mode, id_b, *rules, a))
                .unwrap();
            maps.set_workload(2, &tollgate_policy(*mode, id_a, *rules, b))
                .unwrap();
        }
        // The figures at 9300 peers (and the empty program) take every metric; the
        // smaller rule sets only show how new connections grow with the rules.
        let metrics: &[Metric] = if i < 5 { &all } else { &all[..1] };
        let mut pairs_of: [Pairs; 4] = Default::default();
        for (m, metric) in all.iter().enumerate() {
            if !metrics.contains(metric) {
                continue;
            }
            // What the agent's census does every 30 s: without it a workload's share count
            // only grows, and after the new-connection load its every later flow would be
            // tracked in the overflow table.
            setup
                .dp
                .maps
                .conntrack_census(tollgate::flows::monotonic_ns());
            let p = &mut pairs_of[m];
            let pairs = pairs_for(*metric, pairs);
            if matches!(metric, Metric::Tcp | Metric::NewConnections) {
                let taken = p.baseline.len();
                measure_in_windows(&mut setup, config, *metric, pairs, p);
                baseline[m].extend_from_slice(&p.baseline[taken..]);
                continue;
            }
            // A one-way UDP stream must start with the rules in place: conntrack takes it
            // for established only from iperf3's opening exchange, and iptables would walk
            // its chain for every packet of a stream it picked up halfway.
            for k in 0..pairs {
                let config_first = k % 2 == 0;
                for config_turn in [config_first, !config_first] {
                    if config_turn {
                        apply(&mut setup, config, true);
                        p.config.push(whole_sample(*metric, &setup.a, &setup.b));
                        apply(&mut setup, config, false);
                    } else {
                        let sample = whole_sample(*metric, &setup.a, &setup.b);
                        p.baseline.push(sample);
                        baseline[m].push(sample);
                    }
                }
            }
        }
        if let Config::Tollgate(..) = config {
            // Checks on the figures: the load is allowed traffic, so no packet of it may be
            // denied, and a workload within its share tracks nothing in the overflow table.
            let mut denied = 0;
            for slot in [1u32, 2] {
                let counters = setup.dp.maps.counters(slot).unwrap();
                for per_direction in counters {
                    denied += per_direction[VERDICT_WOULD_DROP as usize].packets
                        + per_direction[VERDICT_DROPPED as usize].packets;
                }
            }
            let overflowed =
                setup.dp.maps.diag().unwrap()[diag::CT_OVERFLOW as usize] - overflow_before;
            checks = Some(Checks { denied, overflowed });
            setup.dp.maps.clear_workload(1).unwrap();
            setup.dp.maps.clear_workload(2).unwrap();
        }
        let figure = figure_of(config, &pairs_of, checks);
        eprintln!(
            "{:<55} rules {:>5}: new conn x{}, tcp x{}, udp x{}, p99 {} us, programs {}% of CPU during tcp",
            figure.config,
            figure.rules,
            fmt_opt(figure.new_connections_ratio, 3),
            fmt_opt(figure.tcp_ratio, 3),
            fmt_opt(figure.udp_ratio, 3),
            fmt_opt(figure.p99_added_us, 1),
            fmt_opt(figure.tcp_program_cpu_share.map(|s| s * 100.0), 2),
        );
        figures.push(figure);
    }
    // The baseline's own figures: every no-program sample of the run.
    let base = figure_of(
        &Config::Baseline,
        &baseline.map(|samples| Pairs {
            config: samples.clone(),
            baseline: samples,
            programs: ProgramTime::default(),
        }),
        None,
    );
    figures.insert(0, base);
    let Setup { lab, dp, .. } = setup;
    lab.in_node(|| dp.remove()).unwrap();
    figures
}

/// A figure with `digits` decimals, or "-" when there is none.
pub fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn figure_of(config: &Config, pairs: &[Pairs; 4], checks: Option<Checks>) -> NetFigure {
    let [crr, tcp, udp, latency] = pairs;
    let values = |p: &Pairs| Pairs::values(&p.config);
    let p99_baseline = Pairs::values(&latency.baseline);
    let iqr = match (quantile(&p99_baseline, 0.75), quantile(&p99_baseline, 0.25)) {
        (Some(hi), Some(lo)) => Some(hi - lo),
        _ => None,
    };
    let mut spread = vec![];
    for (name, v) in [
        ("tcp_gbps", values(tcp)),
        ("udp_kpps", values(udp)),
        ("latency_p50_us", Pairs::p50s(&latency.config)),
        ("latency_p99_us", values(latency)),
        ("new_connections_per_s", values(crr)),
        ("tcp_ratio", tcp.ratios()),
        ("udp_ratio", udp.ratios()),
        ("new_connections_ratio", crr.ratios()),
        ("p99_added_us", latency.differences()),
    ] {
        spread.extend(self::spread(name, &v));
    }
    NetFigure {
        config: config.name(),
        rules: config.rules(),
        tcp_gbps: median(&values(tcp)),
        udp_kpps: median(&values(udp)),
        latency_p50_us: median(&Pairs::p50s(&latency.config)),
        latency_p99_us: median(&values(latency)),
        new_connections_per_s: median(&values(crr)).unwrap_or(0.0),
        tcp_ratio: median(&tcp.ratios()),
        udp_ratio: median(&udp.ratios()),
        new_connections_ratio: median(&crr.ratios()),
        tcp_ratio_interval: median_interval(&tcp.ratios()),
        new_connections_ratio_interval: median_interval(&crr.ratios()),
        p99_added_us: median(&latency.differences()),
        p99_noise_us: iqr,
        tcp_program_cpu_share: tcp.programs.cpu_share(),
        tcp_program_ns_per_run: tcp.programs.ns_per_run(),
        crr_program_cpu_share: crr.programs.cpu_share(),
        crr_program_ns_per_run: crr.programs.ns_per_run(),
        checks,
        spread,
    }
}

#[cfg(test)]
mod tests {
    use super::median_interval;

    #[test]
    fn the_median_interval_takes_the_order_statistics_of_the_binomial() {
        let ranks: Vec<f64> = (1..=24).map(f64::from).collect();
        // Binomial(24, 1/2): P(X <= 6) = 1.1%, P(X <= 7) = 3.2%.
        assert_eq!(median_interval(&ranks), Some((7.0, 18.0)));
        // Binomial(12, 1/2): P(X <= 2) = 1.9%, P(X <= 3) = 7.3%.
        assert_eq!(median_interval(&ranks[..12]), Some((3.0, 10.0)));
        // Six samples: only min and max, at 96.9%; five cannot make a 95% interval.
        assert_eq!(median_interval(&ranks[..6]), Some((1.0, 6.0)));
        assert_eq!(median_interval(&ranks[..5]), None);
        let shuffled = [5.0, 1.0, 6.0, 3.0, 2.0, 4.0];
        assert_eq!(median_interval(&shuffled), Some((1.0, 6.0)));
    }
}
