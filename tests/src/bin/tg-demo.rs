//! The local demo (`cargo xtask demo`): Tollgate's main job on an embedded default.
//!
//! A small bank's services run as network-namespace workloads behind a node namespace of
//! their own; `tollgate run` attaches to all of them from the sample policy set in
//! tests/fixtures/demo-bank.yaml. Real traffic flows, some of it not allowed: in log mode
//! the would-drops pass and show up in `tollgate status`, the metrics and the flow log;
//! then the ledger is flipped to drop at runtime and the same traffic is dropped. Everything
//! is removed at the end.

use std::time::Duration;

use tollgate_tests::{
    Lab, Pod,
    agent::{Agent, sample},
    traffic,
};

const LEDGER: &str = "ledger-7d9c8b5f4-x2x9q";

fn banner(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn show(out: std::process::Output) {
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

fn calls(pot: &Pod, prometheus: &Pod, frontend: &Pod, ledger: &Pod, internet: &Pod) {
    let timeout = Duration::from_millis(1500);
    let cases = [
        (pot, "bank/pot -> bank/ledger:8080 (allowed)", 8080),
        (
            prometheus,
            "monitoring/prometheus -> bank/ledger:9090 (allowed)",
            9090,
        ),
        (
            frontend,
            "bank/frontend -> bank/ledger:8080 (NOT allowed)",
            8080,
        ),
    ];
    for (from, what, port) in cases {
        let r = traffic::tcp(from, ledger.addr(false), port, 5, timeout);
        println!(
            "  {what:<52} {}",
            if r.echoed == 5 {
                "connected, 5 requests answered"
            } else {
                "FAILED: dropped by policy"
            }
        );
    }
    let r = traffic::tcp(ledger, internet.addr(false), 443, 2, timeout);
    println!(
        "  {:<52} {}",
        "bank/ledger -> 203.0.113.x:443 (egress not isolated)",
        if r.echoed == 2 { "connected" } else { "FAILED" }
    );
}

fn metrics_summary(agent: &Agent) {
    let m = agent.metrics_text();
    for verdict in ["allowed", "would_drop", "dropped"] {
        let v = sample(
            &m,
            "tollgate_packets_total",
            &[
                ("pod", LEDGER),
                ("direction", "ingress"),
                ("verdict", verdict),
            ],
        )
        .unwrap_or(0.0);
        println!(
            "  tollgate_packets_total{{namespace=\"bank\",pod=\"{LEDGER}\",direction=\"ingress\",verdict=\"{verdict}\"}} {v}"
        );
    }
    for line in m.lines().filter(|l| {
        l.starts_with("tollgate_flow_packets_total") && l.contains("src_workload=\"frontend\"")
    }) {
        println!("  {line}");
    }
}

fn flow_log(agent: &Agent, from: usize) -> usize {
    let records = agent.flow_records();
    for r in records.iter().skip(from) {
        println!("  {r}");
    }
    records.len()
}

fn main() {
    println!("Tollgate demo: per-pod accounting, a dry run of a policy set, then a flip to drop.");
    let mut lab = Lab::new();
    let ledger = lab.add_pod("ledger");
    let pot = lab.add_pod("pot");
    let frontend = lab.add_pod("frontend");
    let prometheus = lab.add_pod("prometheus");
    let internet = lab.add_outside("internet");
    lab.serve(&ledger, &[8080, 9090], &[]);
    lab.serve(&internet, &[443], &[]);

    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("demo directory");
    let mut agent = Agent::start(&lab, &dir, &["--detach-on-exit"]);
    let yaml = include_str!("../../fixtures/demo-bank.yaml")
        .replace("{{ledger}}", &ledger.ipv4.to_string())
        .replace("{{pot}}", &pot.ipv4.to_string())
        .replace("{{frontend}}", &frontend.ipv4.to_string())
        .replace("{{prometheus}}", &prometheus.ipv4.to_string());
    std::fs::write(agent.cluster_state.join("bank.yaml"), yaml).expect("write cluster state");
    agent.wait_ready();
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "\nnetwork namespaces {}-*, cluster state {}, agent log {}",
        lab.id,
        agent.cluster_state.display(),
        dir.join("agent.log").display()
    );

    banner("tollgate status (every pod attached, the ledger isolated for ingress, mode log)");
    show(agent.cli(&["status"]));

    banner("traffic with the ledger in log mode: the would-drop passes");
    calls(&pot, &prometheus, &frontend, &ledger, &internet);
    lab.settle();
    banner("tollgate status");
    show(agent.cli(&["status"]));
    banner("metrics (curl http://127.0.0.1:9402/metrics in the node namespace)");
    metrics_summary(&agent);
    banner("flow log");
    std::thread::sleep(Duration::from_millis(300));
    let seen = flow_log(&agent, 0);

    banner(&format!("tollgate mode set bank/{LEDGER} drop"));
    show(agent.cli(&["mode", "set", &format!("bank/{LEDGER}"), "drop"]));

    banner("the same traffic with the ledger in drop mode");
    calls(&pot, &prometheus, &frontend, &ledger, &internet);
    lab.settle();
    banner("tollgate status");
    show(agent.cli(&["status"]));
    banner("metrics");
    metrics_summary(&agent);
    banner("flow log (new lines)");
    std::thread::sleep(Duration::from_millis(300));
    flow_log(&agent, seen);

    banner("teardown");
    let status = agent.stop();
    println!(
        "  agent stopped ({status}); --detach-on-exit removed its programs and pins; namespaces go next"
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    println!("  done");
}
