//! Edges of the datapath: detach leaves nothing behind, connection tracking lifetimes, the
//! event rate limit under a flood, and malformed packets run through the real program with
//! BPF_PROG_TEST_RUN.

use std::{process::Command, time::Duration};

use agent_common::{Config, DIR_INGRESS, diag, program_names, tcp_state, workload_flags};
use tollgate::{
    Mode, WorkloadPolicy,
    attach::{AttachMethod, AttachPoint, TcMode},
    maps::WorkloadAddresses,
    maps::addr_bytes,
};
use tollgate_tests::{
    Lab,
    frames::{eth, ipv4, ipv6, udp_header},
    run,
    support::{
        PATIENT, Packets, allow_tcp, allow_udp, attach_cgroup, attach_tc, measure, register,
    },
    traffic, wait_for,
};

const ID_A: u32 = 300;
const ID_B: u32 = 301;

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = run("bpftool", &[&["-j"], args].concat());
    serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).expect("bpftool json")
}

/// Links (TCX and cgroup) whose program is one of `ids`.
fn links_of(ids: &[u32]) -> Vec<serde_json::Value> {
    bpftool_json(&["link", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| {
            l["prog_id"]
                .as_u64()
                .is_some_and(|p| ids.contains(&(p as u32)))
        })
        .collect()
}

fn tc_filters(lab: &Lab, iface: &str, hook: &str) -> String {
    run(
        "ip",
        &[
            "netns", "exec", &lab.node, "tc", "filter", "show", "dev", iface, hook,
        ],
    )
}

/// The ids of the programs TCX runs at an interface of the lab's node, both directions.
fn tcx_programs(lab: &Lab, iface: &str) -> Vec<u64> {
    use aya::programs::{SchedClassifier, tc::TcAttachType};
    let mut ids: Vec<u64> = lab.in_node(|| {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .flat_map(|t| SchedClassifier::query_tcx(iface, t).expect("query TCX").1)
            .map(|p| u64::from(p.id()))
            .collect()
    });
    ids.sort();
    ids
}

/// An agent on other pins (another `--bpffs`) takes an earlier agent's programs off the
/// points it attaches, TCX and cgroup, and leaves that agent's programs elsewhere alone.
#[test]
fn another_agents_programs_come_off_the_points_this_one_attaches_and_only_those() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    let mut old = lab.datapath(TcMode::Auto);
    assert_eq!(attach_tc(&lab, &mut old, 1, &a), AttachMethod::Tcx);
    attach_cgroup(&mut old, 2, &a);
    attach_tc(&lab, &mut old, 3, &b);
    let old_ids: Vec<u64> = old.program_ids().into_iter().map(u64::from).collect();
    // Dropped, as by a process that exits: the pinned links stay attached.
    drop(old);

    let mut options = tollgate::datapath::DatapathOptions::new(lab.pin_dir.join("other"));
    options.conntrack_capacity = 65536;
    let mut new = tollgate::datapath::Datapath::load(options).expect("load a second datapath");
    attach_tc(&lab, &mut new, 1, &a);
    attach_cgroup(&mut new, 2, &a);
    let new_ids: Vec<u64> = new.program_ids().into_iter().map(u64::from).collect();
    assert_eq!(
        tcx_programs(&lab, &a.host_if).len(),
        4,
        "both agents' programs at a"
    );

    let sweep = lab.in_node(|| new.remove_stale_links());
    assert!(sweep.errors.is_empty(), "{:?}", sweep.errors);
    let removed = sweep.removed;
    let mut kinds: Vec<String> = removed
        .iter()
        .map(|l| {
            format!("{}@{:?}", l.prog, l.at)
                .split('(')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "cg_egress@Cgroup",
            "cg_ingress@Cgroup",
            "tc_from_pod@Ifindex",
            "tc_to_pod@Ifindex"
        ],
        "{removed:?}"
    );
    let at_a = tcx_programs(&lab, &a.host_if);
    assert!(at_a.iter().all(|id| new_ids.contains(id)), "{at_a:?}");
    assert_eq!(at_a.len(), 2);
    // b is not this datapath's: the earlier programs stay there.
    let at_b = tcx_programs(&lab, &b.host_if);
    assert!(at_b.iter().all(|id| old_ids.contains(id)), "{at_b:?}");
    assert_eq!(at_b.len(), 2);
    // Nothing left to take off.
    assert!(lab.in_node(|| new.remove_stale_links()).removed.is_empty());
}

#[test]
fn detach_leaves_nothing_behind() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    let c = lab.add_pod("c");
    lab.serve(&a, &[], &[53]);
    let mut dp = lab.datapath(TcMode::Auto);
    for slot in 1..=3 {
        dp.maps
            .set_workload(slot, &WorkloadPolicy::open(Mode::Drop))
            .unwrap();
    }
    let ids = dp.program_ids();
    assert_eq!(
        ids.len(),
        7,
        "four programs, the benchmark's two (the empty program and the table alone) and the \
         clock reader"
    );

    assert_eq!(attach_tc(&lab, &mut dp, 1, &a), AttachMethod::Tcx);
    let method = lab
        .in_node(|| {
            dp.attach_with(
                2,
                &AttachPoint::Tc {
                    iface: b.host_if.clone(),
                },
                TcMode::Clsact,
            )
        })
        .unwrap();
    assert_eq!(method, AttachMethod::Clsact);
    attach_cgroup(&mut dp, 3, &c);

    // Attached: 2 TCX links, 2 cgroup links, 2 clsact filters.
    assert_eq!(links_of(&ids).len(), 4, "{:?}", links_of(&ids));
    assert!(tc_filters(&lab, &b.host_if, "ingress").contains(program_names::TC_FROM_POD));
    assert!(tc_filters(&lab, &b.host_if, "egress").contains(program_names::TC_TO_POD));
    let cg = run("bpftool", &["cgroup", "show", c.cgroup.to_str().unwrap()]);
    assert!(
        cg.contains(program_names::CG_INGRESS) && cg.contains(program_names::CG_EGRESS),
        "{cg}"
    );
    assert_eq!(dp.maps.routing_entries(), (2, 1));
    let got = measure(&lab, &dp, 1, || {
        assert_eq!(traffic::ping(&b, a.addr(false), 2), 2)
    });
    assert_eq!(got.in_allowed, 2);

    // clsact filters are netlink objects of the node namespace: detach from there, as the
    // agent (which runs in it) does.
    lab.in_node(|| {
        for slot in 1..=3 {
            assert!(dp.detach(slot).unwrap());
        }
        assert!(!dp.detach(1).unwrap(), "detaching twice is a no-op");
    });
    assert!(links_of(&ids).is_empty(), "{:?}", links_of(&ids));
    for iface in [&a.host_if, &b.host_if] {
        for hook in ["ingress", "egress"] {
            assert_eq!(tc_filters(&lab, iface, hook).trim(), "", "{iface} {hook}");
        }
    }
    let cg = run("bpftool", &["cgroup", "show", c.cgroup.to_str().unwrap()]);
    assert_eq!(cg.trim(), "", "{cg}");
    assert_eq!(dp.maps.routing_entries(), (0, 0));

    // Traffic flows and nothing counts it any more.
    let got = measure(&lab, &dp, 1, || {
        assert_eq!(traffic::ping(&b, a.addr(false), 2), 2);
        assert_eq!(traffic::udp(&c, a.addr(true), 53, 2, 64, PATIENT).echoed, 2);
    });
    assert_eq!(got, Packets::default());

    // Removing the datapath unloads the programs and its pins.
    dp.remove().unwrap();
    assert!(!lab.pin_dir.exists());
    for id in ids {
        wait_for(Duration::from_secs(5), "program unload", || {
            let gone = !Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string()])
                .output()
                .unwrap()
                .status
                .success();
            gone.then_some(())
        });
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn closed_tcp_connections_expire_sooner_than_established_ones() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    lab.serve(&b, &[80], &[53]);
    let mut dp = lab.datapath(TcMode::Auto);
    register(&mut dp, &a, ID_A);
    dp.maps
        .set_config(&Config {
            ct_tcp_established_s: 3600,
            ct_tcp_closing_s: 2,
            ct_other_s: 30,
            ..Config::default()
        })
        .unwrap();
    // The programs read time from jiffies, tied to CLOCK_MONOTONIC_COARSE at load, and
    // `set_config` kept that: the lifetimes checked below hold only if that clock is right.
    let tick = dp.maps.config().unwrap().ns_per_jiffy;
    assert!(
        [10_000_000, 4_000_000, 3_333_333, 1_000_000].contains(&tick),
        "ns per jiffy: {tick}"
    );
    let policy = WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(b.addrs()),
        mode: Mode::Drop,
        isolated_ingress: true,
        isolated_egress: false,
        ingress: vec![allow_tcp(ID_A, 80), allow_udp(ID_A, 53)],
        egress: vec![],
        ..Default::default()
    };
    dp.maps.set_workload(1, &policy).unwrap();
    attach_tc(&lab, &mut dp, 1, &b);

    let entry_for_port = |dp: &tollgate::Datapath, proto: u8| {
        dp.maps
            .conntrack()
            .into_iter()
            .filter(|(k, _)| {
                k.slot == 1 && k.proto == proto && k.remote == addr_bytes(a.addr(false))
            })
            .collect::<Vec<_>>()
    };

    std::thread::scope(|s| {
        let client = s
            .spawn(|| traffic::tcp_hold(&a, b.addr(false), 80, 2, PATIENT, Duration::from_secs(3)));
        let open = wait_for(Duration::from_secs(2), "tracked connection", || {
            entry_for_port(&dp, 6).into_iter().find(|(_, e)| {
                e.tcp_state & tcp_state::REPLY_SEEN != 0
                    && e.expires_ns > monotonic_ns() + 3000 * 1_000_000_000
            })
        });
        let left = open.1.expires_ns.saturating_sub(monotonic_ns());
        assert!(open.1.tcp_state & tcp_state::REPLY_SEEN != 0);
        assert!(left > 3000 * 1_000_000_000, "established: {left} ns left");
        assert_eq!(open.0.local_port, 80);
        assert_eq!(open.1.origin, DIR_INGRESS);
        assert_eq!(client.join().unwrap().echoed, 2);
    });
    lab.settle();
    let (_, closed) = entry_for_port(&dp, 6)
        .pop()
        .expect("closed connection entry");
    assert_eq!(
        closed.tcp_state & (tcp_state::FIN_ORIGIN | tcp_state::FIN_REPLY),
        tcp_state::FIN_ORIGIN | tcp_state::FIN_REPLY
    );
    let left = closed.expires_ns.saturating_sub(monotonic_ns());
    assert!(left <= 2_000_000_000, "closed: {left} ns left");

    assert_eq!(
        traffic::udp(&a, b.addr(false), 53, 1, 64, PATIENT).echoed,
        1
    );
    let (_, udp) = entry_for_port(&dp, 17).pop().expect("udp entry");
    let left = udp.expires_ns.saturating_sub(monotonic_ns());
    assert!(
        left > 25_000_000_000 && left <= 30_000_000_000,
        "udp: {left} ns left"
    );
}

