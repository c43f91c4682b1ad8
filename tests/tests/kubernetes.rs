//! `tollgate run --kubernetes` against an API server that speaks the real protocol to the
//! real kube-rs client (`tollgate_tests::apiserver`): only this node's pods attached, every
//! change applied within two seconds, Events on the right pod, a relist after `410 Gone`,
//! and an API server that refuses or hangs never loosening what is enforced.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use serde_json::Value;
use tollgate_tests::{
    Lab, Pod,
    agent::{Agent, measure, sample, tollgate_bin},
    apiserver::{ApiServer, Health},
    cluster,
    support::{PATIENT, Scratch, temp_dir},
    traffic, wait_for,
};

/// Every change must reach the datapath within this (the bound).
const CHANGE_BOUND: Duration = Duration::from_secs(2);

const RECORDED_DUMP: &str = include_str!("../fixtures/kubectl-dump.yaml");

const ALLOW_CLIENT: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-from-client, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n";

struct Shop {
    lab: Lab,
    api: ApiServer,
    web: Pod,
    client: Pod,
    /// A pod of node-2: its interface is here, but it is not this node's to attach.
    far: Pod,
    dir: Scratch,
}

fn shop(tag: &str) -> Shop {
    let mut lab = Lab::new();
    let web = lab.add_pod("web");
    let client = lab.add_pod("client");
    let far = lab.add_pod("far");
    lab.serve(&web, &[8080], &[5353]);
    let api = ApiServer::start(&lab.node);
    // A real cluster's objects, as recorded (other namespaces, pods of node-1 and node-2).
    api.apply_yaml(RECORDED_DUMP);
    let yaml = cluster::namespace("shop", "{team: shop}", "{}")
        + &cluster::on_node(
            &cluster::pod(&web, "shop", "web-0", "{app: web}", "{}", &[]),
            "node-1",
        )
        + &cluster::on_node(
            &cluster::pod(&client, "shop", "client-0", "{app: client}", "{}", &[]),
            "node-1",
        )
        + &cluster::on_node(
            &cluster::pod(&far, "shop", "far-0", "{app: far}", "{}", &[]),
            "node-2",
        )
        + &cluster::node("node-1", &["10.77.0.1".parse::<IpAddr>().unwrap()])
        + ALLOW_CLIENT;
    api.apply_yaml(&yaml);
    let dir = temp_dir(tag);
    Shop {
        lab,
        api,
        web,
        client,
        far,
        dir,
    }
}

impl Shop {
    fn start(&self, extra: &[&str]) -> Agent {
        let kubeconfig = self.api.kubeconfig(&self.dir);
        let mut args = vec!["--cgroup-root", self.lab.cgroup_dir.to_str().unwrap()];
        args.extend(extra);
        let mut agent = Agent::start_kubernetes(&self.lab, &self.dir, &kubeconfig, &args);
        agent.wait_ready();
        agent
    }

    /// `tollgate mode ... --kubernetes` with this API server's kubeconfig.
    fn mode_cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.lab.node))
            .arg(tollgate_bin())
            .arg("mode")
            .args(args)
            .arg("--kubernetes")
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("USER", "alice")
            .env_remove("SUDO_USER")
            .output()
            .expect("run tollgate mode")
    }
}

/// Waits until `/readyz` answers 503 with a body that says each of `says`.
fn wait_degraded(agent: &Agent, bound: Duration, what: &str, says: &[&str]) {
    wait_for(bound, what, || {
        agent
            .http("/readyz")
            .is_some_and(|(c, b)| c == 503 && says.iter().all(|s| b.contains(s)))
            .then_some(())
    });
}

/// Waits for `f` and returns how long it took (printed); fails after `bound` plus a margin.
fn within(bound: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    wait_for(bound + Duration::from_secs(3), what, || f().then_some(()));
    let took = started.elapsed();
    eprintln!("{what}: {} ms", took.as_millis());
    took
}

/// Whether one datagram from `from` to `to`'s UDP echo port comes back within `timeout`.
fn reaches(from: &Pod, to: &Pod, timeout: Duration) -> bool {
    traffic::udp(from, to.addr(false), 5353, 1, 64, timeout).echoed == 1
}

fn mode_of(agent: &Agent, pod: &str) -> Option<(String, String)> {
    let w = agent.workload(pod)?;
    Some((
        w["mode"].as_str()?.to_string(),
        w["mode_source"].as_str()?.to_string(),
    ))
}

