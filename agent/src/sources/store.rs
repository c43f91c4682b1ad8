//! The objects every source produces, and the one store that turns them into the model.
//! Both sources keep one and change it in place: the file source with the objects of the
//! files that changed, the Kubernetes source with watch events. A rejected object never
//! replaces the version in the store: the last good version of an object stays in force.

use std::{collections::BTreeMap, path::PathBuf};

use super::{ObjectError, convert};
use crate::compile::model::{
    ChangeLog, Changed, ClusterState, EgressAllowlistInfo, EndpointSliceInfo, ModeOverrideInfo,
    NamespaceInfo, NodeInfo, PodInfo, Policy, Protocol, ServiceInfo,
};

/// What kind of object.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    EndpointSlice,
    Node,
    ModeOverride,
    EgressAllowlist,
}

impl Kind {
    /// Every kind, in the order a source lists them.
    pub const ALL: [Kind; 8] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::NetworkPolicy,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ModeOverride,
        Kind::EgressAllowlist,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ModeOverride => "ModeOverride",
            Kind::EgressAllowlist => "EgressAllowlist",
        }
    }

    /// Cluster-scoped kinds have no namespace.
    pub fn cluster_scoped(self) -> bool {
        matches!(self, Kind::Namespace | Kind::Node | Kind::ModeOverride)
    }
}

/// Identity of an object across reloads.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

/// A converted object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(NamespaceInfo),
    Pod(PodInfo),
    Policy(Policy),
    Service(ServiceInfo),
    EndpointSlice(EndpointSliceInfo),
    Node(NodeInfo),
    ModeOverride(ModeOverrideInfo),
    EgressAllowlist(EgressAllowlistInfo),
}

/// The model being built, with what each object contributed besides itself.
#[derive(Debug)]
pub struct Store {
    state: ClusterState,
    /// Notes about an object (an ignored annotation, SCTP rules), by object.
    warnings: BTreeMap<ObjectKey, String>,
    /// Objects rejected in their latest version, by object.
    errors: BTreeMap<ObjectKey, ObjectError>,
    /// Move whenever a pod or namespace (`ClusterState::pods_version`), a Service or an
    /// EndpointSlice (`services_version`) changes. They start from the log's id, so two
    /// stores never share a version.
    pods_version: u64,
    services_version: u64,
}

impl Default for Store {
    fn default() -> Self {
        let changes = ChangeLog::new();
        let first = changes.id() << 32;
        Store {
            state: ClusterState {
                changes,
                ..ClusterState::default()
            },
            warnings: BTreeMap::new(),
            errors: BTreeMap::new(),
            pods_version: first,
            services_version: first,
        }
    }
}

impl Store {
    /// A store of the objects written as YAML (tests: panics on anything invalid).
    #[cfg(test)]
    pub fn from_yaml(yaml: &str) -> Store {
        let mut store = Store::default();
        let parsed = super::files::parse_file(yaml, std::path::Path::new("test.yaml"));
        for object in parsed.expect("YAML") {
            let (key, object) = object.expect("valid object");
            store.insert(key, object);
        }
        store
    }

    /// The model as it stands.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The model, leaving the store.
    pub fn into_state(self) -> ClusterState {
        self.state
    }

