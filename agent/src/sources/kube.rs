//! The Kubernetes source (`--kubernetes`): kube-rs watchers on Pods, Namespaces,
//! NetworkPolicies, Services, EndpointSlices, Nodes, ModeOverrides and EgressAllowlists,
//! in-cluster config or
//! `KUBECONFIG`.
//!
//! Each watcher task converts objects to the model as they arrive (the API object is dropped
//! at once: only the fields the model needs stay in memory) and hands them to the source,
//! which the controller drains at every poll into the shared [`Store`]. A relist replaces a
//! kind only once it is complete (`InitDone`), so a list that breaks off midway changes
//! nothing; a complete list that is empty while the store has Pods, Namespaces or Nodes is
//! not believed (a real cluster always has them) and keeps the last state.
//!
//! Surviving the API server: the watcher relists after `410 Gone`, follows bookmarks and
//! retries with backoff. A probe asks the API server for its version every
//! `PROBE_INTERVAL`; while it fails or a watch keeps failing, the source is degraded and the
//! last state stays in force. A watch that failed, or every watch after the API server came
//! back, is restarted: its relist brings what changed meanwhile, and a connection that hung
//! is never waited on again.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{Api, Client, Resource, ResourceExt as _, runtime::watcher};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use super::{
    ObjectError, Refresh, Source,
    convert::ToObject,
    crd::{EgressAllowlist, ModeOverride},
    store::{Kind, Object, ObjectKey, Store},
};
use crate::compile::model::ClusterState;

/// How often the API server is asked whether it answers.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long it has to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A failing watch that has not reported again this long after its retry was due is
/// restarted with a relist: its request may hang on a connection that died.
const RESTART_FAILING_AFTER: Duration = Duration::from_secs(5);
/// A list that has made no progress (no page) this long is restarted: its request hangs.
const RESTART_STALLED_LIST_AFTER: Duration = Duration::from_secs(30);
/// At most one restart per kind in this time.
const MIN_RESTART_INTERVAL: Duration = Duration::from_secs(10);
/// An outage at least this long restarts every watch that made no progress since it began
/// (their connections may have died with it); after a shorter one only failing watches are
/// restarted, so a blip of the API server does not make every node relist the cluster.
const OUTAGE_RESTARTS_QUIET_WATCHES: Duration = Duration::from_secs(8);
/// Retries of a failing watch wait from this long, doubling up to `RETRY_MAX`, with jitter.
const RETRY_FIRST: Duration = Duration::from_millis(800);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// No answer (not even a header) in this long ends a request: a list on a connection that
/// died would otherwise wait for TCP to give up. Longer than the server's watch timeout
/// (290 s), so a quiet watch is never cut.
pub const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// Kinds a real cluster always has objects of: an empty list of them is not believed.
const NEVER_EMPTY: [Kind; 3] = [Kind::Pod, Kind::Namespace, Kind::Node];

/// A converted object, or why it was rejected; `None`: not part of the network (a finished
/// pod, a slice of no Service), as if deleted.
type Converted = Result<Option<Object>, String>;

/// An object as a watcher hands it over: converted, and for the kinds whose last good
/// version is kept across restarts (`files::kept_across_restarts`), the object as the API
/// server sent it (JSON).
/// Last, the object's uid: an object deleted and made again under its name is another.
type Item = (ObjectKey, Converted, Option<String>, Option<String>);

/// What a watcher task reports (with the generation of the task: a task restarted leaves
/// what its aborted predecessor still sends behind, see `KubeSource::generations`).
#[derive(Debug)]
enum Update {
    Apply(Item),
    Delete(ObjectKey),
    Init(Kind),
    InitApply(Item),
    InitDone(Kind),
    /// Why, and how long the task waits before it tries again.
    Failed(Kind, String, Duration),
    /// The API server does not serve the kind (404: Tollgate's CRD not installed), or
    /// forbids listing it (403: RBAC without it); the status code and message.
    NotServed(Kind, u16, String),
}

