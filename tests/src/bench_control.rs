//! Control-plane benchmark: a generated cluster shaped like the reference bank (1,500
//! services, 20,000 pods, 9,300 allowed service-to-service connections), 250 of its pods
//! local to this node (attached through their cgroup directories, so no namespaces are
//! needed). Measures what an operator waits for: cold full sync, a single policy change, a
//! mode flip, map memory, and the agent's memory and scrape time.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;
use tollgate::{
    Mode,
    attach::TcMode,
    compile::model::{ClusterState, SliceEndpoint},
    reconcile::{Reconciler, ReconcilerOptions},
    sources::{FileSource, Kind, Object, ObjectKey, Source, store::Store},
};

use crate::{Lab, agent::Agent, cgroup2_root};

pub const SERVICES: usize = 1500;
pub const PODS: usize = 20_000;
pub const CONNECTIONS: usize = 9300;
pub const NAMESPACES: usize = 30;
pub const LOCAL_PODS: usize = 250;

/// A generated cluster.
pub struct BankCluster {
    /// Cluster state YAML, one file per namespace group (`cluster/*.yaml`), and
    /// `services.yaml`: one Service per service (ClusterIP, port 80 to the pods' `http`)
    /// with its EndpointSlice, as the EndpointSlice controller writes it.
    pub files: Vec<(String, String)>,
    /// (service index of dst) -> callers, for the single-change benchmark.
    pub callers: Vec<Vec<usize>>,
    /// Local pods: (namespace, name) and their cgroup directories (found from their UIDs).
    pub local: Vec<(String, String)>,
    local_cgroups: Vec<PathBuf>,
    /// The cgroup v2 root the kubepods hierarchy of the local pods is under.
    pub cgroup_root: PathBuf,
}

fn service_ns(s: usize) -> String {
    format!("ns-{:02}", s % NAMESPACES)
}

fn service_name(s: usize) -> String {
    format!("svc-{s:04}")
}

fn policy_yaml(dst: usize, callers: &[usize]) -> String {
    let mut y = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {}-ingress, namespace: {}}}\nspec:\n  podSelector: {{matchLabels: {{app: {}}}}}\n  ingress:\n  - ports: [{{port: 8080}}]\n    from:\n",
        service_name(dst),
        service_ns(dst),
        service_name(dst)
    );
    for c in callers {
        writeln!(
            y,
            "    - {{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}, podSelector: {{matchLabels: {{app: {}}}}}}}",
            service_ns(*c),
            service_name(*c)
        )
        .unwrap();
    }
    y
}

