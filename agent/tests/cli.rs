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
        "--node-name",
        "--pod-mode-annotations",
        "--cgroup-root",
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

/// Runs `check -o json` on a cluster state given as YAML text.
fn check_yaml(yaml: &str, flows: &str) -> Vec<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("state-{}.yaml", yaml.len()));
    std::fs::write(&file, yaml).unwrap();
    let out = tollgate(
        &[
            "check",
            "--cluster-state",
            file.to_str().unwrap(),
            "-o",
            "json",
        ],
        flows,
    );
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.250.0.1}, {type: Hostname, address: n1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client-0, namespace: x, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.10}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-5d8f9-a
  namespace: x
  labels: {app: web, version: v1, pod-template-hash: 5d8f9}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d8f9, uid: u, controller: true}]
spec: {nodeName: n2, containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.11}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7c6b5-b
  namespace: x
  labels: {app: web, version: v2, pod-template-hash: 7c6b5}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7c6b5, uid: u, controller: true}]
spec: {nodeName: n2, containers: [{name: c, image: i, ports: [{name: http, containerPort: 9090}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.12}]}
---
apiVersion: v1
kind: Pod
metadata: {name: loner-0, namespace: x, labels: {app: loner}}
spec: {containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.13}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: api, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: loner, namespace: x}
spec: {clusterIP: 10.96.0.11, selector: {app: loner}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: web, version: v1}}}], ports: [{port: http}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: loner, namespace: x}
spec: {podSelector: {matchLabels: {app: loner}}, policyTypes: [Egress]}
"#;

#[test]
fn check_decides_service_addresses_by_every_backend_and_knows_each_pods_node() {
    let flows = "x/client-0 10.96.0.10 80/tcp
x/client-0 10.96.0.10 api/tcp
x/client-0 x/web 8080/tcp
x/client-0 x/web-7c6b5-b http/tcp
x/loner-0 10.96.0.11 80/tcp
x/client-0 10.250.0.1 10250/tcp
x/loner-0 10.250.0.1 10250/tcp
";
    let r = check_yaml(SERVICES, flows);
    let verdict = |i: usize| r[i]["verdict"].as_str().unwrap();
    // Backends disagree (v2 is not allowed): kube-proxy may pick either, so the Service
    // address is denied as a whole.
    assert_eq!(verdict(0), "denied", "{:?}", r[0]);
    assert_eq!(r[0]["egress"], "denied");
    assert_eq!(r[0]["dst_service"], "x/web");
    assert_eq!(r[1]["port"], 80, "the Service's port by name");
    // NAMESPACE/WORKLOAD: the Deployment web (its first pod, v1 on 8080).
    assert_eq!(verdict(2), "allowed", "{:?}", r[2]);
    // The named port resolves on the destination pod: 9090 for v2, denied.
    assert_eq!(r[3]["port"], 9090);
    assert_eq!(verdict(3), "denied");
    // A pod reaching itself through its own Service: not enforced, like loopback.
    assert_eq!(verdict(4), "allowed", "{:?}", r[4]);
    // Its own node (n1) is always allowed; loner has no node, so 10.250.0.1 is just an
    // address outside the pod network there, denied by its egress isolation.
    assert_eq!(verdict(5), "allowed", "{:?}", r[5]);
    assert_eq!(verdict(6), "denied", "{:?}", r[6]);

    // Once the policy allows both versions, the Service is allowed.
    let both = SERVICES.replace(
        "{podSelector: {matchLabels: {app: web, version: v1}}}",
        "{podSelector: {matchLabels: {app: web}}}",
    );
    let r = check_yaml(&both, "x/client-0 10.96.0.10 80/tcp\n");
    assert_eq!(r[0]["verdict"], "allowed", "{:?}", r[0]);
    assert_eq!(r[0]["egress_policies"], serde_json::json!(["x/client"]));
}
