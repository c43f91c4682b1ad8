//! Connection tracking under a flood: one workload flooded with new flows cannot evict the
//! established flows of the others (`--conntrack-share`), allowed flows or would-drops,
//! on real traffic through the real programs.
//!
//! Needs root and a kernel with BPF (CI has both): nothing here is skipped.

use agent_common::{CtKey, PROTO_UDP, diag};
use tollgate::{
    Datapath, DatapathOptions, Mode, WorkloadPolicy, attach::TcMode, maps::WorkloadAddresses,
};
use tollgate_tests::{
    Lab, Pod, chain,
    support::{PATIENT, allow_udp, attach_tc, register},
    traffic,
};

const ID_FLOODED: u32 = 300;
const ID_CLIENT: u32 = 301;
const ID_SERVER: u32 = 302;
const SLOT_FLOODED: u32 = 1;
const SLOT_CLIENT: u32 = 2;
/// A small table, so a flood that fits in a test overflows it many times.
const CAPACITY: u32 = 4096;
const SHARE: u32 = CAPACITY / 4;
const CLIENT_PORT: u16 = 40_000;

struct Flood {
    lab: Lab,
    dp: Datapath,
    flooded: Pod,
    client: Pod,
    server: Pod,
    flooder: Pod,
}

fn setup() -> Flood {
    let mut lab = Lab::new();
    let flooded = lab.add_pod("flooded");
    let client = lab.add_pod("client");
    let server = lab.add_pod("server");
    // Not a workload: its packets are tracked only where they arrive.
    let flooder = lab.add_pod("flooder");
    lab.serve(&server, &[], &[53]);
    let mut options = DatapathOptions::new(&lab.pin_dir);
    options.tc_mode = TcMode::Auto;
    options.conntrack_capacity = CAPACITY;
    let mut dp = Datapath::load(options).unwrap_or_else(|e| panic!("load: {}", chain(&e)));
    register(&mut dp, &flooded, ID_FLOODED);
    register(&mut dp, &client, ID_CLIENT);
    register(&mut dp, &server, ID_SERVER);
    // The flooded workload is in log mode and not isolated: every flood flow is allowed and
    // tracked (`isolate_flooded` makes them would-drops). The client is isolated both ways
    // in drop mode: it may reach the server on UDP 53 and nothing may come in, so its
    // replies pass only while its flow is tracked.
    let flooded_policy = WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(flooded.addrs()),
        mode: Mode::Log,
        ..Default::default()
    };
    dp.maps.set_workload(SLOT_FLOODED, &flooded_policy).unwrap();
    let client_policy = WorkloadPolicy {
        addresses: WorkloadAddresses::Pod(client.addrs()),
        mode: Mode::Drop,
        isolated_ingress: true,
        isolated_egress: true,
        egress: vec![allow_udp(ID_SERVER, 53)],
        ..Default::default()
    };
    dp.maps.set_workload(SLOT_CLIENT, &client_policy).unwrap();
    attach_tc(&lab, &mut dp, SLOT_FLOODED, &flooded);
    attach_tc(&lab, &mut dp, SLOT_CLIENT, &client);
    Flood {
        lab,
        dp,
        flooded,
        client,
        server,
        flooder,
    }
}

impl Flood {
    /// The flooded workload isolated for ingress, still in log mode: the flood's flows are
    /// would-drops.
    fn isolate_flooded(&mut self) {
        let policy = WorkloadPolicy {
            addresses: WorkloadAddresses::Pod(self.flooded.addrs()),
            mode: Mode::Log,
            isolated_ingress: true,
            ..Default::default()
        };
        self.dp.maps.set_workload(SLOT_FLOODED, &policy).unwrap();
    }

    /// Flows of the flooded workload in the main table.
    fn flooded_in_main(&self) -> u32 {
        self.dp
            .maps
            .conntrack()
            .iter()
            .filter(|(k, _)| k.slot == SLOT_FLOODED)
            .count() as u32
    }

    fn set_share(&mut self, share: u32) {
        let mut config = self.dp.maps.config().unwrap();
        config.ct_share = share;
        self.dp.maps.set_config(&config).unwrap();
    }

    /// The client's tracked flow to the server, if the table still holds it.
    fn client_flow(&self) -> Option<CtKey> {
        self.dp
            .maps
            .conntrack()
            .into_iter()
            .map(|(k, _)| k)
            .find(|k| {
                k.slot == SLOT_CLIENT
                    && k.proto == PROTO_UDP
                    && k.local_port == CLIENT_PORT
                    && k.remote_port == 53
            })
    }

    /// The client talks to the server: an established, answered flow.
    fn talk(&self) {
        let r = traffic::udp_from(
            &self.client,
            self.server.addr(false),
            53,
            3,
            64,
            PATIENT,
            Some(CLIENT_PORT),
        );
        assert_eq!(r.echoed, 3, "the client's flow works: {r:?}");
    }

