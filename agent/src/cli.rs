//! Command line: clap commands and exit codes (0 ok, 1 runtime failure, 2 bad usage or
//! bad input). The edge of the program, where `anyhow` lives.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use std::path::PathBuf;

use crate::{
    Datapath, DatapathOptions,
    admin::{self, Request, Response},
    attach, daemon,
    maps::Mode,
    pins,
};

/// Tollgate: per-workload eBPF packet accounting, dry-run and enforced network policy.
#[derive(Parser, Debug)]
#[command(name = "tollgate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: attach every local workload, keep the datapath in line with the
    /// cluster state, serve metrics and the admin socket, write the flow log.
    ///
    /// Stopping the agent leaves enforcement in place (programs and maps stay pinned under
    /// --bpffs) and a restarted agent adopts them; only --detach-on-exit takes them off.
    Run(Box<RunArgs>),
    /// Show the workloads of the running agent: attach kind, isolation, mode, counters, time
    /// since the last would-drop.
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Admin socket of the running agent.
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Set or clear the mode override of workloads (above pod and namespace annotations and
    /// --default-mode).
    ///
    /// Without --kubernetes: a node-local override on the running agent's admin socket (break
    /// glass: it wins even over the cluster's ModeOverrides). With --kubernetes: a
    /// cluster-scoped ModeOverride object that every agent applies. Either reaches the
    /// datapath within a second, survives restarts and is written to the audit log.
    Mode {
        #[command(subcommand)]
        action: ModeAction,
        /// Admin socket of the running agent.
        #[arg(long, global = true, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        /// Write (or delete) the cluster's ModeOverride through the API server (in-cluster
        /// config or KUBECONFIG) instead of talking to the local agent.
        #[arg(long, global = true)]
        kubernetes: bool,
    },
    /// Live view of the busiest flows and the latest would-drops, refreshed every --interval.
    Flows {
        /// Rows of the busiest flows.
        #[arg(long, default_value_t = 15)]
        limit: usize,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Print once and exit (for scripts).
        #[arg(long)]
        once: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Admin socket of the running agent.
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Write NetworkPolicies that allow exactly the traffic this node's agent observed,
    /// and prove it.
    ///
    /// One policy per workload (`WORKLOAD-observed`, selecting its pods by their stable
    /// labels, never pod names, addresses or pod-template-hash) and direction it was seen
    /// in: one rule per peer workload, selected by its stable labels (its namespace by
    /// name), with the ports it used; peers outside the cluster by port only
    /// (0.0.0.0/0 and ::/0); the node itself is always allowed and left out. Peers seen only
    /// as would-drops (or drops) are left out unless --include-denied. YAML for
    /// `kubectl apply` on standard output; on standard error the replay proof: every
    /// observed flow run through the same evaluator as `tollgate check`, against the
    /// policies in force plus the advised ones, is allowed (exit 1 when one is not).
    Advise {
        /// How far back to look (e.g. 35d, 12h): peer pairs last seen within it. The record
        /// keeps 35 days.
        #[arg(long, default_value = "35d", value_parser = parse_duration)]
        window: std::time::Duration,
        /// Only workloads of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only this workload: NAMESPACE/WORKLOAD (its Deployment, StatefulSet, ... name, or
        /// a pod's name for a pod without a controller).
        #[arg(long, value_name = "NAMESPACE/WORKLOAD", value_parser = parse_workload)]
        workload: Option<String>,
        /// Also allow peers seen only as would-drops or drops.
        #[arg(long)]
        include_denied: bool,
        /// Explain each flow left out as denied: the side that denies it, the policies
        /// isolating that side, and the smallest change that would allow it.
        #[arg(long)]
        explain: bool,
        /// policies (one NetworkPolicy per workload), rule-files (one file per allowed edge,
        /// service.SRC/egress/service.DST.rule, written under --out DIR) or labels (one
        /// identical ingress policy per destination selecting callers by an
        /// egress.tollgate.io/NAMESPACE.WORKLOAD label, and the labels each caller needs).
        #[arg(long, value_enum, default_value_t = AdviseStyle::Policies)]
        style: AdviseStyle,
        /// With --style rule-files: the directory to write the rule files to.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Advise for the whole cluster from the tollgate_flow_packets_total series the
        /// Prometheus at this URL (http://HOST:PORT) scraped from every node over --window,
        /// instead of this node's agent; needs --cluster-state for the labels and policies.
        #[arg(long, value_name = "URL", requires = "cluster_state", value_parser = prometheus_url)]
        prometheus: Option<String>,
        #[command(flatten)]
        prometheus_match: PrometheusMatch,
        /// With --prometheus: the cluster state to advise with (file or directory of
        /// Kubernetes YAML, e.g. `kubectl get ns,pods,netpol -A -o yaml`).
        #[arg(long, requires = "prometheus")]
        cluster_state: Option<PathBuf>,
        /// With --prometheus: a resolver workloads use besides Service kube-system/kube-dns,
        /// as given to `tollgate run --dns-server` (this node's agent knows its own).
        #[arg(long = "dns-server", value_name = "ADDRESS", requires = "prometheus")]
        dns_servers: Vec<std::net::IpAddr>,
        /// Admin socket of the running agent.
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Draw the service graph this node's agent observed: Graphviz DOT, or SVG / PNG
    /// rendered by graphviz's `dot`.
    ///
    /// Nodes are workloads grouped by namespace, `world` (outside the cluster) and the node;
    /// one edge per peer pair and verdict, labelled with its ports and protocols and
    /// coloured by verdict (green allowed, orange would_drop, red dropped; a port seen with
    /// several counts as the worst). Filter by --namespace and --verdict at hundreds of
    /// services.
    Graph {
        /// Peer pairs last seen within this long (e.g. 35d, 12h).
        #[arg(long, default_value = "35d", value_parser = parse_duration)]
        window: std::time::Duration,
        /// Only edges with an end in this namespace (repeat for more).
        #[arg(long)]
        namespace: Vec<String>,
        /// Only edges of this verdict: allowed, would_drop or dropped (repeat for more).
        #[arg(long, value_parser = ["allowed", "would_drop", "dropped"])]
        verdict: Vec<String>,
        /// dot (text), svg or png (needs graphviz's `dot`).
        #[arg(short = 'o', long, default_value = "dot", value_parser = ["dot", "svg", "png"])]
        output: String,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Draw the whole cluster from the tollgate_flow_packets_total series the
        /// Prometheus at this URL (http://HOST:PORT) scraped from every node, instead of
        /// this node's agent.
        #[arg(long, value_name = "URL", value_parser = prometheus_url)]
        prometheus: Option<String>,
        #[command(flatten)]
        prometheus_match: PrometheusMatch,
        /// Admin socket of the running agent.
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Evaluate flows offline against a cluster state, with the same compiler and decision
    /// procedure as the datapath; no kernel needed.
    ///
    /// Each input line is `SRC DST PORT/PROTOCOL`, SRC and DST being NAMESPACE/POD,
    /// NAMESPACE/WORKLOAD (every pod of that Deployment, StatefulSet...: allowed only when
    /// allowed between all their pods) or an IP address, DST also a Service's DNS name
    /// (`NAME.NAMESPACE.svc[.cluster.local]`: its virtual address) or a DNS name outside the
    /// cluster (decided as EgressAllowlists and ipBlocks would decide its addresses), e.g.
    /// `x/a y/b 80/tcp`, `x/a 10.0.0.7 443/tcp`, `pay/card api.stripe.com 443/tcp` or
    /// `x/a y/b icmp`; PORT a number, or a named port of the
    /// destination (a Service's port name when DST is a Service address); PROTOCOL tcp, udp,
    /// sctp, or icmp / icmpv6 (no port). A flow to a Service address is decided against its
    /// backends: allowed at the source's egress only when every backend is, and at each
    /// backend's ingress on its target port. Traffic between a pod and its own node (from
    /// the Node objects and `spec.nodeName`), and from a pod to itself, is always allowed.
    /// Blank lines and lines starting with # are skipped. A flow is allowed only when the
    /// source's egress and the destination's ingress both allow it; a denied one comes with
    /// the side that denied it, the policies isolating that side and the smallest change
    /// that would allow it (labels for a workload, or a rule for a policy).
    ///
    /// Exit status: 0, or 1 with --fail-on-deny when a flow is denied, or 2 for bad input.
    Check {
        /// File or directory of Kubernetes YAML (Namespaces, Pods, NetworkPolicies, and
        /// optionally Services, EndpointSlices, Nodes, ModeOverrides and EgressAllowlists).
        #[arg(long)]
        cluster_state: std::path::PathBuf,
        /// Flows to evaluate (default: standard input).
        #[arg(long)]
        flows: Option<std::path::PathBuf>,
        /// Output format: text, json (one object per line), json-array or yaml.
        #[arg(short = 'o', long, value_enum, default_value_t = CheckOutput::Text)]
        output: CheckOutput,
        /// For NAMESPACE/POD endpoints, use the pod's IPv6 address where it has one. A line
        /// whose ends do not both have one is checked over IPv4, as its connection would go.
        #[arg(long)]
        ipv6: bool,
        /// Exit with status 1 when any flow is denied (for CI).
        #[arg(long)]
        fail_on_deny: bool,
        /// A resolver workloads use besides Service kube-system/kube-dns, as given to
        /// `tollgate run --dns-server`: DNS to it is never isolated by an EgressAllowlist.
        #[arg(long = "dns-server", value_name = "ADDRESS")]
        dns_servers: Vec<std::net::IpAddr>,
    },
    /// Load the embedded eBPF programs into this kernel (the verifier checks them), report
    /// how workloads would attach, and remove everything again.
    Selftest {
        /// bpffs directory for the temporary pins.
        #[arg(long, default_value = "/sys/fs/bpf/tollgate-selftest")]
        bpffs: std::path::PathBuf,
    },
}

/// `tollgate run` flags.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// File or directory of Kubernetes YAML (Namespaces, Pods with status.podIPs,
    /// NetworkPolicies, and optionally Services, EndpointSlices, Nodes, ModeOverrides and
    /// EgressAllowlists; multi-document and `kind: List`), re-read when it changes. Its `tollgate.io/interface` and
    /// `tollgate.io/cgroup` pod annotations choose where a pod attaches, checked against
    /// what the node says (a host route to the pod's IP, the cgroup its UID names).
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub cluster_state: Option<PathBuf>,
    /// Watch the API server instead (in-cluster config or KUBECONFIG): Pods, Namespaces,
    /// NetworkPolicies, Services, EndpointSlices, Nodes, ModeOverrides and EgressAllowlists.
    /// Only this node's pods (--node-name) are attached; every pod of the cluster has an
    /// identity.
    #[arg(long)]
    pub kubernetes: bool,
    /// With --kubernetes: believe the tollgate.io/interface and tollgate.io/cgroup pod
    /// annotations (pod authors write them; by default they are ignored and attach points
    /// are found from routes and pod UIDs).
    #[arg(long, requires = "kubernetes")]
    pub trust_attach_annotations: bool,
    /// With --kubernetes: repeats of a denied flow (same pod, verdict, peer, port and
    /// protocol) within this window raise the count of one Kubernetes Event.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub event_dedup_window: std::time::Duration,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:9402")]
    pub metrics_addr: std::net::SocketAddr,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = pins::DEFAULT_BPFFS_DIR)]
    pub bpffs: PathBuf,
    /// Directory for the agent's own state: mode overrides, audit log, persisted counters.
    #[arg(long, default_value = "/var/lib/tollgate")]
    pub state_dir: PathBuf,
    /// Admin socket for `status`, `mode` and `flows` (root only).
    #[arg(long, default_value = admin::DEFAULT_SOCKET)]
    pub admin_socket: PathBuf,
    /// Mode of workloads without an override or a tollgate.io/mode annotation.
    #[arg(long, default_value = "log")]
    pub default_mode: Mode,
    /// Write the flow log (JSON lines) to this file instead of stdout.
    #[arg(long)]
    pub flow_log: Option<PathBuf>,
    /// Flow events per second per workload (enforced in the kernel; 0 turns events off).
    #[arg(long, default_value_t = 10)]
    pub log_rate: u32,
    /// Flow events a workload may emit back to back before --log-rate applies.
    #[arg(long, default_value_t = 20)]
    pub log_burst: u32,
    /// Upper bound on tollgate_flow_packets_total series; packets beyond it are counted in
    /// tollgate_flow_series_overflow_total.
    #[arg(long, default_value_t = 10000)]
    pub max_flow_series: usize,
    /// Once --max-flow-series is reached, a new series takes the place of the one idle
    /// longest if it has been idle this long (a port scan's series give way to live
    /// traffic); one that comes back continues from its last value, if it is among the
    /// --max-flow-series retired series kept (the smallest go first; one gone starts over,
    /// which Prometheus reads as a counter reset).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub flow_series_idle: std::time::Duration,
    /// How long the records behind `advise`, `graph` and `--if-quiet` keep what they saw:
    /// peer pairs, workloads gone from the node, hours of would-drops.
    #[arg(long, default_value = "35d", value_parser = parse_duration)]
    pub record_retention: std::time::Duration,
    /// Peer pairs the observed-flow record holds at most (about 200 bytes each in memory
    /// and in --state-dir, up to about 550 with the addresses of a peer outside the
    /// cluster); when full, a tenth goes: pairs seen at one poll only first, then those
    /// seen over the shortest span (the longest unseen first).
    #[arg(long, default_value_t = 20_000)]
    pub record_capacity: usize,
    /// Detach every program and remove the pins when the agent stops (uninstall:
    /// `kubectl set env daemonset/tollgate TOLLGATE_DETACH_ON_EXIT=true` before deleting it).
    #[arg(long, env = "TOLLGATE_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,
    /// Remove pins and programs left by an earlier agent before starting (needed after an
    /// upgrade that changed the map layout; enforcement lapses until workloads re-attach).
    #[arg(long)]
    pub reset_state: bool,
    /// This node: pods whose spec.nodeName names another node are never attached here, the
    /// Node object of this name adds its addresses to the node's own, and the flow log's
    /// `node` field. Default: $NODE_NAME, else the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// How often the cluster state is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// How TC programs attach: auto (TCX on 6.6+, else clsact), tcx or clsact.
    #[arg(long, value_enum, default_value_t = TcModeArg::Auto)]
    pub tc_mode: TcModeArg,
    /// Capacity of the connection tracking table (flows). An overflow table of a quarter of
    /// this holds the new flows of workloads beyond their share.
    #[arg(long, default_value_t = agent_common::CONNTRACK_CAPACITY)]
    pub conntrack_capacity: u32,
    /// The most of the connection tracking table one workload may fill, in percent. Beyond
    /// it, its new flows go to the overflow table: a flood of new flows toward one workload
    /// evicts that workload's flows, never the established connections of the others.
    /// 100 turns the limit off.
    #[arg(long, default_value_t = agent_common::CONNTRACK_SHARE_PERCENT,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub conntrack_share: u32,
    /// How often the connection tracking tables are walked: expired flows and flows of
    /// removed workloads deleted, each workload's share count corrected, map occupancy
    /// counted.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub conntrack_census_interval: std::time::Duration,
    /// Whose word a pod's own tollgate.io/mode annotation is: `stricter` (it may only turn
    /// its namespace's log into drop; the namespace annotation and the overrides are the
    /// security team's) or `any` (it wins either way).
    #[arg(long, value_enum, default_value_t = PodModeArg::Stricter)]
    pub pod_mode_annotations: PodModeArg,
    /// The cgroup v2 mount under which the kubepods hierarchy lives (pods' cgroup
    /// directories are found from their UIDs there). Default: /sys/fs/cgroup/unified on
    /// hybrid hosts, else /sys/fs/cgroup.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// A resolver the workloads use, besides the ClusterIPs and endpoints of Service
    /// kube-system/kube-dns (repeat for more; node-local caches, resolvers outside the
    /// cluster). Only answers from resolvers teach EgressAllowlists anything.
    #[arg(long = "dns-server", value_name = "ADDRESS")]
    pub dns_servers: Vec<std::net::IpAddr>,
    /// The shortest time an address from a DNS answer is allowed for, whatever its TTL.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub dns_min_ttl: std::time::Duration,
    /// How long after its TTL (or --dns-min-ttl) new connections to a learned address are
    /// still allowed: a connection opened just before expiry goes through. Established
    /// connections are never cut by expiry.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub dns_grace: std::time::Duration,
    /// Addresses learned from DNS kept per workload; beyond it, new ones are counted in
    /// tollgate_egress_learned_overflow_total and not allowed.
    #[arg(long, default_value_t = 1024)]
    pub dns_max_per_workload: usize,
    /// Tests only: wait this long before learning from each DNS answer (a loaded agent).
    #[arg(long, default_value = "0s", value_parser = parse_duration, hide = true)]
    pub dns_learn_delay: std::time::Duration,
}

