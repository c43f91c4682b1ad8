//! Kubernetes objects (k8s-openapi types) to the compiler's model, with the validation the
//! API server would do. Every error names the field it is about.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use super::{
    crd::{EgressAllowlist, ModeOverride},
    store::Object,
};
use crate::compile::model::{
    AllowlistRule, EgressAllowlistInfo, EndpointSliceInfo, Mode, ModeOverrideInfo,
    NAMESPACE_NAME_LABEL, NamedPort, NamespaceInfo, NodeInfo, Operator, PeerSpec, PodInfo, Policy,
    PortRef, PortSpec, Protocol, Requirement, RuleSpec, Selector, ServiceInfo, ServicePort,
    SliceEndpoint, SlicePort, Target, TargetPort, dns_label, dns_subdomain,
};

/// Annotation that sets a workload's mode (on pods and namespaces).
pub use crate::compile::model::MODE_ANNOTATION;
/// Annotation naming the host-side interface of a pod.
pub const INTERFACE_ANNOTATION: &str = "tollgate.io/interface";
/// Annotation naming the cgroup v2 directory of a pod.
pub const CGROUP_ANNOTATION: &str = "tollgate.io/cgroup";

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

type Result<T> = std::result::Result<T, String>;

/// `metadata.name`, checked as the API server checks it: names end up in metric labels,
/// `NAMESPACE/NAME` targets and `check`'s space-separated lines, so a name the API server
/// would refuse is refused here too.
fn object_name(meta: &ObjectMeta) -> Result<String> {
    let name = meta.name.as_deref().ok_or("metadata.name is missing")?;
    if !dns_subdomain(name) {
        return Err(format!(
            "metadata.name {name:?} is not a valid name (lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit, at most 253 characters)"
        ));
    }
    Ok(name.to_string())
}

/// A Namespace's own name: a DNS label, as the API server requires.
fn namespace_name(meta: &ObjectMeta) -> Result<String> {
    let name = meta.name.as_deref().ok_or("metadata.name is missing")?;
    if !dns_label(name) {
        return Err(format!(
            "metadata.name {name:?} is not a valid namespace name (lowercase letters, digits \
             and '-', starting and ending with a letter or digit, at most 63 characters)"
        ));
    }
    Ok(name.to_string())
}

/// `metadata.namespace`, `default` when it is not given (as `kubectl apply` does).
fn object_namespace(meta: &ObjectMeta) -> Result<String> {
    match meta.namespace.as_deref() {
        None => Ok("default".into()),
        Some(ns) if dns_label(ns) => Ok(ns.to_string()),
        Some(ns) => Err(format!(
            "metadata.namespace {ns:?} is not a valid namespace name"
        )),
    }
}

/// Why a `tollgate.io/mode` annotation is ignored, if it is: a value that is not a mode is
/// reported, never a reason to reject the object (the pod is still attached and enforced
/// in the mode it has without it).
pub fn invalid_mode_annotation(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    match annotations.get(MODE_ANNOTATION).map(String::as_str) {
        None | Some("log") | Some("drop") => None,
        Some(other) => Some(format!(
            "metadata.annotations[{MODE_ANNOTATION}]: {other:?} is not a mode (log or drop); ignored"
        )),
    }
}

/// A Kubernetes object as both sources take it in: converted to the model, `Ok(None)` for
/// one that is valid but not part of the network (a finished pod, a slice of no Service),
/// or why it is rejected.
pub trait ToObject {
    fn to_object(&self) -> Result<Option<Object>>;
}

impl ToObject for Namespace {
    fn to_object(&self) -> Result<Option<Object>> {
        namespace(self).map(|n| Some(Object::Namespace(n)))
    }
}

impl ToObject for Pod {
    fn to_object(&self) -> Result<Option<Object>> {
        // A finished pod's addresses may already belong to someone else.
        if pod_is_terminated(self) {
            return Ok(None);
        }
        pod(self).map(|p| Some(Object::Pod(p)))
    }
}

impl ToObject for NetworkPolicy {
    fn to_object(&self) -> Result<Option<Object>> {
        network_policy(self).map(|p| Some(Object::Policy(p)))
    }
}

impl ToObject for Service {
    fn to_object(&self) -> Result<Option<Object>> {
        service(self).map(|s| Some(Object::Service(s)))
    }
}

impl ToObject for EndpointSlice {
    fn to_object(&self) -> Result<Option<Object>> {
        // A slice of no Service (or of FQDN endpoints) is valid and means nothing here.
        endpoint_slice(self).map(|s| s.map(Object::EndpointSlice))
    }
}

impl ToObject for Node {
    fn to_object(&self) -> Result<Option<Object>> {
        node(self).map(|n| Some(Object::Node(n)))
    }
}