#[test]
fn a_flood_of_denied_flows_is_rate_limited_in_the_kernel_and_every_suppressed_event_counted() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    let mut dp = lab.datapath(TcMode::Auto);
    register(&mut dp, &a, ID_A);
    register(&mut dp, &b, ID_B);
    // One event per second, bursts of 5.
    dp.maps
        .set_config(&Config {
            event_interval_ns: 1_000_000_000,
            event_burst: 5,
            ..Config::default()
        })
        .unwrap();
    let policy = WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(b.addrs()),
        mode: Mode::Log,
        isolated_ingress: true,
        isolated_egress: false,
        ingress: vec![],
        egress: vec![],
        ..Default::default()
    };
    dp.maps.set_workload(1, &policy).unwrap();
    attach_tc(&lab, &mut dp, 1, &b);
    let mut events = dp.events().unwrap();

    let started = std::time::Instant::now();
    let got = measure(&lab, &dp, 1, || {
        let r = traffic::udp_burst(&a, b.addr(false), 20000, 2000);
        assert_eq!(r.sent, 2000, "{r:?}");
    });
    let elapsed = started.elapsed().as_secs() + 1;
    assert_eq!(got.in_would_drop, 2000, "every packet is counted: {got:?}");
    let mut seen = events.wait(Duration::from_millis(500));
    seen.extend(events.drain());
    let bucket = dp.maps.event_bucket(1).unwrap();
    let d = dp.maps.diag().unwrap();
    assert_eq!(
        seen.len() as u64 + bucket.suppressed,
        2000,
        "each new flow is either logged or counted as suppressed"
    );
    assert_eq!(d[diag::EVENT_EMITTED as usize], seen.len() as u64);
    assert_eq!(d[diag::EVENT_RATE_LIMITED as usize], bucket.suppressed);
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert!(
        (5..=5 + elapsed + cpus).contains(&(seen.len() as u64)),
        "burst of 5 plus 1/s (and at most one per CPU racing): {} events in {elapsed}s",
        seen.len()
    );
}

/// The benchmark sets a new flow's cost against `tc_table_floor`'s, as what the table alone
/// costs: it must track a flow (and only when asked), in the table the pipeline uses.
#[test]
fn the_benchmarks_table_alone_tracks_the_flows_it_is_given() {
    let lab = Lab::new();
    let mut dp = lab.datapath(TcMode::Auto);
    let frame = |sport: u16, lookup_only: bool| {
        let mut udp = udp_header(sport, 5353, 8);
        udp[8] = u8::from(lookup_only);
        eth(0x0800, &ipv4(agent_common::PROTO_UDP, 0, &udp))
    };
    let tracked_ports = |dp: &tollgate::Datapath| -> Vec<u16> {
        dp.maps
            .conntrack()
            .into_iter()
            .map(|(k, _)| k.local_port)
            .collect()
    };
    for (sport, lookup_only) in [(40000, false), (40001, true), (40000, false)] {
        let run = lab
            .in_node(|| dp.test_run(program_names::TC_TABLE_FLOOR, &frame(sport, lookup_only), 1))
            .expect("test run");
        assert_eq!(run.retval, -1, "TC_ACT_UNSPEC: the packet goes on");
    }
    assert_eq!(
        tracked_ports(&dp),
        vec![40000],
        "inserted once, looked up after"
    );
    let (key, entry) = dp.maps.conntrack().remove(0);
    assert_eq!(key.local[..4], [10, 1, 0, 10]);
    assert_eq!(key.remote[..4], [10, 1, 0, 11]);
    assert_eq!(key.remote_port, 5353);
    assert_eq!(entry.decision, agent_common::DECISION_ALLOW);
    dp.maps.flush_conntrack();
    lab.in_node(|| dp.remove()).expect("remove datapath");
}

// --- malformed packets through BPF_PROG_TEST_RUN -------------------------------------------

const PASS: i32 = -1;
const DROP: i32 = 2;

/// What `program` returns for `frame`, run once through BPF_PROG_TEST_RUN in the lab's node.
fn run_once(lab: &Lab, dp: &tollgate::Datapath, program: &'static str, frame: &[u8]) -> i32 {
    lab.in_node(|| dp.test_run(program, frame, 1))
        .unwrap()
        .retval
}

/// A datapath whose slot 1 is the workload at ifindex 1, where BPF_PROG_TEST_RUN's packets
/// arrive (its egress at tc_from_pod, its ingress at tc_to_pod): the packets' 10.1.0.10
/// (`OWN`), talking to 10.1.0.11, known as `ID_B`.
fn workload_at_ifindex_one(lab: &Lab) -> tollgate::Datapath {
    let mut dp = lab.datapath(TcMode::Auto);
    dp.maps.set_tc_slot(1, 1).unwrap();
    dp.maps
        .set_identity("10.1.0.11/32".parse().unwrap(), ID_B)
        .unwrap();
    dp
}

/// The workload's own address in the frames of `packets`.
const OWN: &str = "10.1.0.10";

/// Drop mode, isolated both ways, allowing `ingress` and `egress`, sending from `OWN`.
fn isolated_drop(
    ingress: Vec<tollgate::compile::AllowRule>,
    egress: Vec<tollgate::compile::AllowRule>,
) -> WorkloadPolicy {
    WorkloadPolicy {
        mode: Mode::Drop,
        isolated_ingress: true,
        isolated_egress: true,
        ingress,
        egress,
        ..Default::default()
    }
    .sending_from(&[OWN.parse().unwrap()])
}