/// `--pod-mode-annotations` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PodModeArg {
    Stricter,
    Any,
}

/// `--tc-mode` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TcModeArg {
    Auto,
    Tcx,
    Clsact,
}

/// `tollgate mode` actions.
#[derive(Subcommand, Debug)]
pub enum ModeAction {
    /// Set the mode of TARGET.
    ///
    /// TARGET is `NAMESPACE/NAME` (a workload: every pod of that Deployment, StatefulSet,
    /// DaemonSet, CronJob or Job, now and after its rollouts; or the pod of that name),
    /// `'NAMESPACE/*'` (every pod of a namespace) or `'*'` (every pod); quote the `*` forms
    /// in a shell. The most specific target wins: pod name, then workload, then namespace,
    /// then `*`. MODE is `log` (count and sample would-drops, let them pass) or `drop`.
    Set {
        /// NAMESPACE/NAME, 'NAMESPACE/*' or '*'.
        target: String,
        /// log or drop.
        mode: Mode,
        /// Why: kept in the audit log (and with --kubernetes in the ModeOverride and its
        /// Event).
        #[arg(long)]
        reason: Option<String>,
        /// Refuse to flip to drop unless every workload TARGET matches on this node has
        /// been observed for at least DURATION (e.g. 7d, 12h) with no would-drop within it;
        /// a refusal names what is missing and the latest would-drop flows with the change
        /// that would allow each, and changes nothing. A flip to log is never refused.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        if_quiet: Option<std::time::Duration>,
        /// With --kubernetes --if-quiet: the Prometheus (http://HOST:PORT) that scrapes every
        /// node's agent; the check covers every node's record through it.
        #[arg(long, value_name = "URL", requires = "if_quiet", value_parser = prometheus_url)]
        prometheus: Option<String>,
        #[command(flatten)]
        prometheus_match: PrometheusMatch,
        /// With --prometheus: the cluster state (file or directory of Kubernetes YAML, e.g.
        /// `kubectl get ns,pods,netpol,egressallowlists -A -o yaml`) to explain each
        /// would-drop of a refusal with: the policies isolating its side and the smallest
        /// change that would allow it.
        #[arg(long, requires = "prometheus")]
        cluster_state: Option<PathBuf>,
    },
    /// Remove the override of TARGET (as given to `set`); the next override in precedence,
    /// the annotations and --default-mode apply again.
    Clear {
        /// NAMESPACE/NAME, 'NAMESPACE/*' or '*'.
        target: String,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // A command's output piped into `head` ends quietly when the reader goes, as other
    // command-line tools do, instead of panicking on the broken pipe. Not the agent: it
    // writes to sockets and its flow log, where a gone reader is an error to handle.
    if !matches!(cli.command, Command::Run(_)) {
        // SAFETY: restores the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => run(*args).map(|()| ExitCode::SUCCESS),
        Command::Status {
            output,
            admin_socket,
        } => status(&admin_socket, output),
        Command::Mode {
            action,
            admin_socket,
            kubernetes: false,
        } => mode(&admin_socket, action),
        Command::Mode {
            action,
            kubernetes: true,
            ..
        } => cluster_mode(action),
        Command::Flows {
            limit,
            interval,
            once,
            output,
            admin_socket,
        } => flows(&admin_socket, limit, interval, once, output),
        Command::Selftest { bpffs } => selftest(&bpffs).map(|()| ExitCode::SUCCESS),
        Command::Graph {
            window,
            namespace,
            verdict,
            output,
            out,
            prometheus,
            prometheus_match,
            admin_socket,
        } => graph(
            Record::of(
                &admin_socket,
                prometheus.as_deref(),
                prometheus_match.matchers(),
            ),
            window,
            crate::graph::GraphFilter {
                namespaces: namespace,
                verdicts: verdict,
            },
            &output,
            out.as_deref(),
        ),
        Command::Advise {
            window,
            namespace,
            workload,
            include_denied,
            explain,
            style,
            out,
            prometheus,
            prometheus_match,
            cluster_state,
            dns_servers,
            admin_socket,
        } => advise(
            match (prometheus.as_deref(), cluster_state.as_deref()) {
                (Some(url), Some(state)) => Record::Prometheus {
                    url,
                    matchers: prometheus_match.matchers(),
                    state: Some(state),
                },
                _ => Record::of(&admin_socket, None, ""),
            },
            window,
            crate::compile::advise::AdviseOptions {
                namespace,
                workload,
                include_denied,
                explain,
                dns_servers,
                style: match style {
                    AdviseStyle::Policies => crate::compile::advise::Style::Policies,
                    AdviseStyle::RuleFiles => crate::compile::advise::Style::RuleFiles,
                    AdviseStyle::Labels => crate::compile::advise::Style::Labels,
                },
            },
            out.as_deref(),
        ),
        Command::Check {
            cluster_state,
            flows,
            output,
            ipv6,
            fail_on_deny,
            dns_servers,
        } => check(
            &cluster_state,
            flows.as_deref(),
            output,
            ipv6,
            fail_on_deny,
            &dns_servers,
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            if e.downcast_ref::<crate::daemon::BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// A Prometheus URL as `--prometheus` takes it: `http://HOST:PORT`, an optional path after.
fn prometheus_url(s: &str) -> Result<String, String> {
    let rest = s.strip_prefix("http://").ok_or_else(|| {
        format!("{s:?}: give Prometheus as http://HOST:PORT (https is not supported)")
    })?;
    let authority = rest.split('/').next().unwrap_or_default();
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?}: give Prometheus as http://HOST:PORT")),
    }
}

/// `--prometheus-match`, beside each `--prometheus`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PrometheusMatch {
    /// With --prometheus: label matchers every series read must also have (PromQL,
    /// without braces, e.g. 'job="tollgate-system/tollgate"'): only the agents' own
    /// series, not those of whatever else Prometheus scrapes, which anyone who can get a
    /// pod scraped could fill with made-up pairs.
    #[arg(long, value_name = "MATCHERS", requires = "prometheus", value_parser = prometheus_matchers)]
    prometheus_match: Option<String>,
}

impl PrometheusMatch {
    /// The matchers; empty when none were given.
    fn matchers(&self) -> &str {
        self.prometheus_match.as_deref().unwrap_or_default()
    }
}

/// PromQL label matchers without braces: `label="value"`, `=`, `!=`, `=~` or `!~`, comma
/// separated; values double-quoted (backslash escapes).
fn prometheus_matchers(s: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "{s:?}: give label matchers as PromQL writes them inside braces, e.g. 'job=\"tollgate\"' or 'job=\"tollgate\",node=~\"a.*\"'"
        )
    };
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    loop {
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..name_len];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(bad());
        }
        rest = rest[name_len..].trim_start();
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| rest.starts_with(op))
            .ok_or_else(bad)?;
        rest = rest[op.len()..].trim_start();
        let mut chars = rest.char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(bad());
        }
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.ok_or_else(bad)?;
        rest = rest[end + 1..].trim_start();
        if !rest.is_empty() {
            rest = rest.strip_prefix(',').ok_or_else(bad)?.trim_start();
        }
        if rest.is_empty() {
            return Ok(s.trim().trim_end_matches(',').to_string());
        }
    }
}

