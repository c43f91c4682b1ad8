//! What the tests need from `deploy/` (the Kubernetes install, alerts, dashboard): the
//! Grafana dashboard's queries, ready to run against a Prometheus server.

use std::path::Path;

/// The dashboard, relative to the repository root.
pub const DASHBOARD: &str = "deploy/grafana/tollgate-dashboard.json";

/// Every query (`expr`) of every panel of the Grafana dashboard (rows' nested panels too),
/// in panel order, made plain PromQL: the `namespace` variable becomes `.*` (every
/// namespace), `$__rate_interval` becomes `5m` and `$__range` `1h`. Panics with the reason
/// when the dashboard cannot be read or a target has no `expr`.
pub fn dashboard_queries(repo_root: &Path) -> Vec<String> {
    let path = repo_root.join(DASHBOARD);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    let mut queries = Vec::new();
    collect(&dashboard["panels"], &mut queries);
    queries
}

fn collect(panels: &serde_json::Value, queries: &mut Vec<String>) {
    for panel in panels.as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_else(|| {
                panic!(
                    "a target of panel {:?} has no expr: {target}",
                    panel["title"]
                )
            });
            queries.push(plain_promql(expr));
        }
        // A collapsed row holds its panels.
        collect(&panel["panels"], queries);
    }
}

/// Grafana's variables in `expr` replaced by what a plain Prometheus query needs.
fn plain_promql(expr: &str) -> String {
    [
        ("${namespace}", ".*"),
        ("$namespace", ".*"),
        ("${__rate_interval}", "5m"),
        ("$__rate_interval", "5m"),
        ("${__range}", "1h"),
        ("$__range", "1h"),
    ]
    .iter()
    .fold(expr.to_string(), |e, (from, to)| e.replace(from, to))
}
