//! Kubernetes YAML for the lab's cluster state: pods of the lab (with their UIDs and
//! addresses), Services with their EndpointSlices as the EndpointSlice controller writes them,
//! and Nodes. What `tollgate run --cluster-state` and `tollgate check` read.

use std::net::IpAddr;

use crate::Pod;

/// A named container port: (name, number, `TCP` or `UDP`).
pub type NamedPort<'a> = (&'a str, u16, &'a str);

/// A Pod object for a lab pod, with `labels` and `annotations` as YAML flow mappings
/// (`{app: ledger}`), its container ports, and `extra` lines under `metadata` (owners...).
pub fn pod(
    pod: &Pod,
    namespace: &str,
    name: &str,
    labels: &str,
    annotations: &str,
    ports: &[NamedPort],
) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto)| format!("{{name: {n}, containerPort: {p}, protocol: {proto}}}"))
        .collect();
    let host_network = pod.host_if.is_empty();
    let ips = if host_network {
        String::new()
    } else {
        format!("  podIPs: [{{ip: {}}}, {{ip: {}}}]\n", pod.ipv4, pod.ipv6)
    };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: {uid}\n  labels: {labels}\n  annotations: {annotations}\nspec:\n  hostNetwork: {host_network}\n  containers: [{{name: c, image: i, ports: [{ports}]}}]\nstatus:\n  phase: Running\n{ips}",
        uid = pod.uid,
        ports = ports.join(", "),
    )
}

/// The same Pod object (from `pod`), scheduled on node `node` (`spec.nodeName`).
pub fn on_node(pod_yaml: &str, node: &str) -> String {
    pod_yaml.replacen("\nspec:\n", &format!("\nspec:\n  nodeName: {node}\n"), 1)
}

/// A Namespace with `labels` and `annotations` as YAML flow mappings.
pub fn namespace(name: &str, labels: &str, annotations: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}, annotations: {annotations}}}\n"
    )
}

/// A port of a Service: (name, port, protocol, targetPort as written: a number or a name).
pub type ServicePort<'a> = (&'a str, u16, &'a str, &'a str);

/// A ClusterIP Service selecting `selector` (a YAML flow mapping).
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ips: &[IpAddr],
    selector: &str,
    ports: &[ServicePort],
) -> String {
    let ips: Vec<String> = cluster_ips.iter().map(ToString::to_string).collect();
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto, target)| {
            format!("{{name: {n}, port: {p}, protocol: {proto}, targetPort: {target}}}")
        })
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  type: ClusterIP\n  clusterIP: {first}\n  clusterIPs: [{ips}]\n  selector: {selector}\n  ports: [{ports}]\n",
        first = ips[0],
        ips = ips.join(", "),
        ports = ports.join(", "),
    )
}

/// An EndpointSlice of Service `service`: ready endpoints (address, pod name) of one family,
/// and its ports (name, number, protocol), the backends' numbers.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    endpoints: &[(IpAddr, &str)],
    ports: &[(&str, u16, &str)],
) -> String {
    let family = if endpoints.first().is_some_and(|(ip, _)| ip.is_ipv6()) {
        "IPv6"
    } else {
        "IPv4"
    };
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(ip, pod)| {
            format!(
                "{{addresses: [\"{ip}\"], conditions: {{ready: true, serving: true, terminating: false}}, targetRef: {{kind: Pod, namespace: {namespace}, name: {pod}}}}}"
            )
        })
        .collect();
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto)| format!("{{name: {n}, port: {p}, protocol: {proto}}}"))
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{kubernetes.io/service-name: {service}, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}\naddressType: {family}\nendpoints: [{endpoints}]\nports: [{ports}]\n",
        endpoints = endpoints.join(", "),
        ports = ports.join(", "),
    )
}

/// A Node with its InternalIP addresses.
pub fn node(name: &str, addresses: &[IpAddr]) -> String {
    let addresses: Vec<String> = addresses
        .iter()
        .map(|a| format!("{{type: InternalIP, address: \"{a}\"}}"))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus:\n  addresses: [{{type: Hostname, address: {name}}}, {}]\n",
        addresses.join(", ")
    )
}