fn would_drop_in(agent: &Agent, lab: &Lab, from: &Pod, to: &Pod, pod: &str) -> u64 {
    let [got] = measure(lab, agent, [pod], || {
        let _ = traffic::udp(
            from,
            to.addr(false),
            5353,
            2,
            64,
            Duration::from_millis(400),
        );
    });
    got[1] + got[2]
}

#[test]
fn the_kubernetes_source_attaches_this_nodes_pods_and_follows_every_change() {
    let shop = shop("kube-follow");
    let agent = shop.start(&[]);
    let status = agent.status();
    assert!(agent.workload("web-0").is_some(), "{status:#}");
    assert!(agent.workload("client-0").is_some(), "{status:#}");
    assert!(
        agent.workload("far-0").is_none(),
        "a pod of node-2 is not attached here even with a local interface: {status:#}"
    );

    // The policy (only client may reach web) is in force: client is allowed, far (known
    // through the API, on another node) would be dropped.
    let [web_got] = measure(&shop.lab, &agent, ["web-0"], || {
        let r = traffic::udp(&shop.client, shop.web.addr(false), 5353, 3, 64, PATIENT);
        assert_eq!(r.echoed, 3);
        let r = traffic::udp(&shop.far, shop.web.addr(false), 5353, 2, 64, PATIENT);
        assert_eq!(r.echoed, 2, "log mode lets would-drops pass");
    });
    assert_eq!(web_got[0], 3, "ingress allowed: {web_got:?}");
    assert_eq!(web_got[1], 2, "ingress would_drop: {web_got:?}");

    // A namespace annotation: drop mode within the bound.
    let took = {
        shop.api.apply_yaml(&cluster::namespace(
            "shop",
            "{team: shop}",
            "{tollgate.io/mode: drop}",
        ));
        within(CHANGE_BOUND, "the namespace annotation applied", || {
            mode_of(&agent, "web-0").is_some_and(|(m, s)| m == "drop" && s == "namespace")
        })
    };
    assert!(took <= CHANGE_BOUND, "annotation took {took:?}");
    assert_eq!(
        would_drop_in(&agent, &shop.lab, &shop.far, &shop.web, "web-0"),
        2
    );

    // A policy change: web closed to everyone.
    shop.api.delete("NetworkPolicy", "shop", "web-from-client");
    shop.api
        .apply_yaml(&ALLOW_CLIENT.replace("app: client", "app: nobody"));
    let took = within(CHANGE_BOUND, "the policy change applied", || {
        !reaches(&shop.client, &shop.web, Duration::from_millis(150))
    });
    assert!(took <= CHANGE_BOUND, "policy took {took:?}");

    // A cluster ModeOverride written by the CLI: every pod of workload shop/web-0.
    let out = shop.mode_cli(&["set", "shop/web-0", "log", "--reason", "INC-42 rollback"]);
    assert!(out.status.success(), "{out:?}");
    let overrides = shop.api.list("ModeOverride");
    assert_eq!(overrides.len(), 1, "{overrides:#?}");
    assert_eq!(overrides[0]["spec"]["target"], "shop/web-0");
    assert_eq!(overrides[0]["spec"]["mode"], "log");
    let took = within(CHANGE_BOUND, "the ModeOverride applied", || {
        mode_of(&agent, "web-0").is_some_and(|(m, s)| m == "log" && s == "cluster-override")
    });
    assert!(took <= CHANGE_BOUND, "ModeOverride took {took:?}");
    // A second override of the target, written by hand (GitOps), whose name sorts last:
    // the CLI's changes must reach it too, or it decides.
    shop.api.apply_yaml(
        "apiVersion: tollgate.io/v1alpha1\nkind: ModeOverride\nmetadata: {name: zz-web}\nspec: {target: shop/web-0, mode: log}\n",
    );
    // Setting the same target again updates the same objects, both.
    let out = shop.mode_cli(&["set", "shop/web-0", "drop"]);
    assert!(out.status.success(), "{out:?}");
    let overrides = shop.api.list("ModeOverride");
    assert_eq!(overrides.len(), 2, "{overrides:#?}");
    assert!(
        overrides.iter().all(|o| o["spec"]["mode"] == "drop"),
        "{overrides:#?}"
    );
    // This change gave no reason: the first one's is not left behind to be credited to it.
    assert!(
        overrides.iter().all(|o| o["spec"].get("reason").is_none()),
        "{overrides:#?}"
    );
    within(CHANGE_BOUND, "the updated ModeOverride applied", || {
        mode_of(&agent, "web-0").is_some_and(|(m, s)| m == "drop" && s == "cluster-override")
    });
    // The name a new override of a target gets, taken by one of another target (written
    // by hand): refused with what to do, nothing changed.
    let taken = tollgate::sources::crd::object_name("shop/client-0");
    shop.api.apply_yaml(&format!(
        "apiVersion: tollgate.io/v1alpha1\nkind: ModeOverride\nmetadata: {{name: {taken}}}\nspec: {{target: shop/far-0, mode: log}}\n"
    ));
    let out = shop.mode_cli(&["set", "shop/client-0", "drop"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("taken by a ModeOverride of another target"),
        "{out:?}"
    );
    assert_eq!(
        shop.api.get("ModeOverride", "", &taken).unwrap()["spec"]["target"],
        "shop/far-0"
    );
    shop.api.delete("ModeOverride", "", &taken);
    let out = shop.mode_cli(&["clear", "shop/web-0"]);
    assert!(out.status.success(), "{out:?}");
    assert!(shop.api.list("ModeOverride").is_empty());
    within(CHANGE_BOUND, "the cleared ModeOverride gone", || {
        mode_of(&agent, "web-0").is_some_and(|(m, s)| m == "drop" && s == "namespace")
    });
    let out = shop.mode_cli(&["clear", "shop/web-0"]);
    assert_eq!(out.status.code(), Some(1), "nothing left to clear: {out:?}");
    // Every change is in the agent's audit log, and the CLI's writes are Events.
    let audit = std::fs::read_to_string(agent.dir.join("state/audit.log")).unwrap();
    let records: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records.iter().any(|r| r["who"]
            .as_str()
            .unwrap()
            .contains("(cluster): INC-42 rollback")
            && r["new_mode"] == "log"
            && r["changed"][0][0] == "shop/web-0"),
        "{audit}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["new_mode"].is_null() && r["old_mode"] == "drop"),
        "the removal is audited: {audit}"
    );
    let reasons: Vec<String> = shop
        .api
        .events()
        .iter()
        .filter(|e| e["involvedObject"]["kind"] == "ModeOverride")
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| *r == "ModeOverrideSet").count(),
        3,
        "an Event on each override written: {reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "ModeOverrideCleared")
            .count(),
        2,
        "{reasons:?}"
    );
    let web_events = |reason: &str| -> Vec<Value> {
        shop.api
            .events()
            .into_iter()
            .filter(|e| e["reason"] == reason && e["involvedObject"]["uid"] == shop.web.uid)
            .collect()
    };
    assert!(
        !web_events("ModeChanged").is_empty(),
        "web's mode changes are Events on web: {:#?}",
        shop.api.events()
    );

    // A pod added through the API is attached within the bound; deleted, detached.
    let mut lab = shop.lab;
    let late = lab.add_pod("late");
    let took = {
        shop.api.apply_yaml(&cluster::on_node(
            &cluster::pod(&late, "shop", "late-0", "{app: late}", "{}", &[]),
            "node-1",
        ));
        within(CHANGE_BOUND, "the new pod attached", || {
            agent.workload("late-0").is_some()
        })
    };
    assert!(took <= CHANGE_BOUND, "new pod took {took:?}");
    shop.api.delete("Pod", "shop", "late-0");
    within(CHANGE_BOUND, "the deleted pod detached", || {
        agent.workload("late-0").is_none()
    });
    drop(agent);
}

