//! `tollgate run`: the agent. Wires the parts together: the controller thread (source,
//! reconciler), the observer (counters, flow series), the metrics server, the admin socket,
//! the flow log and, with `--kubernetes`, the Events recorder. It leaves enforcement in
//! place when it stops (only `--detach-on-exit` takes the programs off).
//!
//! Any of these tasks dying is fatal: `/readyz` fails at once and the agent exits non-zero,
//! so the DaemonSet restarts it (the programs stay attached meanwhile) instead of running on
//! as a silent "ready".

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_common::Config;
use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    sync::{oneshot, watch},
};
use tracing::{error, info, warn};

use crate::{
    Datapath, DatapathOptions,
    admin::{self, Overrides, Request, Response},
    attach::TcMode,
    compile::{model::Mode, policy::PodModeAnnotations},
    controller::{Command, Controller, ControllerOptions, View},
    flows::{FlowLogStats, Observer},
    maps::MapReaders,
    reconcile::{Reconciler, ReconcilerOptions},
    recorder::{Notice, Recorder},
    sources::{FileSource, Source, kube::KubeSource},
};

/// Where the cluster state comes from.
#[derive(Clone, Debug)]
pub enum SourceOptions {
    /// `--cluster-state PATH`.
    Files(PathBuf),
    /// `--kubernetes`: the API server (in-cluster config or `KUBECONFIG`).
    Kubernetes {
        /// `--trust-attach-annotations`.
        trust_attach_annotations: bool,
        /// `--event-dedup-window`.
        event_dedup_window: Duration,
    },
}

/// Options of `tollgate run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: SourceOptions,
    pub metrics_addr: SocketAddr,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub default_mode: Mode,
    pub flow_log: Option<PathBuf>,
    pub log_rate: u32,
    pub log_burst: u32,
    pub max_flow_series: usize,
    pub flow_series_idle: Duration,
    pub records: crate::flows::RecordLimits,
    pub detach_on_exit: bool,
    pub reset_state: bool,
    pub node_name: String,
    pub poll_interval: Duration,
    pub tc_mode: TcMode,
    pub conntrack_capacity: u32,
    /// Percent of the connection tracking table one workload may fill.
    pub conntrack_share: u32,
    pub conntrack_census_interval: std::time::Duration,
    pub pod_mode_annotations: PodModeAnnotations,
    /// The cgroup v2 mount the kubepods hierarchy lives under.
    pub cgroup_root: PathBuf,
    /// `--dns-server`.
    pub dns_servers: Vec<std::net::IpAddr>,
    pub dns: crate::dns::DnsOptions,
}

/// What the servers share: the published view, the observer, and the agent's health.
struct Shared {
    view: watch::Receiver<Arc<View>>,
    observer: Arc<Mutex<Observer>>,
    log: Arc<FlowLogStats>,
    policy_errors: Arc<AtomicU64>,
    commands: Mutex<std::sync::mpsc::Sender<Command>>,
    recorder: Option<Recorder>,
    /// Set when a task of the agent died: `/readyz` fails from then on.
    failed: AtomicBool,
    dns: Arc<Mutex<crate::dns::runtime::DnsReport>>,
}

impl Shared {
    fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    fn policy_errors(&self) -> u64 {
        self.policy_errors.load(Ordering::Relaxed)
    }

    /// Sends a command to the controller and waits for its answer.
    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .lock()
            .map_err(|_| "controller poisoned".to_string())?
            .send(make(tx))
            .map_err(|_| "the controller has stopped".to_string())?;
        rx.await
            .map_err(|_| "the controller has stopped".to_string())
    }
}

/// What the operator gave cannot be used (a path that does not exist...): `tollgate` exits
/// with 2, bad usage or bad input, not 1, a runtime failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// In `--state-dir`: the last good versions of the objects that decide enforcement
/// (`FileSource::with_last_good_store`).
const LAST_GOOD_OBJECTS: &str = "last-good-objects.json";