/// A packet claiming the workload's own address as its source, arriving over its
/// interface, is a spoof (a pod's own loopback never reaches TC): decided by policy like any
/// other, never passed as the pod reaching itself. That pass is for loopback at cgroup
/// hooks only (`cgroup_attachment_counts_and_enforces_socket_traffic`).
#[test]
fn a_packet_from_the_workloads_own_address_over_its_interface_is_decided_by_policy() {
    let lab = Lab::new();
    let mut dp = lab.datapath(TcMode::Auto);
    // BPF_PROG_TEST_RUN packets arrive on ifindex 1: tc_to_pod sees them as slot 1's ingress.
    dp.maps.set_tc_slot(1, 1).unwrap();
    // The frames go to 10.1.0.11 and fd77:1::b, the workload's addresses; their sources are
    // made the same.
    let own: Vec<std::net::IpAddr> =
        vec!["10.1.0.11".parse().unwrap(), "fd77:1::b".parse().unwrap()];
    let v4 = {
        let mut f = eth(0x0800, &ipv4(17, 0, &udp_header(1000, 8080, 8)));
        f.copy_within(14 + 16..14 + 20, 14 + 12);
        f
    };
    let v6 = {
        let mut f = eth(0x86DD, &ipv6(17, &udp_header(1000, 8080, 8)));
        f.copy_within(14 + 24..14 + 40, 14 + 8);
        f
    };
    assert_eq!(&v4[26..30], &v4[30..34]);
    assert_eq!(&v6[22..38], &v6[38..54]);
    let runs =
        |dp: &tollgate::Datapath, frame: &[u8]| run_once(&lab, dp, program_names::TC_TO_POD, frame);
    for mode in [Mode::Drop, Mode::Log] {
        dp.maps
            .set_workload(
                1,
                &WorkloadPolicy {
                    mode,
                    isolated_ingress: true,
                    ..Default::default()
                }
                .sending_from(&own),
            )
            .unwrap();
        let before = Packets::read(&dp, 1);
        let verdict = if mode == Mode::Drop { DROP } else { PASS };
        assert_eq!(runs(&dp, &v4), verdict, "IPv4 in {mode:?}");
        assert_eq!(runs(&dp, &v6), verdict, "IPv6 in {mode:?}");
        let got = Packets::read(&dp, 1).since(before);
        if mode == Mode::Drop {
            assert_eq!(
                got,
                Packets {
                    in_dropped: 2,
                    ..Default::default()
                }
            );
        } else {
            assert_eq!(
                got,
                Packets {
                    in_would_drop: 2,
                    ..Default::default()
                }
            );
        }
    }
}

/// A hostile pod decides what its frames hold: bytes past the end its IP header gives are
/// trimmed by the kernel before the packet goes on, so ports read there are ports no
/// receiver sees. A first fragment whose headers end past the packet's own length passed
/// as the allowed port it appended, and the receiver rebuilt a datagram to a denied one
/// (found by sending IPv6 fragments with a second destination-options header that the
/// receiver's check of the header chain gave up on). And neighbour discovery with the hop
/// limit 255 passed unchecked to any address: it held any payload, from any source.
#[test]
fn headers_past_the_packets_own_length_are_never_read() {
    let lab = Lab::new();
    let mut dp = lab.datapath(TcMode::Auto);
    // BPF_PROG_TEST_RUN frames arrive on ifindex 1: slot 1's egress at tc_from_pod. The
    // frames come from 10.1.0.10 and fd77:1::a, to ID_B at 10.1.0.11 and fd77:1::b.
    dp.maps.set_tc_slot(1, 1).unwrap();
    for peer in ["10.1.0.11/32", "fd77:1::b/128"] {
        dp.maps.set_identity(peer.parse().unwrap(), ID_B).unwrap();
    }
    let own: Vec<std::net::IpAddr> =
        vec!["10.1.0.10".parse().unwrap(), "fd77:1::a".parse().unwrap()];
    dp.maps
        .set_workload(
            1,
            &WorkloadPolicy {
                mode: Mode::Drop,
                isolated_egress: true,
                egress: vec![allow_udp(ID_B, 5353)],
                ..Default::default()
            }
            .sending_from(&own),
        )
        .unwrap();
    let runs = |dp: &tollgate::Datapath, frame: &[u8]| {
        run_once(&lab, dp, program_names::TC_FROM_POD, frame)
    };
    let with_length = |mut packet: Vec<u8>, at: usize, len: u16, appended: &[u8]| {
        packet[at..at + 2].copy_from_slice(&len.to_be_bytes());
        packet.extend(appended);
        packet
    };
    let allowed_udp = udp_header(1000, 5353, 0);

    // Controls: the allowed port passes, with Ethernet padding behind the packet too.
    let honest_v4 = eth(0x0800, &ipv4(17, 0, &udp_header(1000, 5353, 8)));
    let mut padded_v4 = honest_v4.clone();
    padded_v4.extend([0u8; 20]);
    let honest_v6 = eth(0x86DD, &ipv6(17, &udp_header(1000, 5353, 8)));
    for frame in [&honest_v4, &padded_v4, &honest_v6] {
        assert_eq!(runs(&dp, frame), PASS);
    }

    // IPv4 whose total length ends two bytes into the UDP header, the allowed ports behind.
    let v4_short = eth(0x0800, &with_length(ipv4(17, 0, &[]), 2, 22, &allowed_udp));
    // An IPv4 first fragment (more fragments) holding no transport header at all.
    let v4_first = eth(
        0x0800,
        &with_length(ipv4(17, 0x2000, &[]), 2, 20, &allowed_udp),
    );
    // An IPv6 first fragment whose payload length covers its fragment header only.
    let fragment_header = [17u8, 0, 0, 1, 0, 0, 0x43, 0x21];
    let v6_first = eth(
        0x86DD,
        &with_length(ipv6(44, &fragment_header), 4, 8, &allowed_udp),
    );
    // The shape the receiver took: a fragment header, a destination-options header of 16
    // bytes of which the payload length covers 8, a second one and the UDP header behind.
    let v6_chain = {
        let mut rest = vec![60u8, 0, 0, 1, 0, 0, 0x43, 0x22];
        rest.extend([60u8, 1, 0x1e, 12, 0, 0, 0, 0]);
        let mut p = ipv6(44, &rest);
        p.extend([0u8; 8]);
        p.extend([17u8, 0, 0x1e, 4, 0, 0, 0, 0]);
        p.extend(&allowed_udp);
        eth(0x86DD, &p)
    };
    let before = Packets::read(&dp, 1);
    let truncated = dp.maps.diag().unwrap()[diag::TRUNCATED as usize];
    for (name, frame) in [
        ("IPv4 cut short", &v4_short),
        ("IPv4 first fragment", &v4_first),
        ("IPv6 first fragment", &v6_first),
        ("IPv6 header chain", &v6_chain),
    ] {
        assert_eq!(runs(&dp, frame), DROP, "{name}");
    }
    assert_eq!(
        dp.maps.diag().unwrap()[diag::TRUNCATED as usize] - truncated,
        4,
        "each is a truncated packet"
    );
    assert_eq!(
        Packets::read(&dp, 1).since(before),
        Packets {
            out_dropped: 4,
            ..Default::default()
        }
    );

    // Neighbour discovery between global addresses, hop limit 255.
    let neighbour = |icmp_type: u8, body: usize, src_last: u8| {
        let mut message = vec![icmp_type, 0, 0, 0];
        message.extend(vec![0u8; body]);
        let mut p = ipv6(58, &message);
        p[7] = 255;
        p[23] = src_last;
        eth(0x86DD, &p)
    };
    let solicitation = neighbour(135, 20 + 8, 10);
    let advertisement = neighbour(136, 20 + 8, 10);
    let with_payload = neighbour(135, 20 + 1200, 10);
    let router_advertisement = neighbour(134, 12, 10);
    let forged_source = neighbour(136, 20 + 8, 0x99);
    let link_local_source = {
        let mut f = neighbour(135, 20 + 8, 10);
        f[14 + 8..14 + 10].copy_from_slice(&[0xfe, 0x80]);
        f
    };
    // Duplicate address detection: from no address, to the solicited-node group.
    let duplicate_address_detection = {
        let mut f = neighbour(135, 20, 0);
        f[14 + 8..14 + 24].fill(0);
        f[14 + 24..14 + 40]
            .copy_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0x0a]);
        f
    };
    let before = Packets::read(&dp, 1);
    let spoofed = dp.maps.diag().unwrap()[diag::SPOOFED as usize];
    for (name, frame) in [
        ("solicitation", &solicitation),
        ("advertisement", &advertisement),
        ("from the link-local address", &link_local_source),
        ("duplicate address detection", &duplicate_address_detection),
    ] {
        assert_eq!(runs(&dp, frame), PASS, "{name} resolves neighbours");
    }
    for (name, frame) in [
        ("a solicitation with a payload", &with_payload),
        (
            "a router advertisement (only ever from link-local)",
            &router_advertisement,
        ),
        ("an advertisement from another's address", &forged_source),
    ] {
        assert_eq!(runs(&dp, frame), DROP, "{name} is no link plumbing");
    }
    assert_eq!(
        dp.maps.diag().unwrap()[diag::SPOOFED as usize] - spoofed,
        2,
        "the forged source is a spoof, and so is neighbour discovery longer than a pod needs"
    );
    assert_eq!(
        Packets::read(&dp, 1).since(before),
        Packets {
            out_dropped: 3,
            ..Default::default()
        },
        "link plumbing is not counted, the rest is"
    );
}

