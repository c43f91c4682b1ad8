//! Flow events from the kernel's ring buffer.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use agent_common::FlowEvent;
use aya::maps::{MapData, RingBuf};

/// Reads `FlowEvent`s from the ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        EventReader { ring }
    }

    /// Every event available now.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a whole FlowEvent; read it unaligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        out
    }

    /// Waits up to `timeout` for events, then drains what arrived.
    pub fn wait(&mut self, timeout: Duration) -> Vec<FlowEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.drain();
            let left = deadline.saturating_duration_since(Instant::now());
            if !events.is_empty() || left.is_zero() {
                return events;
            }
            let mut pfd = libc::pollfd {
                fd: self.ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        }
    }
}

impl std::os::fd::AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_fd().as_raw_fd()
    }
}

/// A workload or peer in a flow log record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub namespace: String,
    pub pod: String,
    pub workload: String,
}

/// What the flow log needs to name a slot.
#[derive(Clone, Debug, Default)]
pub struct SlotNames {
    pub endpoint: Option<Endpoint>,
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    /// The EgressAllowlists that select the workload (`NAMESPACE/NAME`): they isolate its
    /// egress toward addresses outside the cluster.
    pub egress_allowlists: Vec<String>,
}

/// Names for slots and addresses, refreshed after every reconcile.
#[derive(Clone, Debug, Default)]
pub struct Naming {
    pub node: String,
    pub slots: std::collections::HashMap<u32, SlotNames>,
    pub addresses: std::collections::HashMap<std::net::IpAddr, Endpoint>,
    /// Service virtual addresses: `NAMESPACE/NAME`, and the backends as an endpoint (the pod
    /// when there is one backend, else only the workload they share or all their names;
    /// `None` when they are all outside the cluster).
    pub services: std::collections::HashMap<std::net::IpAddr, (String, Option<Endpoint>)>,
    /// A virtual address of each Service frontend, by identity: a flow to a NodePort is
    /// decided as one to the frontend it leads to, named here.
    pub service_addresses: std::collections::HashMap<u32, std::net::IpAddr>,
    /// The node's own addresses: the peer `host`.
    pub host: std::collections::HashSet<std::net::IpAddr>,
    /// Virtual addresses of the Services with a backend outside the cluster (which an
    /// EgressAllowlist isolates its workloads toward, as the outside).
    pub services_outside: std::collections::HashSet<std::net::IpAddr>,
}

/// The name of the node as a peer (`host`): its namespace and workload are `host`, its pod
/// the node's name.
pub fn host_endpoint(node: &str) -> Endpoint {
    Endpoint {
        namespace: "host".into(),
        pod: node.into(),
        workload: "host".into(),
    }
}

/// One flow log line (JSON).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FlowRecord {
    pub time: String,
    pub node: String,
    pub verdict: String,
    pub direction: String,
    pub protocol: String,
    pub src_ip: String,
    pub src_port: u16,
    pub dst_ip: String,
    pub dst_port: u16,
    /// `null` for addresses outside the cluster.
    pub src: Option<Endpoint>,
    pub dst: Option<Endpoint>,
    pub mode: String,
    /// Policies that isolate the workload in this direction (`NAMESPACE/NAME`).
    pub policies: Vec<String>,
    /// The Service whose virtual address the flow went to (`NAMESPACE/NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<String>,
    /// The DNS name the workload resolved an address outside the cluster from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_domain: Option<String>,
}

impl FlowRecord {
    /// One line: `TIME DIRECTION SRC -> DST PORT/PROTOCOL`, pods by name, others by address.
    pub fn summary(&self) -> String {
        let name = |e: &Option<Endpoint>, ip: &str| match e {
            Some(e) => format!("{}/{}", e.namespace, e.pod),
            None => ip.to_string(),
        };
        let dst = match (&self.dst, &self.dst_domain) {
            (None, Some(domain)) => format!("{domain} ({})", self.dst_ip),
            _ => name(&self.dst, &self.dst_ip),
        };
        // ICMP has no port: `icmp`, as `check` writes it, not `0/icmp`.
        let port = if self.protocol.starts_with("icmp") {
            self.protocol.clone()
        } else {
            format!("{}/{}", self.dst_port, self.protocol)
        };
        format!(
            "{} {} {} -> {} {port}",
            self.time,
            self.direction,
            name(&self.src, &self.src_ip),
            dst,
        )
    }
}