impl BankCluster {
    /// Generates the cluster; `cgroup_root` holds the local pods' cgroup directories.
    pub fn generate(cgroup_root: &Path) -> BankCluster {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut edges = BTreeSet::new();
        while edges.len() < CONNECTIONS {
            let src = (next() % SERVICES as u64) as usize;
            let dst = (next() % SERVICES as u64) as usize;
            if src != dst {
                edges.insert((dst, src));
            }
        }
        let mut callers = vec![Vec::new(); SERVICES];
        for (dst, src) in &edges {
            callers[*dst].push(*src);
        }
        let mut files: Vec<(String, String)> = Vec::new();
        let mut namespaces = String::new();
        for n in 0..NAMESPACES {
            writeln!(
                namespaces,
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n:02}, labels: {{team: team-{}}}}}",
                n % 7
            )
            .unwrap();
        }
        files.push(("namespaces.yaml".into(), namespaces));
        let mut local = Vec::new();
        let mut local_cgroups = Vec::new();
        let mut pod_files = vec![String::new(); 20];
        let mut pod = 0usize;
        let mut services_yaml = String::new();
        for s in 0..SERVICES {
            let mut endpoints = String::new();
            let replicas = if s < PODS % SERVICES {
                PODS / SERVICES + 1
            } else {
                PODS / SERVICES
            };
            for r in 0..replicas {
                let name = format!("{}-6d5f7c8b9-{r:03}", service_name(s));
                let ns = service_ns(s);
                let ip = format!(
                    "10.{}.{}.{}",
                    128 + pod / 62500,
                    (pod / 250) % 250,
                    pod % 250 + 1
                );
                // Local pods are attached on their cgroups, found from their UIDs.
                let uid = format!("b0000000-0000-4000-8000-{pod:012x}");
                if pod.is_multiple_of(PODS / LOCAL_PODS) {
                    local.push((ns.clone(), name.clone()));
                    local_cgroups.push(crate::kubepods_cgroup(cgroup_root, &uid));
                }
                writeln!(
                    pod_files[pod % 20],
                    "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {uid}\n  labels: {{app: {}, pod-template-hash: 6d5f7c8b9}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {}-6d5f7c8b9, uid: u, controller: true}}]\nspec:\n  containers: [{{name: app, image: registry.example/app:1, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus:\n  phase: Running\n  podIPs: [{{ip: {ip}}}]",
                    service_name(s),
                    service_name(s)
                )
                .unwrap();
                writeln!(
                    endpoints,
                    "  - addresses: [{ip}]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    targetRef: {{kind: Pod, namespace: {ns}, name: {name}, uid: {uid}}}"
                )
                .unwrap();
                pod += 1;
            }
            let (ns, svc) = (service_ns(s), service_name(s));
            write!(
                services_yaml,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  clusterIPs: [10.96.{}.{}]\n  selector: {{app: {svc}}}\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: http}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-x7k2p\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {svc}, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}",
                s / 250,
                s % 250 + 1,
                s / 250,
                s % 250 + 1,
            )
            .unwrap();
        }
        for (i, text) in pod_files.into_iter().enumerate() {
            files.push((format!("pods-{i:02}.yaml"), text));
        }
        files.push(("services.yaml".into(), services_yaml));
        let mut policy_files = vec![String::new(); 10];
        for (dst, c) in callers.iter().enumerate() {
            if !c.is_empty() {
                policy_files[dst % 10] += &policy_yaml(dst, c);
            }
        }
        for (i, text) in policy_files.into_iter().enumerate() {
            files.push((format!("policies-{i}.yaml"), text));
        }
        BankCluster {
            files,
            callers,
            local,
            local_cgroups,
            cgroup_root: cgroup_root.into(),
        }
    }

    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in &self.files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        for dir in &self.local_cgroups {
            std::fs::create_dir_all(dir).unwrap();
        }
    }

    /// The policy file holding the policy of `dst`, with `extra` added to its callers.
    pub fn policy_file_with(&self, dst: usize, extra: Option<usize>) -> (String, String) {
        let file = dst % 10;
        let mut text = String::new();
        for (d, c) in self.callers.iter().enumerate() {
            if d % 10 != file || c.is_empty() {
                continue;
            }
            let mut c = c.clone();
            if d == dst
                && let Some(e) = extra
            {
                c.push(e);
            }
            text += &policy_yaml(d, &c);
        }
        (format!("policies-{file}.yaml"), text)
    }

    pub fn remove_cgroups(&self) {
        for dir in &self.local_cgroups {
            let _ = std::fs::remove_dir(dir);
        }
        for level in [
            "kubepods.slice/kubepods-besteffort.slice",
            "kubepods.slice",
            "",
        ] {
            let _ = std::fs::remove_dir(self.cgroup_root.join(level));
        }
    }
}