#[test]
fn denied_flows_become_deduplicated_events_on_the_pod_whose_policy_denied_them() {
    let shop = shop("kube-events");
    let agent = shop.start(&["--log-rate", "100", "--log-burst", "100"]);
    // Log mode: far -> web would be dropped (web's ingress); 3 rounds of datagrams to the
    // same port are one Event whose count grows.
    for _ in 0..3 {
        let r = traffic::udp(&shop.far, shop.web.addr(false), 5353, 2, 64, PATIENT);
        assert_eq!(r.echoed, 2);
        std::thread::sleep(Duration::from_millis(300));
    }
    let event = wait_for(
        Duration::from_secs(10),
        "a PacketWouldDrop Event with a count",
        || {
            let events = shop.api.events_with_reason("PacketWouldDrop");
            (events.len() == 1 && events[0]["count"].as_u64().unwrap_or(0) >= 2)
                .then(|| events[0].clone())
        },
    );
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["involvedObject"]["kind"], "Pod");
    assert_eq!(event["involvedObject"]["name"], "web-0");
    assert_eq!(event["involvedObject"]["namespace"], "shop");
    assert_eq!(event["involvedObject"]["uid"], shop.web.uid.as_str());
    assert_eq!(event["metadata"]["namespace"], "shop");
    let message = event["message"].as_str().unwrap();
    for part in [
        "ingress",
        "workload shop/far-0",
        "5353/udp",
        "mode log",
        "shop/web-from-client",
    ] {
        assert!(message.contains(part), "{part:?} in {message:?}");
    }
    // Another port is another Event.
    let r = traffic::udp(
        &shop.far,
        shop.web.addr(false),
        8080,
        1,
        64,
        Duration::from_millis(300),
    );
    assert_eq!(r.echoed, 0, "nothing listens on 8080/udp");
    wait_for(
        Duration::from_secs(10),
        "a second Event for port 8080",
        || (shop.api.events_with_reason("PacketWouldDrop").len() == 2).then_some(()),
    );
    // Drop mode: PacketDrop on the same pod.
    shop.api.apply_yaml(&cluster::namespace(
        "shop",
        "{team: shop}",
        "{tollgate.io/mode: drop}",
    ));
    within(CHANGE_BOUND, "drop mode", || {
        mode_of(&agent, "web-0").is_some_and(|(m, _)| m == "drop")
    });
    assert!(!reaches(&shop.far, &shop.web, Duration::from_millis(300)));
    let dropped = wait_for(Duration::from_secs(10), "a PacketDrop Event", || {
        shop.api.events_with_reason("PacketDrop").first().cloned()
    });
    assert_eq!(dropped["involvedObject"]["uid"], shop.web.uid.as_str());
    assert!(
        dropped["message"]
            .as_str()
            .unwrap()
            .starts_with("Dropped ingress from workload shop/far-0 on 5353/udp (mode drop"),
        "{dropped}"
    );
    let metrics = agent.metrics_text();
    let created = |metrics: &str| {
        sample(
            metrics,
            "tollgate_kube_events_total",
            &[("outcome", "created")],
        )
        .unwrap_or(0.0)
    };
    assert!(created(&metrics) >= 2.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "tollgate_kube_events_total",
            &[("outcome", "failed")]
        ),
        Some(0.0)
    );
    // A counter never goes backwards, across restarts too.
    let mut agent = agent;
    let before = created(&agent.metrics_text());
    assert!(agent.stop().success());
    agent.restart();
    let after = created(&agent.metrics_text());
    assert!(after >= before, "{after} after a restart, {before} before");
    drop(agent);
}

