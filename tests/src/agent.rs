//! The `tollgate` binary as operators run it: `tollgate run` inside the lab's node namespace
//! (through `nsenter --net`, which keeps /sys/fs/bpf and cgroupfs visible), and the CLI.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::Lab;

/// Path of the `tollgate` binary (built by `cargo test` for the agent's own CLI tests).
pub fn tollgate_bin() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        crate::sibling_binary(
            "tollgate",
            "TOLLGATE_BIN",
            "`cargo xtask test` builds it (cargo build -p tollgate)",
        )
    })
}

/// A running `tollgate run`.
pub struct Agent {
    child: Option<Child>,
    pub node: String,
    /// Holds the cluster state, state directory, admin socket, flow log.
    pub dir: PathBuf,
    pub cluster_state: PathBuf,
    pub metrics: SocketAddr,
    pub admin_socket: PathBuf,
    pub flow_log: PathBuf,
    pub bpffs: PathBuf,
    args: Vec<String>,
    /// `--kubernetes` with this kubeconfig instead of `--cluster-state`.
    kubeconfig: Option<PathBuf>,
    /// A command the agent runs under, inside the node namespace (`setpriv ...`).
    wrapper: Vec<String>,
}

impl Agent {
    /// Starts the agent in the lab's node namespace on `cluster_state` (a directory).
    pub fn start(lab: &Lab, dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_on_bpffs(lab, dir, &lab.pin_dir, extra)
    }

