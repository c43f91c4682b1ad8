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
        vec!["advise", "--help"],
        vec!["graph", "--help"],
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
    for url in ["notaurl", "ftp://x", "https://prom:9090", "http://prom"] {
        let out = tollgate(&["graph", "--prometheus", url], "");
        assert_eq!(out.status.code(), Some(2), "{url}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("http://HOST:PORT"),
            "{url}"
        );
    }

    // A path that does not exist is bad input wherever it is given.
    let dir = std::env::temp_dir().join(format!("tg-cli-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.yaml");
    std::fs::write(
        &state,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
    )
    .unwrap();
    let out = tollgate(
        &[
            "check",
            "--cluster-state",
            state.to_str().unwrap(),
            "--flows",
            "/nonexistent-flows",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-flows"));
    let out = tollgate(
        &[
            "run",
            "--cluster-state",
            "/nonexistent-state",
            "--state-dir",
            dir.join("agent-state").to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-state"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Output piped into a reader that stops early (`tollgate check ... | head -1`) ends the
/// command quietly, by SIGPIPE as for other tools, never with a panic.
#[test]
fn a_reader_that_stops_early_ends_the_command_quietly() {
    use std::io::BufRead as _;
    use std::os::unix::process::ExitStatusExt as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--cluster-state", DUMP, "-o", "json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tollgate");
    let mut stdin = child.stdin.take().unwrap();
    // Far more than a pipe holds, so the command is still writing when the reader goes.
    let writer = std::thread::spawn(move || {
        for _ in 0..5000 {
            if stdin
                .write_all(b"bank/pot-5c6d7e8f9-q4r7t bank/ledger-7d9c8b5f4-x2x9q 8080/tcp\n")
                .is_err()
            {
                break;
            }
        }
    });
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"verdict\""), "{first}");
    // The reader is gone (stdout dropped above).
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc_sigpipe()),
        "{:?}",
        out.status
    );
}

fn libc_sigpipe() -> i32 {
    13
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

/// Flow input that is no list of flows: a line that is not UTF-8 or too long is an error of
/// its own (exit 2, not the 1 of a denied flow) and the lines after it are still read; what
/// the input says is echoed with its control characters escaped; an input with no line end
/// in sight ends the read.
#[test]
fn check_reads_odd_flow_input_line_by_line() {
    let good = "bank/pot-5c6d7e8f9-q4r7t bank/ledger-7d9c8b5f4-x2x9q 8080/tcp\n";
    let mut input = Vec::new();
    input.extend_from_slice(b"\xff\xfe bank/a 80/tcp\n");
    input.extend_from_slice(&vec![b'x'; 10_000]);
    input.extend_from_slice(b"\nbank/\x1b]0;title\x07 bank/b 80/tcp\n");
    input.extend_from_slice(good.as_bytes());
    let path = std::env::temp_dir().join(format!("tg-cli-flows-{}", std::process::id()));
    std::fs::write(&path, &input).unwrap();
    let out = tollgate(
        &[
            "check",
            "--cluster-state",
            DUMP,
            "--flows",
            path.to_str().unwrap(),
        ],
        "",
    );
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1: not UTF-8"), "{err}");
    assert!(err.contains("line 2: longer than 4096 bytes"), "{err}");
    assert!(err.contains("line 3: bank/\\u{1b}]0;title\\u{7}"), "{err}");
    assert!(
        !err.contains('\x1b'),
        "a control character reached the terminal: {err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "line 4 still evaluated: {text}");

    let out = tollgate(
        &["check", "--cluster-state", DUMP, "--flows", "/dev/zero"],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a list of flows"),
        "{out:?}"
    );
}

/// Runs `check -o json` on a cluster state given as YAML text.
fn check_yaml(yaml: &str, flows: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = check_with(yaml, &["-o", "json"], flows);
    assert_eq!(code, Some(0), "{err}");
    out.lines()
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
kind: Pod
metadata: {name: door-0, namespace: x, labels: {app: door}}
spec: {nodeName: n1, containers: [{name: c, image: i, ports: [{containerPort: 8080, hostPort: 8088}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.14}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {type: LoadBalancer, clusterIP: 10.96.0.10, externalIPs: [203.0.113.7], selector: {app: web}, ports: [{name: api, port: 80, targetPort: http, nodePort: 30080}]}
status: {loadBalancer: {ingress: [{ip: 203.0.113.8}]}}
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
x/client-0 10.250.0.1 30080/tcp
x/client-0 10.250.0.1 8088/tcp
x/client-0 203.0.113.7 80/tcp
x/client-0 203.0.113.8 80/tcp
";
    let r = check_yaml(SERVICES, flows);
    let verdict = |i: usize| r[i]["verdict"].as_str().unwrap();
    // Backends disagree (v2 is not allowed): kube-proxy may pick either, so the Service
    // address is denied as a whole.
    assert_eq!(verdict(0), "denied", "{:?}", r[0]);
    assert_eq!(r[0]["egress"], "denied");
    assert_eq!(r[0]["dst_service"], "x/web");
    assert_eq!(r[1]["port"], 80, "the Service's port by name");
    // NAMESPACE/WORKLOAD: every pod of the Deployment web; v2 is not allowed, so the
    // workload is not, and the explanation names that pod.
    assert_eq!(verdict(2), "denied", "{:?}", r[2]);
    assert_eq!(r[2]["explanations"][0]["side"], "egress");
    assert_eq!(r[2]["explanations"][0]["pod"], "x/client-0");
    assert_eq!(
        r[2]["explanations"][0]["fix"]["rule"],
        "{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{protocol: TCP, port: 8080}]}"
    );
    // The named port resolves on the destination pod: 9090 for v2, denied.
    assert_eq!(r[3]["port"], 9090);
    assert_eq!(verdict(3), "denied");
    // A pod reaching itself through its own Service: not enforced, like loopback.
    assert_eq!(verdict(4), "allowed", "{:?}", r[4]);
    // Its own node (n1) is always allowed; loner has no node, so 10.250.0.1 is just an
    // address outside the pod network there, denied by its egress isolation.
    assert_eq!(verdict(5), "allowed", "{:?}", r[5]);
    assert_eq!(verdict(6), "denied", "{:?}", r[6]);
    // The Service's NodePort on the pod's own node leads where its address does (kube-proxy
    // DNATs it to a backend): decided as the Service, not as the node.
    assert_eq!(verdict(7), "denied", "{:?}", r[7]);
    assert_eq!(r[7]["egress"], "denied", "{:?}", r[7]);
    // So does a hostPort of a pod on that node (the CNI's portmap DNATs it to the pod).
    assert_eq!(verdict(8), "denied", "{:?}", r[8]);
    assert_eq!(r[8]["egress"], "denied", "{:?}", r[8]);
    // Its external IP and load-balancer address are DNATed like its ClusterIP.
    for i in [9, 10] {
        assert_eq!(verdict(i), "denied", "{:?}", r[i]);
        assert_eq!(r[i]["dst_service"], "x/web", "{:?}", r[i]);
    }

    // Once the policy allows both versions, the Service is allowed.
    let both = SERVICES.replace(
        "{podSelector: {matchLabels: {app: web, version: v1}}}",
        "{podSelector: {matchLabels: {app: web}}}",
    );
    let r = check_yaml(
        &both,
        "x/client-0 10.96.0.10 80/tcp\nx/client-0 10.250.0.1 30080/tcp\nx/client-0 127.0.0.2 30080/tcp\nx/client-0 203.0.113.8 80/tcp\n",
    );
    assert_eq!(r[0]["verdict"], "allowed", "{:?}", r[0]);
    assert_eq!(r[0]["egress_policies"], serde_json::json!(["x/client"]));
    assert_eq!(r[1]["verdict"], "allowed", "the NodePort too: {:?}", r[1]);
    // kube-proxy takes a NodePort on any address of 127.0.0.0/8 (route_localnet).
    assert_eq!(r[2]["verdict"], "allowed", "on 127.0.0.2 too: {:?}", r[2]);
    assert_eq!(
        r[3]["verdict"], "allowed",
        "the load balancer too: {:?}",
        r[3]
    );

    // A port the Service does not expose: denied whatever the policies say, and explained.
    let r = check_yaml(&both, "x/client-0 10.96.0.10 443/tcp\n");
    assert_eq!(r[0]["verdict"], "denied", "{:?}", r[0]);
    let why = r[0]["explanation"].as_str().unwrap_or_default();
    assert!(
        why.contains("x/web") && why.contains("a port the Service exposes (80/tcp"),
        "{:?}",
        r[0]
    );
    assert_eq!(r[0]["explanations"][0]["fix"]["kind"], "serviceport");

    // A Service's DNS name inside the cluster is its virtual address, as the cluster's DNS
    // answers: decided by its backends, not as a name outside the cluster.
    let r = check_yaml(
        &both,
        "x/client-0 web.x.svc.cluster.local 80/tcp\nx/client-0 web.x.svc 80/tcp\n",
    );
    for answer in &r {
        assert_eq!(answer["verdict"], "allowed", "{answer:?}");
        assert_eq!(answer["dst_service"], "x/web", "{answer:?}");
    }
    let (code, _, err) = check_with(&both, &[], "x/client-0 nope.x.svc 80/tcp\n");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("Service x/nope, which is not in the cluster state"),
        "{err}"
    );
    // No flow starts at a virtual address (replies are un-DNATed to it by the node).
    let (code, _, err) = check_with(&both, &[], "10.96.0.10 x/web-7c6b5-b 8080/tcp\n");
    assert_eq!(code, Some(2));
    assert!(err.contains("virtual address of Service x/web"), "{err}");
}

/// A DNS name may stand for any address outside the cluster: a NetworkPolicy allows it only
/// through ipBlocks that hold every address, never through one that holds some, however
/// wide, or the whole range but for exceptions.
#[test]
fn check_allows_a_name_only_by_ipblocks_that_hold_every_address() {
    let state = |blocks: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x, labels: {{pod: a}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{podIPs: [{{ip: 10.0.1.1}}]}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: out, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress: [{{to: [{blocks}], ports: [{{port: 443}}]}}]\n"
        )
    };
    let egress = |blocks: &str, flow: &str| {
        check_yaml(&state(blocks), flow)[0]["egress"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let name = "x/a api.example.com 443/tcp\n";
    for partial in [
        "{ipBlock: {cidr: 0.0.0.0/32}}",
        "{ipBlock: {cidr: 0.0.0.0/1}}",
        "{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}",
    ] {
        let answer = &check_yaml(&state(partial), name)[0];
        assert_eq!(answer["egress"], "denied", "{partial}");
        // Explained as the verdict was taken (a name, any address), not as the unspecified
        // address that stands for it, which some of these blocks hold.
        assert_eq!(
            answer["explanations"][0]["fix"]["kind"], "namewithoutallowlist",
            "{partial}: {answer}"
        );
    }
    let every = "{ipBlock: {cidr: 0.0.0.0/0}}";
    assert_eq!(egress(every, name), "allowed");
    assert_eq!(egress(every, "x/a api.example.com 80/tcp\n"), "denied");
    // Blocks that together hold every address do.
    assert_eq!(
        egress(
            "{ipBlock: {cidr: 0.0.0.0/1}}, {ipBlock: {cidr: 128.0.0.0/1}}",
            name
        ),
        "allowed"
    );
    assert_eq!(
        egress(
            "{ipBlock: {cidr: 0.0.0.0/1}}, {ipBlock: {cidr: 192.0.0.0/2}}",
            name
        ),
        "denied"
    );
}

/// A document that is not YAML is one bad object (named by the kind and name its lines
/// give), not the end of its file: the other policies of the file still decide, and the
/// exit code says the input was bad.
#[test]
fn check_rejects_a_document_that_is_not_yaml_and_keeps_the_rest_of_its_file() {
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIPs: [{ip: 10.0.1.1}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {pod: b}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIPs: [{ip: 10.0.1.2}]}\n---\n: : : not yaml [\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: x}\nspec: {podSelector: {}, ingress: [\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-closed, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n";
    let (code, out, err) = check_with(yaml, &["-o", "json"], "x/a x/b 80/tcp\nx/b x/a 80/tcp\n");
    assert_eq!(code, Some(2), "bad input: {err}");
    assert!(
        err.contains("NetworkPolicy x/broken") && err.contains("not valid YAML"),
        "{err}"
    );
    let r: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        r[0]["ingress"], "denied",
        "b-closed still decides: {:?}",
        r[0]
    );
    assert_eq!(r[1]["verdict"], "allowed", "{:?}", r[1]);
}

/// A Service flow one backend denies names the policies that denied it, not those of the
/// backends that would have let it in.
#[test]
fn check_names_only_the_denying_backends_policies_for_a_denied_service_flow() {
    let pod = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: web, pod: {name}}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{podIPs: [{{ip: {ip}}}]}}\n---\n"
        )
    };
    let yaml = pod("w1", "10.0.1.1")
        + &pod("w2", "10.0.1.2")
        + &pod("client", "10.0.1.3")
        + "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: w1-open, namespace: x}\nspec: {podSelector: {matchLabels: {pod: w1}}, ingress: [{}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: w2-closed, namespace: x}\nspec: {podSelector: {matchLabels: {pod: w2}}}\n";
    let r = check_yaml(&yaml, "x/client 10.96.0.10 80/tcp\n");
    assert_eq!(r[0]["ingress"], "denied", "{:?}", r[0]);
    assert_eq!(
        r[0]["ingress_policies"],
        serde_json::json!(["x/w2-closed"]),
        "{:?}",
        r[0]
    );
    assert_eq!(
        r[0]["policies"],
        serde_json::json!(["x/w2-closed"]),
        "{:?}",
        r[0]
    );
}

/// With --ipv6, a pod without an IPv6 address reaches a dual-stack pod over IPv4, as its
/// connection would: the line is checked over the family both ends have, never over an
/// IPv4 source toward an IPv6 destination.
#[test]
fn check_takes_a_flow_over_the_address_family_both_ends_have() {
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIPs: [{ip: 10.0.1.1}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {pod: b}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIPs: [{ip: 10.0.1.2}, {ip: 'fd77:1::2'}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: six, namespace: x, labels: {pod: six}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIPs: [{ip: 'fd77:1::6'}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-out, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 'fd77:1::/64'}}]}]\n";
    let (code, out, err) = check_with(
        yaml,
        &["-o", "json", "--ipv6"],
        "x/a x/b 80/tcp\nx/b x/six 80/tcp\nx/a x/six 80/tcp\n",
    );
    assert_eq!(
        code,
        Some(2),
        "the last line has no family in common: {err}"
    );
    assert!(err.contains("no address family in common"), "{err}");
    let r: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        r[0]["egress"], "denied",
        "a reaches b over IPv4 only: {:?}",
        r[0]
    );
    assert_eq!(r[1]["verdict"], "allowed", "{:?}", r[1]);
    // Without --ipv6, an IPv6-only pod is still checked over IPv6.
    let r = check_yaml(yaml, "x/six x/b 80/tcp\n");
    assert_eq!(r[0]["verdict"], "allowed", "{:?}", r[0]);
}

