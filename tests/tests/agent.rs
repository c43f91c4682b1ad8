//! `tollgate run` as operators run it, on real traffic: metrics, flow log, runtime mode flips,
//! restarts that lose nothing, and a real Prometheus server scraping it.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use tollgate_tests::{
    Lab, Pod,
    agent::{Agent, sample},
    support::{FAIL_FAST, PATIENT},
    support::{Scratch, temp_dir},
    traffic, wait_for,
};

/// A small bank: bank/ledger (isolated for ingress: only pot on 8080, monitoring on 9090),
/// bank/pot, bank/frontend, monitoring/prometheus.
struct Bank {
    lab: Lab,
    ledger: Pod,
    pot: Pod,
    frontend: Pod,
    prometheus: Pod,
    dir: Scratch,
}

const LEDGER_POD: &str = "ledger-7d9c8b5f4-x2x9q";

fn pod_yaml(pod: &Pod, ns: &str, name: &str, labels: &str, owner: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {labels}\n{owner}spec:\n  containers: [{{name: c, image: i, ports: [{{name: http, containerPort: 8080}}, {{name: http-udp, containerPort: 8080, protocol: UDP}}]}}]\nstatus:\n  phase: Running\n  podIPs: [{{ip: {}}}, {{ip: {}}}]\n",
        pod.ipv4, pod.ipv6
    )
}

const LEDGER_POLICY: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ledger-ingress, namespace: bank}\nspec:\n  podSelector: {matchLabels: {app: ledger}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: pot}}}]\n    ports: [{port: http-udp, protocol: UDP}, {port: http}]\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]\n    ports: [{port: 9090}]\n";

fn bank(tag: &str) -> Bank {
    let mut lab = Lab::new();
    let ledger = lab.add_pod("ledger");
    let pot = lab.add_pod("pot");
    let frontend = lab.add_pod("frontend");
    let prometheus = lab.add_pod("prom");
    lab.serve(&ledger, &[8080, 9090], &[8080]);
    let dir = temp_dir(tag);
    Bank {
        lab,
        ledger,
        pot,
        frontend,
        prometheus,
        dir,
    }
}

impl Bank {
    fn cluster_yaml(&self, extra: &str) -> String {
        let mut y = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: bank, labels: {team: core}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: monitoring}\n",
        );
        y += &pod_yaml(
            &self.ledger,
            "bank",
            LEDGER_POD,
            "{app: ledger, pod-template-hash: 7d9c8b5f4}",
            "  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: ledger-7d9c8b5f4, uid: u1, controller: true}]\n",
        );
        y += &pod_yaml(&self.pot, "bank", "pot-0", "{app: pot}", "");
        y += &pod_yaml(&self.frontend, "bank", "frontend-0", "{app: frontend}", "");
        y += &pod_yaml(
            &self.prometheus,
            "monitoring",
            "prometheus-0",
            "{app: prometheus}",
            "",
        );
        y += LEDGER_POLICY;
        y += extra;
        y
    }

    /// UDP datagrams from `from` to the ledger's port 8080 (IPv4): how many were echoed.
    fn to_ledger(&self, from: &Pod, datagrams: u32) -> u32 {
        traffic::udp(from, self.ledger.addr(false), 8080, datagrams, 64, PATIENT).echoed
    }

    /// Datagrams from the frontend (which the ledger's policy does not allow) to the
    /// ledger's port 8080, each given up on soon.
    fn frontend_to_ledger(&self, datagrams: u32) -> traffic::UdpResult {
        traffic::udp(
            &self.frontend,
            self.ledger.addr(false),
            8080,
            datagrams,
            64,
            FAIL_FAST,
        )
    }

    /// Whether one datagram from the frontend reaches the ledger.
    fn frontend_reaches_ledger(&self) -> bool {
        self.frontend_to_ledger(1).echoed == 1
    }

    fn write_state(&self, agent: &Agent, extra: &str) {
        std::fs::write(
            agent.cluster_state.join("bank.yaml"),
            self.cluster_yaml(extra),
        )
        .unwrap();
    }

    fn start(&self, extra_args: &[&str]) -> Agent {
        let mut agent = Agent::start(&self.lab, &self.dir, extra_args);
        self.write_state(&agent, "");
        agent.wait_ready();
        // The first reconcile can race the file write: wait for all four workloads.
        Self::wait_for_workloads(&agent);
        agent
    }

    /// A new agent over what an earlier one left (pins, state directory, cluster state).
    fn restart(&self, extra_args: &[&str]) -> Agent {
        let mut agent = Agent::start(&self.lab, &self.dir, extra_args);
        agent.wait_ready();
        Self::wait_for_workloads(&agent);
        agent
    }

    fn wait_for_workloads(agent: &Agent) {
        wait_for(Duration::from_secs(10), "four workloads", || {
            (agent.status()["workloads"].as_array()?.len() == 4).then_some(())
        });
    }
}

fn ledger_packets(text: &str, direction: &str, verdict: &str) -> f64 {
    sample(
        text,
        "tollgate_packets_total",
        &[
            ("namespace", "bank"),
            ("pod", LEDGER_POD),
            ("direction", direction),
            ("verdict", verdict),
        ],
    )
    .unwrap_or_else(|| panic!("no tollgate_packets_total for ledger {direction} {verdict}"))
}

#[test]
fn the_agent_counts_logs_flips_modes_and_follows_the_cluster_state() {
    let bank = bank("agent-e2e");
    let mut agent = bank.start(&["--conntrack-census-interval", "1s"]);
    assert_eq!(agent.http("/healthz").map(|r| r.0), Some(200));

    let status = agent.status();
    let ledger = status["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pod"] == LEDGER_POD)
        .expect("ledger in status")
        .clone();
    assert_eq!(ledger["workload"], "ledger");
    assert_eq!(ledger["attach"], "tcx");
    assert_eq!(ledger["isolated_ingress"], true);
    assert_eq!(ledger["isolated_egress"], false);
    assert_eq!(ledger["mode"], "log");
    assert_eq!(ledger["mode_source"], "default");

    // Allowed, and would-drops that pass in log mode.
    assert_eq!(bank.to_ledger(&bank.pot, 5), 5);
    assert_eq!(bank.to_ledger(&bank.frontend, 4), 4);
    bank.lab.settle();
    let m = agent.metrics_text();
    assert_eq!(ledger_packets(&m, "ingress", "allowed"), 5.0);
    assert_eq!(ledger_packets(&m, "ingress", "would_drop"), 4.0);
    assert_eq!(
        ledger_packets(&m, "egress", "would_drop"),
        4.0,
        "replies of would-drop flows"
    );
    assert_eq!(ledger_packets(&m, "ingress", "dropped"), 0.0);
    assert_eq!(
        sample(
            &m,
            "tollgate_flow_packets_total",
            &[
                ("direction", "ingress"),
                ("verdict", "would_drop"),
                ("src_namespace", "bank"),
                ("src_workload", "frontend-0"),
                ("dst_namespace", "bank"),
                ("dst_workload", "ledger"),
                ("protocol", "udp"),
                ("port", "8080"),
            ]
        ),
        Some(8.0),
        "seen at the ledger's ingress: 4 datagrams and their 4 echoes"
    );
    // That scrape gave the pairs it read their own direct-mapped buckets: the pot's next
    // datagrams count there, and the series adds both places up without losing or doubling.
    let pot_series = |m: &str| {
        sample(
            m,
            "tollgate_flow_packets_total",
            &[
                ("direction", "ingress"),
                ("verdict", "allowed"),
                ("src_workload", "pot-0"),
                ("dst_workload", "ledger"),
                ("protocol", "udp"),
                ("port", "8080"),
            ],
        )
    };
    assert_eq!(pot_series(&m), Some(10.0), "5 datagrams and their echoes");
    assert_eq!(bank.to_ledger(&bank.pot, 6), 6);
    bank.lab.settle();
    let m = agent.metrics_text();
    assert_eq!(pot_series(&m), Some(22.0), "6 more and their echoes");
    // The census (every second here) counts the ledger's tracked flows: the pot's and the
    // frontend's.
    wait_for(Duration::from_secs(10), "a census", || {
        let m = agent.metrics_text();
        (sample(&m, "tollgate_conntrack_entries", &[("pod", LEDGER_POD)])? >= 2.0).then_some(())
    });
    assert_eq!(
        sample(
            &m,
            "tollgate_workload_mode",
            &[("pod", LEDGER_POD), ("mode", "log")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "tollgate_workload_isolated",
            &[("pod", LEDGER_POD), ("direction", "ingress")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "tollgate_flow_log_events_total",
            &[("outcome", "written")]
        ),
        Some(1.0)
    );
    assert!(sample(&m, "tollgate_map_capacity", &[("map", "CONNTRACK")]).unwrap() > 0.0);
    assert_eq!(sample(&m, "tollgate_build_info", &[]), Some(1.0));

    // The flow log: one record for the one would-drop flow.
    let records = wait_for(Duration::from_secs(3), "flow log record", || {
        let r = agent.flow_records();
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["verdict"], "would_drop");
    assert_eq!(r["direction"], "ingress");
    assert_eq!(r["protocol"], "udp");
    assert_eq!(r["node"], "lab-node");
    assert_eq!(r["mode"], "log");
    assert_eq!(r["dst_port"], 8080);
    assert_eq!(r["src_ip"], bank.frontend.ipv4.to_string());
    assert_eq!(r["dst_ip"], bank.ledger.ipv4.to_string());
    assert_eq!(r["src"]["workload"], "frontend-0");
    assert_eq!(
        r["dst"],
        serde_json::json!({"namespace": "bank", "pod": LEDGER_POD, "workload": "ledger"})
    );
    assert_eq!(r["policies"], serde_json::json!(["bank/ledger-ingress"]));
    assert!(
        humantime::parse_rfc3339(r["time"].as_str().unwrap()).is_ok(),
        "{}",
        r["time"]
    );

    // Flip the ledger to drop: in force when the command returns.
    let flip = Instant::now();
    let out = agent.cli(&[
        "mode",
        "set",
        &format!("bank/{LEDGER_POD}"),
        "drop",
        "--reason",
        "CHG-7",
    ]);
    eprintln!(
        "mode flip round trip (CLI to datapath and back): {:?}",
        flip.elapsed()
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = bank.frontend_to_ledger(3);
    assert_eq!(r.echoed, 0, "dropped right after the flip: {r:?}");
    assert_eq!(bank.to_ledger(&bank.pot, 3), 3);
    bank.lab.settle();
    let m = agent.metrics_text();
    assert_eq!(ledger_packets(&m, "ingress", "dropped"), 3.0);
    assert_eq!(
        sample(
            &m,
            "tollgate_workload_mode",
            &[("pod", LEDGER_POD), ("mode", "drop")]
        ),
        Some(1.0)
    );
    assert_eq!(
        agent.status()["overrides"][format!("bank/{LEDGER_POD}")],
        "drop"
    );
    let audit: Vec<serde_json::Value> = std::fs::read_to_string(bank.dir.join("state/audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["target"], format!("bank/{LEDGER_POD}"));
    assert_eq!(audit[0]["old_mode"], serde_json::Value::Null);
    assert_eq!(audit[0]["new_mode"], "drop");
    assert!(audit[0]["who"].as_str().unwrap().contains("uid=0"));
    assert!(
        audit[0]["who"].as_str().unwrap().contains("(CHG-7)"),
        "the reason is audited: {}",
        audit[0]["who"]
    );

    // Only root may talk to the agent.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            tollgate_tests::agent::tollgate_bin(),
            "status",
            "--admin-socket",
        ])
        .arg(&agent.admin_socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("are you root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A bad target is bad usage.
    assert_eq!(
        agent.cli(&["mode", "set", "Bank", "drop"]).status.code(),
        Some(2)
    );
    assert_eq!(
        agent
            .cli(&["mode", "set", "bank/x", "sideways"])
            .status
            .code(),
        Some(2)
    );

    // Clearing the override: log mode again.
    assert!(
        agent
            .cli(&["mode", "clear", &format!("bank/{LEDGER_POD}")])
            .status
            .success()
    );
    assert_eq!(bank.to_ledger(&bank.frontend, 1), 1);

    // The cluster state is watched: a new policy allowing the frontend applies within a
    // second or so, and a broken one is rejected, counted, and changes nothing else.
    let allow_frontend = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ledger-from-frontend, namespace: bank}\nspec:\n  podSelector: {matchLabels: {app: ledger}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}]}]\n";
    let broken = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: bank}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/40}}]}]\n";
    bank.write_state(&agent, &format!("{allow_frontend}{broken}"));
    wait_for(Duration::from_secs(5), "new policy in force", || {
        let s = agent.status();
        (s["policies"] == 2 && !s["policy_errors"].as_array()?.is_empty()).then_some(())
    });
    let m = agent.metrics_text();
    assert_eq!(sample(&m, "tollgate_policy_errors_total", &[]), Some(1.0));
    let before = ledger_packets(&m, "ingress", "would_drop");
    assert_eq!(bank.to_ledger(&bank.frontend, 2), 2);
    bank.lab.settle();
    assert_eq!(
        ledger_packets(&agent.metrics_text(), "ingress", "would_drop"),
        before,
        "frontend is allowed now"
    );
    let status = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(
        status.contains("rejected: NetworkPolicy bank/broken"),
        "{status}"
    );
    assert!(status.contains(LEDGER_POD));

    // `flows --once` shows the busiest flows.
    let out = agent.cli(&["flows", "--once", "-o", "json"]);
    assert!(out.status.success());
    let flows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!flows["busiest"].as_array().unwrap().is_empty());
    assert!(agent.stop().success());
}