impl ToObject for ModeOverride {
    fn to_object(&self) -> Result<Option<Object>> {
        mode_override(self).map(|m| Some(Object::ModeOverride(m)))
    }
}

impl ToObject for EgressAllowlist {
    fn to_object(&self) -> Result<Option<Object>> {
        egress_allowlist(self).map(|a| Some(Object::EgressAllowlist(a)))
    }
}

/// An `EgressAllowlist`: selector, domain patterns and numeric ports checked.
pub fn egress_allowlist(o: &EgressAllowlist) -> Result<EgressAllowlistInfo> {
    let name = object_name(&o.metadata)?;
    let namespace = object_namespace(&o.metadata)?;
    let pod_selector = selector(&o.spec.pod_selector, "spec.podSelector")?;
    let mut egress = Vec::new();
    for (i, r) in o.spec.egress.iter().enumerate() {
        let at = format!("spec.egress[{i}]");
        if r.domains.is_empty() {
            return Err(format!("{at}.domains: must name at least one domain"));
        }
        let mut domains = Vec::new();
        for (j, d) in r.domains.iter().enumerate() {
            domains.push(
                crate::dns::DomainPattern::parse(d)
                    .map_err(|e| format!("{at}.domains[{j}]: {e}"))?,
            );
        }
        if r.ports.len() > agent_common::LEARNED_PORT_RANGES {
            return Err(format!(
                "{at}.ports: at most {} entries per rule (split the rule)",
                agent_common::LEARNED_PORT_RANGES
            ));
        }
        let mut ports = Vec::new();
        for (j, p) in r.ports.iter().enumerate() {
            let spec = port(p, &format!("{at}.ports[{j}]"))?;
            if let PortRef::Named(n) = &spec.port {
                return Err(format!(
                    "{at}.ports[{j}].port: {n:?} is a named port, which names a port of a pod; outside the cluster give the number"
                ));
            }
            ports.push(spec);
        }
        egress.push(AllowlistRule { domains, ports });
    }
    Ok(EgressAllowlistInfo {
        namespace,
        name,
        pod_selector,
        egress,
        advised_for: advised_for(o.metadata.annotations.as_ref()),
    })
}

/// Tollgate's own annotations (`tollgate.io/...`): the only ones the model uses. Kept alone
/// so 20,000 pods' `kubectl.kubernetes.io/last-applied-configuration` never stays in memory.
fn own_annotations(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> std::collections::BTreeMap<String, String> {
    annotations
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("tollgate.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A cluster `ModeOverride`.
pub fn mode_override(o: &ModeOverride) -> Result<ModeOverrideInfo> {
    let name = object_name(&o.metadata)?;
    let target = Target::parse(&o.spec.target).map_err(|e| format!("spec.target: {e}"))?;
    let mode = o
        .spec
        .mode
        .parse::<Mode>()
        .map_err(|e| format!("spec.mode: {e}"))?;
    Ok(ModeOverrideInfo {
        name,
        target,
        mode,
        reason: o.spec.reason.clone().unwrap_or_default(),
    })
}

/// A Namespace.
pub fn namespace(ns: &Namespace) -> Result<NamespaceInfo> {
    let name = namespace_name(&ns.metadata)?;
    let annotations = own_annotations(ns.metadata.annotations.as_ref());
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    // The API server sets this label to the name on every create and update, whatever the
    // object said: a file that says otherwise would put the namespace's pods under
    // another namespace's selectors.
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
    Ok(NamespaceInfo {
        name,
        labels: labels.into(),
        annotations,
    })
}

/// Whether a pod has finished (its addresses may already belong to someone else).
pub fn pod_is_terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// A Pod.
pub fn pod(pod: &Pod) -> Result<PodInfo> {
    let meta = &pod.metadata;
    let name = object_name(meta)?;
    let namespace = object_namespace(meta)?;
    let annotations = own_annotations(meta.annotations.as_ref());
    let labels = meta.labels.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);

    let mut ips = Vec::new();
    if !host_network {
        let status = pod.status.as_ref();
        let listed: Vec<String> = match status.and_then(|s| s.pod_ips.as_ref()) {
            Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.clone()).collect(),
            _ => status.and_then(|s| s.pod_ip.clone()).into_iter().collect(),
        };
        for (i, ip) in listed.iter().enumerate() {
            let parsed: IpAddr = ip
                .parse()
                .map_err(|_| format!("status.podIPs[{i}].ip: {ip:?} is not an IP address"))?;
            if !ips.contains(&parsed) {
                ips.push(parsed);
            }
        }
    }

    let mut ports = Vec::new();
    let (mut host_ports, mut host_ports_bound) = (Vec::new(), Vec::new());
    if let Some(spec) = spec {
        // Each list counted on its own, as the field path names them.
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| ("containers", i, c))
            .chain(
                spec.init_containers
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(i, c)| ("initContainers", i, c)),
            );
        for (field, ci, container) in containers {
            for (pi, p) in container.ports.iter().flatten().enumerate() {
                let at = format!("spec.{field}[{ci}].ports[{pi}]");
                let number = port_number(p.container_port, &format!("{at}.containerPort"))?;
                let protocol = protocol(p.protocol.as_deref(), &format!("{at}.protocol"))?;
                if let Some(port_name) = &p.name {
                    ports.push(NamedPort {
                        name: port_name.clone(),
                        port: number,
                        protocol,
                    });
                }
                // A host-network pod's hostPort is its own socket on the node.
                let Some(host_port) = p.host_port.filter(|n| *n != 0) else {
                    continue;
                };
                let host_port = port_number(host_port, &format!("{at}.hostPort"))?;
                // As the CNI's portmap plugin reads `hostIP`: none on every address of each
                // family the pod has; an address (0.0.0.0 and :: for every address of their
                // family) for that family alone; anything else (the API server does not
                // check it) maps nothing for an IPv4 pod, and is left out here.
                let host_ip = match p.host_ip.as_deref() {
                    None | Some("") => None,
                    Some(ip) => match ip.parse::<IpAddr>() {
                        Ok(ip) => Some(ip.to_canonical()),
                        Err(_) => continue,
                    },
                };
                match host_ip {
                    _ if host_network => {}
                    None => host_ports.push((protocol, host_port, number)),
                    // On loopback only the node's own processes reach it.
                    Some(ip) if ip.is_loopback() => {}
                    Some(ip) => host_ports_bound.push((protocol, host_port, number, ip)),
                }
            }
        }
    }

    Ok(PodInfo {
        workload: workload_name(pod, &name),
        uid: meta.uid.clone().unwrap_or_default(),
        namespace,
        name,
        labels: labels.into(),
        annotations,
        ips,
        ports,
        host_ports,
        host_ports_bound,
        host_network,
        node_name: spec.and_then(|s| s.node_name.clone()),
        terminating: meta.deletion_timestamp.is_some(),
        unready: pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status != "True"),
        created: meta
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
    })
}