/// Removes pins and attachments an earlier agent left (`--reset-state`).
fn reset_state(bpffs: &std::path::Path) -> anyhow::Result<()> {
    use aya::maps::{HashMap as AyaHashMap, Map, MapData};
    let tc_slots = bpffs.join(agent_common::map_names::TC_SLOTS);
    if let Ok(data) = MapData::from_pin(&tc_slots)
        && let Ok(slots) = AyaHashMap::<_, u32, u32>::try_from(Map::HashMap(data))
    {
        for (ifindex, _) in slots.iter().filter_map(Result::ok) {
            if let Some(iface) = crate::attach::ifname(ifindex) {
                for (t, p) in [
                    (
                        aya::programs::TcAttachType::Ingress,
                        agent_common::program_names::TC_FROM_POD,
                    ),
                    (
                        aya::programs::TcAttachType::Egress,
                        agent_common::program_names::TC_TO_POD,
                    ),
                ] {
                    let _ = aya::programs::tc::qdisc_detach_program(&iface, t, p);
                }
            }
        }
    }
    crate::pins::remove_pins(bpffs).with_context(|| format!("remove {}", bpffs.display()))?;
    warn!(bpffs = %bpffs.display(), "reset: removed the earlier agent's programs and pins");
    Ok(())
}

/// Makes sure no other agent runs on the same state directory or admin socket: two would
/// drive the same pinned maps, and the second's exit would remove the first's admin socket
/// (no `status`, no break-glass `mode set` until it restarts). Returns the locked file.
fn claim_instance(options: &RunOptions) -> anyhow::Result<std::fs::File> {
    use std::io::Write as _;
    let path = options.state_dir.join("agent.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "another tollgate agent runs on the state directory {} (pid {}); stop it first",
                options.state_dir.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("lock {}", path.display()));
        }
    }
    if std::os::unix::net::UnixStream::connect(&options.admin_socket).is_ok() {
        anyhow::bail!(
            "another tollgate agent answers on the admin socket {}; stop it first, or give this one --admin-socket of its own",
            options.admin_socket.display()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Makes sure no other agent drives the pinned datapath under `bpffs`, whatever its state
/// directory: two would each write their own view into the same maps (one's modes and rules
/// over the other's, each reporting its own), and a second's `--reset-state` would take the
/// first's programs off. Returns the locked directory; none when there is no directory yet
/// and `create` is false (nothing pinned to guard: bad input found later leaves no trace).
fn claim_datapath(bpffs: &std::path::Path, create: bool) -> anyhow::Result<Option<std::fs::File>> {
    if !create && !bpffs.is_dir() {
        return Ok(None);
    }
    crate::pins::ensure_bpffs_dir(bpffs).with_context(|| format!("--bpffs {}", bpffs.display()))?;
    let dir = std::fs::File::open(bpffs).with_context(|| format!("open {}", bpffs.display()))?;
    match dir.try_lock() {
        Ok(()) => Ok(Some(dir)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another tollgate agent drives the pinned datapath under {} (--bpffs); stop it first",
            bpffs.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("lock {}", bpffs.display()))
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    // glibc gives each thread that allocates its own arena; with the controller, the
    // watchers, the observer and the servers on different threads, freed memory would stay
    // scattered over many arenas. Two are plenty for an agent that must stay small.
    // SAFETY: mallopt with a valid parameter, before the agent's threads allocate much.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    std::fs::create_dir_all(&options.state_dir)
        .with_context(|| format!("create state directory {}", options.state_dir.display()))?;
    // Held until the agent exits (the kernel lets go of it however the process ends).
    let _instance = claim_instance(&options)?;
    let mut datapath_claim = claim_datapath(&options.bpffs, false)?;
    if options.reset_state {
        reset_state(&options.bpffs)?;
        // The directory went with the pins: the claim is on the one made anew.
        datapath_claim = claim_datapath(&options.bpffs, true)?;
    }
    // The source first: a cluster state that cannot be read at all stops the agent before it
    // touches the datapath.
    // A files source whose path holds no YAML file (refused over adopted workloads).
    let mut empty_files = None;
    let (source, trust_attach_annotations, recorder_client): (Box<dyn Source>, bool, _) =
        match &options.source {
            SourceOptions::Files(path) => {
                if !path.exists() {
                    return Err(BadInput(format!(
                        "--cluster-state {}: no such file or directory",
                        path.display()
                    ))
                    .into());
                }
                // The file source's annotations are the operator's own (labs, hand-written
                // state).
                let source = FileSource::new(path)
                    .with_last_good_store(options.state_dir.join(LAST_GOOD_OBJECTS));
                empty_files = source.holds_no_files().then_some(path);
                (Box::new(source), true, None)
            }
            SourceOptions::Kubernetes {
                trust_attach_annotations,
                ..
            } => {
                let source = KubeSource::connect()
                    .await
                    .context(
                        "--kubernetes: no Kubernetes configuration (in-cluster service account or KUBECONFIG)",
                    )?
                    .with_last_good_store(options.state_dir.join(LAST_GOOD_OBJECTS));
                let client = source.client();
                (Box::new(source), *trust_attach_annotations, Some(client))
            }
        };

    let mut dp_options = DatapathOptions::new(&options.bpffs);
    dp_options.tc_mode = options.tc_mode;
    dp_options.conntrack_capacity = options.conntrack_capacity;
    let mut datapath = Datapath::load(dp_options).context("loading the datapath")?;
    // A first start: the directory exists now, claimed before anything is attached.
    let _datapath_claim = match datapath_claim {
        Some(claim) => claim,
        None => claim_datapath(&options.bpffs, true)?.expect("created"),
    };
    let adopted = datapath.attached().len();
    if let Some(path) = empty_files
        && adopted > 0
    {
        // The first reconcile would detach them all: what a missing path gets (a refusal,
        // enforcement left as it is), not an empty cluster.
        return Err(BadInput(format!(
            "--cluster-state {} holds no YAML files, and {adopted} workloads an earlier agent attached are enforcing: not starting on an empty cluster state, which would detach them all (a volume not mounted yet?). Fix the path, or stop the earlier agent with --detach-on-exit first",
            path.display()
        ))
        .into());
    }
    if adopted > 0 {
        info!(workloads = adopted, "adopted the running datapath");
    }
    let mut config = datapath.maps.config()?;
    config.event_interval_ns = if options.log_rate == 0 {
        0
    } else {
        1_000_000_000 / options.log_rate as u64
    };
    config.event_burst = options.log_burst.max(1);
    config.ct_share = if options.conntrack_share >= 100 {
        0
    } else {
        (options.conntrack_capacity as u64 * options.conntrack_share as u64 / 100).max(1) as u32
    };
    datapath.maps.set_config(&Config { ..config })?;
    let events = datapath.events()?;
    let dns = crate::dns::runtime::DnsRuntime::new(
        datapath.dns_events()?,
        &options.bpffs,
        &options.state_dir,
        options.dns.clone(),
    )
    .context("start DNS learning")?;
    let dns_report = dns.report();
    let readers = MapReaders::open(&options.bpffs).context("open the pinned maps for reading")?;
    let occupancy_readers =
        MapReaders::open(&options.bpffs).context("open the pinned maps for reading")?;

    let mut rec = Reconciler::new(
        datapath,
        ReconcilerOptions {
            default_mode: options.default_mode,
            pod_mode_annotations: options.pod_mode_annotations,
            node_name: Some(options.node_name.clone()),
            cgroup_root: options.cgroup_root.clone(),
            trust_attach_annotations,
            dns_servers: options.dns_servers.clone(),
        },
    );
    rec.overrides = Overrides::load(&options.state_dir.join("overrides.json"))?;

    let log = Arc::new(FlowLogStats::default());
    let event_stats = Arc::new(crate::recorder::EventStats::default());
    let (observer, persisted_errors) = Observer::new(
        readers,
        &options.state_dir,
        options.max_flow_series,
        options.flow_series_idle,
        options.records,
        log.clone(),
        event_stats.clone(),
    );
    let policy_errors = Arc::new(AtomicU64::new(persisted_errors));
    let (view_tx, view_rx) = watch::channel(Arc::new(View::default()));
    let occupancy_task = tokio::spawn(crate::flows::count_occupancy(
        occupancy_readers,
        observer.occupancy.clone(),
        options.conntrack_census_interval,
        view_rx.clone(),
    ));
    let sync_seconds = crate::metrics::SyncHistogram::continued_from(Some(
        options.state_dir.join("sync-histogram.json"),
    ));
    let observer = Arc::new(Mutex::new(observer));
    {
        // The view published before a reconcile still names the workloads it detaches:
        // what their slots counted since the last read is read under those names first.
        let observer = observer.clone();
        let view = view_rx.clone();
        rec.before_detach = Some(Box::new(move || {
            let view = view.borrow().clone();
            if let Ok(mut observer) = observer.lock() {
                observer.poll(&view);
            }
        }));
    }
    let mut controller = Controller::new(
        rec,
        source,
        ControllerOptions {
            node_name: options.node_name.clone(),
            state_dir: options.state_dir.clone(),
            poll_interval: options.poll_interval,
        },
        view_tx,
        sync_seconds.clone(),
        policy_errors.clone(),
    );
    let (recorder, recorder_task) = match (&options.source, recorder_client) {
        (
            SourceOptions::Kubernetes {
                event_dedup_window, ..
            },
            Some(client),
        ) => {
            let (recorder, task) = Recorder::start(
                client,
                options.node_name.clone(),
                *event_dedup_window,
                event_stats,
            );
            let (tx, mut rx) = tokio::sync::mpsc::channel(256);
            controller.notify_mode_changes(tx);
            let r = recorder.clone();
            tokio::spawn(async move {
                while let Some(n) = rx.recv().await {
                    r.notice(Notice::mode_changed(&n));
                }
            });
            (Some(recorder), Some(task))
        }
        _ => (None, None),
    };
    let dns_stop = Arc::new(AtomicBool::new(false));
    let dns_thread = {
        let view = view_rx.clone();
        let stop = dns_stop.clone();
        std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || dns.run(view, stop))
            .context("start the DNS thread")?
    };
    let (commands_tx, commands_rx) = std::sync::mpsc::channel();
    controller.wake_on_source_changes(commands_tx.clone());
    let controller_task = tokio::task::spawn_blocking(move || controller.run(commands_rx));

    let shared = Arc::new(Shared {
        view: view_rx,
        observer,
        log,
        policy_errors,
        commands: Mutex::new(commands_tx),
        recorder,
        failed: AtomicBool::new(false),
        dns: dns_report,
    });

    let mut registry = prometheus_client::registry::Registry::default();
    registry.register(
        "tollgate_policy_sync_seconds",
        "Time to load, compile and apply the cluster state",
        sync_seconds,
    );
    registry.register_collector(Box::new(Collector(shared.clone())));
    let registry = Arc::new(registry);

    let metrics = tokio::spawn(serve_metrics(
        options.metrics_addr,
        registry,
        shared.clone(),
    ));
    let admin_task = tokio::spawn(serve_admin(options.admin_socket.clone(), shared.clone()));
    let counts = crate::flows::FlowLogCounts::open(&options.state_dir);
    let events_task = tokio::spawn(flow_log(
        events,
        shared.clone(),
        options.flow_log.clone(),
        counts,
    ));
    let poll_shared = shared.clone();
    let poll_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let s = poll_shared.clone();
            // Reading the flow counters walks a map: off the async threads.
            tokio::task::spawn_blocking(move || {
                let view = s.view();
                let mut observer = s.observer.lock().expect("observer");
                observer.poll(&view);
                observer.persist(&s.log, s.policy_errors());
            })
            .await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), tokio::task::JoinError>(())
    });
    let recorder_task = async move {
        match recorder_task {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    info!(
        metrics = %options.metrics_addr,
        admin = %options.admin_socket.display(),
        "tollgate running"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let died: Option<String> = tokio::select! {
        _ = term.recv() => { info!("SIGTERM"); None }
        _ = tokio::signal::ctrl_c() => { info!("SIGINT"); None }
        r = metrics => Some(format!("metrics server stopped: {r:?}")),
        r = admin_task => Some(format!("admin socket stopped: {r:?}")),
        r = events_task => Some(format!("flow log stopped: {r:?}")),
        r = poll_task => Some(format!("flow counter poller stopped: {r:?}")),
        r = recorder_task => Some(format!("Events recorder stopped: {r:?}")),
        r = occupancy_task => Some(format!("map occupancy counter stopped: {r:?}")),
        r = controller_task => Some(format!("controller stopped: {r:?}")),
    };
    if let Some(why) = &died {
        shared.failed.store(true, Ordering::Relaxed);
        error!(why, "a task of the agent died; exiting");
    }
    {
        let view = shared.view();
        let mut observer = shared.observer.lock().expect("observer");
        observer.poll(&view);
        observer.persist(&shared.log, shared.policy_errors());
        observer.persist_record(true);
    }
    // DNS first: the datapath stops holding answers and what it holds is handed back.
    dns_stop.store(true, Ordering::Relaxed);
    let _ = dns_thread.join();
    let _ = std::fs::remove_file(&options.admin_socket);
    let detach = options.detach_on_exit;
    match shared
        .command(|reply| Command::Shutdown { detach, reply })
        .await
    {
        Ok(Ok(())) if detach => info!("--detach-on-exit: programs detached, pins removed"),
        Ok(Ok(())) => info!(
            "stopped; enforcement stays in place (pinned under {})",
            options.bpffs.display()
        ),
        Ok(Err(e)) => anyhow::bail!("--detach-on-exit: {e}"),
        Err(e) if died.is_some() => warn!(error = e, "controller gone; programs stay attached"),
        Err(e) => anyhow::bail!("stopping the controller: {e}"),
    }
    match died {
        Some(why) => anyhow::bail!("{why}"),
        None => Ok(()),
    }
}

struct Collector(Arc<Shared>);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collector")
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let view = s.view();
        let mut snapshot = s.observer.lock().map_err(|_| std::fmt::Error)?.metrics(
            &view,
            &s.log,
            s.policy_errors(),
        );
        snapshot.ready &= !s.failed.load(Ordering::Relaxed);
        {
            let dns = s.dns.lock().map_err(|_| std::fmt::Error)?;
            let st = dns.stats;
            snapshot.dns_messages = vec![
                ("query", st.queries),
                ("answer", st.answers),
                ("unsolicited", st.unsolicited),
                ("malformed", st.malformed),
                ("query_not_followed", st.queries_not_followed),
                ("query_evicted", st.queries_evicted),
                ("tcp_stream_lost", st.tcp_streams_lost),
            ];
            snapshot.dns_handed_back =
                vec![("ok", dns.reinjected), ("failed", dns.reinject_failed)];
            for (slot, kept, overflow) in &dns.per_slot {
                if let Some(w) = view.workloads.iter().find(|w| w.slot == *slot) {
                    snapshot.egress_learned.push((
                        w.namespace.clone(),
                        w.pod.clone(),
                        *kept as u64,
                        *overflow,
                    ));
                }
            }
        }
        snapshot.kube_events = s
            .recorder
            .as_ref()
            .map(|r| r.stats.outcomes())
            .unwrap_or_default();
        snapshot.encode(encoder)
    }
}

