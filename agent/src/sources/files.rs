//! The local source: `--cluster-state PATH`, a file or a directory of Kubernetes YAML
//! (multi-document, `kind: List` and `kind: *List` all accepted), re-read when it changes:
//! Namespaces, Pods, NetworkPolicies, Services, EndpointSlices and Nodes.
//!
//! A bad object is rejected with its kind, namespace/name and the reason; the last good
//! version of that object stays in force. So is a document that is not YAML, named by the
//! kind and name its lines give; one that names nothing could have been any object of its
//! file, which then keeps the last good version of everything it held (with none, its other
//! documents are read).
//!
//! The last good versions of the objects that decide enforcement (NetworkPolicies,
//! EgressAllowlists, ModeOverrides, Namespaces) are also kept in `--state-dir`
//! (`FileSource::with_last_good_store`), so an agent restarted while one of them is broken
//! still enforces its last good version instead of dropping it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::Deserialize as _;
use serde_norway::Value;

use super::{
    Refresh, Source,
    convert::{self, ToObject},
    crd::{EgressAllowlist, ModeOverride},
    store::{Kind, Object, ObjectKey, Store},
};
use crate::compile::model::ClusterState;

/// A rejected object (or file).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectError {
    /// The object, when it could be identified.
    pub object: Option<ObjectKey>,
    /// File it came from.
    pub file: PathBuf,
    pub reason: String,
    /// Whether a last good version stays in force instead.
    pub kept_last_good: bool,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.object {
            Some(key) => write!(f, "{key} ({}): {}", self.file.display(), self.reason)?,
            None => write!(f, "{}: {}", self.file.display(), self.reason)?,
        }
        if self.kept_last_good {
            write!(f, "; the last good version stays in force")?;
        }
        Ok(())
    }
}

/// The result of one load.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub state: ClusterState,
    /// Everything rejected in this load.
    pub errors: Vec<ObjectError>,
    /// Errors not reported by the previous load (what `tollgate_policy_errors_total` counts).
    pub new_errors: Vec<ObjectError>,
    /// Notes that are not errors (SCTP rules on a kernel without SCTP, duplicates).
    pub warnings: Vec<String>,
}

/// What one read of the files reported, as `Loaded` without the state: the state is the
/// source's own (`FileSource::model`).
#[derive(Clone, Debug, Default)]
struct Report {
    errors: Vec<ObjectError>,
    new_errors: Vec<ObjectError>,
    warnings: Vec<String>,
}

/// One parsed object, or why it was rejected.
pub type Parsed = Result<(ObjectKey, Object), ObjectError>;

/// Parses the documents of one file into objects and per-object errors. A document that is
/// not YAML is rejected as the object it names (`broken_documents_apart`); the file fails as
/// a whole only when such a document names none.
pub fn parse_file(text: &str, file: &Path) -> Result<Vec<Parsed>, String> {
    let documents = match parse_documents(text, file) {
        Ok(documents) => documents,
        Err(u) if u.all_named => u.documents,
        Err(u) => return Err(u.reason),
    };
    Ok(documents.into_iter().map(|(parsed, _)| parsed).collect())
}

/// A file the YAML parser gave up on that no per-object error accounts for: a broken
/// document names no object. `documents`: the rest of it, read a document at a time, for a
/// file with no last good version to keep instead.
#[derive(Debug)]
struct Unreadable {
    reason: String,
    documents: Vec<(Parsed, Option<String>)>,
    /// Every broken document named the object it held (`named_object`).
    all_named: bool,
}

/// `parse_file`, each good object of a kind whose last good version is kept across restarts
/// (`kept_across_restarts`) with its own document, as YAML.
fn parse_documents(text: &str, file: &Path) -> Result<Vec<(Parsed, Option<String>)>, Unreadable> {
    parse_stream(text, file).map_err(|reason| {
        let (documents, all_named) = broken_documents_apart(text, file, false);
        Unreadable {
            reason,
            documents,
            all_named,
        }
    })
}

fn parse_stream(text: &str, file: &Path) -> Result<Vec<(Parsed, Option<String>)>, String> {
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| format!("not valid YAML: {e}"))?;
        if value.is_null() {
            continue;
        }
        collect(value, file, &mut out);
    }
    Ok(out)
}

/// A stream the YAML parser gave up on, taken a document at a time (a `---` or `...` line
/// ends a document wherever it stands, even inside a block scalar): every good document
/// stands, and a broken one is rejected as the object its lines name (`named_object`), so
/// the last good version of that object stays in force and the rest of the file is read as
/// usual. A broken document of a kind that is no policy input is only reported. The flag
/// is false when a broken document names no object: then it could have been any object,
/// and the file stands or falls as a whole where it has a last good version. `lossy`: the
/// text was decoded with replacement characters where the file's bytes were not UTF-8,
/// and a document holding one is broken.
fn broken_documents_apart(
    text: &str,
    file: &Path,
    lossy: bool,
) -> (Vec<(Parsed, Option<String>)>, bool) {
    let mut out = Vec::new();
    let mut all_named = true;
    for (first_line, document) in documents_of(text) {
        let parsed = match document
            .lines()
            .position(|l| lossy && l.contains('\u{fffd}'))
        {
            Some(at) => Err(format!(
                "not UTF-8: bytes that are no UTF-8 at line {}",
                first_line + at
            )),
            None => parse_stream(&document, file),
        };
        match parsed {
            Ok(items) => out.extend(items),
            Err(reason) => {
                let reason = if reason.starts_with("not UTF-8") {
                    reason
                } else {
                    lines_of_file(&document, first_line).unwrap_or(reason)
                };
                let (reason, object) = match named_object(&document) {
                    Some((kind, object)) => (
                        format!("{reason} (the {kind} document from line {first_line})"),
                        object,
                    ),
                    None => {
                        all_named = false;
                        (
                            format!(
                                "{reason} (a document from line {first_line} that names no kind and name)"
                            ),
                            None,
                        )
                    }
                };
                out.push((
                    Err(ObjectError {
                        object,
                        file: file.to_path_buf(),
                        reason,
                        kept_last_good: false,
                    }),
                    None,
                ));
            }
        }
    }
    (out, all_named)
}

/// The YAML error of a document that starts at line `first_line` of its file, its line
/// counted in the file.
fn lines_of_file(document: &str, first_line: usize) -> Option<String> {
    let error =
        serde_norway::Deserializer::from_str(document).find_map(|d| Value::deserialize(d).err())?;
    // Every "line N" of the message (the problem's, and the context's after "while").
    let text = error.to_string();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("line ") {
        let (before, after) = rest.split_at(at + "line ".len());
        out.push_str(before);
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match after[..digits].parse::<usize>() {
            Ok(line) => out.push_str(&(line + first_line - 1).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    Some(format!("not valid YAML: {out}"))
}

/// The documents of a YAML stream, each with the number of its first line.
fn documents_of(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        let marker = |m: &str| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if marker("---") {
            out.push((i + 1, String::new()));
        } else if marker("...") {
            out.push((i + 2, String::new()));
            continue;
        }
        let current = &mut out.last_mut().expect("one document at least").1;
        current.push_str(line);
        current.push('\n');
    }
    out
}

/// The kind and object a document's lines name, read without a YAML parser: a top-level
/// `kind:`, and `name:` and `namespace:` under `metadata:` (block or flow style). `None`
/// unless the kind is readable and, for a kind Tollgate reads, the name too (the object
/// is then `Some`); a kind it does not read names no object of its.
fn named_object(document: &str) -> Option<(String, Option<ObjectKey>)> {
    let scalar = |value: &str| {
        let value = value.split(" #").next().unwrap_or("").trim();
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        (!value.is_empty()).then(|| value.to_string())
    };
    let mut kind = None;
    let mut api_version = None;
    let (mut name, mut namespace) = (None, None);
    let mut in_metadata = false;
    let mut metadata_indent = None;
    // Two objects run together (a `---` left out) name neither reliably.
    let mut tops = 0;
    for line in document.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            in_metadata = false;
            if ["kind:", "apiVersion:", "metadata:"]
                .iter()
                .any(|k| line.starts_with(k))
            {
                tops += 1;
            }
            if let Some(value) = line.strip_prefix("kind:") {
                kind = scalar(value);
            } else if let Some(value) = line.strip_prefix("apiVersion:") {
                api_version = scalar(value);
            } else if let Some(value) = line.strip_prefix("metadata:") {
                let value = value.trim();
                if let Some(flow) = value.strip_prefix('{') {
                    // Only the mapping's own fields: nested ones (labels) may have a
                    // `name:` of their own.
                    for field in top_level_fields(flow) {
                        match field.trim().split_once(':') {
                            Some(("name", v)) => name = scalar(v),
                            Some(("namespace", v)) => namespace = scalar(v),
                            _ => {}
                        }
                    }
                } else {
                    in_metadata = value.is_empty();
                    metadata_indent = None;
                }
            }
        } else if in_metadata && *metadata_indent.get_or_insert(indent) == indent {
            match line.trim().split_once(':') {
                Some(("name", v)) => name = scalar(v),
                Some(("namespace", v)) => namespace = scalar(v),
                _ => {}
            }
        }
    }
    let kind = kind.filter(|k| k.chars().all(|c| c.is_ascii_alphanumeric()))?;
    if tops > 3 {
        return None;
    }
    let Some(input) = input_kind_in(api_version.as_deref(), &kind) else {
        return (!kind.ends_with("List")).then_some((kind, None));
    };
    let key = ObjectKey {
        kind: input,
        namespace: if input.cluster_scoped() {
            String::new()
        } else {
            namespace.unwrap_or_else(|| "default".into())
        },
        name: name?,
    };
    Some((kind, Some(key)))
}

