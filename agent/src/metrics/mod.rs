//! Prometheus metrics (OpenMetrics text) read from the datapath at scrape time. Read-only on
//! the kernel: counters come straight from the per-CPU maps, so they are exact and, being
//! pinned, continue across agent restarts.

pub mod format;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// Labels as (name, value) pairs.
pub type Labels = Vec<(String, String)>;

/// A snapshot of everything a scrape reports, taken under the agent's lock.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// (labels namespace/pod/direction/verdict, packets, bytes).
    pub packets: Vec<(Labels, u64, u64)>,
    pub flow_packets: Vec<(Labels, u64)>,
    pub flow_overflow: u64,
    /// Peer pairs in the observed-flow record, its capacity, and the packets of pairs it did
    /// not take (their peer held `RECORD_PORTS_PER_PEER` ports already).
    pub record_pairs: u64,
    pub record_capacity: u64,
    pub record_refused: u64,
    /// (namespace, pod, mode).
    pub modes: Vec<(String, String, &'static str)>,
    /// (namespace, pod, direction, isolated).
    pub isolated: Vec<(String, String, &'static str, bool)>,
    /// (namespace, pod, unix seconds).
    pub last_would_drop: Vec<(String, String, u64)>,
    /// (namespace, pod, workload, unix seconds its workload was first observed here).
    pub observed_since: Vec<(String, String, String, u64)>,
    pub flow_log_written: u64,
    pub flow_log_rate_limited: u64,
    pub flow_log_lost: u64,
    pub policy_errors: u64,
    /// (map, entries, capacity).
    pub maps: Vec<(&'static str, u64, u64)>,
    /// (reason, packets).
    pub diagnostics: Vec<(&'static str, u64)>,
    pub workloads: u64,
    /// (namespace, pod, rules not fully written).
    pub degraded: Vec<(String, String, bool)>,
    /// (namespace, pod, packets sent from addresses not its own).
    pub spoofed: Vec<(String, String, u64)>,
    /// (namespace, pod, workload, new connections to learned addresses past their TTL).
    pub egress_expired: Vec<(String, String, String, u64)>,
    /// (namespace, pod, addresses learned from DNS kept, addresses that did not fit).
    pub egress_learned: Vec<(String, String, u64, u64)>,
    /// DNS messages by outcome, and held answers handed back by outcome.
    pub dns_messages: Vec<(&'static str, u64)>,
    pub dns_handed_back: Vec<(&'static str, u64)>,
    /// (namespace, pod, live tracked flows at the last census).
    pub conntrack_entries: Vec<(String, String, u64)>,
    /// The cluster state cannot be refreshed.
    pub source_degraded: bool,
    /// Programs attached, policy synced, nothing degraded, every task running.
    pub ready: bool,
    /// Node-local overrides: (target, mode).
    pub node_overrides: Vec<(String, &'static str)>,
    /// Kubernetes Event writes by outcome (empty without `--kubernetes`).
    pub kube_events: Vec<(&'static str, u64)>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let probe = ConstCounter::new(0u64);
    let mut family = encoder.encode_descriptor(name, help, None, probe.metric_type())?;
    for (l, v) in series {
        ConstCounter::new(v).encode(family.encode_family(&l)?)?;
    }
    Ok(())
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let probe = ConstGauge::new(0i64);
    let mut family = encoder.encode_descriptor(name, help, None, probe.metric_type())?;
    for (l, v) in series {
        ConstGauge::new(v).encode(family.encode_family(&l)?)?;
    }
    Ok(())
}

impl Snapshot {
    /// Encodes every family. Counter names get `_total` from the encoder.
    pub fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        counter_family(
            e,
            "tollgate_packets",
            "Packets seen by workload, direction and verdict (GSO aggregates count as their segments)",
            self.packets.iter().map(|(l, p, _)| (l.clone(), *p)),
        )?;
        counter_family(
            e,
            "tollgate_bytes",
            "L3 bytes seen by workload, direction and verdict",
            self.packets.iter().map(|(l, _, b)| (l.clone(), *b)),
        )?;
        counter_family(
            e,
            "tollgate_flow_packets",
            "Packets per peer pair at workload level (world for addresses outside the cluster), bounded by --max-flow-series",
            self.flow_packets.iter().cloned(),
        )?;
        counter_family(
            e,
            "tollgate_flow_series_overflow",
            "Packets not attributed to a tollgate_flow_packets_total series because --max-flow-series was reached",
            [(vec![], self.flow_overflow)],
        )?;
        gauge_family(
            e,
            "tollgate_observed_pairs",
            "Peer pairs in the observed-flow record (tollgate advise, graph), and its capacity (--record-capacity)",
            [
                (labels(&[("kind", "held")]), self.record_pairs as i64),
                (labels(&[("kind", "capacity")]), self.record_capacity as i64),
            ],
        )?;
        counter_family(
            e,
            "tollgate_observed_record_overflow",
            "Packets of peer pairs the observed-flow record did not take: their peer already held 64 ports of the protocol (a port scan)",
            [(vec![], self.record_refused)],
        )?;
        gauge_family(
            e,
            "tollgate_workload_mode",
            "1 for the current mode of a workload (log or drop), 0 for the other",
            self.modes.iter().flat_map(|(ns, pod, mode)| {
                ["log", "drop"].map(|m| {
                    (
                        labels(&[("namespace", ns), ("pod", pod), ("mode", m)]),
                        (m == *mode) as i64,
                    )
                })
            }),
        )?;
        gauge_family(
            e,
            "tollgate_workload_isolated",
            "1 when at least one policy selects the workload for that direction",
            self.isolated.iter().map(|(ns, pod, dir, iso)| {
                (
                    labels(&[("namespace", ns), ("pod", pod), ("direction", dir)]),
                    *iso as i64,
                )
            }),
        )?;
        gauge_family(
            e,
            "tollgate_workload_last_would_drop_timestamp_seconds",
            "Unix time of the last would-drop of a workload, any of its pods (absent if none was seen)",
            self.last_would_drop
                .iter()
                .map(|(ns, pod, t)| (labels(&[("namespace", ns), ("pod", pod)]), *t as i64)),
        )?;
        gauge_family(
            e,
            "tollgate_workload_observed_since_timestamp_seconds",
            "Unix time this node first observed the workload (any of its pods): how long its quiet has had to prove itself",
            self.observed_since.iter().map(|(ns, pod, workload, t)| {
                (
                    labels(&[("namespace", ns), ("pod", pod), ("workload", workload)]),
                    *t as i64,
                )
            }),
        )?;
        counter_family(
            e,
            "tollgate_flow_log_events",
            "Flow events by outcome: written to the flow log, rate_limited in the kernel, lost (ring buffer full or write failed)",
            [
                (labels(&[("outcome", "written")]), self.flow_log_written),
                (
                    labels(&[("outcome", "rate_limited")]),
                    self.flow_log_rate_limited,
                ),
                (labels(&[("outcome", "lost")]), self.flow_log_lost),
            ],
        )?;
        counter_family(
            e,
            "tollgate_policy_errors",
            "Kubernetes objects rejected (invalid YAML, wrong types, invalid CIDR or port, unknown operator...)",
            [(vec![], self.policy_errors)],
        )?;
        gauge_family(
            e,
            "tollgate_map_entries",
            "Entries in each BPF map",
            self.maps
                .iter()
                .map(|(m, n, _)| (labels(&[("map", m)]), *n as i64)),
        )?;
        gauge_family(
            e,
            "tollgate_map_capacity",
            "Capacity of each BPF map",
            self.maps
                .iter()
                .map(|(m, _, c)| (labels(&[("map", m)]), *c as i64)),
        )?;
        counter_family(
            e,
            "tollgate_datapath_diagnostics",
            "Datapath events by reason: unparsable packets, fragments, link plumbing, conntrack and event ring outcomes",
            self.diagnostics
                .iter()
                .map(|(r, v)| (labels(&[("reason", r)]), *v)),
        )?;
        gauge_family(
            e,
            "tollgate_workload_degraded",
            "1 while a workload's rules could not be fully written (it keeps its last complete rules, or denies if new)",
            self.degraded
                .iter()
                .map(|(ns, pod, d)| (labels(&[("namespace", ns), ("pod", pod)]), *d as i64)),
        )?;
        counter_family(
            e,
            "tollgate_spoofed_packets",
            "Packets a workload sent from an address that is not its own (never tracked or counted as the address they claim)",
            self.spoofed
                .iter()
                .map(|(ns, pod, v)| (labels(&[("namespace", ns), ("pod", pod)]), *v)),
        )?;
        counter_family(
            e,
            "tollgate_egress_expired",
            "New connections of a workload an EgressAllowlist selects to an address whose DNS answer had expired (TTL, floor and grace): would_drop or dropped by mode; applications that keep using an address past its TTL",
            self.egress_expired.iter().map(|(ns, pod, wl, v)| {
                (
                    labels(&[("namespace", ns), ("pod", pod), ("workload", wl)]),
                    *v,
                )
            }),
        )?;
        gauge_family(
            e,
            "tollgate_egress_learned_addresses",
            "Addresses a workload learned from its DNS answers and the agent keeps (--dns-max-per-workload)",
            self.egress_learned
                .iter()
                .map(|(ns, pod, v, _)| (labels(&[("namespace", ns), ("pod", pod)]), *v as i64)),
        )?;
        counter_family(
            e,
            "tollgate_egress_learned_overflow",
            "Addresses from a workload's DNS answers not kept because it held --dns-max-per-workload already (not allowed)",
            self.egress_learned
                .iter()
                .map(|(ns, pod, _, v)| (labels(&[("namespace", ns), ("pod", pod)]), *v)),
        )?;
        counter_family(
            e,
            "tollgate_dns_messages",
            "DNS messages between workloads and their resolvers: query, answer (learned from), unsolicited (no matching query: ignored), malformed (ignored), query_not_followed (over the workload's 1,024 or the node's 16,384 waiting queries: its answer teaches nothing), tcp_stream_lost (a DNS-over-TCP stream read no further after a gap)",
            self.dns_messages
                .iter()
                .map(|(o, v)| (labels(&[("outcome", o)]), *v)),
        )?;
        counter_family(
            e,
            "tollgate_dns_answers_handed_back",
            "Held DNS answers handed back to their workload after learning (ok), or lost (failed)",
            self.dns_handed_back
                .iter()
                .map(|(o, v)| (labels(&[("outcome", o)]), *v)),
        )?;
        gauge_family(
            e,
            "tollgate_conntrack_entries",
            "Live tracked flows of a workload (main and overflow tables) at the last census; a workload beyond --conntrack-share of the table tracks its new flows in the overflow table",
            self.conntrack_entries
                .iter()
                .map(|(ns, pod, v)| (labels(&[("namespace", ns), ("pod", pod)]), *v as i64)),
        )?;
        gauge_family(
            e,
            "tollgate_source_degraded",
            "1 while the cluster state cannot be refreshed (the last known state stays in force)",
            [(vec![], self.source_degraded as i64)],
        )?;
        gauge_family(
            e,
            "tollgate_ready",
            "1 while programs are attached, the policy synced, nothing is degraded and every task of the agent runs (what /readyz says)",
            [(vec![], self.ready as i64)],
        )?;
        gauge_family(
            e,
            "tollgate_node_override",
            "1 per node-local mode override (break glass, set through the admin socket)",
            self.node_overrides
                .iter()
                .map(|(t, m)| (labels(&[("target", t), ("mode", m)]), 1)),
        )?;
        if !self.kube_events.is_empty() {
            counter_family(
                e,
                "tollgate_kube_events",
                "Kubernetes Events written by outcome: created, updated (count raised), rate_limited, failed",
                self.kube_events
                    .iter()
                    .map(|(o, v)| (labels(&[("outcome", o)]), *v)),
            )?;
        }
        gauge_family(
            e,
            "tollgate_workloads",
            "Workloads attached on this node",
            [(vec![], self.workloads as i64)],
        )?;
        gauge_family(
            e,
            "tollgate_build_info",
            "Build of the running agent",
            [(
                labels(&[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("layout", &format!("{:x}", agent_common::LAYOUT_VERSION)),
                ]),
                1,
            )],
        )?;
        Ok(())
    }
}

/// `tollgate_policy_sync_seconds`: a histogram whose counts continue across restarts, kept
/// in a file of the state directory after every observation (a few hundred bytes).
#[derive(Clone, Debug)]
pub struct SyncHistogram {
    counts: std::sync::Arc<std::sync::Mutex<HistogramCounts>>,
    file: Option<std::path::PathBuf>,
}

/// Sum, count and per-bucket counts (not cumulative) of `SyncHistogram::BOUNDS`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct HistogramCounts {
    sum: f64,
    count: u64,
    buckets: Vec<u64>,
}

impl SyncHistogram {
    /// Upper bounds: 0.5 ms doubling to 16 s, then +Inf.
    fn bounds() -> Vec<f64> {
        prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16)
            .chain(std::iter::once(f64::INFINITY))
            .collect()
    }

    /// Continues the counts kept in `file` (from zero when there are none, or they do not
    /// fit these buckets).
    pub fn continued_from(file: Option<std::path::PathBuf>) -> SyncHistogram {
        let buckets = Self::bounds().len();
        let counts = file
            .as_ref()
            .map(|f| crate::admin::read_kept::<HistogramCounts>(f, "sync-time counts"))
            .filter(|c| c.buckets.len() == buckets)
            .unwrap_or_else(|| HistogramCounts {
                buckets: vec![0; buckets],
                ..HistogramCounts::default()
            });
        SyncHistogram {
            counts: std::sync::Arc::new(std::sync::Mutex::new(counts)),
            file,
        }
    }

    /// Counts one sync of `seconds`, and keeps the counts.
    pub fn observe(&self, seconds: f64) {
        let data = {
            let mut c = self.counts.lock().expect("histogram");
            c.sum += seconds;
            c.count += 1;
            let bucket = Self::bounds()
                .iter()
                .position(|bound| seconds <= *bound)
                .unwrap_or(c.buckets.len() - 1);
            c.buckets[bucket] += 1;
            serde_json::to_vec(&*c).expect("serializable")
        };
        if let Some(file) = &self.file
            && let Err(e) = crate::admin::write_atomic(file, &data)
        {
            tracing::warn!(error = %e, "could not keep the sync-time histogram");
        }
    }
}

impl EncodeMetric for SyncHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        let c = self.counts.lock().expect("histogram").clone();
        let buckets: Vec<(f64, u64)> = Self::bounds().into_iter().zip(c.buckets).collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            c.sum, c.count, &buckets, None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}