impl Update {
    fn kind(&self) -> Kind {
        match self {
            Update::Apply((key, ..)) | Update::InitApply((key, ..)) => key.kind,
            Update::Delete(key) => key.kind,
            Update::Init(kind)
            | Update::InitDone(kind)
            | Update::Failed(kind, ..)
            | Update::NotServed(kind, _, _) => *kind,
        }
    }
}

/// Reads the cluster through the API server.
pub struct KubeSource {
    client: Client,
    tx: mpsc::Sender<(u64, Update)>,
    rx: mpsc::Receiver<(u64, Update)>,
    tasks: BTreeMap<Kind, JoinHandle<()>>,
    /// The generation of each kind's current watch task. An aborted task stops only at its
    /// next await, so what it still sends (a partial list's `InitDone`, a `Failed`) must not
    /// be taken for the new task's.
    generations: BTreeMap<Kind, u64>,
    next_generation: u64,
    last_restart: BTreeMap<Kind, Instant>,
    store: Store,
    /// Objects of a relist in progress, by kind.
    listing: BTreeMap<Kind, Vec<Item>>,
    /// Where the last good objects are kept across restarts, if anywhere.
    kept_path: Option<PathBuf>,
    /// Their documents, by object, and whether that changed since last written.
    documents: BTreeMap<ObjectKey, super::files::KeptDocument>,
    documents_changed: bool,
    /// What an earlier process kept: the last good version of an object rejected now that
    /// this process never saw good, with its uid (only the same object, not one made again
    /// under its name, gets it back).
    restored: BTreeMap<ObjectKey, (Option<String>, Object)>,
    /// Kinds listed completely at least once.
    synced: BTreeSet<Kind>,
    /// Kinds whose watch failed since their last event: why, and when its task was due to
    /// try again.
    failing: BTreeMap<Kind, (String, Instant)>,
    /// When each kind's watch last made progress of any kind (an event, a page, a list).
    progress: BTreeMap<Kind, Instant>,
    /// Kinds listing now, since the last page of the list.
    list_progress: BTreeMap<Kind, Instant>,
    /// Kinds the API server does not serve (a CRD not installed: 404) or lets the agent
    /// list (403), with the status code.
    not_served: BTreeMap<Kind, u16>,
    /// Kinds whose latest complete list was not believed.
    distrusted: BTreeMap<Kind, String>,
    probe: Arc<Probe>,
    recoveries_seen: u64,
    probe_task: JoinHandle<()>,
    errors: Vec<ObjectError>,
    /// Errors reported (object, reason): each counts once, across restarts too.
    reported: BTreeSet<(Option<String>, String)>,
    warnings: Vec<String>,
    /// What to call when a watcher has handed something over.
    wake: Arc<std::sync::OnceLock<super::Waker>>,
}

/// What the probe task last saw.
#[derive(Default)]
struct Probe {
    failure: Mutex<Option<String>>,
    /// Times the API server answered again after failing.
    recoveries: AtomicU64,
    /// Since when it does not answer, while it does not.
    down_since: Mutex<Option<Instant>>,
    /// The outages that ended and the source has not looked at yet: the earliest start and
    /// the longest outage.
    recovered_from: Mutex<Option<(Instant, Duration)>>,
}

impl KubeSource {
    /// Connects (in-cluster config or `KUBECONFIG`) and starts every watch. Must run inside
    /// a Tokio runtime.
    pub async fn connect() -> Result<KubeSource, kube::Error> {
        Ok(KubeSource::start(client().await?))
    }

    /// Starts every watch on a client.
    pub fn start(client: Client) -> KubeSource {
        let (tx, rx) = mpsc::channel(4096);
        let probe = Arc::new(Probe::default());
        let wake: Arc<std::sync::OnceLock<super::Waker>> = Arc::default();
        let probe_task = tokio::spawn(run_probe(client.clone(), probe.clone(), wake.clone()));
        let mut source = KubeSource {
            client,
            tx,
            rx,
            tasks: BTreeMap::new(),
            generations: BTreeMap::new(),
            next_generation: 0,
            last_restart: BTreeMap::new(),
            store: Store::default(),
            listing: BTreeMap::new(),
            kept_path: None,
            documents: BTreeMap::new(),
            documents_changed: false,
            restored: BTreeMap::new(),
            synced: BTreeSet::new(),
            failing: BTreeMap::new(),
            progress: BTreeMap::new(),
            list_progress: BTreeMap::new(),
            distrusted: BTreeMap::new(),
            not_served: BTreeMap::new(),
            probe,
            recoveries_seen: 0,
            probe_task,
            errors: Vec::new(),
            reported: BTreeSet::new(),
            warnings: Vec::new(),
            wake,
        };
        for kind in Kind::ALL {
            source.spawn(kind);
        }
        source
    }