/// An ICMP error about a tracked flow passes on the flow's decision only while that decision
/// stands: once the workload's rules changed, the flow's own next packet decides it again,
/// and an error meanwhile is an ICMP packet of its own.
#[test]
fn an_icmp_error_about_a_flow_whose_rules_changed_is_decided_on_its_own() {
    use tollgate_tests::packets;
    let lab = Lab::new();
    let mut dp = workload_at_ifindex_one(&lab);
    let policy = |egress| isolated_drop(vec![], egress);
    dp.maps
        .set_workload(1, &policy(vec![allow_udp(ID_B, 5353)]))
        .unwrap();
    let run_as = |dp: &tollgate::Datapath, program: &'static str, frame: &[u8]| {
        run_once(&lab, dp, program, frame)
    };
    let (a, b) = ("10.1.0.10".parse().unwrap(), "10.1.0.11".parse().unwrap());
    let call = eth(0x0800, &packets::ipv4_udp(a, b, 1000, 5353, b"call"));
    let unreachable = eth(
        0x0800,
        &packets::icmpv4_error(b, a, 3, 3, &packets::ipv4_udp(a, b, 1000, 5353, b"call")),
    );
    assert_eq!(run_as(&dp, program_names::TC_FROM_POD, &call), PASS);
    assert_eq!(
        run_as(&dp, program_names::TC_TO_POD, &unreachable),
        PASS,
        "the error of an allowed flow"
    );
    dp.maps.set_workload(1, &policy(vec![])).unwrap();
    assert_eq!(
        run_as(&dp, program_names::TC_TO_POD, &unreachable),
        DROP,
        "the flow is no longer allowed: its error is ICMP the workload's ingress denies"
    );
    assert_eq!(
        run_as(&dp, program_names::TC_FROM_POD, &call),
        DROP,
        "and the flow's own next packet is denied"
    );
}

/// A pod's tunnel packets (VXLAN, Geneve, IP in IP to anyone; GRE to its node) carry packets
/// whose sources nobody checks: a node that decapsulates them (a CNI's VXLAN device, here or
/// on another node) forwards the inner packet to any pod as from any pod, past both ends'
/// policies. They are dropped in either mode, isolated or not, and counted as spoofs; GRE
/// to another address, or UDP to the node on another port, is traffic like any other.
#[test]
fn a_pods_tunnel_packets_to_its_node_are_dropped_in_either_mode() {
    let lab = Lab::new();
    let mut dp = lab.datapath(TcMode::Auto);
    dp.maps.set_tc_slot(1, 1).unwrap();
    // The frames go to 10.1.0.11, here the node, and to fd77:1::b, a pod.
    dp.maps
        .set_identity("10.1.0.11/32".parse().unwrap(), agent_common::IDENTITY_HOST)
        .unwrap();
    dp.maps
        .set_identity("fd77:1::b/128".parse().unwrap(), ID_B)
        .unwrap();
    let own: Vec<std::net::IpAddr> =
        vec!["10.1.0.10".parse().unwrap(), "fd77:1::a".parse().unwrap()];
    dp.maps
        .set_workload(1, &WorkloadPolicy::open(Mode::Log).sending_from(&own))
        .unwrap();
    let runs = |dp: &tollgate::Datapath, frame: &[u8]| {
        run_once(&lab, dp, program_names::TC_FROM_POD, frame)
    };
    let inner = ipv4(17, 0, &udp_header(1000, 8080, 8));
    let tunnels = [
        (
            "VXLAN",
            eth(0x0800, &ipv4(17, 0, &udp_header(40000, 4789, 8 + 14 + 36))),
        ),
        (
            "Linux VXLAN",
            eth(0x0800, &ipv4(17, 0, &udp_header(40000, 8472, 64))),
        ),
        (
            "Geneve",
            eth(0x0800, &ipv4(17, 0, &udp_header(40000, 6081, 64))),
        ),
        ("IP in IP", eth(0x0800, &ipv4(4, 0, &inner))),
        ("GRE", eth(0x0800, &ipv4(47, 0, &[0u8; 32]))),
    ];
    let spoofed = dp.maps.diag().unwrap()[diag::SPOOFED as usize];
    let before = Packets::read(&dp, 1);
    for (name, frame) in &tunnels {
        assert_eq!(runs(&dp, frame), DROP, "{name} to the node, in log mode");
    }
    assert_eq!(
        dp.maps.diag().unwrap()[diag::SPOOFED as usize] - spoofed,
        tunnels.len() as u64
    );
    // VXLAN and IP in IP to a pod (or any address) too: another node's VXLAN device
    // decapsulates as well.
    let anywhere = [
        (
            "VXLAN to a pod",
            eth(0x86DD, &ipv6(17, &udp_header(40000, 4789, 8))),
        ),
        ("IPv6 in IP to a pod", eth(0x86DD, &ipv6(41, &[0u8; 40]))),
    ];
    for (name, frame) in &anywhere {
        assert_eq!(runs(&dp, frame), DROP, "{name}, in log mode");
    }
    // UDP to the node on another port, and GRE to a pod (a VPN client's), are traffic.
    let others = [
        eth(0x0800, &ipv4(17, 0, &udp_header(40000, 4790, 8))),
        eth(0x86DD, &ipv6(47, &[0u8; 32])),
    ];
    for frame in &others {
        assert_eq!(runs(&dp, frame), PASS);
    }
    assert_eq!(
        Packets::read(&dp, 1).since(before),
        Packets {
            out_dropped: (tunnels.len() + anywhere.len()) as u64,
            out_allowed: 2,
            ..Default::default()
        }
    );
}

/// An echo request and its reply share a flow; a request sent back the way a flow's requests
/// came does not: it is a flow of its own, decided by the sender's policy. (A pod whose
/// egress was isolated could otherwise ping out, with any payload, on the identifier of a
/// ping it had been sent.)
#[test]
fn an_echo_request_is_never_taken_for_a_reply() {
    let lab = Lab::new();
    let mut dp = workload_at_ifindex_one(&lab);
    dp.maps
        .set_workload(
            1,
            &WorkloadPolicy {
                mode: Mode::Drop,
                isolated_egress: true,
                ..Default::default()
            }
            .sending_from(&[OWN.parse().unwrap()]),
        )
        .unwrap();
    let run_as = |dp: &tollgate::Datapath, program: &'static str, frame: &[u8]| {
        run_once(&lab, dp, program, frame)
    };
    // Echo messages from the workload (10.1.0.10) to B, and from B.
    let echo = |icmp_type: u8, from_b: bool, id: u16| {
        let mut message = vec![icmp_type, 0, 0, 0];
        message.extend(id.to_be_bytes());
        message.extend([0, 1]);
        message.extend(b"payload");
        let mut p = ipv4(1, 0, &message);
        if from_b {
            let (src, dst) = (p[12..16].to_vec(), p[16..20].to_vec());
            p[12..16].copy_from_slice(&dst);
            p[16..20].copy_from_slice(&src);
        }
        eth(0x0800, &p)
    };
    let (request, reply) = (8, 0);
    for id in [0x4242, 0, 0xffff] {
        assert_eq!(
            run_as(&dp, program_names::TC_TO_POD, &echo(request, true, id)),
            PASS,
            "B pings the workload (its ingress is open), id {id}"
        );
        assert_eq!(
            run_as(&dp, program_names::TC_FROM_POD, &echo(reply, false, id)),
            PASS,
            "the workload answers, id {id}"
        );
        assert_eq!(
            run_as(&dp, program_names::TC_FROM_POD, &echo(request, false, id)),
            DROP,
            "a request of the workload's own on the same identifier {id}: its egress denies it"
        );
    }
}

