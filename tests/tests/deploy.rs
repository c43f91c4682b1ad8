//! `deploy/` checked offline: no cluster, no kernel, no root.
//!
//! - Every manifest `kustomization.yaml` lists exists and deserializes into its
//!   Kubernetes type with no field the type does not know (the offline stand-in for the API
//!   server's strict field validation); the Prometheus Operator objects select the agent.
//! - The DaemonSet runs unprivileged with exactly the capabilities `deploy/README.md`
//!   lists, the probes, host paths, resources and arguments it needs.
//! - The agent's RBAC is exactly read access and Events: a new verb fails the test.
//! - The CRDs are structural and their schemas accept and reject example objects.
//! - promtool checks the alerts and runs their unit tests; every alert fires in a test and
//!   stays silent in another.
//! - The dashboard's queries parse (promtool) and use only metrics the agent exports.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, PodSpec, ResourceQuota, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize as _, de::DeserializeOwned};
use serde_json::{Value, json};

const NAMESPACE: &str = "tollgate-system";

/// Metrics the agent exports today (dashboards may use only these).
const METRICS_TODAY: &[&str] = &[
    "tollgate_packets_total",
    "tollgate_bytes_total",
    "tollgate_flow_packets_total",
    "tollgate_workload_mode",
    "tollgate_workload_isolated",
    "tollgate_workload_last_would_drop_timestamp_seconds",
    "tollgate_workload_observed_since_timestamp_seconds",
    "tollgate_flow_log_events_total",
    "tollgate_policy_errors_total",
    "tollgate_policy_sync_seconds_bucket",
    "tollgate_policy_sync_seconds_sum",
    "tollgate_policy_sync_seconds_count",
    "tollgate_map_entries",
    "tollgate_map_capacity",
    "tollgate_workload_degraded",
    "tollgate_spoofed_packets_total",
    "tollgate_source_degraded",
    "tollgate_workloads",
    "tollgate_build_info",
];

/// Metrics the agent is about to export (alerts may use these too).
const METRICS_NEW: &[&str] = &[
    "tollgate_ready",
    "tollgate_node_override",
    "tollgate_kube_events_total",
];

/// Metrics whose `namespace` label names the workload: dashboard queries on them filter by
/// the `namespace` variable.
const METRICS_BY_NAMESPACE: &[&str] = &[
    "tollgate_packets_total",
    "tollgate_bytes_total",
    "tollgate_workload_mode",
    "tollgate_workload_isolated",
    "tollgate_workload_last_would_drop_timestamp_seconds",
    "tollgate_workload_observed_since_timestamp_seconds",
    "tollgate_workload_degraded",
    "tollgate_spoofed_packets_total",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The dashboard's queries as plain PromQL (variables replaced), from the shared helper the
/// Prometheus end-to-end test uses too.
fn dashboard_queries() -> Vec<String> {
    tollgate_tests::deploy::dashboard_queries(&repo_root())
}

/// Every document of a YAML file, as JSON values (empty documents skipped).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_document(path: &Path) -> Value {
    let mut docs = yaml_documents(path);
    assert_eq!(docs.len(), 1, "{}: one YAML document", path.display());
    docs.remove(0)
}

/// One object of the install and the file it came from.
struct Manifest {
    file: String,
    doc: Value,
}

impl Manifest {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }
    fn api_version(&self) -> &str {
        self.doc["apiVersion"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// The files `deploy/kustomization.yaml` lists under `resources:`.
fn kustomization_resources() -> Vec<String> {
    let k = yaml_document(&deploy_dir().join("kustomization.yaml"));
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    k["resources"]
        .as_array()
        .expect("kustomization.yaml has resources:")
        .iter()
        .map(|r| r.as_str().expect("a resource is a path").to_string())
        .collect()
}

/// Every object `kubectl apply -k deploy/` creates.
fn manifests() -> Vec<Manifest> {
    let mut out = Vec::new();
    for file in kustomization_resources() {
        let path = deploy_dir().join(&file);
        assert!(
            path.is_file(),
            "kustomization.yaml lists {file}, which does not exist"
        );
        for doc in yaml_documents(&path) {
            out.push(Manifest {
                file: file.clone(),
                doc,
            });
        }
    }
    out
}

/// Deserializes `value` into `T`, failing with every path `T` does not know.
fn strict<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    let mut ignored = Vec::new();
    // serde_ignored writes `?` for each Option on the way: left out, the path reads as YAML.
    let t: T = serde_ignored::deserialize(value.clone(), |path| {
        ignored.push(path.to_string().replace(".?", "").replace("?.", ""))
    })
    .map_err(|e| e.to_string())?;
    if ignored.is_empty() {
        Ok(t)
    } else {
        Err(format!("unknown fields: {}", ignored.join(", ")))
    }
}

/// The one object of `kind` named `name` in the install, as its Kubernetes type.
fn object<T: DeserializeOwned>(kind: &str, name: &str) -> T {
    let all = manifests();
    let found: Vec<&Manifest> = all
        .iter()
        .filter(|m| m.kind() == kind && m.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name} in the install");
    strict(&found[0].doc).unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
}

fn daemonset() -> DaemonSet {
    object("DaemonSet", "tollgate")
}

fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("the DaemonSet has a pod template")
}

fn agent_container(ds: &DaemonSet) -> Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one container");
    assert!(
        spec.init_containers.is_none(),
        "no init containers (each would need its own review)"
    );
    spec.containers[0].clone()
}

fn pod_labels(ds: &DaemonSet) -> BTreeMap<String, String> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .expect("the pod template has labels")
}

