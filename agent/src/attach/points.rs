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
#[derive(Hash)]
pub struct NodeNetwork {
    links: BTreeMap<String, netlink::Link>,
    /// Addresses by interface index.
    addresses: BTreeMap<u32, Vec<IpAddr>>,
    /// Host routes (/32, /128, no gateway): address to device. Looked up once per pod of the
    /// cluster each reconcile, so a map rather than a walk of the route table.
    host_routes: BTreeMap<IpAddr, String>,
    /// Devices carrying a default route.
    uplinks: BTreeSet<String>,
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
        let routes = RouteTables::read();
        Ok(NodeNetwork {
            links,
            addresses,
            host_routes: routes.host_routes(),
            uplinks: routes
                .default_route_interfaces()
                .into_iter()
                .map(str::to_string)
                .collect(),
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
        if self.uplinks.contains(iface) {
            return Some(format!("{iface} carries the node's default route"));
        }
        None
    }

    /// The pod's own device: the one holding the node's host route to one of `ips`.
    pub fn pod_interface(&self, ips: &[IpAddr]) -> Option<String> {
        ips.iter()
            .filter_map(|ip| self.host_routes.get(ip))
            .find(|iface| self.unfit(iface).is_none())
            .cloned()
    }

    /// Checks a claimed device (`tollgate.io/interface`) against the pod's addresses.
    pub fn check_interface(&self, iface: &str, ips: &[IpAddr]) -> Result<(), String> {
        if let Some(why) = self.unfit(iface) {
            return Err(why);
        }
        if self.routes_to(iface, ips) {
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

    /// Whether the node's host route to one of `ips` leaves through `iface` (whose it is).
    pub fn routes_to(&self, iface: &str, ips: &[IpAddr]) -> bool {
        ips.iter()
            .any(|ip| self.host_routes.get(ip).is_some_and(|i| i == iface))
    }
}

/// Whether a UID is plausible (Kubernetes UIDs are UUIDs): nothing that could walk paths.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
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

/// The pod directories of the kubepods hierarchy under a cgroup v2 root, by pod UID: the
/// systemd driver's `kubepods.slice/[kubepods-QOS.slice/]kubepods[-QOS]-pod<uid_>.slice`
/// and the cgroupfs driver's `kubepods/[QOS/]pod<uid>`. One walk of at most two levels per
/// reconcile, instead of path lookups for each of the cluster's pods; symbolic links are
/// never followed, so nothing outside the hierarchy can pose as a pod's directory.
#[derive(Clone, Debug, Default)]
pub struct PodCgroups {
    root: PathBuf,
    by_uid: BTreeMap<String, PathBuf>,
}

/// By the paths' bytes: every reconcile hashes the scan (the node's fingerprint), and a
/// `Path` hashes component by component, a byte at a time. Equal scans give equal bytes.
impl std::hash::Hash for PodCgroups {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.root.as_os_str().as_encoded_bytes().hash(state);
        for (uid, path) in &self.by_uid {
            uid.hash(state);
            path.as_os_str().as_encoded_bytes().hash(state);
        }
    }
}

impl PodCgroups {
    /// Reads the hierarchy under `root` (canonicalised).
    pub fn scan(root: &Path) -> PodCgroups {
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        let mut by_uid = BTreeMap::new();
        let dirs = |dir: &Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .collect()
        };
        // (hierarchy, its QoS levels): a pod's directory is one of the hierarchy's or of a
        // QoS level's, named for its UID as `pod_dir_name` says (checked by name, at the
        // level it was found: no paths built per directory).
        for (base, qos_dirs) in [
            (
                KUBEPODS_SLICE,
                ["kubepods-burstable.slice", "kubepods-besteffort.slice"],
            ),
            (KUBEPODS, ["burstable", "besteffort"]),
        ] {
            for (name, path) in dirs(&root.join(base)) {
                let (qos, level) = if qos_dirs.contains(&name.as_str()) {
                    (Some(name.as_str()), dirs(&path))
                } else {
                    (None, vec![(name.clone(), path)])
                };
                for (dir_name, pod_dir) in level {
                    if let Some(uid) = uid_of_cgroup(&pod_dir).filter(|u| valid_uid(u))
                        && pod_dir_name(base, qos, &uid) == dir_name
                    {
                        by_uid.insert(uid, pod_dir);
                    }
                }
            }
        }
        PodCgroups { root, by_uid }
    }

    /// The pod's own cgroup directory, if the hierarchy has one for its UID.
    pub fn get(&self, uid: &str) -> Option<&PathBuf> {
        self.by_uid.get(uid)
    }

    /// Checks a claimed cgroup directory (`tollgate.io/cgroup`, absolute or relative to the
    /// root): it must be the pod's own, the one its UID names.
    pub fn check(&self, claimed: &str, uid: &str) -> Result<PathBuf, String> {
        let path = Path::new(claimed);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.root.join(path)
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
        match self.get(uid) {
            Some(own) if *own == canonical => Ok(own.clone()),
            Some(own) => Err(format!(
                "cgroup {} is not the pod's own cgroup directory ({})",
                canonical.display(),
                own.display()
            )),
            None => Err(format!(
                "cgroup {} is not the pod's own cgroup directory (none named for uid {uid} under {}/kubepods*)",
                canonical.display(),
                self.root.display()
            )),
        }
    }
}

/// The systemd driver's hierarchy and the cgroupfs driver's, under the cgroup v2 root.
const KUBEPODS_SLICE: &str = "kubepods.slice";
const KUBEPODS: &str = "kubepods";

/// The name of the cgroup v2 directory of a pod of `uid` in hierarchy `base`, directly
/// (`qos` none: guaranteed) or in a QoS level's directory: for the systemd driver
/// `kubepods-pod<uid_>.slice` or `kubepods-<qos>-pod<uid_>.slice` (dashes of the UID as
/// underscores), for the cgroupfs driver `pod<uid>`.
fn pod_dir_name(base: &str, qos: Option<&str>, uid: &str) -> String {
    if base == KUBEPODS {
        return format!("pod{uid}");
    }
    let u = uid.replace('-', "_");
    match qos.and_then(|q| q.strip_suffix(".slice")) {
        Some(level) => format!("{level}-pod{u}.slice"),
        None => format!("kubepods-pod{u}.slice"),
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
        // Symbolic links are not followed: this one does not make `elsewhere` a pod's.
        std::os::unix::fs::symlink(root.join("elsewhere"), root.join("kubepods/podffff")).unwrap();
        let cgroups = PodCgroups::scan(&root);
        let canonical_own = own.canonicalize().unwrap();
        assert_eq!(cgroups.get(uid), Some(&canonical_own));
        assert_eq!(
            cgroups.check(own.to_str().unwrap(), uid),
            Ok(canonical_own.clone())
        );
        let relative = own
            .strip_prefix(&root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(cgroups.check(&relative, uid), Ok(canonical_own));
        for claim in [
            other.to_str().unwrap().to_string(),
            root.join("kubepods.slice").to_str().unwrap().to_string(),
            root.join("elsewhere").to_str().unwrap().to_string(),
            format!("{}/../../elsewhere", own.display()),
        ] {
            assert!(cgroups.check(&claim, uid).is_err(), "{claim}");
        }
        assert!(cgroups.check(own.to_str().unwrap(), "../../x").is_err());
        assert_eq!(
            cgroups.get("0000"),
            Some(&other.canonicalize().unwrap()),
            "the cgroupfs driver's layout"
        );
        assert_eq!(cgroups.get("ffff"), None, "a symbolic link");
        // A guaranteed pod (no QoS level) of the systemd driver; a pod's name at a level it
        // cannot be at is not a pod's directory.
        let guaranteed = root.join("kubepods.slice/kubepods-poda1.slice");
        let misplaced = [
            root.join("kubepods.slice/kubepods-burstable-podb2.slice"),
            root.join("kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-podc3.slice"),
            root.join("kubepods.slice/podd4"),
            root.join("kubepods/kubepods-pode5.slice"),
        ];
        for dir in misplaced.iter().chain([&guaranteed]) {
            std::fs::create_dir_all(dir).unwrap();
        }
        let cgroups = PodCgroups::scan(&root);
        assert_eq!(cgroups.get("a1"), Some(&guaranteed.canonicalize().unwrap()));
        for uid in ["b2", "c3", "d4", "e5"] {
            assert_eq!(cgroups.get(uid), None, "{uid}");
        }
        assert_eq!(uid_of_cgroup(&own).as_deref(), Some(uid));
        assert_eq!(uid_of_cgroup(&other).as_deref(), Some("0000"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
