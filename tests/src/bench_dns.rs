//! The cost of holding DNS answers: a lookup, and a lookup followed at once by a TCP
//! connection and a 1-byte echo, from a pod an EgressAllowlist selects, against the same
//! without Tollgate, in the same run (dnsmasq in a pod namespace, the site outside).

use std::time::Duration;

use serde::Serialize;

use crate::{Lab, Pod, agent::Agent, support::temp_dir, traffic, wait_for};

/// One figure: medians over runs of each run's percentile, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct DnsFigure {
    pub case: String,
    pub without_p50_us: f64,
    pub without_p99_us: f64,
    pub with_p50_us: f64,
    pub with_p99_us: f64,
    /// Lookups per run.
    pub lookups: u32,
}

const LOOKUPS: u32 = 300;

fn pod_yaml(pod: &Pod, ns: &str, name: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {}, labels: {labels}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: {}}}]}}\n",
        pod.uid, pod.ipv4
    )
}

fn measure(client: &Pod, dns: &Pod) -> serde_json::Value {
    let out = client
        .command(traffic::helper())
        .args(["resolve", "--server", &dns.ipv4.to_string()])
        .args(["--name", "api.example.com", "--port", "443"])
        .args(["--times", &LOOKUPS.to_string()])
        .output()
        .expect("run tg-traffic resolve");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("resolve output");
    assert_eq!(v["connected"], LOOKUPS, "{v}");
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(runs: usize) -> Vec<DnsFigure> {
    let mut lab = Lab::new();
    let client = lab.add_pod("client");
    let dns = lab.add_pod("dns");
    let site = lab.add_outside("site");
    lab.serve(&site, &[443], &[]);
    lab.spawn_dnsmasq(
        &dns,
        &[format!("--host-record=api.example.com,{},60", site.ipv4)],
    );
    let dir = temp_dir("bench-dns");
    let state = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: pay}}\n{}{}---\napiVersion: tollgate.io/v1alpha1\nkind: EgressAllowlist\nmetadata: {{name: out, namespace: pay}}\nspec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  egress: [{{domains: [api.example.com], ports: [{{port: 443}}]}}]\n",
        pod_yaml(&client, "pay", "client", "{app: client}"),
        pod_yaml(&dns, "pay", "dns", "{app: dns}"),
    );
    wait_for(Duration::from_secs(10), "dnsmasq answering", || {
        let out = client
            .command(traffic::helper())
            .args([
                "resolve",
                "--server",
                &dns.ipv4.to_string(),
                "--name",
                "api.example.com",
            ])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["resolved"] == 1).then_some(())
    });
    let dns_server = dns.ipv4.to_string();
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        without.push(measure(&client, &dns));
        let mut agent = Agent::start(
            &lab,
            &dir,
            &["--dns-server", &dns_server, "--detach-on-exit"],
        );
        agent.wait_ready();
        agent.apply(&state, &["client", "dns"]);
        wait_for(Duration::from_secs(10), "the allowlist in force", || {
            agent.workload("client")?["egress_allowlists"]
                .as_array()
                .filter(|a| !a.is_empty())
                .map(|_| ())
        });
        with.push(measure(&client, &dns));
        let held = crate::agent::sample(
            &agent.metrics_text(),
            "tollgate_datapath_diagnostics_total",
            &[("reason", "dns_held")],
        )
        .unwrap_or(0.0);
        assert!(held >= LOOKUPS as f64, "answers were not held: {held}");
        agent.stop();
    }
    let figure = |case: &str, field: &str| {
        let of = |runs: &[serde_json::Value], p: &str| {
            median(
                runs.iter()
                    .map(|v| v[format!("{field}_{p}_us")].as_f64().unwrap_or(f64::NAN))
                    .collect(),
            )
        };
        DnsFigure {
            case: case.into(),
            without_p50_us: of(&without, "p50"),
            without_p99_us: of(&without, "p99"),
            with_p50_us: of(&with, "p50"),
            with_p99_us: of(&with, "p99"),
            lookups: LOOKUPS,
        }
    };
    vec![
        figure("DNS lookup (UDP)", "lookup"),
        figure(
            "lookup, then TCP connect and 1-byte echo",
            "first_connection",
        ),
    ]
}