/// A Service without a selector whose EndpointSlice (written by the Service's owners, not
/// by the control plane) names its backends: in another namespace, and once falsely.
const HANDWRITTEN_SLICES: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {containers: [{name: c, image: i}]}
status: {podIPs: [{ip: 10.0.1.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {pod: c}}
spec: {containers: [{name: c, image: i}]}
status: {podIPs: [{ip: 10.0.1.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: y, labels: {pod: a}}
spec: {containers: [{name: c, image: i}]}
status: {podIPs: [{ip: 10.0.2.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere, namespace: x}
spec: {clusterIP: 10.96.0.20, ports: [{port: 8000, targetPort: 81}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: elsewhere-1, namespace: x, labels: {kubernetes.io/service-name: elsewhere}}
addressType: IPv4
endpoints: [{addresses: [10.0.2.1], targetRef: {kind: Pod, namespace: y, name: a}}]
ports: [{port: 81, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: disguised, namespace: x}
spec: {clusterIP: 10.96.0.21, ports: [{port: 8000, targetPort: 81}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: disguised-1, namespace: x, labels: {kubernetes.io/service-name: disguised}}
addressType: IPv4
endpoints: [{addresses: [10.0.2.1], targetRef: {kind: Pod, name: a}}]
ports: [{port: 81, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: y-closed, namespace: y}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-to-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {pod: a}}}]}]
"#;

/// kube-proxy sends a Service's traffic to the addresses of its EndpointSlices: a backend is
/// the pod that holds the address. A `targetRef` names a pod of its own namespace when it
/// says so, and counts only for a pod that holds the address: a slice naming x/a at y/a's
/// address must not make y/a's traffic x/a's.
#[test]
fn check_takes_a_services_backend_as_the_pod_holding_its_address() {
    let r = check_yaml(
        HANDWRITTEN_SLICES,
        "x/c 10.96.0.20 8000/tcp\nx/c 10.96.0.21 8000/tcp\nx/c y/a 81/tcp\nx/c x/a 81/tcp\n",
    );
    let sides = |i: usize| {
        (
            r[i]["egress"].as_str().unwrap().to_string(),
            r[i]["ingress"].as_str().unwrap().to_string(),
        )
    };
    let denied_both = ("denied".to_string(), "denied".to_string());
    assert_eq!(sides(0), denied_both, "the backend is y/a: {:?}", r[0]);
    assert_eq!(
        sides(1),
        denied_both,
        "still y/a, whatever the slice claims: {:?}",
        r[1]
    );
    assert_eq!(sides(2), denied_both, "{:?}", r[2]);
    assert_eq!(r[3]["verdict"], "allowed", "{:?}", r[3]);
    assert!(
        r[0]["ingress_policies"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("y/y-closed")),
        "{:?}",
        r[0]
    );
}

/// Runs `check` with extra arguments on a cluster state given as YAML text: exit code and
/// standard output, standard error.
fn check_with(yaml: &str, args: &[&str], flows: &str) -> (Option<i32>, String, String) {
    // Tests run in parallel: a directory of its own per call, removed after.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tollgate-cli{call}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut all = vec!["check", "--cluster-state", file.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = tollgate(&all, flows);
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f-a
  namespace: shop
  labels: {app: web, pod-template-hash: 7d9f}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, uid: u, controller: true}]
spec: {containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.1}, {ip: "fd10::1"}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f-b
  namespace: shop
  labels: {app: web, pod-template-hash: 7d9f}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, uid: u, controller: true}]
spec: {containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {containers: [{name: db, image: i, ports: [{name: pg, containerPort: 5432}]}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.9}, {ip: "fd10::9"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: backup-0, namespace: ops, labels: {app: backup}}
spec: {containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.3.0.1}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: db-client}}}]
    ports: [{port: pg}]
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-out, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
"#;