fn our_links(bpffs: &Path) -> usize {
    std::fs::read_dir(bpffs.join("links"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn kill_9_under_traffic_loses_nothing_and_counters_continue() {
    let bank = bank("agent-restart");
    let mut agent = bank.start(&["--default-mode", "drop"]);
    assert_eq!(
        our_links(&agent.bpffs),
        8,
        "4 workloads x 2 TCX links, pinned"
    );
    // What the kernel has attached on the pods' interfaces, one program per hook.
    let tcx_programs = || -> Vec<(String, Vec<String>)> {
        bank.lab.in_node(|| {
            [&bank.ledger, &bank.pot, &bank.frontend, &bank.prometheus]
                .iter()
                .flat_map(|p| {
                    [
                        aya::programs::TcAttachType::Ingress,
                        aya::programs::TcAttachType::Egress,
                    ]
                    .map(|t| {
                        let (_, progs) =
                            aya::programs::SchedClassifier::query_tcx(&p.host_if, t).unwrap();
                        (
                            format!("{} {t:?}", p.host_if),
                            progs
                                .iter()
                                .map(|i| i.name_as_str().unwrap_or("?").to_string())
                                .collect(),
                        )
                    })
                })
                .collect()
        })
    };
    let attached_before = tcx_programs();
    assert!(
        attached_before.iter().all(|(_, progs)| progs.len() == 1),
        "{attached_before:?}"
    );
    // A pod of another node joins in a namespace that sorts first, as in a live cluster:
    // this agent numbers its identity last, a new agent compiling the whole state at once
    // would number it first, and every identity after it otherwise.
    let policies = agent.status()["policies"].as_u64().unwrap();
    bank.write_state(
        &agent,
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: early-0, namespace: aaa, labels: {app: early}}\nspec: {nodeName: elsewhere, containers: [{name: c, image: i}]}\nstatus: {phase: Running, podIPs: [{ip: 10.1.9.9}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: quiet, namespace: aaa}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
    );
    wait_for(Duration::from_secs(10), "the new pod compiled", || {
        (agent.status()["policies"].as_u64()? == policies + 1).then_some(())
    });

    let (stream, during) = std::thread::scope(|s| {
        // A steady allowed stream (each datagram waits for its echo) across the kill.
        let stream = s.spawn(|| {
            traffic::udp_from(
                &bank.pot,
                bank.ledger.addr(false),
                8080,
                2500,
                64,
                PATIENT,
                Some(46000),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let before = agent.metrics_text();
        // Drops logged just before the kill, after the scrape (and most likely after the
        // agent's last write of its counters): their lines and their count must both stay.
        let logged = agent.flow_records().len();
        let denied = bank.frontend_to_ledger(3);
        assert_eq!(denied.echoed, 0);
        wait_for(Duration::from_secs(2), "the drops logged", || {
            (agent.flow_records().len() >= logged + 3).then_some(())
        });
        agent.kill9();
        // While the agent is down, enforcement goes on.
        let denied = bank.frontend_to_ledger(2);
        assert_eq!(denied.echoed, 0, "still enforced while the agent is down");
        std::thread::sleep(Duration::from_millis(300));
        agent.restart();
        let stream = stream.join().unwrap();
        (stream, before)
    });
    assert_eq!(
        (stream.sent, stream.echoed),
        (2500, 2500),
        "no packet lost: {stream:?}"
    );
    assert_eq!(
        our_links(&agent.bpffs),
        8,
        "adopted, nothing attached twice"
    );
    assert_eq!(
        tcx_programs(),
        attached_before,
        "one program per hook, as before the kill"
    );
    bank.lab.settle();
    let after = agent.metrics_text();
    // Every counter series continued from where it was.
    let counters = [
        "tollgate_packets_total",
        "tollgate_bytes_total",
        "tollgate_flow_packets_total",
        "tollgate_policy_sync_seconds_count",
        "tollgate_policy_sync_seconds_bucket",
        "tollgate_flow_log_events_total",
        "tollgate_policy_errors_total",
        "tollgate_datapath_diagnostics_total",
    ];
    for line in during
        .lines()
        .filter(|l| counters.iter().any(|c| l.starts_with(c)))
    {
        let (series, v) = line.rsplit_once(' ').unwrap();
        let before: f64 = v.parse().unwrap();
        let now = after
            .lines()
            .find(|l| l.rsplit_once(' ').map(|x| x.0) == Some(series))
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{series} vanished after the restart"));
        assert!(now >= before, "{series}: {before} -> {now}");
    }
    // Exact: every datagram of the stream, before, during and after the kill.
    assert_eq!(ledger_packets(&after, "ingress", "allowed"), 2500.0);
    assert_eq!(ledger_packets(&after, "ingress", "dropped"), 3.0 + 2.0);
    // And so are the peer pairs: what the kernel counted while no agent ran is named by
    // the identities it was counted under (both directions of each flow count).
    let at_ledger: Vec<(String, f64)> = after
        .lines()
        .filter(|l| {
            l.starts_with("tollgate_flow_packets_total{")
                && l.contains("direction=\"ingress\"")
                && l.contains("dst_workload=\"ledger\"")
        })
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap();
            (series.to_string(), v.parse().unwrap())
        })
        .collect();
    let from = |src: &str, verdict: &str| {
        at_ledger
            .iter()
            .filter(|(l, _)| {
                l.contains(&format!("src_workload=\"{src}\""))
                    && l.contains(&format!("verdict=\"{verdict}\""))
            })
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    assert_eq!(from("pot-0", "allowed"), 5000.0, "{at_ledger:#?}");
    assert_eq!(from("frontend-0", "dropped"), 3.0 + 2.0, "{at_ledger:#?}");
    assert_eq!(at_ledger.len(), 2, "no other peer: {at_ledger:#?}");
    // The flow log names the pods of the drops made while no agent ran.
    wait_for(Duration::from_secs(5), "the outage's drops logged", || {
        let records = agent.flow_records();
        let dropped: Vec<_> = records
            .iter()
            .filter(|r| r["verdict"] == "dropped" && r["dst"]["pod"] == LEDGER_POD)
            .collect();
        (!dropped.is_empty()).then_some(())?;
        assert!(
            dropped
                .iter()
                .all(|r| r["src"]["workload"] == "frontend-0" && r["node"] != ""),
            "{dropped:#?}"
        );
        Some(())
    });
    // Every line of the flow log, before and after the kill, is counted as written.
    let written = sample(
        &agent.metrics_text(),
        "tollgate_flow_log_events_total",
        &[("outcome", "written")],
    )
    .unwrap();
    assert_eq!(written, agent.flow_records().len() as f64);
    assert!(agent.stop().success());
}

/// What a pod counted between the agent's last read (every 2 s) and its deletion is read
/// before its slot is cleared: the peer pair at its end holds every packet it exchanged.
#[test]
fn a_pods_last_packets_before_it_is_detached_are_counted() {
    let bank = bank("agent-last");
    let agent = bank.start(&[]);
    let at_ledger = |text: &str| {
        sample(
            text,
            "tollgate_flow_packets_total",
            &[
                ("direction", "ingress"),
                ("verdict", "allowed"),
                ("src_workload", "pot-0"),
                ("dst_workload", "ledger"),
            ],
        )
        .unwrap_or(0.0)
    };
    let before = at_ledger(&agent.metrics_text());
    assert_eq!(bank.to_ledger(&bank.pot, 20), 20);
    // The ledger's pod deleted at once, most likely before the agent's next read.
    let without_ledger: String = bank
        .cluster_yaml("")
        .split_inclusive("---\n")
        .filter(|doc| !doc.contains(&format!("name: {LEDGER_POD}")))
        .collect();
    std::fs::write(agent.cluster_state.join("bank.yaml"), without_ledger).unwrap();
    // Nothing asked of the agent meanwhile: a status or a scrape would read the counters.
    // The cluster state is polled every 200 ms here.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.workload(LEDGER_POD).is_none(), "the ledger detached");
    // Each datagram and its echo, counted at the ledger's end.
    assert_eq!(at_ledger(&agent.metrics_text()) - before, 40.0);
}

#[test]
fn a_graceful_stop_keeps_enforcing_and_only_detach_on_exit_removes_it() {
    let bank = bank("agent-stop");
    let mut agent = bank.start(&["--default-mode", "drop"]);
    assert!(!bank.frontend_reaches_ledger());
    // A second agent on the same paths is refused, and the first keeps its admin socket.
    let (second, err) = agent.run_second_instance();
    assert_eq!(second.and_then(|s| s.code()), Some(1), "{err}");
    assert!(err.contains("another tollgate agent runs"), "{err}");
    // Also with a state directory and admin socket of its own: it would write its own modes
    // and rules into the same pinned maps (or take them off with --reset-state).
    let mut second = Agent::start(&bank.lab, &bank.dir.join("second"), &["--reset-state"]);
    let status = second.wait_exit(Duration::from_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", second.log());
    assert!(
        second.log().contains("drives the pinned datapath"),
        "{}",
        second.log()
    );
    assert_eq!(our_links(&agent.bpffs), 8, "nothing reset");
    assert!(
        agent.status()["workloads"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    );
    bank.lab.settle();
    let dropped_before = ledger_packets(&agent.metrics_text(), "ingress", "dropped");
    assert!(dropped_before > 0.0);
    assert!(agent.stop().success());
    assert_eq!(our_links(&agent.bpffs), 8);
    assert!(!bank.frontend_reaches_ledger(), "still enforced");

    // A map layout from another version is refused, and nothing changes.
    let layout = agent.bpffs.join("LAYOUT");
    {
        use aya::maps::{Array, Map, MapData};
        let mut array =
            Array::<_, u64>::try_from(Map::Array(MapData::from_pin(&layout).unwrap())).unwrap();
        let current = array.get(&0, 0).unwrap();
        array.set(0, current ^ 0xdead, 0).unwrap();
    }
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", bank.lab.node))
        .arg(tollgate_tests::agent::tollgate_bin())
        .args(["run", "--cluster-state"])
        .arg(&agent.cluster_state)
        .arg("--bpffs")
        .arg(&agent.bpffs)
        .arg("--state-dir")
        .arg(bank.dir.join("state"))
        .arg("--admin-socket")
        .arg(bank.dir.join("other.sock"))
        .arg("--metrics-addr")
        .arg("127.0.0.1:9499")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("map layout") && err.contains("--reset-state"),
        "{err}"
    );
    assert_eq!(our_links(&agent.bpffs), 8, "nothing was changed");
    assert!(!bank.frontend_reaches_ledger());

    // --reset-state starts over; --detach-on-exit takes everything off at the end.
    let mut fresh = bank.restart(&[
        "--default-mode",
        "drop",
        "--reset-state",
        "--detach-on-exit",
    ]);
    wait_for(Duration::from_secs(10), "re-attached", || {
        (our_links(&fresh.bpffs) == 8).then_some(())
    });
    // The kernel counts from zero in the new pins; the exported counters continue.
    let dropped = ledger_packets(&fresh.metrics_text(), "ingress", "dropped");
    assert!(
        dropped >= dropped_before,
        "{dropped} after {dropped_before}"
    );
    assert!(!bank.frontend_reaches_ledger());
    bank.lab.settle();
    let dropped_after = ledger_packets(&fresh.metrics_text(), "ingress", "dropped");
    assert!(dropped_after > dropped, "{dropped_after} after {dropped}");
    assert!(fresh.stop().success());
    assert!(!fresh.bpffs.exists(), "pins removed");
    assert_eq!(bank.to_ledger(&bank.frontend, 1), 1, "no longer enforced");
    drop(agent);
}

/// An agent started with another `--bpffs` does not adopt what the earlier one left
/// attached: it takes that agent's programs off the workloads it attaches, or they would go
/// on enforcing the earlier agent's last rules beside its own.
#[test]
fn a_restart_on_another_bpffs_takes_the_earlier_agents_programs_off() {
    let bank = bank("agent-moved");
    let mut agent = bank.start(&["--default-mode", "drop"]);
    assert!(!bank.frontend_reaches_ledger());
    assert!(agent.stop().success());
    assert!(!bank.frontend_reaches_ledger(), "enforced after a stop");
    // The next agent, on other pins, in log mode: nothing is dropped.
    let moved = bank.lab.pin_dir.join("moved");
    let mut next = Agent::start_on_bpffs(&bank.lab, &bank.dir, &moved, &["--default-mode", "log"]);
    next.wait_ready();
    Bank::wait_for_workloads(&next);
    wait_for(
        Duration::from_secs(5),
        "the frontend reaching the ledger",
        || bank.frontend_reaches_ledger().then_some(()),
    );
    assert!(
        next.log().contains("detached another agent's program"),
        "{}",
        next.log()
    );
    // Counted by the agent that now runs, as a would-drop.
    wait_for(Duration::from_secs(5), "the would-drop counted", || {
        (ledger_packets(&next.metrics_text(), "ingress", "would_drop") > 0.0).then_some(())
    });
}

/// A policy broken while the agent runs stays in force as its last good version, and so it
/// does after a restart: the new process has never seen it good, but the state directory
/// kept it, so enforcement does not lapse until the file is mended. The same for the pod it
/// isolates, whose document broke too: a restart still attaches and enforces it as it was.
#[test]
fn a_broken_policy_stays_in_force_as_it_was_across_a_restart() {
    let bank = bank("agent-kept");
    let mut agent = bank.start(&["--default-mode", "drop"]);
    assert_eq!(bank.to_ledger(&bank.pot, 1), 1, "the policy allows pot");
    assert!(!bank.frontend_reaches_ledger(), "and isolates the ledger");
    let broken = LEDGER_POLICY.replace("ports: [{port: 9090}]", "ports: [{port: 99999}]");
    assert_ne!(broken, LEDGER_POLICY);
    let ledger_labels = "  labels: {app: ledger, pod-template-hash: 7d9c8b5f4}";
    let cluster = bank
        .cluster_yaml("")
        .replace(LEDGER_POLICY, &broken)
        .replace(
            ledger_labels,
            &format!("{ledger_labels}\n  annotations: [oops"),
        );
    assert!(cluster.contains("[oops"));
    std::fs::write(agent.cluster_state.join("bank.yaml"), &cluster).unwrap();
    wait_for(
        Duration::from_secs(10),
        "the broken policy reported",
        || {
            agent
                .status()
                .to_string()
                .contains("the last good version stays in force")
                .then_some(())
        },
    );
    assert!(agent.stop().success());

    let restarted = bank.restart(&["--default-mode", "drop"]);
    let status = restarted.status().to_string();
    assert!(
        status.contains("99999") && status.contains("the last good version stays in force"),
        "{status}"
    );
    assert!(
        restarted.workload(LEDGER_POD).is_some(),
        "the pod whose document broke is still attached: {status}"
    );
    assert!(
        status.contains(&format!("Pod bank/{LEDGER_POD}")),
        "its error is shown: {status}"
    );
    assert_eq!(bank.to_ledger(&bank.pot, 1), 1);
    assert!(
        !bank.frontend_reaches_ledger(),
        "still isolated by the last good version"
    );
    // The same errors, reported before the restart, are counted once.
    let text = restarted.metrics_text();
    assert!(
        text.lines()
            .any(|l| l.starts_with("tollgate_policy_errors_total")
                && l.split_whitespace().last() == Some("2")),
        "{text}"
    );
    drop(restarted);
    drop(agent);
}

/// logrotate's default moves the flow log away and expects the writer to make a new file:
/// the lines after the move go to a new file at `--flow-log`, none is lost.
#[test]
fn a_flow_log_moved_away_is_written_anew() {
    let bank = bank("agent-rotate");
    let agent = bank.start(&[]);
    let r = bank.frontend_to_ledger(1);
    assert_eq!(r.echoed, 1, "log mode lets it through");
    wait_for(Duration::from_secs(5), "a first would-drop logged", || {
        (!agent.flow_records().is_empty()).then_some(())
    });
    let rotated = agent.flow_log.with_extension("log.1");
    std::fs::rename(&agent.flow_log, &rotated).unwrap();
    // Past the writer's once-a-second look at the path.
    std::thread::sleep(Duration::from_millis(1100));
    let first = bank.frontend_to_ledger(1);
    assert_eq!(first.echoed, 1);
    wait_for(
        Duration::from_secs(5),
        "a would-drop in the new file",
        || (!agent.flow_records().is_empty()).then_some(()),
    );
    let old_lines = std::fs::read_to_string(&rotated).unwrap().lines().count();
    let new_records = agent.flow_records();
    assert!(
        new_records.iter().all(|r| r["verdict"] == "would_drop"),
        "{new_records:?}"
    );
    let written = sample(
        &agent.metrics_text(),
        "tollgate_flow_log_events_total",
        &[("outcome", "written")],
    )
    .unwrap();
    assert_eq!(
        written,
        (old_lines + new_records.len()) as f64,
        "every line in one file or the other"
    );
}

#[test]
fn a_flood_of_would_drops_does_not_flood_the_flow_log() {
    let bank = bank("agent-flood");
    let agent = bank.start(&[
        "--log-rate",
        "5",
        "--log-burst",
        "5",
        "--max-flow-series",
        "3",
    ]);
    let started = Instant::now();
    let cpu_before = agent_cpu_ticks(&agent);
    let r = traffic::udp_burst(&bank.frontend, bank.ledger.addr(false), 20000, 3000);
    assert_eq!(r.sent, 3000);
    bank.lab.settle();
    std::thread::sleep(Duration::from_millis(500));
    let elapsed = started.elapsed().as_secs_f64();
    let m = agent.metrics_text();
    let written = sample(
        &m,
        "tollgate_flow_log_events_total",
        &[("outcome", "written")],
    )
    .unwrap();
    let limited = sample(
        &m,
        "tollgate_flow_log_events_total",
        &[("outcome", "rate_limited")],
    )
    .unwrap();
    let lost = sample(&m, "tollgate_flow_log_events_total", &[("outcome", "lost")]).unwrap();
    assert_eq!(
        ledger_packets(&m, "ingress", "would_drop"),
        3000.0,
        "every packet is counted"
    );
    assert_eq!(
        written + limited + lost,
        3000.0,
        "each new flow is logged or counted as suppressed"
    );
    assert_eq!(lost, 0.0);
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(
        written >= 5.0 && written <= 5.0 + 5.0 * elapsed.ceil() + cpus,
        "{written} lines in {elapsed:.1}s at 5/s with bursts of 5"
    );
    assert_eq!(agent.flow_records().len() as f64, written);
    // 3,000 destination ports are 3,000 peer-pair series at the ledger: bounded, the rest counted.
    let series = m
        .lines()
        .filter(|l| l.starts_with("tollgate_flow_packets_total{"))
        .count();
    assert!(series <= 3, "{series} flow series");
    let overflow = sample(&m, "tollgate_flow_series_overflow_total", &[]).unwrap();
    let in_series = sample(&m, "tollgate_flow_packets_total", &[]).unwrap_or(0.0);
    let frontend_egress = sample(
        &m,
        "tollgate_flow_packets_total",
        &[("src_workload", "frontend-0"), ("direction", "egress")],
    )
    .unwrap_or(0.0);
    assert!(overflow > 0.0);
    // Each datagram is seen at the frontend's egress and the ledger's ingress; the ledger's
    // port unreachable errors (the kernel rate-limits them) at the ledger's egress and the
    // frontend's ingress.
    let errors = ledger_packets(&m, "egress", "would_drop");
    assert_eq!(
        in_series + overflow,
        3000.0 * 2.0 + errors * 2.0,
        "{in_series} in series + {overflow} overflow ({frontend_egress} at the frontend, {errors} ICMP errors)"
    );
    let cpu = (agent_cpu_ticks(&agent) - cpu_before) as f64 / 100.0;
    eprintln!("agent CPU during a flood of 3000 would-drop flows: {cpu:.2}s over {elapsed:.1}s");
}

fn agent_cpu_ticks(agent: &Agent) -> u64 {
    // The agent runs as a child of nsenter, which execs it: the pid is the agent's.
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.contains("run") && c.contains(agent.admin_socket.to_str().unwrap())
            })
        });
    let Some(pid) = pid else { return 0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|x| x.1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

/// Runs a PromQL query against the lab's Prometheus (127.0.0.1:19090 in `node`); the JSON
/// answer.
fn prometheus_query(node: &str, q: &str) -> Option<serde_json::Value> {
    let node = node.to_string();
    let q = q.to_string();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let _g = tollgate_tests::NetNsGuard::enter(&node);
        let mut s = std::net::TcpStream::connect("127.0.0.1:19090").ok()?;
        let enc: String = q
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        write!(
            s,
            "GET /api/v1/query?query={enc} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let body = text.split_once("\r\n\r\n")?.1;
        let start = body.find('{')?;
        serde_json::from_str(body[start..].trim_end_matches(|c: char| c != '}')).ok()
    })
    .join()
    .ok()
    .flatten()
}

#[test]
fn prometheus_scrapes_what_the_traffic_was() {
    let bank = bank("agent-prometheus");
    let agent = bank.start(&[]);
    assert_eq!(bank.to_ledger(&bank.pot, 7), 7);
    assert_eq!(bank.to_ledger(&bank.frontend, 3), 3);
    assert_eq!(
        traffic::ping(&bank.prometheus, bank.ledger.addr(false), 2),
        2
    );
    bank.lab.settle();

    // What curl gets is the Prometheus text format, which `promtool check metrics` lints
    // clean; Prometheus, which asks for OpenMetrics first, gets that.
    let plain = agent.metrics_text();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus)");
    lint.stdin
        .take()
        .unwrap()
        .write_all(plain.as_bytes())
        .unwrap();
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    assert!(plain.contains("# TYPE tollgate_packets_total counter\n"));
    let (code, openmetrics) = agent
        .http_accepting(
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        )
        .unwrap();
    assert_eq!(code, 200);
    assert!(openmetrics.contains("# TYPE tollgate_packets counter\n"));
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");

    let prom_dir = bank.dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: tollgate\n  static_configs: [{{targets: ['{}']}}]\n",
            agent.metrics
        ),
    )
    .unwrap();
    let mut prom = Command::new("ip")
        .args(["netns", "exec", &bank.lab.node, "prometheus"])
        .arg(format!(
            "--config.file={}",
            prom_dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:19090")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(prom_dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("run prometheus (Debian package prometheus)");
    let node = bank.lab.node.clone();
    let query = |q: &str| -> Option<f64> {
        prometheus_query(&node, q)?["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ledger = format!("namespace=\"bank\",pod=\"{LEDGER_POD}\"");
        let cases = [
            (format!("tollgate_packets_total{{{ledger},direction=\"ingress\",verdict=\"allowed\"}}"), 7.0),
            // The frontend's datagrams and the pings (monitoring may only use 9090).
            (format!("tollgate_packets_total{{{ledger},direction=\"ingress\",verdict=\"would_drop\"}}"), 3.0 + 2.0),
            (format!("sum(tollgate_packets_total{{{ledger},direction=\"egress\"}})"), 7.0 + 3.0 + 2.0),
            // Seen at the ledger (ingress): each datagram and its echo.
            ("sum(tollgate_flow_packets_total{src_workload=\"pot-0\",dst_workload=\"ledger\",direction=\"ingress\",verdict=\"allowed\",protocol=\"udp\",port=\"8080\"})".to_string(), 14.0),
            // Seen at pot (egress): the same flow from its source.
            ("sum(tollgate_flow_packets_total{src_workload=\"pot-0\",dst_workload=\"ledger\",direction=\"egress\",verdict=\"allowed\"})".to_string(), 14.0),
            ("sum(tollgate_flow_packets_total{src_namespace=\"monitoring\",dst_workload=\"ledger\",direction=\"ingress\",verdict=\"would_drop\",protocol=\"icmp\"})".to_string(), 4.0),
            (format!("tollgate_workload_isolated{{{ledger},direction=\"ingress\"}}"), 1.0),
        ];
        for (q, expected) in cases {
            let got = wait_for(
                Duration::from_secs(30),
                &format!("prometheus answers {q}"),
                || query(&q),
            );
            assert_eq!(got, expected, "{q}");
        }
        // Every query of the Grafana dashboard returns data from a real agent's metrics.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let queries = tollgate_tests::deploy::dashboard_queries(&root);
        assert!(queries.len() >= 10, "{queries:?}");
        for q in queries {
            wait_for(
                Duration::from_secs(30),
                &format!("the dashboard query {q} returns data"),
                || {
                    let answer = prometheus_query(&node, &q)?;
                    assert_eq!(answer["status"], "success", "{q}: {answer}");
                    (!answer["data"]["result"].as_array()?.is_empty()).then_some(())
                },
            );
        }

        // Cluster-wide advice and graph from what Prometheus scraped (every node's series).
        let in_node = |args: &[&str]| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &node,
                    tollgate_tests::agent::tollgate_bin(),
                ])
                .args(args)
                .output()
                .expect("run tollgate in the node")
        };
        let url = "http://127.0.0.1:19090";
        let state = agent.cluster_state.to_str().unwrap();
        let out = in_node(&[
            "advise",
            "--prometheus",
            url,
            "--cluster-state",
            state,
            "--window",
            "1h",
        ]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        let yaml = String::from_utf8(out.stdout).unwrap();
        let docs: Vec<serde_json::Value> = yaml
            .split("---\n")
            .map(|d| serde_norway::from_str(d).expect("advice YAML"))
            .collect();
        let ledger = docs
            .iter()
            .find(|d| d["metadata"]["name"] == "ledger-observed")
            .unwrap_or_else(|| panic!("{yaml}"));
        assert_eq!(
            ledger["spec"]["ingress"],
            serde_json::json!([{"from": [{"podSelector": {"matchLabels": {"app": "pot"}}}], "ports": [{"protocol": "UDP", "port": 8080}]}]),
            "{yaml}"
        );
        assert!(
            err.contains("left out (seen only denied; --include-denied allows it): ingress bank/frontend-0 -> bank/ledger 8080/udp"),
            "{err}"
        );
        assert!(err.contains(": all allowed"), "{err}");
        // Only the agents' own series, when told which: the same advice from the job that
        // scrapes them, none from another (whatever it exported), bad matchers refused.
        let matched = |matchers: &str| {
            in_node(&[
                "advise",
                "--prometheus",
                url,
                "--prometheus-match",
                matchers,
                "--cluster-state",
                state,
                "--window",
                "1h",
            ])
        };
        let ours = matched("job=\"tollgate\"");
        assert!(
            ours.status.success(),
            "{}",
            String::from_utf8_lossy(&ours.stderr)
        );
        assert_eq!(String::from_utf8(ours.stdout).unwrap(), yaml);
        let theirs = matched("job=\"elsewhere\"");
        assert!(theirs.status.success());
        assert!(
            theirs.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&theirs.stdout)
        );
        assert_eq!(matched("job=tollgate").status.code(), Some(2));
        let out = in_node(&["graph", "--prometheus", url, "--window", "1h"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dot = String::from_utf8(out.stdout).unwrap();
        let edges: Vec<&str> = dot.lines().filter(|l| l.contains("->")).collect();
        assert_eq!(
            edges,
            [
                r##"  "bank/frontend-0" -> "bank/ledger" [label="8080/udp", color="#ef6c00", fontcolor="#ef6c00", tooltip="would_drop"];"##,
                r##"  "bank/pot-0" -> "bank/ledger" [label="8080/udp", color="#2e7d32", fontcolor="#2e7d32", tooltip="allowed"];"##,
                r##"  "monitoring/prometheus-0" -> "bank/ledger" [label="icmp", color="#ef6c00", fontcolor="#ef6c00", tooltip="would_drop"];"##,
            ],
            "{dot}"
        );
        // Safe to flip across the cluster, through the same Prometheus: the ledger was
        // observed for seconds and had would-drops; refused before any API call.
        let out = in_node(&[
            "mode",
            "set",
            "bank/ledger",
            "drop",
            "--kubernetes",
            "--if-quiet",
            "1h",
            "--prometheus",
            url,
            "--cluster-state",
            state,
        ]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("every node's record through http://127.0.0.1:19090"),
            "{err}"
        );
        assert!(err.contains("bank/ledger: observed for"), "{err}");
        assert!(err.contains("bank/ledger: a would-drop within 1h"), "{err}");
        assert!(
            err.lines().any(|l| l
                .contains("would-drop: ingress bank/frontend-0 -> bank/ledger 8080/udp (")
                && l.ends_with("packets), denied at the ingress of bank/ledger")),
            "{err}"
        );
        // Each would-drop explained from the cluster state: the policy isolating the
        // ledger and the rule that would let the frontend in.
        let explained = err
            .lines()
            .skip_while(|l| !l.contains("would-drop: ingress bank/frontend-0"))
            .nth(1)
            .unwrap_or_default();
        assert!(
            explained.contains(&format!("denied at the ingress of bank/{LEDGER_POD} (isolated by bank/ledger-ingress); to allow it, add to bank/ledger-ingress the ingress rule {{from: [{{podSelector: {{matchLabels: {{app: frontend}}}}}}]")),
            "{err}"
        );
    }));
    let _ = prom.kill();
    let _ = prom.wait();
    if let Err(e) = result {
        eprintln!(
            "{}",
            std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
    drop(agent);
}

#[test]
fn a_workload_whose_interface_appears_later_is_attached_when_it_does() {
    let mut bank = bank("agent-late");
    let agent = bank.start(&[]);
    // The cluster state names a pod before its interface exists (the CNI is slower).
    let late = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: late-0, namespace: bank, labels: {app: late}, annotations: {tollgate.io/interface: hlate}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {phase: Running, podIPs: [{ip: 10.1.0.14}]}\n";
    bank.write_state(&agent, late);
    wait_for(Duration::from_secs(5), "the agent read the new pod", || {
        agent.log().contains("late-0").then_some(())
    });
    assert_eq!(agent.status()["workloads"].as_array().unwrap().len(), 4);
    let pod = bank.lab.add_pod("late");
    assert_eq!(pod.ipv4.to_string(), "10.1.0.14");
    wait_for(Duration::from_secs(5), "the late workload attached", || {
        (agent.status()["workloads"].as_array()?.len() == 5).then_some(())
    });
    // And it is enforced like any other: the ledger policy applies to traffic it sends.
    assert_eq!(
        traffic::udp(&pod, bank.ledger.addr(false), 8080, 1, 64, PATIENT).echoed,
        1
    );
    let m = agent.metrics_text();
    assert_eq!(
        sample(
            &m,
            "tollgate_packets_total",
            &[
                ("pod", "late-0"),
                ("direction", "egress"),
                ("verdict", "allowed")
            ]
        ),
        Some(1.0)
    );
}

/// `mode set TARGET drop --if-quiet DURATION` refuses a workload observed for less than
/// DURATION or with a would-drop within it, naming the flows and what would allow them, and
/// changes nothing; a flip to log is never refused; the record survives a restart.
#[test]
fn a_flip_to_drop_waits_until_the_workload_has_been_quiet_long_enough() {
    let bank = bank("if-quiet");
    let mut agent = bank.start(&[]);
    let ledger = format!("bank/{LEDGER_POD}");
    let mode_of = |agent: &Agent| agent.workload(LEDGER_POD).expect("ledger")["mode"].clone();
    let refused = |agent: &Agent, window: &str| {
        let out = agent.cli(&["mode", "set", "bank/ledger", "drop", "--if-quiet", window]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "refused: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    };

    // Just attached: not observed long enough, whatever the traffic.
    let err = refused(&agent, "1h");
    assert!(err.contains("bank/ledger: observed for"), "{err}");
    assert!(err.contains("less than 1h"), "{err}");
    assert!(err.contains("nothing changed"), "{err}");
    assert_eq!(mode_of(&agent), "log");

    // A would-drop (frontend is not allowed in): refused within a window that holds it,
    // with the flow and the rule that would allow it.
    assert_eq!(
        bank.to_ledger(&bank.frontend, 4),
        4,
        "log mode lets it pass"
    );
    bank.lab.settle();
    let w = wait_for(Duration::from_secs(10), "the would-drop noted", || {
        let w = agent.workload(LEDGER_POD)?;
        w["seconds_since_would_drop"].as_u64().map(|_| w)
    });
    assert_eq!(
        w["would_drop_last_hour"], 8,
        "4 datagrams and their 4 echoes: {w}"
    );
    assert_eq!(w["would_drop_last_day"], 8);
    assert!(w["observed_seconds"].as_u64().is_some(), "{w}");
    // status names the latest would-drop and what would allow it.
    let w = wait_for(Duration::from_secs(5), "the latest would-drop", || {
        let w = agent.workload(LEDGER_POD)?;
        w["latest_would_drop"].is_string().then_some(w)
    });
    assert!(
        w["latest_would_drop"]
            .as_str()
            .unwrap()
            .ends_with(&format!("ingress bank/frontend-0 -> {ledger} 8080/udp")),
        "{w}"
    );
    assert!(
        w["latest_would_drop_explanation"]
            .as_str()
            .is_some_and(|e| e.contains("add to bank/ledger-ingress the ingress rule")),
        "{w}"
    );
    let text = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(
        text.contains(&format!("latest would-drop of {ledger}:")),
        "{text}"
    );
    let err = refused(&agent, "3s");
    assert!(
        err.contains("bank/ledger: would-drop packet(s) within 3s, the last")
            && err.contains("(8 counted in the clock hours it overlaps)"),
        "{err}"
    );
    assert!(
        err.contains(&format!("ingress bank/frontend-0 -> {ledger} 8080/udp")),
        "{err}"
    );
    assert!(
        err.contains("add to bank/ledger-ingress the ingress rule {from: [{podSelector: {matchLabels: {app: frontend}}}], ports: [{protocol: UDP, port: 8080}]}"),
        "{err}"
    );
    assert_eq!(mode_of(&agent), "log", "a refusal changes nothing");
    // Rolling back to log is never refused.
    let out = agent.cli(&["mode", "set", "bank/ledger", "log", "--if-quiet", "30d"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `flows` explains its would-drops too.
    let out = agent.cli(&["flows", "--once", "-o", "json"]);
    let flows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flows json");
    let denied = flows["recent_denied"].as_array().expect("recent_denied");
    assert!(
        denied.iter().any(|r| r["explanation"]
            .as_str()
            .is_some_and(|e| e.contains("denied at the ingress of bank/ledger"))),
        "{flows}"
    );

    // Quiet for longer than the window, observed for longer: the flip goes through.
    std::thread::sleep(Duration::from_secs(4));
    let out = agent.cli(&["mode", "set", "bank/ledger", "drop", "--if-quiet", "3s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&agent), "drop");

    // The record is the workload's and outlives the agent.
    let observed = agent.workload(LEDGER_POD).unwrap()["observed_seconds"]
        .as_u64()
        .unwrap();
    agent.stop();
    agent.restart();
    let w = wait_for(Duration::from_secs(10), "the ledger back", || {
        agent.workload(LEDGER_POD)
    });
    assert!(w["observed_seconds"].as_u64().unwrap() >= observed, "{w}");
    assert!(w["seconds_since_would_drop"].as_u64().unwrap() >= 4, "{w}");
    assert_eq!(w["would_drop_last_hour"], 8, "{w}");
    // A refusal after the restart still names the would-drop peer pair, from the record,
    // with what would allow it.
    let err = refused(&agent, "1h");
    let pair = "would-drop: ingress bank/frontend-0 -> bank/ledger 8080/udp (8 packets), denied at the ingress of bank/ledger";
    let mut lines = err.lines().skip_while(|l| l.trim() != pair);
    assert!(lines.next().is_some(), "{err}");
    assert!(
        lines.next().is_some_and(|l| l.contains("add to bank/ledger-ingress the ingress rule {from: [{podSelector: {matchLabels: {app: frontend}}}]")),
        "{err}"
    );
    let m = agent.metrics_text();
    let since = sample(
        &m,
        "tollgate_workload_observed_since_timestamp_seconds",
        &[("pod", LEDGER_POD)],
    )
    .expect("observed-since gauge");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - since >= observed as f64, "{since} {now} {observed}");
}

/// A pod replaced under its own name (a StatefulSet's pod on a new interface and address)
/// is attached anew, and its slot counts from zero: its series goes on from where it was,
/// never back.
#[test]
fn a_pod_attached_anew_under_its_name_continues_its_counters() {
    let mut bank = bank("reattach");
    let agent = bank.start(&[]);
    // Map occupancy is counted as soon as the first sync is done, not only after the first
    // 30 s interval: never the empty maps of a cold start.
    wait_for(Duration::from_secs(5), "map occupancy counted", || {
        (sample(
            &agent.metrics_text(),
            "tollgate_map_entries",
            &[("map", "WORKLOADS")],
        )? >= 2.0)
            .then_some(())
    });
    assert_eq!(bank.to_ledger(&bank.pot, 3), 3);
    bank.lab.settle();
    let counted = |m: &str| {
        (
            ledger_packets(m, "ingress", "allowed"),
            ledger_packets(m, "egress", "allowed"),
        )
    };
    let before = counted(&agent.metrics_text());
    assert_eq!(before, (3.0, 3.0));
    let iface = |agent: &Agent| {
        agent
            .workload(LEDGER_POD)
            .map(|w| w["attached_at"].to_string())
    };
    let old_iface = iface(&agent).unwrap();
    let moved = bank.lab.add_pod("ledger-again");
    bank.lab.serve(&moved, &[8080], &[8080]);
    let yaml = bank
        .cluster_yaml("")
        .replace(&bank.ledger.ipv4.to_string(), &moved.ipv4.to_string())
        .replace(&bank.ledger.ipv6.to_string(), &moved.ipv6.to_string());
    std::fs::write(agent.cluster_state.join("bank.yaml"), yaml).unwrap();
    wait_for(Duration::from_secs(15), "attached anew", || {
        iface(&agent).filter(|i| *i != old_iface)
    });
    let after = counted(&agent.metrics_text());
    assert_eq!(after, before, "carried over");
    assert_eq!(
        traffic::udp(&bank.pot, moved.addr(false), 8080, 2, 64, PATIENT).echoed,
        2
    );
    bank.lab.settle();
    assert_eq!(counted(&agent.metrics_text()), (5.0, 5.0));

    // Deleted, then made again under its name (a StatefulSet's pod): its series go on from
    // where they were.
    let yaml = std::fs::read_to_string(agent.cluster_state.join("bank.yaml")).unwrap();
    let without: Vec<&str> = yaml
        .split("---\n")
        .filter(|doc| !(doc.contains("kind: Pod") && doc.contains(&format!("name: {LEDGER_POD}"))))
        .collect();
    std::fs::write(agent.cluster_state.join("bank.yaml"), without.join("---\n")).unwrap();
    wait_for(Duration::from_secs(15), "detached", || {
        agent.workload(LEDGER_POD).is_none().then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(agent.cluster_state.join("bank.yaml"), yaml).unwrap();
    wait_for(Duration::from_secs(15), "attached again", || {
        agent.workload(LEDGER_POD)
    });
    assert_eq!(counted(&agent.metrics_text()), (5.0, 5.0), "continued");
    assert_eq!(
        traffic::udp(&bank.pot, moved.addr(false), 8080, 1, 64, PATIENT).echoed,
        1
    );
    bank.lab.settle();
    assert_eq!(counted(&agent.metrics_text()), (6.0, 6.0));
}

/// A rollout replaces a pod: the new pod of the same workload carries the workload's record
/// (observed since, would-drops), so it neither starts a fresh quiet period nor hides the
/// old pod's would-drops from `--if-quiet`.
#[test]
fn a_replaced_pod_carries_its_workloads_record() {
    let bank = bank("rollout");
    let agent = bank.start(&[]);
    assert_eq!(bank.to_ledger(&bank.frontend, 3), 3);
    bank.lab.settle();
    let before = wait_for(Duration::from_secs(10), "the would-drop noted", || {
        let w = agent.workload(LEDGER_POD)?;
        (w["would_drop_last_hour"] == 6).then_some(w)
    });
    // The Deployment's new pod: another name, the same workload (and, in the lab, the same
    // interface and address).
    let replacement = "ledger-7d9c8b5f4-r011d";
    std::fs::write(
        agent.cluster_state.join("bank.yaml"),
        bank.cluster_yaml("").replace(LEDGER_POD, replacement),
    )
    .unwrap();
    let after = wait_for(Duration::from_secs(15), "the new pod attached", || {
        agent.workload(replacement)
    });
    assert!(agent.workload(LEDGER_POD).is_none(), "the old pod is gone");
    assert_eq!(after["would_drop_last_hour"], 6, "{after}");
    let observed = |w: &serde_json::Value| w["observed_seconds"].as_u64().expect("observed");
    assert!(observed(&after) >= observed(&before), "{before} {after}");
    let out = agent.cli(&["mode", "set", "bank/ledger", "drop", "--if-quiet", "1h"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bank/ledger: 6 would-drop packet(s) within 1h"),
        "{err}"
    );
    assert!(
        err.contains("would-drop: ingress bank/frontend-0 -> bank/ledger 8080/udp (6 packets)"),
        "{err}"
    );
}

/// `tollgate advise` on real traffic: what was observed in log mode becomes policies that
/// select by stable labels; the replay proof holds; applied, the same traffic is allowed
/// with no new would-drop while a flow never seen is a would-drop.
#[test]
fn advised_policies_allow_the_observed_traffic_and_nothing_new() {
    let bank = bank("advise");
    let agent = bank.start(&[]);
    let ledger = bank.ledger.addr(false);
    let udp = |from: &Pod, n| traffic::udp(from, ledger, 8080, n, 64, PATIENT).echoed;
    assert_eq!(udp(&bank.pot, 3), 3);
    assert_eq!(udp(&bank.frontend, 2), 2, "a would-drop in log mode");
    bank.lab.settle();

    // Peers seen only as would-drops are left out by default, and said so.
    let out = agent.cli(&["advise"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("left out (seen only denied; --include-denied allows it): ingress bank/frontend-0 -> bank/ledger 8080/udp"),
        "{err}"
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> = yaml
        .split("---\n")
        .map(|d| serde_norway::from_str(d).expect("advice YAML"))
        .collect();
    let policy = |name: &str| {
        docs.iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in\n{yaml}"))
            .clone()
    };
    let l = policy("ledger-observed");
    assert_eq!(l["metadata"]["namespace"], "bank");
    assert_eq!(
        l["spec"]["podSelector"]["matchLabels"],
        serde_json::json!({"app": "ledger"}),
        "stable labels, not pod-template-hash"
    );
    assert_eq!(l["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    assert_eq!(
        l["spec"]["ingress"],
        serde_json::json!([{"from": [{"podSelector": {"matchLabels": {"app": "pot"}}}], "ports": [{"protocol": "UDP", "port": 8080}]}])
    );
    // Each caller's egress, as its own agent-side enforcement point saw it.
    let f = policy("frontend-0-observed");
    assert_eq!(
        f["spec"]["egress"],
        serde_json::json!([{"to": [{"podSelector": {"matchLabels": {"app": "ledger"}}}], "ports": [{"protocol": "UDP", "port": 8080}]}])
    );
    assert!(
        err.contains(
            "observed flows against the policies in force plus these 3 policies: all allowed"
        ),
        "{err}"
    );

    // --explain says why each left-out flow is denied and what would allow it.
    let out = agent.cli(&["advise", "--explain"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains(&format!(
            "explain: ingress bank/frontend-0 -> bank/ledger 8080/udp: denied at the ingress of bank/{LEDGER_POD}"
        )),
        "{err}"
    );
    assert!(
        err.contains("{from: [{podSelector: {matchLabels: {app: frontend}}}], ports: [{protocol: UDP, port: 8080}]}"),
        "{err}"
    );

    // The same advice as one rule file per edge, and as the label-per-destination design.
    let rules = bank.dir.join("rules");
    let out = agent.cli(&[
        "advise",
        "--style",
        "rule-files",
        "--out",
        rules.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rule =
        std::fs::read_to_string(rules.join("service.bank.pot-0/egress/service.bank.ledger.rule"))
            .expect("the pot's edge to the ledger");
    assert!(
        rule.contains("ports: [{protocol: UDP, port: 8080}]"),
        "{rule}"
    );
    let out = agent.cli(&["advise", "--style", "labels"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let labels_yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        labels_yaml.contains("egress.tollgate.io/bank.ledger: \"true\""),
        "{labels_yaml}"
    );
    assert!(
        err.contains("label the pod template of bank/pot-0: egress.tollgate.io/bank.ledger=true"),
        "{err}"
    );
    assert!(err.contains(": all allowed"), "{err}");

    // With the would-drop peer too, applied: the same traffic passes without a would-drop,
    // a flow never observed is one.
    let out = agent.cli(&["advise", "--include-denied", "--namespace", "bank"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let advised = String::from_utf8(out.stdout).unwrap();
    assert!(advised.contains("app: frontend"), "{advised}");
    bank.write_state(&agent, &format!("---\n{advised}"));
    wait_for(
        Duration::from_secs(15),
        "the advised policies in force",
        || (agent.status()["policies"] == 4).then_some(()),
    );
    let would = |agent: &Agent| agent.counters(LEDGER_POD)[1];
    let before = would(&agent);
    assert_eq!(udp(&bank.pot, 3), 3);
    assert_eq!(udp(&bank.frontend, 2), 2);
    bank.lab.settle();
    assert_eq!(would(&agent), before, "observed traffic is allowed now");
    assert_eq!(udp(&bank.prometheus, 2), 2, "log mode");
    bank.lab.settle();
    assert_eq!(
        would(&agent),
        before + 2,
        "a flow never observed is a would-drop"
    );

    // The callers' advised egress is in force too: the frontend's observed call passes its
    // egress, a call it never made is a would-drop there, explained at the source (status,
    // flows, advise --explain), with the advised policy as the one to extend.
    let egress_would = |agent: &Agent| agent.counters("frontend-0")[4];
    let before = egress_would(&agent);
    assert_eq!(udp(&bank.frontend, 2), 2);
    bank.lab.settle();
    assert_eq!(egress_would(&agent), before, "the observed call passes");
    let _ = traffic::udp(
        &bank.frontend,
        bank.prometheus.addr(false),
        9090,
        2,
        64,
        FAIL_FAST,
    );
    bank.lab.settle();
    assert_eq!(egress_would(&agent), before + 2, "a call never observed");
    let at_egress = "denied at the egress of bank/frontend-0 (isolated by bank/frontend-0-observed); to allow it, add to bank/frontend-0-observed the egress rule {to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}, podSelector: {matchLabels: {app: prometheus}}}], ports: [{protocol: UDP, port: 9090}]}";
    let w = wait_for(Duration::from_secs(10), "the frontend's would-drop", || {
        let w = agent.workload("frontend-0")?;
        w["latest_would_drop_explanation"].is_string().then_some(w)
    });
    assert_eq!(w["latest_would_drop_explanation"], at_egress, "{w}");
    let out = agent.cli(&["flows", "--once", "-o", "json"]);
    let flows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flows json");
    assert!(
        flows["recent_denied"]
            .as_array()
            .expect("recent_denied")
            .iter()
            .any(|r| r["explanation"] == at_egress),
        "{flows}"
    );
    // The would-drop series row too, and allowed rows carry no explanation.
    let busiest = flows["busiest"].as_array().expect("busiest");
    assert!(
        busiest.iter().any(|r| r["verdict"] == "would_drop"
            && r["direction"] == "egress"
            && r["dst"] == "monitoring/prometheus-0"
            && r["explanation"] == at_egress),
        "{flows}"
    );
    assert!(
        busiest
            .iter()
            .filter(|r| r["verdict"] == "allowed")
            .all(|r| r.get("explanation").is_none()),
        "{flows}"
    );
    let out = agent.cli(&["advise", "--explain", "--workload", "bank/frontend-0"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains(&format!(
            "explain: egress bank/frontend-0 -> monitoring/prometheus-0 9090/udp: {at_egress}"
        )),
        "{err}"
    );
    assert!(
        !err.contains("ingress bank/"),
        "only the frontend's own pairs: {err}"
    );
}

/// `tollgate graph` of a known scenario: exactly its edges, coloured by verdict, and an SVG
/// rendered by graphviz.
#[test]
fn the_graph_of_observed_traffic_has_exactly_its_edges_and_renders() {
    let bank = bank("graph");
    let agent = bank.start(&[]);
    let ledger = bank.ledger.addr(false);
    assert_eq!(
        traffic::udp(&bank.pot, ledger, 8080, 3, 64, PATIENT).echoed,
        3
    );
    assert_eq!(
        traffic::udp(&bank.frontend, ledger, 8080, 2, 64, PATIENT).echoed,
        2
    );
    bank.lab.settle();

    let out = agent.cli(&["graph"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dot = String::from_utf8(out.stdout).unwrap();
    let edges: Vec<&str> = dot.lines().filter(|l| l.contains("->")).collect();
    assert_eq!(
        edges,
        [
            // Allowed at the frontend's egress, a would-drop at the ledger's ingress.
            r##"  "bank/frontend-0" -> "bank/ledger" [label="8080/udp", color="#ef6c00", fontcolor="#ef6c00", tooltip="would_drop"];"##,
            r##"  "bank/pot-0" -> "bank/ledger" [label="8080/udp", color="#2e7d32", fontcolor="#2e7d32", tooltip="allowed"];"##,
        ],
        "{dot}"
    );
    assert!(dot.contains("subgraph \"cluster_bank\""), "{dot}");

    let out = agent.cli(&["graph", "--verdict", "would_drop"]);
    let dot = String::from_utf8(out.stdout).unwrap();
    assert_eq!(dot.matches("->").count(), 1, "{dot}");
    assert!(dot.contains("bank/frontend-0"), "{dot}");

    let svg = bank.dir.join("graph.svg");
    let out = agent.cli(&["graph", "-o", "svg", "--out", svg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&svg).expect("the SVG");
    assert!(svg.contains("<svg"), "{svg}");
    assert!(
        svg.contains("bank/pot&#45;0&#45;&gt;bank/ledger"),
        "an edge: {svg}"
    );
    let png = bank.dir.join("graph.png");
    let out = agent.cli(&["graph", "-o", "png", "--out", png.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&png).expect("the PNG");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "{} bytes",
        png.len()
    );
}

/// With --max-flow-series reached, a new series takes the place of the one idle longest
/// (a scan cannot hold the series for good), and one that comes back continues from its
/// last value (counters never go backwards).
#[test]
fn idle_flow_series_give_way_to_new_ones_and_come_back_where_they_were() {
    let bank = bank("series-idle");
    let mut agent = bank.start(&["--max-flow-series", "4", "--flow-series-idle", "1s"]);
    let ledger = bank.ledger.addr(false);
    let series = |m: &str, src: &str, verdict: &str, direction: &str| {
        sample(
            m,
            "tollgate_flow_packets_total",
            &[
                ("src_workload", src),
                ("dst_workload", "ledger"),
                ("verdict", verdict),
                ("direction", direction),
            ],
        )
    };
    assert_eq!(
        traffic::udp(&bank.pot, ledger, 8080, 3, 64, PATIENT).echoed,
        3
    );
    bank.lab.settle();
    let m = agent.metrics_text();
    assert_eq!(series(&m, "pot-0", "allowed", "ingress"), Some(6.0), "{m}");
    assert_eq!(
        traffic::udp(&bank.frontend, ledger, 8080, 2, 64, PATIENT).echoed,
        2
    );
    bank.lab.settle();
    let m = agent.metrics_text();
    assert_eq!(
        series(&m, "frontend-0", "would_drop", "ingress"),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        m.matches("tollgate_flow_packets_total{").count(),
        4,
        "full: {m}"
    );

    // Idle longer than 1s: the pot's series (the oldest) give way to the pings'.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(traffic::ping(&bank.prometheus, ledger, 2), 2);
    bank.lab.settle();
    let m = agent.metrics_text();
    assert_eq!(
        series(&m, "prometheus-0", "would_drop", "ingress"),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        series(&m, "pot-0", "allowed", "ingress"),
        None,
        "given way: {m}"
    );
    assert_eq!(m.matches("tollgate_flow_packets_total{").count(), 4, "{m}");
    assert_eq!(
        sample(&m, "tollgate_flow_series_overflow_total", &[]),
        Some(0.0),
        "nothing lost to overflow: {m}"
    );

    // The pot again: its series comes back where it was, and goes on.
    assert_eq!(
        traffic::udp(&bank.pot, ledger, 8080, 1, 64, PATIENT).echoed,
        1
    );
    bank.lab.settle();
    let m = agent.metrics_text();
    assert_eq!(series(&m, "pot-0", "allowed", "ingress"), Some(8.0), "{m}");

    // Restarted with a lower limit: the largest series stays exported, the others wait,
    // retired, every one of them (more than the limit); back at the old limit, the largest
    // it knows (the ones given way to before too) are there again with their values,
    // before any traffic.
    let all_series = |m: &str| -> BTreeMap<String, f64> {
        m.lines()
            .filter_map(|l| l.strip_prefix("tollgate_flow_packets_total{"))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(labels, v)| (labels.to_string(), v.parse().unwrap()))
            .collect()
    };
    let before = all_series(&m);
    assert_eq!(before.len(), 4, "{m}");
    let mut largest: Vec<f64> = before.values().copied().collect();
    largest.sort_by(|a, b| b.total_cmp(a));
    assert!(agent.stop().success());
    drop(agent);
    let mut lowered = bank.restart(&["--max-flow-series", "1"]);
    let m = lowered.metrics_text();
    let kept = all_series(&m);
    let mut kept_values: Vec<f64> = kept.values().copied().collect();
    kept_values.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(kept_values, largest[..1], "the largest: {m}");
    assert!(kept.iter().all(|(l, v)| before.get(l) == Some(v)), "{m}");
    assert!(lowered.stop().success());
    drop(lowered);
    let raised = bank.restart(&["--max-flow-series", "4"]);
    let m = raised.metrics_text();
    let back = all_series(&m);
    assert_eq!(back.len(), 4, "as many as the limit: {m}");
    assert!(
        back.iter()
            .all(|(l, v)| before.get(l).is_none_or(|b| b == v)),
        "each with its value: {m}"
    );
    assert_eq!(
        back.values().copied().fold(f64::MIN, f64::max),
        largest[0],
        "{m}"
    );
    assert_eq!(
        traffic::udp(&bank.pot, ledger, 8080, 1, 64, PATIENT).echoed,
        1
    );
    bank.lab.settle();
    let m = raised.metrics_text();
    assert_eq!(
        series(&m, "pot-0", "allowed", "ingress"),
        Some(10.0),
        "a retired series continues from its value: {m}"
    );
}

/// The observed-flow record behind `advise` and `graph` outlives the agent and ages out
/// after --record-retention.
#[test]
fn the_observed_record_survives_a_restart_and_ages_out() {
    let bank = bank("record-age");
    let mut agent = bank.start(&["--record-retention", "12s"]);
    assert_eq!(bank.to_ledger(&bank.pot, 2), 2);
    bank.lab.settle();
    let advised = |agent: &Agent| {
        let out = agent.cli(&["advise"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (before, _) = advised(&agent);
    assert!(before.contains("name: ledger-observed"), "{before}");
    agent.stop();
    agent.restart();
    assert_eq!(advised(&agent).0, before, "the record survived the restart");
    // Last seen when a poll folded the packets in (within a poll or two of the traffic):
    // gone once the retention has passed since.
    let waited = Instant::now();
    wait_for(Duration::from_secs(30), "the record aged out", || {
        let (after, err) = advised(&agent);
        (after.is_empty() && err.contains("no observed traffic")).then_some(())
    });
    assert!(
        waited.elapsed() >= Duration::from_secs(5),
        "not before the retention: {:?}",
        waited.elapsed()
    );
}

/// A pod deleted while no agent ran (its interface gone with it, as a CNI does during an
/// agent rollout) leaves a pinned link whose interface is gone: the next agent unpins it and
/// starts, adopting the others, instead of failing to start until `--reset-state`.
#[test]
fn a_pod_deleted_while_the_agent_was_down_does_not_keep_it_from_starting() {
    let bank = bank("deleted-while-down");
    let mut agent = bank.start(&["--default-mode", "drop"]);
    assert!(!bank.frontend_reaches_ledger(), "denied in drop mode");
    agent.stop();
    // The frontend goes: its pod object and its interface on the node.
    let frontend = pod_yaml(&bank.frontend, "bank", "frontend-0", "{app: frontend}", "");
    std::fs::write(
        agent.cluster_state.join("bank.yaml"),
        bank.cluster_yaml("").replace(&frontend, ""),
    )
    .unwrap();
    let out = Command::new("ip")
        .args(["-n", &bank.lab.node, "link", "del", &bank.frontend.host_if])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    agent.restart_unready();
    let started = wait_for(Duration::from_secs(20), "the agent ready or gone", || {
        if let Some(status) = agent.wait_exit(Duration::from_millis(100)) {
            return Some(Err(status));
        }
        agent
            .http("/readyz")
            .filter(|(code, _)| *code == 200)
            .map(Ok)
    });
    assert!(
        started.is_ok(),
        "the agent exited: {started:?}\n{}",
        agent.log()
    );
    wait_for(Duration::from_secs(10), "three workloads", || {
        (agent.status()["workloads"].as_array()?.len() == 3).then_some(())
    });
    // The others were adopted and still enforce: the pot reaches the ledger, the
    // monitoring pod only on the port its rule names.
    assert_eq!(bank.to_ledger(&bank.pot, 2), 2);
    let denied = traffic::udp(
        &bank.prometheus,
        bank.ledger.addr(false),
        8080,
        2,
        64,
        FAIL_FAST,
    );
    assert_eq!(denied.echoed, 0, "still dropped after the restart");
    assert!(
        agent
            .log()
            .contains("a pinned link's interface or cgroup is gone"),
        "{}",
        agent.log()
    );
}

/// A break-glass override the agent cannot save (a full disk, here a directory where its
/// file goes) is refused and changes nothing: not now, not at the next reconcile, and no
/// restart can undo what never applied.
#[test]
fn a_mode_change_that_cannot_be_saved_is_refused_and_changes_nothing() {
    let bank = bank("mode-unsaved");
    let agent = bank.start(&[]);
    let mode_of = |agent: &Agent| agent.workload(LEDGER_POD).expect("ledger")["mode"].clone();
    assert_eq!(mode_of(&agent), "log");
    let blocker = agent.dir.join("state/overrides.tmp");
    std::fs::create_dir_all(&blocker).unwrap();
    let out = agent.cli(&["mode", "set", "bank/ledger", "drop"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("persist overrides"), "{err}");
    assert_eq!(mode_of(&agent), "log");
    assert!(
        agent.status()["overrides"]
            .as_object()
            .is_none_or(|o| o.is_empty()),
        "{}",
        agent.status()
    );
    // Two reconciles later, still as it was, and the frontend still only would-drops.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(mode_of(&agent), "log");
    assert!(bank.frontend_reaches_ledger());
    let audit = std::fs::read_to_string(agent.dir.join("state/audit.log")).unwrap_or_default();
    assert!(!audit.contains("bank/ledger"), "{audit}");
    // Once it can be saved, it applies.
    std::fs::remove_dir(&blocker).unwrap();
    let out = agent.cli(&["mode", "set", "bank/ledger", "drop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&agent), "drop");
    assert!(!bank.frontend_reaches_ledger());
}

/// Cluster-state files that all vanish (a volume not mounted, a directory being replaced)
/// are not an empty cluster: the last good state stays in force and the source reports
/// degraded; an agent started on an empty directory over workloads an earlier one attached
/// refuses to start (exit 2), and their enforcement stays.
#[test]
fn an_emptied_cluster_state_is_not_believed() {
    let bank = bank("emptied-state");
    let mut agent = bank.start(&["--default-mode", "drop"]);
    assert!(!bank.frontend_reaches_ledger());
    let file = agent.cluster_state.join("bank.yaml");
    let kept = std::fs::read_to_string(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    wait_for(Duration::from_secs(10), "the source degraded", || {
        (sample(&agent.metrics_text(), "tollgate_source_degraded", &[]) == Some(1.0)).then_some(())
    });
    assert_eq!(agent.status()["workloads"].as_array().unwrap().len(), 4);
    assert!(!bank.frontend_reaches_ledger(), "still enforced");
    assert_eq!(bank.to_ledger(&bank.pot, 1), 1);

    agent.stop();
    agent.restart_unready();
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .expect("refused to start");
    assert_eq!(status.code(), Some(2), "{}", agent.log());
    assert!(
        agent.log().contains("holds no YAML files"),
        "{}",
        agent.log()
    );
    assert!(
        !bank.frontend_reaches_ledger(),
        "enforcement left as it was"
    );
    assert_eq!(bank.to_ledger(&bank.pot, 1), 1);

    // The files back: it starts and adopts.
    std::fs::write(&file, kept).unwrap();
    agent.restart();
    wait_for(Duration::from_secs(10), "four workloads", || {
        (agent.status()["workloads"].as_array()?.len() == 4).then_some(())
    });
    assert!(!bank.frontend_reaches_ledger());
}

/// Two workloads whose pods carry the same labels are counted apart: the peer of a flow
/// series is the workload that sent, not whichever of the two sorts first.
#[test]
fn workloads_with_the_same_labels_are_told_apart_in_flow_series() {
    let bank = bank("same-labels");
    let agent = bank.start(&[]);
    // A bare pod elsewhere, labelled as the frontend, named to sort before it.
    let twin = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: a-twin, namespace: bank, labels: {app: frontend}}\nspec: {nodeName: another-node}\nstatus: {podIPs: [{ip: 10.99.0.7}]}\n";
    bank.write_state(&agent, twin);
    // The cluster state is polled every 200 ms here.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(bank.frontend_to_ledger(3).echoed, 3, "log mode");
    bank.lab.settle();
    let m = agent.metrics_text();
    let from = |workload: &str| {
        sample(
            &m,
            "tollgate_flow_packets_total",
            &[
                ("direction", "ingress"),
                ("verdict", "would_drop"),
                ("src_workload", workload),
                ("dst_workload", "ledger"),
            ],
        )
    };
    assert!(from("frontend-0").is_some_and(|v| v >= 3.0), "{m}");
    assert_eq!(from("a-twin"), None, "{m}");
}
