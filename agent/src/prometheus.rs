//! Reading the cluster's record from Prometheus (`advise --prometheus`, `graph
//! --prometheus`): the `tollgate_flow_packets_total` series every node's agent exported,
//! over a window. A plain HTTP/1.1 client: one query, one answer.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};

use crate::compile::advise::ObservedFlow;

/// The peer pairs every agent scraped into Prometheus at `url` saw within `window`: pairs
/// whose packets grew in it, or whose series appeared in it.
/// `matchers` (PromQL, without braces; may be empty) narrow every series read to the
/// agents' own.
pub fn observed(url: &str, matchers: &str, window: Duration) -> anyhow::Result<Vec<ObservedFlow>> {
    let query = format!(
        "sum by ({}) ({})",
        crate::flows::SERIES_LABELS.join(", "),
        grew_within(&series("tollgate_flow_packets_total", &[matchers]), window)
    );
    let series = query_vector(url, &query)?;
    let flows = flows_of(&series, unix_now(), window);
    let skipped = series
        .iter()
        .filter(|(labels, value)| !usable(labels, *value))
        .count();
    if skipped > 0 {
        eprintln!(
            "tollgate: left out {skipped} series of {url} with labels or values no agent writes (a direction, a verdict, a protocol, a port 1-65535 for tcp/udp/sctp, a count)"
        );
    }
    Ok(flows)
}

/// Whether a series is one an agent writes: a direction and a verdict of their words, a
/// protocol name or number, a port of 1 to 65535 where the protocol has ports (none, an
/// empty label, where it has none), and a finite count. Anything else would become a rule
/// no one meant.
fn usable(labels: &BTreeMap<String, String>, value: f64) -> bool {
    let get = |k: &str| labels.get(k).map(String::as_str).unwrap_or_default();
    let protocol = get("protocol");
    let named = matches!(protocol, "tcp" | "udp" | "sctp" | "icmp" | "icmpv6");
    let port = get("port").parse::<u16>();
    matches!(get("direction"), "ingress" | "egress")
        && matches!(get("verdict"), "allowed" | "would_drop" | "dropped")
        && (named || protocol.parse::<u8>().is_ok())
        && match protocol {
            "tcp" | "udp" | "sctp" => port.is_ok_and(|p| p > 0),
            _ => matches!(get("port"), "" | "0"),
        }
        && value.is_finite()
        && value >= 0.0
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Observed-flow records from `tollgate_flow_packets_total` series summed by
/// `SERIES_LABELS`: one record per peer pair, its packets by verdict.
fn flows_of(
    series: &[(BTreeMap<String, String>, f64)],
    now: u64,
    window: Duration,
) -> Vec<ObservedFlow> {
    let mut flows: BTreeMap<Vec<String>, ObservedFlow> = BTreeMap::new();
    for (labels, value) in series.iter().filter(|(l, v)| usable(l, *v)) {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        // One record per series of the query's `sum by`, whatever its verdict.
        let key: Vec<String> = crate::flows::SERIES_LABELS
            .iter()
            .filter(|l| **l != "verdict")
            .map(|l| get(l))
            .collect();
        let flow = flows.entry(key).or_insert_with(|| ObservedFlow {
            direction: get("direction"),
            src_namespace: get("src_namespace"),
            src_workload: get("src_workload"),
            dst_namespace: get("dst_namespace"),
            dst_workload: get("dst_workload"),
            protocol: get("protocol"),
            port: get("port").parse().unwrap_or(0),
            // Prometheus knows the window, not the first packet.
            first_seen: now.saturating_sub(window.as_secs()),
            last_seen: now,
            packets: [0; 3],
            dst_domain: get("dst_domain"),
            // Series carry no addresses (one per address would be unbounded).
            world_addresses: Vec::new(),
            last_would_drop: 0,
        });
        let verdict = match get("verdict").as_str() {
            "would_drop" => 1,
            "dropped" => 2,
            _ => 0,
        };
        flow.packets[verdict] = flow.packets[verdict].saturating_add(value.round() as u64);
    }
    flows
        .into_values()
        .filter(|f| f.packets != [0; 3])
        .collect()
}

/// A series selector: `name{matchers...}`, the empty ones left out.
fn series(name: &str, matchers: &[&str]) -> String {
    let matchers: Vec<&str> = matchers.iter().copied().filter(|m| !m.is_empty()).collect();
    if matchers.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", matchers.join(","))
    }
}