    /// Keeps the last good versions of NetworkPolicies, EgressAllowlists, ModeOverrides and
    /// Namespaces, and the errors reported, in `path`; starts from what an earlier process
    /// kept there, so an object the agent rejects after a restart stays in force as it was
    /// good before, and its error is not counted again.
    pub fn with_last_good_store(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let kept = super::files::KeptState::read(&path);
        for (key, doc, object) in kept.objects() {
            let uid = serde_norway::from_str::<serde_json::Value>(&doc.document)
                .ok()
                .and_then(|v| v["metadata"]["uid"].as_str().map(str::to_string));
            self.documents.insert(key.clone(), doc);
            self.restored.insert(key, (uid, object));
        }
        for (key, _, object) in kept.rejected_objects() {
            let uid = match &object {
                Object::Pod(p) if !p.uid.is_empty() => Some(p.uid.clone()),
                _ => None,
            };
            self.restored.insert(key, (uid, object));
        }
        self.reported = kept
            .errors
            .into_iter()
            .map(|(object, _, reason)| (object, reason))
            .collect();
        self.kept_path = Some(path);
        self
    }

    /// Writes what `with_last_good_store` reads, when it changed.
    fn keep(&mut self, errors_changed: bool) {
        let Some(path) = &self.kept_path else { return };
        if !(self.documents_changed || errors_changed) {
            return;
        }
        // The last good versions in force of rejected objects whose documents are not kept.
        let rejected = self
            .store
            .errors()
            .filter(|e| e.kept_last_good)
            .filter_map(|e| {
                let key = e.object.as_ref()?;
                super::files::KeptModel::of(&origin(), key, self.store.get(key)?)
            })
            .filter_map(|m| serde_json::to_value(m).ok())
            .collect();
        super::files::KeptState {
            rejected,
            documents: self.documents.values().cloned().collect(),
            errors: self
                .reported
                .iter()
                .map(|(object, reason)| (object.clone(), origin(), reason.clone()))
                .collect(),
        }
        .write(path);
        self.documents_changed = false;
    }

    /// Forgets the kept document of an object gone from the cluster, and what an earlier
    /// process kept of it.
    fn forget(&mut self, key: &ObjectKey) {
        self.restored.remove(key);
        if self.documents.remove(key).is_some() {
            self.documents_changed = true;
        }
    }