#[test]
fn check_explains_each_denied_side_with_the_smallest_change_that_allows_it() {
    let flows = "\
shop/web shop/db-0 pg/tcp
shop/web 203.0.113.9 443/tcp
ops/backup-0 shop/db-0 5432/tcp
";
    let r = check_yaml(SHOP, flows);
    // The workload (both pods) reaches the database's named port; its egress allows it,
    // the database's ingress wants a role label it lacks.
    assert_eq!(r[0]["port"], 5432);
    assert_eq!(r[0]["egress"], "allowed");
    assert_eq!(r[0]["ingress"], "denied");
    // The policies that decided a denied flow are the denying side's: the file to open.
    assert_eq!(r[0]["policies"], serde_json::json!(["shop/db-in"]));
    assert_eq!(r[0]["egress_policies"], serde_json::json!(["shop/web-out"]));
    assert_eq!(r[0]["ingress_policies"], serde_json::json!(["shop/db-in"]));
    let e = &r[0]["explanations"];
    assert_eq!(e.as_array().unwrap().len(), 1, "{e}");
    assert_eq!(e[0]["side"], "ingress");
    assert_eq!(e[0]["pod"], "shop/db-0");
    assert_eq!(e[0]["isolated_by"], serde_json::json!(["shop/db-in"]));
    assert_eq!(
        e[0]["fix"],
        serde_json::json!({"kind": "labels", "policy": "shop/db-in", "workload": "shop/web", "labels": {"role": "db-client"}})
    );
    let text = r[0]["explanation"].as_str().unwrap();
    assert!(text.contains("ingress of shop/db-0"), "{text}");
    assert!(text.contains("role=db-client"), "{text}");
    // Outside the cluster: denied at the source's egress, fixed by an ipBlock rule.
    assert_eq!(r[1]["egress"], "denied");
    assert_eq!(r[1]["explanations"][0]["side"], "egress");
    assert_eq!(r[1]["explanations"][0]["pod"], "shop/web-7d9f-a");
    assert_eq!(
        r[1]["explanations"][0]["fix"],
        serde_json::json!({"kind": "rule", "policy": "shop/web-out", "direction": "egress",
            "rule": "{to: [{ipBlock: {cidr: 203.0.113.9/32}}], ports: [{protocol: TCP, port: 443}]}"})
    );
    // Another namespace: no label makes a rule select it (its namespace is not the policy's),
    // so a rule naming the namespace and the workload's label.
    assert_eq!(
        r[2]["explanations"][0]["fix"]["rule"],
        "{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}, podSelector: {matchLabels: {app: backup}}}], ports: [{protocol: TCP, port: 5432}]}"
    );
    // An allowed flow has no explanation.
    let ok = check_yaml(SHOP, "shop/db-0 shop/web-7d9f-b 80/tcp\n");
    assert!(ok[0].get("explanation").is_none(), "{:?}", ok[0]);
}