    /// Notes on the objects in the store.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .iter()
            .map(|(key, w)| format!("{key}: {w}"))
            .collect()
    }

    /// Objects whose latest version was rejected.
    pub fn errors(&self) -> impl Iterator<Item = &ObjectError> {
        self.errors.values()
    }

    /// The version of an object in the store.
    pub fn get(&self, key: &ObjectKey) -> Option<Object> {
        let pair = (key.namespace.clone(), key.name.clone());
        let s = &self.state;
        Some(match key.kind {
            Kind::Namespace => Object::Namespace(s.namespaces.get(&key.name)?.clone()),
            Kind::Pod => Object::Pod(s.pods.get(&pair)?.clone()),
            Kind::NetworkPolicy => Object::Policy(s.policies.get(&pair)?.clone()),
            Kind::Service => Object::Service(s.services.get(&pair)?.clone()),
            Kind::EndpointSlice => Object::EndpointSlice(s.endpoint_slices.get(&pair)?.clone()),
            Kind::Node => Object::Node(s.nodes.get(&key.name)?.clone()),
            Kind::ModeOverride => Object::ModeOverride(s.mode_overrides.get(&key.name)?.clone()),
            Kind::EgressAllowlist => {
                Object::EgressAllowlist(s.egress_allowlists.get(&pair)?.clone())
            }
        })
    }

    /// The objects of a kind whose latest version was rejected.
    pub fn error_keys(&self, kind: Kind) -> impl Iterator<Item = ObjectKey> + '_ {
        self.errors.keys().filter(move |k| k.kind == kind).cloned()
    }

    /// Whether the store holds a version of the object.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        let pair = || (key.namespace.clone(), key.name.clone());
        match key.kind {
            Kind::Namespace => self.state.namespaces.contains_key(&key.name),
            Kind::Pod => self.state.pods.contains_key(&pair()),
            Kind::NetworkPolicy => self.state.policies.contains_key(&pair()),
            Kind::Service => self.state.services.contains_key(&pair()),
            Kind::EndpointSlice => self.state.endpoint_slices.contains_key(&pair()),
            Kind::Node => self.state.nodes.contains_key(&key.name),
            Kind::ModeOverride => self.state.mode_overrides.contains_key(&key.name),
            Kind::EgressAllowlist => self.state.egress_allowlists.contains_key(&pair()),
        }
    }

    /// The keys of every object of a kind in the store.
    pub fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        let key = |namespace: &str, name: &str| ObjectKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        };
        match kind {
            Kind::Namespace => self.state.namespaces.keys().map(|n| key("", n)).collect(),
            Kind::Pod => self.state.pods.keys().map(|(ns, n)| key(ns, n)).collect(),
            Kind::NetworkPolicy => self
                .state
                .policies
                .keys()
                .map(|(ns, n)| key(ns, n))
                .collect(),
            Kind::Service => self
                .state
                .services
                .keys()
                .map(|(ns, n)| key(ns, n))
                .collect(),
            Kind::EndpointSlice => self
                .state
                .endpoint_slices
                .keys()
                .map(|(ns, n)| key(ns, n))
                .collect(),
            Kind::Node => self.state.nodes.keys().map(|n| key("", n)).collect(),
            Kind::ModeOverride => self
                .state
                .mode_overrides
                .keys()
                .map(|n| key("", n))
                .collect(),
            Kind::EgressAllowlist => self
                .state
                .egress_allowlists
                .keys()
                .map(|(ns, n)| key(ns, n))
                .collect(),
        }
    }

    /// Puts in (or replaces) a good object. Returns whether the model changed.
    pub fn insert(&mut self, key: ObjectKey, object: Object) -> bool {
        self.errors.remove(&key);
        match warning_of(&object) {
            Some(w) => self.warnings.insert(key.clone(), w),
            None => self.warnings.remove(&key),
        };
        let pair = (key.namespace.clone(), key.name.clone());
        let changed = match object {
            Object::Namespace(ns) => replace(&mut self.state.namespaces, key.name.clone(), ns),
            Object::Pod(pod) => replace(&mut self.state.pods, pair, pod),
            Object::Policy(p) => replace(&mut self.state.policies, pair, p),
            Object::Service(svc) => replace(&mut self.state.services, pair, svc),
            Object::EndpointSlice(s) => replace(&mut self.state.endpoint_slices, pair, s),
            Object::Node(node) => replace(&mut self.state.nodes, key.name.clone(), node),
            Object::ModeOverride(o) => replace(&mut self.state.mode_overrides, key.name.clone(), o),
            Object::EgressAllowlist(a) => replace(&mut self.state.egress_allowlists, pair, a),
        };
        if changed {
            self.changed(&key);
        }
        changed
    }

    /// Takes an object out (deleted, or no longer listed). Returns whether it was there.
    pub fn remove(&mut self, key: &ObjectKey) -> bool {
        self.errors.remove(key);
        self.warnings.remove(key);
        let pair = (key.namespace.clone(), key.name.clone());
        let removed = match key.kind {
            Kind::Namespace => self.state.namespaces.remove(&key.name).is_some(),
            Kind::Pod => self.state.pods.remove(&pair).is_some(),
            Kind::NetworkPolicy => self.state.policies.remove(&pair).is_some(),
            Kind::Service => self.state.services.remove(&pair).is_some(),
            Kind::EndpointSlice => self.state.endpoint_slices.remove(&pair).is_some(),
            Kind::Node => self.state.nodes.remove(&key.name).is_some(),
            Kind::ModeOverride => self.state.mode_overrides.remove(&key.name).is_some(),
            Kind::EgressAllowlist => self.state.egress_allowlists.remove(&pair).is_some(),
        };
        if removed {
            self.changed(key);
        }
        removed
    }

    /// Records that the latest version of an object was rejected; the version in the store
    /// (the last good one), if any, stays. Returns the error as reported.
    pub fn reject(&mut self, key: ObjectKey, origin: PathBuf, reason: String) -> ObjectError {
        let error = ObjectError {
            kept_last_good: self.contains(&key),
            object: Some(key.clone()),
            file: origin,
            reason,
        };
        self.errors.insert(key, error.clone());
        error
    }

    fn changed(&mut self, key: &ObjectKey) {
        let pair = || (key.namespace.clone(), key.name.clone());
        let logged = match key.kind {
            Kind::Pod => Changed::Pod(pair()),
            Kind::Namespace => Changed::Namespace(key.name.clone()),
            Kind::Service => Changed::Service(pair()),
            Kind::EndpointSlice => Changed::EndpointSlice(pair()),
            Kind::NetworkPolicy => Changed::Policy(pair()),
            Kind::ModeOverride => Changed::ModeOverride(key.name.clone()),
            Kind::Node | Kind::EgressAllowlist => return,
        };
        if matches!(key.kind, Kind::Pod | Kind::Namespace) {
            self.pods_version = self.pods_version.wrapping_add(1);
            self.state.pods_version = Some(self.pods_version);
        } else if matches!(key.kind, Kind::Service | Kind::EndpointSlice) {
            self.services_version = self.services_version.wrapping_add(1);
            self.state.services_version = Some(self.services_version);
        }
        self.state.changes.record(logged);
    }
}