/// `/readyz`: 200 only when programs are attached, the policy synced, nothing is degraded and
/// every task of the agent runs.
fn readiness(shared: &Shared) -> (u16, String) {
    let view = shared.view();
    if shared.failed.load(Ordering::Relaxed) {
        return (503, "not ready: a task of the agent died\n".into());
    }
    if !view.ready {
        let why = view
            .not_ready
            .clone()
            .unwrap_or_else(|| "policy not synced yet".into());
        // An agent started while its source is away is both: not synced yet, and degraded
        // (what is pinned stays enforced meanwhile).
        if !view.degraded.is_empty() {
            return (
                503,
                format!(
                    "not ready: {why}\ndegraded:\n{}\n",
                    view.degraded.join("\n")
                ),
            );
        }
        return (503, format!("not ready: {why}\n"));
    }
    if !view.degraded.is_empty() {
        return (503, format!("degraded:\n{}\n", view.degraded.join("\n")));
    }
    (200, "ready\n".into())
}

async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<prometheus_client::registry::Registry>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::{Response as HttpResponse, body::Bytes, service::service_fn};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr} (--metrics-addr)"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let registry = registry.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                let shared = shared.clone();
                async move {
                    let openmetrics = crate::metrics::format::accepts_openmetrics(
                        req.headers()
                            .get(hyper::header::ACCEPT)
                            .and_then(|v| v.to_str().ok()),
                    );
                    let (status, content_type, body) = match req.uri().path() {
                        "/metrics" => {
                            // Encoding reads maps: off the async threads.
                            let encoded = tokio::task::spawn_blocking(move || {
                                let mut text = String::new();
                                prometheus_client::encoding::text::encode(&mut text, &registry)
                                    .map(|()| text)
                            })
                            .await;
                            match encoded {
                                Ok(Ok(text)) if openmetrics => {
                                    (200, crate::metrics::format::OPENMETRICS, text)
                                }
                                Ok(Ok(text)) => (
                                    200,
                                    crate::metrics::format::PROMETHEUS_TEXT,
                                    crate::metrics::format::prometheus_text(&text),
                                ),
                                _ => (500, "text/plain", "encoding failed\n".into()),
                            }
                        }
                        "/healthz" => (200, "text/plain", "ok\n".into()),
                        "/readyz" => {
                            let (code, text) = readiness(&shared);
                            (code, "text/plain", text)
                        }
                        _ => (404, "text/plain", "not found\n".into()),
                    };
                    HttpResponse::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn serve_admin(path: PathBuf, shared: Arc<Shared>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("bind the admin socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            use std::os::fd::AsFd as _;
            let creds = admin::peer_credentials(stream.as_fd());
            let (reader, mut writer) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(reader);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let response = match creds {
                Ok((0, pid)) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(&shared, req, pid).await,
                    Err(e) => Response::Error {
                        message: format!("bad request: {e}"),
                    },
                },
                Ok((uid, _)) => Response::Error {
                    message: format!("permission denied: uid {uid} is not root"),
                },
                Err(e) => Response::Error {
                    message: format!("peer credentials: {e}"),
                },
            };
            let mut out = serde_json::to_string(&response).expect("serializable");
            out.push('\n');
            let _ = writer.write_all(out.as_bytes()).await;
        });
    }
}

