//! A Kubernetes API server stand-in for the real kube-rs client: no API server can run on
//! these machines, so this one serves what a real one sends, byte for byte in shape: lists
//! (`PodList`... with `metadata.resourceVersion`, items without `kind`, paged with `limit`
//! and `continue`), chunked watch streams of `ADDED`/`MODIFIED`/`DELETED`, `BOOKMARK`s, and
//! `ERROR` events with a `410 Expired` Status once the watched version is compacted away. It
//! takes Events (`POST`, merge `PATCH`) and ModeOverrides (list, create, patch, delete), and
//! can go down: refusing connections, or accepting them and never answering.
//!
//! It listens on 127.0.0.1 inside a network namespace (the lab's node), where the agent
//! runs.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// How the server behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    /// The port is closed: connections are refused; open watches are cut.
    Refusing,
    /// Connections are accepted and never answered; open watches go silent.
    Hanging,
}

/// A resource collection the server serves.
#[derive(Clone, Copy, Debug)]
struct Collection {
    /// `/api/v1/pods`...
    path: &'static str,
    api_version: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const COLLECTIONS: [Collection; 9] = [
    Collection {
        path: "/api/v1/namespaces",
        api_version: "v1",
        kind: "Namespace",
        namespaced: false,
    },
    Collection {
        path: "/api/v1/pods",
        api_version: "v1",
        kind: "Pod",
        namespaced: true,
    },
    Collection {
        path: "/api/v1/services",
        api_version: "v1",
        kind: "Service",
        namespaced: true,
    },
    Collection {
        path: "/api/v1/nodes",
        api_version: "v1",
        kind: "Node",
        namespaced: false,
    },
    Collection {
        path: "/api/v1/events",
        api_version: "v1",
        kind: "Event",
        namespaced: true,
    },
    Collection {
        path: "/apis/networking.k8s.io/v1/networkpolicies",
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        namespaced: true,
    },
    Collection {
        path: "/apis/discovery.k8s.io/v1/endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Collection {
        path: "/apis/tollgate.io/v1alpha1/modeoverrides",
        api_version: "tollgate.io/v1alpha1",
        kind: "ModeOverride",
        namespaced: false,
    },
    Collection {
        path: "/apis/tollgate.io/v1alpha1/egressallowlists",
        api_version: "tollgate.io/v1alpha1",
        kind: "EgressAllowlist",
        namespaced: true,
    },
];

fn collection_of_kind(kind: &str) -> Option<Collection> {
    COLLECTIONS.iter().copied().find(|c| c.kind == kind)
}

/// One recorded change: what a watch sends.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: &'static str,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Debug)]
struct State {
    rv: u64,
    /// By kind, then (namespace, name).
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    changes: Vec<Change>,
    /// Watches from a version below this get `410 Gone`.
    compacted: u64,
    health: Health,
    /// Moves whenever open watches must end (an outage, a compaction).
    cut: u64,
    /// Request lines seen (`GET /api/v1/pods?...`).
    requests: Vec<String>,
    next_uid: u64,
    /// Kinds answered with 404 (a CRD not installed).
    unserved: Vec<&'static str>,
    /// Answer every request for a list's next page (`continue=`) with 500: lists break off
    /// after their first page.
    fail_continued: bool,
    /// Kinds answered with 403 (a ClusterRole without them).
    forbidden: Vec<&'static str>,
    /// How long each page of a list takes (an API server under load, a large cluster).
    page_delay: Duration,
    /// How long the next `/version` takes to answer (a slow moment of the API server).
    version_delay: Option<Duration>,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    /// Creates or replaces one object (with `apiVersion` and `kind`). Kinds the server does
    /// not serve are ignored, as the agent ignores them.
    fn apply(&self, mut object: Value) {
        let Some(c) = object["kind"].as_str().and_then(collection_of_kind) else {
            return;
        };
        let mut s = self.state.lock().unwrap();
        let key = key_of(&object, c);
        let existing = s.objects.get(c.kind).and_then(|m| m.get(&key)).cloned();
        s.rv += 1;
        let rv = s.rv;
        let uid = match existing
            .as_ref()
            .and_then(|e| e["metadata"]["uid"].as_str())
        {
            Some(uid) => uid.to_string(),
            None => match object["metadata"]["uid"].as_str() {
                Some(uid) => uid.to_string(),
                None => {
                    s.next_uid += 1;
                    format!("00000000-0000-4000-8000-{:012x}", s.next_uid)
                }
            },
        };
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = json!(uid);
        if c.namespaced {
            meta["namespace"] = json!(key.0.clone());
        }
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = json!("2026-11-25T10:00:00Z");
        }
        let kind_of_event = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects
            .entry(c.kind)
            .or_default()
            .insert(key, object.clone());
        s.changes.push(Change {
            rv,
            kind: c.kind,
            kind_of_event,
            object,
        });
        self.changed.notify_all();
    }