/// The name of an IP protocol number.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        agent_common::PROTO_TCP => "tcp".into(),
        agent_common::PROTO_UDP => "udp".into(),
        agent_common::PROTO_ICMP => "icmp".into(),
        agent_common::PROTO_ICMPV6 => "icmpv6".into(),
        agent_common::PROTO_SCTP => "sctp".into(),
        other => other.to_string(),
    }
}

/// Wall-clock time of a programs' timestamp (CLOCK_MONOTONIC ns, give or take a tick).
pub fn wall_time(monotonic_ns: u64) -> std::time::SystemTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now_mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    std::time::SystemTime::now() - Duration::from_nanos(now_mono.saturating_sub(monotonic_ns))
}

impl Naming {
    /// The flow log record of an event.
    pub fn record(&self, e: &FlowEvent) -> FlowRecord {
        use crate::maps::addr_from_bytes;
        let src = addr_from_bytes(e.family, &e.src);
        let dst = addr_from_bytes(e.family, &e.dst);
        let slot = self.slots.get(&e.slot).cloned().unwrap_or_default();
        let ingress = e.direction == agent_common::DIR_INGRESS;
        // A flow to a NodePort of the node was decided as one to its Service (the peer the
        // event names): it is named as a flow to the Service's address would be.
        let node_port = !self.services.contains_key(&dst)
            && agent_common::is_service_identity(e.peer_identity)
            && self.host.contains(&dst);
        let service_ip = if node_port {
            self.service_addresses.get(&e.peer_identity).copied()
        } else {
            Some(dst)
        };
        let service = service_ip.and_then(|ip| self.services.get(&ip));
        // The workload is one end for sure; the other is named by its address.
        let name = |ip: &std::net::IpAddr| {
            self.addresses
                .get(ip)
                .cloned()
                .or_else(|| {
                    self.services
                        .get(ip)
                        .and_then(|(_, backends)| backends.clone())
                })
                .or_else(|| self.host.contains(ip).then(|| host_endpoint(&self.node)))
        };
        let (src_ep, dst_ep) = if ingress {
            (name(&src), slot.endpoint.clone().or_else(|| name(&dst)))
        } else if node_port {
            (
                slot.endpoint.clone().or_else(|| name(&src)),
                service_ip.and_then(|ip| name(&ip)),
            )
        } else {
            (slot.endpoint.clone().or_else(|| name(&src)), name(&dst))
        };
        let is_echo = matches!(
            e.proto,
            agent_common::PROTO_ICMP | agent_common::PROTO_ICMPV6
        );
        FlowRecord {
            time: humantime::format_rfc3339_millis(wall_time(e.time_ns)).to_string(),
            node: self.node.clone(),
            verdict: match e.verdict {
                agent_common::VERDICT_DROPPED => "dropped",
                agent_common::VERDICT_WOULD_DROP => "would_drop",
                _ => "allowed",
            }
            .into(),
            direction: if ingress { "ingress" } else { "egress" }.into(),
            protocol: protocol_name(e.proto),
            src_ip: src.to_string(),
            src_port: if is_echo { 0 } else { e.src_port },
            dst_ip: dst.to_string(),
            dst_port: if is_echo { 0 } else { e.dst_port },
            src: src_ep,
            dst: dst_ep,
            mode: if e.verdict == agent_common::VERDICT_DROPPED {
                "drop"
            } else {
                "log"
            }
            .into(),
            // Outside the cluster, a workload an EgressAllowlist selects is isolated by the
            // allowlist too, whether or not a NetworkPolicy isolates its egress.
            policies: if ingress {
                slot.ingress_policies
            } else if e.peer_identity == agent_common::IDENTITY_WORLD
                || agent_common::is_world_named(e.peer_identity)
                || service_ip.is_some_and(|ip| self.services_outside.contains(&ip))
            {
                let mut all = slot.egress_allowlists;
                all.extend(slot.egress_policies);
                all
            } else {
                slot.egress_policies
            },
            dst_service: service.map(|(id, _)| id.clone()),
            dst_domain: Some(crate::dns::peer_domain(e.peer_identity)).filter(|d| !d.is_empty()),
        }
    }
}
