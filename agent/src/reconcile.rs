//! Reconcile: desired cluster state in, datapath changed to match, without transient drops.
//!
//! One reconcile compiles the cluster for this node's pods and applies the difference in
//! phases, so a flow allowed before and after never meets a deny in between:
//! 1. make: every workload's new policy entries are written next to the old ones;
//! 2. new and changed pod addresses get their identities;
//! 3. workload configurations (isolation, mode) are written, new workloads attached;
//! 4. break: stale policy entries and identities of addresses that are gone are removed;
//! 5. workloads whose rules or peers changed get a new epoch: tracked flows are decided
//!    again, against the final state, on their next packet.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use ipnet::IpNet;
use tracing::{info, info_span, warn};

use crate::{
    Datapath, DatapathError,
    admin::Overrides,
    attach::{self, AttachMethod, AttachPoint, routes},
    compile::{
        model::{ClusterState, PodInfo},
        policy::{
            CompileCache, Compiled, IdentityAllocator, PodKey, compile_cached, mode_and_source,
        },
    },
    maps::{MapsError, Mode, WorkloadPolicy},
    sources::convert::{CGROUP_ANNOTATION, INTERFACE_ANNOTATION},
};

/// A workload attached on this node.
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    pub slot: u32,
    pub point: AttachPoint,
    pub method: AttachMethod,
    pub pod: PodInfo,
    pub policy: WorkloadPolicy,
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    /// Where the mode comes from: `override`, `pod`, `namespace` or `default`.
    pub mode_source: &'static str,
}

/// What one reconcile did.
#[derive(Clone, Debug, Default)]
pub struct ReconcileReport {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub updated: Vec<String>,
    pub identities_changed: usize,
    /// Policy, ipBlock and identity entries this reconcile wrote and removed.
    pub entries_written: u64,
    pub entries_removed: u64,
    /// Workloads that could not be attached or programmed, with the reason. The rest of the
    /// node was reconciled; these keep their previous state and are retried next time.
    pub errors: Vec<String>,
}

/// Options of the reconciler.
#[derive(Clone, Debug)]
pub struct ReconcilerOptions {
    /// Mode of workloads without a mode annotation on the pod or its namespace.
    pub default_mode: Mode,
    /// Only pods scheduled on this node are local (Kubernetes source); `None`: any pod whose
    /// address routes to a local interface.
    pub node_name: Option<String>,
    /// Root of the cgroup v2 hierarchy, for relative `tollgate.io/cgroup` annotations.
    pub cgroup_root: PathBuf,
}

impl Default for ReconcilerOptions {
    fn default() -> Self {
        let unified = std::path::Path::new("/sys/fs/cgroup/unified");
        ReconcilerOptions {
            default_mode: Mode::Log,
            node_name: None,
            cgroup_root: if unified.join("cgroup.procs").exists() {
                unified.into()
            } else {
                "/sys/fs/cgroup".into()
            },
        }
    }
}

/// Keeps the datapath in line with the cluster state.
pub struct Reconciler {
    pub datapath: Datapath,
    pub options: ReconcilerOptions,
    allocator: IdentityAllocator,
    cache: CompileCache,
    workloads: BTreeMap<PodKey, LocalWorkload>,
    addresses: std::sync::Arc<BTreeMap<IpNet, u32>>,
    compiled: Compiled,
    /// Runtime mode overrides (set through the admin socket), above annotations.
    pub overrides: Overrides,
}

impl Reconciler {
    pub fn new(datapath: Datapath, options: ReconcilerOptions) -> Self {
        Reconciler {
            datapath,
            options,
            allocator: IdentityAllocator::default(),
            cache: CompileCache::default(),
            workloads: BTreeMap::new(),
            addresses: Default::default(),
            compiled: Compiled::default(),
            overrides: Overrides::default(),
        }
    }

    /// Workloads attached on this node.
    pub fn workloads(&self) -> &BTreeMap<PodKey, LocalWorkload> {
        &self.workloads
    }

    /// The last compiled cluster.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// Where a pod attaches on this node, if it is local.
    fn attach_point(&self, pod: &PodInfo, routes: &routes::RouteTables) -> Option<AttachPoint> {
        if let (Some(node), Some(pod_node)) = (&self.options.node_name, &pod.node_name)
            && node != pod_node
        {
            return None;
        }
        if let Some(iface) = pod.annotations.get(INTERFACE_ANNOTATION) {
            return Some(AttachPoint::Tc {
                iface: iface.clone(),
            });
        }
        if let Some(path) = pod.annotations.get(CGROUP_ANNOTATION) {
            let path = PathBuf::from(path);
            let path = if path.is_absolute() {
                path
            } else {
                self.options.cgroup_root.join(path)
            };
            return Some(AttachPoint::Cgroup { path });
        }
        pod.ips
            .iter()
            .find_map(|ip| routes.local_interface(*ip))
            .map(|iface| AttachPoint::Tc { iface })
    }