fn protocol(value: Option<&str>, at: &str) -> Result<Protocol> {
    match value {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s).ok_or_else(|| format!("{at}: {s:?} is not TCP, UDP or SCTP")),
    }
}

fn port_number(n: i32, at: &str) -> Result<u16> {
    u16::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{at}: {n} is out of range 1-65535"))
}

fn address(s: &str, at: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| format!("{at}: {s:?} is not an IP address"))
}

/// A Service: its virtual addresses (none for headless and ExternalName Services) and ports.
pub fn service(svc: &Service) -> Result<ServiceInfo> {
    let name = object_name(&svc.metadata)?;
    let namespace = object_namespace(&svc.metadata)?;
    let spec = svc.spec.as_ref().ok_or("spec is missing")?;
    let external_name = spec.type_.as_deref() == Some("ExternalName");
    let listed: Vec<(String, &str)> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        (_, Some(ip)) => vec![("spec.clusterIP".into(), ip.as_str())],
        _ => vec![],
    };
    let mut cluster_ips = Vec::new();
    if !external_name {
        for (at, ip) in listed {
            if ip == "None" || ip.is_empty() {
                continue;
            }
            let ip = address(ip, &at)?;
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
    }
    // kube-proxy DNATs the external IPs and load-balancer addresses of a Service with a
    // ClusterIP inside the node as it does the ClusterIP (and masquerades the call): to a
    // pod they are more virtual addresses of the Service, decided by its backends. A
    // load balancer that proxies (`ipMode: Proxy`) is reached for real.
    if !cluster_ips.is_empty() {
        let external = spec
            .external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip.clone()));
        let balanced = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, i)| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|(n, i)| {
                let ip = i.ip.clone()?;
                Some((format!("status.loadBalancer.ingress[{n}].ip"), ip))
            });
        for (at, ip) in external.chain(balanced) {
            let ip = address(&ip, &at)?;
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let at = format!("spec.ports[{i}]");
        let port = port_number(p.port, &format!("{at}.port"))?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port_number(*n, &format!("{at}.targetPort"))?)
            }
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_number(n, &format!("{at}.targetPort"))?),
                Err(_) if valid_port_name(s) => TargetPort::Named(s.clone()),
                Err(_) => {
                    return Err(format!(
                        "{at}.targetPort: {s:?} is not a port number or a valid port name"
                    ));
                }
            },
        };
        // kube-proxy opens a NodePort on every address of every node (ClusterIP Services
        // have none: the API server refuses one).
        let node_port = match (spec.type_.as_deref(), p.node_port) {
            (Some("NodePort" | "LoadBalancer"), Some(n)) if n != 0 => {
                Some(port_number(n, &format!("{at}.nodePort"))?)
            }
            _ => None,
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_deref(), &format!("{at}.protocol"))?,
            port,
            target,
            node_port,
        });
    }
    Ok(ServiceInfo {
        namespace,
        name,
        cluster_ips,
        ports,
        // An empty selector is no selector: "the service is assumed to have an external
        // process managing its endpoints" (ServiceSpec), not every pod of the namespace.
        selector: spec
            .selector
            .as_ref()
            .filter(|s| !s.is_empty())
            .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
    })
}

