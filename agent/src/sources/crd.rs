//! Tollgate's own Kubernetes objects (the CRDs in `deploy/crds/`), as typed kube-rs
//! resources: what the Kubernetes source watches and `tollgate mode --kubernetes` writes.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `apiVersion: tollgate.io/v1alpha1`, `kind: ModeOverride` (cluster-scoped): the security
/// team's mode for a target, on every node. Above every annotation; only a node-local
/// override (break glass) wins over it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tollgate.io",
    version = "v1alpha1",
    kind = "ModeOverride",
    plural = "modeoverrides",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.target"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
)]
#[serde(deny_unknown_fields)]
pub struct ModeOverrideSpec {
    /// `NAMESPACE/NAME` (a workload or a pod), `NAMESPACE/*` or `*`.
    pub target: String,
    /// `log` or `drop`.
    pub mode: String,
    /// Why, for the audit log and the Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `apiVersion: tollgate.io/v1alpha1`, `kind: EgressAllowlist` (namespaced): domains the
/// selected pods may reach outside the cluster (`deploy/crds/egressallowlists.yaml` is the
/// schema the API server checks; this side validates again when converting).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "tollgate.io",
    version = "v1alpha1",
    kind = "EgressAllowlist",
    plural = "egressallowlists",
    namespaced,
    schema = "disabled"
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressAllowlistSpec {
    pub pod_selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pub egress: Vec<EgressAllowlistRule>,
}

/// One `spec.egress[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressAllowlistRule {
    pub domains: Vec<String>,
    #[serde(default)]
    pub ports: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPort>,
}

/// What `set_override` or `clear_override` did.
#[derive(Clone, Debug)]
pub struct Written {
    /// The ModeOverride's object name.
    pub name: String,
    /// Its mode before.
    pub old: Option<crate::compile::model::Mode>,
}

/// The object name for a new override of a target: readable, a valid Kubernetes name.
pub fn object_name(target: &str) -> String {
    let mut name: String = target
        .chars()
        .map(|c| match c {
            '*' => "all".to_string(),
            '/' => "-".to_string(),
            c => c.to_string(),
        })
        .collect();
    name.truncate(200);
    format!("tollgate-{}", name.trim_matches('-'))
}

/// Finds the ModeOverride whose `spec.target` is `target`.
async fn find(
    api: &kube::Api<ModeOverride>,
    target: &str,
) -> Result<Option<ModeOverride>, kube::Error> {
    let list = api.list(&kube::api::ListParams::default()).await?;
    Ok(list.items.into_iter().find(|o| o.spec.target == target))
}

/// Writes the cluster's override of a target: updates the ModeOverride whose `spec.target`
/// matches, or creates one. Records a Normal Event `ModeOverrideSet` on it.
pub async fn set_override(
    client: &kube::Client,
    target: &str,
    mode: crate::compile::model::Mode,
    reason: Option<String>,
    who: &str,
) -> anyhow::Result<Written> {
    use anyhow::Context as _;
    use kube::api::{Patch, PatchParams, PostParams};
    let api: kube::Api<ModeOverride> = kube::Api::all(client.clone());
    let existing = find(&api, target)
        .await
        .context("list ModeOverrides (is the CRD installed? kubectl apply -k deploy/)")?;
    let spec = ModeOverrideSpec {
        target: target.into(),
        mode: mode.as_str().into(),
        reason: reason.clone(),
    };
    let annotations = serde_json::json!({ "tollgate.io/set-by": who });
    let (written, object) = match existing {
        Some(o) => {
            let name = o.metadata.name.clone().unwrap_or_default();
            let patch = serde_json::json!({
                "metadata": {"annotations": annotations},
                "spec": spec,
            });
            let updated = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("update ModeOverride {name}"))?;
            let old = o.spec.mode.parse().ok();
            (Written { name, old }, updated)
        }
        None => {
            let name = object_name(target);
            let mut object = ModeOverride::new(&name, spec);
            object.metadata.annotations = serde_json::from_value(annotations).ok();
            let created = api
                .create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("create ModeOverride {name}"))?;
            (Written { name, old: None }, created)
        }
    };
    let message = format!(
        "{who} set {target} to {}{}",
        mode.as_str(),
        reason.map(|r| format!(": {r}")).unwrap_or_default()
    );
    record(client, &object, "ModeOverrideSet", &message).await;
    Ok(written)
}

/// Deletes the cluster's override of a target, if there is one. Records a Normal Event
/// `ModeOverrideCleared`.
pub async fn clear_override(
    client: &kube::Client,
    target: &str,
    who: &str,
) -> anyhow::Result<Option<Written>> {
    use anyhow::Context as _;
    let api: kube::Api<ModeOverride> = kube::Api::all(client.clone());
    let Some(existing) = find(&api, target)
        .await
        .context("list ModeOverrides (is the CRD installed? kubectl apply -k deploy/)")?
    else {
        return Ok(None);
    };
    let name = existing.metadata.name.clone().unwrap_or_default();
    api.delete(&name, &kube::api::DeleteParams::default())
        .await
        .with_context(|| format!("delete ModeOverride {name}"))?;
    let message = format!(
        "{who} cleared the override of {target} (was {})",
        existing.spec.mode
    );
    record(client, &existing, "ModeOverrideCleared", &message).await;
    Ok(Some(Written {
        name,
        old: existing.spec.mode.parse().ok(),
    }))
}

/// A Normal Event on a ModeOverride (in namespace `default`, where Events of cluster-scoped
/// objects go). Failing to write it does not fail the change.
async fn record(client: &kube::Client, object: &ModeOverride, reason: &str, message: &str) {
    use k8s_openapi::api::core::v1::Event;
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let name = object.metadata.name.clone().unwrap_or_default();
    let event: Result<Event, _> = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": format!("{name}."), "namespace": "default"},
        "involvedObject": {
            "apiVersion": "tollgate.io/v1alpha1",
            "kind": "ModeOverride",
            "name": name,
            "uid": object.metadata.uid,
        },
        "type": "Normal",
        "reason": reason,
        "message": message,
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": "tollgate-cli"},
        "reportingComponent": "tollgate.io/cli",
        "reportingInstance": "tollgate-cli",
        "action": reason,
    }));
    let api: kube::Api<Event> = kube::Api::namespaced(client.clone(), "default");
    if let Ok(event) = event
        && let Err(e) = api.create(&kube::api::PostParams::default(), &event).await
    {
        tracing::warn!(error = %e, "could not record the Event");
    }
}
