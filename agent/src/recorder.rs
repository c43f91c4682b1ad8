//! Kubernetes Events (with `--kubernetes`): Warning `PacketDrop` (drop mode) and
//! `PacketWouldDrop` (log mode) on the pod whose policy denied a flow, and Normal
//! `ModeChanged` when a workload's mode changes. kube-iptables-tailer's job, from the flow
//! log's sampled records instead of kernel log lines.
//!
//! One Event per (pod, reason, peer, port, protocol) and `--event-dedup-window`: repeats in
//! the window raise its `count` (patched at most every `FLUSH_INTERVAL`), later ones start a
//! new Event. API writes are rate-limited per node (`RATE_PER_SECOND`, `BURST`); what the
//! limit suppresses is counted. Notices reach the recorder through a bounded queue that is
//! never waited on: the flow log and the datapath never slow down for the API server.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::Event;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{controller::ModeNotice, flowlog::FlowRecord};

/// API writes per second, per node.
pub const RATE_PER_SECOND: f64 = 5.0;
/// API writes allowed at once.
pub const BURST: f64 = 20.0;
/// New Events per second one pod may have written: a pod whose denied flows are many and
/// varied (a port sweep) takes at most this share of the node's budget, so the other pods'
/// drops still get their Events.
const POD_RATE_PER_SECOND: f64 = 1.0;
/// New Events one pod may have written at once.
const POD_BURST: f64 = 5.0;
/// How often pending repeats are written to their Event's count.
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Notices waiting for the recorder; beyond this they are counted as rate-limited.
const QUEUE: usize = 1024;
/// The component Events are reported by.
pub const COMPONENT: &str = "tollgate";

/// Outcomes of Event writes (`tollgate_kube_events_total{outcome}`).
#[derive(Debug, Default)]
pub struct EventStats {
    pub created: AtomicU64,
    pub updated: AtomicU64,
    pub rate_limited: AtomicU64,
    pub failed: AtomicU64,
}

impl EventStats {
    /// Adds the counts an earlier process reached (`outcomes` order), so they go on.
    pub fn continue_from(&self, counts: &[u64]) {
        let fields = [
            &self.created,
            &self.updated,
            &self.rate_limited,
            &self.failed,
        ];
        for (field, n) in fields.into_iter().zip(counts) {
            field.fetch_add(*n, Ordering::Relaxed);
        }
    }

    /// (outcome, count) pairs.
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("created", self.created.load(Ordering::Relaxed)),
            ("updated", self.updated.load(Ordering::Relaxed)),
            ("rate_limited", self.rate_limited.load(Ordering::Relaxed)),
            ("failed", self.failed.load(Ordering::Relaxed)),
        ]
    }
}

/// Something worth an Event on a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Notice {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// `Warning` or `Normal`.
    pub kind: &'static str,
    pub reason: &'static str,
    pub message: String,
    /// What tells repeats apart besides the pod and reason: for a denied flow its direction,
    /// peer, port and protocol (the message also names the policies, the Service and the
    /// mode, which may change between repeats of the same flow).
    pub repeat_key: String,
}

impl Notice {
    /// The Event a repeat of this notice counts in.
    fn dedup_key(&self) -> (String, String, String, &'static str, String) {
        (
            self.namespace.clone(),
            self.pod.clone(),
            self.uid.clone(),
            self.reason,
            self.repeat_key.clone(),
        )
    }
}