#[test]
fn malformed_packets_are_counted_and_never_misattributed() {
    let lab = Lab::new();
    let mut dp = lab.datapath(TcMode::Auto);
    // Packets of BPF_PROG_TEST_RUN arrive on the loopback device (ifindex 1) of the node
    // namespace; tc_from_pod sees them as egress of slot 1.
    dp.maps.set_tc_slot(1, 1).unwrap();
    // The frames come from 10.1.0.10 and fd77:1::a: the workload's own addresses.
    let own: Vec<std::net::IpAddr> =
        vec!["10.1.0.10".parse().unwrap(), "fd77:1::a".parse().unwrap()];
    let isolated = |dp: &mut tollgate::Datapath, mode: Mode| {
        dp.maps
            .set_workload(
                1,
                &WorkloadPolicy {
                    mode,
                    isolated_egress: true,
                    ..Default::default()
                }
                .sending_from(&own),
            )
            .unwrap()
    };
    let runs = |dp: &tollgate::Datapath, frame: &[u8]| {
        run_once(&lab, dp, program_names::TC_FROM_POD, frame)
    };

    let truncated_v4 = {
        let mut f = eth(0x0800, &ipv4(17, 0, &udp_header(1000, 53, 40)));
        f.truncate(14 + 30);
        f
    };
    let bad_ihl = {
        let mut p = ipv4(17, 0, &udp_header(1000, 53, 0));
        p[0] = 0x44;
        eth(0x0800, &p)
    };
    let short_tcp = {
        // The IP header is whole; the TCP header behind it is 10 bytes of the 14 needed.
        eth(0x0800, &ipv4(6, 0, &[0u8; 10]))
    };
    let deep_v6 = {
        // Seven hop-by-hop headers in a row: more than the parser follows.
        let mut rest = Vec::new();
        for _ in 0..7 {
            rest.extend([0u8, 0, 0, 0, 0, 0, 0, 0]);
        }
        rest[48] = 17;
        rest.extend(udp_header(1000, 53, 0));
        eth(0x86DD, &ipv6(0, &rest))
    };
    let orphan_fragment = eth(0x0800, &ipv4(17, 100, &[0u8; 16]));
    let arp = eth(0x0806, &[0u8; 28]);
    // LLDP: neither IP nor ARP.
    let lldp = eth(0x88cc, &[0u8; 32]);
    // To the solicited-node group of fd77:1::b: link plumbing, which never leaves the link.
    let neighbour_solicitation = {
        let mut f = eth(0x86DD, &ipv6(58, &[135, 0, 0, 0, 0, 0, 0, 0]));
        f[14 + 24..14 + 40]
            .copy_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0x0b]);
        f
    };
    // The same type to a routed address with a routed packet's hop limit (64): an ICMPv6
    // packet like any other (any payload could ride in it past a policy).
    let forged_solicitation = eth(0x86DD, &ipv6(58, &[135, 0, 0, 0, 0, 0, 0, 0]));
    // With the hop limit 255 neighbour discovery carries (RFC 4861): between global
    // addresses on the link (a router port's, a neighbour pod's), still plumbing.
    let global_solicitation = {
        let mut f = forged_solicitation.clone();
        f[14 + 7] = 255;
        f
    };
    // A neighbour advertisement for the pod's own address between global addresses, with
    // hop limit 255 but 72 bytes long: neighbour discovery to its receiver, which does not
    // look at the length, but longer than a pod needs.
    let long_advertisement = {
        let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        icmp.extend([0xfd, 0x77, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]);
        icmp.extend([0u8; 48]);
        let mut f = eth(0x86DD, &ipv6(58, &icmp));
        f[14 + 7] = 255;
        f
    };
    // A VLAN tag at the hook (on a pod's interface, the kernel took the outer one off
    // before it), then ARP.
    let stacked_tags = eth(0x8100, &[&[0u8, 0, 0x08, 0x06][..], &[0u8; 28]].concat());
    // Seven hop-by-hop headers, from an address not the workload's: unreadable, and still
    // a spoof (its source was read).
    let deep_v6_spoofed = {
        let mut f = deep_v6.clone();
        f[14 + 23] = 0x99;
        f
    };
    let valid = eth(0x0800, &ipv4(17, 0, &udp_header(1000, 53, 8)));
    // IPv4 with 8 bytes of options (IHL 7): the UDP header starts after them.
    let with_options = {
        let mut p = ipv4(17, 0, &udp_header(2000, 5353, 8));
        p[0] = 0x47;
        p.splice(20..20, [1u8, 1, 1, 1, 1, 1, 1, 0]);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        eth(0x0800, &p)
    };

    // Not isolated: everything passes and counts as allowed, link plumbing is not counted.
    dp.maps
        .set_workload(1, &WorkloadPolicy::open(Mode::Drop).sending_from(&own))
        .unwrap();
    let before = Packets::read(&dp, 1);
    for frame in [
        &truncated_v4,
        &bad_ihl,
        &short_tcp,
        &orphan_fragment,
        &arp,
        &lldp,
        &neighbour_solicitation,
        &forged_solicitation,
        &valid,
        &with_options,
    ] {
        assert_eq!(runs(&dp, frame), PASS);
    }
    assert_eq!(Packets::read(&dp, 1).since(before).out_allowed, 8);
    // A spoof leaving a pod's own interface is dropped in either mode, isolated or not; so
    // is a packet with more extension headers than are read, which could hide a tunnel's.
    // So are neighbour discovery longer than a pod needs and tags in tags, which the node
    // would take off after the hook.
    assert_eq!(runs(&dp, &deep_v6_spoofed), DROP);
    assert_eq!(runs(&dp, &deep_v6), DROP);
    assert_eq!(runs(&dp, &long_advertisement), DROP);
    assert_eq!(runs(&dp, &stacked_tags), DROP);
    assert_eq!(Packets::read(&dp, 1).since(before).out_dropped, 4);
    assert_eq!(dp.maps.diag().unwrap()[diag::SPOOFED as usize], 3);
    let d = dp.maps.diag().unwrap();
    assert_eq!(
        d[diag::TRUNCATED as usize],
        2,
        "short IPv4 packet and short TCP header"
    );
    assert_eq!(d[diag::BAD_HEADER as usize], 1);
    assert_eq!(d[diag::IPV6_EXT_UNPARSED as usize], 2);
    assert_eq!(d[diag::FRAGMENT_UNKNOWN as usize], 1);
    assert_eq!(d[diag::NON_IP as usize], 2, "LLDP, the stacked tags");
    assert_eq!(d[diag::ARP as usize], 1);
    assert_eq!(d[diag::ICMPV6_LINK_CONTROL as usize], 1);
    let mut tracked: Vec<(u16, u16)> = dp
        .maps
        .conntrack()
        .iter()
        .map(|(k, _)| (k.local_port, k.remote_port))
        .collect();
    tracked.sort();
    assert_eq!(
        tracked,
        vec![(0, 0), (1000, 53), (2000, 5353)],
        "only the valid packets opened flows (the routed solicitation one of ICMPv6), with the ports behind the IPv4 options"
    );

    // Isolated in drop mode: what cannot be read cannot be allowed.
    isolated(&mut dp, Mode::Drop);
    assert_eq!(
        dp.maps.workload(1).unwrap().flags & workload_flags::ISOLATED_EGRESS,
        workload_flags::ISOLATED_EGRESS
    );
    let before = Packets::read(&dp, 1);
    for frame in [
        &truncated_v4,
        &bad_ihl,
        &short_tcp,
        &deep_v6,
        &orphan_fragment,
        &lldp,
        &forged_solicitation,
    ] {
        assert_eq!(runs(&dp, frame), DROP);
    }
    assert_eq!(runs(&dp, &arp), PASS, "only ARP passes whatever the policy");
    assert_eq!(
        runs(&dp, &neighbour_solicitation),
        PASS,
        "IPv6 must keep resolving neighbours"
    );
    assert_eq!(runs(&dp, &global_solicitation), PASS, "on the link too");
    assert_eq!(
        Packets::read(&dp, 1).since(before),
        Packets {
            out_dropped: 7,
            ..Default::default()
        }
    );

    // Log mode: the same packets pass as would_drop (but the one that could hide a tunnel).
    isolated(&mut dp, Mode::Log);
    let before = Packets::read(&dp, 1);
    for frame in [&truncated_v4, &bad_ihl, &short_tcp, &orphan_fragment, &lldp] {
        assert_eq!(runs(&dp, frame), PASS);
    }
    assert_eq!(runs(&dp, &deep_v6), DROP);
    assert_eq!(Packets::read(&dp, 1).since(before).out_would_drop, 5);
    assert_eq!(
        dp.maps.conntrack().len(),
        3,
        "malformed packets track nothing"
    );
}

