//! The datapath on real traffic: the embedded programs loaded into the kernel, attached to
//! veth "pods" in network namespaces, with real TCP, UDP and ICMP between them.
//!
//! Needs root and a kernel with BPF (CI has both): nothing here is skipped.

use std::time::Duration;

use agent_common::{
    DIR_INGRESS, IDENTITY_WORLD, PROTO_ICMP, PROTO_TCP, PROTO_UDP, VERDICT_DROPPED,
    VERDICT_WOULD_DROP, diag, workload_flags,
};
use tollgate::{
    Datapath, Mode, WorkloadPolicy,
    attach::{AttachMethod, TcMode},
    compile::PortMatch,
    maps::WorkloadAddresses,
    maps::addr_from_bytes,
};
use tollgate_tests::{
    Lab, Pod,
    support::{
        FAIL_FAST, PATIENT, Packets, allow, allow_tcp, allow_udp, attach_cgroup, attach_tc, cidr,
        measure, measure_with_link, register, udp,
    },
    traffic,
};

const ID_A: u32 = 300;
const ID_B: u32 = 301;
const ID_C: u32 = 302;

/// Three pods a, b, c with identities; b is the workload under test in slot 1, isolated for
/// ingress with rules allowing a on TCP 80 and UDP 53. c is not allowed anything.
struct Scenario {
    lab: Lab,
    dp: Datapath,
    a: Pod,
    b: Pod,
    c: Pod,
}

fn isolated_b(mode: Mode, tc_mode: TcMode) -> Scenario {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    let c = lab.add_pod("c");
    lab.serve(&b, &[80, 81], &[53, 54]);
    let mut dp = lab.datapath(tc_mode);
    register(&mut dp, &a, ID_A);
    register(&mut dp, &b, ID_B);
    register(&mut dp, &c, ID_C);
    dp.maps
        .set_workload(1, &b_allows_a(&b, mode))
        .expect("set workload");
    attach_tc(&lab, &mut dp, 1, &b);
    Scenario { lab, dp, a, b, c }
}

/// b's rules in `isolated_b`: isolated for ingress, a allowed on TCP 80 and UDP 53.
fn b_allows_a(b: &Pod, mode: Mode) -> WorkloadPolicy {
    WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(b.addrs()),
        mode,
        isolated_ingress: true,
        isolated_egress: false,
        ingress: vec![allow_tcp(ID_A, 80), allow_udp(ID_A, 53)],
        egress: vec![],
        ..Default::default()
    }
}

#[test]
fn open_workloads_pass_and_every_packet_is_counted() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let c = lab.add_pod("c");
    lab.serve(&a, &[80], &[53]);
    let mut dp = lab.datapath(TcMode::Auto);
    // a is attached but no policy selects it, in drop mode: nothing to drop. c is not
    // attached at all.
    dp.maps
        .set_workload(
            1,
            &WorkloadPolicy::open(Mode::Drop).sending_from(&a.addrs()),
        )
        .unwrap();
    let method = attach_tc(&lab, &mut dp, 1, &a);
    assert_eq!(method, AttachMethod::Tcx, "kernel 6.6+ attaches with TCX");

    let got = measure(&lab, &dp, 1, || {
        assert_eq!(traffic::ping(&c, a.addr(false), 4), 4);
        assert_eq!(traffic::ping(&c, a.addr(true), 4), 4);
    });
    assert_eq!(
        got,
        Packets {
            in_allowed: 8,
            out_allowed: 8,
            ..Default::default()
        }
    );

    let got = measure(&lab, &dp, 1, || {
        let r = traffic::udp(&c, a.addr(false), 53, 5, 100, PATIENT);
        assert_eq!(r.echoed, 5, "{r:?}");
        let r = traffic::udp(&a, c.addr(true), 9, 1, 100, FAIL_FAST);
        assert_eq!(r.sent, 1);
    });
    // 5 in, 5 echoes out; one datagram out to c:9 and c's port unreachable back in.
    assert_eq!(
        got,
        Packets {
            in_allowed: 6,
            out_allowed: 6,
            ..Default::default()
        }
    );

    // TCP: every segment, checked against the kernel's own count on the interface.
    let (got, link) = measure_with_link(&lab, &dp, 1, &a, || {
        let r = traffic::tcp(&c, a.addr(false), 80, 20, PATIENT);
        assert_eq!(r.echoed, 20, "{r:?}");
        let r = traffic::tcp(&c, a.addr(true), 80, 20, PATIENT);
        assert_eq!(r.echoed, 20, "{r:?}");
    });
    assert!(got.in_allowed >= 40, "{got:?}");
    assert_eq!(
        got.in_allowed, link.tx_packets,
        "into the pod: {got:?} vs {link:?}"
    );
    assert_eq!(
        got.out_allowed, link.rx_packets,
        "out of the pod: {got:?} vs {link:?}"
    );
    assert_eq!(
        got.in_would_drop + got.in_dropped + got.out_would_drop + got.out_dropped,
        0
    );

    // Bytes are L3 bytes: a 100-byte UDP payload is 128 bytes of IPv4.
    let before = dp.maps.counters(1).unwrap()[DIR_INGRESS as usize][0];
    assert_eq!(
        traffic::udp(&c, a.addr(false), 53, 1, 100, PATIENT).echoed,
        1
    );
    let after = dp.maps.counters(1).unwrap()[DIR_INGRESS as usize][0];
    assert_eq!(after.bytes - before.bytes, 128);
}