/// A duration as people write it: `90s`, `12h`, `7d`, `1h 30m`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30m, 12h, 7d)"))
}

fn parse_workload(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, wl)) if !ns.is_empty() && !wl.is_empty() && !wl.contains('/') => Ok(s.into()),
        _ => Err(format!(
            "{s:?}: expected NAMESPACE/WORKLOAD, e.g. bank/ledger"
        )),
    }
}

/// `advise --style`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AdviseStyle {
    Policies,
    RuleFiles,
    Labels,
}

/// Output formats of `check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckOutput {
    Text,
    /// One JSON object per line.
    Json,
    /// One JSON array of every result.
    JsonArray,
    /// A YAML list of every result.
    Yaml,
}

/// One evaluated flow, as `check -o json` prints it.
#[derive(Debug, serde::Serialize)]
pub struct CheckResult {
    pub src: String,
    pub dst: String,
    pub port: u16,
    pub protocol: String,
    pub egress: &'static str,
    pub ingress: &'static str,
    pub verdict: &'static str,
    /// The policies that decided: those whose rules allowed it on both sides, or for a
    /// denied flow those isolating the side (or sides) that denied it.
    pub policies: Vec<String>,
    pub egress_policies: Vec<String>,
    pub ingress_policies: Vec<String>,
    /// `NAMESPACE/NAME` of the Service whose address DST is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<String>,
    /// For a denied flow: each denying side, its isolating policies and the smallest change
    /// that would allow the flow, in one sentence per side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
    /// The same, structured.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub explanations: Vec<crate::compile::explain::Explanation>,
}

