//! The `tollgate` binary as a black box: `--help` everywhere, exit codes, `tollgate check`
//! on a real `kubectl get ns,pods,netpol -A -o yaml` dump. No kernel needed.

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
};

fn tollgate(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tollgate");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

const DUMP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/kubectl-dump.yaml"
);

#[test]
fn every_command_has_help() {
    for cmd in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["status", "--help"],
        vec!["mode", "--help"],
        vec!["mode", "set", "--help"],
        vec!["mode", "clear", "--help"],
        vec!["flows", "--help"],
        vec!["check", "--help"],
        vec!["selftest", "--help"],
    ] {
        let out = tollgate(&cmd, "");
        assert!(out.status.success(), "{cmd:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{cmd:?}: {text}");
    }
    let run = String::from_utf8(tollgate(&["run", "--help"], "").stdout).unwrap();
    for flag in [
        "--cluster-state",
        "--metrics-addr",
        "--bpffs",
        "--state-dir",
        "--default-mode",
        "--flow-log",
        "--log-rate",
        "--log-burst",
        "--max-flow-series",
        "--detach-on-exit",
    ] {
        assert!(run.contains(flag), "run --help lacks {flag}");
    }
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(tollgate(&["frobnicate"], "").status.code(), Some(2));
    assert_eq!(
        tollgate(&["run"], "").status.code(),
        Some(2),
        "--cluster-state is required"
    );
    assert_eq!(
        tollgate(&["mode", "set", "*", "sideways"], "")
            .status
            .code(),
        Some(2)
    );
    let out = tollgate(&["check", "--cluster-state", "/nonexistent"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}

#[test]
fn check_evaluates_a_kubectl_dump() {
    let flows = "\
# pot calls the ledger's API by its named port\n\
bank/pot-5c6d7e8f9-q4r7t bank/ledger-7d9c8b5f4-x2x9q 8080/tcp\n\
monitoring/prometheus-0 bank/ledger-7d9c8b5f4-x2x9q 9090/tcp\n\
monitoring/prometheus-0 bank/ledger-7d9c8b5f4-x2x9q 8080/tcp\n\
bank/cardproc-66b8d9c7f-m1n2b 203.0.113.10 8449/tcp\n\
bank/cardproc-66b8d9c7f-m1n2b 203.0.113.200 443/tcp\n";
    let out = tollgate(&["check", "--cluster-state", DUMP, "-o", "json"], flows);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 5);
    let verdicts: Vec<&str> = results
        .iter()
        .map(|r| r["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(
        verdicts,
        ["allowed", "allowed", "denied", "allowed", "denied"]
    );
    let first = &results[0];
    for field in [
        "src", "dst", "port", "protocol", "egress", "ingress", "verdict", "policies",
    ] {
        assert!(first.get(field).is_some(), "missing {field}");
    }
    assert_eq!(first["port"], 8080);
    assert_eq!(first["protocol"], "tcp");
    assert!(
        first["policies"]
            .as_array()
            .unwrap()
            .contains(&"bank/ledger-ingress".into())
    );
    // Denied at the ledger's ingress: prometheus may only scrape 9090.
    assert_eq!(results[2]["egress"], "allowed");
    assert_eq!(results[2]["ingress"], "denied");
    // The card network: 8443-8450 to 203.0.113.0/24 except the upper half.
    assert_eq!(results[4]["egress"], "denied");
}

#[test]
fn check_reports_bad_lines_and_keeps_going() {
    let out = tollgate(
        &["check", "--cluster-state", DUMP],
        "nonsense\nbank/nope bank/pot-5c6d7e8f9-q4r7t 80/tcp\nbank/pot-5c6d7e8f9-q4r7t bank/ledger-7d9c8b5f4-x2x9q 99999/tcp\nbank/pot-5c6d7e8f9-q4r7t bank/ledger-7d9c8b5f4-x2x9q 8080/tcp\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1"), "{err}");
    assert!(
        err.contains("bank/nope is not in the cluster state"),
        "{err}"
    );
    assert!(err.contains("line 3"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().count(),
        1,
        "the good line is still evaluated: {text}"
    );
    assert!(text.contains("allowed"));
}