/// The counters of `selector` that grew within `window`: their increase, or all of a series
/// that appeared in it (Prometheus saw no sample before it, so `increase` alone misses it).
fn grew_within(selector: &str, window: Duration) -> String {
    let w = format!("{}s", window.as_secs().max(1));
    format!(
        "(increase({selector}[{w}]) > 0) or (last_over_time({selector}[{w}]) unless last_over_time({selector}[{w}] offset {w}))"
    )
}

/// Why the workloads a target matches are not safe to flip, across the cluster.
#[derive(Debug, Default, PartialEq)]
pub struct NotQuiet {
    /// What each workload lacks.
    pub reasons: Vec<String>,
    /// The target's peer pairs with would-drops within the window, at their enforcement
    /// point (packets[1] the would-drops).
    pub flows: Vec<ObservedFlow>,
}

/// Whether the workloads `target` matches, on every node whose agent Prometheus scrapes,
/// are safe to flip to drop: observed for at least `window` and no would-drop within it.
/// `Ok` names the workloads checked.
pub fn quiet(
    url: &str,
    matchers: &str,
    target: &crate::admin::Target,
    window: Duration,
) -> anyhow::Result<Result<Vec<String>, NotQuiet>> {
    let now = unix_now();
    let observed = query_vector(
        url,
        &series(
            "tollgate_workload_observed_since_timestamp_seconds",
            &[matchers],
        ),
    )?;
    let last = query_vector(
        url,
        &series(
            "tollgate_workload_last_would_drop_timestamp_seconds",
            &[matchers],
        ),
    )?;
    let drops = query_vector(
        url,
        &format!(
            "sum by ({}) ({})",
            crate::flows::SERIES_LABELS.join(", "),
            grew_within(
                &series(
                    "tollgate_flow_packets_total",
                    &["verdict=\"would_drop\"", matchers]
                ),
                window
            )
        ),
    )?;
    Ok(quiet_decision(
        now,
        window.as_secs(),
        target,
        &observed,
        &last,
        &flows_of(&drops, now, window),
    ))
}