/// An EndpointSlice. `Ok(None)` for slices that name no Service or hold FQDN endpoints:
/// nothing kube-proxy would DNAT to.
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<Option<EndpointSliceInfo>> {
    let meta = &slice.metadata;
    let name = object_name(meta)?;
    let namespace = object_namespace(meta)?;
    let Some(service) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
    else {
        return Ok(None);
    };
    let family_v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(None),
        other => {
            return Err(format!("addressType: {other:?} is not IPv4, IPv6 or FQDN"));
        }
    };
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        let mut addresses = Vec::new();
        for (j, a) in e.addresses.iter().enumerate() {
            let at = format!("endpoints[{i}].addresses[{j}]");
            let ip = address(a, &at)?;
            if ip.is_ipv6() != family_v6 {
                return Err(format!(
                    "{at}: {ip} is not of addressType {}",
                    slice.address_type
                ));
            }
            addresses.push(ip);
        }
        let conditions = e.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(SliceEndpoint {
            addresses,
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let pod_namespace = r.namespace.clone().unwrap_or_else(|| namespace.clone());
                    Some((pod_namespace, r.name.clone()?))
                }),
        });
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let at = format!("ports[{i}]");
        // A port without a number means "all ports" (only for Services without ports).
        let Some(number) = p.port else { continue };
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_deref(), &format!("{at}.protocol"))?,
            port: port_number(number, &format!("{at}.port"))?,
        });
    }
    Ok(Some(EndpointSliceInfo {
        namespace,
        name,
        service,
        endpoints,
        ports,
    }))
}

/// A Node: its IP addresses (`Hostname` and other non-IP entries are skipped).
pub fn node(node: &Node) -> Result<NodeInfo> {
    let name = object_name(&node.metadata)?;
    let mut addresses = Vec::new();
    for a in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if let Ok(ip) = a.address.parse::<IpAddr>()
            && !addresses.contains(&ip)
        {
            addresses.push(ip);
        }
    }
    let spec = node.spec.as_ref();
    let pod_cidrs = spec
        .and_then(|s| s.pod_cidrs.clone())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, c)| cidr(c, &format!("spec.podCIDRs[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    Ok(NodeInfo {
        name,
        addresses,
        pod_cidrs,
    })
}

/// The pod's top owning controller, the way operators name services: a ReplicaSet's pod
/// belongs to its Deployment (the ReplicaSet name less the pod-template hash, Deployment's
/// `pod-template-hash` or Argo Rollouts' `rollouts-pod-template-hash`), a Job a CronJob
/// created to that CronJob, StatefulSet and DaemonSet pods to them. A pod with no
/// controller is its own workload: an owner that is not the controller (`controller:
/// false`, a garbage-collection anchor), and the Node kubelet names as the owner of a
/// static pod's mirror, do not name one.
pub fn workload_name(pod: &Pod, pod_name: &str) -> String {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    // Hand-written objects may leave `controller` out: then an owner of a controller kind.
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| {
            owners.iter().find(|o| {
                o.controller.is_none()
                    && matches!(
                        o.kind.as_str(),
                        "ReplicaSet"
                            | "StatefulSet"
                            | "DaemonSet"
                            | "Job"
                            | "ReplicationController"
                    )
            })
        });
    // The API server checks an owner's name for being set only; a hand-written one that is
    // no object name cannot name a workload (it would not parse as a `mode set` target).
    let Some(owner) = owner.filter(|o| o.kind != "Node" && dns_subdomain(&o.name)) else {
        return pod_name.to_string();
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let labels = pod.metadata.labels.as_ref();
            let hashes = ["pod-template-hash", "rollouts-pod-template-hash"]
                .into_iter()
                .filter_map(|label| labels.and_then(|l| l.get(label)));
            hashes
                .filter_map(|h| owner.name.strip_suffix(&format!("-{h}")))
                .next()
                .unwrap_or(&owner.name)
                .to_string()
        }
        "Job" => cronjob_of(&owner.name).unwrap_or(&owner.name).to_string(),
        _ => owner.name.clone(),
    }
}