    /// Brings the datapath in line with `state`.
    pub fn reconcile(&mut self, state: &ClusterState) -> Result<ReconcileReport, DatapathError> {
        let span = info_span!(
            "reconcile",
            pods = state.pods.len(),
            policies = state.policies.len()
        );
        let _enter = span.enter();
        let mut report = ReconcileReport::default();
        let stats_before = self.datapath.maps.stats;

        let mut local: BTreeMap<PodKey, AttachPoint> = BTreeMap::new();
        let routes = routes::RouteTables::read();
        for (key, pod) in &state.pods {
            if let Some(point) = self.attach_point(pod, &routes) {
                local.insert(key.clone(), point);
            }
        }
        let targets: BTreeSet<PodKey> = local.keys().cloned().collect();
        let mut compiled = compile_cached(
            state,
            &mut self.allocator,
            Some(&targets),
            self.options.default_mode,
            &mut self.cache,
        );
        let mut mode_sources = BTreeMap::new();
        for (key, p) in compiled.pods.iter_mut() {
            let source = match self.overrides.mode_for(key) {
                Some(mode) => {
                    p.mode = mode;
                    "override"
                }
                None => mode_and_source(state, &state.pods[key], self.options.default_mode).1,
            };
            mode_sources.insert(key.clone(), source);
        }

        // Workloads that are gone or moved: detach first, so nothing routes to a slot that
        // is being cleared.
        let gone: Vec<PodKey> = self
            .workloads
            .iter()
            .filter(|(k, w)| local.get(*k) != Some(&w.point))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            let w = self.workloads.remove(&key).expect("listed");
            self.datapath.detach(w.slot)?;
            self.datapath.maps.clear_workload(w.slot)?;
            info!(namespace = %key.0, pod = %key.1, slot = w.slot, "detached");
            report.detached.push(format!("{}/{}", key.0, key.1));
        }

        // 1. make
        let mut used: BTreeSet<u32> = self.workloads.values().map(|w| w.slot).collect();
        // Slots attached by an earlier agent (adopted at load) stay reserved until claimed.
        used.extend(self.datapath.attached().iter().map(|a| a.slot));
        let mut free = (1..agent_common::MAX_WORKLOADS).filter(|s| !used.contains(s));
        let mut staged = Vec::new();
        let mut adopted: BTreeMap<PodKey, AttachMethod> = BTreeMap::new();
        let mut unchanged: Vec<PodKey> = Vec::new();
        for (key, point) in &local {
            let pod_policy = &compiled.pods[key];
            let policy = pod_policy.workload_policy();
            let slot = match self.workloads.get(key) {
                Some(w) => w.slot,
                None => {
                    let claimed = attach::point_key(point)
                        .ok()
                        .and_then(|route| self.datapath.claim(route, point));
                    match claimed {
                        Some((slot, method)) => {
                            info!(namespace = %key.0, pod = %key.1, slot, "adopted the running attachment");
                            adopted.insert(key.clone(), method);
                            slot
                        }
                        None => match free.next() {
                            Some(s) => s,
                            None => {
                                report
                                    .errors
                                    .push(format!("{}/{}: no free workload slot", key.0, key.1));
                                continue;
                            }
                        },
                    }
                }
            };
            // Nothing changed for this workload: no entries to stage (the common case of a
            // change elsewhere in a large cluster).
            if self.workloads.get(key).is_some_and(|w| w.policy == policy) {
                unchanged.push(key.clone());
                continue;
            }
            match self.datapath.maps.stage_rules(slot, &policy) {
                Ok(s) => staged.push((key.clone(), point.clone(), slot, policy, s)),
                Err(e) => {
                    warn!(namespace = %key.0, pod = %key.1, error = %e, "rules not applied");
                    report.errors.push(format!("{}/{}: {e}", key.0, key.1));
                }
            }
        }

        // 2. identities of new and changed addresses (nothing to compare when the compiler
        // reused the identities of the last reconcile)
        let same_identities = std::sync::Arc::ptr_eq(&self.addresses, &compiled.addresses);
        let identities_changed = if same_identities {
            0
        } else {
            compiled
                .addresses
                .iter()
                .filter(|(net, id)| self.addresses.get(*net) != Some(*id))
                .count()
                + self
                    .addresses
                    .keys()
                    .filter(|net| !compiled.addresses.contains_key(*net))
                    .count()
        };
        if !same_identities {
            for (net, id) in compiled.addresses.iter() {
                if self.addresses.get(net) != Some(id) {
                    self.datapath.maps.set_identity(*net, *id)?;
                }
            }
        }
        report.identities_changed = identities_changed;