/// A workload's share of the connection tracking table counts each flow once: a flow opened
/// again on the ports of one that closed (a RST, a FIN) replaces its entry and is counted
/// once (else a client reusing its ports would count every connection until the next
/// census), and the count never falls below the entries the workload holds, whatever a peer
/// sends on those ports (else a pod and a peer could fill the table past the share).
#[test]
fn a_flow_opened_again_is_counted_once_in_the_workloads_share() {
    let lab = Lab::new();
    let mut dp = workload_at_ifindex_one(&lab);
    let policy = |egress| isolated_drop(vec![], egress);
    dp.maps
        .set_workload(1, &policy(vec![allow_tcp(ID_B, 80)]))
        .unwrap();
    // 10.1.0.10:`port` -> 10.1.0.11:80 leaving the workload, or the peer's packet back.
    let frame = |port: u16, flags: u8, from_peer: bool| {
        let (src, dst) = if from_peer { (80, port) } else { (port, 80) };
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.to_be_bytes());
        t[2..4].copy_from_slice(&dst.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        let mut f = eth(0x0800, &ipv4(6, 0, &t));
        if from_peer {
            let ip = 14;
            let a: [u8; 4] = f[ip + 12..ip + 16].try_into().unwrap();
            f.copy_within(ip + 16..ip + 20, ip + 12);
            f[ip + 16..ip + 20].copy_from_slice(&a);
        }
        f
    };
    let send = |dp: &tollgate::Datapath, port: u16, flags: u8| {
        run_once(
            &lab,
            dp,
            program_names::TC_FROM_POD,
            &frame(port, flags, false),
        )
    };
    let receive = |dp: &tollgate::Datapath, port: u16, flags: u8| {
        run_once(
            &lab,
            dp,
            program_names::TC_TO_POD,
            &frame(port, flags, true),
        )
    };
    let share = |dp: &tollgate::Datapath| dp.maps.conntrack_share_count(1).unwrap();
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const FIN_ACK: u8 = 0x11;

    assert_eq!(send(&dp, 2000, SYN), PASS);
    assert_eq!(send(&dp, 2001, SYN), PASS);
    assert_eq!(share(&dp), 2, "two flows tracked");
    for round in 0..3 {
        assert_eq!(send(&dp, 2000, RST), PASS);
        assert_eq!(send(&dp, 2000, SYN), PASS, "opened again, round {round}");
        assert_eq!(
            share(&dp),
            2,
            "a flow opened again after a RST is counted once"
        );
    }
    assert_eq!(send(&dp, 2001, FIN_ACK), PASS);
    assert_eq!(send(&dp, 2001, SYN), PASS);
    assert_eq!(
        share(&dp),
        2,
        "a flow opened again after a FIN is counted once"
    );

    // The peer closes the flow and opens it back: denied (nothing may come in), and the
    // workload's entry stays counted.
    for _ in 0..3 {
        assert_eq!(receive(&dp, 2000, RST), PASS);
        assert_eq!(receive(&dp, 2000, SYN), DROP);
        assert_eq!(
            share(&dp),
            2,
            "the peer's denied SYN leaves the count alone"
        );
    }
    // The workload's own SYN again, now denied: the entry it would have replaced stays, and
    // stays counted until the census finds it over.
    dp.maps.set_workload(1, &policy(vec![])).unwrap();
    assert_eq!(send(&dp, 2000, SYN), DROP);
    assert_eq!(share(&dp), 2);
    dp.maps
        .set_workload(1, &policy(vec![allow_tcp(ID_B, 80)]))
        .unwrap();
    assert_eq!(send(&dp, 2000, SYN), PASS);
    assert_eq!(share(&dp), 2, "allowed again, replacing its entry");
    assert_eq!(dp.maps.conntrack().len(), 2);
    let census = dp.maps.conntrack_census(monotonic_ns());
    assert_eq!(census.per_slot.get(&1).copied(), Some(2));
    assert_eq!(share(&dp), 2, "the census agrees");
}

/// A connection a peer opened to the workload does not let the workload open one back to
/// that peer on the same ports: its bare SYN is decided on its own, by its egress policy,
/// not taken as a reply (a peer forging such a flow's first packet would otherwise open the
/// workload's way out). Its answers to the peer pass as ever.
#[test]
fn a_bare_syn_from_the_answering_side_is_decided_on_its_own() {
    let lab = Lab::new();
    let mut dp = workload_at_ifindex_one(&lab);
    dp.maps
        .set_workload(1, &isolated_drop(vec![allow_tcp(ID_B, 2000)], vec![]))
        .unwrap();
    // 10.1.0.10:2000 <-> 10.1.0.11:80, leaving the workload as written, arriving turned
    // around.
    let leaving = |flags: u8| {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&2000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        eth(0x0800, &ipv4(6, 0, &t))
    };
    let arriving = |flags: u8| {
        let mut f = leaving(flags);
        let (ip, tcp) = (14, 14 + 20);
        let src: [u8; 4] = f[ip + 12..ip + 16].try_into().unwrap();
        f.copy_within(ip + 16..ip + 20, ip + 12);
        f[ip + 16..ip + 20].copy_from_slice(&src);
        let sport: [u8; 2] = f[tcp..tcp + 2].try_into().unwrap();
        f.copy_within(tcp + 2..tcp + 4, tcp);
        f[tcp + 2..tcp + 4].copy_from_slice(&sport);
        f
    };
    let run = |program: &'static str, frame: &[u8]| run_once(&lab, &dp, program, frame);
    // The peer's connection, allowed at ingress, and the workload's answer. Until the peer
    // acknowledges the answer the handshake is open, and so is the flow's lifetime: a SYN
    // flood a listener answers must not hold the table for hours.
    let left_s = |dp: &tollgate::Datapath| {
        let (_, e) = dp.maps.conntrack().pop().expect("the flow tracked");
        e.expires_ns.saturating_sub(monotonic_ns()) / 1_000_000_000
    };
    let config = dp.maps.config().unwrap();
    assert_eq!(run(program_names::TC_TO_POD, &arriving(0x02)), PASS);
    assert_eq!(run(program_names::TC_FROM_POD, &leaving(0x12)), PASS);
    assert!(left_s(&dp) <= config.ct_tcp_opening_s as u64, "half open");
    assert_eq!(run(program_names::TC_TO_POD, &arriving(0x10)), PASS);
    assert!(
        left_s(&dp) > config.ct_tcp_opening_s as u64,
        "established once the handshake completed"
    );
    // A bare SYN from the workload on the same ports: its egress allows nothing.
    let before = Packets::read(&dp, 1);
    assert_eq!(run(program_names::TC_FROM_POD, &leaving(0x02)), DROP);
    assert_eq!(
        Packets::read(&dp, 1).since(before),
        Packets {
            out_dropped: 1,
            ..Default::default()
        }
    );
    // The connection itself goes on.
    assert_eq!(run(program_names::TC_FROM_POD, &leaving(0x10)), PASS);
    assert_eq!(run(program_names::TC_TO_POD, &arriving(0x10)), PASS);
}