/// The fields of a flow mapping (the text after its `{`), split at its own commas: those
/// inside nested mappings, lists or quotes are not its own. Ends at its closing `}`, or
/// with the text when that is missing (the document is broken).
fn top_level_fields(flow: &str) -> Vec<&str> {
    let (mut fields, mut start, mut depth) = (Vec::new(), 0, 0usize);
    let mut quote = None;
    for (i, c) in flow.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') if depth == 0 => {
                fields.push(&flow[start..i]);
                return fields;
            }
            (None, '}' | ']') => depth -= 1,
            (None, ',') if depth == 0 => {
                fields.push(&flow[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    fields.push(&flow[start..]);
    fields
}

/// The kinds Tollgate reads, by their `kind:`.
fn input_kind(kind: &str) -> Option<Kind> {
    Some(match kind {
        "Namespace" => Kind::Namespace,
        "Pod" => Kind::Pod,
        "NetworkPolicy" => Kind::NetworkPolicy,
        "Service" => Kind::Service,
        "EndpointSlice" => Kind::EndpointSlice,
        "Node" => Kind::Node,
        "ModeOverride" => Kind::ModeOverride,
        "EgressAllowlist" => Kind::EgressAllowlist,
        _ => return None,
    })
}

/// The kind a `kind:` that is none of ours was meant as: one of ours but for letter case,
/// spaces around it or a plural.
fn misspelt_kind(kind: &str) -> Option<Kind> {
    if input_kind(kind).is_some() {
        return None;
    }
    let folded = kind.trim().to_ascii_lowercase();
    [
        "Namespace",
        "Pod",
        "NetworkPolicy",
        "Service",
        "EndpointSlice",
        "Node",
        "ModeOverride",
        "EgressAllowlist",
    ]
    .into_iter()
    .find(|ours| {
        let ours = ours.to_ascii_lowercase();
        let plural = match ours.strip_suffix('y') {
            Some(stem) => format!("{stem}ies"),
            None => format!("{ours}s"),
        };
        folded == ours || folded == plural
    })
    .and_then(input_kind)
}

/// The kind Tollgate reads an object as, by its `kind:` and the API group of its
/// `apiVersion:`: another group's kind of the same name (Calico's `projectcalico.org/v3`
/// NetworkPolicy, Knative's `serving.knative.dev` Service) is not one of ours and is passed
/// over like a Deployment. An object without `apiVersion` is taken by its kind.
fn input_kind_in(api_version: Option<&str>, kind: &str) -> Option<Kind> {
    let kind = input_kind(kind)?;
    let Some(api_version) = api_version else {
        return Some(kind);
    };
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    let ours = match kind {
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::Node => "",
        Kind::NetworkPolicy => "networking.k8s.io",
        Kind::EndpointSlice => "discovery.k8s.io",
        Kind::ModeOverride | Kind::EgressAllowlist => "tollgate.io",
    };
    (group == ours).then_some(kind)
}

/// Kinds that decide what is enforced, few and small: their last good versions are kept in
/// `--state-dir`. Pods and Services come and go by the thousand and are not.
pub(super) fn kept_across_restarts(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::NetworkPolicy | Kind::EgressAllowlist | Kind::ModeOverride | Kind::Namespace
    )
}

/// An error as counted: the object (`ObjectKey`'s text), the file, the reason.
pub(super) type ErrorId = (Option<String>, PathBuf, String);

fn error_id(e: &ObjectError) -> ErrorId {
    (
        e.object.as_ref().map(ToString::to_string),
        e.file.clone(),
        e.reason.clone(),
    )
}

/// What a source keeps in `--state-dir` (`FileSource::with_last_good_store`,
/// `KubeSource::with_last_good_store`): the last good documents of the objects of
/// `kept_across_restarts` kinds in force, and the errors reported.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub(super) struct KeptState {
    pub documents: Vec<KeptDocument>,
    pub errors: Vec<ErrorId>,
    /// The last good versions, as the model holds them, of objects of the other kinds
    /// (Pods, Services, EndpointSlices, Nodes) while their latest version is rejected: too
    /// many to keep all, but one broken at a restart must not lose its pod's enforcement
    /// or a Service's backends.
    /// Each a `KeptModel`, read one by one: one a later version cannot read (a field
    /// added to the model) is passed over, never the rest of the file with it.
    pub rejected: Vec<serde_json::Value>,
}

/// The last good version of a rejected object whose document is not kept (`KeptState`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct KeptModel {
    pub file: PathBuf,
    pub key: ObjectKey,
    pub object: ModelObject,
}

/// The kinds a `KeptModel` holds.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) enum ModelObject {
    Pod(crate::compile::model::PodInfo),
    Service(crate::compile::model::ServiceInfo),
    EndpointSlice(crate::compile::model::EndpointSliceInfo),
    Node(crate::compile::model::NodeInfo),
}

impl KeptModel {
    /// An object in force for a rejected key, if its kind is one a `KeptModel` holds.
    pub fn of(file: &Path, key: &ObjectKey, object: Object) -> Option<KeptModel> {
        let object = match object {
            Object::Pod(p) => ModelObject::Pod(p),
            Object::Service(s) => ModelObject::Service(s),
            Object::EndpointSlice(s) => ModelObject::EndpointSlice(s),
            Object::Node(n) => ModelObject::Node(n),
            _ => return None,
        };
        Some(KeptModel {
            file: file.to_path_buf(),
            key: key.clone(),
            object,
        })
    }

    fn object(&self) -> Object {
        match self.object.clone() {
            ModelObject::Pod(p) => Object::Pod(p),
            ModelObject::Service(s) => Object::Service(s),
            ModelObject::EndpointSlice(s) => Object::EndpointSlice(s),
            ModelObject::Node(n) => Object::Node(n),
        }
    }
}

impl KeptState {
    /// What `path` holds: empty when there is nothing (yet), reported and empty when it
    /// cannot be read.
    pub fn read(path: &Path) -> KeptState {
        crate::admin::read_kept(path, "last good objects")
    }

    /// Replaces `path` with this (written aside, then renamed over it); a failure is
    /// reported, not fatal.
    pub fn write(&self, path: &Path) {
        let written = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::admin::write_atomic(path, &bytes));
        if let Err(e) = written {
            tracing::warn!(
                "{}: cannot keep the last good objects ({e}); a restart would not know them",
                path.display()
            );
        }
    }

    /// Each kept document's object, by key.
    pub fn objects(&self) -> Vec<(ObjectKey, KeptDocument, Object)> {
        let mut out = Vec::new();
        for doc in &self.documents {
            for (item, _) in
                parse_documents(&doc.document, &doc.file).unwrap_or_else(|_| Vec::new())
            {
                if let Ok((key, object)) = item {
                    out.push((key, doc.clone(), object));
                }
            }
        }
        out
    }

    /// The kept last good versions of rejected objects of the other kinds, by key, with
    /// the file they came from.
    pub fn rejected_objects(&self) -> Vec<(ObjectKey, PathBuf, Object)> {
        self.rejected
            .iter()
            .filter_map(|v| serde_json::from_value::<KeptModel>(v.clone()).ok())
            .filter(|m| !kept_across_restarts(m.key.kind))
            .map(|m| (m.key.clone(), m.file.clone(), m.object()))
            .collect()
    }
}

/// A last good document as kept in `--state-dir`: where it came from (a file, or
/// `kubernetes`) and its YAML (or JSON).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct KeptDocument {
    pub file: PathBuf,
    pub document: String,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

fn collect(value: Value, file: &Path, out: &mut Vec<(Parsed, Option<String>)>) {
    let kind = str_at(&value, &["kind"]).unwrap_or("").to_string();
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = value.get("items").and_then(Value::as_sequence) {
            for item in items {
                collect(item.clone(), file, out);
            }
        }
        return;
    }
    // Deployments, ConfigMaps, other groups' kinds... are not policy inputs.
    let api_version = str_at(&value, &["apiVersion"]);
    let written = kind;
    // `networkpolicy`, `NetworkPolicies`: meant as ours, refused by the API server (kinds
    // are case-sensitive and singular), so an error of that object, not another kind.
    let (kind, misspelt) = match input_kind_in(api_version, &written) {
        Some(kind) => (kind, false),
        None => match misspelt_kind(&written) {
            Some(meant) => (meant, true),
            None => {
                if input_kind(&written).is_some() {
                    // Calico's NetworkPolicy, or a typo in ours: said, in case it is the
                    // latter.
                    tracing::warn!(
                        file = %file.display(),
                        kind = written,
                        api_version = api_version.unwrap_or(""),
                        name = str_at(&value, &["metadata", "name"]).unwrap_or(""),
                        "passed over: not the API group Tollgate reads this kind from"
                    );
                }
                return;
            }
        },
    };
    let namespace = if kind.cluster_scoped() {
        String::new()
    } else {
        str_at(&value, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_string()
    };
    let name = str_at(&value, &["metadata", "name"]).map(str::to_string);
    let key = name.clone().map(|name| ObjectKey {
        kind,
        namespace: namespace.clone(),
        name,
    });
    let error = |reason: String| ObjectError {
        object: key.clone(),
        file: file.to_path_buf(),
        reason,
        kept_last_good: false,
    };
    if misspelt {
        let reason = format!(
            "kind: {written:?} is no kind; {} is (kinds are case-sensitive and singular)",
            kind.as_str()
        );
        out.push((Err(error(reason)), None));
        return;
    }
    if name.is_none() {
        out.push((Err(error("metadata.name is missing".into())), None));
        return;
    }
    let document = kept_across_restarts(kind)
        .then(|| serde_norway::to_string(&value).ok())
        .flatten();
    let converted = match kind {
        Kind::Namespace => typed::<Namespace>(value),
        Kind::Pod => typed::<Pod>(value),
        Kind::NetworkPolicy => match value.get("spec").and_then(convert::unknown_policy_fields) {
            Some(unknown) => Err(unknown),
            None => typed::<NetworkPolicy>(value),
        },
        Kind::Service => typed::<Service>(value),
        Kind::EndpointSlice => typed::<EndpointSlice>(value),
        Kind::Node => typed::<Node>(value),
        Kind::ModeOverride => typed::<ModeOverride>(value),
        Kind::EgressAllowlist => {
            match value
                .get("spec")
                .and_then(convert::unknown_allowlist_fields)
            {
                Some(unknown) => Err(unknown),
                None => typed::<EgressAllowlist>(value),
            }
        }
    };
    match converted {
        Ok(Some(object)) => out.push((Ok((key.expect("named"), object)), document)),
        // A finished pod (or a slice of no Service) is not an error, just not part of the
        // network.
        Ok(None) => {}
        Err(reason) => out.push((Err(error(reason)), None)),
    }
}