#[test]
fn every_listed_manifest_parses_into_its_kubernetes_type_with_no_unknown_field() {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for m in manifests() {
        let result = match (m.api_version(), m.kind()) {
            ("v1", "Namespace") => strict::<Namespace>(&m.doc).map(drop),
            ("v1", "ServiceAccount") => strict::<ServiceAccount>(&m.doc).map(drop),
            ("v1", "ResourceQuota") => strict::<ResourceQuota>(&m.doc).map(drop),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                strict::<ClusterRole>(&m.doc).map(drop)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                strict::<ClusterRoleBinding>(&m.doc).map(drop)
            }
            ("apps/v1", "DaemonSet") => strict::<DaemonSet>(&m.doc).map(drop),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                strict::<CustomResourceDefinition>(&m.doc).map(drop)
            }
            // Not in k8s-openapi: checked in monitoring_objects_select_the_agent_pods.
            ("monitoring.coreos.com/v1", "PodMonitor" | "PrometheusRule") => Ok(()),
            (api, kind) => Err(format!("unexpected {api} {kind}")),
        };
        if let Err(e) = result {
            errors.push(format!("{}: {} {}: {e}", m.file, m.kind(), m.name()));
        }
        let namespaced = !matches!(
            m.kind(),
            "Namespace" | "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
        );
        let ns = m.doc["metadata"]["namespace"].as_str();
        if namespaced && ns != Some(NAMESPACE) {
            errors.push(format!(
                "{}: {} {} is in namespace {ns:?}, not {NAMESPACE}",
                m.file,
                m.kind(),
                m.name()
            ));
        }
        if !namespaced && ns.is_some() {
            errors.push(format!(
                "{}: cluster-scoped {} {} has a namespace",
                m.file,
                m.kind(),
                m.name()
            ));
        }
        if !seen.insert((m.kind().to_string(), m.name().to_string())) {
            errors.push(format!("{}: {} {} twice", m.file, m.kind(), m.name()));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    let expected: BTreeSet<(String, String)> = [
        ("Namespace", NAMESPACE),
        ("ResourceQuota", "tollgate-critical-pods"),
        ("CustomResourceDefinition", "modeoverrides.tollgate.io"),
        ("CustomResourceDefinition", "egressallowlists.tollgate.io"),
        ("ServiceAccount", "tollgate"),
        ("ClusterRole", "tollgate-agent"),
        ("ClusterRoleBinding", "tollgate-agent"),
        ("ClusterRole", "tollgate-mode-admin"),
        ("ClusterRoleBinding", "tollgate-mode-admin"),
        ("DaemonSet", "tollgate"),
        ("PodMonitor", "tollgate"),
        ("PrometheusRule", "tollgate"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(seen, expected, "the objects of the install");
}

#[test]
fn every_manifest_file_under_deploy_is_in_the_kustomization() {
    // A manifest written but not listed would silently not be installed.
    let listed: BTreeSet<String> = kustomization_resources().into_iter().collect();
    let not_manifests = [
        "kustomization.yaml",
        "prometheus/alerts.yaml",
        "prometheus/alerts_test.yaml",
    ];
    let mut files = Vec::new();
    let mut dirs = vec![deploy_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read deploy/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let rel = path.strip_prefix(deploy_dir()).expect("under deploy/");
                files.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let missing: Vec<&String> = files
        .iter()
        .filter(|f| !listed.contains(*f) && !not_manifests.contains(&f.as_str()))
        .collect();
    assert!(missing.is_empty(), "not in kustomization.yaml: {missing:?}");
}

#[test]
fn strict_deserialization_reports_unknown_fields() {
    // The check above is only as good as this: a misspelt field must be reported.
    let mut doc = manifests()
        .into_iter()
        .find(|m| m.kind() == "DaemonSet")
        .expect("a DaemonSet")
        .doc;
    doc["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = json!({});
    doc["spec"]["updateStrategy"]["rollingUpdate"]["maxSurges"] = json!(0);
    let err = strict::<DaemonSet>(&doc).expect_err("unknown fields are reported");
    assert!(
        err.contains("spec.template.spec.containers.0.securityContxt")
            && err.contains("spec.updateStrategy.rollingUpdate.maxSurges"),
        "{err}"
    );
    // And a wrong type is an error of its own.
    let mut doc = doc.clone();
    doc["spec"]["template"]["spec"]["hostNetwork"] = json!("yes");
    assert!(strict::<DaemonSet>(&doc).is_err());
}

/// The capabilities `deploy/README.md` documents: the first column of the table under
/// "| capability | why |".
fn documented_capabilities() -> BTreeSet<String> {
    let readme = read(&deploy_dir().join("README.md"));
    let mut lines = readme
        .lines()
        .skip_while(|l| !l.replace(' ', "").starts_with("|capability|why|"))
        .skip(2);
    let mut caps = BTreeSet::new();
    for line in lines.by_ref().take_while(|l| l.starts_with('|')) {
        let cell = line.split('|').nth(1).expect("a table row").trim();
        let cap = cell.trim_matches('`').to_string();
        assert!(
            !cap.is_empty() && cap.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "README capability row {line:?}"
        );
        caps.insert(cap);
    }
    assert!(!caps.is_empty(), "deploy/README.md lists the capabilities");
    caps
}

#[test]
fn daemonset_runs_unprivileged_with_exactly_the_documented_capabilities() {
    let ds = daemonset();
    let c = agent_container(&ds);
    let sc = c.security_context.clone().expect("a securityContext");
    assert_ne!(sc.privileged, Some(true), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_user, Some(0));
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "drops ALL");
    let added: BTreeSet<String> = caps.add.clone().unwrap_or_default().into_iter().collect();
    assert_eq!(
        added,
        documented_capabilities(),
        "capabilities added by the DaemonSet vs deploy/README.md"
    );
    assert_eq!(
        added,
        ["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    );
    for cap in ["SYS_ADMIN", "CAP_SYS_ADMIN", "ALL"] {
        assert!(!added.contains(cap), "{cap} must not be added");
    }
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("Unconfined")
    );

    let spec = pod_spec(&ds);
    let psc = spec.security_context.clone().unwrap_or_default();
    assert_ne!(psc.run_as_non_root, Some(true));
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_ne!(spec.host_pid, Some(true), "no host PID namespace");
    assert_ne!(spec.host_ipc, Some(true), "no host IPC namespace");
    assert_eq!(spec.service_account_name.as_deref(), Some("tollgate"));
    assert_eq!(spec.automount_service_account_token, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    let tolerations = spec.tolerations.clone().expect("tolerations");
    assert_eq!(tolerations.len(), 1, "{tolerations:?}");
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
    assert!(
        tolerations[0].key.is_none() && tolerations[0].effect.is_none(),
        "tolerates every taint: {tolerations:?}"
    );
}

#[test]
fn daemonset_probes_env_ports_resources_and_update_strategy() {
    let ds = daemonset();
    let c = agent_container(&ds);
    assert_eq!(c.image.as_deref(), Some("ghcr.io/tollgate/tollgate:0.1.0"));

    let probe_get = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .expect("an httpGet probe");
        (get.path.unwrap_or_default(), get.port)
    };
    assert_eq!(
        probe_get(&c.liveness_probe),
        ("/healthz".to_string(), IntOrString::Int(9402))
    );
    assert_eq!(
        probe_get(&c.readiness_probe),
        ("/readyz".to_string(), IntOrString::Int(9402))
    );

    let ports = c.ports.clone().expect("ports");
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 9402),
        "container port 9402 named metrics: {ports:?}"
    );

    let env = c.env.clone().expect("env");
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "NODE_NAME from the downward API"
    );

    let resources = c.resources.clone().expect("resources");
    let requests = resources.requests.expect("requests");
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("50m"));
    assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("64Mi"));
    let limits = resources.limits.expect("limits");
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("200Mi"));
    assert!(!limits.contains_key("cpu"), "no CPU limit");

    let annotations = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .expect("pod annotations");
    for (k, v) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "9402"),
        ("prometheus.io/path", "/metrics"),
    ] {
        assert_eq!(annotations.get(k).map(String::as_str), Some(v), "{k}");
    }

    let spec = ds.spec.as_ref().expect("spec");
    let strategy = spec.update_strategy.clone().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));

    let selector = spec.selector.match_labels.clone().expect("matchLabels");
    let labels = pod_labels(&ds);
    for (k, v) in &selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the selector matches the pod labels"
        );
    }
}