/// The decision of `quiet`, from the series it read: the workloads' gauges (pods attached
/// now) and the would-drop peer pairs of the window (by workload, so pods gone since and
/// nodes the workload left count too).
fn quiet_decision(
    now: u64,
    window: u64,
    target: &crate::admin::Target,
    observed: &[(BTreeMap<String, String>, f64)],
    last_would_drop: &[(BTreeMap<String, String>, f64)],
    would_drops: &[ObservedFlow],
) -> Result<Vec<String>, NotQuiet> {
    use crate::admin::Target;
    let get = |l: &BTreeMap<String, String>, k: &str| l.get(k).cloned().unwrap_or_default();
    let matches = |ns: &str, pod: &str, workload: &str| match target {
        Target::All => true,
        Target::Namespace(n) => n == ns,
        Target::Named(n, name) => n == ns && (name == pod || name == workload),
    };
    // (namespace, workload) -> earliest observation; pod -> its workload.
    let mut workloads: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut pods: BTreeMap<(String, String), String> = BTreeMap::new();
    for (l, t) in observed {
        let (ns, pod, workload) = (get(l, "namespace"), get(l, "pod"), get(l, "workload"));
        if matches(&ns, &pod, &workload) {
            let since = workloads
                .entry((ns.clone(), workload.clone()))
                .or_insert(u64::MAX);
            *since = (*since).min(*t as u64);
            pods.insert((ns, pod), workload);
        }
    }
    let local = |f: &ObservedFlow| {
        let ((ns, workload), _) = f.local_and_peer();
        (ns.to_string(), workload.to_string())
    };
    let flows: Vec<ObservedFlow> = would_drops
        .iter()
        .filter(|f| f.packets[1] > 0)
        .filter(|f| {
            let key = local(f);
            workloads.contains_key(&key) || matches(&key.0, &key.1, &key.1)
        })
        .cloned()
        .collect();
    if workloads.is_empty() && flows.is_empty() {
        return Err(NotQuiet {
            reasons: vec![format!(
                "no agent reports a workload that {target} matches: nothing has been observed"
            )],
            flows,
        });
    }
    let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (l, t) in last_would_drop {
        if let Some(workload) = pods.get(&(get(l, "namespace"), get(l, "pod"))) {
            let e = last
                .entry((get(l, "namespace"), workload.clone()))
                .or_insert(0);
            *e = (*e).max(*t as u64);
        }
    }
    let mut dropped: BTreeMap<(String, String), u64> = BTreeMap::new();
    for f in &flows {
        let n = dropped.entry(local(f)).or_insert(0);
        *n = n.saturating_add(f.packets[1]);
    }
    let human = |s: u64| humantime::format_duration(Duration::from_secs(s)).to_string();
    let mut reasons = Vec::new();
    let all: std::collections::BTreeSet<&(String, String)> =
        workloads.keys().chain(dropped.keys()).collect();
    for key in all {
        let (ns, workload) = key;
        match workloads.get(key) {
            Some(since) if now.saturating_sub(*since) < window => reasons.push(format!(
                "{ns}/{workload}: observed for {} only, less than {}",
                human(now.saturating_sub(*since)),
                human(window)
            )),
            Some(_) => {}
            None => reasons.push(format!(
                "{ns}/{workload}: no agent reports it attached now; its would-drops within {} are in the flow series",
                human(window)
            )),
        }
        let recent_gauge = last
            .get(key)
            .filter(|t| now.saturating_sub(**t) < window)
            .map(|t| now.saturating_sub(*t));
        match (recent_gauge, dropped.get(key)) {
            (Some(ago), packets) => reasons.push(format!(
                "{ns}/{workload}: a would-drop within {}, the last {} ago{}",
                human(window),
                human(ago),
                packets.map_or(String::new(), |p| format!(" ({p} packets)"))
            )),
            (None, Some(packets)) => reasons.push(format!(
                "{ns}/{workload}: {packets} would-drop packets within {}",
                human(window)
            )),
            (None, None) => {}
        }
    }
    if reasons.is_empty() {
        return Ok(workloads
            .keys()
            .map(|(ns, w)| format!("{ns}/{w}"))
            .collect());
    }
    Err(NotQuiet { reasons, flows })
}