    /// `start`, with its pins under `bpffs` (inside the lab's pin directory, so the lab
    /// removes them) instead of the lab's pin directory itself.
    pub fn start_on_bpffs(lab: &Lab, dir: &Path, bpffs: &Path, extra: &[&str]) -> Agent {
        let cluster_state = dir.join("cluster");
        std::fs::create_dir_all(&cluster_state).unwrap();
        let mut agent = Agent {
            child: None,
            node: lab.node.clone(),
            dir: dir.into(),
            cluster_state: cluster_state.clone(),
            metrics: "127.0.0.1:9402".parse().unwrap(),
            admin_socket: dir.join("admin.sock"),
            flow_log: dir.join("flows.log"),
            bpffs: bpffs.into(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            kubeconfig: None,
            wrapper: Vec::new(),
        };
        agent.spawn();
        agent
    }

    /// Starts the agent in the lab's node namespace with `--kubernetes`, reading the API
    /// server of `kubeconfig` (and `--node-name node-1` unless `extra` names another).
    pub fn start_kubernetes(lab: &Lab, dir: &Path, kubeconfig: &Path, extra: &[&str]) -> Agent {
        Agent::start_kubernetes_under(lab, dir, kubeconfig, extra, &[])
    }

    /// `start_kubernetes`, the agent running under `wrapper` (e.g. `setpriv` with the
    /// DaemonSet's capabilities).
    pub fn start_kubernetes_under(
        lab: &Lab,
        dir: &Path,
        kubeconfig: &Path,
        extra: &[&str],
        wrapper: &[&str],
    ) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !args.iter().any(|a| a == "--node-name") {
            args.extend(["--node-name".into(), "node-1".into()]);
        }
        let mut agent = Agent {
            child: None,
            node: lab.node.clone(),
            dir: dir.into(),
            cluster_state: dir.join("cluster"),
            metrics: "127.0.0.1:9402".parse().unwrap(),
            admin_socket: dir.join("admin.sock"),
            flow_log: dir.join("flows.log"),
            bpffs: lab.pin_dir.clone(),
            args,
            kubeconfig: Some(kubeconfig.into()),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("agent.log")).unwrap())
            .spawn()
            .expect("spawn tollgate run");
        self.child = Some(child);
    }

    /// `tollgate run` once more with this agent's command line, while it runs: waits up to
    /// 15 s for it to exit (it is killed then) and returns its exit status and stderr.
    pub fn run_second_instance(&self) -> (Option<std::process::ExitStatus>, String) {
        let log = self.dir.join("second-agent.log");
        let mut child = self
            .command()
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tollgate run");
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    fn command(&self) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.node))
            .args(&self.wrapper)
            .arg(tollgate_bin())
            .arg("run");
        match &self.kubeconfig {
            Some(kubeconfig) => {
                command
                    .arg("--kubernetes")
                    .env("KUBECONFIG", kubeconfig)
                    .env_remove("NODE_NAME");
            }
            // The Kubernetes source is pushed to and runs with the default poll interval;
            // files are polled, faster than by default to keep tests short.
            None => {
                command
                    .arg("--cluster-state")
                    .arg(&self.cluster_state)
                    .arg("--node-name")
                    .arg("lab-node")
                    .arg("--poll-interval-ms")
                    .arg("200");
            }
        }
        command
            .arg("--metrics-addr")
            .arg(self.metrics.to_string())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .arg("--flow-log")
            .arg(&self.flow_log)
            .args(&self.args);
        command
    }

    /// Waits until /readyz answers 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("tollgate run exited with {status}:\n{}", self.log());
            }
            if self.http("/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's own log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// A plain HTTP GET against the agent, from inside the node namespace.
    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        self.http_accepting(path, None)
    }

    /// `http`, with an `Accept` header.
    pub fn http_accepting(&self, path: &str, accept: Option<&str>) -> Option<(u16, String)> {
        let node = self.node.clone();
        let addr = self.metrics;
        let path = path.to_string();
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        std::thread::spawn(move || {
            let _guard = crate::NetNsGuard::enter(&node);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: agent\r\n{accept}Connection: close\r\n\r\n"
            )
            .ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let code = text.split_whitespace().nth(1)?.parse().ok()?;
            let body = text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Some((code, body))
        })
        .join()
        .ok()
        .flatten()
    }

    /// The /metrics text.
    pub fn metrics_text(&self) -> String {
        let (code, body) = self.http("/metrics").expect("scrape /metrics");
        assert_eq!(code, 200);
        body
    }

    /// Runs a `tollgate` CLI command against this agent's admin socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(tollgate_bin())
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .expect("run tollgate")
    }

    /// Kills the agent without a chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: plain signal to our child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().expect("wait")
    }

    /// The agent's process id (nsenter and a wrapper exec it: the child is the agent).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits up to `timeout` for the agent to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Starts the agent again with the same options.
    pub fn restart(&mut self) {
        self.restart_unready();
        self.wait_ready();
    }

    /// Starts the agent again, without waiting for it to be ready.
    pub fn restart_unready(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.spawn();
    }

    /// `tollgate status -o json` of this agent.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "-o", "json"]);
        assert!(
            out.status.success(),
            "tollgate status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// The status of one workload (by pod name), if it is attached.
    pub fn workload(&self, pod: &str) -> Option<serde_json::Value> {
        self.status()["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["pod"] == pod)
            .cloned()
    }

    /// `tollgate check -o json` of `flows` (one per line) against this agent's cluster
    /// state: one answer per flow.
    pub fn check(&self, flows: &str) -> Vec<serde_json::Value> {
        let out = Command::new(tollgate_bin())
            .args(["check", "--cluster-state"])
            .arg(&self.cluster_state)
            .args(["-o", "json", "--flows", "/dev/stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().expect("stdin").write_all(flows.as_bytes())?;
                c.wait_with_output()
            })
            .expect("run tollgate check");
        assert!(
            out.status.success(),
            "tollgate check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("check -o json line"))
            .collect()
    }

    /// Packets of an attached workload by direction and verdict, from `status`.
    pub fn counters(&self, pod: &str) -> [u64; 6] {
        let w = self
            .workload(pod)
            .unwrap_or_else(|| panic!("{pod} is not attached:\n{}", self.log()));
        packets(&w)
    }

    /// Writes the cluster state (one file) and waits until the agent attached `pods`.
    pub fn apply(&self, yaml: &str, pods: &[&str]) {
        std::fs::write(self.cluster_state.join("cluster.yaml"), yaml).unwrap();
        crate::wait_for(Duration::from_secs(15), "the workloads attached", || {
            pods.iter()
                .all(|p| self.workload(p).is_some())
                .then_some(())
        });
    }

    /// The flow log records written so far.
    pub fn flow_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.flow_log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("flow log line is JSON"))
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Packets of a workload of `tollgate status -o json`: ingress allowed, would_drop, dropped,
/// then egress allowed, would_drop, dropped.
pub fn packets(w: &serde_json::Value) -> [u64; 6] {
    let n = |dir: &str, verdict: &str| w[dir][verdict].as_u64().unwrap_or(u64::MAX);
    [
        n("ingress", "allowed"),
        n("ingress", "would_drop"),
        n("ingress", "dropped"),
        n("egress", "allowed"),
        n("egress", "would_drop"),
        n("egress", "dropped"),
    ]
}

/// What `action` adds to the packet counters of each of `pods`, measured once the lab went
/// quiet before and after.
pub fn measure<const N: usize>(
    lab: &Lab,
    agent: &Agent,
    pods: [&str; N],
    action: impl FnOnce(),
) -> [[u64; 6]; N] {
    lab.settle();
    let before = pods.map(|p| agent.counters(p));
    action();
    lab.settle();
    std::array::from_fn(|i| {
        let after = agent.counters(pods[i]);
        std::array::from_fn(|j| after[j] - before[i][j])
    })
}

/// The value of one sample in an OpenMetrics text, `name{labels}` given exactly as the
/// labels appear after sorting by name is not assumed: every given label must match.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .reduce(|a, b| a + b)
}