#[test]
fn log_mode_lets_denied_flows_pass_and_counts_them_as_would_drop() {
    let Scenario {
        lab,
        mut dp,
        a,
        b,
        c,
    } = isolated_b(Mode::Log, TcMode::Auto);
    let mut events = dp.events().unwrap();

    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp(&a, b.addr(false), 53, 5, 64, PATIENT).echoed,
            5
        );
    });
    assert_eq!(
        got,
        Packets {
            in_allowed: 5,
            out_allowed: 5,
            ..Default::default()
        },
        "allowed flow"
    );

    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp(&a, b.addr(false), 54, 5, 64, PATIENT).echoed,
            5
        );
    });
    // The replies belong to a flow that drop mode would have stopped: they would not exist.
    assert_eq!(
        got,
        Packets {
            in_would_drop: 5,
            out_would_drop: 5,
            ..Default::default()
        },
        "UDP to a port the policy does not allow"
    );

    let got = measure(&lab, &dp, 1, || {
        assert_eq!(traffic::ping(&c, b.addr(false), 3), 3);
    });
    assert_eq!(
        got,
        Packets {
            in_would_drop: 3,
            out_would_drop: 3,
            ..Default::default()
        },
        "ping from a peer without rules"
    );

    let (got, link) = measure_with_link(&lab, &dp, 1, &b, || {
        let r = traffic::tcp(&a, b.addr(false), 81, 10, PATIENT);
        assert_eq!(r.echoed, 10, "log mode lets the connection work: {r:?}");
    });
    assert_eq!(got.in_would_drop, link.tx_packets, "{got:?} {link:?}");
    assert_eq!(got.out_would_drop, link.rx_packets, "{got:?} {link:?}");
    assert_eq!(got.in_allowed + got.out_allowed, 0, "{got:?}");

    let (got, link) = measure_with_link(&lab, &dp, 1, &b, || {
        assert_eq!(traffic::tcp(&a, b.addr(false), 80, 10, PATIENT).echoed, 10);
    });
    assert_eq!(got.in_allowed, link.tx_packets);
    assert_eq!(got.out_allowed, link.rx_packets);
    assert_eq!(got.in_would_drop + got.out_would_drop, 0, "{got:?}");

    // One event per new would-drop flow: UDP 54, the ping, TCP 81.
    let mut seen = events.wait(Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(200));
    seen.extend(events.drain());
    let mut flows: Vec<(u8, u16, String)> = seen
        .iter()
        .map(|e| {
            assert_eq!(e.slot, 1);
            assert_eq!(e.direction, DIR_INGRESS);
            assert_eq!(e.verdict, VERDICT_WOULD_DROP);
            assert_eq!(addr_from_bytes(e.family, &e.dst), b.addr(false));
            (
                e.proto,
                e.dst_port,
                addr_from_bytes(e.family, &e.src).to_string(),
            )
        })
        .collect();
    flows.sort();
    let icmp_id = flows
        .iter()
        .find(|f| f.0 == PROTO_ICMP)
        .map(|f| f.1)
        .unwrap_or(0);
    assert_eq!(
        flows,
        vec![
            (PROTO_ICMP, icmp_id, c.ipv4.to_string()),
            (PROTO_TCP, 81, a.ipv4.to_string()),
            (PROTO_UDP, 54, a.ipv4.to_string()),
        ]
    );
    assert!(
        seen.iter()
            .all(|e| e.peer_identity == ID_A || e.peer_identity == ID_C)
    );
}

