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

/// The object name for a new override of a target: readable, a valid Kubernetes name, and
/// the target's own (a hash of it ends the name: `bank/*` and `bank/all`, or `team-a/api`
/// and `team/a-api`, read alike).
pub fn object_name(target: &str) -> String {
    let readable: String = target
        .chars()
        .map(|c| match c {
            '*' => "all".to_string(),
            '/' => "-".to_string(),
            c => c.to_ascii_lowercase().to_string(),
        })
        .collect();
    // FNV-1a: the same name for the same target, whatever the build.
    let hash = target.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let readable: String = readable.chars().take(200).collect();
    let readable = readable.trim_matches(|c| c == '-' || c == '.');
    format!("tollgate-{readable}-{hash:08x}")
}

/// Every ModeOverride whose `spec.target` is `target`, by name. More than one can exist (one
/// written by hand or by GitOps beside the CLI's): a change must reach them all, or the one
/// left decides.
async fn find(
    api: &kube::Api<ModeOverride>,
    target: &str,
) -> Result<Vec<ModeOverride>, kube::Error> {
    let list = api.list(&kube::api::ListParams::default()).await?;
    let mut found: Vec<ModeOverride> = list
        .items
        .into_iter()
        .filter(|o| o.spec.target == target)
        .collect();
    found.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(found)
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
    let mut existing = find(&api, target)
        .await
        .context("list ModeOverrides (is the CRD installed? kubectl apply -k deploy/)")?;
    let spec = ModeOverrideSpec {
        target: target.into(),
        mode: mode.as_str().into(),
        reason: reason.clone(),
    };
    let annotations = serde_json::json!({ "tollgate.io/set-by": who });
    // The target's own override, named after it.
    let name = object_name(target);
    let create = || {
        let mut object = ModeOverride::new(&name, spec.clone());
        object.metadata.annotations = serde_json::from_value(annotations.clone()).ok();
        let api = api.clone();
        async move { api.create(&PostParams::default(), &object).await }
    };
    let mut created = None;
    if existing.is_empty() {
        match create().await {
            Ok(object) => created = Some(object),
            // Another `mode set` of the same target created it meanwhile: update that one.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                existing = find(&api, target).await.context("list ModeOverrides")?;
                if existing.is_empty() {
                    anyhow::bail!(
                        "create ModeOverride {name}: the name is taken by a ModeOverride of another target; rename or delete it"
                    );
                }
            }
            Err(e) => return Err(e).with_context(|| format!("create ModeOverride {name}")),
        }
    }
    let (written, objects) = if let Some(object) = created {
        (Written { name, old: None }, vec![object])
    } else {
        // A merge patch leaves out what it does not name: the reason is always named (null
        // when none is given), so an earlier change's reason is never credited to this one.
        let patch = serde_json::json!({
            "metadata": {"annotations": annotations},
            "spec": {"target": spec.target, "mode": spec.mode, "reason": spec.reason},
        });
        let mut updated = Vec::new();
        for o in &existing {
            let name = o.metadata.name.clone().unwrap_or_default();
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(object) => updated.push(object),
                // Deleted since it was listed (a `mode clear` meanwhile): not this set's.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("update ModeOverride {name}")),
            }
        }
        if updated.is_empty() {
            // Every one was deleted meanwhile: the target gets an override of its own.
            let created = create()
                .await
                .with_context(|| format!("create ModeOverride {name}"))?;
            (Written { name, old: None }, vec![created])
        } else {
            (written_of(&existing), updated)
        }
    };
    let message = format!(
        "{who} set {target} to {}{}",
        mode.as_str(),
        reason.map(|r| format!(": {r}")).unwrap_or_default()
    );
    for object in &objects {
        record(client, object, "ModeOverrideSet", &message).await;
    }
    Ok(written)
}

/// What a change of these overrides (several when several name the target) replaced: their
/// names, and the mode of the one in force (the agent takes the last by name of equals).
fn written_of(existing: &[ModeOverride]) -> Written {
    let names: Vec<String> = existing
        .iter()
        .map(|o| o.metadata.name.clone().unwrap_or_default())
        .collect();
    Written {
        name: names.join(", "),
        old: existing.last().and_then(|o| o.spec.mode.parse().ok()),
    }
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
    let existing = find(&api, target)
        .await
        .context("list ModeOverrides (is the CRD installed? kubectl apply -k deploy/)")?;
    if existing.is_empty() {
        return Ok(None);
    }
    for o in &existing {
        let name = o.metadata.name.clone().unwrap_or_default();
        api.delete(&name, &kube::api::DeleteParams::default())
            .await
            .with_context(|| format!("delete ModeOverride {name}"))?;
        let message = format!(
            "{who} cleared the override of {target} (was {})",
            o.spec.mode
        );
        record(client, o, "ModeOverrideCleared", &message).await;
    }
    Ok(Some(written_of(&existing)))
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

#[cfg(test)]
mod tests {
    use super::object_name;
    use crate::compile::model::valid_name;

    /// Targets that read alike get names of their own (one was refused as taken, 409), and
    /// every name is a valid Kubernetes name, long targets too.
    #[test]
    fn every_target_gets_a_valid_name_of_its_own() {
        let long = format!("ns/{}", "a".repeat(253));
        let dotted = format!("ns/{}.b", "a".repeat(196));
        let targets = [
            "bank/*",
            "bank/all",
            "team-a/api",
            "team/a-api",
            "*",
            long.as_str(),
            dotted.as_str(),
        ];
        let names: Vec<String> = targets.iter().map(|t| object_name(t)).collect();
        for (target, name) in targets.iter().zip(&names) {
            assert!(valid_name(name) && name.len() <= 253, "{target}: {name}");
            assert!(
                !name.ends_with(['-', '.']) && !name.contains(".-") && !name.contains("-."),
                "{target}: {name}"
            );
        }
        let distinct: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        assert_eq!(object_name("bank/ledger"), object_name("bank/ledger"));
        assert!(object_name("bank/ledger").starts_with("tollgate-bank-ledger-"));
    }
}