/// A YAML value read as the Kubernetes type `K`, then converted to the model.
fn typed<K: serde::de::DeserializeOwned + ToObject>(
    value: Value,
) -> Result<Option<Object>, String> {
    serde_path_to_error::deserialize::<_, K>(value)
        .map_err(|e| match e.path().to_string() {
            // The field at fault first, as the other errors name theirs.
            path if path != "." => format!("{path}: {}", e.inner()),
            _ => e.inner().to_string(),
        })
        .and_then(|k| k.to_object())
}

/// The objects in force, by key, from the files' objects in path order: an object defined
/// more than once is taken from its last definition, with a warning.
fn in_force<'a>(
    files: &'a BTreeMap<PathBuf, FileObjects>,
    warnings: &mut Vec<String>,
) -> BTreeMap<&'a ObjectKey, &'a Object> {
    let mut objects = BTreeMap::new();
    for (key, object) in files.values().flat_map(|o| o.iter()) {
        if objects.insert(key, object).is_some() {
            warnings.push(format!(
                "{key} is defined more than once; the last definition wins"
            ));
        }
    }
    objects
}

/// The objects one file gave, shared between loads while the file stays as it was.
type FileObjects = Arc<Vec<(ObjectKey, Object)>>;

/// What `stat` says of a file. Equal to what it said before a read that came well after the
/// file's last write (`SETTLED`), the file is the one read then and is not read again: a
/// change shows in its size, its inode or its times (ctime, which no one can set back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileMeta {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long after its last write a file's times are trusted to show the next one: some
/// file systems keep times coarser than a second, and two writes within one tick would
/// leave the same times behind.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

impl FileMeta {
    /// A file's metadata as `stat` gave it, and whether its last write (or metadata change)
    /// was `SETTLED` before now.
    fn of(m: &std::fs::Metadata) -> (FileMeta, bool) {
        use std::os::unix::fs::MetadataExt as _;
        let meta = FileMeta {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        };
        let latest = meta.mtime.max(meta.ctime);
        let settled = latest.0 >= 0
            && SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .is_ok_and(|now| {
                    now.saturating_sub(std::time::Duration::new(latest.0 as u64, latest.1 as u32))
                        >= SETTLED
                });
        (meta, settled)
    }
}

/// A file's entry in the `Fingerprint`, from its `stat` (`None`: it could not be had).
fn fingerprint_entry(
    path: &Path,
    m: Option<&std::fs::Metadata>,
) -> (PathBuf, Option<SystemTime>, u64) {
    let modified = m.and_then(|m| m.modified().ok());
    (path.to_path_buf(), modified, m.map_or(0, |m| m.len()))
}

/// File list and modification times: what changes when the cluster state changes.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// Reads `--cluster-state`, remembering the last good version of every object and file.
pub struct FileSource {
    path: PathBuf,
    last_good_files: BTreeMap<PathBuf, FileObjects>,
    /// Per file: its metadata when last read, if it was settled then (`FileMeta`).
    file_meta: BTreeMap<PathBuf, FileMeta>,
    /// Files the last load read (the others it knew unchanged from their metadata).
    files_read: usize,
    /// The errors the last load reported (object, file, reason): an error counts once, also
    /// across restarts (they are kept in the store).
    previous_errors: BTreeSet<ErrorId>,
    fingerprint: Option<Fingerprint>,
    /// Per file: a hash of its content at the last read, and the errors it gave.
    file_stamps: BTreeMap<PathBuf, FileStamp>,
    /// Per file: the documents of kept kinds it gave good at its last read, so a file read
    /// unchanged gives them again (another file's duplicate may have hidden them meanwhile).
    file_documents: BTreeMap<PathBuf, Vec<(ObjectKey, KeptDocument)>>,
    /// The model of the objects in force, kept from load to load: a load changes only the
    /// objects of the files that changed, so the compiler replays its change log and finds
    /// the rest where it was (a model built afresh for every load is new memory, and every
    /// object in it a cache miss for the compile that follows).
    model: Store,
    /// What the last load reported, for `Source`.
    current: Report,
    /// Where the last good documents of `kept_across_restarts` kinds are kept, if anywhere.
    store: Option<PathBuf>,
    /// Those documents as last written there, by object.
    documents: BTreeMap<ObjectKey, KeptDocument>,
    /// What an earlier process kept there: the last good version of an object that is
    /// rejected now and that this process never saw good.
    restored: BTreeMap<ObjectKey, (KeptDocument, Object)>,
    /// The last good versions of rejected objects of kinds whose documents are not kept, as
    /// last written there.
    rejected: Vec<KeptModel>,
}