#[test]
fn check_takes_icmp_and_a_pod_reaching_itself_is_allowed() {
    let r = check_yaml(
        SHOP,
        "shop/web-7d9f-a shop/db-0 icmp\nshop/web-7d9f-a shop/db-0 icmpv6\nshop/web-7d9f-a shop/web-7d9f-a 8080/tcp\nshop/db-0 shop/db-0 5432/tcp\nops/backup-0 shop/db-0 icmp\n",
    );
    // web-out allows everything to the database, ports and all: ICMP too. The database's
    // ingress has no rule without ports for web: ICMP is denied there, whatever the family.
    assert_eq!(r[0]["protocol"], "icmp");
    assert_eq!(r[0]["port"], 0);
    assert_eq!(r[0]["egress"], "allowed");
    assert_eq!(r[0]["ingress"], "denied");
    assert_eq!(r[1]["protocol"], "icmpv6");
    assert_eq!(r[1]["ingress"], "denied");
    // ICMP is only allowed by a rule without ports: the fix says so.
    assert_eq!(
        r[0]["explanations"][0]["fix"]["rule"],
        "{from: [{podSelector: {matchLabels: {app: web}}}]}"
    );
    // A pod to itself: never enforced, in the datapath and here.
    assert_eq!(r[2]["verdict"], "allowed", "{:?}", r[2]);
    assert_eq!(r[3]["verdict"], "allowed", "{:?}", r[3]);
    assert_eq!(r[4]["verdict"], "denied");

    let (code, _, err) = check_with(SHOP, &[], "ops/backup-0 shop/db-0 icmpv6\n");
    assert_eq!(code, Some(2), "backup-0 has no IPv6 address");
    assert!(err.contains("use icmp"), "{err}");

    // An ICMP type before the protocol is taken and ignored; a port name or a number no
    // ICMP type has is a mistake, not a flow.
    let r = check_yaml(SHOP, "shop/web-7d9f-a shop/db-0 8/icmp\n");
    assert_eq!(r[0]["protocol"], "icmp");
    for line in [
        "shop/web-7d9f-a shop/db-0 http/icmp\n",
        "shop/web-7d9f-a shop/db-0 8080/icmpv6\n",
    ] {
        let (code, _, err) = check_with(SHOP, &[], line);
        assert_eq!(code, Some(2), "{line}");
        assert!(err.contains("ICMP has no ports"), "{err}");
    }
}