#[test]
fn the_api_server_going_away_keeps_the_last_state_enforced_and_recovery_applies_what_changed() {
    let shop = shop("kube-outage");
    shop.api.apply_yaml(&cluster::namespace(
        "shop",
        "{team: shop}",
        "{tollgate.io/mode: drop}",
    ));
    let agent = shop.start(&[]);
    let ready = |agent: &Agent| agent.http("/readyz").map(|(c, _)| c) == Some(200);
    let degraded_metric = |agent: &Agent| {
        sample(&agent.metrics_text(), "tollgate_source_degraded", &[]).unwrap_or(-1.0)
    };
    assert!(ready(&agent));
    assert_eq!(degraded_metric(&agent), 0.0);
    let far_blocked = || !reaches(&shop.far, &shop.web, Duration::from_millis(300));
    assert!(far_blocked(), "drop mode before the outage");

    for health in [Health::Hanging, Health::Refusing] {
        // 410 first: a compacted history makes every watcher list again.
        let lists_before = shop
            .api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
            .count();
        shop.api.compact();
        wait_for(
            Duration::from_secs(10),
            "a relist of pods after 410",
            || {
                let lists = shop
                    .api
                    .requests()
                    .iter()
                    .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
                    .count();
                (lists > lists_before).then_some(())
            },
        );
        within(CHANGE_BOUND, "ready after the relist", || ready(&agent));

        // The API server goes away for 10 s: the last state stays enforced, degraded.
        shop.api.set_health(health);
        let started = Instant::now();
        wait_for(
            Duration::from_secs(8),
            "degraded while the API server is away",
            || {
                (agent
                    .http("/readyz")
                    .is_some_and(|(c, b)| c == 503 && b.contains("degraded"))
                    && degraded_metric(&agent) == 1.0)
                    .then_some(())
            },
        );
        assert!(far_blocked(), "{health:?}: still enforced");
        assert!(
            agent.workload("web-0").is_some(),
            "{health:?}: still attached"
        );
        // Meanwhile the cluster changes: far is allowed too.
        shop.api.apply_yaml(
            &ALLOW_CLIENT
                .replace("web-from-client", "web-from-far")
                .replace("app: client", "app: far"),
        );
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        std::thread::sleep(left);
        assert!(far_blocked(), "{health:?}: nothing seen while away");
        shop.api.set_health(Health::Up);
        within(
            Duration::from_secs(8),
            "recovered and applied what changed",
            || ready(&agent) && !far_blocked(),
        );
        assert_eq!(degraded_metric(&agent), 0.0);
        shop.api.delete("NetworkPolicy", "shop", "web-from-far");
        within(CHANGE_BOUND, "watching again after recovery", || {
            far_blocked()
        });
    }

    // Restarted while the API server is away: the pinned state stays enforced, and
    // `/readyz` says degraded from the start, not only "not ready".
    let mut agent = agent;
    agent.stop();
    shop.api.set_health(Health::Refusing);
    agent.restart_unready();
    wait_degraded(
        &agent,
        Duration::from_secs(10),
        "degraded on a start without the API server",
        &["not ready", "degraded", "API server"],
    );
    assert_eq!(degraded_metric(&agent), 1.0);
    assert!(far_blocked(), "the pinned state stays enforced");
    shop.api.set_health(Health::Up);
    within(Duration::from_secs(8), "ready once it is back", || {
        ready(&agent)
    });
    drop(agent);
}

