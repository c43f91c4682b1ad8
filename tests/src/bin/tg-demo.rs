//! The local demo (`cargo xtask demo`): a small bank's services as network-namespace
//! workloads, a sample policy set, real traffic including some the policies do not allow,
//! the ledger in log mode showing would-drops, then flipped to drop, then a clean teardown.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use agent_common::{DIR_EGRESS, FlowEvent, VERDICT_ALLOWED, VERDICT_DROPPED, VERDICT_WOULD_DROP};
use tollgate::{
    Datapath, Mode, WorkloadPolicy, attach::TcMode, compile::Peer, flowlog::EventReader,
    maps::addr_from_bytes,
};
use tollgate_tests::{
    Lab, Pod,
    support::{allow, attach_tc, register, tcp},
    traffic,
};

struct Service {
    pod: Pod,
    namespace: &'static str,
    slot: u32,
    identity: u32,
}

fn main() {
    println!("Tollgate demo: a ledger that only the pot service and monitoring may call.\n");
    let mut lab = Lab::new();
    let mut services: Vec<Service> = Vec::new();
    for (i, (name, namespace)) in [
        ("ledger", "bank"),
        ("pot", "bank"),
        ("frontend", "bank"),
        ("prometheus", "monitoring"),
    ]
    .into_iter()
    .enumerate()
    {
        services.push(Service {
            pod: lab.add_pod(name),
            namespace,
            slot: i as u32 + 1,
            identity: 300 + i as u32,
        });
    }
    let internet = lab.add_outside("internet");
    let [ledger, pot, frontend, prometheus] = [0, 1, 2, 3].map(|i| &services[i]);
    lab.serve(&ledger.pod, &[8080, 9090], &[]);
    lab.serve(&internet, &[443], &[]);

    let mut dp = lab.datapath(TcMode::Auto);
    for s in &services {
        register(&mut dp, &s.pod, s.identity);
    }
    // The sample policy set, as the policy compiler would hand it down: the ledger is
    // isolated for ingress; pot may call its API (8080), prometheus its metrics (9090).
    let ledger_policy = |mode| WorkloadPolicy {
        mode,
        isolated_ingress: true,
        isolated_egress: false,
        ingress: vec![
            allow(Peer::Identity(pot.identity), tcp(8080)),
            allow(Peer::Identity(prometheus.identity), tcp(9090)),
        ],
        egress: vec![],
    };
    for s in &services {
        let policy = if s.slot == ledger.slot {
            ledger_policy(Mode::Log)
        } else {
            WorkloadPolicy::open(Mode::Log)
        };
        dp.maps
            .set_workload(s.slot, &policy)
            .expect("program workload");
        attach_tc(&lab, &mut dp, s.slot, &s.pod);
    }
    let mut events = dp.events().expect("event reader");
    let names: HashMap<IpAddr, String> = services
        .iter()
        .flat_map(|s| {
            let name = format!("{}/{}", s.namespace, s.pod.name);
            [(s.pod.addr(false), name.clone()), (s.pod.addr(true), name)]
        })
        .collect();

    let traffic_round = |label: &str| {
        println!("--- traffic ({label}) ---");
        let calls = [
            (&pot.pod, "pot -> ledger:8080", 8080),
            (&prometheus.pod, "prometheus -> ledger:9090", 9090),
            (&frontend.pod, "frontend -> ledger:8080 (not allowed)", 8080),
        ];
        for (from, what, port) in calls {
            let r = traffic::tcp(
                from,
                ledger.pod.addr(false),
                port,
                5,
                Duration::from_millis(1500),
            );
            let outcome = if r.echoed == 5 {
                "ok"
            } else {
                "FAILED (dropped by policy)"
            };
            println!("  {what:<42} {outcome}");
        }
        let r = traffic::tcp(
            &ledger.pod,
            internet.addr(false),
            443,
            2,
            Duration::from_millis(1500),
        );
        println!(
            "  {:<42} {}",
            "ledger -> internet:443",
            if r.echoed == 2 { "ok" } else { "FAILED" }
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    traffic_round("ledger in log mode: would-drops pass");
    print_status(&dp, &services);
    print_events(&mut events, &names, &internet);

    println!("\n>>> flipping bank/ledger to drop (one map write, no restart)\n");
    dp.maps
        .set_mode(ledger.slot, Mode::Drop)
        .expect("flip mode");
    traffic_round("ledger in drop mode");
    print_status(&dp, &services);
    print_events(&mut events, &names, &internet);

    println!("\nTearing down: programs detached, namespaces and pins removed.");
    lab.in_node(|| dp.remove()).expect("remove datapath");
}

fn print_status(dp: &Datapath, services: &[Service]) {
    println!(
        "\n{:<22} {:<6} {:>9} {:>11} {:>8} {:>9} {:>11} {:>8}",
        "WORKLOAD", "MODE", "IN_ALLOW", "IN_WOULD", "IN_DROP", "OUT_ALLOW", "OUT_WOULD", "OUT_DROP"
    );
    for s in services {
        let c = dp.maps.counters(s.slot).expect("counters");
        let w = dp.maps.workload(s.slot).expect("workload");
        let mode = if w.mode == 0 { "log" } else { "drop" };
        let p = |d: usize, v: u8| c[d][v as usize].packets;
        println!(
            "{:<22} {:<6} {:>9} {:>11} {:>8} {:>9} {:>11} {:>8}",
            format!("{}/{}", s.namespace, s.pod.name),
            mode,
            p(0, VERDICT_ALLOWED),
            p(0, VERDICT_WOULD_DROP),
            p(0, VERDICT_DROPPED),
            p(1, VERDICT_ALLOWED),
            p(1, VERDICT_WOULD_DROP),
            p(1, VERDICT_DROPPED),
        );
    }
}

fn print_events(events: &mut EventReader, names: &HashMap<IpAddr, String>, internet: &Pod) {
    let seen: Vec<FlowEvent> = events.wait(Duration::from_millis(300));
    println!("\nflow log (sampled would-drops and drops):");
    for e in seen {
        let src = addr_from_bytes(e.family, &e.src);
        let dst = addr_from_bytes(e.family, &e.dst);
        let name = |ip: &IpAddr| {
            names.get(ip).cloned().unwrap_or_else(|| {
                if *ip == internet.addr(false) || *ip == internet.addr(true) {
                    "world".into()
                } else {
                    ip.to_string()
                }
            })
        };
        let verdict = match e.verdict {
            VERDICT_WOULD_DROP => "would_drop",
            VERDICT_DROPPED => "dropped",
            _ => "allowed",
        };
        println!(
            "  {{\"verdict\":\"{verdict}\",\"direction\":\"{}\",\"protocol\":{},\"src\":\"{}\",\"src_ip\":\"{src}\",\"src_port\":{},\"dst\":\"{}\",\"dst_ip\":\"{dst}\",\"dst_port\":{}}}",
            if e.direction == DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            },
            e.proto,
            name(&src),
            e.src_port,
            name(&dst),
            e.dst_port,
        );
    }
}