    /// The flooder opens `ROUND` new flows (distinct destination ports, a fresh source
    /// port) into the flooded workload, two packets each: flows used more than once, which
    /// the kernel's LRU keeps as dearly as the client's. Returns the flows opened.
    fn flood_round(&self) -> u32 {
        traffic::udp_burst_rounds(&self.flooder, self.flooded.addr(false), 1000, ROUND, 2).sent / 2
    }
}

const ROUND: u32 = 1000;

#[test]
fn a_flood_of_new_flows_cannot_evict_other_workloads_established_flows() {
    let mut f = setup();

    // Without a share, find how big a flood evicts the client's idle flow (the LRU gives
    // recently used entries a second chance, so it takes more than the table's capacity).
    f.set_share(0);
    f.talk();
    assert!(f.client_flow().is_some(), "the client's flow is tracked");
    let mut evicting = 0;
    while f.client_flow().is_some() {
        evicting += f.flood_round();
        assert!(
            evicting <= 50 * CAPACITY,
            "a flood of {evicting} flows never evicted the client's flow: the test shows nothing"
        );
    }
    eprintln!("without a share, {evicting} new flows evicted the client's flow");

    // With the share, twice that flood leaves it alone.
    f.dp.maps.flush_conntrack();
    f.set_share(SHARE);
    let overflow_before = f.dp.maps.diag().unwrap()[diag::CT_OVERFLOW as usize];
    f.talk();
    let mut sent = 0;
    while sent < 2 * evicting {
        sent += f.flood_round();
    }
    let in_main = f.flooded_in_main();
    let overflowed = f.dp.maps.diag().unwrap()[diag::CT_OVERFLOW as usize] - overflow_before;
    assert!(
        in_main <= SHARE + 16,
        "the flooded workload holds its share of the main table (give or take CPUs \
         inserting at once): {in_main} > {SHARE}"
    );
    assert!(
        overflowed >= (sent - SHARE) as u64,
        "the rest of the flood went to the overflow table: {overflowed} of {sent}"
    );
    assert!(
        f.client_flow().is_some(),
        "the client's established flow survived a flood of {sent} new flows into another workload"
    );
    let before = f.dp.maps.counters(SLOT_CLIENT).unwrap();
    f.talk();
    let after = f.dp.maps.counters(SLOT_CLIENT).unwrap();
    let dropped: u64 = (0..2)
        .map(|d| after[d][2].packets - before[d][2].packets)
        .sum();
    assert_eq!(dropped, 0, "nothing of the client was dropped");

    // Would-drops (the flooded workload isolated, in log mode) are tracked as allowed flows
    // are, within the same share: twice the flood leaves the client's flow alone.
    f.dp.maps.flush_conntrack();
    f.isolate_flooded();
    f.talk();
    let mut sent = 0;
    while sent < 2 * evicting {
        sent += f.flood_round();
    }
    let in_main = f.flooded_in_main();
    assert!(
        in_main > 0 && in_main <= SHARE + 16,
        "{in_main} would-drops in the main table"
    );
    assert!(
        f.client_flow().is_some(),
        "the client's flow survived a flood of {sent} would-drops"
    );
    let Flood { lab, dp, .. } = f;
    lab.in_node(|| dp.remove()).expect("remove datapath");
}

/// A busy client that reuses its source ports opens connection after connection on the same
/// few tracking keys. Each is written over the closed one where it lies (counted in the
/// workload's share already), so however many it opens, the workload keeps its flows in the
/// main table; counted as new, every reused port would add to its share until the next
/// census and send the workload's flows to the overflow table, where a flood evicts them.
#[test]
fn connections_opened_again_on_their_ports_stay_within_the_share() {
    const SOURCE_PORTS: u16 = 8;
    let mut f = setup();
    f.set_share(SHARE);
    f.lab.serve(&f.flooded, &[80], &[]);
    let overflow_before = f.dp.maps.diag().unwrap()[diag::CT_OVERFLOW as usize];
    let to = f.flooded.addr(false);
    let opened =
        traffic::crr_from_ports(&f.flooder, to, 80, 3 * SHARE as u64, 41_000, SOURCE_PORTS);
    assert!(
        opened.connections >= 2 * SHARE as u64,
        "the client opened twice the share of connections at least: {opened:?}"
    );
    let overflowed = f.dp.maps.diag().unwrap()[diag::CT_OVERFLOW as usize] - overflow_before;
    let in_main = f.flooded_in_main();
    assert_eq!(
        overflowed, 0,
        "{} connections on {SOURCE_PORTS} source ports sent flows to the overflow table \
         ({in_main} in the main table)",
        opened.connections
    );
    assert!(
        in_main >= 1 && in_main <= SOURCE_PORTS as u32,
        "one tracked flow per source port: {in_main}"
    );
    let counted = f.dp.maps.conntrack_share_count(SLOT_FLOODED).unwrap();
    assert_eq!(
        counted, in_main as u64,
        "the share counts the flows the workload holds"
    );
    let Flood { lab, dp, .. } = f;
    lab.in_node(|| dp.remove()).expect("remove datapath");
}