impl Notice {
    /// The Event of a denied flow on the pod whose policy denied it (the local workload of
    /// the record: the destination for ingress, the source for egress).
    pub fn denied(record: &FlowRecord, uid: &str) -> Option<Notice> {
        let ingress = record.direction == "ingress";
        let (local, peer, peer_ip) = if ingress {
            (record.dst.as_ref()?, record.src.as_ref(), &record.src_ip)
        } else {
            (record.src.as_ref()?, record.dst.as_ref(), &record.dst_ip)
        };
        let (reason, verb) = match record.verdict.as_str() {
            "dropped" => ("PacketDrop", "Dropped"),
            "would_drop" => ("PacketWouldDrop", "Would drop"),
            _ => return None,
        };
        let peer = match peer {
            Some(p) if p.namespace == "host" => "the node (host)".to_string(),
            Some(p) => format!("workload {}/{}", p.namespace, p.workload),
            None => format!("address {peer_ip}"),
        };
        let service = record
            .dst_service
            .as_ref()
            .map(|s| format!(" through Service {s}"))
            .unwrap_or_default();
        let port = if record.dst_port == 0 {
            record.protocol.clone()
        } else {
            format!("{}/{}", record.dst_port, record.protocol)
        };
        let policies = if record.policies.is_empty() {
            String::new()
        } else {
            format!(
                "; {} isolated by {}",
                record.direction,
                record.policies.join(", ")
            )
        };
        Some(Notice {
            namespace: local.namespace.clone(),
            pod: local.pod.clone(),
            uid: uid.to_string(),
            kind: "Warning",
            reason,
            repeat_key: format!("{} {peer} {port}", record.direction),
            message: format!(
                "{verb} {} {} {peer}{service} on {port} (mode {}{policies})",
                record.direction,
                if ingress { "from" } else { "to" },
                record.mode,
            ),
        })
    }

    /// The Event of a mode change.
    pub fn mode_changed(n: &ModeNotice) -> Notice {
        Notice {
            repeat_key: format!("{} {} {}", n.old.as_str(), n.new.as_str(), n.by),
            namespace: n.namespace.clone(),
            pod: n.pod.clone(),
            uid: n.uid.clone(),
            kind: "Normal",
            reason: "ModeChanged",
            message: format!(
                "Tollgate mode {} -> {} by {}",
                n.old.as_str(),
                n.new.as_str(),
                n.by
            ),
        }
    }
}

/// Hands notices to the recorder task without ever waiting.
#[derive(Clone, Debug)]
pub struct Recorder {
    tx: mpsc::Sender<Notice>,
    pub stats: Arc<EventStats>,
}

