//! Where a pod may be attached: only at a point that is provably its own. Pod authors write
//! their pod's annotations, so nothing a pod claims is believed without a check against
//! what the node itself says:
//! - a TC attachment goes on a device that holds the node's /32 or /128 host route to one
//!   of the pod's IPs, and is neither loopback, a bridge, nor a device with an address of
//!   the node or a default route (the uplink, tunnel endpoints);
//! - a cgroup attachment goes on the pod's own cgroup directory, found from its UID under
//!   the kubepods hierarchy (systemd and cgroupfs drivers), canonicalised, never above it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::{netlink, routes::RouteTables};

/// The node's network as seen from the agent's namespace: interfaces, addresses, routes.
pub struct NodeNetwork {
    links: BTreeMap<String, netlink::Link>,
    /// Addresses by interface index.
    addresses: BTreeMap<u32, Vec<IpAddr>>,
    routes: RouteTables,
}

fn link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
        IpAddr::V4(v4) => v4.is_link_local(),
    }
}

impl NodeNetwork {
    /// Reads the interfaces, addresses and routes of this thread's network namespace.
    pub fn read() -> std::io::Result<NodeNetwork> {
        let links = netlink::links()?
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        let mut addresses: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
        for a in netlink::addresses()? {
            addresses.entry(a.index).or_default().push(a.ip);
        }
        Ok(NodeNetwork {
            links,
            addresses,
            routes: RouteTables::read(),
        })
    }

    /// Every address of the node's network namespace.
    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.addresses.values().flatten().copied().collect()
    }

    /// Why `iface` cannot be any pod's own device, if it cannot.
    fn unfit(&self, iface: &str) -> Option<String> {
        let Some(link) = self.links.get(iface) else {
            return Some(format!(
                "there is no interface {iface} in the node's network namespace"
            ));
        };
        if link.loopback {
            return Some(format!("{iface} is the loopback device"));
        }
        if link.kind.as_deref() == Some("bridge") {
            return Some(format!(
                "{iface} is a bridge, shared by every pod behind it"
            ));
        }
        if let Some(ip) = self
            .addresses
            .get(&link.index)
            .into_iter()
            .flatten()
            .find(|ip| !link_local(ip))
        {
            return Some(format!(
                "{iface} holds the node address {ip} (the node's uplink or a tunnel)"
            ));
        }
        if self.routes.default_route_interfaces().contains(iface) {
            return Some(format!("{iface} carries the node's default route"));
        }
        None
    }

    /// The pod's own device: the one holding the node's host route to one of `ips`.
    pub fn pod_interface(&self, ips: &[IpAddr]) -> Option<String> {
        ips.iter()
            .filter_map(|ip| self.routes.host_route_interface(*ip))
            .find(|iface| self.unfit(iface).is_none())
            .map(str::to_string)
    }

    /// Checks a claimed device (`tollgate.io/interface`) against the pod's addresses.
    pub fn check_interface(&self, iface: &str, ips: &[IpAddr]) -> Result<(), String> {
        if let Some(why) = self.unfit(iface) {
            return Err(why);
        }
        if ips
            .iter()
            .any(|ip| self.routes.host_route_interface(*ip) == Some(iface))
        {
            return Ok(());
        }
        if ips.is_empty() {
            return Err(format!(
                "the pod has no IP address yet, so {iface} cannot be shown to be its own"
            ));
        }
        let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
        Err(format!(
            "{iface} holds no host route to the pod's address ({})",
            list.join(", ")
        ))
    }

    /// The addresses whose host route leaves through `iface` (who really owns it).
    pub fn routed_to(&self, iface: &str, candidates: &[IpAddr]) -> Vec<IpAddr> {
        candidates
            .iter()
            .filter(|ip| self.routes.host_route_interface(**ip) == Some(iface))
            .copied()
            .collect()
    }
}