/// Established TCP and UDP packets take a shorter path (`agent-ebpf/src/established.rs`)
/// than the general pipeline. It must decide and count exactly as that pipeline would: a
/// flip to drop mode, a policy change, a TCP state change, IPv4 options and a tracked
/// would-drop each run here through the real program, and each packet is counted once, with
/// its bytes, in the workload's counters and in its peer pair's.
#[test]
fn established_packets_are_decided_and_counted_as_the_general_pipeline_would() {
    use agent_common::{DIR_EGRESS, FlowCounterKey, VERDICT_ALLOWED, VERDICT_WOULD_DROP};
    let lab = Lab::new();
    let mut dp = workload_at_ifindex_one(&lab);
    dp.maps
        .set_identity("fd77:1::b/128".parse().unwrap(), ID_B)
        .unwrap();
    let own: Vec<std::net::IpAddr> =
        vec!["10.1.0.10".parse().unwrap(), "fd77:1::a".parse().unwrap()];
    let set =
        |dp: &mut tollgate::Datapath, mode: Mode, egress: Vec<tollgate::compile::AllowRule>| {
            dp.maps
                .set_workload(
                    1,
                    &WorkloadPolicy {
                        mode,
                        isolated_egress: true,
                        egress,
                        ..Default::default()
                    }
                    .sending_from(&own),
                )
                .unwrap()
        };
    let rules = || vec![allow_udp(ID_B, 8080), allow_tcp(ID_B, 80)];
    let runs = |dp: &tollgate::Datapath, frame: &[u8]| {
        run_once(&lab, dp, program_names::TC_FROM_POD, frame)
    };
    let tcp = |flags: u8| {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&2000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        eth(0x0800, &ipv4(6, 0, &t))
    };
    let (syn, ack, fin_ack) = (tcp(0x02), tcp(0x10), tcp(0x11));
    let allowed = eth(0x0800, &ipv4(17, 0, &udp_header(1000, 8080, 100)));
    let denied = eth(0x0800, &ipv4(17, 0, &udp_header(1000, 9090, 100)));
    let with_options = {
        let mut p = ipv4(17, 0, &udp_header(1000, 8080, 100));
        p[0] = 0x47;
        p.splice(20..20, [1u8, 1, 1, 1, 1, 1, 1, 0]);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        eth(0x0800, &p)
    };

    // Log mode: an allowed flow and a would-drop one, each tracked by its first packet and
    // then passed by the fast path: every packet counted once, with its bytes.
    set(&mut dp, Mode::Log, rules());
    let before = Packets::read(&dp, 1);
    for _ in 0..10 {
        assert_eq!(runs(&dp, &allowed), PASS);
        assert_eq!(runs(&dp, &denied), PASS);
    }
    assert_eq!(
        Packets::read(&dp, 1).since(before),
        Packets {
            out_allowed: 10,
            out_would_drop: 10,
            ..Default::default()
        }
    );
    let udp_bytes = (allowed.len() - 14) as u64;
    let flows = |dp: &tollgate::Datapath, verdict: u8, port: u16, proto: u8| {
        let key = FlowCounterKey {
            slot: 1,
            peer: ID_B,
            port,
            proto,
            direction: DIR_EGRESS,
            verdict,
            origin: DIR_EGRESS,
            _pad: [0; 2],
        };
        // No agent gives the pairs flow series buckets here: they count in the hash.
        dp.maps
            .flow_counters()
            .into_iter()
            .filter(|(k, _)| *k == key)
            .fold((0, 0), |(p, b), (_, c)| (p + c.packets, b + c.bytes))
    };
    assert_eq!(
        flows(&dp, VERDICT_ALLOWED, 8080, 17),
        (10, 10 * udp_bytes),
        "the allowed pair"
    );
    assert_eq!(
        flows(&dp, VERDICT_WOULD_DROP, 9090, 17),
        (10, 10 * udp_bytes),
        "the would-drop pair"
    );
    // IPv6 the same way, each packet counted once.
    let allowed_v6 = eth(0x86DD, &ipv6(17, &udp_header(1001, 8080, 100)));
    let before = Packets::read(&dp, 1);
    for _ in 0..10 {
        assert_eq!(runs(&dp, &allowed_v6), PASS);
    }
    assert_eq!(Packets::read(&dp, 1).since(before).out_allowed, 10);
    let v6_bytes = (allowed_v6.len() - 14) as u64;
    assert_eq!(
        flows(&dp, VERDICT_ALLOWED, 8080, 17),
        (20, 10 * udp_bytes + 10 * v6_bytes),
        "the allowed pair, both families"
    );
    // IPv4 options: the same flow (its ports found behind them), still allowed.
    let before = Packets::read(&dp, 1);
    assert_eq!(runs(&dp, &with_options), PASS);
    assert_eq!(Packets::read(&dp, 1).since(before).out_allowed, 1);
    assert_eq!(dp.maps.conntrack().len(), 3, "no flow of its own");

    // The flip: the tracked would-drop flow is dropped from its next packet on.
    set(&mut dp, Mode::Drop, rules());
    let before = Packets::read(&dp, 1);
    assert_eq!(runs(&dp, &denied), DROP);
    assert_eq!(runs(&dp, &allowed), PASS);
    assert_eq!(
        Packets::read(&dp, 1).since(before),
        Packets {
            out_allowed: 1,
            out_dropped: 1,
            ..Default::default()
        }
    );

    // TCP: the opening and closing packets move the tracked state; those between pass.
    assert_eq!(runs(&dp, &syn), PASS);
    assert_eq!(runs(&dp, &ack), PASS);
    assert_eq!(runs(&dp, &fin_ack), PASS);
    assert_eq!(runs(&dp, &ack), PASS);
    let state = dp
        .maps
        .conntrack()
        .into_iter()
        .find(|(k, _)| k.proto == 6)
        .map(|(_, e)| e.tcp_state)
        .expect("the TCP flow is tracked");
    assert_eq!(state, tcp_state::FIN_ORIGIN, "the FIN was seen");
    // A RST closes it, and a bare SYN then opens it again: a new flow, decided anew (the
    // general pipeline's, which the fast path leaves it to), from a fresh state.
    let tcp_entry = |dp: &tollgate::Datapath| {
        dp.maps
            .conntrack()
            .into_iter()
            .find(|(k, _)| k.proto == 6)
            .map(|(_, e)| e)
            .expect("the TCP flow is tracked")
    };
    let before = Packets::read(&dp, 1);
    assert_eq!(runs(&dp, &tcp(0x14)), PASS);
    let closed = tcp_entry(&dp);
    assert_eq!(closed.tcp_state, tcp_state::FIN_ORIGIN | tcp_state::RST);
    assert_eq!(runs(&dp, &syn), PASS);
    let reopened = tcp_entry(&dp);
    assert_eq!(reopened.tcp_state, 0, "opened again");
    assert!(
        reopened.expires_ns > closed.expires_ns,
        "an opening connection outlives a closed one"
    );
    assert_eq!(Packets::read(&dp, 1).since(before).out_allowed, 2);

    // A workload past its share of the main table tracks its new flows in the overflow
    // table: their packets are decided and counted the same.
    let mut config = dp.maps.config().unwrap();
    config.ct_share = 1;
    dp.maps.set_config(&config).unwrap();
    let overflowed = eth(0x0800, &ipv4(17, 0, &udp_header(1002, 8080, 100)));
    let (in_main, overflow_inserts) = (
        dp.maps.conntrack().len(),
        dp.maps.diag().unwrap()[diag::CT_OVERFLOW as usize],
    );
    let before = Packets::read(&dp, 1);
    for _ in 0..10 {
        assert_eq!(runs(&dp, &overflowed), PASS);
    }
    assert_eq!(Packets::read(&dp, 1).since(before).out_allowed, 10);
    assert_eq!(dp.maps.conntrack().len(), in_main, "not in the main table");
    assert_eq!(
        dp.maps.diag().unwrap()[diag::CT_OVERFLOW as usize] - overflow_inserts,
        1,
        "tracked once, in the overflow table"
    );

    // A policy change decides established flows again: without their rules, all drop.
    set(&mut dp, Mode::Drop, vec![]);
    let before = Packets::read(&dp, 1);
    assert_eq!(runs(&dp, &allowed), DROP);
    assert_eq!(runs(&dp, &allowed_v6), DROP);
    assert_eq!(runs(&dp, &ack), DROP);
    assert_eq!(runs(&dp, &overflowed), DROP);
    assert_eq!(Packets::read(&dp, 1).since(before).out_dropped, 4);
}