    /// Deletes an object.
    fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let c = collection_of_kind(kind).expect("a served kind");
        let mut s = self.state.lock().unwrap();
        let key = (
            if c.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
        if let Some(mut object) = s.objects.get_mut(c.kind).and_then(|m| m.remove(&key)) {
            s.rv += 1;
            object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let rv = s.rv;
            s.changes.push(Change {
                rv,
                kind: c.kind,
                kind_of_event: "DELETED",
                object,
            });
            self.changed.notify_all();
        }
    }
}

/// The running server.
pub struct ApiServer {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 (a free port) in the network namespace `netns`.
    pub fn start(netns: &str) -> ApiServer {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 1000,
                objects: BTreeMap::new(),
                changes: Vec::new(),
                compacted: 0,
                health: Health::Up,
                cut: 0,
                requests: Vec::new(),
                next_uid: 1,
                unserved: Vec::new(),
                fail_continued: false,
                forbidden: Vec::new(),
                page_delay: Duration::ZERO,
                version_delay: None,
            }),
            changed: Condvar::new(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let netns = netns.to_string();
        let server = inner.clone();
        thread::spawn(move || {
            let _ns = crate::NetNsGuard::enter(&netns);
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind the API server");
            let addr = listener.local_addr().expect("address");
            tx.send(addr).expect("report the address");
            accept_loop(server, listener, addr);
        });
        let addr = rx.recv().expect("API server address");
        ApiServer { inner, addr }
    }

    /// A kubeconfig for this server, written to `dir/kubeconfig`.
    pub fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster: {{server: 'http://{}'}}\nusers:\n- name: lab\n  user: {{token: lab-token}}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: lab}}\ncurrent-context: lab\n",
                self.addr
            ),
        )
        .expect("write the kubeconfig");
        path
    }

    /// Creates or replaces objects given as Kubernetes YAML (one or more documents,
    /// `kind: List` too), as `kubectl apply` would.
    pub fn apply_yaml(&self, yaml: &str) {
        use serde::Deserialize as _;
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let value = serde_norway::Value::deserialize(doc).expect("YAML");
            if value.is_null() {
                continue;
            }
            let json: Value = serde_json::to_value(value).expect("YAML as JSON");
            match json["kind"].as_str() {
                Some(k) if k.ends_with("List") => {
                    for item in json["items"].as_array().cloned().unwrap_or_default() {
                        self.apply(item);
                    }
                }
                _ => self.apply(json),
            }
        }
    }

    /// Creates or replaces one object (with `apiVersion` and `kind`). Kinds the server does
    /// not serve are ignored, as the agent ignores them.
    pub fn apply(&self, object: Value) {
        self.inner.apply(object);
    }

    /// Deletes an object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        self.inner.delete(kind, namespace, name);
    }

    /// Forgets the history (as etcd compaction does) and cuts every open watch: watchers
    /// that resume from their last version get `410 Gone` and must list again.
    pub fn compact(&self) {
        let mut s = self.inner.state.lock().unwrap();
        // A write elsewhere first (a real cluster writes leases every few seconds): without
        // it a watcher whose last bookmark carried the current version could resume
        // legitimately, and whether it lists again would depend on timing.
        s.rv += 1;
        s.compacted = s.rv;
        s.changes.clear();
        s.cut += 1;
        self.inner.changed.notify_all();
    }

    /// Loses every object of a kind without telling any watcher, and compacts: the next
    /// list is empty. What a broken or wrongly restored API server serves; a well-behaved
    /// client must not believe it.
    pub fn lose_all(&self, kind: &str) {
        let mut s = self.inner.state.lock().unwrap();
        if let Some(m) = s.objects.get_mut(kind) {
            m.clear();
        }
        s.rv += 1;
        s.compacted = s.rv;
        s.changes.clear();
        s.cut += 1;
        self.inner.changed.notify_all();
    }

    /// Makes lists break off after their first page (500 on `continue`), or work again.
    pub fn fail_continued_lists(&self, fail: bool) {
        self.inner.state.lock().unwrap().fail_continued = fail;
    }

    /// Stops serving a kind (404), as when its CRD is not installed.
    pub fn unserve(&self, kind: &str) {
        let c = collection_of_kind(kind).expect("a served kind");
        self.inner.state.lock().unwrap().unserved.push(c.kind);
    }

    /// Forbids every request for a kind (403), as a ClusterRole without it does.
    pub fn forbid(&self, kind: &str) {
        let c = collection_of_kind(kind).expect("a served kind");
        self.inner.state.lock().unwrap().forbidden.push(c.kind);
    }

    /// Makes every page of a list take `delay` to come.
    pub fn slow_pages(&self, delay: Duration) {
        self.inner.state.lock().unwrap().page_delay = delay;
    }

    /// Makes the next `/version` answer only after `delay`: an API server slow for a
    /// moment, not down.
    pub fn slow_next_version(&self, delay: Duration) {
        self.inner.state.lock().unwrap().version_delay = Some(delay);
    }

    /// Goes down or comes back.
    pub fn set_health(&self, health: Health) {
        let mut s = self.inner.state.lock().unwrap();
        s.health = health;
        s.cut += 1;
        self.inner.changed.notify_all();
    }

    /// Every Event objects the agent created (with their patched counts).
    pub fn events(&self) -> Vec<Value> {
        let s = self.inner.state.lock().unwrap();
        s.objects
            .get("Event")
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The Events of one reason (`PacketWouldDrop`...).
    pub fn events_with_reason(&self, reason: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }

    /// An object as the server has it.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let s = self.inner.state.lock().unwrap();
        s.objects
            .get(kind)?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Every object of a kind.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let s = self.inner.state.lock().unwrap();
        s.objects
            .get(kind)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Request lines seen so far (`GET /api/v1/pods?limit=500`...).
    pub fn requests(&self) -> Vec<String> {
        self.inner.state.lock().unwrap().requests.clone()
    }
}