/// Drop mode on both TC attach methods: TCX links, and the clsact qdisc of older kernels.
fn drop_mode_stops_denied_flows(tc_mode: TcMode) {
    let Scenario {
        lab,
        mut dp,
        a,
        b,
        c,
    } = isolated_b(Mode::Drop, tc_mode);
    let mut events = dp.events().unwrap();

    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp(&a, b.addr(false), 53, 5, 64, PATIENT).echoed,
            5
        );
    });
    assert_eq!(
        got,
        Packets {
            in_allowed: 5,
            out_allowed: 5,
            ..Default::default()
        }
    );

    let got = measure(&lab, &dp, 1, || {
        let r = traffic::udp(&a, b.addr(false), 54, 3, 64, FAIL_FAST);
        assert_eq!((r.sent, r.echoed), (3, 0), "{r:?}");
    });
    assert_eq!(
        got,
        Packets {
            in_dropped: 3,
            ..Default::default()
        }
    );

    let got = measure(&lab, &dp, 1, || {
        assert_eq!(traffic::ping(&c, b.addr(false), 3), 0);
    });
    assert_eq!(
        got,
        Packets {
            in_dropped: 3,
            ..Default::default()
        }
    );

    // Every SYN the client sent (a is not attached: its interface counts them) is dropped.
    let (got, link_a) = measure_with_link(&lab, &dp, 1, &a, || {
        let r = traffic::tcp(&a, b.addr(false), 81, 1, Duration::from_millis(1500));
        assert!(!r.connected, "drop mode must stop the connection: {r:?}");
    });
    assert!(got.in_dropped >= 1);
    assert_eq!(got.in_dropped, link_a.rx_packets, "{got:?} {link_a:?}");
    assert_eq!(got.in_allowed + got.out_allowed + got.out_dropped, 0);

    // The allowed connection is unaffected.
    let r = traffic::tcp(&a, b.addr(false), 80, 5, PATIENT);
    assert_eq!(r.echoed, 5, "{r:?}");

    // Every dropped packet of a new flow is an event candidate; nothing here hits the limit.
    let seen = events.wait(Duration::from_secs(1));
    assert!(seen.iter().all(|e| e.verdict == VERDICT_DROPPED));
    let dropped_total = 3 + 3 + got.in_dropped;
    std::thread::sleep(Duration::from_millis(200));
    let total = seen.len() as u64 + events.drain().len() as u64;
    assert_eq!(total, dropped_total, "one event per dropped packet");
}

#[test]
fn drop_mode_stops_denied_flows_with_tcx() {
    drop_mode_stops_denied_flows(TcMode::Tcx);
}

#[test]
fn drop_mode_stops_denied_flows_with_clsact() {
    drop_mode_stops_denied_flows(TcMode::Clsact);
}

#[test]
fn replies_pass_while_new_connections_the_other_way_are_evaluated() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    lab.serve(&a, &[80], &[]);
    lab.serve(&b, &[80], &[53]);
    let mut dp = lab.datapath(TcMode::Auto);
    register(&mut dp, &a, ID_A);
    register(&mut dp, &b, ID_B);
    // a: isolated both ways; nothing may come in, it may reach b on TCP 80 and UDP 9999.
    let policy = WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(a.addrs()),
        mode: Mode::Drop,
        isolated_ingress: true,
        isolated_egress: true,
        ingress: vec![],
        egress: vec![allow_tcp(ID_B, 80), allow_udp(ID_B, 9999)],
        ..Default::default()
    };
    dp.maps.set_workload(1, &policy).unwrap();
    attach_tc(&lab, &mut dp, 1, &a);

    let (got, link) = measure_with_link(&lab, &dp, 1, &a, || {
        let r = traffic::tcp(&a, b.addr(false), 80, 10, PATIENT);
        assert_eq!(r.echoed, 10, "replies of an allowed connection pass: {r:?}");
        let r = traffic::tcp(&a, b.addr(true), 80, 10, PATIENT);
        assert_eq!(r.echoed, 10, "same over IPv6: {r:?}");
    });
    assert_eq!(got.in_allowed, link.tx_packets);
    assert_eq!(got.out_allowed, link.rx_packets);
    assert_eq!(got.in_dropped + got.out_dropped, 0, "{got:?}");

    let got = measure(&lab, &dp, 1, || {
        let r = traffic::tcp(&b, a.addr(false), 80, 1, Duration::from_millis(1200));
        assert!(!r.connected, "a new connection into a is evaluated: {r:?}");
    });
    assert!(got.in_dropped >= 1 && got.in_allowed == 0, "{got:?}");

    // b has nothing on UDP 9999: its port unreachable error comes back into a, which allows
    // nothing in, and passes as related to the allowed flow.
    let related_before = dp.maps.diag().unwrap()[diag::ICMP_RELATED as usize];
    let got = measure(&lab, &dp, 1, || {
        let r = traffic::udp(&a, b.addr(false), 9999, 1, 64, PATIENT);
        let err = r.error.unwrap_or_default();
        assert!(
            err.contains("refused"),
            "the ICMP error reached the socket: {err}"
        );
    });
    assert_eq!(
        got,
        Packets {
            in_allowed: 1,
            out_allowed: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        dp.maps.diag().unwrap()[diag::ICMP_RELATED as usize] - related_before,
        1
    );

    // UDP 53 is not in a's egress rules.
    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp(&a, b.addr(false), 53, 2, 64, FAIL_FAST).echoed,
            0
        );
    });
    assert_eq!(
        got,
        Packets {
            out_dropped: 2,
            ..Default::default()
        }
    );
}