#[test]
fn check_fails_on_deny_for_ci_and_prints_yaml_or_a_json_array() {
    let denied = "shop/web shop/db-0 80/tcp\nops/backup-0 shop/db-0 5432/tcp\n";
    let (code, _, _) = check_with(SHOP, &["--fail-on-deny"], denied);
    assert_eq!(code, Some(1));
    let (code, _, _) = check_with(SHOP, &[], denied);
    assert_eq!(
        code,
        Some(0),
        "without --fail-on-deny a denied flow is an answer"
    );
    let (code, _, _) = check_with(
        SHOP,
        &["--fail-on-deny"],
        "shop/web-7d9f-a shop/web-7d9f-a 1/tcp\n",
    );
    assert_eq!(code, Some(0));
    let (code, _, _) = check_with(SHOP, &["--fail-on-deny"], "nonsense\n");
    assert_eq!(code, Some(2), "bad input wins over denied");

    let (code, out, _) = check_with(SHOP, &["-o", "json-array"], denied);
    assert_eq!(code, Some(0));
    let array: serde_json::Value = serde_json::from_str(&out).expect("one JSON array");
    assert_eq!(array.as_array().unwrap().len(), 2);
    assert_eq!(array[1]["verdict"], "denied");
    let (code, out, _) = check_with(SHOP, &["-o", "yaml"], denied);
    assert_eq!(code, Some(0));
    let yaml: serde_json::Value = serde_norway::from_str(&out).expect("a YAML list");
    assert_eq!(yaml, array, "the same results");
    let (_, text, _) = check_with(SHOP, &[], denied);
    assert!(
        text.contains("denied (egress allowed by shop/web-out, ingress denied by shop/db-in)"),
        "{text}"
    );
    assert!(
        text.contains("denied at the ingress of shop/db-0"),
        "{text}"
    );
}

#[test]
fn check_warns_of_a_namespace_selector_naming_a_namespace_the_state_lacks() {
    let (code, _, err) = check_with(SHOP, &[], "shop/web shop/db-0 pg/tcp\n");
    assert_eq!(code, Some(0));
    assert!(
        err.contains(
            "NetworkPolicy shop/db-in: its namespaceSelector names namespace \"monitoring\""
        ),
        "{err}"
    );
    let with_monitoring =
        format!("{SHOP}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: monitoring}}\n");
    let (_, _, err) = check_with(&with_monitoring, &[], "shop/web shop/db-0 pg/tcp\n");
    assert!(!err.contains("monitoring"), "{err}");
}

