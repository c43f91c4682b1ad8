//! Shorthands for datapath tests: packet counts per verdict, rules, identities.

use std::{
    net::IpAddr,
    ops::Deref,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_common::{
    DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP, VERDICT_ALLOWED, VERDICT_DROPPED,
    VERDICT_WOULD_DROP,
};
use ipnet::IpNet;
use tollgate::{
    Datapath,
    compile::{AllowRule, Peer, PortMatch},
};

use crate::{Lab, LinkStats, Pod};

/// Packets of one workload by direction and verdict: what `tollgate_packets_total` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packets {
    pub in_allowed: u64,
    pub in_would_drop: u64,
    pub in_dropped: u64,
    pub out_allowed: u64,
    pub out_would_drop: u64,
    pub out_dropped: u64,
}

impl Packets {
    /// Current counters of a slot.
    pub fn read(dp: &Datapath, slot: u32) -> Packets {
        let c = dp.maps.counters(slot).expect("read counters");
        let p = |d: u8, v: u8| c[d as usize][v as usize].packets;
        Packets {
            in_allowed: p(DIR_INGRESS, VERDICT_ALLOWED),
            in_would_drop: p(DIR_INGRESS, VERDICT_WOULD_DROP),
            in_dropped: p(DIR_INGRESS, VERDICT_DROPPED),
            out_allowed: p(DIR_EGRESS, VERDICT_ALLOWED),
            out_would_drop: p(DIR_EGRESS, VERDICT_WOULD_DROP),
            out_dropped: p(DIR_EGRESS, VERDICT_DROPPED),
        }
    }

    /// Counts since `before`.
    pub fn since(self, before: Packets) -> Packets {
        Packets {
            in_allowed: self.in_allowed - before.in_allowed,
            in_would_drop: self.in_would_drop - before.in_would_drop,
            in_dropped: self.in_dropped - before.in_dropped,
            out_allowed: self.out_allowed - before.out_allowed,
            out_would_drop: self.out_would_drop - before.out_would_drop,
            out_dropped: self.out_dropped - before.out_dropped,
        }
    }

    pub fn ingress_total(&self) -> u64 {
        self.in_allowed + self.in_would_drop + self.in_dropped
    }

    pub fn egress_total(&self) -> u64 {
        self.out_allowed + self.out_would_drop + self.out_dropped
    }
}

/// Measures what one action does to a slot's counters (after the lab went quiet).
pub fn measure(lab: &Lab, dp: &Datapath, slot: u32, action: impl FnOnce()) -> Packets {
    lab.settle();
    let before = Packets::read(dp, slot);
    action();
    lab.settle();
    Packets::read(dp, slot).since(before)
}

/// Like `measure`, also returning the host-side link statistics delta of `pod`.
pub fn measure_with_link(
    lab: &Lab,
    dp: &Datapath,
    slot: u32,
    pod: &Pod,
    action: impl FnOnce(),
) -> (Packets, LinkStats) {
    lab.settle();
    let before = Packets::read(dp, slot);
    let link_before = lab.link_stats(pod);
    action();
    lab.settle();
    let link_after = lab.link_stats(pod);
    (
        Packets::read(dp, slot).since(before),
        LinkStats {
            rx_packets: link_after.rx_packets - link_before.rx_packets,
            tx_packets: link_after.tx_packets - link_before.tx_packets,
        },
    )
}

/// Names a pod's addresses as `identity` in the datapath.
pub fn register(dp: &mut Datapath, pod: &Pod, identity: u32) {
    for ip in [IpAddr::V4(pod.ipv4), IpAddr::V6(pod.ipv6)] {
        dp.maps
            .set_identity(IpNet::from(ip), identity)
            .expect("set identity");
    }
}

/// A rule allowing `identity` on TCP `port`.
pub fn allow_tcp(identity: u32, port: u16) -> AllowRule {
    allow(Peer::Identity(identity), tcp(port))
}

/// A rule allowing `identity` on UDP `port`.
pub fn allow_udp(identity: u32, port: u16) -> AllowRule {
    allow(Peer::Identity(identity), udp(port))
}

/// A rule allowing `peer` on `ports`.
pub fn allow(peer: Peer, ports: PortMatch) -> AllowRule {
    AllowRule {
        peer,
        ports,
        rule_id: 1,
    }
}

pub fn tcp(port: u16) -> PortMatch {
    PortMatch::Range {
        proto: PROTO_TCP,
        first: port,
        last: port,
    }
}

pub fn udp(port: u16) -> PortMatch {
    PortMatch::Range {
        proto: PROTO_UDP,
        first: port,
        last: port,
    }
}

/// An ipBlock peer.
pub fn cidr(net: &str, except: &[&str]) -> Peer {
    Peer::Cidr {
        net: net.parse().expect("cidr"),
        except: except.iter().map(|e| e.parse().expect("except")).collect(),
    }
}

/// Short timeouts for flows expected to fail.
pub const FAIL_FAST: Duration = Duration::from_millis(400);
/// Timeouts for flows expected to work.
pub const PATIENT: Duration = Duration::from_secs(2);

impl Lab {
    /// Waits until no host-side interface of the lab moved a packet for 100 ms (at most
    /// 3 s), so counter deltas hold only what the test sent.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last: Vec<LinkStats> = self.pods.iter().map(|p| self.link_stats(p)).collect();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(25));
            let now: Vec<LinkStats> = self.pods.iter().map(|p| self.link_stats(p)).collect();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(100) {
                return;
            }
        }
    }
}

/// Attaches `slot` at the host side of `pod`'s interface.
pub fn attach_tc(
    lab: &Lab,
    dp: &mut Datapath,
    slot: u32,
    pod: &Pod,
) -> tollgate::attach::AttachMethod {
    lab.in_node(|| {
        dp.attach(
            slot,
            &tollgate::attach::AttachPoint::Tc {
                iface: pod.host_if.clone(),
            },
        )
    })
    .unwrap_or_else(|e| panic!("attach tc to {}: {}", pod.name, crate::chain(&e)))
}

/// Attaches `slot` at `pod`'s cgroup directory.
pub fn attach_cgroup(dp: &mut Datapath, slot: u32, pod: &Pod) {
    dp.attach(
        slot,
        &tollgate::attach::AttachPoint::Cgroup {
            path: pod.cgroup.clone(),
        },
    )
    .unwrap_or_else(|e| panic!("attach cgroup of {}: {}", pod.name, crate::chain(&e)));
}

/// A fresh scratch directory for one test (removed first if a killed run left it),
/// removed again when the test drops it, passed or failed: a suite run would otherwise
/// leave about forty behind. Set `TOLLGATE_KEEP_SCRATCH=1` to keep them for a look.
pub fn temp_dir(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("tollgate-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch directory");
    Scratch(dir)
}

/// A test's scratch directory (`temp_dir`): a path, removed with its contents on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("TOLLGATE_KEEP_SCRATCH").is_some_and(|v| v == "1") {
            eprintln!("kept scratch directory {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