#[test]
fn ipv6_flows_are_enforced_and_a_mode_flip_applies_to_established_flows() {
    let Scenario {
        lab,
        mut dp,
        a,
        b,
        c,
    } = isolated_b(Mode::Log, TcMode::Auto);

    let got = measure(&lab, &dp, 1, || {
        assert_eq!(traffic::udp(&a, b.addr(true), 53, 4, 64, PATIENT).echoed, 4);
        assert_eq!(
            traffic::udp_from(&a, b.addr(true), 54, 4, 64, PATIENT, Some(40054)).echoed,
            4
        );
        assert_eq!(traffic::ping(&c, b.addr(true), 2), 2);
    });
    assert_eq!(
        got,
        Packets {
            in_allowed: 4,
            out_allowed: 4,
            in_would_drop: 6,
            out_would_drop: 6,
            ..Default::default()
        }
    );

    // Flip to drop: the tracked would-drop flow (same source port) is dropped from its
    // next packet on, the allowed one keeps working.
    dp.maps.set_mode(1, Mode::Drop).unwrap();
    let got = measure(&lab, &dp, 1, || {
        let r = traffic::udp_from(&a, b.addr(true), 54, 2, 64, FAIL_FAST, Some(40054));
        assert_eq!(r.echoed, 0, "{r:?}");
        assert_eq!(traffic::udp(&a, b.addr(true), 53, 4, 64, PATIENT).echoed, 4);
        assert_eq!(traffic::ping(&c, b.addr(true), 2), 0);
        let r = traffic::tcp(&a, b.addr(true), 80, 3, PATIENT);
        assert_eq!(r.echoed, 3, "{r:?}");
    });
    assert_eq!(got.in_dropped, 4, "{got:?}");
    assert_eq!(
        got.out_dropped + got.in_would_drop + got.out_would_drop,
        0,
        "{got:?}"
    );
}

#[test]
fn fragments_get_the_verdict_of_their_datagram() {
    let Scenario {
        lab, mut dp, a, b, ..
    } = isolated_b(Mode::Drop, TcMode::Auto);
    // 3000 bytes of UDP payload over a 1500-byte MTU: 3 fragments each way, IPv4 and IPv6.
    for v6 in [false, true] {
        let (got, link) = measure_with_link(&lab, &dp, 1, &b, || {
            let r = traffic::udp(&a, b.addr(v6), 53, 4, 3000, PATIENT);
            assert_eq!(r.echoed, 4, "allowed port, all fragments pass: {r:?}");
        });
        assert_eq!(
            got,
            Packets {
                in_allowed: 12,
                out_allowed: 12,
                ..Default::default()
            },
            "v6={v6}"
        );
        assert_eq!((link.tx_packets, link.rx_packets), (12, 12));

        // Port 54 is not allowed: every fragment is dropped, not just the first.
        let got = measure(&lab, &dp, 1, || {
            let r = traffic::udp(&a, b.addr(v6), 54, 4, 3000, FAIL_FAST);
            assert_eq!(r.echoed, 0, "{r:?}");
        });
        assert_eq!(
            got,
            Packets {
                in_dropped: 12,
                ..Default::default()
            },
            "v6={v6}"
        );
    }
    let d = dp.maps.diag().unwrap();
    assert_eq!(d[diag::FRAGMENT_UNKNOWN as usize], 0);
    // 2 later fragments per datagram: 4 datagrams in and 4 echoes out allowed, 4 in denied,
    // in both families.
    assert_eq!(d[diag::FRAGMENT_MATCHED as usize], (4 + 4 + 4) * 2 * 2);

    // Log mode: all three fragments of a denied datagram count as would_drop.
    dp.maps.set_mode(1, Mode::Log).unwrap();
    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp(&a, b.addr(false), 54, 2, 3000, PATIENT).echoed,
            2
        );
    });
    assert_eq!(
        got,
        Packets {
            in_would_drop: 6,
            out_would_drop: 6,
            ..Default::default()
        }
    );
}