/// One control-plane figure: median, min, max in milliseconds (or another unit).
#[derive(Clone, Debug, Serialize)]
pub struct ControlFigure {
    pub what: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

fn figure(what: &str, unit: &str, mut samples: Vec<f64>) -> ControlFigure {
    samples.sort_by(|a, b| a.total_cmp(b));
    let f = ControlFigure {
        what: what.into(),
        unit: unit.into(),
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
        runs: samples.len(),
    };
    eprintln!(
        "{what:<60} {:>10.2} {unit} (min {:.2}, max {:.2})",
        f.median, f.min, f.max
    );
    f
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Memory the kernel charges for the maps pinned under `dir` (bpftool's bytes_memlock).
fn map_memory(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().is_file() || !e.path().is_dir())
        .filter_map(|e| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(e.path())
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["bytes_memlock"].as_u64()
        })
        .sum()
}

/// A reconciler in log mode over a fresh datapath pinned under `pin_dir`, finding local
/// pods' cgroups under `cgroup_root`.
fn reconciler(pin_dir: &Path, cgroup_root: &Path) -> Reconciler {
    let mut options = tollgate::DatapathOptions::new(pin_dir);
    options.tc_mode = TcMode::Auto;
    let datapath = tollgate::Datapath::load(options).unwrap();
    Reconciler::new(
        datapath,
        ReconcilerOptions {
            default_mode: Mode::Log,
            cgroup_root: cgroup_root.into(),
            ..Default::default()
        },
    )
}

/// Runs the control-plane benchmark.
pub fn run(runs: usize) -> Vec<ControlFigure> {
    let lab = Lab::new();
    let cgroups = cgroup2_root().join(format!("{}-bench", lab.id));
    std::fs::create_dir_all(&cgroups).unwrap();
    let cluster = BankCluster::generate(&cgroups);
    let dir = crate::support::temp_dir("bench-control");
    let state_dir = dir.join("cluster");
    cluster.write(&state_dir);
    let yaml_bytes: usize = cluster.files.iter().map(|(_, t)| t.len()).sum();
    eprintln!(
        "generated: {SERVICES} services, {PODS} pods, {CONNECTIONS} connections, {} MB of YAML, {} local pods",
        yaml_bytes / 1_000_000,
        cluster.local.len()
    );
    let mut out = Vec::new();
    let (mut parse, mut cold, mut memory, mut entries) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs.max(1) {
        let pin_dir = lab.pin_dir.join("cold");
        let mut rec = reconciler(&pin_dir, &cluster.cgroup_root);
        let mut source = FileSource::new(&state_dir);
        let started = Instant::now();
        // As the daemon starts: the source reads into a state of its own.
        source.refresh(true);
        parse.push(ms(started.elapsed()));
        assert!(source.errors().is_empty(), "{:?}", source.errors().first());
        let started = Instant::now();
        let report = rec.reconcile(source.state()).unwrap();
        cold.push(ms(started.elapsed()));
        assert!(report.errors.is_empty(), "{:?}", report.errors.first());
        assert_eq!(rec.workloads().len(), cluster.local.len());
        memory.push(map_memory(&pin_dir) as f64 / 1_048_576.0);
        let (policy, cidr) = rec.datapath.maps.policy_entries();
        entries.push((policy + cidr) as f64);
        rec.detach_all().unwrap();
        rec.datapath.detach_and_unpin().unwrap();
    }
    out.push(figure(
        "read and validate the cluster state (files)",
        "ms",
        parse,
    ));
    out.push(figure(
        "cold full sync: compile, program maps, attach 250 workloads",
        "ms",
        cold,
    ));
    out.push(figure(
        "policy and ipBlock entries for the 250 local workloads",
        "entries",
        entries,
    ));
    out.push(figure(
        "BPF map memory (all maps, bytes_memlock)",
        "MiB",
        memory,
    ));

    // Warm agent state: single changes and mode flips.
    let pin_dir = lab.pin_dir.join("warm");
    let mut rec = reconciler(&pin_dir, &cluster.cgroup_root);
    let mut source = FileSource::new(&state_dir);
    let loaded = source.load();
    rec.reconcile(&loaded.state).unwrap();
    // A service with a local pod, and a new caller for it.
    let local_service = |pod: &str| pod[4..8].parse::<usize>().unwrap();
    let dst = local_service(&cluster.local[3].1);
    let caller = (dst + 7) % SERVICES;
    let (mut change_apply, mut change_total, mut change_written) = (vec![], vec![], vec![]);
    for i in 0..(runs.max(1) * 2) {
        let extra = (i % 2 == 0).then_some(caller);
        let (file, text) = cluster.policy_file_with(dst, extra);
        let started = Instant::now();
        std::fs::write(state_dir.join(&file), text).unwrap();
        // As the daemon reads a change: the source's own state, updated in place.
        source.refresh(true);
        let loaded_at = Instant::now();
        let report = rec.reconcile(source.state()).unwrap();
        change_apply.push(ms(loaded_at.elapsed()));
        change_total.push(ms(started.elapsed()));
        change_written.push((report.entries_written + report.entries_removed) as f64);
        assert_eq!(
            report.updated.len(),
            rec.workloads()
                .keys()
                .filter(|k| local_service(&k.1) == dst)
                .count()
        );
    }
    out.push(figure(
        "single policy change: compile and apply (reconcile)",
        "ms",
        change_apply,
    ));
    out.push(figure(
        "single policy change: file written to datapath enforcing",
        "ms",
        change_total,
    ));
    out.push(figure(
        "single policy change: map entries written + removed",
        "entries",
        change_written,
    ));

    // A whole NetworkPolicy added, then deleted: a second policy on the same service
    // (monitoring may scrape it). Positional rule ids or a universe that holds them would
    // recompile every pod; only the service's own pods should be.
    let (mut whole_apply, mut whole_written) = (vec![], vec![]);
    let extra_policy = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {}-scrape, namespace: {}}}\nspec:\n  podSelector: {{matchLabels: {{app: {}}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: team-0}}}}}}]\n    ports: [{{port: 9090}}]\n",
        service_name(dst),
        service_ns(dst),
        service_name(dst)
    );
    for i in 0..(runs.max(1) * 2) {
        let path = state_dir.join("extra-policy.yaml");
        if i % 2 == 0 {
            std::fs::write(&path, &extra_policy).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        source.refresh(true);
        assert!(source.errors().is_empty(), "{:?}", source.errors().first());
        let (took, written) = timed_reconcile(&mut rec, source.state());
        whole_apply.push(took);
        whole_written.push(written);
    }
    out.push(figure(
        "a whole NetworkPolicy added or deleted: compile and apply (reconcile)",
        "ms",
        whole_apply,
    ));
    out.push(figure(
        "a whole NetworkPolicy added or deleted: map entries written + removed",
        "entries",
        whole_written,
    ));

    // A pod added and deleted elsewhere in the cluster (a new replica of a calling service:
    // same labels, a new address, and its Service's EndpointSlice naming it), and a
    // namespace's labels changed and back: applied to a store as the Kubernetes source
    // applies watch events, so the compiler sees the change log a real agent sees.
    let base = source.load().state;
    let mut store = Store::default();
    for object in objects_of(&base) {
        store.insert(object.0, object.1);
    }
    let timed = |rec: &mut Reconciler, store: &Store| timed_reconcile(rec, store.state());
    // The first reconcile from the store starts from its (new) log: a full compare.
    timed(&mut rec, &store);
    let template = base
        .pods
        .values()
        .find(|p| {
            p.namespace == service_ns(caller) && p.labels.get("app") == Some(&service_name(caller))
        })
        .expect("a pod of the caller")
        .clone();
    let slice_key = base
        .endpoint_slices
        .keys()
        .find(|(ns, name)| *ns == service_ns(caller) && name.starts_with(&service_name(caller)))
        .expect("the caller's EndpointSlice")
        .clone();
    let slice = base.endpoint_slices[&slice_key].clone();
    let mut pod = template.clone();
    pod.name = format!("{}-6d5f7c8b9-new", service_name(caller));
    pod.uid = "b0000000-0000-4000-8000-ffffffffffff".into();
    pod.ips = vec!["10.200.0.1".parse().unwrap()];
    let mut grown = slice.clone();
    grown.endpoints.push(SliceEndpoint {
        addresses: pod.ips.clone(),
        ready: true,
        serving: true,
        terminating: false,
        pod: Some((pod.namespace.clone(), pod.name.clone())),
    });
    let pod_key = key(Kind::Pod, &pod.namespace, &pod.name);
    let slice_object_key = key(Kind::EndpointSlice, &slice_key.0, &slice_key.1);
    let (mut pod_apply, mut pod_written) = (vec![], vec![]);
    let (mut ns_apply, mut ns_written) = (vec![], vec![]);
    for i in 0..(runs.max(1) * 2) {
        if i % 2 == 0 {
            store.insert(pod_key.clone(), Object::Pod(pod.clone()));
            store.insert(
                slice_object_key.clone(),
                Object::EndpointSlice(grown.clone()),
            );
        } else {
            store.remove(&pod_key);
            store.insert(
                slice_object_key.clone(),
                Object::EndpointSlice(slice.clone()),
            );
        }
        let (took, written) = timed(&mut rec, &store);
        pod_apply.push(took);
        pod_written.push(written);
    }
    let namespace = base.namespaces[&service_ns(caller)].clone();
    let namespace_key = key(Kind::Namespace, "", &namespace.name);
    for i in 0..(runs.max(1) * 2) {
        let mut ns = namespace.clone();
        if i % 2 == 0 {
            ns.labels.insert("audit".into(), "2026".into());
        }
        store.insert(namespace_key.clone(), Object::Namespace(ns));
        let (took, written) = timed(&mut rec, &store);
        ns_apply.push(took);
        ns_written.push(written);
    }
    out.push(figure(
        "a pod added or deleted: compile and apply (reconcile)",
        "ms",
        pod_apply,
    ));
    out.push(figure(
        "a pod added or deleted: map entries written + removed",
        "entries",
        pod_written,
    ));
    out.push(figure(
        "a namespace's labels changed: compile and apply (reconcile)",
        "ms",
        ns_apply,
    ));
    out.push(figure(
        "a namespace's labels changed: map entries written + removed",
        "entries",
        ns_written,
    ));

    let (mut flip, mut flip_direct) = (vec![], vec![]);
    let target = cluster.local[5].clone();
    let slot = rec.workloads()[&target].slot;
    for i in 0..(runs.max(1) * 2) {
        let mode = if i % 2 == 0 { Mode::Drop } else { Mode::Log };
        let started = Instant::now();
        rec.overrides
            .targets
            .insert(format!("{}/{}", target.0, target.1), mode);
        let changed = rec.apply_modes(&loaded.state).unwrap();
        flip.push(ms(started.elapsed()));
        assert_eq!(changed.len(), 1);
        let started = Instant::now();
        rec.datapath.maps.set_mode(slot, mode).unwrap();
        flip_direct.push(ms(started.elapsed()));
        // A later reconcile agrees with the flip and writes nothing.
        let report = rec.reconcile(&loaded.state).unwrap();
        assert_eq!(report.entries_written + report.entries_removed, 0);
    }
    out.push(figure(
        "mode flip as the admin socket does it (override, then map write)",
        "ms",
        flip,
    ));
    out.push(figure("mode flip, the map write alone", "ms", flip_direct));
    rec.detach_all().unwrap();
    rec.datapath.detach_and_unpin().unwrap();
    drop(rec);

    // The agent itself with 250 local workloads: memory and scrape time.
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let mut agent = Agent::start(
        &lab,
        &agent_dir,
        &[
            "--detach-on-exit",
            "--conntrack-capacity",
            "1100000",
            "--cgroup-root",
            cluster.cgroup_root.to_str().expect("utf-8 path"),
        ],
    );
    for (name, text) in &cluster.files {
        std::fs::write(agent.cluster_state.join(name), text).unwrap();
    }
    agent.wait_ready();
    crate::wait_for(
        Duration::from_secs(60),
        "250 workloads in the agent",
        || {
            let m = agent.metrics_text();
            (crate::agent::sample(&m, "tollgate_workloads", &[]) == Some(LOCAL_PODS as f64))
                .then_some(())
        },
    );
    let (mut scrape, mut size) = (vec![], vec![]);
    for _ in 0..10 {
        let started = Instant::now();
        let text = agent.metrics_text();
        scrape.push(ms(started.elapsed()));
        size.push(text.len() as f64 / 1024.0);
    }
    let rss = agent_rss_kib(&agent) as f64 / 1024.0;
    // The same agent with 1,000,000 tracked flows in its (pinned) table.
    fill_conntrack(&agent.bpffs, 1_000_000);
    let mut scrape_full = vec![];
    for _ in 0..10 {
        let started = Instant::now();
        agent.metrics_text();
        scrape_full.push(ms(started.elapsed()));
    }
    out.push(figure(
        "agent: /metrics scrape with 250 workloads",
        "ms",
        scrape,
    ));
    out.push(figure(
        "agent: /metrics scrape with 250 workloads and 1,000,000 tracked flows",
        "ms",
        scrape_full,
    ));
    out.push(figure("agent: /metrics response size", "KiB", size));
    out.push(figure(
        "agent: resident memory with 250 workloads, 20,000 pods known",
        "MiB",
        vec![rss],
    ));
    agent.stop();
    drop(agent);

    // The agent on the Kubernetes source: the same cluster and its 1,500 Services with their
    // EndpointSlices, served through the API server stand-in (paged lists, watches).
    let api = crate::apiserver::ApiServer::start(&lab.node);
    for (_, text) in &cluster.files {
        api.apply_yaml(text);
    }
    let kube_dir = dir.join("agent-kube");
    std::fs::create_dir_all(&kube_dir).unwrap();
    let kubeconfig = api.kubeconfig(&kube_dir);
    let started = Instant::now();
    let mut agent = Agent::start_kubernetes(
        &lab,
        &kube_dir,
        &kubeconfig,
        &[
            "--detach-on-exit",
            "--node-name",
            "lab-node",
            "--cgroup-root",
            cluster.cgroup_root.to_str().expect("utf-8 path"),
        ],
    );
    crate::wait_for(
        Duration::from_secs(120),
        "250 workloads in the agent (--kubernetes)",
        || {
            let m = agent.http("/metrics")?.1;
            (crate::agent::sample(&m, "tollgate_workloads", &[]) == Some(LOCAL_PODS as f64))
                .then_some(())
        },
    );
    let first_sync = ms(started.elapsed());
    agent.wait_ready();
    // Settled: a few scrapes and polls later.
    for _ in 0..5 {
        agent.metrics_text();
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss = agent_rss_kib(&agent) as f64 / 1024.0;
    out.push(figure(
        "agent --kubernetes: start to 250 workloads attached (lists of 20,000 pods, 1,500 Services)",
        "ms",
        vec![first_sync],
    ));
    out.push(figure(
        "agent --kubernetes: resident memory with 250 workloads, 20,000 pods and 1,500 Services known",
        "MiB",
        vec![rss],
    ));
    agent.stop();
    drop(agent);
    drop(api);
    cluster.remove_cgroups();
    out
}

fn key(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// Every object of a state, as a source hands them to its store.
fn objects_of(state: &ClusterState) -> Vec<(ObjectKey, Object)> {
    let mut out = Vec::new();
    for ns in state.namespaces.values() {
        out.push((
            key(Kind::Namespace, "", &ns.name),
            Object::Namespace(ns.clone()),
        ));
    }
    for p in state.pods.values() {
        out.push((
            key(Kind::Pod, &p.namespace, &p.name),
            Object::Pod(p.clone()),
        ));
    }
    for ((ns, name), p) in &state.policies {
        out.push((
            key(Kind::NetworkPolicy, ns, name),
            Object::Policy(p.clone()),
        ));
    }
    for ((ns, name), s) in &state.services {
        out.push((key(Kind::Service, ns, name), Object::Service(s.clone())));
    }
    for ((ns, name), s) in &state.endpoint_slices {
        out.push((
            key(Kind::EndpointSlice, ns, name),
            Object::EndpointSlice(s.clone()),
        ));
    }
    for (name, n) in &state.nodes {
        out.push((key(Kind::Node, "", name), Object::Node(n.clone())));
    }
    out
}

/// One reconcile: how long it took (ms) and how many map entries it wrote and removed.
fn timed_reconcile(rec: &mut Reconciler, state: &ClusterState) -> (f64, f64) {
    let started = Instant::now();
    let report = rec.reconcile(state).unwrap();
    (
        ms(started.elapsed()),
        (report.entries_written + report.entries_removed) as f64,
    )
}

/// The `i`th of a million distinct tracked UDP flows of other workloads that never expire:
/// what the benchmarks fill connection tracking tables with.
pub fn synthetic_flow(i: u32) -> (agent_common::CtKey, agent_common::CtEntry) {
    use agent_common::{CtEntry, CtKey, FAMILY_IPV4, PROTO_UDP};
    let mut key = CtKey {
        slot: 2 + i % 500,
        local_port: (i % 60000) as u16,
        remote_port: 443,
        proto: PROTO_UDP,
        family: FAMILY_IPV4,
        ..Default::default()
    };
    key.local[..4].copy_from_slice(&[10, 2, (i >> 16) as u8, (i >> 8) as u8]);
    key.remote[..4].copy_from_slice(&[10, 3, 0, i as u8]);
    let entry = CtEntry {
        expires_ns: u64::MAX,
        ..Default::default()
    };
    (key, entry)
}

/// Fills a running agent's connection tracking table (through its pin) up to `flows`
/// entries that never expire, as a busy node's would be.
fn fill_conntrack(bpffs: &Path, flows: u32) {
    use agent_common::{CtEntry, CtKey, map_names};
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(bpffs.join(map_names::CONNTRACK)).expect("the pinned CONNTRACK");
    let mut table: HashMap<_, CtKey, CtEntry> =
        HashMap::try_from(Map::LruHashMap(data)).expect("CONNTRACK is an LRU hash");
    // Flows of the agent's own workloads (their slots and generations), so its census
    // counts them as live instead of deleting them.
    let workloads: aya::maps::Array<_, agent_common::WorkloadConfig> =
        aya::maps::Array::try_from(Map::Array(
            MapData::from_pin(bpffs.join(map_names::WORKLOADS)).expect("the pinned WORKLOADS"),
        ))
        .expect("WORKLOADS is an array");
    let active: Vec<(u32, u32)> = workloads
        .iter()
        .enumerate()
        .filter_map(|(slot, w)| w.ok().map(|w| (slot as u32, w)))
        .filter(|(_, w)| w.flags & agent_common::workload_flags::ACTIVE != 0)
        .map(|(slot, w)| (slot, w.generation))
        .collect();
    assert!(!active.is_empty(), "the agent has workloads");
    let started = Instant::now();
    for i in 0..flows {
        let (mut key, mut entry) = synthetic_flow(i);
        let (slot, generation) = active[i as usize % active.len()];
        key.slot = slot;
        entry.generation = generation;
        table.insert(key, entry, 0).expect("insert a tracked flow");
    }
    eprintln!(
        "filled the agent's conntrack with {flows} flows in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

fn agent_rss_kib(agent: &Agent) -> u64 {
    let sock = agent.admin_socket.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains(&sock) && c.contains("run"))
        })
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