/// Runs an instant query; the series of its vector answer with their values.
pub fn query_vector(
    url: &str,
    promql: &str,
) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        anyhow!("{url}: give Prometheus as http://HOST:PORT (https is not supported)")
    })?;
    let (authority, prefix) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    let prefix = prefix.trim_end_matches('/');
    let address = authority
        .to_socket_addrs()
        .with_context(|| format!("resolve {authority}"))?
        .next()
        .ok_or_else(|| anyhow!("{authority}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))
        .with_context(|| format!("connect to Prometheus at {url}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let encoded: String = promql
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    write!(
        stream,
        "GET {prefix}/api/v1/query?query={encoded} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context("read Prometheus's answer")?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("Prometheus answered no HTTP message"))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let body = &raw[end + 4..];
    let status_line = head.lines().next().unwrap_or_default();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    let answer: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("Prometheus answered {status_line} with no JSON"))?;
    if answer["status"] != "success" {
        bail!(
            "Prometheus refused the query ({status_line}): {}",
            answer["error"].as_str().unwrap_or("no reason given")
        );
    }
    let results = answer["data"]["result"]
        .as_array()
        .ok_or_else(|| anyhow!("Prometheus answered no vector"))?;
    let mut out = Vec::new();
    for r in results {
        let labels = r["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let value = r["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("a series without a value: {r}"))?;
        out.push((labels, value));
    }
    Ok(out)
}

/// The body of a chunked HTTP/1.1 message.
fn dechunk(body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("a chunk without its size"))?;
        let size = std::str::from_utf8(&rest[..line])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| anyhow!("a chunk size that is not one"))?;
        let after = &rest[line + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| anyhow!("a chunk shorter than it says"))?;
        out.extend_from_slice(chunk);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .ok_or_else(|| anyhow!("a chunk without its end"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_put_back_together_and_bad_ones_refused() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n").unwrap(),
            b"hello, world"
        );
        assert!(dechunk(b"9\r\nshort\r\n0\r\n\r\n").is_err());
        assert!(dechunk(b"zz\r\nx\r\n").is_err());
    }

    #[test]
    fn the_cluster_check_refuses_new_or_noisy_workloads_and_accepts_quiet_ones() {
        use crate::admin::Target;
        let series = |labels: &[(&str, &str)], v: f64| {
            (
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
                v,
            )
        };
        let day = 86_400.0;
        let now = 100.0 * day;
        // bank/ledger on two nodes: the earliest observation counts; pot is new.
        let observed = [
            series(
                &[
                    ("namespace", "bank"),
                    ("pod", "ledger-a"),
                    ("workload", "ledger"),
                ],
                now - 10.0 * day,
            ),
            series(
                &[
                    ("namespace", "bank"),
                    ("pod", "ledger-b"),
                    ("workload", "ledger"),
                ],
                now - day,
            ),
            series(
                &[("namespace", "bank"), ("pod", "pot-0"), ("workload", "pot")],
                now - 3600.0,
            ),
        ];
        let last = [series(
            &[("namespace", "bank"), ("pod", "ledger-b")],
            now - 2.0 * day,
        )];
        let pair = |dst: &str, packets: f64| {
            series(
                &[
                    ("direction", "ingress"),
                    ("src_namespace", "bank"),
                    ("src_workload", "pot"),
                    ("dst_namespace", "bank"),
                    ("dst_workload", dst),
                    ("protocol", "tcp"),
                    ("port", "8080"),
                    ("verdict", "would_drop"),
                ],
                packets,
            )
        };
        let week_window = Duration::from_secs(7 * 86_400);
        let flows = flows_of(&[pair("ledger", 12.0)], now as u64, week_window);
        let ledger = Target::parse("bank/ledger").unwrap();
        let (week, one_day) = (7 * 86_400, 86_400);
        // A would-drop 2 days ago: not quiet for a week; the would-drop pairs are named.
        let refused = quiet_decision(now as u64, week, &ledger, &observed, &last, &flows)
            .expect_err("a would-drop within the week");
        assert_eq!(
            refused.reasons,
            ["bank/ledger: a would-drop within 7days, the last 2days ago (12 packets)"]
        );
        assert_eq!(
            refused
                .flows
                .iter()
                .map(ObservedFlow::would_drop_line)
                .collect::<Vec<_>>(),
            [
                "would-drop: ingress bank/pot -> bank/ledger 8080/tcp (12 packets), denied at the ingress of bank/ledger"
            ]
        );
        // Quiet for a day (the would-drop series of the day are empty), and observed for
        // 10 (the earliest of its pods, any node).
        assert_eq!(
            quiet_decision(now as u64, one_day, &ledger, &observed, &last, &[]),
            Ok(vec!["bank/ledger".to_string()])
        );
        // Would-drops in the window refuse even when no pod attached now reports them (the
        // pod that had them was replaced, or its node left the cluster): the flow series
        // are by workload.
        let refused = quiet_decision(now as u64, one_day, &ledger, &observed, &[], &flows)
            .expect_err("would-drop series within the day");
        assert_eq!(
            refused.reasons,
            ["bank/ledger: 12 would-drop packets within 1day"]
        );
        // A pod's name as the target stands for its workload's series.
        assert!(
            quiet_decision(
                now as u64,
                one_day,
                &Target::parse("bank/ledger-b").unwrap(),
                &observed,
                &[],
                &flows
            )
            .is_err()
        );
        // Series of another workload do not count against the ledger.
        let other = flows_of(&[pair("vault", 3.0)], now as u64, week_window);
        assert!(quiet_decision(now as u64, one_day, &ledger, &observed, &[], &other).is_ok());
        // A workload no agent reports now, with would-drops in the window: refused.
        let refused = quiet_decision(
            now as u64,
            one_day,
            &Target::parse("bank/vault").unwrap(),
            &observed,
            &[],
            &other,
        )
        .expect_err("vault had would-drops");
        assert_eq!(refused.reasons.len(), 2, "{refused:?}");
        assert!(refused.reasons[0].starts_with("bank/vault: no agent reports it attached now"));
        // The whole namespace: pot has been observed for an hour only.
        let refused = quiet_decision(
            now as u64,
            one_day,
            &Target::parse("bank/*").unwrap(),
            &observed,
            &last,
            &[],
        )
        .expect_err("pot is new");
        assert_eq!(
            refused.reasons,
            ["bank/pot: observed for 1h only, less than 1day"]
        );
        // Nothing reported for the target: refused, never assumed quiet.
        assert!(
            quiet_decision(
                now as u64,
                one_day,
                &Target::parse("shop/web").unwrap(),
                &observed,
                &last,
                &flows
            )
            .is_err()
        );
    }

    /// Series with labels or values no agent writes are left out, never turned into rules
    /// (a port 0, a verdict counted as allowed, a portless "TCP") or an overflow.
    #[test]
    fn series_no_agent_writes_are_left_out() {
        let series = |changes: &[(&str, &str)], v: f64| {
            let mut labels: BTreeMap<String, String> = [
                ("direction", "egress"),
                ("verdict", "allowed"),
                ("src_namespace", "shop"),
                ("src_workload", "web"),
                ("dst_namespace", "shop"),
                ("dst_workload", "db"),
                ("protocol", "tcp"),
                ("port", "5432"),
                ("dst_domain", ""),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            for (k, v) in changes {
                labels.insert(k.to_string(), v.to_string());
            }
            (labels, v)
        };
        let bad = [
            series(&[("port", "")], 1.0),
            series(&[("port", "70000")], 1.0),
            series(&[("port", "0")], 1.0),
            series(&[("verdict", "bogus")], 1.0),
            series(&[("direction", "Ingress")], 1.0),
            series(&[("protocol", "TCP")], 1.0),
            series(&[("protocol", "icmp")], 1.0),
            series(&[], f64::INFINITY),
            series(&[], -3.0),
        ];
        for (labels, value) in &bad {
            assert!(!usable(labels, *value), "{labels:?} {value}");
        }
        assert!(flows_of(&bad, 100, Duration::from_secs(10)).is_empty());
        let good = [
            series(&[], 4.0),
            series(&[("verdict", "would_drop")], 2.0),
            series(&[("protocol", "icmp"), ("port", "")], 1.0),
            series(&[("protocol", "47"), ("port", "0")], 1.0),
            series(&[], 1e30),
            series(&[], 1e30),
        ];
        let flows = flows_of(&good, 100, Duration::from_secs(10));
        assert_eq!(flows.len(), 3, "{flows:?}");
        assert_eq!(
            flows.iter().find(|f| f.protocol == "tcp").unwrap().packets[0],
            u64::MAX
        );
    }

    #[test]
    fn only_plain_http_urls_are_taken() {
        let err = query_vector("https://prom:9090", "up")
            .unwrap_err()
            .to_string();
        assert!(err.contains("https is not supported"), "{err}");
    }
}