/// The cgroup v2 directories a pod of `uid` can have, for the systemd driver (`kubepods.slice`,
/// QoS slices, dashes of the UID as underscores) and the cgroupfs driver (`kubepods`).
fn pod_cgroup_candidates(root: &Path, uid: &str) -> Vec<PathBuf> {
    let u = uid.replace('-', "_");
    let slice = root.join("kubepods.slice");
    let fs = root.join("kubepods");
    vec![
        slice.join(format!("kubepods-pod{u}.slice")),
        slice
            .join("kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{u}.slice")),
        slice
            .join("kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{u}.slice")),
        fs.join(format!("pod{uid}")),
        fs.join("burstable").join(format!("pod{uid}")),
        fs.join("besteffort").join(format!("pod{uid}")),
    ]
}

/// Whether a UID is plausible (Kubernetes UIDs are UUIDs): nothing that could walk paths.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The pod's own cgroup directory under the cgroup v2 `root`, canonicalised, if it exists
/// inside the kubepods hierarchy.
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    if !valid_uid(uid) {
        return None;
    }
    let root = root.canonicalize().ok()?;
    let hierarchies = [root.join("kubepods.slice"), root.join("kubepods")];
    pod_cgroup_candidates(&root, uid)
        .into_iter()
        .filter_map(|p| p.canonicalize().ok())
        .find(|p| p.is_dir() && hierarchies.iter().any(|h| p.starts_with(h) && p != h))
}

/// The UID of the pod a kubepods cgroup directory is named for (either driver's naming).
pub fn uid_of_cgroup(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if let Some(slice) = name.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        return Some(uid.replace('_', "-"));
    }
    name.strip_prefix("pod").map(str::to_string)
}

/// Checks a claimed cgroup directory (`tollgate.io/cgroup`, absolute or relative to `root`):
/// it must be the pod's own, the one its UID names.
pub fn check_cgroup(root: &Path, claimed: &str, uid: &str) -> Result<PathBuf, String> {
    let path = Path::new(claimed);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let canonical = path
        .canonicalize()
        .map_err(|e| format!("cgroup {}: {e}", path.display()))?;
    if !valid_uid(uid) {
        return Err(format!(
            "cgroup {}: the pod has no usable metadata.uid to show it is its own",
            canonical.display()
        ));
    }
    match pod_cgroup(root, uid) {
        Some(own) if own == canonical => Ok(own),
        Some(own) => Err(format!(
            "cgroup {} is not the pod's own cgroup directory ({})",
            canonical.display(),
            own.display()
        )),
        None => Err(format!(
            "cgroup {} is not the pod's own cgroup directory (none named for uid {uid} under {}/kubepods*)",
            canonical.display(),
            root.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_of_a_pod_is_found_from_its_uid_and_nothing_else_passes() {
        let root = std::env::temp_dir().join(format!("tollgate-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let own = root
            .join("kubepods.slice/kubepods-burstable.slice")
            .join("kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice");
        let other = root.join("kubepods/besteffort/pod0000");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        let canonical_own = own.canonicalize().unwrap();
        assert_eq!(pod_cgroup(&root, uid), Some(canonical_own.clone()));
        assert_eq!(
            check_cgroup(&root, own.to_str().unwrap(), uid),
            Ok(canonical_own.clone())
        );
        let relative = own
            .strip_prefix(&root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(check_cgroup(&root, &relative, uid), Ok(canonical_own));
        for claim in [
            other.to_str().unwrap().to_string(),
            root.join("kubepods.slice").to_str().unwrap().to_string(),
            root.join("elsewhere").to_str().unwrap().to_string(),
            format!("{}/../../elsewhere", own.display()),
        ] {
            assert!(check_cgroup(&root, &claim, uid).is_err(), "{claim}");
        }
        assert!(check_cgroup(&root, own.to_str().unwrap(), "../../x").is_err());
        assert_eq!(
            pod_cgroup(&root, "0000"),
            Some(other.canonicalize().unwrap()),
            "the cgroupfs driver's layout"
        );
        assert_eq!(pod_cgroup(&root, "ffff"), None);
        assert_eq!(uid_of_cgroup(&own).as_deref(), Some(uid));
        assert_eq!(uid_of_cgroup(&other).as_deref(), Some("0000"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