#[test]
fn an_empty_relist_is_not_believed_and_nothing_is_detached() {
    let shop = shop("kube-empty");
    let agent = shop.start(&[]);
    assert!(agent.workload("web-0").is_some());
    shop.api.lose_all("Pod");
    wait_degraded(
        &agent,
        Duration::from_secs(10),
        "degraded on an empty pod list",
        &["listed no Pods"],
    );
    assert!(agent.workload("web-0").is_some(), "still attached");
    assert!(agent.workload("client-0").is_some(), "still attached");
    drop(agent);
}

/// A 404 to the list of a custom resource whose objects are known (API servers give one for
/// a moment now and then) is not "there are none": the ModeOverride in force stays, and the
/// agent says it is degraded until a list is believed again.
#[test]
fn a_404_for_known_mode_overrides_keeps_them_in_force() {
    let shop = shop("kube-404");
    shop.api.apply_yaml(
        "apiVersion: tollgate.io/v1alpha1\nkind: ModeOverride\nmetadata: {name: web-drop}\nspec: {target: shop/web-0, mode: drop}\n",
    );
    let agent = shop.start(&[]);
    within(CHANGE_BOUND, "the ModeOverride applied", || {
        mode_of(&agent, "web-0").is_some_and(|(m, s)| m == "drop" && s == "cluster-override")
    });
    shop.api.unserve("ModeOverride");
    shop.api.compact(); // every watch lists again
    // The resumed watch is refused (404) and retried, or a relist is, and
    // says "answered 404".
    wait_degraded(
        &agent,
        Duration::from_secs(10),
        "degraded on a 404 for known ModeOverrides",
        &["ModeOverride", "404"],
    );
    assert_eq!(
        mode_of(&agent, "web-0"),
        Some(("drop".to_string(), "cluster-override".to_string())),
        "the override stays in force"
    );
    // A restart meanwhile: the override the last run kept is what is known, and stays.
    let mut agent = agent;
    assert!(agent.stop().success());
    agent.restart_unready();
    wait_degraded(
        &agent,
        Duration::from_secs(20),
        "the restarted agent degraded on the 404",
        &["answered 404"],
    );
    within(Duration::from_secs(5), "the kept override in force", || {
        mode_of(&agent, "web-0").is_some_and(|(m, s)| m == "drop" && s == "cluster-override")
    });
    drop(agent);
}

/// The capabilities the DaemonSet adds (deploy/daemonset.yaml), lowercased for setpriv.
fn daemonset_capabilities() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("deploy/daemonset.yaml")).unwrap();
    let ds: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect()
}