fn word(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// The `PORT/PROTOCOL` of a flow line.
struct FlowProtocol<'a> {
    /// A NetworkPolicy protocol; `None` for ICMP, which has no ports.
    protocol: Option<crate::compile::model::Protocol>,
    number: u8,
    name: String,
    /// As given (a number or a name); `None` for ICMP.
    port: Option<&'a str>,
}

/// Parses `PORT/PROTOCOL`, or `icmp` / `icmpv6` (an ICMP type number before them is accepted
/// and ignored; a name or a port beyond 255 is an error).
fn flow_protocol(spec: &str) -> Result<FlowProtocol<'_>, String> {
    use crate::compile::model::Protocol;
    let (port, proto) = match spec.split_once('/') {
        Some((port, proto)) => (Some(port), proto),
        None => (None, spec),
    };
    let icmp = |number, name: &str| FlowProtocol {
        protocol: None,
        number,
        name: name.into(),
        port: None,
    };
    let icmp_number = match proto.to_ascii_lowercase().as_str() {
        "icmp" => Some(agent_common::PROTO_ICMP),
        "icmpv6" | "icmp6" | "ipv6-icmp" => Some(agent_common::PROTO_ICMPV6),
        _ => None,
    };
    if let Some(number) = icmp_number {
        if port.is_some_and(|p| p.parse::<u8>().is_err()) {
            return Err(format!(
                "{spec:?}: ICMP has no ports (write {proto}; a type number 0-255 before it is accepted and ignored)"
            ));
        }
        let name = if number == agent_common::PROTO_ICMP {
            "icmp"
        } else {
            "icmpv6"
        };
        return Ok(icmp(number, name));
    }
    let protocol = Protocol::parse(&proto.to_ascii_uppercase())
        .ok_or_else(|| format!("{proto:?} is not tcp, udp, sctp, icmp or icmpv6"))?;
    let port = port.ok_or_else(|| format!("{spec:?}: expected PORT/PROTOCOL, e.g. 80/tcp"))?;
    Ok(FlowProtocol {
        protocol: Some(protocol),
        number: protocol.number(),
        name: proto.to_ascii_lowercase(),
        port: Some(port),
    })
}