fn replace<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    match map.get(&key) {
        Some(old) if *old == value => false,
        _ => {
            map.insert(key, value);
            true
        }
    }
}

/// What an object holds that is accepted but does not work as its author may think.
fn warning_of(object: &Object) -> Option<String> {
    match object {
        Object::Namespace(ns) => convert::invalid_mode_annotation(&ns.annotations),
        Object::Pod(pod) => convert::invalid_mode_annotation(&pod.annotations),
        Object::Policy(policy) => policy
            .ingress
            .iter()
            .chain(policy.egress.iter())
            .flatten()
            .flat_map(|r| &r.ports)
            .any(|p| p.protocol == Protocol::Sctp)
            .then(|| {
                "SCTP rules are accepted but unsupported by this kernel (no SCTP traffic can match)"
                    .to_string()
            }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_key(name: &str) -> ObjectKey {
        ObjectKey {
            kind: Kind::Pod,
            namespace: "bank".into(),
            name: name.into(),
        }
    }

    fn pod(name: &str, mode: Option<&str>) -> Object {
        Object::Pod(PodInfo {
            namespace: "bank".into(),
            name: name.into(),
            annotations: mode
                .map(|m| {
                    [(
                        crate::compile::model::MODE_ANNOTATION.to_string(),
                        m.to_string(),
                    )]
                    .into()
                })
                .unwrap_or_default(),
            ..PodInfo::default()
        })
    }

    #[test]
    fn a_rejected_update_keeps_the_last_good_version() {
        let mut store = Store::default();
        assert!(store.insert(pod_key("a"), pod("a", None)));
        let version = store.state().pods_version;
        assert!(
            !store.insert(pod_key("a"), pod("a", None)),
            "same object: no change"
        );
        assert_eq!(store.state().pods_version, version);
        let e = store.reject(pod_key("a"), "kubernetes".into(), "bad".into());
        assert!(e.kept_last_good);
        assert!(store.contains(&pod_key("a")));
        assert_eq!(store.errors().count(), 1);
        // A new object that is rejected has no last good version.
        let e = store.reject(pod_key("b"), "kubernetes".into(), "bad".into());
        assert!(!e.kept_last_good);
        assert!(!store.contains(&pod_key("b")));
        // A good version clears the error; removal clears everything about the object.
        store.insert(pod_key("a"), pod("a", Some("sideways")));
        assert_eq!(store.errors().count(), 1, "only b's error is left");
        assert_eq!(store.warnings().len(), 1, "{:?}", store.warnings());
        assert!(store.remove(&pod_key("a")));
        assert!(store.warnings().is_empty());
        assert_ne!(store.state().pods_version, version);
        assert_eq!(store.keys(Kind::Pod), vec![]);
    }
}