#[test]
fn cgroup_attachment_counts_and_enforces_socket_traffic() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    let c = lab.add_pod("c");
    lab.serve(&b, &[80], &[53, 54]);
    lab.serve(&c, &[80], &[53]);
    let mut dp = lab.datapath(TcMode::Auto);
    register(&mut dp, &a, ID_A);
    register(&mut dp, &b, ID_B);
    register(&mut dp, &c, ID_C);
    // b in its cgroup: ingress only from a on UDP 53 and TCP 80, egress only to c on UDP 53.
    let policy = WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(b.addrs()),
        mode: Mode::Log,
        isolated_ingress: true,
        isolated_egress: true,
        ingress: vec![allow_udp(ID_A, 53), allow_tcp(ID_A, 80)],
        egress: vec![allow_udp(ID_C, 53)],
        ..Default::default()
    };
    dp.maps.set_workload(1, &policy).unwrap();
    attach_cgroup(&mut dp, 1, &b);

    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp(&a, b.addr(false), 53, 5, 64, PATIENT).echoed,
            5
        );
        assert_eq!(traffic::udp(&a, b.addr(true), 54, 3, 64, PATIENT).echoed, 3);
        assert_eq!(
            traffic::udp(&b, c.addr(false), 53, 2, 64, PATIENT).echoed,
            2
        );
    });
    assert_eq!(
        got,
        Packets {
            in_allowed: 5 + 2,
            out_allowed: 5 + 2,
            in_would_drop: 3,
            out_would_drop: 3,
            ..Default::default()
        }
    );

    dp.maps.set_mode(1, Mode::Drop).unwrap();
    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp(&a, b.addr(false), 54, 3, 64, FAIL_FAST).echoed,
            0
        );
        let r = traffic::tcp(&c, b.addr(false), 80, 1, Duration::from_millis(1200));
        assert!(!r.connected, "c may not connect to b: {r:?}");
        let r = traffic::tcp(&b, c.addr(false), 80, 1, FAIL_FAST);
        assert!(!r.connected, "b may not connect to c on TCP: {r:?}");
        // An egress drop at the socket: the sender sees the error at once.
        let r = traffic::udp(&b, c.addr(true), 54, 1, 64, FAIL_FAST);
        assert_eq!(r.sent, 0, "{r:?}");
        assert!(
            r.error.as_deref().unwrap_or("").contains("not permitted"),
            "cgroup egress drops fail the send: {r:?}"
        );
        assert_eq!(traffic::tcp(&a, b.addr(false), 80, 4, PATIENT).echoed, 4);
        // b reaching its own addresses (over loopback, which the cgroup hooks see) is never
        // enforced, though no rule allows b to b (upstream's AllowLoopback; `check` agrees).
        for v6 in [false, true] {
            let r = traffic::tcp(&b, b.addr(v6), 80, 2, PATIENT);
            assert_eq!(r.echoed, 2, "b to itself (IPv6 {v6}): {r:?}");
        }
        // And over localhost (a sidecar's traffic with its pod): neither a spoof nor denied.
        for localhost in ["127.0.0.1", "::1"] {
            let r = traffic::tcp(&b, localhost.parse().unwrap(), 80, 2, PATIENT);
            assert_eq!(r.echoed, 2, "b to {localhost}: {r:?}");
        }
    });
    assert!(
        got.in_dropped >= 4,
        "3 datagrams and at least one SYN: {got:?}"
    );
    assert_eq!(got.out_dropped, 2, "one SYN and one datagram: {got:?}");
    assert_eq!(got.in_would_drop + got.out_would_drop, 0);
}

#[test]
fn the_nearest_registered_cgroup_takes_a_containers_traffic() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let b = lab.add_pod("b");
    // b's server runs in a container: a child cgroup of the pod's.
    let container = b.cgroup.join("ctr");
    std::fs::create_dir_all(&container).unwrap();
    let in_container = tollgate_tests::Pod {
        cgroup: container,
        ..b.clone()
    };
    lab.serve(&in_container, &[], &[53]);
    let mut dp = lab.datapath(TcMode::Auto);
    // Slot 2 attached on b's own directory; slot 1 registered for the kubepods hierarchy
    // above every pod (as a stale or forged entry would be). Only the routing is registered
    // there: programs attached at an ancestor run for every socket below it, which is why
    // the agent never attaches above the pods.
    for slot in [1, 2] {
        dp.maps
            .set_workload(
                slot,
                &WorkloadPolicy::open(Mode::Log).sending_from(&b.addrs()),
            )
            .unwrap();
    }
    let kubepods = lab.cgroup_dir.join("kubepods.slice");
    dp.maps
        .set_cgroup_slot(tollgate::attach::cgroup_id(&kubepods).unwrap(), 1)
        .unwrap();
    attach_cgroup(&mut dp, 2, &b);

    lab.settle();
    let above = Packets::read(&dp, 1);
    let own = Packets::read(&dp, 2);
    assert_eq!(
        traffic::udp(&a, b.addr(false), 53, 4, 64, PATIENT).echoed,
        4
    );
    lab.settle();
    assert_eq!(
        Packets::read(&dp, 2).since(own),
        Packets {
            in_allowed: 4,
            out_allowed: 4,
            ..Default::default()
        },
        "the pod's own directory, the nearest registered ancestor of the container"
    );
    assert_eq!(
        Packets::read(&dp, 1).since(above),
        Packets::default(),
        "nothing for the cgroup above the pods"
    );
}