/// Single addresses (pods, Service frontends, the node) are named in a hash the programs
/// look up first, shorter prefixes in a trie behind it: together they must still answer as
/// one longest-prefix match. A pod's /32 wins over a prefix that holds it, and once the
/// /32 is forgotten the address falls back to the prefix, then to `world`.
#[test]
fn single_addresses_and_prefixes_name_peers_as_one_longest_prefix_match() {
    let lab = Lab::new();
    let mut dp = lab.datapath(TcMode::Auto);
    // BPF_PROG_TEST_RUN packets arrive on ifindex 1: slot 1's egress, from 10.1.0.10 (its
    // own address) to 10.1.0.11; only ID_B may be reached, on UDP 8080.
    dp.maps.set_tc_slot(1, 1).unwrap();
    dp.maps
        .set_workload(
            1,
            &WorkloadPolicy {
                mode: Mode::Drop,
                isolated_egress: true,
                egress: vec![allow_udp(ID_B, 8080)],
                ..Default::default()
            }
            .sending_from(&["10.1.0.10".parse().unwrap()]),
        )
        .unwrap();
    // Each check a new flow (its own source port), so no tracked decision answers for it.
    let mut sport = 3000u16;
    let mut verdict = |dp: &tollgate::Datapath| {
        sport += 1;
        let frame = eth(0x0800, &ipv4(17, 0, &udp_header(sport, 8080, 100)));
        run_once(&lab, dp, program_names::TC_FROM_POD, &frame)
    };
    let entries = |dp: &tollgate::Datapath, map: &str| {
        dp.maps
            .occupancy()
            .into_iter()
            .find(|(name, _, _)| *name == map)
            .map(|(_, entries, _)| entries)
            .unwrap()
    };

    dp.maps
        .set_identity("10.1.0.0/16".parse().unwrap(), ID_A)
        .unwrap();
    dp.maps
        .set_identity("10.1.0.11/32".parse().unwrap(), ID_B)
        .unwrap();
    assert_eq!(entries(&dp, "IDENTITIES"), 1, "the /16 in the trie");
    // The hash also names the workload's own address as a pod of this node.
    assert_eq!(
        entries(&dp, "IDENTITIES_EXACT"),
        2,
        "the /32 in the hash, beside the workload's own address"
    );
    assert_eq!(
        dp.maps
            .identities()
            .unwrap()
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![ID_A, ID_B],
        "both read back, prefix first"
    );
    assert_eq!(verdict(&dp), PASS, "the /32's identity, not the /16's");

    dp.maps
        .remove_identity("10.1.0.11/32".parse().unwrap())
        .unwrap();
    assert_eq!(
        entries(&dp, "IDENTITIES_EXACT"),
        1,
        "the workload's own address"
    );
    assert_eq!(verdict(&dp), DROP, "back to the /16: ID_A may not");

    dp.maps
        .set_identity("10.1.0.0/16".parse().unwrap(), ID_B)
        .unwrap();
    assert_eq!(verdict(&dp), PASS, "the /16 alone names it now");

    dp.maps
        .remove_identity("10.1.0.0/16".parse().unwrap())
        .unwrap();
    assert_eq!(verdict(&dp), DROP, "world");
    lab.in_node(|| dp.remove()).unwrap();
}

/// Rules for every port of a protocol and rules without ports are keys of the policy hash,
/// each of a kind of its own beside single ports, looked up only when the ruleset has them;
/// only port ranges stay in the ruleset's trie. A port-0 packet never passes for a rule of
/// every port, nor a rule of one protocol for another.
#[test]
fn whole_protocol_and_portless_rules_are_hash_keys_of_a_kind_of_their_own() {
    use agent_common::{
        DIR_EGRESS, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue, map_names, policy_kind,
    };
    use tollgate::compile::{Peer, PortMatch};
    use tollgate_tests::support::allow;
    const ID_UDP: u32 = 310;
    const ID_ANY: u32 = 311;
    const ID_PORT: u32 = 312;
    const ID_RANGE: u32 = 313;

    let lab = Lab::new();
    let mut dp = lab.datapath(TcMode::Auto);
    // BPF_PROG_TEST_RUN packets arrive on ifindex 1: slot 1's egress, from 10.1.0.10 (its
    // own address) to 10.1.0.11, whose identity each check sets.
    dp.maps.set_tc_slot(1, 1).unwrap();
    let mut policy = WorkloadPolicy {
        mode: Mode::Drop,
        isolated_egress: true,
        egress: vec![
            allow(Peer::Identity(ID_UDP), PortMatch::Protocol(PROTO_UDP)),
            allow(Peer::Identity(ID_ANY), PortMatch::Any),
            allow_udp(ID_PORT, 5353),
            allow(
                Peer::Identity(ID_RANGE),
                PortMatch::Range {
                    proto: PROTO_TCP,
                    first: 8000,
                    last: 8063,
                },
            ),
        ],
        ..Default::default()
    }
    .sending_from(&["10.1.0.10".parse().unwrap()]);
    dp.maps.set_workload(1, &policy).unwrap();
    // Each check a new flow (its own source port), so no tracked decision answers for it.
    let mut sport = 3000u16;
    let mut verdict = |dp: &mut tollgate::Datapath, peer: u32, proto: u8, dport: u16| {
        dp.maps
            .set_identity("10.1.0.11/32".parse().unwrap(), peer)
            .unwrap();
        sport += 1;
        let l4 = if proto == PROTO_TCP {
            let mut t = Vec::new();
            t.extend(sport.to_be_bytes());
            t.extend(dport.to_be_bytes());
            t.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
            t
        } else {
            udp_header(sport, dport, 16)
        };
        let frame = eth(0x0800, &ipv4(proto, 0, &l4));
        run_once(&lab, dp, program_names::TC_FROM_POD, &frame)
    };
    let lookups = |dp: &tollgate::Datapath| {
        dp.maps.workload(1).unwrap().flags & workload_flags::lookups(DIR_EGRESS)
    };

    assert_eq!(
        lookups(&dp),
        workload_flags::ANY_PORT_RULES_EGRESS
            | workload_flags::ANY_PROTO_RULES_EGRESS
            | workload_flags::PREFIX_RULES_EGRESS,
        "no ipBlocks: the ipBlock trie is never looked up"
    );
    let exact = aya::maps::HashMap::<_, PolicyKey, PolicyValue>::try_from(aya::maps::Map::HashMap(
        aya::maps::MapData::from_pin(lab.pin_dir.join(map_names::POLICY_EXACT)).unwrap(),
    ))
    .unwrap();
    let mut kinds: Vec<(u32, u8, u8, [u8; 2])> = exact
        .keys()
        .map(|k| k.unwrap())
        .map(|k| (k.peer, k.kind, k.proto, k.port))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            (ID_UDP, policy_kind::ANY_PORT, PROTO_UDP, [0, 0]),
            (ID_ANY, policy_kind::ANY_PROTO, 0, [0, 0]),
            (ID_PORT, policy_kind::PORT, PROTO_UDP, 5353u16.to_be_bytes()),
        ],
        "the range (one aligned block of 64 ports) is not in the hash"
    );
    let trie_entries = dp
        .maps
        .occupancy()
        .into_iter()
        .find(|(name, _, _)| *name == "POLICY")
        .map(|(_, entries, _)| entries)
        .unwrap();
    assert_eq!(trie_entries, 1, "the range alone in the trie");

    assert_eq!(
        verdict(&mut dp, ID_UDP, PROTO_UDP, 9999),
        PASS,
        "every UDP port"
    );
    assert_eq!(verdict(&mut dp, ID_UDP, PROTO_UDP, 0), PASS, "even port 0");
    assert_eq!(verdict(&mut dp, ID_UDP, PROTO_TCP, 9999), DROP, "not TCP");
    assert_eq!(
        verdict(&mut dp, ID_ANY, PROTO_TCP, 80),
        PASS,
        "no ports: TCP"
    );
    assert_eq!(
        verdict(&mut dp, ID_ANY, PROTO_UDP, 7),
        PASS,
        "no ports: UDP"
    );
    assert_eq!(verdict(&mut dp, ID_PORT, PROTO_UDP, 5353), PASS);
    assert_eq!(verdict(&mut dp, ID_PORT, PROTO_UDP, 5354), DROP);
    assert_eq!(
        verdict(&mut dp, ID_PORT, PROTO_UDP, 0),
        DROP,
        "port 0 is no rule's 'every port' but ID_UDP's"
    );
    assert_eq!(verdict(&mut dp, ID_RANGE, PROTO_TCP, 8050), PASS, "range");
    assert_eq!(verdict(&mut dp, ID_RANGE, PROTO_TCP, 8064), DROP);
    assert_eq!(verdict(&mut dp, ID_RANGE, PROTO_UDP, 8050), DROP);

    // Without the rules of whole protocols and without ports, their lookups stop with them.
    policy.egress.drain(..2);
    dp.maps.set_workload(1, &policy).unwrap();
    assert_eq!(lookups(&dp), workload_flags::PREFIX_RULES_EGRESS);
    assert_eq!(exact.keys().count(), 1);
    assert_eq!(verdict(&mut dp, ID_UDP, PROTO_UDP, 9999), DROP);
    assert_eq!(verdict(&mut dp, ID_ANY, PROTO_TCP, 80), DROP);
    assert_eq!(verdict(&mut dp, ID_RANGE, PROTO_TCP, 8050), PASS);
    lab.in_node(|| dp.remove()).unwrap();
}