type FileStamp = (u64, Vec<ObjectError>);

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource {
            path: path.into(),
            last_good_files: BTreeMap::new(),
            file_meta: BTreeMap::new(),
            files_read: 0,
            previous_errors: BTreeSet::new(),
            fingerprint: None,
            file_stamps: BTreeMap::new(),
            file_documents: BTreeMap::new(),
            model: Store::default(),
            current: Report::default(),
            store: None,
            documents: BTreeMap::new(),
            restored: BTreeMap::new(),
            rejected: Vec::new(),
        }
    }

    /// Keeps the last good versions of NetworkPolicies, EgressAllowlists, ModeOverrides and
    /// Namespaces in `path` (written as they change), and starts from what an earlier
    /// process kept there: an object rejected now that was good then stays in force as it
    /// was, so a restart never drops a policy because its file broke meanwhile. The errors
    /// reported are kept too, so a restart does not count them again. A store that cannot be
    /// read is reported and ignored.
    pub fn with_last_good_store(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let kept = KeptState::read(&path);
        for (key, doc, object) in kept.objects() {
            self.documents.insert(key.clone(), doc.clone());
            self.restored.insert(key, (doc, object));
        }
        for (key, file, object) in kept.rejected_objects() {
            let doc = KeptDocument {
                file,
                document: String::new(),
            };
            self.restored.insert(key, (doc, object));
        }
        self.rejected = kept
            .rejected
            .iter()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect();
        self.previous_errors = kept.errors.into_iter().collect();
        self.store = Some(path);
        self
    }

    /// Writes the last good documents of the objects in force and the errors reported.
    fn keep(&self) {
        let Some(path) = &self.store else { return };
        KeptState {
            documents: self.documents.values().cloned().collect(),
            errors: self.previous_errors.iter().cloned().collect(),
            rejected: self
                .rejected
                .iter()
                .filter_map(|m| serde_json::to_value(m).ok())
                .collect(),
        }
        .write(path);
    }

    /// The path being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn files(&self) -> Result<Vec<PathBuf>, String> {
        let meta =
            std::fs::metadata(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        if meta.is_file() {
            return Ok(vec![self.path.clone()]);
        }
        use std::os::unix::fs::MetadataExt as _;
        let mut files = Vec::new();
        let mut dirs = vec![self.path.clone()];
        // Directories by (device, inode): a symbolic link back up the tree is read once, not
        // until the path is too long.
        let mut seen = BTreeSet::from([(meta.dev(), meta.ino())]);
        while let Some(dir) = dirs.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for entry in entries.flatten() {
                let p = entry.path();
                let hidden = p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if hidden {
                    continue;
                }
                // What a link points to; a broken link is nothing.
                let Ok(meta) = std::fs::metadata(&p) else {
                    continue;
                };
                if meta.is_dir() {
                    if seen.insert((meta.dev(), meta.ino())) {
                        dirs.push(p);
                    }
                } else if meta.is_file()
                    && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        ["yaml", "yml", "json"]
                            .iter()
                            .any(|known| e.eq_ignore_ascii_case(known))
                    })
                {
                    // Regular files only: a FIFO or a device would block the read, or never
                    // end it.
                    files.push(p);
                }
            }
        }
        files.sort();
        Ok(files)
    }

    /// Whether the cluster state holds no YAML file at all (an empty directory).
    pub fn holds_no_files(&self) -> bool {
        self.files().is_ok_and(|files| files.is_empty())
    }

    fn current_fingerprint(&self) -> Fingerprint {
        self.files()
            .unwrap_or_default()
            .iter()
            .map(|p| fingerprint_entry(p, std::fs::metadata(p).ok().as_ref()))
            .collect()
    }

    /// Whether the files may have changed since the last load (cheap: a directory listing
    /// and stats). A file modified in the last two seconds always counts as changed: its
    /// timestamp may be too coarse to show a second write (`load` then compares contents).
    pub fn changed(&self) -> bool {
        let current = self.current_fingerprint();
        let recent = current.iter().any(|(_, modified, _)| {
            modified.is_some_and(|m| {
                m.elapsed()
                    .is_ok_and(|age| age < std::time::Duration::from_secs(2))
            })
        });
        recent || self.fingerprint.as_ref() != Some(&current)
    }

    /// Reads everything. Never fails as a whole: what cannot be read is reported and its
    /// last good state used. The state returned is a copy of the source's own
    /// (`Source::state`, which a long-running reader should use instead).
    pub fn load(&mut self) -> Loaded {
        let report = self.read();
        Loaded {
            state: self.model.state().clone(),
            errors: report.errors,
            new_errors: report.new_errors,
            warnings: report.warnings,
        }
    }

    /// Reads the files that changed since the last read into the model.
    fn read(&mut self) -> Report {
        // The poll's fingerprint, from the same listing and `stat`s the read uses.
        let mut fingerprint = Vec::new();
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut listed = true;
        let files = match self.files() {
            // Files that held objects, all gone at once: a volume not mounted (yet), a
            // directory being replaced. Believing it would detach every workload.
            Ok(files) if files.is_empty() && !self.last_good_files.is_empty() => {
                listed = false;
                errors.push(ObjectError {
                    object: None,
                    file: self.path.clone(),
                    reason: "holds no YAML files any more: an empty cluster state is not believed after one that held objects (a volume not mounted?); the last good state stays in force".into(),
                    kept_last_good: true,
                });
                Vec::new()
            }
            Ok(files) => files,
            Err(reason) => {
                listed = false;
                errors.push(ObjectError {
                    object: None,
                    file: self.path.clone(),
                    reason,
                    kept_last_good: !self.last_good_files.is_empty(),
                });
                // Its files are not read one by one: each would fail the same way.
                Vec::new()
            }
        };
        let mut new_files: BTreeMap<PathBuf, FileObjects> = BTreeMap::new();
        let mut new_stamps = BTreeMap::new();
        let mut new_meta = BTreeMap::new();
        let mut files_read = 0;
        // Documents of the objects read good in this load (kept kinds only), the last
        // definition winning as it does for the objects.
        let mut fresh_documents: BTreeMap<ObjectKey, KeptDocument> = BTreeMap::new();
        let mut new_file_documents = BTreeMap::new();
        // Files parsed in this load (new or changed): only their objects can differ from
        // the model's.
        let mut reread: Vec<PathBuf> = Vec::new();
        // The object errors of files that cannot be read now: not reported while the file
        // hides them, not counted again when it shows them unchanged.
        let mut hidden: BTreeSet<ErrorId> = BTreeSet::new();
        for file in files {
            // A file whose content did not change since the last load keeps what it gave
            // then, errors included: only changed files are parsed and validated again. The
            // content is compared, unless the file's metadata is what it was at a read well
            // after its last write (`FileMeta`): then it is not read at all, and a load
            // after a change to one file reads that file only.
            let stat = std::fs::metadata(&file).ok();
            fingerprint.push(fingerprint_entry(&file, stat.as_ref()));
            let meta = stat.as_ref().map(FileMeta::of);
            let known = meta.is_some_and(|(m, _)| self.file_meta.get(&file) == Some(&m))
                && self.last_good_files.contains_key(&file);
            let (content, stamp) = match self.file_stamps.get(&file) {
                Some((stamp, _)) if known => (None, Some(*stamp)),
                _ => {
                    files_read += 1;
                    let content = std::fs::read(&file).ok();
                    let stamp = content.as_ref().map(|c| {
                        use std::hash::{Hash as _, Hasher as _};
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        c.hash(&mut h);
                        h.finish()
                    });
                    (content, stamp)
                }
            };
            // Read now, the file is trusted unread next time only if it was settled now.
            if let Some((m, settled)) = meta
                && (known || (settled && content.is_some()))
            {
                new_meta.insert(file.clone(), m);
            }
            if let (Some(stamp), Some((old_stamp, old_errors))) =
                (stamp, self.file_stamps.get(&file))
                && stamp == *old_stamp
                && let Some(objects_of_file) = self.last_good_files.get(&file)
            {
                errors.extend(old_errors.iter().cloned());
                // And what it hid then, it hides still.
                hidden.extend(
                    self.previous_errors
                        .iter()
                        .filter(|(object, f, _)| object.is_some() && *f == file)
                        .cloned(),
                );
                if let Some(documents) = self.file_documents.get(&file) {
                    fresh_documents.extend(documents.iter().cloned());
                    new_file_documents.insert(file.clone(), documents.clone());
                }
                new_stamps.insert(file.clone(), (stamp, old_errors.clone()));
                new_files.insert(file.clone(), objects_of_file.clone());
                continue;
            }
            let errors_before = errors.len();
            reread.push(file.clone());
            let unreadable = |reason: String| Unreadable {
                reason,
                documents: Vec::new(),
                all_named: false,
            };
            let parsed = match content {
                Some(bytes) => match String::from_utf8(bytes) {
                    // A byte-order mark is no part of the first document.
                    Ok(text) => parse_documents(text.trim_start_matches('\u{feff}'), &file),
                    // The documents holding bytes that are not UTF-8 are broken, the others
                    // stand.
                    Err(e) => {
                        let text = String::from_utf8_lossy(e.as_bytes());
                        let (documents, all_named) = broken_documents_apart(
                            text.trim_start_matches('\u{feff}'),
                            &file,
                            true,
                        );
                        Err(Unreadable {
                            reason: format!("not UTF-8: {}", e.utf8_error()),
                            documents,
                            all_named,
                        })
                    }
                },
                None => std::fs::read(&file)
                    .map(|_| Vec::new())
                    .map_err(|e| unreadable(e.to_string())),
            };
            // A file with a document that names no object stands as it was, if it was
            // anything: that document could have been any of its objects. With nothing to
            // keep, its other documents are better than none.
            let had_objects = self
                .last_good_files
                .get(&file)
                .is_some_and(|o| !o.is_empty())
                || self.restored.values().any(|(doc, _)| doc.file == file);
            // Its broken documents all named their objects: those keep their last good
            // versions, and so does every object of the file this read does not produce (a
            // broken document might have held it, whatever its lines said).
            let mut keep_previous = false;
            let parsed = match parsed {
                Err(u) if !u.documents.is_empty() && (u.all_named || !had_objects) => {
                    keep_previous = had_objects;
                    Ok(u.documents)
                }
                other => other.map_err(|u| u.reason),
            };
            let file_objects = match parsed {
                Ok(items) => {
                    // A document that could not be read at all hides the objects it held:
                    // their errors stand as they were.
                    if items
                        .iter()
                        .any(|(item, _)| matches!(item, Err(e) if e.object.is_none()))
                    {
                        let named: BTreeSet<String> = items
                            .iter()
                            .filter_map(|(item, _)| match item {
                                Ok((key, _)) => Some(key.to_string()),
                                Err(e) => e.object.as_ref().map(ToString::to_string),
                            })
                            .collect();
                        hidden.extend(
                            self.previous_errors
                                .iter()
                                .filter(|(object, f, _)| {
                                    *f == file
                                        && object.as_ref().is_some_and(|o| !named.contains(o))
                                })
                                .cloned(),
                        );
                    }
                    let mut good = Vec::new();
                    let mut documents = Vec::new();
                    for (item, document) in items {
                        match item {
                            Ok((key, object)) => {
                                if let Some(document) = document {
                                    let file = file.clone();
                                    let kept = KeptDocument { file, document };
                                    fresh_documents.insert(key.clone(), kept.clone());
                                    documents.push((key.clone(), kept));
                                }
                                good.push((key, object));
                            }
                            Err(mut e) => {
                                // The version the previous load used, from whichever file,
                                // else the one an earlier process kept.
                                let last = e.object.as_ref().and_then(|k| {
                                    self.last_good_files
                                        .values()
                                        .flat_map(|o| o.iter())
                                        .find(|(key, _)| key == k)
                                        .map(|(_, o)| o)
                                        .or_else(|| self.restored.get(k).map(|(_, o)| o))
                                });
                                if let Some(last) = last {
                                    e.kept_last_good = true;
                                    good.push((e.object.clone().expect("key"), last.clone()));
                                }
                                errors.push(e);
                            }
                        }
                    }
                    if keep_previous {
                        let produced: BTreeSet<ObjectKey> =
                            good.iter().map(|(key, _)| key.clone()).collect();
                        good.extend(
                            self.last_good_files
                                .get(&file)
                                .into_iter()
                                .flat_map(|o| o.iter())
                                .filter(|(key, _)| !produced.contains(key))
                                .cloned(),
                        );
                    }
                    new_file_documents.insert(file.clone(), documents);
                    good
                }
                Err(reason) => {
                    hidden.extend(
                        self.previous_errors
                            .iter()
                            .filter(|(object, f, _)| object.is_some() && *f == file)
                            .cloned(),
                    );
                    // What the previous load took from the file, else what an earlier
                    // process kept of it.
                    let last = self
                        .last_good_files
                        .get(&file)
                        .map(|o| Vec::clone(o))
                        .or_else(|| {
                            let kept: Vec<(ObjectKey, Object)> = self
                                .restored
                                .iter()
                                .filter(|(_, (doc, _))| doc.file == file)
                                .map(|(key, (_, object))| (key.clone(), object.clone()))
                                .collect();
                            (!kept.is_empty()).then_some(kept)
                        });
                    errors.push(ObjectError {
                        object: None,
                        file: file.clone(),
                        reason,
                        kept_last_good: last.is_some(),
                    });
                    last.unwrap_or_default()
                }
            };
            if let Some(stamp) = stamp {
                new_stamps.insert(file.clone(), (stamp, errors[errors_before..].to_vec()));
            }
            new_files.insert(file, Arc::new(file_objects));
        }
        if !listed {
            // Everything stays as the last load had it, its errors too: hidden while the
            // path cannot be read, not counted again when it can.
            new_files = self.last_good_files.clone();
            new_meta = self.file_meta.clone();
            new_stamps = self.file_stamps.clone();
            new_file_documents = self.file_documents.clone();
            hidden.extend(
                self.previous_errors
                    .iter()
                    .filter(|(object, file, _)| object.is_some() || *file != self.path)
                    .cloned(),
            );
        }
        let objects = in_force(&new_files, &mut warnings);
        // The objects of the files read in this load, as they are and as they were (a
        // removed file's among them): the model changes for those only. An object of an
        // unchanged file is the same object, unless a changed file defined it too.
        let mut touched: BTreeSet<&ObjectKey> = BTreeSet::new();
        let removed = self
            .last_good_files
            .keys()
            .filter(|f| !new_files.contains_key(*f));
        for file in reread.iter().chain(removed) {
            for files in [&self.last_good_files, &new_files] {
                touched.extend(
                    files
                        .get(file)
                        .into_iter()
                        .flat_map(|o| o.iter())
                        .map(|(k, _)| k),
                );
            }
        }
        let changed_objects = touched.len();
        for key in touched {
            match objects.get(key) {
                Some(object) => self.model.insert(key.clone(), Object::clone(object)),
                None => self.model.remove(key),
            };
        }
        // The document of every kept kind's object in force: parsed now, or the one kept
        // for it before (an unchanged file, a last good version).
        let documents = objects
            .keys()
            .filter(|key| kept_across_restarts(key.kind))
            .filter_map(|key| {
                let doc = fresh_documents
                    .remove(*key)
                    .or_else(|| self.documents.get(*key).cloned())?;
                Some((ObjectKey::clone(key), doc))
            })
            .collect();
        drop(objects);
        self.last_good_files = new_files;
        self.file_stamps = new_stamps;
        self.file_meta = new_meta;
        self.fingerprint = Some(fingerprint);
        self.files_read = files_read;
        tracing::debug!(
            files_read,
            files = self.last_good_files.len(),
            changed_objects,
            "cluster state read"
        );
        self.file_documents = new_file_documents;
        // A path that cannot be listed says nothing about which objects exist.
        let mut changed = false;
        if listed && documents != self.documents {
            self.documents = documents;
            changed = true;
        }

        warnings.extend(self.model.warnings());
        let current: BTreeSet<ErrorId> = errors.iter().map(error_id).chain(hidden).collect();
        // A cluster state that cannot be read is no bad object: the source is degraded
        // (`tollgate_source_degraded`), not counted in `tollgate_policy_errors_total`.
        let new_errors = errors
            .iter()
            .filter(|e| e.object.is_some() || e.file != self.path)
            .filter(|e| !self.previous_errors.contains(&error_id(e)))
            .cloned()
            .collect();
        if current != self.previous_errors {
            self.previous_errors = current;
            changed = true;
        }
        // The last good versions in force of rejected objects whose documents are not kept.
        let rejected: Vec<KeptModel> = errors
            .iter()
            .filter(|e| e.kept_last_good)
            .filter_map(|e| {
                let key = e.object.as_ref()?;
                KeptModel::of(&e.file, key, self.model.get(key)?)
            })
            .collect();
        if listed && rejected != self.rejected {
            self.rejected = rejected;
            changed = true;
        }
        // What an earlier process kept of an object no file holds any more is forgotten: the
        // object was deleted, and one made again under its name is another.
        if listed {
            let present: BTreeSet<&ObjectKey> = self
                .last_good_files
                .values()
                .flat_map(|o| o.iter().map(|(k, _)| k))
                .chain(errors.iter().filter_map(|e| e.object.as_ref()))
                .collect();
            self.restored.retain(|k, _| present.contains(k));
        }
        if changed {
            self.keep();
        }
        Report {
            errors,
            new_errors,
            warnings,
        }
    }
}

