//! The upstream NetworkPolicy conformance model (tests/conformance/scenarios.yaml), run
//! through `tollgate check` and over real traffic through the loaded programs in drop mode.

use std::time::Duration;

use tollgate::{
    Mode,
    attach::TcMode,
    cli::{check_line, evaluator_for},
    reconcile::{Reconciler, ReconcilerOptions},
    sources::FileSource,
};
use tollgate_tests::{
    Lab,
    conformance::{PODS, Probe, Scenario, agree, cluster_yaml, render, scenarios},
    support::temp_dir,
    traffic,
};

fn check_matrix(scenario: &Scenario, path: &std::path::Path, probe: Probe) -> [[bool; 9]; 9] {
    let (ev, loaded) = evaluator_for(path).expect("load cluster state");
    assert!(
        loaded.errors.is_empty(),
        "{}: {:?}",
        scenario.name,
        loaded.errors
    );
    let mut m = [[true; 9]; 9];
    for (i, src) in PODS.iter().enumerate() {
        for (j, dst) in PODS.iter().enumerate() {
            if i != j {
                let r = check_line(
                    &ev,
                    &format!("{src} {dst} {}/{}", probe.port, probe.proto()),
                    false,
                )
                .unwrap_or_else(|e| panic!("{}: {e}", scenario.name));
                m[i][j] = r.verdict == "allowed";
            }
        }
    }
    m
}

#[test]
fn at_least_thirty_upstream_scenarios_are_expressed() {
    let all = scenarios();
    assert!(all.len() >= 30, "{} scenarios", all.len());
    let mut names: Vec<_> = all.iter().map(|s| s.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), all.len(), "scenario names are unique");
}

#[test]
fn every_scenario_through_tollgate_check() {
    let dir = temp_dir("conformance-check");
    let mut failures = Vec::new();
    for scenario in scenarios() {
        let file = dir.join("state.yaml");
        std::fs::write(&file, cluster_yaml(&scenario, None)).unwrap();
        for probe in scenario.probes() {
            let expected = scenario.expected(probe);
            let got = check_matrix(&scenario, &file, probe);
            if !agree(&expected, &got) {
                failures.push(format!(
                    "{} {probe}\nexpected:\n{}tollgate check:\n{}",
                    scenario.name,
                    render(&expected, None),
                    render(&got, Some(&expected))
                ));
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_scenario_on_real_traffic_in_drop_mode() {
    let mut lab = Lab::new();
    let pods: Vec<_> = PODS
        .iter()
        .map(|p| lab.add_pod(&p.replace('/', "")))
        .collect();
    for pod in &pods {
        lab.serve(pod, &[80, 81], &[80, 81]);
    }
    let datapath = lab.datapath(TcMode::Auto);
    let mut reconciler = Reconciler::new(
        datapath,
        ReconcilerOptions {
            default_mode: Mode::Drop,
            ..Default::default()
        },
    );
    let dir = temp_dir("conformance-e2e");
    let mut source = FileSource::new(&*dir);
    let mut failures = Vec::new();
    let all = scenarios();
    for scenario in &all {
        std::fs::write(dir.join("state.yaml"), cluster_yaml(scenario, None)).unwrap();
        let loaded = source.load();
        assert!(
            loaded.errors.is_empty(),
            "{}: {:?}",
            scenario.name,
            loaded.errors
        );
        let report = lab
            .in_node(|| reconciler.reconcile(&loaded.state))
            .unwrap_or_else(|e| panic!("{}: reconcile: {e}", scenario.name));
        assert!(
            report.errors.is_empty(),
            "{}: {:?}",
            scenario.name,
            report.errors
        );
        assert_eq!(
            reconciler.workloads().len(),
            9,
            "every pod is attached through its route"
        );
        for probe in scenario.probes() {
            let expected = scenario.expected(probe);
            let mut got = [[true; 9]; 9];
            std::thread::scope(|s| {
                let handles: Vec<_> = pods
                    .iter()
                    .enumerate()
                    .map(|(i, from)| {
                        let targets: Vec<String> = pods
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, to)| format!("{}:{}/{}", to.ipv4, probe.port, probe.proto()))
                            .collect();
                        s.spawn(move || {
                            (
                                i,
                                traffic::probe(from, &targets, Duration::from_millis(800)),
                            )
                        })
                    })
                    .collect();
                for h in handles {
                    let (i, results) = h.join().unwrap();
                    let mut r = results.into_iter();
                    for j in (0..9).filter(|j| *j != i) {
                        got[i][j] = r.next().unwrap();
                    }
                }
            });
            if !agree(&expected, &got) {
                failures.push(format!(
                    "{} {probe}\nexpected:\n{}observed:\n{}",
                    scenario.name,
                    render(&expected, None),
                    render(&got, Some(&expected))
                ));
            }
        }
    }
    lab.in_node(|| reconciler.detach_all()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} scenarios mismatch:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}
