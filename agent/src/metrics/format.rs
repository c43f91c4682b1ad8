//! The exposition format a scraper asks for. `/metrics` is OpenMetrics for whoever accepts
//! it (Prometheus asks for it first); anything else (curl, `promtool check metrics`, older
//! scrapers) gets the Prometheus text format 0.0.4, in which a counter's `# HELP` and
//! `# TYPE` lines name its samples (`tollgate_packets_total`), not the family
//! (`tollgate_packets`), so every sample has its help and type there too.

/// The content type of OpenMetrics, as `/metrics` answers it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header takes OpenMetrics.
pub fn accepts_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// OpenMetrics text, as `prometheus_client` encodes it, in the Prometheus text format:
/// a counter's and an info metric's help and type named as their samples are (an info
/// metric is a gauge of 1 there), units and `# EOF` left out, help unescaped of the `\"`
/// that format does not know.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's `# HELP` comes before its `# TYPE`, which says what its samples are named.
    let mut help: Option<(&str, String)> = None;
    // The family being read and the suffix of its samples beyond its name.
    let mut family: Option<&str> = None;
    let flush_help = |out: &mut String, help: &mut Option<(&str, String)>, suffix: &str| {
        if let Some((name, text)) = help.take() {
            out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
        }
    };
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, &mut help, "");
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text.replace("\\\"", "\"")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            match &help {
                Some((helped, _)) if *helped == name => flush_help(&mut out, &mut help, suffix),
                _ => flush_help(&mut out, &mut help, ""),
            }
            family = Some(name);
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        flush_help(&mut out, &mut help, "");
        if let Some(name) = family
            && line
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with("_created"))
        {
            // A counter's creation time is a sample of its own in OpenMetrics only.
            continue;
        }
        // An exemplar (` # {...}`) has no place in the text format.
        out.push_str(line.split_once(" # {").map_or(line, |(sample, _)| sample));
        out.push('\n');
    }
    flush_help(&mut out, &mut help, "");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENMETRICS_TEXT: &str = "# HELP tollgate_packets Packets seen, by \\\"verdict\\\".\n\
        # TYPE tollgate_packets counter\n\
        tollgate_packets_total{pod=\"a\",verdict=\"allowed\"} 3\n\
        tollgate_packets_created{pod=\"a\",verdict=\"allowed\"} 1700000000.0\n\
        # HELP tollgate_build Build.\n\
        # TYPE tollgate_build info\n\
        tollgate_build_info{version=\"0.1.0\"} 1\n\
        # HELP tollgate_policy_sync_seconds Sync time.\n\
        # TYPE tollgate_policy_sync_seconds histogram\n\
        # UNIT tollgate_policy_sync_seconds seconds\n\
        tollgate_policy_sync_seconds_sum 0.5\n\
        tollgate_policy_sync_seconds_count 2\n\
        tollgate_policy_sync_seconds_bucket{le=\"+Inf\"} 2 # {trace=\"x\"} 0.1\n\
        # HELP tollgate_source_degraded Degraded.\n\
        # TYPE tollgate_source_degraded gauge\n\
        tollgate_source_degraded 0\n\
        # EOF\n";

    #[test]
    fn counters_and_info_are_named_as_their_samples_in_the_text_format() {
        assert_eq!(
            prometheus_text(OPENMETRICS_TEXT),
            "# HELP tollgate_packets_total Packets seen, by \"verdict\".\n\
             # TYPE tollgate_packets_total counter\n\
             tollgate_packets_total{pod=\"a\",verdict=\"allowed\"} 3\n\
             # HELP tollgate_build_info Build.\n\
             # TYPE tollgate_build_info gauge\n\
             tollgate_build_info{version=\"0.1.0\"} 1\n\
             # HELP tollgate_policy_sync_seconds Sync time.\n\
             # TYPE tollgate_policy_sync_seconds histogram\n\
             tollgate_policy_sync_seconds_sum 0.5\n\
             tollgate_policy_sync_seconds_count 2\n\
             tollgate_policy_sync_seconds_bucket{le=\"+Inf\"} 2\n\
             # HELP tollgate_source_degraded Degraded.\n\
             # TYPE tollgate_source_degraded gauge\n\
             tollgate_source_degraded 0\n"
        );
    }

    #[test]
    fn openmetrics_goes_to_whoever_accepts_it() {
        // Prometheus 2.x's scrape header.
        assert!(accepts_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(accepts_openmetrics(Some("Application/OpenMetrics-Text")));
        assert!(!accepts_openmetrics(None), "curl sends */*, or nothing");
        assert!(!accepts_openmetrics(Some("*/*")));
        assert!(!accepts_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!accepts_openmetrics(Some(
            "application/openmetrics-text;q=0, text/plain"
        )));
    }
}