const PAYMENTS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: card-0, namespace: pay, labels: {app: card}}
spec: {containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ledger-0, namespace: pay, labels: {app: ledger}}
spec: {containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: audit-0, namespace: pay, labels: {app: audit}}
spec: {containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.12}]}
---
apiVersion: tollgate.io/v1alpha1
kind: EgressAllowlist
metadata: {name: card-egress, namespace: pay}
spec:
  podSelector: {matchLabels: {app: card}}
  egress:
  - domains: [api.stripe.com, '*.cdn.example.com']
    ports: [{port: 443}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audit-out, namespace: pay}
spec:
  podSelector: {matchLabels: {app: audit}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}], ports: [{port: 443}]}]
"#;

#[test]
fn check_takes_dns_names_and_decides_them_by_egress_allowlists() {
    let flows = "\
pay/card-0 api.stripe.com 443/tcp
pay/card-0 API.Stripe.com. 443/tcp
pay/card-0 api.stripe.com 80/tcp
pay/card-0 img.cdn.example.com 443/tcp
pay/card-0 a.img.cdn.example.com 443/tcp
pay/card-0 evil.example.org 443/tcp
pay/card-0 203.0.113.7 443/tcp
pay/card-0 pay/ledger-0 8080/tcp
pay/ledger-0 evil.example.org 443/tcp
pay/audit-0 evil.example.org 443/tcp
pay/audit-0 evil.example.org 80/tcp
";
    let r = check_yaml(PAYMENTS, flows);
    let verdicts: Vec<&str> = r.iter().map(|f| f["verdict"].as_str().unwrap()).collect();
    assert_eq!(
        verdicts,
        [
            "allowed", "allowed", "denied", "allowed", "denied", "denied", "denied", "allowed",
            "allowed", "allowed", "denied"
        ],
        "{r:#?}"
    );
    assert_eq!(r[0]["policies"], serde_json::json!(["pay/card-egress"]));
    // A name the allowlist lacks: the entry to add.
    assert_eq!(
        r[5]["explanations"][0]["fix"],
        serde_json::json!({"kind": "domain", "allowlist": "pay/card-egress",
            "rule": "{domains: [evil.example.org], ports: [{port: 443, protocol: TCP}]}"})
    );
    // A raw address: only a name (or an ipBlock) allows it.
    assert_eq!(r[6]["explanations"][0]["fix"]["kind"], "resolvename");
    assert!(
        r[6]["explanation"]
            .as_str()
            .unwrap()
            .contains("pay/card-egress"),
        "{}",
        r[6]
    );
    // A name from a workload no allowlist selects: its NetworkPolicies take addresses, so
    // the fix is an allowlist entry (or the name's addresses), never a made-up address.
    assert_eq!(
        r[10]["explanations"][0]["fix"]["kind"],
        "namewithoutallowlist"
    );
    let why = r[10]["explanation"].as_str().unwrap();
    assert!(
        why.contains("EgressAllowlist holding the entry {domains: [evil.example.org], ports: [{port: 80, protocol: TCP}]}")
            && !why.contains("0.0.0.0"),
        "{why}"
    );
    // DNS to a resolver outside the cluster: an allowlist never isolates it (as the
    // datapath decides), once `check` knows the resolver as the agent does.
    let dns = "pay/card-0 203.0.113.53 53/udp\npay/card-0 203.0.113.53 443/tcp\n";
    let verdicts = |args: &[&str]| -> Vec<String> {
        let (code, out, err) = check_with(PAYMENTS, args, dns);
        assert_eq!(code, Some(0), "{err}");
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["verdict"].to_string())
            .collect()
    };
    assert_eq!(verdicts(&["-o", "json"]), ["\"denied\"", "\"denied\""]);
    assert_eq!(
        verdicts(&["-o", "json", "--dns-server", "203.0.113.53"]),
        ["\"allowed\"", "\"denied\""]
    );
    // Not a name at all.
    let (code, _, err) = check_with(PAYMENTS, &["-o", "json"], "pay/card-0 not_a*name 443/tcp\n");
    assert_ne!(code, Some(0));
    assert!(err.contains("DNS name"), "{err}");
    // A mistyped address is no name either.
    let (code, _, err) = check_with(PAYMENTS, &["-o", "json"], "pay/card-0 999.1.1.1 443/tcp\n");
    assert_eq!(code, Some(2));
    // A name only ever as DST.
    let (code, _, named) = check_with(
        PAYMENTS,
        &["-o", "json"],
        "api.stripe.com pay/card-0 443/tcp\n",
    );
    assert_eq!(code, Some(2), "{named}");
    assert!(named.contains("a DNS name only as DST"), "{named}");
    assert!(err.contains("999.1.1.1"), "{err}");
}