impl Source for FileSource {
    fn refresh(&mut self, force: bool) -> Refresh {
        if !force && !self.changed() {
            return Refresh::default();
        }
        let report = self.read();
        let new_errors = report.new_errors.clone();
        self.current = report;
        Refresh {
            changed: true,
            new_errors,
        }
    }

    fn state(&self) -> &ClusterState {
        self.model.state()
    }

    fn errors(&self) -> &[ObjectError] {
        &self.current.errors
    }

    fn warnings(&self) -> &[String] {
        &self.current.warnings
    }

    fn degraded(&self) -> Option<String> {
        self.current
            .errors
            .iter()
            .find(|e| e.object.is_none() && e.file == self.path)
            .map(|e| {
                format!(
                    "cluster state {} cannot be read ({}); the last known state stays in force",
                    self.path.display(),
                    e.reason
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../../tests/fixtures/kubectl-dump.yaml");

    /// A NetworkPolicy in namespace x allowing ingress to one port, as a YAML document.
    fn policy_yaml(name: &str, port: u32) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - ports: [{{port: {port}}}]\n"
        )
    }

    /// A broken document is named by its metadata's own `name:` and `namespace:`, in flow
    /// style too, where nested labels or annotations (a Namespace's `tollgate.io/mode`) sit
    /// beside them, and never by a `name:` inside those.
    #[test]
    fn a_broken_documents_flow_style_metadata_names_it_past_nested_fields() {
        let key = |doc: &str| named_object(doc).and_then(|(_, key)| key);
        let ns = |name: &str| ObjectKey {
            kind: Kind::Namespace,
            namespace: String::new(),
            name: name.into(),
        };
        assert_eq!(
            key("apiVersion: v1\nkind: Namespace\nmetadata: {name: third, labels: {team: x}\n"),
            Some(ns("third"))
        );
        assert_eq!(
            key(
                "apiVersion: v1\nkind: Namespace\nmetadata: {annotations: {tollgate.io/mode: drop, name: 'x, y'}, name: \"third\"}\nspec: : [\n"
            ),
            Some(ns("third"))
        );
        assert_eq!(
            key("apiVersion: v1\nkind: Namespace\nmetadata: {labels: {name: other}}\nspec: : [\n"),
            None,
            "a nested name is not the object's"
        );
    }

    /// Another API group's kind of the same name (Calico's NetworkPolicy, Knative's
    /// Service) is not one of ours: passed over, neither read as ours nor an error, even
    /// broken, where it must not be taken for our object of its name.
    #[test]
    fn kinds_of_another_api_group_are_passed_over() {
        let dir = std::env::temp_dir().join(format!("tg-files-groups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mixed.yaml");
        let calico = "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: app == 'web'\n  types: [Ingress]\n";
        let knative = "---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: hello, namespace: x}\nspec:\n  template: {spec: {containers: [{image: hello}]}}\n";
        std::fs::write(&file, policy_yaml("p", 80) + calico + knative).unwrap();
        let mut source = FileSource::new(&dir);
        let first = source.load();
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        assert_eq!(first.state.policies.len(), 1);
        assert!(first.state.services.is_empty());
        let p = ("x".to_string(), "p".to_string());
        let port_of = |state: &ClusterState| format!("{:?}", state.policies[&p]);
        assert!(port_of(&first.state).contains("80"));

        // Ours edited, Calico's broken: ours is read anew, not kept as Calico's last good.
        std::fs::write(
            &file,
            policy_yaml("p", 90) + &calico.replace("types: [Ingress]", "types: : [") + knative,
        )
        .unwrap();
        let second = source.load();
        assert!(
            second.errors.iter().all(|e| e.object.is_none()),
            "{:?}",
            second.errors
        );
        assert!(
            port_of(&second.state).contains("90"),
            "{:?}",
            second.state.policies
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A document the YAML parser gives up on is one bad object: rejected by the kind and
    /// name its lines give, its last good version kept, and the file's other documents read
    /// as usual (they were all dropped or all frozen with it before). Only a broken document
    /// that names no object still takes its file down as a whole.
    #[test]
    fn a_document_that_is_not_yaml_is_one_bad_object_of_its_file() {
        let dir = std::env::temp_dir().join(format!("tg-files-broken-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policies.yaml");
        let broken_p = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  # edited by hand\n  name: p\n  labels: {team: a}\n  namespace: x\nspec: : : [\n";
        std::fs::write(&file, policy_yaml("p", 80) + &policy_yaml("q", 81)).unwrap();
        let mut source = FileSource::new(&dir);
        let first = source.load();
        assert!(first.errors.is_empty(), "{:?}", first.errors);

        std::fs::write(
            &file,
            policy_yaml("q", 82)
                + broken_p
                + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: x}\nspec: : [\n"
                + &policy_yaml("r", 83),
        )
        .unwrap();
        let second = source.load();
        let reasons: Vec<String> = second.errors.iter().map(ToString::to_string).collect();
        assert_eq!(second.errors.len(), 2, "{reasons:?}");
        let p = ObjectKey {
            kind: Kind::NetworkPolicy,
            namespace: "x".into(),
            name: "p".into(),
        };
        assert_eq!(second.errors[0].object.as_ref(), Some(&p), "{reasons:?}");
        assert!(second.errors[0].kept_last_good, "{reasons:?}");
        assert!(
            second.errors[0].reason.contains("not valid YAML")
                && second.errors[0].reason.contains("at line 17 column 7")
                && second.errors[0].reason.contains("document from line 9"),
            "{reasons:?}"
        );
        assert_eq!(second.errors[1].object, None, "the Deployment is no input");
        assert_eq!(
            second.state.policies[&("x".to_string(), "p".to_string())],
            first.state.policies[&("x".to_string(), "p".to_string())],
            "p's last good version stays"
        );
        let port = |name: &str| {
            format!(
                "{:?}",
                second.state.policies[&("x".to_string(), name.to_string())]
            )
        };
        assert!(port("q").contains("82"), "q moved on: {}", port("q"));
        assert!(port("r").contains("83"), "r is read: {}", port("r"));

        // A broken document's lines may name another object than the one it held (p,
        // renamed and broken in one edit): every object of the file the read does not
        // produce keeps its last good version too.
        std::fs::write(
            &file,
            policy_yaml("q", 82) + &broken_p.replace("name: p", "name: p2") + &policy_yaml("r", 83),
        )
        .unwrap();
        let renamed = source.load();
        assert_eq!(renamed.errors.len(), 1, "{:?}", renamed.errors);
        assert_eq!(
            renamed.errors[0].object.as_ref().map(|k| k.name.as_str()),
            Some("p2")
        );
        assert_eq!(
            renamed.state.policies, second.state.policies,
            "p kept, q and r as read"
        );
        // Two objects run together (a `---` left out) name neither: the file stands as it
        // was, as below.
        std::fs::write(
            &file,
            policy_yaml("q", 85) + &policy_yaml("r", 86).replace("---\n", ""),
        )
        .unwrap();
        let joined = source.load();
        assert_eq!(joined.errors.len(), 1, "{:?}", joined.errors);
        assert_eq!(joined.errors[0].object, None);
        assert_eq!(joined.state.policies, second.state.policies);

        // Nothing to name the broken document by: the file stands as it was.
        std::fs::write(&file, policy_yaml("q", 84) + "---\n: : [\n").unwrap();
        let third = source.load();
        assert_eq!(third.errors.len(), 1);
        assert_eq!(third.errors[0].object, None);
        assert_eq!(third.state.policies, second.state.policies);
        // ... unless it has nothing to stand on: a first read takes its other documents.
        let fresh = FileSource::new(&dir).load();
        assert_eq!(fresh.errors.len(), 1);
        assert!(
            fresh.errors[0].reason.contains("names no kind and name"),
            "{:?}",
            fresh.errors
        );
        let q = format!(
            "{:?}",
            fresh.state.policies[&("x".to_string(), "q".to_string())]
        );
        assert!(q.contains("84"), "{q}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn egress_allowlists_are_read_and_bad_ones_refused_with_the_field() {
        let one = |spec: &str| {
            let yaml = format!(
                "apiVersion: tollgate.io/v1alpha1\nkind: EgressAllowlist\nmetadata: {{name: a, namespace: pay}}\nspec: {spec}\n"
            );
            parse_file(&yaml, Path::new("a.yaml")).unwrap().remove(0)
        };
        let (key, object) = one(
            "{podSelector: {matchLabels: {app: card}}, egress: [{domains: [api.stripe.com, '**.stripe.com'], ports: [{port: 443}]}]}",
        )
        .unwrap();
        assert_eq!(
            (key.kind, key.namespace.as_str()),
            (Kind::EgressAllowlist, "pay")
        );
        let Object::EgressAllowlist(a) = object else {
            panic!("{object:?}")
        };
        assert_eq!(a.egress[0].domains.len(), 2);
        for (spec, field) in [
            (
                "{podSelector: {}, egress: [{domains: ['a.*.com']}]}",
                "spec.egress[0].domains[0]",
            ),
            (
                "{podSelector: {}, egress: [{domains: []}]}",
                "spec.egress[0].domains",
            ),
            (
                "{podSelector: {}, egress: [{domains: [a.com], ports: [{port: https}]}]}",
                "named port",
            ),
            (
                "{podSelector: {}, egress: [{domains: [a.com], ports: [{port: 70000}]}]}",
                "spec.egress[0].ports[0]",
            ),
            (
                "{podSelector: {}, egress: [{domains: [a.com]}], extra: 1}",
                "extra",
            ),
            ("{egress: [{domains: [a.com]}]}", "podSelector"),
            // Nested typos: a selector of every pod, a range that is not one.
            (
                "{podSelector: {matchLabel: {app: a}}, egress: [{domains: [a.com]}]}",
                "spec.podSelector.matchLabel: unknown field",
            ),
            (
                "{podSelector: {}, egress: [{domains: [a.com], ports: [{port: 80, endport: 90}]}]}",
                "spec.egress[0].ports[0].endport: unknown field",
            ),
        ] {
            let err = one(spec).unwrap_err();
            assert!(err.reason.contains(field), "{spec}: {}", err.reason);
        }
    }

    #[test]
    fn kubectl_dump_loads_as_it_is() {
        let items = parse_file(SAMPLE, Path::new("dump.yaml")).unwrap();
        let errors: Vec<_> = items.iter().filter_map(|i| i.as_ref().err()).collect();
        assert!(errors.is_empty(), "{errors:?}");
        let objects: Vec<_> = items.into_iter().map(Result::unwrap).collect();
        let count = |k: Kind| objects.iter().filter(|(key, _)| key.kind == k).count();
        assert_eq!(count(Kind::Namespace), 3);
        assert_eq!(count(Kind::Pod), 6);
        assert_eq!(count(Kind::NetworkPolicy), 5);
        let ledger = objects
            .iter()
            .find_map(|(k, o)| match o {
                Object::Pod(p) if k.name == "ledger-7d9c8b5f4-x2x9q" => Some(p),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            ledger.workload, "ledger",
            "ReplicaSet less its pod-template hash"
        );
        assert_eq!(ledger.ips.len(), 2, "dual stack");
        assert_eq!(
            ledger.named_port("http", crate::compile::model::Protocol::Tcp),
            Some(8080)
        );
        let prometheus = objects
            .iter()
            .find(|(k, _)| k.name == "prometheus-0")
            .unwrap();
        match &prometheus.1 {
            Object::Pod(p) => assert_eq!(p.workload, "prometheus"),
            other => panic!("{other:?}"),
        }
        let policy = objects
            .iter()
            .find_map(|(k, o)| match o {
                Object::Policy(p) if k.name == "default-deny" => Some(p),
                _ => None,
            })
            .unwrap();
        assert_eq!(policy.ingress, Some(vec![]));
        assert_eq!(policy.egress, Some(vec![]));
    }

    fn load_one(yaml: &str) -> Result<Object, String> {
        let mut items = parse_file(yaml, Path::new("t.yaml"))?;
        assert_eq!(items.len(), 1, "{items:?}");
        items
            .pop()
            .unwrap()
            .map(|(_, o)| o)
            .map_err(|e| e.to_string())
    }

    fn policy(spec: &str) -> Result<Object, String> {
        load_one(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n{spec}"
        ))
    }

    #[test]
    fn bad_policies_are_rejected_with_name_and_reason() {
        let cases = [
            (
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: 70000}]}]",
                "out of range",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: 80, endPort: 79}]}]",
                "endPort",
            ),
            (
                "  podSelector: {matchExpressions: [{key: a, operator: Maybe, values: [b]}]}",
                "unknown operator",
            ),
            (
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]",
                "strict subset",
            ),
            (
                "  podSelector: {}\n  ingres: []",
                "spec.ingres: unknown field",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: 80, protocol: ICMP}]}]",
                "not TCP, UDP or SCTP",
            ),
            (
                "  podSelector: {}\n  ingress: [{from: [{}]}]",
                "must specify",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: [1]}]}]",
                "t.yaml",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: 80, endPort: '90'}]}]",
                "spec.ingress[0].ports[0].endPort: invalid type: string \"90\"",
            ),
            (
                "  podSelector: {matchLabels: {'-bad key': a}}",
                "spec.podSelector.matchLabels: invalid label key \"-bad key\"",
            ),
            (
                "  podSelector: {matchLabels: {app: 'a b'}}",
                "invalid label value \"a b\"",
            ),
            (
                "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: ['not valid!']}]}}]}]",
                "spec.ingress[0].from[0].podSelector.matchExpressions[0].values[0]: invalid label value",
            ),
            (
                "  podSelector: {matchExpressions: [{key: 'Example.com/app', operator: Exists}]}",
                "the prefix must be a DNS subdomain",
            ),
            (
                "  podSelector: {}\n  policyTypes: [Sideways]",
                "policyTypes[0]",
            ),
            (
                "  podSelector: {}\n  policyTypes: [Ingress, Egress, Ingress]",
                "may not specify more than two policyTypes",
            ),
        ];
        for (spec, expected) in cases {
            let err = policy(spec).expect_err(spec);
            assert!(err.contains("NetworkPolicy x/p"), "{err}");
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }

    /// What the API server accepts and stores differently from what the file says.
    #[test]
    fn objects_are_taken_as_the_api_server_stores_them() {
        // No podSelector: stored as `{}`, every pod of the namespace, isolated for ingress.
        let Ok(Object::Policy(p)) = policy("  policyTypes: [Ingress]") else {
            panic!("a policy without podSelector is accepted")
        };
        assert_eq!(p.pod_selector, crate::compile::model::Selector::default());
        assert!(p.ingress.as_ref().is_some_and(|rules| rules.is_empty()));
        // A repeated type within two is legal.
        assert!(policy("  podSelector: {}\n  policyTypes: [Egress, Egress]").is_ok());
        // The name label is the namespace's name, whatever the object said.
        let Ok(Object::Namespace(ns)) = load_one(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {kubernetes.io/metadata.name: y, team: a}}",
        ) else {
            panic!("namespace loads")
        };
        let labels: Vec<_> = ns.labels.iter().collect();
        assert_eq!(
            labels,
            [
                (&"kubernetes.io/metadata.name".to_string(), &"x".to_string()),
                (&"team".to_string(), &"a".to_string())
            ]
        );
        // `selector: {}` is no selector (endpoints managed by someone else).
        let Ok(Object::Service(svc)) = load_one(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\nspec: {clusterIP: 10.96.0.9, selector: {}, ports: [{port: 80}]}",
        ) else {
            panic!("service loads")
        };
        assert_eq!(svc.selector, None);
        // A pod is unready only when its Ready condition says so.
        let unready = |status: &str| {
            let Ok(Object::Pod(pod)) = load_one(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.1{status}}}"
            )) else {
                panic!("pod loads")
            };
            pod.unready
        };
        assert!(!unready(""));
        assert!(!unready(", conditions: [{type: Ready, status: 'True'}]"));
        assert!(unready(", conditions: [{type: Ready, status: 'False'}]"));
    }

    #[test]
    fn services_endpoint_slices_and_nodes_load_and_bad_ones_are_named() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ledger, namespace: bank}\nspec: {clusterIP: 10.96.0.50, clusterIPs: [10.96.0.50, 'fd77:96::50'], selector: {app: ledger}, ports: [{name: web, port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: headless, namespace: bank}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ledger-x, namespace: bank, labels: {kubernetes.io/service-name: ledger}}\naddressType: IPv4\nendpoints: [{addresses: [10.1.0.10], conditions: {ready: false, serving: true, terminating: true}, targetRef: {kind: Pod, name: ledger-0}}]\nports: [{name: web, port: 8080, protocol: TCP}]\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 10.250.0.1}, {type: Hostname, address: n1}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: bank, annotations: {tollgate.io/mode: block}}\nspec: {containers: [{name: c, image: i}]}\n";
        let items = parse_file(yaml, Path::new("s.yaml")).unwrap();
        let objects: Vec<Object> = items.into_iter().map(|i| i.unwrap().1).collect();
        let Object::Service(svc) = &objects[0] else {
            panic!("{objects:?}")
        };
        assert_eq!(svc.cluster_ips.len(), 2);
        assert_eq!(
            svc.ports[0].target,
            crate::compile::model::TargetPort::Named("http".into())
        );
        assert_eq!(
            svc.ports[1].target,
            crate::compile::model::TargetPort::Number(53),
            "targetPort defaults to the port"
        );
        let Object::Service(headless) = &objects[1] else {
            panic!()
        };
        assert!(headless.cluster_ips.is_empty(), "no virtual address");
        let Object::EndpointSlice(slice) = &objects[2] else {
            panic!()
        };
        assert_eq!(slice.service, "ledger");
        assert!(!slice.endpoints[0].ready && slice.endpoints[0].terminating);
        assert_eq!(
            slice.endpoints[0].pod,
            Some(("bank".to_string(), "ledger-0".to_string())),
            "a targetRef without a namespace names a pod of the slice's"
        );
        let Object::Node(node) = &objects[3] else {
            panic!()
        };
        assert_eq!(
            node.addresses,
            vec!["10.250.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(
            matches!(&objects[4], Object::Pod(_)),
            "an invalid mode annotation is reported, never a reason to reject the pod"
        );

        for (bad, expected) in [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}",
                "Service x/s (t.yaml): spec.clusterIP: \"10.96.0.300\" is not an IP address",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 80, targetPort: 70000}]}",
                "spec.ports[0].targetPort: 70000 is out of range",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: x, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nendpoints: [{addresses: ['fd77::1']}]",
                "endpoints[0].addresses[0]: fd77::1 is not of addressType IPv4",
            ),
        ] {
            let err = load_one(bad).expect_err(bad);
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn policy_types_default_like_the_api_server() {
        let p = |spec: &str| match policy(spec).unwrap() {
            Object::Policy(p) => p,
            other => panic!("{other:?}"),
        };
        let only_ingress = p("  podSelector: {}");
        assert_eq!(
            (
                only_ingress.ingress.is_some(),
                only_ingress.egress.is_some()
            ),
            (true, false)
        );
        let empty_egress = p("  podSelector: {}\n  egress: []");
        assert_eq!(
            empty_egress.egress, None,
            "an empty egress list does not imply Egress"
        );
        let with_egress = p("  podSelector: {}\n  egress: [{}]");
        assert!(with_egress.egress.is_some());
        let egress_only = p("  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]");
        assert_eq!(egress_only.ingress, None, "explicit policyTypes win");
    }

    #[test]
    fn the_last_good_version_of_a_bad_object_stays_in_force() {
        let dir = std::env::temp_dir().join(format!("tollgate-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("state.yaml");
        let good = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
        std::fs::write(&file, good).unwrap();
        let mut source = FileSource::new(&dir);
        let first = source.load();
        assert!(first.errors.is_empty());
        assert_eq!(first.state.policies.len(), 1);
        assert!(
            source.changed(),
            "written a moment ago: its timestamp cannot be trusted yet"
        );
        // An hour old and unchanged since the last load: nothing to do.
        let path = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
        let old = libc::timeval {
            tv_sec: (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                - 3600) as i64,
            tv_usec: 0,
        };
        // SAFETY: valid path and two timevals.
        assert_eq!(
            unsafe { libc::utimes(path.as_ptr(), [old, old].as_ptr()) },
            0
        );
        source.load();
        assert!(!source.changed());

        let broken = good
            .replace("port: 80", "port: 99999")
            .replace("name: x}\n", "name: x, labels: {a: b}}\n");
        std::fs::write(&file, &broken).unwrap();
        let second = source.load();
        assert_eq!(second.errors.len(), 1);
        assert!(second.errors[0].kept_last_good);
        assert_eq!(second.new_errors.len(), 1);
        assert_eq!(
            second.state.policies, first.state.policies,
            "the last good policy stays"
        );
        assert_eq!(
            second.state.namespaces["x"]
                .labels
                .get("a")
                .map(String::as_str),
            Some("b"),
            "the rest moves on"
        );

        let third = source.load();
        assert_eq!(third.new_errors.len(), 0, "the same error is counted once");

        std::fs::write(&file, "{ not: yaml: at all").unwrap();
        let fourth = source.load();
        assert!(
            fourth.errors[0].reason.contains("not valid YAML"),
            "{:?}",
            fourth.errors
        );
        assert_eq!(
            fourth.state.namespaces.len(),
            1,
            "a broken file keeps its last good objects"
        );
        assert_eq!(fourth.state.policies.len(), 1);
        assert_eq!(fourth.new_errors.len(), 1, "the file's own error");
        // The same broken policy again: its error stood all along, hidden by the file's.
        std::fs::write(&file, &broken).unwrap();
        let fifth = source.load();
        assert_eq!(fifth.errors.len(), 1);
        assert!(fifth.new_errors.is_empty(), "{:?}", fifth.new_errors);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An object broken from the start, hidden a while by its file turned unreadable (not
    /// YAML, or a document that is not an object), then shown again unchanged: its error is
    /// counted once.
    #[test]
    fn an_error_hidden_by_its_file_is_counted_once() {
        let dir = std::env::temp_dir().join(format!("tg-files-hidden-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.yaml");
        let broken = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: app}\nspec:\n  podSelector: {matchLabels: {'bad key!': x}}\n";
        std::fs::write(&file, broken).unwrap();
        std::fs::write(
            dir.join("good.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n",
        )
        .unwrap();
        let mut source = FileSource::new(&dir).with_last_good_store(dir.join("kept.json"));
        assert_eq!(source.load().new_errors.len(), 1);
        for unreadable in ["{ not: yaml: at all", "kind: NetworkPolicy\n", ":\n  - ]"] {
            std::fs::write(&file, unreadable).unwrap();
            let hidden = source.load();
            assert_eq!(hidden.errors.len(), 1, "{unreadable}: {:?}", hidden.errors);
            // Read again unchanged (the agent rereads a file written in the last 2 s).
            assert!(source.load().new_errors.is_empty());
            std::fs::write(&file, broken).unwrap();
            let shown = source.load();
            assert_eq!(shown.errors.len(), 1);
            assert!(
                shown.new_errors.is_empty(),
                "{unreadable}: {:?}",
                shown.new_errors
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A cluster state that cannot be read for a while (moved away, unmounted) degrades the
    /// source and keeps everything as it was: no error counted for it, and the bad objects
    /// it held are not counted again when it is back.
    #[test]
    fn a_cluster_state_gone_for_a_while_counts_no_errors() {
        let dir = std::env::temp_dir().join(format!("tg-files-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (state, away) = (dir.join("cs"), dir.join("cs.away"));
        std::fs::create_dir_all(&state).unwrap();
        let policy = policy_yaml;
        std::fs::write(state.join("good.yaml"), policy("good", 80)).unwrap();
        std::fs::write(
            state.join("bad.yaml"),
            policy("bad1", 70000) + &policy("bad2", 0),
        )
        .unwrap();
        let mut source = FileSource::new(&state);
        assert!(source.refresh(true).new_errors.len() == 2);
        for _ in 0..2 {
            std::fs::rename(&state, &away).unwrap();
            let gone = source.refresh(true);
            assert!(gone.new_errors.is_empty(), "{:?}", gone.new_errors);
            assert!(source.degraded().is_some());
            assert_eq!(source.state().policies.len(), 1, "the last known state");
            std::fs::rename(&away, &state).unwrap();
            let back = source.refresh(true);
            assert!(back.new_errors.is_empty(), "{:?}", back.new_errors);
            assert!(source.degraded().is_none());
            assert_eq!(source.errors().len(), 2, "still reported");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The version kept for a restart is the one in force: when another file's duplicate of
    /// an object goes away, the definition left (from a file read unchanged) is kept, never
    /// the deleted duplicate.
    #[test]
    fn the_kept_version_follows_a_duplicate_removed() {
        let dir = std::env::temp_dir().join(format!("tg-files-dup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let store = dir.join("kept.json");
        let policy = |port| policy_yaml("p", port);
        let key = ("x".to_string(), "p".to_string());
        let (main, extra) = (state.join("00-main.yaml"), state.join("20-extra.yaml"));
        std::fs::write(&main, policy(8080)).unwrap();
        let mut source = FileSource::new(&state).with_last_good_store(&store);
        let strict = source.load().state.policies[&key].clone();
        std::fs::write(&extra, policy(9090)).unwrap();
        let both = source.load();
        assert_ne!(
            both.state.policies[&key], strict,
            "the last definition wins"
        );
        std::fs::remove_file(&extra).unwrap();
        assert_eq!(source.load().state.policies[&key], strict);

        // Broken now, and the agent restarted: the strict version stays in force.
        std::fs::write(&main, policy(99999)).unwrap();
        let restarted = FileSource::new(&state).with_last_good_store(&store).load();
        assert!(restarted.errors.iter().all(|e| e.kept_last_good));
        assert_eq!(restarted.state.policies[&key], strict);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A load changes the source's model only where files changed, and in place: the
    /// compiler replays the change log instead of comparing 20,000 pods, and finds the rest
    /// of the model where it was. What it ends with is what a fresh load reads.
    #[test]
    fn a_load_changes_the_model_only_where_files_changed() {
        let dir = std::env::temp_dir().join(format!("tg-files-model-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pod = |name: &str, app: &str, ip: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {app}}}}}\nspec: {{nodeName: n1, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
            )
        };
        let policy = |port| policy_yaml("p", port);
        let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
        let write = |file: &str, text: &str| std::fs::write(dir.join(file), text).unwrap();
        write(
            "10-pods.yaml",
            &format!(
                "{namespace}{}{}",
                pod("a", "a", "10.0.0.1"),
                pod("b", "b", "10.0.0.2")
            ),
        );
        write("20-policy.yaml", &policy(80));
        // A later file redefines pod b: the last definition wins.
        write("30-override.yaml", &pod("b", "b2", "10.0.0.2"));
        let mut source = FileSource::new(&dir);
        source.refresh(true);
        assert!(source.errors().is_empty(), "{:?}", source.errors());
        let pair = |name: &str| ("x".to_string(), name.to_string());
        assert_eq!(
            source.state().pods[&pair("b")].labels.get("app"),
            Some(&"b2".to_string())
        );
        let before = source.state().changes.position();

        // The policy changed, the override is gone (b is as 10-pods.yaml says again) and a
        // pod came in a new file; 10-pods.yaml is untouched.
        write("20-policy.yaml", &policy(81));
        std::fs::remove_file(dir.join("30-override.yaml")).unwrap();
        write("40-new.yaml", &pod("c", "c", "10.0.0.3"));
        source.refresh(true);
        let state = source.state();
        let changed = state
            .changes
            .since(before)
            .expect("the same log, replayable");
        assert_eq!(changed.pods, [pair("b"), pair("c")].into_iter().collect());
        assert!(changed.namespaces.is_empty(), "{changed:?}");

        let fresh = FileSource::new(&dir).load().state;
        assert_eq!(state.pods, fresh.pods);
        assert_eq!(state.namespaces, fresh.namespaces);
        assert_eq!(state.policies, fresh.policies);
        assert_eq!(
            state.pods[&pair("b")].labels.get("app"),
            Some(&"b".to_string())
        );

        // A load with nothing changed changes nothing.
        let now = source.state().changes.position();
        source.refresh(true);
        assert_eq!(source.state().changes.position(), now);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file whose metadata is what it was at a read well after its last write is not read
    /// again; one written since, or written just before its last read, is.
    /// What a directory may hold besides YAML files: links back up the tree, FIFOs, links
    /// to devices, upper-case extensions; what a file may hold besides UTF-8 YAML.
    #[test]
    fn odd_files_neither_hang_nor_hide_the_rest() {
        let dir = std::env::temp_dir().join(format!("tg-files-odd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a.yaml"), policy_yaml("a", 80)).unwrap();
        std::os::unix::fs::symlink("..", dir.join("sub/up")).unwrap();
        std::os::unix::fs::symlink(".", dir.join("sub/here")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero.yaml")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("fifo.yaml").to_str().unwrap()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Upper case is YAML too; a byte-order mark is no part of the first document.
        std::fs::write(
            dir.join("B.YAML"),
            format!(
                "\u{feff}{}",
                policy_yaml("b", 81).trim_start_matches("---\n")
            ),
        )
        .unwrap();
        // Bytes that are not UTF-8 break their document only.
        let mut bad = policy_yaml("c", 82).into_bytes();
        bad.extend_from_slice(
            b"---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {a: \"\xff\"}}\n",
        );
        std::fs::write(dir.join("c.yaml"), bad).unwrap();
        // Kinds that are ours but for case or number are errors, not other kinds.
        std::fs::write(
            dir.join("d.yaml"),
            policy_yaml("d", 83).replace("kind: NetworkPolicy", "kind: networkpolicies"),
        )
        .unwrap();

        let loaded = FileSource::new(&dir).load();
        let mut names: Vec<_> = loaded
            .state
            .policies
            .keys()
            .map(|(_, n)| n.clone())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"], "{:?}", loaded.errors);
        assert!(
            !loaded.warnings.iter().any(|w| w.contains("more than once")),
            "the link loop read a.yaml again: {:?}",
            loaded.warnings
        );
        let reasons: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("Namespace x") && r.contains("not UTF-8")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("NetworkPolicy x/d") && r.contains("NetworkPolicy is")),
            "{reasons:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_files_that_may_have_changed_are_read() {
        let dir = std::env::temp_dir().join(format!("tg-files-meta-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let policy = policy_yaml;
        let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
        std::fs::write(&a, policy("a", 80)).unwrap();
        std::fs::write(&b, policy("b", 80)).unwrap();
        std::thread::sleep(SETTLED + std::time::Duration::from_millis(100));
        let mut source = FileSource::new(&dir);
        source.refresh(true);
        assert_eq!(source.files_read, 2);
        source.refresh(true);
        assert_eq!(source.files_read, 0, "both settled and unchanged");

        // Same size, new content: read, and read again at the next load, since it was
        // written just before this one.
        std::fs::write(&b, policy("b", 81)).unwrap();
        for _ in 0..2 {
            source.refresh(true);
            assert_eq!(source.files_read, 1);
            let port = &source.state().policies[&("x".to_string(), "b".to_string())]
                .ingress
                .as_ref()
                .unwrap()[0]
                .ports[0];
            assert_eq!(port.port, crate::compile::model::PortRef::Range(81, 81));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A process started while a policy (or a whole file) is broken enforces the last good
    /// version an earlier process kept; an object deleted meanwhile is not brought back.
    #[test]
    fn last_good_versions_outlive_the_process() {
        let dir = std::env::temp_dir().join(format!("tg-files-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let store = dir.join("kept.json");
        let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
        let policy = policy_yaml;
        let (main, other) = (state.join("main.yaml"), state.join("other.yaml"));
        std::fs::write(&main, format!("{namespace}{}", policy("p", 80))).unwrap();
        std::fs::write(&other, format!("{}{}", policy("q", 81), policy("gone", 82))).unwrap();
        let first = FileSource::new(&state).with_last_good_store(&store).load();
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        assert_eq!(first.state.policies.len(), 3);
        assert!(store.exists(), "kept as soon as loaded");

        // Meanwhile, with no agent running: p broken, other.yaml not YAML at all, and "gone"
        // deleted from a file of its own.
        std::fs::write(&main, format!("{namespace}{}", policy("p", 99999))).unwrap();
        std::fs::write(&other, "{ not: yaml: at all").unwrap();
        std::fs::write(state.join("third.yaml"), policy("new", 83)).unwrap();
        let mut restarted = FileSource::new(&state).with_last_good_store(&store);
        let second = restarted.load();
        let rejected = second
            .errors
            .iter()
            .find(|e| e.object.as_ref().is_some_and(|k| k.name == "p"))
            .expect("p rejected");
        assert!(rejected.kept_last_good, "{rejected:?}");
        assert!(
            rejected
                .to_string()
                .contains("the last good version stays in force")
        );
        let names = |loaded: &Loaded| -> Vec<String> {
            let mut names: Vec<String> = loaded
                .state
                .policies
                .keys()
                .map(|(_, name)| name.clone())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            names(&second),
            ["gone", "new", "p", "q"],
            "p as it was, the broken file's q and gone as they were, new as written"
        );
        let p = ("x".to_string(), "p".to_string());
        assert_eq!(
            second.state.policies[&p], first.state.policies[&p],
            "port 80, the last good version"
        );

        // other.yaml repaired without "gone": it is gone for good, also after a restart.
        std::fs::write(&other, policy("q", 81)).unwrap();
        assert_eq!(restarted.load().state.policies.len(), 3);
        let third = FileSource::new(&state).with_last_good_store(&store).load();
        assert_eq!(third.errors.len(), 1, "p is still broken");
        assert!(
            third.new_errors.is_empty(),
            "an error reported before the restart is not counted again"
        );
        assert_eq!(names(&third), ["new", "p", "q"]);

        // A store that is not ours is reported and ignored, never fatal.
        std::fs::write(&store, "not json").unwrap();
        let fourth = FileSource::new(&state).with_last_good_store(&store).load();
        assert_eq!(
            fourth.state.policies.len(),
            2,
            "p has no last good version left to keep"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