async fn handle(shared: &Arc<Shared>, req: Request, pid: i32) -> Response {
    match req {
        Request::Status | Request::Flows { .. } => {
            let s = shared.clone();
            let answer = tokio::task::spawn_blocking(move || {
                let view = s.view();
                let mut observer = s.observer.lock().expect("observer");
                match req {
                    Request::Flows { limit } => {
                        Response::Flows(observer.flows(&view, &s.log, limit))
                    }
                    _ => Response::Status(observer.status(&view)),
                }
            })
            .await;
            match answer {
                Ok(Response::Flows(mut flows)) => {
                    explain_records(shared, &mut flows.recent_denied).await;
                    explain_rows(shared, &mut flows.busiest).await;
                    Response::Flows(flows)
                }
                Ok(Response::Status(mut status)) => {
                    latest_would_drops(shared, &mut status).await;
                    Response::Status(status)
                }
                Ok(other) => other,
                Err(e) => Response::Error {
                    message: format!("reading the counters failed: {e}"),
                },
            }
        }
        Request::Observed { window } => {
            let s = shared.clone();
            tokio::task::spawn_blocking(move || {
                let view = s.view();
                let mut observer = s.observer.lock().expect("observer");
                Response::Observed {
                    flows: observer.observed(&view, window),
                }
            })
            .await
            .unwrap_or_else(|e| Response::Error {
                message: format!("reading the observed flows failed: {e}"),
            })
        }
        Request::Advise { window, options } => {
            let s = shared.clone();
            let observed = tokio::task::spawn_blocking(move || {
                let view = s.view();
                let mut observer = s.observer.lock().expect("observer");
                observer.observed(&view, window)
            })
            .await;
            let observed = match observed {
                Ok(o) => o,
                Err(e) => {
                    return Response::Error {
                        message: format!("reading the observed flows failed: {e}"),
                    };
                }
            };
            match shared
                .command(|reply| Command::Advise {
                    observed,
                    options,
                    reply,
                })
                .await
            {
                Ok(advice) => Response::Advice(advice),
                Err(message) => Response::Error { message },
            }
        }
        Request::Mode {
            target,
            mode,
            who,
            if_quiet,
        } => {
            if let (Some(window), Some(Mode::Drop)) = (if_quiet, mode) {
                let parsed = match admin::Target::parse(&target) {
                    Ok(t) => t,
                    Err(message) => return Response::Error { message },
                };
                let s = shared.clone();
                let checked = tokio::task::spawn_blocking(move || {
                    let view = s.view();
                    let mut observer = s.observer.lock().expect("observer");
                    observer.quiet(&view, &s.log, &parsed, window)
                })
                .await;
                match checked {
                    Ok(Ok(_)) => {}
                    Ok(Err(not_quiet)) => {
                        return Response::Error {
                            message: refusal(shared, &target, window, not_quiet).await,
                        };
                    }
                    Err(e) => {
                        return Response::Error {
                            message: format!("reading the counters failed: {e}"),
                        };
                    }
                }
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let who = format!(
                "{}uid=0 pid={pid} ({})",
                who.map(|w| format!("{w} ")).unwrap_or_default(),
                comm.trim()
            );
            match shared
                .command(|reply| Command::SetMode {
                    target,
                    mode,
                    who,
                    reply,
                })
                .await
                .and_then(|r| r)
            {
                Ok(change) => Response::Mode(change),
                Err(message) => Response::Error { message },
            }
        }
    }
}

/// Adds an `explanation` to each denied flow record (JSON objects) the controller can
/// explain.
async fn explain_records(shared: &Arc<Shared>, records: &mut [serde_json::Value]) {
    let flows: Vec<crate::flowlog::FlowRecord> = records
        .iter()
        .filter_map(|r| serde_json::from_value(r.clone()).ok())
        .collect();
    if flows.len() != records.len() {
        return;
    }
    let Ok(explained) = shared
        .command(|reply| Command::Explain { flows, reply })
        .await
    else {
        return;
    };
    for (record, explanation) in records.iter_mut().zip(explained) {
        if let (Some(object), Some(text)) = (record.as_object_mut(), explanation) {
            object.insert("explanation".into(), text.into());
        }
    }
}

/// Adds an `explanation` to each would-drop or drop series row the controller can explain
/// (its enforcement point is a workload of the cluster state in force).
async fn explain_rows(shared: &Arc<Shared>, rows: &mut [admin::FlowRow]) {
    let denied: Vec<usize> = (0..rows.len())
        .filter(|i| rows[*i].verdict != "allowed")
        .collect();
    if denied.is_empty() {
        return;
    }
    let flows = denied.iter().map(|i| rows[*i].as_observed()).collect();
    let explained = shared
        .command(|reply| Command::ExplainObserved { flows, reply })
        .await
        .unwrap_or_default();
    for (i, why) in denied.into_iter().zip(explained) {
        if !why.is_empty() {
            rows[i].explanation = Some(why.join("; "));
        }
    }
}

/// Each workload's latest sampled would-drop, with its explanation.
async fn latest_would_drops(shared: &Arc<Shared>, status: &mut admin::Status) {
    let recent = shared.log.recent_would_drops();
    let mut picked = Vec::new();
    for (i, w) in status.workloads.iter().enumerate() {
        let mine = |e: &Option<crate::flowlog::Endpoint>| {
            e.as_ref()
                .is_some_and(|e| e.namespace == w.namespace && e.pod == w.pod)
        };
        if let Some(r) = recent.iter().rev().find(|r| {
            if r.direction == "egress" {
                mine(&r.src)
            } else {
                mine(&r.dst)
            }
        }) {
            picked.push((i, r.clone()));
        }
    }
    if picked.is_empty() {
        return;
    }
    let flows: Vec<crate::flowlog::FlowRecord> = picked.iter().map(|(_, r)| r.clone()).collect();
    let explained = shared
        .command(|reply| Command::Explain { flows, reply })
        .await
        .unwrap_or_default();
    for (n, (i, r)) in picked.into_iter().enumerate() {
        let w = &mut status.workloads[i];
        w.latest_would_drop = Some(r.summary());
        w.latest_would_drop_explanation = explained.get(n).cloned().flatten();
    }
}

/// Why `mode set TARGET drop --if-quiet` was refused: what each workload lacks, and its
/// latest would-drop flows with the change that would allow each.
async fn refusal(
    shared: &Arc<Shared>,
    target: &str,
    window: u64,
    not_quiet: crate::flows::NotQuiet,
) -> String {
    let window_text = humantime::format_duration(Duration::from_secs(window)).to_string();
    let mut out = format!(
        "refused: {target} is not safe to flip to drop (--if-quiet {window_text}); nothing changed"
    );
    for reason in &not_quiet.reasons {
        out.push_str(&format!("\n  {reason}"));
    }
    let pairs = not_quiet.pairs;
    let explained_pairs = shared
        .command(|reply| Command::ExplainObserved {
            flows: pairs.clone(),
            reply,
        })
        .await
        .unwrap_or_default();
    if !pairs.is_empty() {
        out.push_str(&format!(
            "\n  peer pairs with would-drops within {window_text} (the observed-flow record, latest first; packets since first seen):"
        ));
    }
    for (i, pair) in pairs.iter().enumerate() {
        out.push_str(&format!("\n    {}", pair.would_drop_line()));
        for why in explained_pairs.get(i).into_iter().flatten() {
            out.push_str(&format!("\n      {why}"));
        }
    }
    if not_quiet.more_pairs > 0 {
        out.push_str(&format!("\n    +{} more", not_quiet.more_pairs));
    }
    let flows = not_quiet.flows;
    let explained = shared
        .command(|reply| Command::Explain {
            flows: flows.clone(),
            reply,
        })
        .await
        .unwrap_or_default();
    if !flows.is_empty() {
        out.push_str(&format!(
            "\n  would-drop flows within {window_text} (latest last):"
        ));
    }
    for (i, f) in flows.iter().enumerate() {
        out.push_str(&format!("\n    {}", f.summary()));
        if let Some(Some(why)) = explained.get(i) {
            out.push_str(&format!("\n      {why}"));
        }
    }
    out
}

/// The `--flow-log` file, opened again when the path no longer names it: logrotate's
/// default moves the file away and expects the writer to make a new one (its
/// `copytruncate` needs nothing: the file is appended to). Checked at most once a second,
/// before a write.
struct FlowLogFile {
    path: PathBuf,
    file: std::fs::File,
    /// Device and inode of the open file.
    id: (u64, u64),
    checked: std::time::Instant,
}

impl FlowLogFile {
    fn open(path: &std::path::Path) -> anyhow::Result<FlowLogFile> {
        use std::os::unix::fs::MetadataExt as _;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open the flow log {}", path.display()))?;
        let meta = file.metadata()?;
        Ok(FlowLogFile {
            path: path.into(),
            file,
            id: (meta.dev(), meta.ino()),
            checked: std::time::Instant::now(),
        })
    }

    /// Opens the path again if it names another file now, or none.
    fn follow_path(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        if self.checked.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.checked = std::time::Instant::now();
        let same = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if same {
            return;
        }
        match FlowLogFile::open(&self.path) {
            Ok(reopened) => {
                info!(path = %self.path.display(), "the flow log was moved away; writing to a new file");
                *self = reopened;
            }
            Err(e) => {
                warn!(error = %e, "could not open the flow log again; writing to the old file")
            }
        }
    }
}

impl std::io::Write for FlowLogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.follow_path();
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

async fn flow_log(
    reader: crate::flowlog::EventReader,
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    counts: crate::flows::FlowLogCounts,
) -> anyhow::Result<()> {
    let mut out: Box<dyn std::io::Write + Send> = match &path {
        Some(p) => Box::new(FlowLogFile::open(p)?),
        None => Box::new(std::io::stdout()),
    };
    // SAFETY: the AsyncFd owns the reader, so its descriptor stays open while registered.
    let mut async_fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("register the event ring buffer: {e}"))?;
    // Events the kernel wrote while no agent ran name slots and identities that only the
    // first reconcile names: they wait for it in the ring (10 s at most).
    let started = std::time::Instant::now();
    while !shared.view().ready && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        let mut guard = async_fd.readable_mut().await?;
        let events = guard.get_inner_mut().drain();
        guard.clear_ready();
        if events.is_empty() {
            continue;
        }
        let view = shared.view();
        for e in &events {
            let record = view.naming.record(e);
            let mut line = serde_json::to_string(&record).expect("serializable");
            line.push('\n');
            match out.write_all(line.as_bytes()) {
                Ok(()) => shared.log.written.fetch_add(1, Ordering::Relaxed),
                Err(_) => shared.log.lost.fetch_add(1, Ordering::Relaxed),
            };
            if let Some(recorder) = &shared.recorder
                && let Some(local) = if record.direction == "ingress" {
                    record.dst.as_ref()
                } else {
                    record.src.as_ref()
                }
                && let Some(w) = view.workload(&local.namespace, &local.pod)
                && let Some(notice) = Notice::denied(&record, &w.uid)
            {
                recorder.notice(notice);
            }
            shared.log.note_world_peer(&record, e.peer_identity);
            shared.log.remember(record);
        }
        let _ = out.flush();
        counts.store(&shared.log);
    }
}