const HOST_NETWORK: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.250.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: y}
---
apiVersion: v1
kind: Pod
metadata: {name: hn, namespace: x, labels: {app: hn}}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.250.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.77.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: r, namespace: y, labels: {app: r}}
spec: {nodeName: n2, containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.78.0.5}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: hn-deny, namespace: x}
spec: {podSelector: {matchLabels: {app: hn}}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: y}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: y}
spec: {clusterIP: 10.96.0.2, clusterIPs: [10.96.0.2], selector: {app: b}, ports: [{port: 80, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: r, namespace: y}
spec: {clusterIP: 10.96.0.5, clusterIPs: [10.96.0.5], selector: {app: r}, ports: [{port: 80, targetPort: 9090}]}
"#;

/// A host-network pod can be checked like any pod (its addresses are its node's, even
/// without a Node object), and it is decided as the datapath decides it: a policy that
/// selects it applies to other nodes and the outside, not to the pods of its own node, for
/// which it is the node.
#[test]
fn check_decides_host_network_pods_as_the_node_they_share() {
    let r = check_yaml(
        HOST_NETWORK,
        "x/hn y/b 9090/tcp
y/b x/hn 7070/tcp
10.250.0.1 y/b 9090/tcp
y/r x/hn 7070/tcp
x/hn y/r 9090/tcp
203.0.113.5 x/hn 7070/tcp
",
    );
    let verdicts: Vec<&str> = r.iter().map(|f| f["verdict"].as_str().unwrap()).collect();
    assert_eq!(
        verdicts,
        [
            "allowed", "allowed", "allowed", "denied", "denied", "denied"
        ],
        "{r:#?}"
    );
    assert_eq!(
        r[3]["ingress"], "denied",
        "another node's pod, at hn's ingress"
    );
    assert_eq!(
        r[4]["egress"], "denied",
        "hn to another node's pod, at hn's egress"
    );
    // Rules take a host-network peer by its node's address (an ipBlock), never by labels.
    let fix = r[4]["explanations"][1]["fix"]["rule"].as_str().unwrap();
    assert_eq!(r[4]["explanations"][1]["pod"], "y/r");
    assert_eq!(
        fix, "{from: [{ipBlock: {cidr: 10.250.0.1/32}}], ports: [{protocol: TCP, port: 9090}]}",
        "{r:#?}"
    );
    // Through a Service, as directly: its backend on the node is the node's traffic for
    // the host-network pod, the one on another node is decided by its egress.
    let through = check_yaml(
        HOST_NETWORK,
        "x/hn 10.96.0.2 80/tcp\nx/hn 10.96.0.5 80/tcp\n",
    );
    let verdicts: Vec<&str> = through
        .iter()
        .map(|f| f["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["allowed", "denied"], "{through:#?}");
    // A Service whose slice names the host-network pod at its node's address: that pod is
    // the backend, its ingress decides. Named at another address, it is not.
    let slice = |address: &str| {
        format!(
            "{HOST_NETWORK}---\napiVersion: v1\nkind: Service\nmetadata: {{name: hns, namespace: x}}\nspec: {{clusterIP: 10.96.0.9, ports: [{{port: 80, targetPort: 7070}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: hns-1, namespace: x, labels: {{kubernetes.io/service-name: hns}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{address}], targetRef: {{kind: Pod, name: hn}}}}]\nports: [{{port: 7070, protocol: TCP}}]\n"
        )
    };
    let r = check_yaml(&slice("10.250.0.1"), "y/r 10.96.0.9 80/tcp\n");
    assert_eq!(r[0]["ingress"], "denied", "{:?}", r[0]);
    assert_eq!(r[0]["ingress_policies"], serde_json::json!(["x/hn-deny"]));
    let r = check_yaml(&slice("10.250.0.9"), "y/r 10.96.0.9 80/tcp\n");
    assert_eq!(
        r[0]["ingress"], "allowed",
        "no pod holds 10.250.0.9: {:?}",
        r[0]
    );
    // Toward it from another node, rules take it by its node's address, through its
    // Service as directly: a podSelector naming its labels allows neither.
    let by_labels = slice("10.250.0.1")
        + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: r-to-hn, namespace: y}\nspec:\n  podSelector: {matchLabels: {app: r}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: hn}}}]}]\n";
    let r = check_yaml(&by_labels, "y/r x/hn 7070/tcp\ny/r 10.96.0.9 80/tcp\n");
    assert_eq!(r[0]["egress"], "denied", "{:?}", r[0]);
    assert_eq!(r[1]["egress"], "denied", "{:?}", r[1]);
    // Without its Node object, the pod has no address to check from: said so.
    let no_node = HOST_NETWORK.replacen("kind: Node\n", "kind: ConfigMap\n", 1);
    let (code, _, err) = check_with(&no_node, &["-o", "json"], "x/hn y/b 9090/tcp\n");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("host-network pod") && err.contains("Node n1"),
        "{err}"
    );
}