/// The value of `--flag` in the container's args.
fn flag(args: &[String], flag: &str) -> String {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("args have {flag}: {args:?}"));
    args.get(i + 1)
        .unwrap_or_else(|| panic!("{flag} has a value"))
        .clone()
}

#[test]
fn daemonset_host_paths_match_the_agent_flags() {
    let ds = daemonset();
    let c = agent_container(&ds);
    let spec = pod_spec(&ds);

    // volume name -> (host path, type)
    let volumes: BTreeMap<String, (String, String)> = spec
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|v| {
            let hp = v
                .host_path
                .unwrap_or_else(|| panic!("volume {} is a hostPath", v.name));
            (v.name, (hp.path, hp.type_.unwrap_or_default()))
        })
        .collect();
    // host path -> (mount path, read-only, propagation, type)
    let mounts: BTreeMap<String, (String, bool, String, String)> = c
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let (host, type_) = volumes
                .get(&m.name)
                .unwrap_or_else(|| panic!("mount of unknown volume {}", m.name))
                .clone();
            (
                host,
                (
                    m.mount_path,
                    m.read_only.unwrap_or(false),
                    m.mount_propagation.unwrap_or_default(),
                    type_,
                ),
            )
        })
        .collect();
    let hosts: Vec<&str> = mounts.keys().map(String::as_str).collect();
    assert_eq!(
        hosts,
        [
            "/run/tollgate",
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/var/lib/tollgate"
        ],
        "the host paths the agent sees, and no others"
    );
    let m = |host: &str| mounts[host].clone();
    assert_eq!(m("/sys/fs/bpf").0, "/sys/fs/bpf");
    assert!(!m("/sys/fs/bpf").1, "bpffs is writable (pins)");
    assert_eq!(m("/sys/fs/bpf").3, "Directory");
    assert_ne!(
        m("/sys/fs/bpf").2,
        "Bidirectional",
        "Bidirectional propagation needs a privileged container"
    );
    assert_eq!(m("/sys/fs/cgroup").0, "/sys/fs/cgroup");
    assert!(m("/sys/fs/cgroup").1, "the cgroup hierarchy is read-only");
    assert_eq!(m("/run/tollgate").0, "/run/tollgate");
    assert_eq!(m("/run/tollgate").3, "DirectoryOrCreate");
    assert_eq!(m("/var/lib/tollgate").0, "/var/lib/tollgate");
    assert_eq!(m("/var/lib/tollgate").3, "DirectoryOrCreate");

    let args = c.args.clone().expect("args");
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.iter().any(|a| a == "--kubernetes"), "{args:?}");
    assert_eq!(flag(&args, "--metrics-addr"), "0.0.0.0:9402");
    assert!(flag(&args, "--bpffs").starts_with(&format!("{}/", m("/sys/fs/bpf").0)));
    assert_eq!(flag(&args, "--state-dir"), m("/var/lib/tollgate").0);
    assert!(flag(&args, "--admin-socket").starts_with(&format!("{}/", m("/run/tollgate").0)));
    assert_eq!(flag(&args, "--cgroup-root"), m("/sys/fs/cgroup").0);
}

/// (API group, resource, verb) triples a rule set grants; fails on what a triple cannot
/// express (resource names, non-resource URLs, wildcards).
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        assert!(rule.resource_names.is_none(), "{rule:?}");
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "no wildcards: {rule:?}"
                    );
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