/// The CronJob that created a Job, from the Job's name: CronJobs name their Jobs
/// `NAME-<scheduled time in minutes since 1970>`, 8 digits from 23,000,000 (2013) to year
/// 2160. A date (`backup-20261126`: at most 21,000,000) or Unix seconds are not that: such
/// a Job is its own workload. (A pod names its Job only; the Job's own owner is not in the
/// pod.)
fn cronjob_of(job: &str) -> Option<&str> {
    let (cronjob, suffix) = job.rsplit_once('-')?;
    let minutes: u64 = suffix.parse().ok()?;
    (suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_digit()) && minutes >= 23_000_000)
        .then_some(cronjob)
}

/// A label key as the API server takes it: an optional DNS-subdomain prefix and `/`, then
/// a name of at most 63 characters, alphanumeric at both ends, `-`, `_` or `.` inside.
fn label_key_error(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if prefix.is_some_and(|prefix| !dns_subdomain(prefix)) {
        return Some(format!(
            "{key:?}: the prefix must be a DNS subdomain (lowercase alphanumerics, '-' and '.')"
        ));
    }
    if name.is_empty() {
        return Some(format!("{key:?}: the name part must not be empty"));
    }
    label_value_error(name).map(|why| format!("{key:?}: the name part {why}"))
}

/// Why a label value is not one the API server takes (at most 63 characters, empty or
/// alphanumeric at both ends with `-`, `_` or `.` inside), if it is not.
fn label_value_error(value: &str) -> Option<&'static str> {
    let inner = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let bytes = value.as_bytes();
    if value.len() > 63 {
        Some("must be at most 63 characters")
    } else if !bytes.iter().all(|b| inner(*b))
        || bytes.first().is_some_and(|b| !b.is_ascii_alphanumeric())
        || bytes.last().is_some_and(|b| !b.is_ascii_alphanumeric())
    {
        Some("must be alphanumeric at both ends, with only '-', '_' or '.' inside")
    } else {
        None
    }
}

fn selector(s: &LabelSelector, at: &str) -> Result<Selector> {
    for (key, value) in s.match_labels.iter().flatten() {
        if let Some(why) = label_key_error(key) {
            return Err(format!("{at}.matchLabels: invalid label key {why}"));
        }
        if let Some(why) = label_value_error(value) {
            return Err(format!(
                "{at}.matchLabels[{key}]: invalid label value {value:?}: {why}"
            ));
        }
    }
    let mut out = Selector {
        match_labels: s
            .match_labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        expressions: vec![],
    };
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let at = format!("{at}.matchExpressions[{i}]");
        let operator = match e.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(format!(
                    "{at}.operator: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                ));
            }
        };
        let values: BTreeSet<String> = e.values.clone().unwrap_or_default().into_iter().collect();
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(format!("{at}.values: must be non-empty for {}", e.operator));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(format!("{at}.values: must be empty for {}", e.operator));
            }
            _ => {}
        }
        if e.key.is_empty() {
            return Err(format!("{at}.key: must not be empty"));
        }
        if let Some(why) = label_key_error(&e.key) {
            return Err(format!("{at}.key: invalid label key {why}"));
        }
        for (j, value) in e.values.iter().flatten().enumerate() {
            if let Some(why) = label_value_error(value) {
                return Err(format!(
                    "{at}.values[{j}]: invalid label value {value:?}: {why}"
                ));
            }
        }
        out.expressions.push(Requirement {
            key: e.key.clone(),
            operator,
            values,
        });
    }
    Ok(out)
}

fn cidr(s: &str, at: &str) -> Result<IpNet> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{at}: {s:?} is not a CIDR"))
}

fn peer(p: &NetworkPolicyPeer, at: &str) -> Result<PeerSpec> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(block), None, None) => {
            let net = cidr(&block.cidr, &format!("{at}.ipBlock.cidr"))?;
            let mut except = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let at = format!("{at}.ipBlock.except[{i}]");
                let e = cidr(e, &at)?;
                let same_family = net.addr().is_ipv4() == e.addr().is_ipv4();
                if !same_family || !net.contains(&e) || e.prefix_len() <= net.prefix_len() {
                    return Err(format!("{at}: {e} must be a strict subset of {net}"));
                }
                except.push(e);
            }
            Ok(PeerSpec::IpBlock { cidr: net, except })
        }
        (Some(_), _, _) => Err(format!(
            "{at}: ipBlock may not be combined with podSelector or namespaceSelector"
        )),
        (None, None, None) => Err(format!(
            "{at}: must specify podSelector, namespaceSelector or ipBlock"
        )),
        (None, ns, pods) => Ok(PeerSpec::Pods {
            namespaces: ns
                .as_ref()
                .map(|s| selector(s, &format!("{at}.namespaceSelector")))
                .transpose()?,
            pods: pods
                .as_ref()
                .map(|s| selector(s, &format!("{at}.podSelector")))
                .transpose()?,
        }),
    }
}