/// Evaluates one `SRC DST PORT/PROTOCOL` line (`icmp` and `icmpv6` take no port). A
/// workload (`NAMESPACE/WORKLOAD`) stands for every pod of it: the flow is allowed only
/// when it is between every pair of their pods.
pub fn check_line(
    ev: &crate::compile::eval::Evaluator,
    line: &str,
    ipv6: bool,
) -> Result<CheckResult, String> {
    use crate::compile::{eval::endpoints, services::Frontend};
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [src, dst, port_proto] = fields.as_slice() else {
        return Err(format!("expected `SRC DST PORT/PROTOCOL`, got {line:?}"));
    };
    let FlowProtocol {
        protocol,
        number: proto,
        name: proto_name,
        port,
    } = flow_protocol(port_proto)?;
    let prefer_v6 = ipv6 || proto == agent_common::PROTO_ICMPV6;
    let mut srcs = endpoints(ev, src, prefer_v6)?;
    if srcs.iter().any(|e| e.domain.is_some()) {
        // A name is where a flow goes, never where it comes from: answers name addresses
        // for the pod that asked, not for the others that use them.
        return Err(format!(
            "{src:?}: SRC is NAMESPACE/POD, NAMESPACE/WORKLOAD or an IP address (a DNS name only as DST)"
        ));
    }
    if let Some(f) = srcs.iter().find_map(|e| {
        ev.compiled
            .frontend_of_address(e.ip)
            .filter(|_| e.pod.is_none())
    }) {
        // Connections to it leave from its backends, and its replies are un-DNATed to it
        // by the node: no flow starts at a virtual address.
        return Err(format!(
            "{src:?} is the virtual address of Service {}, which starts no flow: give one of its backends as SRC",
            f.service_id()
        ));
    }
    let mut dsts = endpoints(ev, dst, prefer_v6)?;
    // One family for the line, as a connection has: the one asked for, unless an end has
    // no address of it (a pod without IPv6, an address or Service of the other family);
    // then the other, if both ends have that one.
    let one_family = |srcs: &[crate::compile::eval::Endpoint],
                      dsts: &[crate::compile::eval::Endpoint]| {
        srcs.iter()
            .chain(dsts)
            .all(|e| e.ip.is_ipv6() == srcs[0].ip.is_ipv6())
    };
    if protocol.is_some() && !one_family(&srcs, &dsts) {
        let (other_srcs, other_dsts) = (
            endpoints(ev, src, !prefer_v6)?,
            endpoints(ev, dst, !prefer_v6)?,
        );
        if !one_family(&other_srcs, &other_dsts) {
            return Err(format!(
                "{src} and {dst} have no address family in common (one is IPv4 only, the other IPv6 only)"
            ));
        }
        (srcs, dsts) = (other_srcs, other_dsts);
    }
    if let Some(e) = srcs
        .iter()
        .chain(&dsts)
        .find(|e| protocol.is_none() && e.ip.is_ipv6() != (proto == agent_common::PROTO_ICMPV6))
    {
        return Err(format!(
            "{proto_name} does not carry {} traffic ({} is {})",
            if e.ip.is_ipv6() { "IPv6" } else { "IPv4" },
            e.ip,
            if e.ip.is_ipv6() {
                "IPv6: use icmpv6"
            } else {
                "IPv4: use icmp"
            }
        ));
    }
    let frontend = ev.compiled.frontend_of_address(dsts[0].ip);
    // The port on each destination: a number, or a name resolved on the Service or on each
    // destination pod (a pod without that name is left out; none with it is an error).
    let port_of = |dst_ep: &crate::compile::eval::Endpoint| -> Result<Option<u16>, String> {
        let (Some(protocol), Some(port)) = (protocol, port) else {
            return Ok(Some(0));
        };
        match port.parse::<u16>() {
            Ok(p) if p > 0 => return Ok(Some(p)),
            _ if port.chars().all(|c| c.is_ascii_digit()) => {
                return Err(format!("{port:?} is not a port (1-65535)"));
            }
            _ => {}
        }
        Ok(match (frontend, &dst_ep.pod) {
            (Some(f), _) => Some(
                f.ports
                    .iter()
                    .find(|p| p.name == port && p.protocol == protocol)
                    .map(|p| p.port)
                    .ok_or_else(|| {
                        format!(
                            "Service {} has no {proto_name} port named {port:?}",
                            f.service_id()
                        )
                    })?,
            ),
            (None, Some(pod)) => ev.named_port(pod, port, protocol),
            (None, None) => None,
        })
    };
    let (mut egress_allowed, mut ingress_allowed) = (true, true);
    // Per side, the policies of the pairs it allowed and of those it denied: a side's list
    // explains its verdict (the denying policies when any pair was denied).
    let mut sides: [[Vec<String>; 2]; 2] = Default::default();
    let mut explanations = Vec::new();
    let mut shown_port = None;
    for dst_ep in &dsts {
        let Some(number) = port_of(dst_ep)? else {
            continue;
        };
        shown_port.get_or_insert(number);
        for src_ep in &srcs {
            let (egress, ingress) = ev.flow(src_ep.clone(), dst_ep.clone(), proto, number);
            for (side, decision) in sides.iter_mut().zip([&egress, &ingress]) {
                let into = &mut side[usize::from(!decision.allowed)];
                for p in &decision.policies {
                    if !into.contains(p) {
                        into.push(p.clone());
                    }
                }
            }
            let denied = !(egress.allowed && ingress.allowed);
            egress_allowed &= egress.allowed;
            ingress_allowed &= ingress.allowed;
            // Every denied pair: pods of a workload, a named port's numbers on them and a
            // Service's backends can differ; `merge` lists each change once.
            if denied {
                let port_name = port.filter(|p| p.parse::<u16>().is_err());
                explanations.extend(ev.explain(src_ep, dst_ep, proto, protocol, number, port_name));
            }
        }
    }
    let Some(port_number) = shown_port else {
        let port = port.unwrap_or_default();
        return Err(match &dsts[0].pod {
            Some(_) => format!("{dst} has no {proto_name} port named {port:?}"),
            None => format!("{port:?} is not a port number, and {dst} has no named ports"),
        });
    };
    let [egress_side, ingress_side] = sides;
    let pick = |[allowed_by, denied_by]: [Vec<String>; 2], allowed: bool| {
        if allowed { allowed_by } else { denied_by }
    };
    let egress_policies = pick(egress_side, egress_allowed);
    let ingress_policies = pick(ingress_side, ingress_allowed);
    let allowed = egress_allowed && ingress_allowed;
    let explanations = crate::compile::explain::merge(explanations);
    // What decided the verdict: both sides' allowing policies, or only the denying side's
    // (an allowing policy on the other side is not the file to open).
    let mut policies = Vec::new();
    for (side, side_allowed) in [
        (&egress_policies, egress_allowed),
        (&ingress_policies, ingress_allowed),
    ] {
        if allowed || !side_allowed {
            for p in side {
                if !policies.contains(p) {
                    policies.push(p.clone());
                }
            }
        }
    }
    Ok(CheckResult {
        src: src.to_string(),
        dst: dst.to_string(),
        port: port_number,
        protocol: proto_name,
        egress: word(egress_allowed),
        ingress: word(ingress_allowed),
        verdict: word(allowed),
        policies,
        egress_policies,
        ingress_policies,
        dst_service: frontend.map(Frontend::service_id),
        explanation: (!allowed && !explanations.is_empty()).then(|| {
            explanations
                .iter()
                .map(|e| e.summary())
                .collect::<Vec<_>>()
                .join("; ")
        }),
        explanations,
    })
}

/// Loads a cluster state and builds the offline evaluator over every pod.
pub fn evaluator_for(
    path: &std::path::Path,
) -> anyhow::Result<(crate::compile::eval::Evaluator, crate::sources::Loaded)> {
    use crate::compile::{eval::Evaluator, policy};
    if !path.exists() {
        anyhow::bail!(
            "cluster state {}: no such file or directory",
            path.display()
        );
    }
    let mut source = crate::sources::FileSource::new(path);
    let loaded = source.load();
    let mut allocator = policy::IdentityAllocator::default();
    let options = policy::CompileOptions {
        node_addresses: policy::NodeAddresses::from_nodes(&loaded.state),
        ..Default::default()
    };
    let compiled = policy::compile(&loaded.state, &mut allocator, None, &options);
    let ev = Evaluator::new(compiled, &loaded.state, options.node_addresses)
        .map_err(|((ns, name), e)| anyhow::anyhow!("compiling rules of pod {ns}/{name}: {e}"))?;
    Ok((ev, loaded))
}