#[test]
fn ip_blocks_with_except_port_ranges_and_world_peers() {
    let mut lab = Lab::new();
    let a = lab.add_pod("a");
    let o1 = lab.add_outside("o1");
    let o2 = lab.add_outside("o2");
    lab.serve(&o1, &[8080, 8101], &[53]);
    lab.serve(&o2, &[8080], &[53]);
    let mut dp = lab.datapath(TcMode::Auto);
    register(&mut dp, &a, ID_A);
    let o2_v4 = format!("{}/32", o2.ipv4);
    let policy = WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(a.addrs()),
        mode: Mode::Drop,
        isolated_ingress: false,
        isolated_egress: true,
        ingress: vec![],
        egress: vec![
            allow(cidr("203.0.113.0/24", &[&o2_v4]), udp(53)),
            allow(
                cidr("203.0.113.0/24", &[]),
                PortMatch::Range {
                    proto: PROTO_TCP,
                    first: 8000,
                    last: 8100,
                },
            ),
            allow(cidr("2001:db8::/32", &[]), PortMatch::Protocol(PROTO_UDP)),
        ],
        ..Default::default()
    };
    dp.maps.set_workload(1, &policy).unwrap();
    attach_tc(&lab, &mut dp, 1, &a);
    let mut events = dp.events().unwrap();

    let (got, link) = measure_with_link(&lab, &dp, 1, &a, || {
        assert_eq!(
            traffic::udp(&a, o1.addr(false), 53, 2, 64, PATIENT).echoed,
            2
        );
        assert_eq!(
            traffic::udp(&a, o2.addr(false), 53, 2, 64, FAIL_FAST).echoed,
            0,
            "excepted"
        );
        assert_eq!(
            traffic::tcp(&a, o2.addr(false), 8080, 1, PATIENT).echoed,
            1,
            "range, no except"
        );
        assert!(
            !traffic::tcp(&a, o1.addr(false), 8101, 1, FAIL_FAST).connected,
            "outside range"
        );
        assert_eq!(
            traffic::udp(&a, o2.addr(true), 53, 2, 64, PATIENT).echoed,
            2,
            "v6 block"
        );
        assert!(
            !traffic::tcp(&a, o1.addr(true), 8080, 1, FAIL_FAST).connected,
            "v6 TCP"
        );
        assert_eq!(
            traffic::ping(&a, o1.addr(false), 1),
            0,
            "no rule allows ICMP"
        );
    });
    // 2 excepted datagrams, one SYN each to 8101 and over IPv6 (connect gives up before the
    // first retransmission), one echo request.
    assert_eq!(got.out_dropped, 2 + 1 + 1 + 1, "{got:?}");
    // Everything else passed and was counted: the interface saw the same packets.
    assert_eq!(
        got.out_allowed + got.out_dropped,
        link.rx_packets,
        "{got:?} {link:?}"
    );
    assert_eq!(got.in_allowed, link.tx_packets, "{got:?} {link:?}");
    assert_eq!(got.in_dropped + got.in_would_drop + got.out_would_drop, 0);
    let seen = events.wait(Duration::from_secs(1));
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|e| e.peer_identity == IDENTITY_WORLD),
        "outside addresses are world"
    );
}