/// Whether `name` is a valid port name (IANA_SVC_NAME: 1-15 lowercase letters, digits and
/// dashes, at least one letter, no leading, trailing or double dash).
fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

fn port(p: &NetworkPolicyPort, at: &str) -> Result<PortSpec> {
    let protocol = protocol(p.protocol.as_deref(), &format!("{at}.protocol"))?;
    let number = |n: i32, field: &str| port_number(n, &format!("{at}.{field}"));
    let port = match (&p.port, p.end_port) {
        (None, None) => PortRef::Any,
        (None, Some(_)) => return Err(format!("{at}.endPort: requires port")),
        (Some(IntOrString::Int(n)), end) => {
            let first = number(*n, "port")?;
            let last = match end {
                None => first,
                Some(e) => {
                    let last = number(e, "endPort")?;
                    if last < first {
                        return Err(format!("{at}.endPort: {last} is below port {first}"));
                    }
                    last
                }
            };
            PortRef::Range(first, last)
        }
        (Some(IntOrString::String(name)), None) => {
            if !valid_port_name(name) {
                return Err(format!(
                    "{at}.port: {name:?} is not a port number or a valid port name"
                ));
            }
            PortRef::Named(name.clone())
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err(format!("{at}.endPort: may not be used with a named port"));
        }
    };
    Ok(PortSpec { protocol, port })
}

fn rule(
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    at: &str,
    peer_field: &str,
) -> Result<RuleSpec> {
    let mut out = RuleSpec::default();
    for (i, p) in peers.into_iter().flatten().enumerate() {
        out.peers.push(peer(p, &format!("{at}.{peer_field}[{i}]"))?);
    }
    for (i, p) in ports.into_iter().flatten().enumerate() {
        out.ports.push(port(p, &format!("{at}.ports[{i}]"))?);
    }
    Ok(out)
}

/// A NetworkPolicy, validated, with policyTypes defaulted as the API server does: Ingress
/// always, Egress when the policy has egress rules.
pub fn network_policy(np: &NetworkPolicy) -> Result<Policy> {
    let name = object_name(&np.metadata)?;
    let namespace = object_namespace(&np.metadata)?;
    let spec = np.spec.as_ref().ok_or("spec is missing")?;
    // A missing podSelector is the empty one, as the API server stores it (the field is not
    // a pointer in its types): every pod of the namespace.
    let pod_selector = match spec.pod_selector.as_ref() {
        Some(s) => selector(s, "spec.podSelector")?,
        None => Selector::default(),
    };
    let (mut wants_ingress, mut wants_egress) = (false, false);
    match &spec.policy_types {
        Some(types) if types.len() > 2 => {
            return Err("spec.policyTypes: may not specify more than two policyTypes".into());
        }
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => wants_ingress = true,
                    "Egress" => wants_egress = true,
                    other => {
                        return Err(format!(
                            "spec.policyTypes[{i}]: {other:?} is not Ingress or Egress"
                        ));
                    }
                }
            }
        }
        _ => {
            wants_ingress = true;
            wants_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
    }
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress.push(rule(
            r.from.as_ref(),
            r.ports.as_ref(),
            &format!("spec.ingress[{i}]"),
            "from",
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.push(rule(
            r.to.as_ref(),
            r.ports.as_ref(),
            &format!("spec.egress[{i}]"),
            "to",
        )?);
    }
    Ok(Policy {
        namespace,
        name,
        pod_selector,
        ingress: wants_ingress.then_some(ingress),
        egress: wants_egress.then_some(egress),
        advised_for: advised_for(np.metadata.annotations.as_ref()),
    })
}

/// The `tollgate.io/advised-for` annotation `tollgate advise` writes on what it advises.
fn advised_for(annotations: Option<&std::collections::BTreeMap<String, String>>) -> Option<String> {
    annotations?.get("tollgate.io/advised-for").cloned()
}