        // 3. configurations, then attachments of new workloads
        let mut changed_slots = Vec::new();
        let mut to_finish = Vec::new();
        for (key, point, slot, policy, staged_rules) in staged {
            let changed = self.datapath.maps.rules_changed(&staged_rules);
            let existing = self.workloads.get(&key);
            let is_new = existing.is_none();
            let policy_changed = existing.is_none_or(|w| w.policy != policy);
            if let Err(e) = self.datapath.maps.write_config(slot, &policy) {
                report.errors.push(format!("{}/{}: {e}", key.0, key.1));
                to_finish.push(staged_rules);
                continue;
            }
            let method = match existing
                .map(|w| w.method)
                .or_else(|| adopted.get(&key).copied())
            {
                Some(m) => m,
                None => match self.datapath.attach(slot, &point) {
                    Ok(m) => {
                        info!(namespace = %key.0, pod = %key.1, slot, attach = m.as_str(), "attached");
                        report.attached.push(format!("{}/{}", key.0, key.1));
                        m
                    }
                    Err(e) => {
                        warn!(namespace = %key.0, pod = %key.1, error = %e, "attach failed");
                        report.errors.push(format!("{}/{}: {e}", key.0, key.1));
                        to_finish.push(staged_rules);
                        // Leave nothing half-programmed for a workload that is not attached.
                        let _ = self.datapath.maps.clear_workload(slot);
                        continue;
                    }
                },
            };
            if changed || policy_changed {
                if !is_new {
                    report.updated.push(format!("{}/{}", key.0, key.1));
                }
                changed_slots.push(slot);
            }
            let pod_policy = &compiled.pods[&key];
            self.workloads.insert(
                key.clone(),
                LocalWorkload {
                    slot,
                    point,
                    method,
                    pod: state.pods[&key].clone(),
                    policy,
                    ingress_policies: pod_policy.ingress_policies.clone(),
                    egress_policies: pod_policy.egress_policies.clone(),
                    mode_source: mode_sources.get(&key).copied().unwrap_or("default"),
                },
            );
            to_finish.push(staged_rules);
        }

        for key in unchanged {
            let pod_policy = &compiled.pods[&key];
            let source = mode_sources.get(&key).copied().unwrap_or("default");
            if let Some(w) = self.workloads.get_mut(&key) {
                if w.pod != state.pods[&key] {
                    w.pod = state.pods[&key].clone();
                }
                w.ingress_policies.clone_from(&pod_policy.ingress_policies);
                w.egress_policies.clone_from(&pod_policy.egress_policies);
                w.mode_source = source;
            }
        }

        // Attachments adopted from an earlier agent that no local workload claimed.
        let claimed: BTreeSet<u32> = self.workloads.values().map(|w| w.slot).collect();
        for stale in self.datapath.attached() {
            if !claimed.contains(&stale.slot) {
                self.datapath.detach(stale.slot)?;
                self.datapath.maps.clear_workload(stale.slot)?;
                info!(
                    slot = stale.slot,
                    "detached an adopted attachment no pod claims"
                );
            }
        }

        // 4. break
        for staged_rules in to_finish {
            self.datapath.maps.finish_rules(staged_rules)?;
        }
        if !same_identities {
            for net in self.addresses.keys() {
                if !compiled.addresses.contains_key(net) {
                    self.datapath.maps.remove_identity(*net)?;
                }
            }
        }
        self.addresses = compiled.addresses.clone();

        // 5. re-evaluate tracked flows where decisions may differ
        let slots: Vec<u32> = if identities_changed > 0 {
            self.workloads.values().map(|w| w.slot).collect()
        } else {
            changed_slots
        };
        for slot in slots {
            self.datapath.maps.bump_epoch(slot)?;
        }
        self.compiled = compiled;
        report.entries_written = self.datapath.maps.stats.written - stats_before.written;
        report.entries_removed = self.datapath.maps.stats.removed - stats_before.removed;
        info!(
            attached = report.attached.len(),
            detached = report.detached.len(),
            updated = report.updated.len(),
            written = report.entries_written,
            removed = report.entries_removed,
            "reconciled"
        );
        Ok(report)
    }

    /// Applies the current overrides and annotations to the modes of attached workloads:
    /// one map write per workload whose mode changes, no recompile. What `tollgate mode`
    /// does, so a flip takes microseconds, not a reconcile.
    pub fn apply_modes(
        &mut self,
        state: &ClusterState,
    ) -> Result<Vec<(PodKey, Mode, Mode)>, MapsError> {
        let mut changed = Vec::new();
        for (key, w) in self.workloads.iter_mut() {
            let (mode, source) = match self.overrides.mode_for(key) {
                Some(m) => (m, "override"),
                None => match state.pods.get(key) {
                    Some(pod) => mode_and_source(state, pod, self.options.default_mode),
                    None => continue,
                },
            };
            w.mode_source = source;
            if w.policy.mode != mode {
                self.datapath.maps.set_mode(w.slot, mode)?;
                changed.push((key.clone(), w.policy.mode, mode));
                w.policy.mode = mode;
            }
        }
        Ok(changed)
    }

    /// Detaches every workload and forgets its state (`--detach-on-exit`, tests).
    pub fn detach_all(&mut self) -> Result<(), MapsError> {
        for (_, w) in std::mem::take(&mut self.workloads) {
            let _ = self.datapath.detach(w.slot);
            self.datapath.maps.clear_workload(w.slot)?;
        }
        Ok(())
    }
}