#[test]
fn the_daemonsets_capabilities_are_all_the_agent_needs() {
    let caps = daemonset_capabilities();
    assert!(!caps.is_empty());
    // As the container runtime runs it: uid 0 with only these capabilities (bounding set,
    // hence effective and permitted), no new privileges.
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let wrapper = [
        "setpriv",
        "--no-new-privs",
        "--bounding-set",
        &bounding,
        "--inh-caps=-all",
    ];
    let shop = shop("kube-caps");
    shop.api.apply_yaml(&cluster::namespace(
        "shop",
        "{team: shop}",
        "{tollgate.io/mode: drop}",
    ));
    let kubeconfig = shop.api.kubeconfig(&shop.dir);
    let mut agent = Agent::start_kubernetes_under(
        &shop.lab,
        &shop.dir,
        &kubeconfig,
        &["--cgroup-root", shop.lab.cgroup_dir.to_str().unwrap()],
        &wrapper,
    );
    agent.wait_ready();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().expect("running")))
        .unwrap_or_default();
    let bit = |name: &str| match name {
        "net_admin" => 12,
        "net_raw" => 13,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("capability {other} has no bit here; add it"),
    };
    let mask: u64 = caps.iter().map(|c| 1u64 << bit(c)).sum();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or_default();
    assert_eq!(
        effective,
        format!("{mask:016x}"),
        "the agent runs with exactly the DaemonSet's capabilities"
    );
    // Attached, enforcing and counting with only those capabilities; the packet socket that
    // hands held DNS answers back opens too.
    assert!(agent.workload("web-0").is_some());
    assert!(!agent.log().contains("no packet socket"), "{}", agent.log());
    let [web_got] = measure(&shop.lab, &agent, ["web-0"], || {
        let r = traffic::udp(&shop.client, shop.web.addr(false), 5353, 2, 64, PATIENT);
        assert_eq!(r.echoed, 2);
        let r = traffic::udp(
            &shop.far,
            shop.web.addr(false),
            5353,
            2,
            64,
            Duration::from_millis(300),
        );
        assert_eq!(r.echoed, 0, "dropped");
    });
    assert_eq!(web_got[0], 2, "{web_got:?}");
    assert_eq!(web_got[2], 2, "{web_got:?}");
    // A restart adopts the pins with the same capabilities.
    assert!(agent.stop().success(), "{}", agent.log());
    agent.restart();
    assert!(agent.workload("web-0").is_some());
    assert!(
        !agent.log().contains("Operation not permitted"),
        "{}",
        agent.log()
    );
}

/// `n` running pods of node-2 in namespace `aaa`, which sorts before the others: lists of
/// pods take more pages (500 a page), shop's on the last.
fn filler_pods(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: filler-{i}, namespace: aaa, labels: {{app: filler}}}}\nspec: {{nodeName: node-2, containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.9.{}.{}}}]}}\n",
                i / 250,
                i % 250 + 1
            )
        })
        .collect()
}

#[test]
fn a_list_that_breaks_off_midway_changes_nothing() {
    let shop = shop("kube-partial");
    // 600 pods of another node in a namespace listed before shop: a pod list takes two
    // pages (the watcher asks for 500 at a time), and shop's pods are on the second.
    let many = filler_pods(600);
    shop.api.apply_yaml(&many);
    let agent = shop.start(&[]);
    assert!(agent.workload("web-0").is_some());
    let lists = || {
        shop.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("continue="))
            .count()
    };
    assert!(lists() >= 1, "the first list took two pages");
    // Every relist now breaks off after its first page; meanwhile shop's pods go away in a
    // way only a complete list would show.
    shop.api.fail_continued_lists(true);
    shop.api.lose_all("Pod");
    shop.api.apply_yaml(&many);
    let before = lists();
    wait_for(Duration::from_secs(15), "relists that break off", || {
        (lists() >= before + 2).then_some(())
    });
    wait_degraded(
        &agent,
        Duration::from_secs(10),
        "degraded while lists break off",
        &["Pods"],
    );
    assert!(
        agent.workload("web-0").is_some(),
        "half a list detached nothing"
    );
    assert!(
        agent.workload("client-0").is_some(),
        "half a list detached nothing"
    );
    // The list completes: now the pods are really gone.
    shop.api.fail_continued_lists(false);
    wait_for(Duration::from_secs(20), "the complete list applied", || {
        agent.workload("web-0").is_none().then_some(())
    });
}