fn triples(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for g in groups {
        for r in resources {
            for v in verbs {
                out.push((g.to_string(), r.to_string(), v.to_string()));
            }
        }
    }
    out
}

#[test]
fn agent_rbac_is_exactly_read_access_and_events() {
    let role: ClusterRole = object("ClusterRole", "tollgate-agent");
    assert!(role.aggregation_rule.is_none());
    let read = ["get", "list", "watch"];
    let expected: BTreeSet<_> = [
        triples(&[""], &["pods", "namespaces", "services", "nodes"], &read),
        triples(&["discovery.k8s.io"], &["endpointslices"], &read),
        triples(&["networking.k8s.io"], &["networkpolicies"], &read),
        triples(
            &["tollgate.io"],
            &["modeoverrides", "egressallowlists"],
            &read,
        ),
        triples(&[""], &["events"], &["create", "patch"]),
    ]
    .concat()
    .into_iter()
    .collect();
    let got = grants(&role.rules.clone().unwrap_or_default());
    let extra: Vec<_> = got.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&got).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "tollgate-agent grants more than it should: {extra:?}; lacks: {missing:?}"
    );

    let binding: ClusterRoleBinding = object("ClusterRoleBinding", "tollgate-agent");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "tollgate-agent");
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "tollgate");
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));

    let sa: ServiceAccount = object("ServiceAccount", "tollgate");
    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        pod_spec(&daemonset()).service_account_name.as_deref(),
        Some("tollgate")
    );
}

/// A pod of a critical priority class outside kube-system is admitted only where a
/// ResourceQuota names the class (GKE; any cluster limiting critical classes): the install
/// carries one for the agent's class, with room for one agent per node.
#[test]
fn a_resource_quota_admits_the_agents_priority_class() {
    let class = pod_spec(&daemonset())
        .priority_class_name
        .expect("the agent has a priority class");
    let quota: ResourceQuota = object("ResourceQuota", "tollgate-critical-pods");
    assert_eq!(quota.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = quota.spec.expect("spec");
    let scopes = spec
        .scope_selector
        .and_then(|s| s.match_expressions)
        .unwrap_or_default();
    assert!(
        scopes.iter().any(|e| e.scope_name == "PriorityClass"
            && e.operator == "In"
            && e.values.as_ref().is_some_and(|v| v.contains(&class))),
        "{scopes:?} does not name {class}"
    );
    let pods = &spec.hard.expect("hard")["pods"].0;
    assert_eq!(pods, "10k", "one agent per node, up to 10,000 nodes");
}

#[test]
fn mode_admin_example_rbac_is_exact() {
    let role: ClusterRole = object("ClusterRole", "tollgate-mode-admin");
    let expected: BTreeSet<_> = [
        triples(
            &["tollgate.io"],
            &["modeoverrides"],
            &[
                "get", "list", "watch", "create", "update", "patch", "delete",
            ],
        ),
        triples(&[""], &["events"], &["create"]),
    ]
    .concat()
    .into_iter()
    .collect();
    assert_eq!(grants(&role.rules.clone().unwrap_or_default()), expected);
    let binding: ClusterRoleBinding = object("ClusterRoleBinding", "tollgate-mode-admin");
    assert_eq!(binding.role_ref.name, "tollgate-mode-admin");
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str()),
        ("Group", "security-team")
    );
}

#[test]
fn monitoring_objects_select_the_agent_pods() {
    let ds = daemonset();
    let labels = pod_labels(&ds);
    let all = manifests();
    let find = |kind: &str| {
        all.iter()
            .find(|m| m.kind() == kind)
            .unwrap_or_else(|| panic!("a {kind}"))
    };

    let pm = find("PodMonitor");
    assert_eq!(pm.api_version(), "monitoring.coreos.com/v1");
    let spec = &pm.doc["spec"];
    let match_labels = spec["selector"]["matchLabels"]
        .as_object()
        .expect("selector.matchLabels");
    assert!(!match_labels.is_empty());
    for (k, v) in match_labels {
        assert_eq!(
            labels.get(k).map(String::as_str),
            v.as_str(),
            "PodMonitor selector {k} matches the agent pods"
        );
    }
    assert!(spec["selector"]["matchExpressions"].is_null());
    assert_eq!(spec["namespaceSelector"]["matchNames"], json!([NAMESPACE]));
    let endpoints = spec["podMetricsEndpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let ep = &endpoints[0];
    assert_eq!(ep["port"], "metrics");
    assert_eq!(ep["interval"], "15s");
    assert_eq!(ep["path"], "/metrics");
    assert_eq!(
        ep["honorLabels"], true,
        "the agent's namespace/pod labels name workloads"
    );
    let port_names: Vec<String> = agent_container(&ds)
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.name)
        .collect();
    assert!(port_names.iter().any(|n| n == "metrics"));

    let rule = find("PrometheusRule");
    assert_eq!(rule.api_version(), "monitoring.coreos.com/v1");
    let alerts = yaml_document(&deploy_dir().join("prometheus/alerts.yaml"));
    assert_eq!(
        rule.doc["spec"]["groups"], alerts["groups"],
        "prometheusrule.yaml holds exactly the groups of alerts.yaml"
    );
    let spec_keys: Vec<&String> = rule.doc["spec"].as_object().expect("spec").keys().collect();
    assert_eq!(spec_keys, ["groups"]);
}

// ---- CRDs ------------------------------------------------------------------------------

fn crd(name: &str) -> CustomResourceDefinition {
    object("CustomResourceDefinition", name)
}

fn root_schema(crd: &CustomResourceDefinition) -> JSONSchemaProps {
    assert_eq!(crd.spec.versions.len(), 1);
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.served && v.storage);
    v.schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.clone())
        .expect("openAPIV3Schema")
}