/// Field names NetworkPolicy knows, by path shape; anything else is a typo the API server
/// would reject (strict field validation), not something to ignore silently.
pub fn unknown_policy_fields(spec: &serde_norway::Value) -> Option<String> {
    use serde_norway::Value;
    fn rules(v: &Value, field: &str, peer_field: &str) -> Option<String> {
        v.get(field)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .enumerate()
            .find_map(|(i, r)| {
                let at = format!("spec.{field}[{i}]");
                unknown_key(r, &[peer_field, "ports"], &at)
                    .or_else(|| {
                        r.get(peer_field)
                            .and_then(Value::as_sequence)
                            .into_iter()
                            .flatten()
                            .enumerate()
                            .find_map(|(j, p)| {
                                let at = format!("{at}.{peer_field}[{j}]");
                                unknown_key(
                                    p,
                                    &["podSelector", "namespaceSelector", "ipBlock"],
                                    &at,
                                )
                                .or_else(|| {
                                    p.get("podSelector").and_then(|s| {
                                        unknown_selector_key(s, &format!("{at}.podSelector"))
                                    })
                                })
                                .or_else(|| {
                                    p.get("namespaceSelector").and_then(|s| {
                                        unknown_selector_key(s, &format!("{at}.namespaceSelector"))
                                    })
                                })
                                .or_else(|| {
                                    p.get("ipBlock").and_then(|b| {
                                        unknown_key(
                                            b,
                                            &["cidr", "except"],
                                            &format!("{at}.ipBlock"),
                                        )
                                    })
                                })
                            })
                    })
                    .or_else(|| unknown_port_key(r, &at))
            })
    }
    unknown_key(
        spec,
        &["podSelector", "ingress", "egress", "policyTypes"],
        "spec",
    )
    .or_else(|| {
        spec.get("podSelector")
            .and_then(|s| unknown_selector_key(s, "spec.podSelector"))
    })
    .or_else(|| rules(spec, "ingress", "from"))
    .or_else(|| rules(spec, "egress", "to"))
}

/// The first field of an EgressAllowlist's spec its schema does not have, nested ones
/// included (a `matchLabel` typo would leave a selector of every pod), as a rejection.
pub fn unknown_allowlist_fields(spec: &serde_norway::Value) -> Option<String> {
    spec.get("podSelector")
        .and_then(|s| unknown_selector_key(s, "spec.podSelector"))
        .or_else(|| {
            spec.get("egress")
                .and_then(serde_norway::Value::as_sequence)
                .into_iter()
                .flatten()
                .enumerate()
                .find_map(|(i, r)| unknown_port_key(r, &format!("spec.egress[{i}]")))
        })
}

/// The first key of a mapping not in `allowed`, as a rejection at `at`.
fn unknown_key(v: &serde_norway::Value, allowed: &[&str], at: &str) -> Option<String> {
    let serde_norway::Value::Mapping(m) = v else {
        return None;
    };
    m.keys()
        .filter_map(|k| k.as_str())
        .find(|k| !allowed.contains(k))
        .map(|k| {
            format!(
                "{at}.{k}: unknown field (expected one of {})",
                allowed.join(", ")
            )
        })
}

/// An unknown field of a label selector or of its `matchExpressions`.
fn unknown_selector_key(v: &serde_norway::Value, at: &str) -> Option<String> {
    unknown_key(v, &["matchLabels", "matchExpressions"], at).or_else(|| {
        v.get("matchExpressions")
            .and_then(serde_norway::Value::as_sequence)
            .into_iter()
            .flatten()
            .enumerate()
            .find_map(|(i, e)| {
                unknown_key(
                    e,
                    &["key", "operator", "values"],
                    &format!("{at}.matchExpressions[{i}]"),
                )
            })
    })
}