/// Single ports, whole protocols and rules without ports are keys of a hash, port ranges and
/// ipBlocks sit in tries; a ruleset looks up each kind only when it has such rules: a port
/// range, a rule without ports and an ipBlock added to a ruleset of single ports take effect
/// at once, and stop when removed.
#[test]
fn rules_beyond_single_ports_take_effect_when_added_and_stop_when_removed() {
    let Scenario {
        lab,
        mut dp,
        a,
        b,
        c,
    } = isolated_b(Mode::Drop, TcMode::Auto);
    let single_ports = b_allows_a(&b, Mode::Drop);
    let reach = |from: &Pod, tcp: Option<u16>, udp_port: u16| match tcp {
        Some(port) => traffic::tcp(from, b.addr(false), port, 1, FAIL_FAST).echoed == 1,
        None => traffic::udp(from, b.addr(false), udp_port, 1, 64, FAIL_FAST).echoed == 1,
    };
    let lookups =
        |dp: &Datapath| dp.maps.workload(1).unwrap().flags & workload_flags::lookups(DIR_INGRESS);
    assert_eq!(
        lookups(&dp),
        0,
        "single ports only: the single-port key alone"
    );
    assert!(reach(&a, Some(80), 0));
    assert!(!reach(&a, Some(81), 0));
    assert!(!reach(&c, None, 54));
    assert!(!reach(&c, None, 53));

    let mut wider = single_ports.clone();
    wider.ingress.extend([
        allow(
            tollgate::compile::Peer::Identity(ID_A),
            PortMatch::Range {
                proto: PROTO_TCP,
                first: 81,
                last: 90,
            },
        ),
        allow(cidr(&format!("{}/32", c.ipv4), &[]), udp(54)),
        allow(tollgate::compile::Peer::Identity(ID_C), PortMatch::Any),
    ]);
    dp.maps.set_workload(1, &wider).unwrap();
    assert_eq!(
        lookups(&dp),
        workload_flags::PREFIX_RULES_INGRESS
            | workload_flags::CIDR_RULES_INGRESS
            | workload_flags::ANY_PROTO_RULES_INGRESS
    );
    assert!(reach(&a, Some(81), 0), "port range");
    assert!(reach(&c, None, 54), "ipBlock");
    assert!(reach(&c, None, 53), "rule without ports");
    assert!(reach(&c, Some(80), 0), "rule without ports, TCP");

    dp.maps.set_workload(1, &single_ports).unwrap();
    assert_eq!(lookups(&dp), 0);
    assert!(reach(&a, Some(80), 0));
    assert!(!reach(&a, Some(81), 0), "range removed");
    assert!(!reach(&c, None, 54), "ipBlock removed");
    assert!(!reach(&c, Some(80), 0), "rule without ports removed");
    let _ = lab;
}