fn sub<'a>(s: &'a JSONSchemaProps, field: &str) -> &'a JSONSchemaProps {
    s.properties
        .as_ref()
        .and_then(|p| p.get(field))
        .unwrap_or_else(|| panic!("schema has {field}"))
}

/// Structural schema rules (what the API server enforces for apiextensions/v1): every node
/// has a type, except int-or-string (whose anyOf holds only types) and preserved fields; no
/// object is both properties and additionalProperties; metadata is only `type: object`.
fn structural_errors(s: &JSONSchemaProps, path: &str, errors: &mut Vec<String>) {
    let int_or_string = s.x_kubernetes_int_or_string == Some(true);
    if s.type_.is_none() && !int_or_string && s.x_kubernetes_preserve_unknown_fields != Some(true) {
        errors.push(format!("{path}: no type"));
    }
    if let Some(any_of) = &s.any_of {
        if !int_or_string {
            errors.push(format!("{path}: anyOf outside int-or-string"));
        }
        for (i, a) in any_of.iter().enumerate() {
            if a.type_.is_none() || a.properties.is_some() || a.items.is_some() {
                errors.push(format!("{path}.anyOf[{i}]: only a type"));
            }
        }
    }
    if s.properties.is_some() && s.additional_properties.is_some() {
        errors.push(format!("{path}: properties and additionalProperties"));
    }
    for (name, p) in s.properties.iter().flatten() {
        structural_errors(p, &format!("{path}.{name}"), errors);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = &s.additional_properties {
        structural_errors(a, &format!("{path}.*"), errors);
    }
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(i)) => {
            structural_errors(i, &format!("{path}[]"), errors)
        }
        Some(JSONSchemaPropsOrArray::Schemas(_)) => {
            errors.push(format!("{path}: items must be one schema"))
        }
        None => {}
    }
    if s.type_.as_deref() == Some("array") && s.items.is_none() {
        errors.push(format!("{path}: array without items"));
    }
}

/// Whether a printer column's path (`.spec.a`, `.spec.a[*].b[*]`) names a field of the
/// schema (paths into metadata are always fine).
fn path_in_schema(schema: &JSONSchemaProps, json_path: &str) -> bool {
    if json_path.starts_with(".metadata.") {
        return true;
    }
    let mut s = schema;
    for part in json_path.trim_start_matches('.').split('.') {
        let (field, arrays) = match part.split_once('[') {
            Some((f, rest)) => (f, rest.matches("[*]").count() + 1),
            None => (part, 0),
        };
        let Some(next) = s.properties.as_ref().and_then(|p| p.get(field)) else {
            return false;
        };
        s = next;
        for _ in 0..arrays {
            match &s.items {
                Some(JSONSchemaPropsOrArray::Schema(i)) => s = i,
                _ => return false,
            }
        }
    }
    true
}

fn check_crd_shape(name: &str, kind: &str, plural: &str, scope: &str, columns: &[&str]) {
    let crd = crd(name);
    assert_eq!(crd.spec.group, "tollgate.io");
    assert_eq!(crd.spec.names.kind, kind);
    assert_eq!(crd.spec.names.plural, plural);
    assert_eq!(crd.spec.scope, scope);
    assert_eq!(name, format!("{plural}.tollgate.io"));
    let schema = root_schema(&crd);
    let mut errors = Vec::new();
    structural_errors(&schema, "", &mut errors);
    let metadata = sub(&schema, "metadata");
    if metadata.type_.as_deref() != Some("object") || metadata.properties.is_some() {
        errors.push(".metadata: only type: object".into());
    }
    assert!(errors.is_empty(), "{name}: {}", errors.join("; "));

    let cols = crd.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default();
    let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, columns, "{name} printer columns");
    for c in &cols {
        assert!(
            path_in_schema(&schema, &c.json_path),
            "{name}: printer column {} has path {} outside the schema",
            c.name,
            c.json_path
        );
    }
    let age = cols
        .iter()
        .find(|c| c.name == "Age")
        .expect("an Age column");
    assert_eq!(
        (age.type_.as_str(), age.json_path.as_str()),
        ("date", ".metadata.creationTimestamp")
    );
}

#[test]
fn crds_are_structural_with_printer_columns() {
    check_crd_shape(
        "modeoverrides.tollgate.io",
        "ModeOverride",
        "modeoverrides",
        "Cluster",
        &["Target", "Mode", "Reason", "Age"],
    );
    check_crd_shape(
        "egressallowlists.tollgate.io",
        "EgressAllowlist",
        "egressallowlists",
        "Namespaced",
        &["Pod-Selector", "Domains", "Age"],
    );
    let mode = root_schema(&crd("modeoverrides.tollgate.io"));
    let spec = sub(&mode, "spec");
    assert_eq!(
        spec.required.clone().unwrap_or_default(),
        ["target", "mode"]
    );
    let fields: Vec<&String> = spec.properties.iter().flatten().map(|(k, _)| k).collect();
    assert_eq!(fields, ["mode", "reason", "target"]);
}