/// A cluster where the first denied pair of a flow does not stand for the rest: a named
/// port with another number on each pod of the workload, a Service whose backends carry
/// different labels, a peer a label would put under another policy, a workload whose pods
/// share no label, a CronJob's pod labelled per run.
const EXPLAINED: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-h1-a
  namespace: a
  labels: {app: web, pod-template-hash: h1}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-h1, controller: true, uid: r1}]
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}
status: {podIPs: [{ip: 10.1.0.1}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-h1-b
  namespace: a
  labels: {app: web, pod-template-hash: h1}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-h1, controller: true, uid: r1}]
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8081}]}]}
status: {podIPs: [{ip: 10.1.0.2}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: a}
spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-v1, namespace: a, labels: {app: api}}
status: {podIPs: [{ip: 10.1.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-canary, namespace: a, labels: {app: api-canary}}
status: {podIPs: [{ip: 10.1.0.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: a}
spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: a, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.10]}, {addresses: [10.1.0.11]}]
ports: [{name: "", port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: a, labels: {app: db}}
status: {podIPs: [{ip: 10.1.0.20}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-in, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db-client}}}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: b, labels: {app: client}}
status: {podIPs: [{ip: 10.1.1.5}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: b}
spec:
  podSelector: {matchLabels: {app: client}}
  egress: [{to: [{ipBlock: {cidr: 203.0.113.0/24}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-clients-out, namespace: b}
spec:
  podSelector: {matchLabels: {role: db-client}}
  egress: [{to: [{ipBlock: {cidr: 8.8.8.8/32}}]}]
---
apiVersion: v1
kind: Pod
metadata:
  name: backup-28934520-xk2pq
  namespace: a
  labels: {job-name: backup-28934520, batch.kubernetes.io/job-name: backup-28934520, controller-uid: u1}
  ownerReferences: [{apiVersion: batch/v1, kind: Job, name: backup-28934520, controller: true, uid: j1}]
status: {podIPs: [{ip: 10.1.0.30}]}
"#;

/// Every change `check` lists for a denied flow, applied, allows it, and leaves what was
/// allowed allowed: an added rule is applied as a policy of its own selecting the same pods
/// (policies add up), labels by adding them to the pods.
#[test]
fn applying_every_change_an_explanation_lists_allows_the_flow() {
    let flows = "\
b/client a/web http/tcp
b/client 10.96.0.10 80/tcp
b/client a/db-0 5432/tcp
a/backup-28934520-xk2pq a/web-h1-a 8080/tcp
b/client 203.0.113.9 443/tcp
";
    let r = check_yaml(EXPLAINED, flows);
    let fixes: Vec<serde_json::Value> = r
        .iter()
        .flat_map(|f| f["explanations"].as_array().cloned().unwrap_or_default())
        .map(|e| e["fix"].clone())
        .collect();
    let fix_of = |i: usize, policy: &str| -> serde_json::Value {
        assert_eq!(r[i]["verdict"], "denied", "{}", r[i]);
        let all = r[i]["explanations"].as_array().unwrap();
        let mine: Vec<_> = all
            .iter()
            .filter(|e| e["fix"]["policy"] == policy)
            .collect();
        assert_eq!(mine.len(), 1, "{policy}: {all:?}");
        mine[0]["fix"].clone()
    };
    // A named port: the rule names it, as 8080 would leave the pod where it is 8081 denied.
    assert_eq!(
        fix_of(0, "a/web-in")["rule"],
        "{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: b}}, podSelector: {matchLabels: {app: client}}}], ports: [{protocol: TCP, port: http}]}"
    );
    // A Service: one rule taking in both backends, not the first one's labels alone.
    assert_eq!(
        fix_of(1, "b/client-out")["rule"],
        "{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: a}}, podSelector: {matchLabels: {app: api}}}, {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: a}}, podSelector: {matchLabels: {app: api-canary}}}], ports: [{protocol: TCP, port: 8080}]}"
    );
    // role=db-client would make db-clients-out select the client and deny it at its egress:
    // a rule instead of the label.
    assert_eq!(fix_of(2, "a/db-in")["kind"], "rule");
    // A CronJob's pod: its per-run labels are no selector; its pods share no other label,
    // so one to add first.
    let backup = fix_of(3, "a/web-in");
    assert!(!backup["rule"].to_string().contains("job-name"), "{backup}");
    assert_eq!(
        backup["label_first"],
        serde_json::json!({"workload": "a/backup", "labels": {"app.kubernetes.io/name": "backup"}})
    );
    let text = r[3]["explanation"].as_str().unwrap();
    assert!(
        text.contains("add the label app.kubernetes.io/name=backup to a/backup"),
        "{text}"
    );

    // Applied: each rule as a policy of its own beside the one it names, the labels on the
    // pods.
    let selector_of = |policy: &str| match policy {
        "a/web-in" => "{app: web}",
        "a/db-in" => "{app: db}",
        "b/client-out" => "{app: client}",
        other => panic!("a fix for {other}"),
    };
    let mut fixed = EXPLAINED.to_string();
    for (n, fix) in fixes.iter().enumerate() {
        assert_eq!(fix["kind"], "rule", "{fix}");
        let (ns, _) = fix["policy"].as_str().unwrap().split_once('/').unwrap();
        let (key, kind) = match fix["direction"].as_str().unwrap() {
            "ingress" => ("ingress", "Ingress"),
            _ => ("egress", "Egress"),
        };
        fixed.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: fix-{n}, namespace: {ns}}}\nspec: {{podSelector: {{matchLabels: {}}}, policyTypes: [{kind}], {key}: [{}]}}\n",
            selector_of(fix["policy"].as_str().unwrap()),
            fix["rule"].as_str().unwrap()
        ));
    }
    let fixed = fixed.replace(
        "labels: {job-name: backup-28934520,",
        "labels: {app.kubernetes.io/name: backup, job-name: backup-28934520,",
    );
    let after = check_yaml(&fixed, flows);
    for (i, line) in flows.lines().enumerate() {
        assert_eq!(after[i]["verdict"], "allowed", "{line}: {}", after[i]);
    }
}