fn key_of(object: &Value, c: Collection) -> (String, String) {
    let ns = if c.namespaced {
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()
    } else {
        String::new()
    };
    (
        ns,
        object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn accept_loop(inner: Arc<Inner>, listener: TcpListener, addr: SocketAddr) {
    let mut listener = Some(listener);
    loop {
        let health = inner.state.lock().unwrap().health;
        match (health, &listener) {
            (Health::Refusing, Some(_)) => listener = None,
            (Health::Refusing, None) => {}
            (_, None) => {
                // Rebind the same port (SO_REUSEADDR is set by std on Unix).
                listener = TcpListener::bind(addr).ok();
            }
            _ => {}
        }
        let Some(l) = &listener else {
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        l.set_nonblocking(true).ok();
        match l.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).ok();
                let inner = inner.clone();
                thread::spawn(move || serve_connection(inner, stream));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        body,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 3 <= bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn serve_connection(inner: Arc<Inner>, stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    let Some(req) = read_request(&mut reader) else {
        return;
    };
    let cut_at_start = {
        let mut s = inner.state.lock().unwrap();
        let q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.requests
            .push(format!("{} {}?{}", req.method, req.path, q.join("&")));
        if s.health == Health::Hanging {
            drop(s);
            // Accepted, never answered: hold the connection until the test ends.
            thread::sleep(Duration::from_secs(3600));
            return;
        }
        s.cut
    };
    if req.path == "/version" {
        let delay = inner.state.lock().unwrap().version_delay.take();
        if let Some(delay) = delay {
            thread::sleep(delay);
        }
        respond(
            &mut stream,
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.4",
            "gitCommit": "74cdb426c0b4e6d7c1a1b9d8b3d5e6f7a8b9c0d1", "gitTreeState": "clean",
            "buildDate": "2025-08-12T18:02:00Z", "goVersion": "go1.24.5", "compiler": "gc",
            "platform": "linux/amd64"}),
        );
        return;
    }
    // Namespaced Event writes: /api/v1/namespaces/NS/events[/NAME].
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    if parts.len() >= 5 && parts[..3] == ["api", "v1", "namespaces"] && parts[4] == "events" {
        let ns = parts[3].to_string();
        return events_request(
            &inner,
            &mut stream,
            &req,
            ns,
            parts.get(5).map(|s| s.to_string()),
        );
    }
    // A kind it does not serve (or no longer: a CRD not installed) is not found.
    let served = COLLECTIONS
        .iter()
        .copied()
        .find(|c| req.path.starts_with(c.path))
        .filter(|c| !inner.state.lock().unwrap().unserved.contains(&c.kind));
    if let Some(c) = served
        && inner.state.lock().unwrap().forbidden.contains(&c.kind)
    {
        let message = format!(
            "{}s is forbidden: User \"system:serviceaccount:tollgate:tollgate\" cannot list resource",
            c.kind.to_lowercase()
        );
        respond(&mut stream, 403, &status(403, "Forbidden", &message));
        return;
    }
    let Some(c) = served else {
        respond(
            &mut stream,
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
        return;
    };
    let name = req.path[c.path.len()..].trim_start_matches('/').to_string();
    match (req.method.as_str(), name.is_empty()) {
        ("GET", true)
            if req
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1") =>
        {
            watch(&inner, stream, &req, c, cut_at_start)
        }
        ("GET", true) => list(&inner, &mut stream, &req, c),
        ("GET", false) => {
            let s = inner.state.lock().unwrap();
            match s
                .objects
                .get(c.kind)
                .and_then(|m| m.get(&(String::new(), name.clone())))
            {
                Some(o) => respond(&mut stream, 200, o),
                None => respond(
                    &mut stream,
                    404,
                    &status(404, "NotFound", &format!("{} {name:?} not found", c.kind)),
                ),
            }
        }
        ("POST", true) => {
            let mut object: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            object["apiVersion"] = json!(c.api_version);
            object["kind"] = json!(c.kind);
            let key = key_of(&object, c);
            let exists = inner
                .state
                .lock()
                .unwrap()
                .objects
                .get(c.kind)
                .is_some_and(|m| m.contains_key(&key));
            if exists {
                respond(
                    &mut stream,
                    409,
                    &status(409, "AlreadyExists", "already exists"),
                );
                return;
            }
            inner.apply(object);
            let created = inner.state.lock().unwrap().objects[c.kind][&key].clone();
            respond(&mut stream, 201, &created);
        }
        ("PATCH", false) => {
            let key = (String::new(), name.clone());
            let Some(mut object) = inner
                .state
                .lock()
                .unwrap()
                .objects
                .get(c.kind)
                .and_then(|m| m.get(&key))
                .cloned()
            else {
                respond(&mut stream, 404, &status(404, "NotFound", "not found"));
                return;
            };
            let patch: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            merge(&mut object, &patch);
            inner.apply(object);
            let patched = inner.state.lock().unwrap().objects[c.kind][&key].clone();
            respond(&mut stream, 200, &patched);
        }
        ("DELETE", false) => {
            let existing = inner
                .state
                .lock()
                .unwrap()
                .objects
                .get(c.kind)
                .and_then(|m| m.get(&(String::new(), name.clone())))
                .cloned();
            match existing {
                Some(o) => {
                    inner.delete(c.kind, "", &name);
                    respond(&mut stream, 200, &o);
                }
                None => respond(&mut stream, 404, &status(404, "NotFound", "not found")),
            }
        }
        _ => respond(
            &mut stream,
            405,
            &status(405, "MethodNotAllowed", "method not allowed"),
        ),
    }
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    target.as_object_mut().unwrap().remove(k);
                } else {
                    merge(
                        target
                            .as_object_mut()
                            .unwrap()
                            .entry(k.clone())
                            .or_insert(Value::Null),
                        v,
                    );
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn events_request(
    inner: &Arc<Inner>,
    stream: &mut TcpStream,
    req: &Request,
    ns: String,
    name: Option<String>,
) {
    let c = collection_of_kind("Event").unwrap();
    match (req.method.as_str(), name) {
        ("POST", None) => {
            let mut object: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            object["apiVersion"] = json!("v1");
            object["kind"] = json!("Event");
            object["metadata"]["namespace"] = json!(ns);
            if object["metadata"]["name"].as_str().is_none() {
                let prefix = object["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("event.")
                    .to_string();
                let n = inner.state.lock().unwrap().rv;
                object["metadata"]["name"] = json!(format!("{prefix}{n:x}"));
            }
            let key = key_of(&object, c);
            inner.apply(object);
            let created = inner.state.lock().unwrap().objects["Event"][&key].clone();
            respond(stream, 201, &created);
        }
        ("PATCH", Some(name)) => {
            let key = (ns, name);
            let Some(mut object) = inner
                .state
                .lock()
                .unwrap()
                .objects
                .get("Event")
                .and_then(|m| m.get(&key))
                .cloned()
            else {
                respond(stream, 404, &status(404, "NotFound", "not found"));
                return;
            };
            let patch: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            merge(&mut object, &patch);
            inner.apply(object);
            let patched = inner.state.lock().unwrap().objects["Event"][&key].clone();
            respond(stream, 200, &patched);
        }
        _ => respond(
            stream,
            405,
            &status(405, "MethodNotAllowed", "method not allowed"),
        ),
    }
}

fn list(inner: &Arc<Inner>, stream: &mut TcpStream, req: &Request, c: Collection) {
    let delay = inner.state.lock().unwrap().page_delay;
    thread::sleep(delay);
    let s = inner.state.lock().unwrap();
    if s.fail_continued && req.query.contains_key("continue") {
        drop(s);
        respond(
            stream,
            500,
            &status(500, "InternalError", "etcdserver: request timed out"),
        );
        return;
    }
    let all: Vec<Value> = s
        .objects
        .get(c.kind)
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let start: usize = req
        .query
        .get("continue")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let limit: usize = req
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let end = start.saturating_add(limit).min(all.len());
    // Items of a list carry no kind or apiVersion, as the real API server sends them.
    let items: Vec<Value> = all[start.min(all.len())..end]
        .iter()
        .map(|o| {
            let mut o = o.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    let mut metadata = json!({"resourceVersion": s.rv.to_string()});
    if end < all.len() {
        metadata["continue"] = json!(end.to_string());
        metadata["remainingItemCount"] = json!(all.len() - end);
    }
    let body = json!({"kind": format!("{}List", c.kind), "apiVersion": c.api_version,
                      "metadata": metadata, "items": items});
    drop(s);
    respond(stream, 200, &body);
}

fn chunk(stream: &mut TcpStream, event: &Value) -> bool {
    let mut line = event.to_string();
    line.push('\n');
    write!(stream, "{:x}\r\n{line}\r\n", line.len()).is_ok() && stream.flush().is_ok()
}

fn watch(
    inner: &Arc<Inner>,
    mut stream: TcpStream,
    req: &Request,
    c: Collection,
    cut_at_start: u64,
) {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(290u64);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    if write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let compacted = inner.state.lock().unwrap().compacted;
    if from != 0 && from < compacted {
        let gone = status(
            410,
            "Expired",
            &format!("too old resource version: {from} ({compacted})"),
        );
        chunk(&mut stream, &json!({"type": "ERROR", "object": gone}));
        let _ = write!(stream, "0\r\n\r\n");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        let (pending, rv, health, cut) = {
            let s = inner.state.lock().unwrap();
            let s = inner
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap()
                .0;
            let pending: Vec<Change> = s
                .changes
                .iter()
                .filter(|ch| ch.kind == c.kind && ch.rv > sent)
                .cloned()
                .collect();
            (pending, s.rv, s.health, s.cut)
        };
        match health {
            // Silent: the connection stays open and nothing comes.
            Health::Hanging => continue,
            Health::Refusing => return,
            Health::Up if cut != cut_at_start => return,
            Health::Up => {}
        }
        for ch in pending {
            sent = ch.rv;
            if !chunk(
                &mut stream,
                &json!({"type": ch.kind_of_event, "object": ch.object}),
            ) {
                return;
            }
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            last_bookmark = Instant::now();
            sent = sent.max(rv);
            let mark = json!({"type": "BOOKMARK", "object": {"kind": c.kind, "apiVersion": c.api_version,
                              "metadata": {"resourceVersion": rv.to_string()}}});
            if !chunk(&mut stream, &mark) {
                return;
            }
        }
        if Instant::now() >= deadline {
            let _ = write!(stream, "0\r\n\r\n");
            return;
        }
    }
}