#[test]
fn egress_allowlists_from_the_api_isolate_the_pods_they_select_and_a_bad_one_changes_nothing() {
    let shop = shop("kube-allowlist");
    let mut agent = shop.start(&[]);
    let allowlists = |agent: &Agent| -> Vec<String> {
        agent
            .workload("client-0")
            .and_then(|w| serde_json::from_value(w["egress_allowlists"].clone()).ok())
            .unwrap_or_default()
    };
    assert!(allowlists(&agent).is_empty());
    let allowlist = |domain: &str| {
        format!(
            "apiVersion: tollgate.io/v1alpha1\nkind: EgressAllowlist\nmetadata: {{name: client-out, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  egress: [{{domains: ['{domain}'], ports: [{{port: 443}}]}}]\n"
        )
    };
    shop.api.apply_yaml(&allowlist("api.stripe.com"));
    within(Duration::from_secs(3), "the allowlist in force", || {
        allowlists(&agent) == ["shop/client-out"]
    });
    assert_eq!(
        agent.status()["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| !w["egress_allowlists"].is_null())
            .count(),
        1,
        "only the pod it selects"
    );
    // A version the API server let through (no schema here) but the agent refuses: the last
    // good one stays, the error is reported.
    shop.api.apply_yaml(&allowlist("api.*.com"));
    within(Duration::from_secs(3), "the bad version reported", || {
        agent.status()["policy_errors"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e.as_str().unwrap_or("").contains("client-out"))
        })
    });
    assert_eq!(allowlists(&agent), ["shop/client-out"]);
    // Restarted while the API server holds only the bad version: the new process never saw
    // the good one, the state directory kept it; and the error is not counted again.
    let errors_total = |agent: &Agent| {
        agent
            .metrics_text()
            .lines()
            .find(|l| l.starts_with("tollgate_policy_errors_total"))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
    };
    let counted = errors_total(&agent);
    assert_eq!(counted, Some(1.0));
    assert!(agent.stop().success(), "{}", agent.log());
    agent.restart();
    within(
        Duration::from_secs(5),
        "the last good allowlist after the restart",
        || allowlists(&agent) == ["shop/client-out"],
    );
    let status = agent.status()["policy_errors"].to_string();
    assert!(
        status.contains("client-out") && status.contains("the last good version stays in force"),
        "{status}"
    );
    assert_eq!(errors_total(&agent), counted, "the same error counted once");
    shop.api.delete("EgressAllowlist", "shop", "client-out");
    within(Duration::from_secs(3), "the allowlist gone", || {
        allowlists(&agent).is_empty()
    });
}