    /// A client for the CLI and Events: in-cluster config or `KUBECONFIG`.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn spawn(&mut self, kind: Kind) {
        // The new task starts at once: what the old one failed at or listed is its own.
        if let Some((_, due)) = self.failing.get_mut(&kind) {
            *due = Instant::now();
        }
        self.list_progress.remove(&kind);
        let client = self.client.clone();
        self.next_generation += 1;
        self.generations.insert(kind, self.next_generation);
        let tx = Handover {
            tx: self.tx.clone(),
            generation: self.next_generation,
            wake: self.wake.clone(),
        };
        let task = match kind {
            Kind::Namespace => tokio::spawn(watch::<Namespace>(client, kind, tx)),
            Kind::Pod => tokio::spawn(watch::<Pod>(client, kind, tx)),
            Kind::NetworkPolicy => tokio::spawn(watch::<NetworkPolicy>(client, kind, tx)),
            Kind::Service => tokio::spawn(watch::<Service>(client, kind, tx)),
            Kind::EndpointSlice => tokio::spawn(watch::<EndpointSlice>(client, kind, tx)),
            Kind::Node => tokio::spawn(watch::<Node>(client, kind, tx)),
            Kind::ModeOverride => tokio::spawn(watch::<ModeOverride>(client, kind, tx)),
            Kind::EgressAllowlist => tokio::spawn(watch::<EgressAllowlist>(client, kind, tx)),
        };
        if let Some(old) = self.tasks.insert(kind, task) {
            old.abort();
        }
        self.listing.remove(&kind);
        self.last_restart.insert(kind, Instant::now());
    }

    /// Applies one converted object; returns whether the model changed.
    fn apply(&mut self, (key, converted, document, uid): Item) -> bool {
        match converted {
            Ok(Some(object)) => {
                if let Some(document) = document
                    && self
                        .documents
                        .get(&key)
                        .is_none_or(|d| d.document != document)
                {
                    let kept = super::files::KeptDocument {
                        file: origin(),
                        document,
                    };
                    self.documents.insert(key.clone(), kept);
                    self.documents_changed = true;
                }
                self.store.insert(key, object)
            }
            Ok(None) => {
                self.forget(&key);
                self.store.remove(&key)
            }
            Err(reason) => {
                // Never seen good by this process: the version an earlier one kept, if it
                // is of this very object.
                let restored = (!self.store.contains(&key))
                    .then(|| self.restored.get(&key).cloned())
                    .flatten()
                    .filter(|(kept_uid, _)| kept_uid.is_none() || *kept_uid == uid)
                    .map(|(_, object)| object);
                let changed = restored.is_some_and(|object| self.store.insert(key.clone(), object));
                self.store.reject(key, origin(), reason);
                changed
            }
        }
    }

    /// A complete list of a kind: it replaces what the store has of that kind.
    fn replace_kind(&mut self, kind: Kind, items: Vec<Item>) -> bool {
        let had = self.store.keys(kind);
        if items.is_empty() && !had.is_empty() && NEVER_EMPTY.contains(&kind) {
            let why = format!(
                "the API server listed no {}s while {} were known; keeping the last known state",
                kind.as_str(),
                had.len()
            );
            warn!(kind = kind.as_str(), known = had.len(), "{why}");
            self.distrusted.insert(kind, why);
            return false;
        }
        self.distrusted.remove(&kind);
        let listed: BTreeSet<ObjectKey> = items.iter().map(|(k, ..)| k.clone()).collect();
        let mut changed = false;
        // Gone: the objects in force, the rejected ones never good (their errors), and what
        // is kept of objects deleted while no process watched.
        let gone: BTreeSet<ObjectKey> = had
            .into_iter()
            .chain(self.store.error_keys(kind))
            .chain(self.documents.keys().filter(|k| k.kind == kind).cloned())
            .chain(self.restored.keys().filter(|k| k.kind == kind).cloned())
            .filter(|k| !listed.contains(k))
            .collect();
        for key in gone {
            self.forget(&key);
            changed |= self.store.remove(&key);
        }
        for item in items {
            changed |= self.apply(item);
        }
        changed
    }

    /// Restarts watches whose requests may hang: one failing without progress, a list that
    /// stalled, a list not believed (asked again), and once the API server answers again
    /// after an outage, the failing watches and, after a long outage, every watch that made
    /// no progress since it began.
    fn restart_failing(&mut self) {
        let api_down = self.probe.failure.lock().expect("probe").is_some();
        let recoveries = self.probe.recoveries.load(Ordering::Relaxed);
        // The outages the probe saw end since the last look: the earliest start, the longest.
        let outage = (recoveries != self.recoveries_seen)
            .then(|| self.probe.recovered_from.lock().expect("probe").take())
            .flatten();
        self.recoveries_seen = recoveries;
        for kind in Kind::ALL {
            let failing = self.failing.get(&kind);
            // A list in progress is judged by its pages, however long the whole takes.
            let listing = self.list_progress.get(&kind);
            let stale = listing.is_none()
                && failing.is_some_and(|(_, due)| due.elapsed() >= RESTART_FAILING_AFTER);
            let stalled = listing.is_some_and(|t| t.elapsed() >= RESTART_STALLED_LIST_AFTER);
            let recently = self
                .last_restart
                .get(&kind)
                .is_some_and(|t| t.elapsed() < MIN_RESTART_INTERVAL);
            // A list not believed is asked again (the watch goes on from it otherwise).
            let distrusted = self.distrusted.contains_key(&kind);
            let after_outage = listing.is_none()
                && outage.is_some_and(|(since, lasted)| {
                    failing.is_some()
                        || (lasted >= OUTAGE_RESTARTS_QUIET_WATCHES
                            && self.progress.get(&kind).is_none_or(|p| *p < since))
                });
            if after_outage || ((stale || stalled || distrusted) && !api_down && !recently) {
                info!(
                    kind = kind.as_str(),
                    after_outage, stale, stalled, distrusted, "restarting the watch with a relist"
                );
                self.spawn(kind);
            }
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.probe_task.abort();
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

fn origin() -> PathBuf {
    PathBuf::from("kubernetes")
}

impl Source for KubeSource {
    fn refresh(&mut self, force: bool) -> Refresh {
        let mut changed = force;
        // What the current tasks sent first: an InitDone waiting here is not thrown away by
        // a restart that its own progress would have made needless.
        while let Ok((generation, update)) = self.rx.try_recv() {
            if self.generations.get(&update.kind()) != Some(&generation) {
                continue; // from a task restarted since
            }
            if !matches!(update, Update::Failed(..)) {
                let kind = update.kind();
                self.progress.insert(kind, Instant::now());
                match update {
                    Update::Init(_) | Update::InitApply(_) => {
                        self.list_progress.insert(kind, Instant::now());
                    }
                    _ => {
                        self.list_progress.remove(&kind);
                    }
                }
            }
            match update {
                Update::Apply(item) => {
                    self.failing.remove(&item.0.kind);
                    changed |= self.apply(item);
                }
                Update::Delete(key) => {
                    self.failing.remove(&key.kind);
                    self.forget(&key);
                    changed |= self.store.remove(&key);
                }
                Update::Init(kind) => {
                    self.listing.insert(kind, Vec::new());
                }
                Update::InitApply(item) => {
                    self.listing.entry(item.0.kind).or_default().push(item);
                }
                Update::InitDone(kind) => {
                    self.not_served.remove(&kind);
                    let items = self.listing.remove(&kind).unwrap_or_default();
                    self.failing.remove(&kind);
                    self.synced.insert(kind);
                    changed |= self.replace_kind(kind, items);
                }
                Update::NotServed(kind, code, why) => {
                    self.failing.remove(&kind);
                    self.synced.insert(kind);
                    if self.store.keys(kind).is_empty() {
                        // At a start: what the last process kept of the kind is what is
                        // known, and stays in force as it was.
                        let kept: Vec<(ObjectKey, Object)> = self
                            .restored
                            .iter()
                            .filter(|(k, _)| k.kind == kind)
                            .map(|(k, (_, o))| (k.clone(), o.clone()))
                            .collect();
                        for (key, object) in kept {
                            changed |= self.store.insert(key, object);
                        }
                    }
                    let known = self.store.keys(kind).len();
                    if known > 0 {
                        // Known objects of the kind, and now a 404 or 403: API servers answer
                        // 404 for served custom resources for a moment now and then, and a
                        // role can lose a rule. Either way the objects were not deleted:
                        // the last known state stays (the watcher keeps retrying).
                        let why = format!(
                            "the API server answered {code} to the list of {}s ({why}) while {known} were known; keeping the last known state",
                            kind.as_str()
                        );
                        warn!(kind = kind.as_str(), known, "{why}");
                        self.distrusted.insert(kind, why);
                        continue;
                    }
                    // Tollgate's own CRD missing, or not granted: nothing of that kind
                    // exists, and everything else goes on (the watcher keeps retrying, so
                    // installing it later works).
                    if self.not_served.insert(kind, code).is_none() {
                        warn!(
                            kind = kind.as_str(),
                            code,
                            why,
                            "not served by the API server (CRD not installed?) or not granted"
                        );
                    }
                    changed |= self.replace_kind(kind, Vec::new());
                }
                Update::Failed(kind, why, retry_in) => {
                    // A list that broke off is started again from scratch by the watcher.
                    self.listing.remove(&kind);
                    self.list_progress.remove(&kind);
                    self.failing.insert(kind, (why, Instant::now() + retry_in));
                }
            }
        }
        self.restart_failing();
        self.errors = self.store.errors().cloned().collect();
        self.warnings = self.store.warnings();
        for (kind, code) in &self.not_served {
            if *code != 403 {
                self.warnings.push(format!(
                    "the API server does not serve {}s (kubectl apply -k deploy/ installs the CRD); there are none",
                    kind.as_str()
                ));
            }
        }
        let new_errors: Vec<ObjectError> = self
            .errors
            .iter()
            .filter(|e| {
                self.reported
                    .insert((e.object.as_ref().map(ToString::to_string), e.reason.clone()))
            })
            .cloned()
            .collect();
        self.keep(!new_errors.is_empty());
        Refresh {
            changed: changed || !new_errors.is_empty(),
            new_errors,
        }
    }

    fn state(&self) -> &ClusterState {
        self.store.state()
    }

    fn errors(&self) -> &[ObjectError] {
        &self.errors
    }

    fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn degraded(&self) -> Option<String> {
        let mut why = Vec::new();
        if let Some(failure) = self.probe.failure.lock().expect("probe").clone() {
            why.push(format!("the API server does not answer: {failure}"));
        }
        for (kind, (failure, _)) in &self.failing {
            why.push(format!("the watch of {}s fails: {failure}", kind.as_str()));
        }
        why.extend(self.distrusted.values().cloned());
        // A CRD not installed means none of its objects can exist; a list forbidden says
        // nothing of what exists: the security team's ModeOverrides may be missed.
        for (kind, code) in &self.not_served {
            if *code == 403 {
                why.push(format!(
                    "the agent may not list {}s (its ClusterRole lacks them: kubectl apply -k deploy/)",
                    kind.as_str()
                ));
            }
        }
        (!why.is_empty())
            .then(|| format!("{}; the last known state stays in force", why.join("; ")))
    }

    fn on_change(&mut self, wake: super::Waker) {
        let _ = self.wake.set(wake);
    }

    fn ready(&self) -> Option<String> {
        let waiting: Vec<&str> = Kind::ALL
            .iter()
            .filter(|k| !self.synced.contains(k))
            .map(|k| k.as_str())
            .collect();
        (!waiting.is_empty()).then(|| {
            format!(
                "waiting for the first complete list of {} from the API server",
                waiting.join(", ")
            )
        })
    }
}

/// How a watcher hands updates to the source: the channel, then a wake-up.
struct Handover {
    tx: mpsc::Sender<(u64, Update)>,
    generation: u64,
    wake: Arc<std::sync::OnceLock<super::Waker>>,
}

impl Handover {
    async fn send(&self, update: Update) -> Result<(), ()> {
        self.tx
            .send((self.generation, update))
            .await
            .map_err(|_| ())?;
        if let Some(wake) = self.wake.get() {
            wake();
        }
        Ok(())
    }
}

/// Watches one kind across the cluster until the task is aborted.
async fn watch<K>(client: Client, kind: Kind, tx: Handover)
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + Debug + Send + ToObject + 'static,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client);
    // Lists are quorum reads (the default): a list from the watch cache (`resourceVersion=0`)
    // can be older than what the agent saw, on every relist, and bring back what was deleted.
    let stream = watcher(api, watcher::Config::default());
    let mut stream = std::pin::pin!(stream);
    let mut retry = Retry::default();
    let key = |o: &K| ObjectKey {
        kind,
        namespace: if kind.cluster_scoped() {
            String::new()
        } else {
            o.namespace().unwrap_or_else(|| "default".into())
        },
        name: o.name_any(),
    };
    // The object as sent, for a kind whose last good version is kept, when it is good.
    let item = |o: K| -> Item {
        let converted = o.to_object();
        let document = (super::files::kept_across_restarts(kind)
            && matches!(converted, Ok(Some(_))))
        .then(|| serde_json::to_string(&o).ok())
        .flatten();
        let uid = o.meta().uid.clone();
        (key(&o), converted, document, uid)
    };
    while let Some(event) = stream.next().await {
        // Only what a list or a watch brought resets the wait between retries: the watcher
        // reports `Init` before every attempt at a list, failing or not.
        let update = match event {
            Ok(watcher::Event::Apply(o)) => {
                retry.reset();
                Update::Apply(item(o))
            }
            Ok(watcher::Event::Delete(o)) => {
                retry.reset();
                Update::Delete(key(&o))
            }
            Ok(watcher::Event::Init) => Update::Init(kind),
            Ok(watcher::Event::InitApply(o)) => Update::InitApply(item(o)),
            Ok(watcher::Event::InitDone) => {
                retry.reset();
                Update::InitDone(kind)
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if matches!(status.code, 403 | 404)
                    && matches!(kind, Kind::ModeOverride | Kind::EgressAllowlist) =>
            {
                Update::NotServed(kind, status.code, status.message.clone())
            }
            Err(e) => {
                let wait = retry.next();
                warn!(kind = kind.as_str(), error = %e, retry_in = ?wait, "watch failed; retrying");
                Update::Failed(kind, e.to_string(), wait)
            }
        };
        let wait = match &update {
            Update::Failed(_, _, wait) => Some(*wait),
            Update::NotServed(..) => Some(retry.next()),
            _ => None,
        };
        if tx.send(update).await.is_err() {
            return;
        }
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The wait before a failing watch tries again: doubling from `RETRY_FIRST` to `RETRY_MAX`,
/// each wait drawn between half and all of it, so the agents of a cluster do not retry in
/// step; back to the start once a list or an event comes through.
#[derive(Default)]
struct Retry {
    failures: u32,
}

impl Retry {
    fn next(&mut self) -> Duration {
        let full = RETRY_FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(RETRY_MAX);
        self.failures = self.failures.saturating_add(1);
        // Microseconds of the clock: its lowest digits may not move on every machine.
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_micros())
            .unwrap_or(0);
        full / 2 + full / 2 * (jitter % 1000) / 1000
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A client (in-cluster config or `KUBECONFIG`) whose requests end when no answer comes in
/// `READ_TIMEOUT`.
pub async fn client() -> Result<Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.read_timeout = Some(READ_TIMEOUT);
    config.reset_reader_on_write = true;
    Client::try_from(config)
}

/// Asks the API server for its version every `PROBE_INTERVAL`.
async fn run_probe(
    client: Client,
    probe: Arc<Probe>,
    wake: Arc<std::sync::OnceLock<super::Waker>>,
) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    loop {
        tick.tick().await;
        let asked = Instant::now();
        let failure = match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
            Ok(Ok(_)) => None,
            // An answer, even an error status (a server that does not serve /version, or
            // forbids it), is an API server that answers.
            Ok(Err(kube::Error::Api(_))) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer in {}s", PROBE_TIMEOUT.as_secs())),
        };
        let mut current = probe.failure.lock().expect("probe");
        let changed = current.is_some() != failure.is_some();
        match (&*current, &failure) {
            (Some(_), None) => {
                info!("the API server answers again");
                let since = probe
                    .down_since
                    .lock()
                    .expect("probe")
                    .take()
                    .unwrap_or(asked);
                let lasted = since.elapsed();
                let mut recovered = probe.recovered_from.lock().expect("probe");
                *recovered = Some(match *recovered {
                    Some((earlier, longest)) => (earlier.min(since), longest.max(lasted)),
                    None => (since, lasted),
                });
                drop(recovered);
                probe.recoveries.fetch_add(1, Ordering::Relaxed);
            }
            (None, Some(why)) => {
                warn!(error = %why, "the API server does not answer");
                // It stopped answering at the latest when this probe asked.
                *probe.down_since.lock().expect("probe") = Some(asked);
            }
            _ => {}
        }
        *current = failure;
        drop(current);
        if changed && let Some(wake) = wake.get() {
            wake();
        }
    }
}