/// An unknown field of the `ports` of a rule at `at`.
fn unknown_port_key(rule: &serde_norway::Value, at: &str) -> Option<String> {
    rule.get("ports")
        .and_then(serde_norway::Value::as_sequence)
        .into_iter()
        .flatten()
        .enumerate()
        .find_map(|(j, p)| {
            unknown_key(
                p,
                &["protocol", "port", "endPort"],
                &format!("{at}.ports[{j}]"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workload a pod is named by, for the owners operators meet.
    #[test]
    fn workload_names_follow_the_controller() {
        let cases = [
            // (labels, ownerReferences, workload)
            (
                "{pod-template-hash: 7d9c8b5f4}",
                "[{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9c8b5f4, uid: u, controller: true}]",
                "web",
            ),
            (
                "{rollouts-pod-template-hash: 6b8c9d7f5}",
                "[{apiVersion: apps/v1, kind: ReplicaSet, name: checkout-6b8c9d7f5, uid: u, controller: true}]",
                "checkout",
            ),
            (
                "{}",
                "[{apiVersion: apps/v1, kind: ReplicaSet, name: bare-rs, uid: u, controller: true}]",
                "bare-rs",
            ),
            (
                "{}",
                "[{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: u, controller: true}]",
                "db",
            ),
            (
                "{}",
                "[{apiVersion: batch/v1, kind: Job, name: report-29410560, uid: u, controller: true}]",
                "report",
            ),
            (
                "{}",
                "[{apiVersion: batch/v1, kind: Job, name: backup-20261126, uid: u, controller: true}]",
                "backup-20261126",
            ),
            (
                "{}",
                "[{apiVersion: batch/v1, kind: Job, name: import-1732600000, uid: u, controller: true}]",
                "import-1732600000",
            ),
            (
                "{}",
                "[{apiVersion: v1, kind: Node, name: node-1, uid: u, controller: true}]",
                "the-pod",
            ),
            (
                "{}",
                "[{apiVersion: v1, kind: ConfigMap, name: gc-anchor, uid: u}]",
                "the-pod",
            ),
            (
                "{}",
                "[{apiVersion: v1, kind: ConfigMap, name: gc-anchor, uid: u, controller: false}, {apiVersion: apps/v1, kind: DaemonSet, name: agent, uid: v, controller: true}]",
                "agent",
            ),
            (
                "{}",
                "[{apiVersion: apps/v1, kind: DaemonSet, name: handmade, uid: v}]",
                "handmade",
            ),
            ("{}", "[]", "the-pod"),
            (
                "{}",
                "[{apiVersion: apps/v1, kind: StatefulSet, name: 'db prod', uid: v, controller: true}]",
                "the-pod",
            ),
        ];
        for (labels, owners, want) in cases {
            let yaml = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: the-pod, namespace: x, labels: {labels}, ownerReferences: {owners}}}\n"
            );
            let pod: Pod = serde_norway::from_str(&yaml).unwrap();
            assert_eq!(workload_name(&pod, "the-pod"), want, "{owners} {labels}");
        }
    }

    /// Names the API server would refuse are refused: they would end up in metric labels,
    /// `NAMESPACE/NAME` targets and `check`'s space-separated lines.
    #[test]
    fn names_the_api_server_would_refuse_are_refused() {
        let policy = |meta: &str| {
            let yaml = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {meta}\nspec: {{podSelector: {{}}}}\n"
            );
            let np: NetworkPolicy = serde_norway::from_str(&yaml).unwrap();
            network_policy(&np).map(|p| (p.namespace, p.name))
        };
        assert_eq!(
            policy("{name: deny.all-1, namespace: team-a}"),
            Ok(("team-a".into(), "deny.all-1".into()))
        );
        assert_eq!(
            policy("{name: deny}"),
            Ok(("default".into(), "deny".into()))
        );
        for meta in [
            "{name: 'deny all', namespace: x}",
            "{name: Deny, namespace: x}",
            "{name: deny_all, namespace: x}",
            "{name: -deny, namespace: x}",
            "{name: 'deny..all', namespace: x}",
            "{name: '', namespace: x}",
            "{name: deny, namespace: 'a/b'}",
            "{name: deny, namespace: team.a}",
        ] {
            let error = policy(meta).unwrap_err();
            assert!(error.starts_with("metadata."), "{meta}: {error}");
        }
        let long = "a".repeat(254);
        assert!(policy(&format!("{{name: {long}, namespace: x}}")).is_err());
        let ns: Namespace =
            serde_norway::from_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n")
                .unwrap();
        assert!(
            namespace(&ns)
                .unwrap_err()
                .contains("not a valid namespace name")
        );
    }

    /// hostIPs as portmap reads them: none on every address, an address for its family
    /// (IPv4 in IPv6 as IPv4), loopback and what is no address left out, and the pod kept.
    #[test]
    fn host_ips_are_read_as_portmap_reads_them() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nspec:\n  containers: [{name: a, image: i, ports: [{containerPort: 80, hostPort: 80}, {containerPort: 81, hostPort: 81, hostIP: node-1}, {containerPort: 82, hostPort: 82, hostIP: '::ffff:10.0.0.5'}, {containerPort: 83, hostPort: 83, hostIP: '::ffff:127.0.0.1'}, {containerPort: 84, hostPort: 84, hostIP: 0.0.0.0}]}]\n";
        let parsed: Pod = serde_norway::from_str(yaml).unwrap();
        let info = pod(&parsed).expect("the pod is kept");
        assert_eq!(info.host_ports, vec![(Protocol::Tcp, 80, 80)]);
        assert_eq!(
            info.host_ports_bound,
            vec![
                (Protocol::Tcp, 82, 82, "10.0.0.5".parse().unwrap()),
                (Protocol::Tcp, 84, 84, "0.0.0.0".parse().unwrap()),
            ]
        );
    }

    /// A bad port is named by the path of its field, each container list counted apart.
    #[test]
    fn a_bad_container_port_is_named_by_its_field() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nspec:\n  containers: [{name: a, image: i}, {name: b, image: i, ports: [{containerPort: 80}]}]\n  initContainers: [{name: init, image: i, ports: [{containerPort: 8080}, {containerPort: 0}]}]\n";
        let parsed: Pod = serde_norway::from_str(yaml).unwrap();
        let error = pod(&parsed).unwrap_err();
        assert!(
            error.starts_with("spec.initContainers[0].ports[1].containerPort"),
            "{error}"
        );
    }
}