/// A small validator for the schema features the CRDs use: type, required, properties
/// (unknown fields are errors, as with strict field validation), additionalProperties,
/// items, enum, pattern, lengths, bounds, int-or-string. Returns every error.
fn validate(s: &JSONSchemaProps, v: &Value, path: &str, errors: &mut Vec<String>) {
    if s.x_kubernetes_int_or_string == Some(true) {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            errors.push(format!("{path}: not an integer or a string: {v}"));
        }
        return;
    }
    if let Some(values) = &s.enum_
        && !values.iter().any(|e| &e.0 == v)
    {
        errors.push(format!("{path}: {v} is not one of the enum"));
    }
    match s.type_.as_deref() {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                errors.push(format!("{path}: not an object: {v}"));
                return;
            };
            for r in s.required.iter().flatten() {
                if !obj.contains_key(r) {
                    errors.push(format!("{path}.{r}: required"));
                }
            }
            let open = s.properties.is_none() && s.additional_properties.is_none();
            for (k, val) in obj {
                let at = format!("{path}.{k}");
                match (
                    s.properties.as_ref().and_then(|p| p.get(k)),
                    &s.additional_properties,
                ) {
                    (Some(p), _) => validate(p, val, &at, errors),
                    (None, Some(JSONSchemaPropsOrBool::Schema(a))) => validate(a, val, &at, errors),
                    _ if open || s.x_kubernetes_preserve_unknown_fields == Some(true) => {}
                    _ => errors.push(format!("{at}: unknown field")),
                }
            }
        }
        Some("array") => {
            let Some(items) = v.as_array() else {
                errors.push(format!("{path}: not an array: {v}"));
                return;
            };
            if let Some(min) = s.min_items
                && (items.len() as i64) < min
            {
                errors.push(format!("{path}: fewer than {min} items"));
            }
            if let Some(JSONSchemaPropsOrArray::Schema(item)) = &s.items {
                for (i, it) in items.iter().enumerate() {
                    validate(item, it, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Some("string") => {
            let Some(text) = v.as_str() else {
                errors.push(format!("{path}: not a string: {v}"));
                return;
            };
            let len = text.chars().count() as i64;
            if s.max_length.is_some_and(|m| len > m) || s.min_length.is_some_and(|m| len < m) {
                errors.push(format!("{path}: length {len} out of bounds"));
            }
            if let Some(p) = &s.pattern {
                let re = regex::Regex::new(p).unwrap_or_else(|e| panic!("{path}: pattern: {e}"));
                if !re.is_match(text) {
                    errors.push(format!("{path}: {text:?} does not match {p}"));
                }
            }
        }
        Some("integer") => {
            let Some(n) = v.as_i64() else {
                errors.push(format!("{path}: not an integer: {v}"));
                return;
            };
            if s.minimum.is_some_and(|m| (n as f64) < m)
                || s.maximum.is_some_and(|m| (n as f64) > m)
            {
                errors.push(format!("{path}: {n} out of bounds"));
            }
        }
        Some("boolean") if !v.is_boolean() => errors.push(format!("{path}: not a boolean")),
        _ => {}
    }
}

fn check_examples(crd_name: &str, kind: &str, valid: &[Value], invalid: &[(Value, &str)]) {
    let schema = root_schema(&crd(crd_name));
    let object = |spec: &Value| {
        json!({
            "apiVersion": "tollgate.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": "example", "labels": {"team": "security"}},
            "spec": spec,
        })
    };
    for spec in valid {
        let mut errors = Vec::new();
        validate(&schema, &object(spec), "", &mut errors);
        assert!(errors.is_empty(), "{kind} {spec} rejected: {errors:?}");
    }
    for (spec, why) in invalid {
        let mut errors = Vec::new();
        validate(&schema, &object(spec), "", &mut errors);
        assert!(
            errors.iter().any(|e| e.contains(why)),
            "{kind} {spec} must be rejected ({why}); errors: {errors:?}"
        );
    }
    // An object without spec, too.
    let mut errors = Vec::new();
    validate(
        &schema,
        &json!({"apiVersion": "tollgate.io/v1alpha1", "kind": kind, "metadata": {"name": "x"}}),
        "",
        &mut errors,
    );
    assert_eq!(errors, [".spec: required"]);
}

#[test]
fn mode_override_schema_accepts_and_rejects_examples() {
    check_examples(
        "modeoverrides.tollgate.io",
        "ModeOverride",
        &[
            json!({"target": "bank/ledger", "mode": "drop"}),
            json!({"target": "*", "mode": "log"}),
            json!({"target": "bank/*", "mode": "drop", "reason": "INC-1234: ledger locked down"}),
            json!({"target": "bank/ledger-7d9f8c6b5-x2x4z", "mode": "log"}),
            json!({"target": "kube-system/coredns.v2", "mode": "log"}),
        ],
        &[
            (
                json!({"target": "bank/ledger", "mode": "off"}),
                ".spec.mode",
            ),
            (
                json!({"target": "bank/ledger", "mode": "Drop"}),
                ".spec.mode",
            ),
            (json!({"mode": "drop"}), ".spec.target: required"),
            (json!({"target": "bank/ledger"}), ".spec.mode: required"),
            (json!({"target": "bank", "mode": "drop"}), ".spec.target"),
            (
                json!({"target": "Bank/ledger", "mode": "drop"}),
                ".spec.target",
            ),
            (
                json!({"target": "bank/ledger/x", "mode": "drop"}),
                ".spec.target",
            ),
            (
                json!({"target": "*/ledger", "mode": "drop"}),
                ".spec.target",
            ),
            (json!({"target": "bank/", "mode": "drop"}), ".spec.target"),
            (json!({"target": "", "mode": "drop"}), ".spec.target"),
            (json!({"target": 7, "mode": "drop"}), ".spec.target"),
            (
                json!({"target": "bank/ledger", "mode": "drop", "modes": "x"}),
                ".spec.modes: unknown field",
            ),
        ],
    );
}

#[test]
fn egress_allowlist_schema_accepts_and_rejects_examples() {
    check_examples(
        "egressallowlists.tollgate.io",
        "EgressAllowlist",
        &[
            json!({
                "podSelector": {"matchLabels": {"app": "card"}},
                "egress": [{
                    "domains": ["api.stripe.com", "*.example.com", "**.googleapis.com"],
                    "ports": [
                        {"port": 443, "protocol": "TCP"},
                        {"port": "https"},
                        {"port": 8000, "endPort": 8100, "protocol": "UDP"},
                    ],
                }],
            }),
            json!({"podSelector": {}, "egress": [{"domains": ["API.Stripe.COM", "api.stripe.com.", "_dmarc.example.com"]}]}),
            json!({
                "podSelector": {"matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["pay", "card"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                ]},
                "egress": [{"domains": ["ledger.internal"], "ports": [{"protocol": "SCTP"}]}],
            }),
        ],
        &[
            (
                json!({"podSelector": {}, "egress": [{"domains": ["a.com"], "ports": [{"port": 53, "protocol": "ICMP"}]}]}),
                "protocol",
            ),
            (
                json!({"podSelector": {}, "egress": [{"domains": []}]}),
                "fewer than 1",
            ),
            (
                json!({"podSelector": {}, "egress": [{"domains": ["*"]}]}),
                "does not match",
            ),
            (
                json!({"podSelector": {}, "egress": [{"domains": ["a.*.com"]}]}),
                "does not match",
            ),
            (
                json!({"podSelector": {}, "egress": [{"domains": ["https://api.stripe.com"]}]}),
                "does not match",
            ),
            (
                json!({"podSelector": {}, "egress": [{"domains": ["a.com"], "ports": [{"port": true}]}]}),
                "not an integer or a string",
            ),
            (
                json!({"podSelector": {}, "egress": [{"domains": ["a.com"], "ports": [{"port": 1, "endPort": 70000}]}]}),
                "out of bounds",
            ),
            (
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals"}]}, "egress": [{"domains": ["a.com"]}]}),
                "operator",
            ),
            (
                json!({"podSelector": {"matchLabels": {"app": 1}}, "egress": [{"domains": ["a.com"]}]}),
                "not a string",
            ),
            (json!({"podSelector": {}}), ".spec.egress: required"),
            (
                json!({"podSelector": {}, "egress": [{"domains": ["a.com"], "to": "x"}]}),
                "unknown field",
            ),
        ],
    );
}

// ---- Prometheus --------------------------------------------------------------------------

/// Runs promtool (Debian's `prometheus` package, installed by `cargo xtask setup`).
fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| {
            panic!("run promtool: {e} (apt-get install prometheus, or cargo xtask setup)")
        });
    (
        out.status.success(),
        format!(
            "promtool {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn promtool_checks_the_alerts_and_passes_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "deploy/prometheus/alerts.yaml"]);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "deploy/prometheus/alerts_test.yaml"]);
    assert!(ok, "{out}");
}

fn alert_rules() -> Vec<Value> {
    let doc = yaml_document(&deploy_dir().join("prometheus/alerts.yaml"));
    doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

#[test]
fn every_alert_fires_in_a_test_case_and_stays_silent_in_another() {
    let alerts: BTreeSet<String> = alert_rules()
        .iter()
        .map(|r| {
            r["alert"]
                .as_str()
                .expect("only alerting rules")
                .to_string()
        })
        .collect();
    let expected: BTreeSet<String> = [
        "TollgateWouldDropInLogMode",
        "TollgateDroppedTraffic",
        "TollgateAgentDown",
        "TollgateAgentNotReady",
        "TollgateSourceDegraded",
        "TollgateWorkloadDegraded",
        "TollgateMapNearCapacity",
        "TollgateFlowLogEventsLost",
        "TollgateBreakGlassOverride",
        "TollgateDropsAfterFlip",
        "TollgateQuietLongEnoughToFlip",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(alerts, expected);

    let tests = yaml_document(&deploy_dir().join("prometheus/alerts_test.yaml"));
    assert_eq!(tests["rule_files"], json!(["alerts.yaml"]));
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for case in tests["tests"].as_array().expect("tests") {
        for t in case["alert_rule_test"].as_array().into_iter().flatten() {
            let name = t["alertname"].as_str().expect("alertname").to_string();
            // promtool passes a silent test of an alert that does not exist: catch typos.
            assert!(alerts.contains(&name), "test of unknown alert {name}");
            let firing = t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            if firing {
                fired.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    let never_fired: Vec<_> = alerts.difference(&fired).collect();
    let never_silent: Vec<_> = alerts.difference(&silent).collect();
    assert!(
        never_fired.is_empty() && never_silent.is_empty(),
        "alerts no test fires: {never_fired:?}; alerts no test keeps silent: {never_silent:?}"
    );
}

/// `tollgate_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\btollgate_[a-z_]+").expect("regex");
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

#[test]
fn alerts_are_labelled_annotated_and_use_known_metrics() {
    let known: BTreeSet<&str> = METRICS_TODAY.iter().chain(METRICS_NEW).copied().collect();
    for rule in alert_rules() {
        let name = rule["alert"].as_str().expect("alert");
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["info", "warning", "critical"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let summary = rule["annotations"]["summary"].as_str().unwrap_or("");
        let description = rule["annotations"]["description"].as_str().unwrap_or("");
        assert!(!summary.is_empty(), "{name}: summary");
        assert!(
            description.contains("$labels.node")
                && description.contains("$labels.namespace")
                && description.contains("$labels.pod"),
            "{name}: the description names namespace, pod and node"
        );
        let expr = rule["expr"].as_str().expect("expr");
        for metric in metric_names(expr) {
            assert!(
                known.contains(metric.as_str()),
                "{name}: unknown metric {metric}"
            );
        }
    }
}

// ---- Grafana ------------------------------------------------------------------------------

fn dashboard() -> Value {
    let path = repo_root().join(tollgate_tests::deploy::DASHBOARD);
    serde_json::from_str(&read(&path)).expect("the dashboard is valid JSON")
}

/// Every panel, rows' nested panels included.
fn panels(list: &Value, out: &mut Vec<Value>) {
    for p in list.as_array().into_iter().flatten() {
        out.push(p.clone());
        panels(&p["panels"], out);
    }
}

#[test]
fn dashboard_has_its_variables_and_a_query_in_every_panel() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"], 39);
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let ns = var("namespace");
    assert_eq!(ns["type"], "query");
    let ns_query = ns["query"]["query"]
        .as_str()
        .or(ns["query"].as_str())
        .expect("namespace query");
    assert_eq!(ns_query, "label_values(tollgate_packets_total, namespace)");
    assert_eq!(ns["datasource"]["uid"], "${datasource}");

    let mut all = Vec::new();
    panels(&d["panels"], &mut all);
    let mut ids = BTreeSet::new();
    for p in &all {
        assert!(ids.insert(p["id"].to_string()), "panel ids are unique");
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("a title");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has a query");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "panel {title}: every target has an expr"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title}");
        }
    }
    // "Is it safe to flip?" per workload in log mode: quiet time, observed time and the
    // would-drop count over the dashboard's range, as `status` and `--if-quiet` see them.
    let flip = all
        .iter()
        .find(|p| {
            p["title"]
                .as_str()
                .is_some_and(|t| t.starts_with("Safe to flip"))
        })
        .expect("a safe-to-flip panel");
    let exprs: Vec<&str> = flip["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["expr"].as_str())
        .collect();
    for needle in [
        "tollgate_workload_last_would_drop_timestamp_seconds",
        "tollgate_workload_observed_since_timestamp_seconds",
        "increase(tollgate_packets_total{verdict=\"would_drop\"",
    ] {
        assert!(
            exprs
                .iter()
                .any(|e| e.contains(needle) && e.contains("mode=\"log\"")),
            "{needle} in {exprs:?}"
        );
    }
}

#[test]
fn dashboard_queries_use_only_metrics_exported_today_and_the_namespace_filter() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let today: BTreeSet<&str> = METRICS_TODAY.iter().copied().collect();
    for q in &queries {
        assert!(!q.contains('$'), "a variable left in {q}");
        let names = metric_names(q);
        assert!(!names.is_empty(), "{q} queries no tollgate metric");
        for m in &names {
            assert!(today.contains(m.as_str()), "{q}: {m} is not exported yet");
        }
    }
    // The raw exprs: where a metric has the workload's namespace, the variable applies.
    let d = dashboard();
    let mut all = Vec::new();
    panels(&d["panels"], &mut all);
    for t in all
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
    {
        let expr = t["expr"].as_str().expect("expr");
        if metric_names(expr)
            .iter()
            .any(|m| METRICS_BY_NAMESPACE.contains(&m.as_str()))
        {
            assert!(
                expr.contains(r#"namespace=~"$namespace""#),
                "{expr} filters by the namespace variable"
            );
        }
    }
    // What the dashboard is for.
    let joined = queries.join("\n");
    for needle in [
        "sum by (verdict) (rate(tollgate_packets_total",
        "tollgate_flow_packets_total{verdict=\"would_drop\"",
        "sum by (mode) (tollgate_workload_mode",
        "time() - max by (namespace, pod) (tollgate_workload_last_would_drop_timestamp_seconds",
        "tollgate_source_degraded",
        "sum(tollgate_workload_degraded",
        "tollgate_map_entries / tollgate_map_capacity",
        "rate(tollgate_flow_log_events_total[5m])",
    ] {
        assert!(joined.contains(needle), "no dashboard query has {needle}");
    }
}

#[test]
fn dashboard_queries_parse_as_promql() {
    // promtool parses every expression of a rules file: each query becomes a recording rule.
    let rules = json!({"groups": [{
        "name": "dashboard",
        "rules": dashboard_queries()
            .iter()
            .enumerate()
            .map(|(i, q)| json!({"record": format!("dashboard:query_{i}"), "expr": q}))
            .collect::<Vec<_>>(),
    }]});
    let dir = std::env::temp_dir().join(format!("tollgate-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("dashboard-rules.json");
    std::fs::write(&file, rules.to_string()).expect("write rules");
    let (ok, out) = promtool(&["check", "rules", &file.to_string_lossy()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{out}");
}

// ---- Image ----------------------------------------------------------------------------------

#[test]
fn dockerfile_uses_the_toolchain_xtask_setup_installs() {
    let dockerfile = read(&deploy_dir().join("Dockerfile"));
    let xtask = read(&repo_root().join("xtask/src/main.rs"));
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    let workspace = read(&repo_root().join("Cargo.toml"));
    let rust_version = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("workspace rust-version")
        .trim_matches('"');
    assert_eq!(
        froms,
        [
            format!("FROM rust:{rust_version}-bookworm AS builder").as_str(),
            "FROM gcr.io/distroless/cc-debian12",
        ]
    );
    // bpf-linker's version and the Debian packages of `cargo xtask setup`.
    let linker = regex::Regex::new(r#"const BPF_LINKER_VERSION: &str = "([^"]+)";"#)
        .expect("regex")
        .captures(&xtask)
        .expect("BPF_LINKER_VERSION in xtask")[1]
        .to_string();
    assert!(
        dockerfile.contains(&format!("ARG BPF_LINKER_VERSION={linker}")),
        "the Dockerfile builds bpf-linker {linker}"
    );
    let packages = xtask
        .split("const BUILD_PACKAGES: &[&str] = &[")
        .nth(1)
        .and_then(|rest| rest.split("];").next())
        .expect("BUILD_PACKAGES in xtask");
    let packages: Vec<&str> = packages
        .split(',')
        .map(|p| p.trim().trim_matches('"'))
        .filter(|p| !p.is_empty())
        .collect();
    assert!(!packages.is_empty());
    for p in packages {
        assert!(dockerfile.contains(p), "the Dockerfile installs {p}");
    }
    for needle in [
        "rust-src",
        "--features llvm-22",
        "cargo build --release --locked -p tollgate",
        "COPY --from=builder /tollgate /tollgate",
        r#"ENTRYPOINT ["/tollgate"]"#,
    ] {
        assert!(dockerfile.contains(needle), "the Dockerfile has {needle}");
    }
}