impl Recorder {
    /// Starts the recorder task on a client, counting outcomes into `stats`.
    pub fn start(
        client: Client,
        node: String,
        window: Duration,
        stats: Arc<EventStats>,
    ) -> (Recorder, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(client, node, window, rx, stats.clone()));
        (Recorder { tx, stats }, task)
    }

    /// Queues a notice; a full queue counts it as rate-limited.
    pub fn notice(&self, notice: Notice) {
        if self.tx.try_send(notice).is_err() {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// (namespace, pod, uid, reason, repeat key): what repeats of one Event share.
type DedupKey = (String, String, String, &'static str, String);

struct Recorded {
    namespace: String,
    /// The Event's name once created.
    name: String,
    first: Instant,
    count: u32,
    /// Repeats not written yet.
    pending: bool,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn full(rate: f64, burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            at: Instant::now(),
            rate,
            burst,
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
    }

    fn take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The node's budget of API writes, and each pod's share of it for new Events.
struct Budget {
    node: Bucket,
    pods: HashMap<(String, String), Bucket>,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            node: Bucket::full(RATE_PER_SECOND, BURST),
            pods: HashMap::new(),
        }
    }

    /// A write that is no new Event of a pod (a count, a mode change).
    fn take(&mut self) -> bool {
        self.node.take()
    }

    /// A new Event on `pod`: within the pod's share and the node's budget.
    fn take_for(&mut self, namespace: &str, pod: &str) -> bool {
        let key = (namespace.to_string(), pod.to_string());
        let share = self
            .pods
            .entry(key)
            .or_insert_with(|| Bucket::full(POD_RATE_PER_SECOND, POD_BURST));
        share.refill();
        if share.tokens < 1.0 || !self.node.take() {
            return false;
        }
        share.tokens -= 1.0;
        true
    }

    /// Forgets the shares that are full again (their pods quiet): the map stays as small
    /// as the pods currently writing.
    fn forget_quiet(&mut self) {
        self.pods.retain(|_, b| {
            b.refill();
            b.tokens < b.burst
        });
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

async fn run(
    client: Client,
    node: String,
    window: Duration,
    mut rx: mpsc::Receiver<Notice>,
    stats: Arc<EventStats>,
) {
    let mut recorded: HashMap<DedupKey, Recorded> = HashMap::new();
    let mut bucket = Budget::new();
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    let mut sequence: u64 = 0;
    loop {
        tokio::select! {
            notice = rx.recv() => {
                let Some(notice) = notice else { return };
                let key = notice.dedup_key();
                if let Some(r) = recorded.get_mut(&key) {
                    if r.first.elapsed() < window {
                        r.count += 1;
                        r.pending = true;
                        continue;
                    }
                    // Its window is over: repeats not written yet go to its count first, or
                    // the new Event would take its place with them.
                    if r.pending && bucket.take() {
                        r.pending = false;
                        update_count(&client, &notice.namespace, r, &stats).await;
                    }
                }
                if !bucket.take_for(&notice.namespace, &notice.pod) {
                    stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                sequence += 1;
                match create(&client, &node, &notice, sequence).await {
                    Ok(name) => {
                        stats.created.fetch_add(1, Ordering::Relaxed);
                        recorded.insert(key, Recorded { namespace: notice.namespace.clone(), name, first: Instant::now(), count: 1, pending: false });
                    }
                    Err(e) => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        warn!(namespace = notice.namespace, pod = notice.pod, error = %e, "could not create an Event");
                    }
                }
            }
            _ = flush.tick() => {
                bucket.forget_quiet();
                recorded.retain(|_, r| r.pending || r.first.elapsed() < window);
                for r in recorded.values_mut().filter(|r| r.pending) {
                    if !bucket.take() {
                        break;
                    }
                    r.pending = false;
                    let namespace = r.namespace.clone();
                    update_count(&client, &namespace, r, &stats).await;
                }
            }
        }
    }
}

/// Writes an Event's count of repeats.
async fn update_count(client: &Client, namespace: &str, r: &Recorded, stats: &EventStats) {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"count": r.count, "lastTimestamp": now_rfc3339()});
    match api
        .patch(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) | Err(kube::Error::SerdeError(_)) => {
            stats.updated.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            debug!(event = r.name, error = %e, "could not update an Event");
        }
    }
}

/// The name of an Event: the pod's, then a suffix unique to the agent, within the 253
/// characters of an object name (a pod's own name may take them all).
fn event_name(pod: &str, suffix: &str) -> String {
    let room = 253 - suffix.len() - 1;
    let pod: String = pod.chars().take(room).collect();
    format!("{}.{suffix}", pod.trim_end_matches(['.', '-']))
}

/// Creates the Event of a notice; returns its name.
async fn create(
    client: &Client,
    node: &str,
    notice: &Notice,
    sequence: u64,
) -> Result<String, kube::Error> {
    let now = now_rfc3339();
    // Unique per agent: the pod, the node's hash and a sequence.
    let suffix = format!(
        "tollgate-{:x}-{sequence}",
        fnv(node.as_bytes())
            ^ SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
    );
    let name = event_name(&notice.pod, &suffix);
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": notice.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": notice.namespace,
            "name": notice.pod,
            "uid": notice.uid,
        },
        "type": notice.kind,
        "reason": notice.reason,
        "message": notice.message,
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": "tollgate.io/agent",
        "reportingInstance": node,
        "action": if notice.kind == "Warning" { "Deny" } else { "SetMode" },
    }))
    .expect("a valid Event");
    let api: Api<Event> = Api::namespaced(client.clone(), &notice.namespace);
    match api.create(&PostParams::default(), &event).await {
        // Accepted with a body that is not an Event (some proxies and test servers): it
        // exists all the same, and must not be created again.
        Ok(_) | Err(kube::Error::SerdeError(_)) => Ok(name),
        Err(e) => Err(e),
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowlog::Endpoint;

    fn record(direction: &str, verdict: &str) -> FlowRecord {
        let ep = |ns: &str, pod: &str, wl: &str| Endpoint {
            namespace: ns.into(),
            pod: pod.into(),
            workload: wl.into(),
        };
        FlowRecord {
            time: String::new(),
            node: "node-1".into(),
            verdict: verdict.into(),
            direction: direction.into(),
            protocol: "tcp".into(),
            src_ip: "10.1.0.5".into(),
            src_port: 40000,
            dst_ip: "203.0.113.9".into(),
            dst_port: 443,
            src: Some(ep("bank", "ledger-7d9c-x2x9q", "ledger")),
            dst: None,
            mode: if verdict == "dropped" { "drop" } else { "log" }.into(),
            policies: vec!["bank/ledger-egress".into()],
            dst_service: None,
            dst_domain: None,
        }
    }

    #[test]
    fn a_denied_flow_is_an_event_on_the_pod_whose_policy_denied_it() {
        let n = Notice::denied(&record("egress", "dropped"), "uid-1").unwrap();
        assert_eq!(
            (n.namespace.as_str(), n.pod.as_str()),
            ("bank", "ledger-7d9c-x2x9q")
        );
        assert_eq!(
            (n.kind, n.reason, n.uid.as_str()),
            ("Warning", "PacketDrop", "uid-1")
        );
        assert_eq!(
            n.message,
            "Dropped egress to address 203.0.113.9 on 443/tcp (mode drop; egress isolated by bank/ledger-egress)"
        );
        let n = Notice::denied(&record("egress", "would_drop"), "uid-1").unwrap();
        assert_eq!(n.reason, "PacketWouldDrop");
        assert!(n.message.starts_with("Would drop egress"), "{}", n.message);
        assert_eq!(Notice::denied(&record("egress", "allowed"), "uid-1"), None);
        // Ingress: the destination's Event; a record without it names no pod of ours.
        assert_eq!(Notice::denied(&record("ingress", "dropped"), "uid-1"), None);
    }

    /// Repeats of one flow are one Event even when what the message says besides changes
    /// (the policies isolating the pod, the mode); another port is another Event.
    #[test]
    fn repeats_are_told_apart_by_pod_verdict_peer_port_and_protocol_only() {
        let first = Notice::denied(&record("egress", "would_drop"), "uid-1").unwrap();
        let mut later = record("egress", "would_drop");
        later.policies = vec!["bank/ledger-egress".into(), "bank/deny-all".into()];
        let later = Notice::denied(&later, "uid-1").unwrap();
        assert_ne!(first.message, later.message);
        assert_eq!(first.dedup_key(), later.dedup_key());
        let mut other_port = record("egress", "would_drop");
        other_port.dst_port = 444;
        let other_port = Notice::denied(&other_port, "uid-1").unwrap();
        assert_ne!(first.dedup_key(), other_port.dedup_key());
        let dropped = Notice::denied(&record("egress", "dropped"), "uid-1").unwrap();
        assert_ne!(first.dedup_key(), dropped.dedup_key());
    }

    #[test]
    fn an_event_name_stays_a_valid_name_for_the_longest_pod_name() {
        let pod = format!("{}-{}", "a".repeat(240), "b".repeat(12));
        let name = event_name(&pod, "tollgate-1f2e3d4c5b6a7988-12345");
        assert!(crate::compile::model::valid_name(&name), "{name}");
        assert!(name.ends_with(".tollgate-1f2e3d4c5b6a7988-12345"), "{name}");
        assert_eq!(event_name("web-0", "tollgate-1-1"), "web-0.tollgate-1-1");
    }

    /// One pod sweeping ports gets its share of new Events, not the node's whole budget:
    /// another pod's drop right after still gets its Event.
    #[test]
    fn one_pod_takes_its_share_of_new_events_not_the_nodes_budget() {
        let mut budget = Budget::new();
        let sweeper = (0..100).filter(|_| budget.take_for("x", "scanner")).count();
        assert!(
            sweeper >= POD_BURST as usize && sweeper <= POD_BURST as usize + 1,
            "{sweeper}"
        );
        assert!(budget.take_for("y", "victim"), "another pod's Event");
        // Counts of repeats and mode changes draw on the node's budget only.
        assert!(budget.take());
        budget.forget_quiet();
        assert!(budget.pods.contains_key(&("x".into(), "scanner".into())));
    }

    #[test]
    fn the_node_wide_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = Bucket::full(RATE_PER_SECOND, BURST);
        let allowed = (0..100).filter(|_| bucket.take()).count();
        assert!(
            allowed >= BURST as usize && allowed <= BURST as usize + 1,
            "{allowed}"
        );
        bucket.at -= Duration::from_secs(1);
        let refilled = (0..100).filter(|_| bucket.take()).count();
        assert!(
            refilled >= RATE_PER_SECOND as usize && refilled <= RATE_PER_SECOND as usize + 1,
            "{refilled}"
        );
    }
}