#[test]
fn a_missing_mode_override_crd_is_a_warning_not_an_outage() {
    let shop = shop("kube-nocrd");
    shop.api.unserve("ModeOverride");
    shop.api.unserve("EgressAllowlist");
    let agent = shop.start(&[]);
    assert!(agent.workload("web-0").is_some());
    let status = agent.status();
    assert!(
        status["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("does not serve ModeOverrides")),
        "{status:#}"
    );
    assert_eq!(agent.http("/readyz").map(|(c, _)| c), Some(200));
    // The missing CRD is asked for again, ever less often (doubling waits up to 30 s), not
    // about once a second by every node of the cluster.
    let asked = || {
        shop.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /apis/tollgate.io/v1alpha1/modeoverrides"))
            .count()
    };
    let before = asked();
    std::thread::sleep(Duration::from_secs(20));
    let in_20s = asked() - before;
    assert!(in_20s <= 8, "{in_20s} lists of the missing CRD in 20 s");
}

/// A ClusterRole without ModeOverrides (403) says nothing of which exist: the agent
/// enforces everything else but says it is degraded, since a security team's `drop`
/// override may be missed. (A 404, a CRD not installed, means there are none: a warning.)
#[test]
fn a_forbidden_list_of_mode_overrides_is_degraded_not_none() {
    let shop = shop("kube-403");
    shop.api.forbid("ModeOverride");
    let kubeconfig = shop.api.kubeconfig(&shop.dir);
    let args = ["--cgroup-root", shop.lab.cgroup_dir.to_str().unwrap()];
    let agent = Agent::start_kubernetes(&shop.lab, &shop.dir, &kubeconfig, &args);
    wait_degraded(
        &agent,
        Duration::from_secs(20),
        "degraded on a forbidden list",
        &["may not list ModeOverrides"],
    );
    assert!(
        agent.workload("web-0").is_some(),
        "everything else enforced"
    );
    assert_eq!(
        sample(&agent.metrics_text(), "tollgate_source_degraded", &[]),
        Some(1.0)
    );
}

/// An API server slow to answer for a moment (one probe without an answer in time) is not
/// an outage that makes every agent of the cluster list every kind again.
#[test]
fn a_moment_of_a_slow_api_server_makes_no_relist() {
    let shop = shop("kube-blip");
    let agent = shop.start(&[]);
    let lists = || {
        shop.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /ap") && !r.contains("watch=true"))
            .count()
    };
    let before = lists();
    shop.api.slow_next_version(Duration::from_secs(4));
    wait_for(Duration::from_secs(10), "the probe's answer late", || {
        agent
            .log()
            .contains("the API server answers again")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lists(), before, "{:#?}", shop.api.requests());
    // Still watching: a change comes through.
    shop.api.delete("Pod", "shop", "client-0");
    within(CHANGE_BOUND, "a change after the slow moment", || {
        agent.workload("client-0").is_none()
    });
}

/// A relist slower than the agent's patience with a failing watch (a 410 on a large
/// cluster, an API server under load) completes: its pages are progress.
#[test]
fn a_slow_relist_after_410_completes() {
    let shop = shop("kube-slow");
    let many = filler_pods(1100);
    shop.api.apply_yaml(&many);
    let agent = shop.start(&[]);
    assert!(agent.workload("client-0").is_some());
    // Every page now takes 6 s: the pod list (3 pages) takes 18 s after the 410.
    shop.api.slow_pages(Duration::from_secs(6));
    shop.api.compact();
    shop.api.delete("Pod", "shop", "client-0");
    within(Duration::from_secs(45), "the slow relist applied", || {
        agent.workload("client-0").is_none()
    });
    within(Duration::from_secs(10), "ready again", || {
        agent.http("/readyz").map(|(c, _)| c) == Some(200)
    });
}

#[test]
fn a_task_of_the_agent_that_dies_makes_it_exit_non_zero_and_leaves_enforcement_in_place() {
    let shop = shop("kube-dies");
    shop.api.apply_yaml(&cluster::namespace(
        "shop",
        "{team: shop}",
        "{tollgate.io/mode: drop}",
    ));
    let mut agent = shop.start(&[]);
    assert!(agent.workload("web-0").is_some());
    // Take the metrics port away: a restarted agent cannot serve it, and must not run on as
    // a silent "ready" without metrics and probes.
    assert!(agent.stop().success());
    let node = shop.lab.node.clone();
    let blocker = std::thread::spawn(move || {
        let _ns = tollgate_tests::NetNsGuard::enter(&node);
        std::net::TcpListener::bind("127.0.0.1:9402").expect("hold the metrics port")
    })
    .join()
    .unwrap();
    let kubeconfig = shop.dir.join("kubeconfig");
    let mut agent = Agent::start_kubernetes(
        &shop.lab,
        &shop.dir,
        &kubeconfig,
        &["--cgroup-root", shop.lab.cgroup_dir.to_str().unwrap()],
    );
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .expect("the agent exits when its metrics server cannot run");
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    assert!(
        agent.log().contains("metrics server stopped"),
        "{}",
        agent.log()
    );
    drop(blocker);
    // The programs stayed attached: far is still dropped with no agent running.
    assert!(
        !reaches(&shop.far, &shop.web, Duration::from_millis(300)),
        "still enforced"
    );
    assert!(reaches(&shop.client, &shop.web, PATIENT), "still allowed");
}

#[test]
fn a_service_created_through_the_api_decides_calls_to_its_cluster_ip_within_two_seconds() {
    let shop = shop("kube-service");
    // client may only call web's 5353/udp; kube-proxy already has the ClusterIP's rules, the
    // agent does not know the Service yet, so the ClusterIP is an address outside the
    // cluster to it.
    shop.api.apply_yaml("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-out, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5353, protocol: UDP}]}]\n");
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    tollgate_tests::kube_proxy::apply(
        &shop.lab.node,
        &[tollgate_tests::kube_proxy::ServicePort {
            namespace: "shop".into(),
            service: "web".into(),
            port_name: "dns".into(),
            protocol: tollgate_tests::kube_proxy::Proto::Udp,
            cluster_ip: vip,
            port: 53,
            endpoints: vec![(shop.web.addr(false), 5353)],
            node_port: None,
            external_ips: vec![],
        }],
        "10.1.0.0/24",
        "fd77:1::/64",
    );
    let agent = shop.start(&[]);
    let call = || {
        let [client] = measure(&shop.lab, &agent, ["client-0"], || {
            let r = traffic::udp(&shop.client, vip, 53, 2, 64, PATIENT);
            assert_eq!(r.echoed, 2, "log mode: the call goes through either way");
        });
        client
    };
    let before = call();
    assert_eq!(
        before[4], 2,
        "egress would_drop while the Service is unknown: {before:?}"
    );
    shop.api.apply_yaml(
        &(cluster::service(
            "shop",
            "web",
            &[vip],
            "{app: web}",
            &[("dns", 53, "UDP", "5353")],
        ) + &cluster::endpoint_slice(
            "shop",
            "web-abcde",
            "web",
            &[(shop.web.addr(false), "web-0")],
            &[("dns", 5353, "UDP")],
        )),
    );
    let took = within(CHANGE_BOUND, "the Service decided by its backends", || {
        let c = call();
        c[3] == 2 && c[4] == 0
    });
    assert!(took <= CHANGE_BOUND, "Service took {took:?}");
    let flows = agent.flow_records();
    assert!(
        flows
            .iter()
            .all(|r| r["dst_service"].is_null() || r["dst_service"] == "shop/web"),
        "{flows:?}"
    );
}