fn check(
    cluster_state: &std::path::Path,
    flows: Option<&std::path::Path>,
    output: CheckOutput,
    ipv6: bool,
    fail_on_deny: bool,
    dns_servers: &[std::net::IpAddr],
) -> anyhow::Result<ExitCode> {
    let (ev, loaded) = match evaluator_for(cluster_state) {
        Ok((ev, loaded)) => (ev.with_dns_servers(dns_servers), loaded),
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut bad_input = false;
    for e in &loaded.errors {
        eprintln!("tollgate: rejected {}", printable(&e.to_string()));
        bad_input = true;
    }
    if bad_input {
        // Exit status 2 says so too; the verdicts still help find the rest of the problem.
        eprintln!(
            "tollgate: the verdicts below leave the rejected definitions out (an object \
             defined validly elsewhere too is taken from that definition)"
        );
    }
    for w in loaded
        .warnings
        .iter()
        .cloned()
        .chain(missing_namespace_warnings(&loaded.state))
    {
        eprintln!("tollgate: warning: {w}");
    }
    let reader: Box<dyn std::io::BufRead> = match flows {
        Some(path) => match std::fs::File::open(path) {
            Ok(file) => Box::new(std::io::BufReader::new(file)),
            Err(e) => {
                eprintln!("tollgate: --flows {}: {e}", path.display());
                return Ok(ExitCode::from(2));
            }
        },
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let mut denied = false;
    let mut collected = Vec::new();
    let mut lines = FlowLines::new(reader);
    loop {
        let (n, line) = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                // Bad input, not a denied flow: what came before still counts.
                eprintln!("tollgate: read flows: {e}");
                bad_input = true;
                break;
            }
        };
        let line = match line {
            Ok(line) => line,
            Err(why) => {
                eprintln!("tollgate: line {n}: {why}");
                bad_input = true;
                continue;
            }
        };
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let r = match check_line(&ev, trimmed, ipv6) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("tollgate: line {n}: {}", printable(&e));
                bad_input = true;
                continue;
            }
        };
        denied |= r.verdict != "allowed";
        match output {
            CheckOutput::Json => println!("{}", serde_json::to_string(&r)?),
            CheckOutput::Text => {
                let by = |policies: &[String]| {
                    if policies.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", policies.join(", "))
                    }
                };
                println!(
                    "{} -> {} {}: {} (egress {}{}, ingress {}{})",
                    r.src,
                    r.dst,
                    if r.protocol.starts_with("icmp") {
                        r.protocol.clone()
                    } else {
                        format!("{}/{}", r.port, r.protocol)
                    },
                    r.verdict,
                    r.egress,
                    by(&r.egress_policies),
                    r.ingress,
                    by(&r.ingress_policies),
                );
                for e in &r.explanations {
                    println!("  {}", e.summary());
                }
            }
            CheckOutput::JsonArray | CheckOutput::Yaml => collected.push(r),
        }
    }
    match output {
        CheckOutput::JsonArray => println!("{}", serde_json::to_string_pretty(&collected)?),
        CheckOutput::Yaml => {
            let yaml = serde_norway::to_string(&collected)?;
            println!("{}", yaml.trim_end());
        }
        CheckOutput::Text | CheckOutput::Json => {}
    }
    Ok(if bad_input {
        ExitCode::from(2)
    } else if denied && fail_on_deny {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The longest flow line `check` reads: a flow is three short words.
const MAX_FLOW_LINE: usize = 4096;

/// Lines of flows, numbered from 1, each at most `MAX_FLOW_LINE` bytes: a longer one, or one
/// that is not UTF-8, is an error of that line (the rest is still read); an error reading
/// the input ends it.
struct FlowLines<R> {
    reader: R,
    number: usize,
}

impl<R: std::io::BufRead> FlowLines<R> {
    fn new(reader: R) -> Self {
        FlowLines { reader, number: 0 }
    }

    #[allow(clippy::type_complexity)]
    fn next_line(&mut self) -> std::io::Result<Option<(usize, Result<String, String>)>> {
        use std::io::{BufRead as _, Read as _};
        let mut bytes = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_FLOW_LINE as u64 + 1)
            .read_until(b'\n', &mut bytes)?;
        if read == 0 {
            return Ok(None);
        }
        self.number += 1;
        if bytes.len() > MAX_FLOW_LINE && bytes.last() != Some(&b'\n') {
            // Skip the rest of the line, a bounded piece at a time; a line with no end in
            // sight (`/dev/zero`) is no list of flows.
            for piece in 0.. {
                if piece == 256 {
                    return Err(std::io::Error::other(format!(
                        "line {} goes on for more than {} KiB: not a list of flows",
                        self.number,
                        256 * MAX_FLOW_LINE / 1024
                    )));
                }
                let mut rest = Vec::new();
                let n = (&mut self.reader)
                    .take(MAX_FLOW_LINE as u64)
                    .read_until(b'\n', &mut rest)?;
                if n == 0 || rest.last() == Some(&b'\n') {
                    break;
                }
            }
            let why = format!("longer than {MAX_FLOW_LINE} bytes");
            return Ok(Some((self.number, Err(why))));
        }
        let line = String::from_utf8(bytes).map_err(|e| {
            format!(
                "not UTF-8 (an invalid byte at column {})",
                e.utf8_error().valid_up_to() + 1
            )
        });
        Ok(Some((self.number, line)))
    }
}

/// Text from the input as it may be shown on a terminal: control characters escaped, so a
/// line or a name cannot move the cursor, retitle the window or hide what follows.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n'
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Policies whose namespaceSelector names (by `kubernetes.io/metadata.name`) a namespace the
/// cluster state does not have: nothing there is selected, often a typo.
pub fn missing_namespace_warnings(state: &crate::compile::model::ClusterState) -> Vec<String> {
    use crate::compile::model::{NAMESPACE_NAME_LABEL as NAME, Operator, PeerSpec};
    let known = |ns: &String| {
        state.namespaces.contains_key(ns)
            || state
                .pods
                .range((ns.clone(), String::new())..)
                .next()
                .is_some_and(|((pod_ns, _), _)| pod_ns == ns)
    };
    let mut out = Vec::new();
    for policy in state.policies.values() {
        let mut missing = std::collections::BTreeSet::new();
        for rule in policy.ingress.iter().chain(&policy.egress).flatten() {
            for peer in &rule.peers {
                let PeerSpec::Pods {
                    namespaces: Some(selector),
                    ..
                } = peer
                else {
                    continue;
                };
                let named = selector.match_labels.get(NAME).into_iter().chain(
                    selector
                        .expressions
                        .iter()
                        .filter(|r| r.key == NAME && r.operator == Operator::In)
                        .flat_map(|r| &r.values),
                );
                missing.extend(named.filter(|ns| !known(ns)).cloned());
            }
        }
        for ns in missing {
            out.push(format!(
                "NetworkPolicy {}/{}: its namespaceSelector names namespace {ns:?}, which is not in the cluster state (nothing there is selected)",
                policy.namespace, policy.name
            ));
        }
    }
    out
}

/// Where the observed-flow record comes from.
enum Record<'a> {
    /// This node's agent.
    Agent(&'a std::path::Path),
    /// Every node's series in Prometheus; the cluster state to advise with.
    Prometheus {
        url: &'a str,
        /// `--prometheus-match`: PromQL label matchers (may be empty).
        matchers: &'a str,
        state: Option<&'a std::path::Path>,
    },
}

impl<'a> Record<'a> {
    fn of(
        socket: &'a std::path::Path,
        prometheus: Option<&'a str>,
        matchers: &'a str,
    ) -> Record<'a> {
        match prometheus {
            Some(url) => Record::Prometheus {
                url,
                matchers,
                state: None,
            },
            None => Record::Agent(socket),
        }
    }

    fn observed(
        &self,
        window: std::time::Duration,
    ) -> anyhow::Result<Vec<crate::compile::advise::ObservedFlow>> {
        match self {
            Record::Agent(socket) => {
                let reply = admin::request(
                    socket,
                    &Request::Observed {
                        window: window.as_secs(),
                    },
                )?;
                let Response::Observed { flows } = expect_response(reply)? else {
                    anyhow::bail!("unexpected reply");
                };
                Ok(flows)
            }
            Record::Prometheus { url, matchers, .. } => {
                crate::prometheus::observed(url, matchers, window)
            }
        }
    }
}

fn graph(
    record: Record,
    window: std::time::Duration,
    filter: crate::graph::GraphFilter,
    format: &str,
    out: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let observed = record.observed(window)?;
    let dot = crate::graph::dot(&observed, &filter);
    let bytes = if format == "dot" {
        dot.into_bytes()
    } else {
        let mut child = std::process::Command::new("dot")
            .arg(format!("-T{format}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| {
                format!("-o {format} needs graphviz's `dot` (apt-get install graphviz); -o dot writes the text")
            })?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(dot.as_bytes())?;
        let rendered = child.wait_with_output().context("dot")?;
        if !rendered.status.success() {
            anyhow::bail!("dot -T{format} failed ({})", rendered.status);
        }
        rendered.stdout
    };
    match out {
        Some(path) => {
            std::fs::write(path, &bytes).with_context(|| format!("write {}", path.display()))?
        }
        None => std::io::stdout().write_all(&bytes)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn advise(
    record: Record,
    window: std::time::Duration,
    options: crate::compile::advise::AdviseOptions,
    out: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let rule_files = options.style == crate::compile::advise::Style::RuleFiles;
    if rule_files && out.is_none() {
        eprintln!("tollgate: --style rule-files writes a directory: give it with --out DIR");
        return Ok(ExitCode::from(2));
    }
    let advice = match &record {
        Record::Agent(socket) => {
            let reply = admin::request(
                socket,
                &Request::Advise {
                    window: window.as_secs(),
                    options,
                },
            )?;
            let Response::Advice(advice) = expect_response(reply)? else {
                anyhow::bail!("unexpected reply");
            };
            advice
        }
        Record::Prometheus { state, .. } => {
            let path = state.expect("clap requires --cluster-state with --prometheus");
            let Some(state) = load_cluster_state(path) else {
                return Ok(ExitCode::from(2));
            };
            let observed = record.observed(window)?;
            crate::compile::advise::advise(&state, &observed, &options)
        }
    };
    if rule_files {
        let dir = out.expect("checked above");
        for (path, content) in &advice.files {
            let path = dir.join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("create {}", parent.display()))?;
            }
            std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
            println!("{}", path.display());
        }
    } else {
        print!("{}", advice.yaml);
    }
    for (workload, labels) in &advice.labels {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!(
            "tollgate: label the pod template of {workload}: {}",
            labels.join(" ")
        );
    }
    for note in &advice.notes {
        eprintln!("tollgate: {note}");
    }
    for e in &advice.explanations {
        eprintln!("tollgate: explain: {e}");
    }
    if advice.policies.is_empty() && advice.allowlists.is_empty() {
        eprintln!("tollgate: no observed traffic to advise on within the window");
        return Ok(ExitCode::SUCCESS);
    }
    if advice.denied.is_empty() {
        let count = |n: usize, one: &str, many: &str| match n {
            1 => format!("this {one}"),
            n => format!("these {n} {many}"),
        };
        let mut advised = vec![];
        if !advice.policies.is_empty() {
            advised.push(count(advice.policies.len(), "policy", "policies"));
        }
        if !advice.allowlists.is_empty() {
            advised.push(count(
                advice.allowlists.len(),
                "EgressAllowlist",
                "EgressAllowlists",
            ));
        }
        eprintln!(
            "tollgate: replayed {} observed flows against the policies in force plus {}: all allowed",
            advice.replayed,
            advised.join(" and ")
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "tollgate: replayed {} observed flows: {} still denied",
            advice.replayed,
            advice.denied.len()
        );
        for d in &advice.denied {
            eprintln!("  {d}");
        }
        Ok(ExitCode::from(1))
    }
}