/// Each ruleset's port ranges and ipBlocks sit in tries of its own (so a
/// lookup never walks other workloads' rules), pinned beside the maps: a reader opened
/// before a trie existed counts its entries, and an agent after a restart adopts the tries,
/// keeps them deciding and removes only its own stale entries.
#[test]
fn each_ruleset_has_tries_of_its_own_that_a_restart_adopts() {
    let Scenario {
        lab,
        mut dp,
        a,
        b,
        c,
    } = isolated_b(Mode::Drop, TcMode::Auto);
    let reach = |from: &Pod, tcp: Option<u16>, udp_port: u16| match tcp {
        Some(port) => traffic::tcp(from, b.addr(false), port, 1, FAIL_FAST).echoed == 1,
        None => traffic::udp(from, b.addr(false), udp_port, 1, 64, FAIL_FAST).echoed == 1,
    };
    let tries = |prefix: &str| {
        let mut found: Vec<String> = std::fs::read_dir(&lab.pin_dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect();
        found.sort();
        found
    };
    let policy_entries = |readers: &tollgate::maps::MapReaders| {
        readers
            .occupancy()
            .into_iter()
            .find(|(name, _, _)| *name == "POLICY")
            .map(|(_, entries, _)| entries)
            .unwrap()
    };
    // A reader opened before any ruleset has a trie, as the metrics endpoint's is.
    let reader = tollgate::maps::MapReaders::open(&lab.pin_dir).unwrap();
    assert_eq!(tries("POLICY_RULESET_"), Vec::<String>::new());

    // Another workload (slot 2) with a port range of its own: its own trie.
    let other = WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(c.addrs()),
        mode: Mode::Drop,
        isolated_ingress: true,
        ingress: vec![allow(
            tollgate::compile::Peer::Identity(ID_A),
            PortMatch::Range {
                proto: PROTO_TCP,
                first: 81,
                last: 90,
            },
        )],
        ..Default::default()
    };
    dp.maps.set_workload(2, &other).unwrap();
    let ingress_trie = |slot: u32| tollgate::maps::ruleset_of(slot, DIR_INGRESS).to_string();
    assert_eq!(
        tries("POLICY_RULESET_"),
        vec![format!("POLICY_RULESET_{}", ingress_trie(2))]
    );
    let other_entries = policy_entries(&reader);
    assert!(
        other_entries > 0,
        "the reader sees the trie created after it"
    );
    assert!(!reach(&a, Some(81), 0), "slot 2's range is not b's");

    let mut wider = b_allows_a(&b, Mode::Drop);
    wider.ingress.extend([
        allow(
            tollgate::compile::Peer::Identity(ID_A),
            PortMatch::Range {
                proto: PROTO_TCP,
                first: 80,
                last: 83,
            },
        ),
        allow(cidr(&format!("{}/32", c.ipv4), &[]), udp(54)),
        allow(tollgate::compile::Peer::Identity(ID_C), PortMatch::Any),
    ]);
    dp.maps.set_workload(1, &wider).unwrap();
    let mut both = vec![
        format!("POLICY_RULESET_{}", ingress_trie(1)),
        format!("POLICY_RULESET_{}", ingress_trie(2)),
    ];
    both.sort();
    assert_eq!(tries("POLICY_RULESET_"), both);
    assert_eq!(
        tries("CIDR_RULES_RULESET_"),
        vec![format!("CIDR_RULES_RULESET_{}", ingress_trie(1))]
    );
    // The range 80..=83, one aligned block, is b's one trie entry; the rule without ports
    // is a key of the hash.
    assert_eq!(policy_entries(&reader), other_entries + 1);
    assert!(reach(&a, Some(81), 0), "b's own range");
    assert!(reach(&c, None, 54), "ipBlock");
    assert!(reach(&c, Some(80), 0), "rule without ports");

    // A restart: the old process gone (its maps, links and tries stay pinned), a new one
    // loads over the same pins.
    drop(dp);
    let dp = lab.datapath(TcMode::Auto);
    assert!(reach(&a, Some(81), 0), "adopted trie still decides");
    assert!(reach(&c, None, 54), "adopted ipBlock trie still decides");
    // Another restart, the maps of maps lost meanwhile (made anew, empty): the pinned
    // tries are put back in them.
    drop(dp);
    std::fs::remove_file(lab.pin_dir.join("POLICY")).unwrap();
    std::fs::remove_file(lab.pin_dir.join("CIDR_RULES")).unwrap();
    let mut dp = lab.datapath(TcMode::Auto);
    assert!(reach(&a, Some(81), 0), "trie put back in a new map of maps");
    assert!(
        reach(&c, None, 54),
        "ipBlock trie put back in a new map of maps"
    );
    dp.maps
        .set_workload(1, &b_allows_a(&b, Mode::Drop))
        .unwrap();
    assert!(
        !reach(&a, Some(81), 0),
        "stale range found and removed after the restart"
    );
    assert!(
        !reach(&c, Some(80), 0),
        "stale rule without ports found and removed after the restart"
    );
    assert!(
        !reach(&c, None, 54),
        "stale ipBlock removed after the restart"
    );
    assert!(reach(&a, Some(80), 0));
    assert_eq!(
        policy_entries(&reader),
        other_entries,
        "slot 2's entries untouched"
    );

    lab.in_node(|| dp.remove()).unwrap();
    assert!(
        !lab.pin_dir.exists() || tries("").is_empty(),
        "no trie left pinned"
    );
}

#[test]
fn a_rule_change_re_evaluates_tracked_flows() {
    let Scenario {
        lab, mut dp, a, b, ..
    } = isolated_b(Mode::Log, TcMode::Auto);
    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp_from(&a, b.addr(false), 54, 2, 64, PATIENT, Some(40000)).echoed,
            2
        );
    });
    assert_eq!(got.in_would_drop, 2);
    // Allow UDP 54: the tracked would-drop flow is allowed from its next packet on.
    let mut policy = b_allows_a(&b, Mode::Log);
    policy.ingress.push(allow_udp(ID_A, 54));
    dp.maps.set_workload(1, &policy).unwrap();
    let got = measure(&lab, &dp, 1, || {
        assert_eq!(
            traffic::udp_from(&a, b.addr(false), 54, 2, 64, PATIENT, Some(40000)).echoed,
            2
        );
    });
    assert_eq!(
        got,
        Packets {
            in_allowed: 2,
            out_allowed: 2,
            ..Default::default()
        }
    );
    // And back: the rule is gone, the flow is a would-drop again.
    let policy = WorkloadPolicy {
        ingress: vec![allow_tcp(ID_A, 80)],
        ..policy
    };
    dp.maps.set_workload(1, &policy).unwrap();
    let got = measure(&lab, &dp, 1, || {
        traffic::udp_from(&a, b.addr(false), 54, 1, 64, PATIENT, Some(40000));
    });
    assert_eq!(got.in_would_drop, 1);
    assert_eq!(
        dp.maps.policy_entries(),
        (1, 0),
        "stale entries were removed"
    );
}