fn selftest(bpffs: &std::path::Path) -> anyhow::Result<()> {
    let datapath =
        Datapath::load(DatapathOptions::new(bpffs)).context("loading the embedded eBPF object")?;
    let ids = datapath.program_ids();
    println!("programs loaded and verified: {} (ids {ids:?})", ids.len());
    println!(
        "tc attach: {}",
        if attach::kernel_has_tcx() {
            "tcx (kernel 6.6+)"
        } else {
            "clsact (kernel without tcx)"
        }
    );
    println!(
        "bpffs: {}",
        if pins::is_bpffs(std::path::Path::new(pins::BPFFS_MOUNT)) {
            "mounted"
        } else {
            "not mounted"
        }
    );
    datapath
        .remove()
        .context("removing the self-test datapath")?;
    println!("removed: nothing left attached or pinned");
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let node_name = args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into())
    });
    let source = match args.cluster_state {
        Some(path) => daemon::SourceOptions::Files(path),
        None => daemon::SourceOptions::Kubernetes {
            trust_attach_annotations: args.trust_attach_annotations,
            event_dedup_window: args.event_dedup_window,
        },
    };
    let options = daemon::RunOptions {
        source,
        metrics_addr: args.metrics_addr,
        bpffs: args.bpffs,
        state_dir: args.state_dir,
        admin_socket: args.admin_socket,
        default_mode: args.default_mode,
        flow_log: args.flow_log,
        log_rate: args.log_rate,
        log_burst: args.log_burst,
        max_flow_series: args.max_flow_series,
        flow_series_idle: args.flow_series_idle,
        records: crate::flows::RecordLimits {
            retention: args.record_retention,
            capacity: args.record_capacity,
        },
        detach_on_exit: args.detach_on_exit,
        reset_state: args.reset_state,
        node_name,
        poll_interval: std::time::Duration::from_millis(args.poll_interval_ms.max(50)),
        tc_mode: match args.tc_mode {
            TcModeArg::Auto => attach::TcMode::Auto,
            TcModeArg::Tcx => attach::TcMode::Tcx,
            TcModeArg::Clsact => attach::TcMode::Clsact,
        },
        conntrack_capacity: args.conntrack_capacity,
        conntrack_share: args.conntrack_share,
        conntrack_census_interval: args.conntrack_census_interval,
        pod_mode_annotations: match args.pod_mode_annotations {
            PodModeArg::Stricter => crate::compile::policy::PodModeAnnotations::Stricter,
            PodModeArg::Any => crate::compile::policy::PodModeAnnotations::Any,
        },
        cgroup_root: args
            .cgroup_root
            .unwrap_or_else(crate::reconcile::default_cgroup_root),
        dns_servers: args.dns_servers,
        dns: crate::dns::DnsOptions {
            min_ttl: args.dns_min_ttl,
            grace: args.dns_grace,
            max_per_workload: args.dns_max_per_workload.max(1),
            learn_delay: args.dns_learn_delay,
            ..crate::dns::DnsOptions::default()
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(daemon::run(options))
}

fn expect_response(resp: Response) -> anyhow::Result<Response> {
    match resp {
        Response::Error { message } => anyhow::bail!("{message}"),
        other => Ok(other),
    }
}

fn status(socket: &std::path::Path, output: Output) -> anyhow::Result<ExitCode> {
    let Response::Status(status) = expect_response(admin::request(socket, &Request::Status)?)?
    else {
        anyhow::bail!("unexpected reply");
    };
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "node {}: {} workloads, {} policies{}",
        status.node,
        status.workloads.len(),
        status.policies,
        if status.ready { "" } else { " (not ready)" }
    );
    for e in &status.policy_errors {
        println!("rejected: {e}");
    }
    for w in &status.warnings {
        println!("warning: {w}");
    }
    for r in &status.refused {
        println!("not attached: {r}");
    }
    for d in &status.degraded {
        println!("degraded: {d}");
    }
    for (target, mode) in &status.overrides {
        println!(
            "node-local override (break glass): {target} {}",
            mode.as_str()
        );
    }
    for o in &status.cluster_overrides {
        println!(
            "ModeOverride {}: {} {}{}",
            o.name,
            o.target,
            o.mode.as_str(),
            if o.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", o.reason)
            }
        );
    }
    println!(
        "{:<36} {:<7} {:<9} {:<5} {:>20} {:>20} {:>15} {:>10} {:>9}",
        "NAMESPACE/POD",
        "ATTACH",
        "ISOLATED",
        "MODE",
        "IN allow/would/drop",
        "OUT allow/would/drop",
        "LAST WOULD-DROP",
        "WOULD 24H",
        "OBSERVED"
    );
    let ago = |secs: u64| {
        humantime::format_duration(std::time::Duration::from_secs(secs))
            .to_string()
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    for w in &status.workloads {
        let iso = match (w.isolated_ingress, w.isolated_egress) {
            (true, true) => "in,out",
            (true, false) => "in",
            (false, true) => "out",
            (false, false) => "-",
        };
        let last = match w.seconds_since_would_drop {
            Some(s) => format!("{} ago", ago(s)),
            None => "never".into(),
        };
        println!(
            "{:<36} {:<7} {:<9} {:<5} {:>20} {:>20} {:>15} {:>10} {:>9}",
            format!("{}/{}", w.namespace, w.pod),
            w.attach,
            iso,
            w.mode.as_str(),
            format!(
                "{}/{}/{}",
                w.ingress.allowed, w.ingress.would_drop, w.ingress.dropped
            ),
            format!(
                "{}/{}/{}",
                w.egress.allowed, w.egress.would_drop, w.egress.dropped
            ),
            last,
            w.would_drop_last_day,
            w.observed_seconds.map_or("-".into(), ago)
        );
    }
    for w in &status.workloads {
        if let Some(flow) = &w.latest_would_drop {
            println!("latest would-drop of {}/{}: {flow}", w.namespace, w.pod);
            if let Some(why) = &w.latest_would_drop_explanation {
                println!("  {why}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mode(socket: &std::path::Path, action: ModeAction) -> anyhow::Result<ExitCode> {
    let (target, mode, reason, if_quiet) = match action {
        ModeAction::Set {
            target,
            mode,
            reason,
            if_quiet,
            prometheus,
            ..
        } => {
            if prometheus.is_some() {
                eprintln!(
                    "tollgate: --prometheus is for --kubernetes; on a node, --if-quiet reads its agent's own record"
                );
                return Ok(ExitCode::from(2));
            }
            (target, Some(mode), reason, if_quiet)
        }
        ModeAction::Clear { target } => (target, None, None, None),
    };
    if let Err(e) = admin::Target::parse(&target) {
        eprintln!("tollgate: {e}");
        return Ok(ExitCode::from(2));
    }
    // The reason goes to the audit log with who asked.
    let who = match (std::env::var("SUDO_USER").ok(), reason) {
        (Some(user), Some(r)) => Some(format!("{user} ({r})")),
        (None, Some(r)) => Some(format!("({r})")),
        (user, None) => user,
    };
    let if_quiet = if_quiet.map(|d| d.as_secs());
    let reply = admin::request(
        socket,
        &Request::Mode {
            target,
            mode,
            who,
            if_quiet,
        },
    )?;
    let Response::Mode(change) = expect_response(reply)? else {
        anyhow::bail!("unexpected reply");
    };
    match change.new {
        Some(m) => println!(
            "{}: mode {} (was {})",
            change.target,
            m.as_str(),
            change.old.map_or("not set", |m| m.as_str())
        ),
        None => println!(
            "{}: override cleared (was {})",
            change.target,
            change.old.map_or("not set", |m| m.as_str())
        ),
    }
    for (pod, old, new) in &change.changed {
        println!("  {pod}: {} -> {}", old.as_str(), new.as_str());
    }
    if change.matched == 0 && change.new.is_some() {
        println!(
            "  (no workload on this node matches {} yet; the override applies when one does)",
            change.target
        );
    } else if change.matched == 0 {
        println!("  (no workload on this node matches {})", change.target);
    }
    Ok(ExitCode::SUCCESS)
}

/// A cluster state given on the command line (`--cluster-state`), its rejected objects
/// said; `None`, said, when the path does not exist.
fn load_cluster_state(path: &std::path::Path) -> Option<crate::compile::model::ClusterState> {
    if !path.exists() {
        eprintln!(
            "tollgate: cluster state {}: no such file or directory",
            path.display()
        );
        return None;
    }
    let loaded = crate::sources::FileSource::new(path).load();
    for e in &loaded.errors {
        eprintln!("tollgate: rejected {e}");
    }
    Some(loaded.state)
}

/// `tollgate mode set|clear --kubernetes`: writes or deletes the cluster's ModeOverride.
fn cluster_mode(action: ModeAction) -> anyhow::Result<ExitCode> {
    use crate::sources::crd;
    let target = match &action {
        ModeAction::Set { target, .. } | ModeAction::Clear { target } => target.clone(),
    };
    if let Err(e) = admin::Target::parse(&target) {
        eprintln!("tollgate: {e}");
        return Ok(ExitCode::from(2));
    }
    if let ModeAction::Set {
        if_quiet: Some(window),
        prometheus,
        prometheus_match,
        cluster_state,
        mode: Mode::Drop,
        ..
    } = &action
    {
        // Every node's record: the two per-workload gauges every agent exports.
        let Some(url) = prometheus else {
            eprintln!(
                "tollgate: --if-quiet with --kubernetes checks every node's record through \
                 Prometheus: give it with --prometheus http://HOST:PORT"
            );
            return Ok(ExitCode::from(2));
        };
        let parsed = admin::Target::parse(&target).expect("checked above");
        match crate::prometheus::quiet(url, prometheus_match.matchers(), &parsed, *window)? {
            Ok(_) => {}
            Err(not_quiet) => {
                let window = humantime::format_duration(*window);
                eprintln!(
                    "tollgate: refused: {target} is not safe to flip to drop (--if-quiet {window}, every node's record through {url}); nothing changed"
                );
                for r in &not_quiet.reasons {
                    eprintln!("  {r}");
                }
                // A refusal stands without explanations: a state that cannot be read is
                // said, not fatal.
                let explain = cluster_state.as_deref().and_then(load_cluster_state);
                let replayer = explain.as_ref().map(|state| {
                    crate::compile::advise::Replayer::new(state, not_quiet.flows.iter())
                });
                // The busiest first, a page of them (a scan's pairs are many).
                let mut flows: Vec<_> = not_quiet.flows.iter().collect();
                flows.sort_by_key(|f| std::cmp::Reverse(f.packets[1]));
                let more = flows
                    .len()
                    .saturating_sub(crate::flows::REFUSAL_PAIRS_SHOWN);
                flows.truncate(crate::flows::REFUSAL_PAIRS_SHOWN);
                for flow in flows {
                    eprintln!("  {}", flow.would_drop_line());
                    if let Some(Ok(r)) = &replayer {
                        for why in r.explain(flow) {
                            eprintln!("    {why}");
                        }
                    }
                }
                if more > 0 {
                    eprintln!("  +{more} more would-drop peer pairs within {window}");
                }
                if let Some(Err(e)) = &replayer {
                    eprintln!("  (no explanations: {e})");
                } else if replayer.is_none() && !not_quiet.flows.is_empty() {
                    eprintln!(
                        "  (--cluster-state with a dump of the cluster explains each: the policies and the change that would allow it)"
                    );
                }
                return Ok(ExitCode::from(1));
            }
        }
    }
    let who = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = crate::sources::kube::client()
            .await
            .context("--kubernetes: no Kubernetes configuration (KUBECONFIG or in-cluster)")?;
        match action {
            ModeAction::Set {
                target,
                mode,
                reason,
                ..
            } => {
                let written = crd::set_override(&client, &target, mode, reason, &who).await?;
                println!(
                    "ModeOverride {}: {} mode {} (was {}); every agent applies it within a second",
                    written.name,
                    target,
                    mode.as_str(),
                    written.old.map_or("not set", |m| m.as_str())
                );
            }
            ModeAction::Clear { target } => {
                match crd::clear_override(&client, &target, &who).await? {
                    Some(removed) => println!(
                        "ModeOverride {} deleted: {} is no longer overridden (was {})",
                        removed.name,
                        target,
                        removed.old.map_or("not set", |m| m.as_str())
                    ),
                    None => {
                        eprintln!("tollgate: no ModeOverride has target {target}");
                        return Ok(ExitCode::from(1));
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn flows(
    socket: &std::path::Path,
    limit: usize,
    interval: u64,
    once: bool,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut previous: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    loop {
        let reply = admin::request(
            socket,
            &Request::Flows {
                limit: limit.max(1) * 4,
            },
        )?;
        let Response::Flows(flows) = expect_response(reply)? else {
            anyhow::bail!("unexpected reply");
        };
        if output == Output::Json {
            println!("{}", serde_json::to_string(&flows)?);
        } else {
            if !once {
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "{:<8} {:<10} {:<32} {:<32} {:<10} {:>12} {:>9}",
                "DIR", "VERDICT", "SRC", "DST", "PROTO/PORT", "PACKETS", "PKT/S"
            );
            let mut rows: Vec<_> = flows
                .busiest
                .iter()
                .map(|r| {
                    let id = format!(
                        "{}{}{}{}{}{}",
                        r.direction, r.verdict, r.src, r.dst, r.protocol, r.port
                    );
                    let rate = previous
                        .get(&id)
                        .map(|p| r.packets.saturating_sub(*p) as f64 / interval.max(1) as f64);
                    previous.insert(id, r.packets);
                    (r, rate)
                })
                .collect();
            rows.sort_by(|a, b| {
                b.1.unwrap_or(0.0)
                    .total_cmp(&a.1.unwrap_or(0.0))
                    .then(b.0.packets.cmp(&a.0.packets))
            });
            for (r, rate) in rows.into_iter().take(limit) {
                println!(
                    "{:<8} {:<10} {:<32} {:<32} {:<10} {:>12} {:>9}",
                    r.direction,
                    r.verdict,
                    r.src,
                    r.dst,
                    format!("{}/{}", r.protocol, r.port),
                    r.packets,
                    rate.map_or("-".into(), |r| format!("{r:.1}"))
                );
                if let Some(why) = &r.explanation {
                    println!("         {why}");
                }
            }
            println!("\nlatest would-drops and drops:");
            for r in flows.recent_denied.iter().rev().take(10) {
                println!("  {r}");
            }
        }
        if once {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_secs(interval.max(1)));
    }
}
