//! Test harness: "pods" as network namespaces behind a "node" namespace of their own, with
//! veth pairs, IPv4 and IPv6 addresses, static neighbours and a cgroup v2 directory each.
//!
//! Layout (the routed layout of Calico): the node namespace has `169.254.1.1/32` on `lo` and
//! forwards; each pod has its addresses as /32 and /128 on `eth0`, a default route via
//! 169.254.1.1 (IPv6: fe80::1) and static neighbour entries, so no ARP or ND ever runs and
//! packet counts are exact. Nothing touches the machine's own network: all traffic stays in
//! namespaces the lab created, and dropping the lab removes them, its cgroups and pins, also
//! when a test panics.

pub mod agent;
pub mod apiserver;
pub mod bench_control;
pub mod bench_dns;
pub mod bench_net;
pub mod cluster;
pub mod conformance;
pub mod deploy;
pub mod frames;
pub mod kube_proxy;
pub mod packets;
pub mod support;
pub mod traffic;

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tollgate::{Datapath, DatapathOptions, attach::TcMode};

/// Where test cgroups live (cgroup v2; hybrid hosts mount it at .../unified).
pub fn cgroup2_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.into()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// Path of a binary built beside the running test or lab binary (`target/<profile>/NAME`),
/// unless the environment variable `env` names another one. `hint` says how to build it.
pub fn sibling_binary(name: &str, env: &str, hint: &str) -> String {
    if let Ok(p) = std::env::var(env) {
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir: PathBuf = exe.parent().expect("exe dir").into();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: {hint}", path.display());
    path.to_string_lossy().into_owned()
}

/// Prefix of everything the tests create, so `xtask test` can sweep leftovers of a killed run.
pub const PREFIX: &str = "tgt";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// A network namespace that is the current thread's until the guard drops.
pub struct NetNsGuard {
    original: fs::File,
}

impl NetNsGuard {
    /// Moves the calling thread into the named namespace.
    pub fn enter(name: &str) -> NetNsGuard {
        let original = fs::File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = fs::File::open(format!("/run/netns/{name}")).expect("open netns");
        // SAFETY: valid namespace fd.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
        NetNsGuard { original }
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        // SAFETY: valid namespace fd.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// One pod (or an outside peer): a namespace, its interface on the node and its cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    /// Host-side interface in the node namespace (empty for a host-network pod).
    pub host_if: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// cgroup v2 directory of the pod's processes: where the kubelet would put a BestEffort
    /// pod of `uid` (systemd driver) under the lab's cgroup root.
    pub cgroup: PathBuf,
    /// `metadata.uid` of the pod.
    pub uid: String,
}

/// The cgroup directory the kubelet (systemd cgroup driver) gives a BestEffort pod of `uid`
/// under the cgroup v2 `root`.
pub fn kubepods_cgroup(root: &Path, uid: &str) -> PathBuf {
    root.join("kubepods.slice")
        .join("kubepods-besteffort.slice")
        .join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
}

/// Removes a cgroup directory and its empty parents up to (and excluding) `stop`.
fn remove_cgroup_up_to(dir: &Path, stop: &Path) {
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d == stop || fs::remove_dir(d).is_err() {
            break;
        }
        cur = d.parent();
    }
}

impl Pod {
    /// A command that runs inside the pod: in its network namespace and its cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let netns = fs::File::open(format!("/run/netns/{}", self.netns)).expect("open pod netns");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (setns, write) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = (&netns, &procs);
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process: sockets it opens belong to the cgroup.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Both addresses of the pod (IPv4, IPv6): what it may send from.
    pub fn addrs(&self) -> Vec<IpAddr> {
        vec![IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)]
    }

    /// The pod's address of a family.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
}

/// Host-side veth statistics: rx = packets from the pod, tx = packets to the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// One test's world: a node namespace, pods, their servers, the datapath's pins.
pub struct Lab {
    pub id: String,
    pub node: String,
    pub pods: Vec<Pod>,
    /// The lab's cgroup v2 root: pods' cgroups are in a kubepods hierarchy under it (pass it
    /// to the agent as `--cgroup-root`).
    pub cgroup_dir: PathBuf,
    pub pin_dir: PathBuf,
    children: Vec<Child>,
    /// Namespaces beyond the node and pods (the uplink's far side).
    extra_netns: Vec<String>,
    /// Host-network pods: processes in the node namespace, each in its own cgroup.
    host_pods: Vec<Pod>,
}

/// The lab node's uplink: an interface with the node's own address, leading to a namespace
/// that stands for the rest of the network (another node's address, routes back to the pods
/// through this node, nothing beyond).
#[derive(Clone, Debug)]
pub struct Uplink {
    pub iface: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// A process on the far side: another node, at 10.250.0.2 and fd77:250::2.
    pub far: Pod,
}

impl Lab {
    /// A fresh node namespace.
    pub fn new() -> Lab {
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let node = format!("{id}-node");
        let cgroup_dir = cgroup2_root().join(&id);
        let lab = Lab {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{id}")),
            id,
            node: node.clone(),
            pods: vec![],
            cgroup_dir: cgroup_dir.clone(),
            children: vec![],
            extra_netns: vec![],
            host_pods: vec![],
        };
        ip(&["netns", "add", &node]);
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        ip(&["-n", &node, "addr", "add", "169.254.1.1/32", "dev", "lo"]);
        for sysctl in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.addr_gen_mode=1",
            // MLD reports right away instead of over the next seconds: counts stay exact.
            "net.ipv6.conf.default.mldv2_unsolicited_report_interval=1",
            "net.ipv6.conf.default.mldv1_unsolicited_report_interval=1",
        ] {
            run("ip", &["netns", "exec", &node, "sysctl", "-qw", sysctl]);
        }
        fs::create_dir_all(&cgroup_dir).expect("create lab cgroup");
        lab
    }

    fn add_peer(&mut self, name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Pod {
        let index = self.pods.len() + 1;
        let netns = format!("{}-{name}", self.id);
        let host_if = format!("h{name}");
        let pod_mac = format!("02:74:67:00:00:{index:02x}");
        let host_mac = format!("02:74:67:ff:00:{index:02x}");
        let node = self.node.clone();
        ip(&["netns", "add", &netns]);
        for sysctl in [
            "net.ipv6.conf.default.addr_gen_mode=1",
            "net.ipv6.conf.all.accept_ra=0",
            "net.ipv6.conf.default.router_solicitations=0",
            "net.ipv4.ping_group_range=0 2147483647",
            "net.ipv6.conf.default.mldv2_unsolicited_report_interval=1",
            "net.ipv6.conf.default.mldv1_unsolicited_report_interval=1",
        ] {
            run("ip", &["netns", "exec", &netns, "sysctl", "-qw", sysctl]);
        }
        ip(&[
            "-n", &node, "link", "add", &host_if, "address", &host_mac, "type", "veth", "peer",
            "name", "eth0", "address", &pod_mac, "netns", &netns,
        ]);
        ip(&["-n", &node, "link", "set", &host_if, "addrgenmode", "none"]);
        ip(&["-n", &netns, "link", "set", "eth0", "addrgenmode", "none"]);
        ip(&["-n", &node, "link", "set", &host_if, "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        let (v4, v6) = (ipv4.to_string(), ipv6.to_string());
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{v4}/32"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{v6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n", &netns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ]);
        for gw in ["169.254.1.1", "fe80::1"] {
            ip(&[
                "-n",
                &netns,
                "neigh",
                "add",
                gw,
                "lladdr",
                &host_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
        }
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("{v4}/32"),
            "dev",
            &host_if,
        ]);
        ip(&[
            "-n",
            &node,
            "-6",
            "route",
            "add",
            &format!("{v6}/128"),
            "dev",
            &host_if,
        ]);
        for addr in [&v4, &v6] {
            ip(&[
                "-n",
                &node,
                "neigh",
                "add",
                addr,
                "lladdr",
                &pod_mac,
                "dev",
                &host_if,
                "nud",
                "permanent",
            ]);
        }
        let uid = self.uid_for(index);
        let cgroup = kubepods_cgroup(&self.cgroup_dir, &uid);
        fs::create_dir_all(&cgroup).expect("create pod cgroup");
        let pod = Pod {
            name: name.into(),
            netns,
            host_if,
            ipv4,
            ipv6,
            cgroup,
            uid,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// A pod UID unique to this lab and index (UUID-shaped, as Kubernetes makes them).
    fn uid_for(&self, index: usize) -> String {
        let digits: String = self.id.chars().filter(char::is_ascii_digit).collect();
        let n: u64 = digits.parse().unwrap_or(0);
        format!("74670000-0000-4000-8000-{:08x}{:04x}", n % (1 << 32), index)
    }

    /// A host-network pod: processes run in the node's network namespace (sharing its
    /// addresses) and in a cgroup of their own, found from the pod's UID.
    pub fn add_host_pod(&mut self, name: &str) -> Pod {
        let uid = self.uid_for(0x100 + self.host_pods.len());
        let cgroup = kubepods_cgroup(&self.cgroup_dir, &uid);
        self.in_node_namespace(name, cgroup, uid)
    }

    /// A process of the node namespace in `cgroup` (created here, removed with the lab).
    fn in_node_namespace(&mut self, name: &str, cgroup: PathBuf, uid: String) -> Pod {
        fs::create_dir_all(&cgroup).expect("create the process's cgroup");
        let pod = Pod {
            name: name.into(),
            netns: self.node.clone(),
            host_if: String::new(),
            ipv4: Ipv4Addr::new(169, 254, 1, 1),
            ipv6: Ipv6Addr::LOCALHOST,
            cgroup,
            uid,
        };
        self.host_pods.push(pod.clone());
        pod
    }

    /// A process of the node itself (a kubelet): in the node namespace, in a cgroup outside
    /// the kubepods hierarchy.
    pub fn node_process(&mut self, name: &str) -> Pod {
        let cgroup = self.cgroup_dir.join(name);
        self.in_node_namespace(name, cgroup, String::new())
    }

    /// The node's uplink `uplink`, holding the node address 10.250.0.1/24 and
    /// fd77:250::1/64; its far side is another node (10.250.0.2, fd77:250::2) that reaches the
    /// pods through this one.
    pub fn add_uplink(&mut self) -> Uplink {
        let wan = format!("{}-wan", self.id);
        ip(&["netns", "add", &wan]);
        ip(&[
            "-n", &self.node, "link", "add", "uplink", "type", "veth", "peer", "name", "eth0",
            "netns", &wan,
        ]);
        self.extra_netns.push(wan.clone());
        ip(&["-n", &self.node, "link", "set", "uplink", "up"]);
        ip(&["-n", &wan, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &self.node,
            "addr",
            "add",
            "10.250.0.1/24",
            "dev",
            "uplink",
        ]);
        ip(&[
            "-n",
            &self.node,
            "addr",
            "add",
            "fd77:250::1/64",
            "dev",
            "uplink",
            "nodad",
        ]);
        ip(&["-n", &wan, "link", "set", "lo", "up"]);
        ip(&["-n", &wan, "addr", "add", "10.250.0.2/24", "dev", "eth0"]);
        ip(&[
            "-n",
            &wan,
            "addr",
            "add",
            "fd77:250::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&[
            "-n",
            &wan,
            "route",
            "add",
            "10.1.0.0/16",
            "via",
            "10.250.0.1",
        ]);
        ip(&[
            "-n",
            &wan,
            "-6",
            "route",
            "add",
            "fd77:1::/64",
            "via",
            "fd77:250::1",
        ]);
        let cgroup = self.cgroup_dir.join("wan");
        fs::create_dir_all(&cgroup).expect("create far side cgroup");
        let far = Pod {
            name: "wan".into(),
            netns: wan,
            host_if: String::new(),
            ipv4: Ipv4Addr::new(10, 250, 0, 2),
            ipv6: "fd77:250::2".parse().expect("literal"),
            cgroup,
            uid: String::new(),
        };
        self.host_pods.push(far.clone());
        Uplink {
            iface: "uplink".into(),
            ipv4: Ipv4Addr::new(10, 250, 0, 1),
            ipv6: "fd77:250::1".parse().expect("literal"),
            far,
        }
    }

    /// A pod of the cluster: 10.1.0.N and fd77:1::N.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        let n = self.pods.len() as u8 + 10;
        self.add_peer(
            name,
            Ipv4Addr::new(10, 1, 0, n),
            Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, n as u16),
        )
    }

    /// A peer outside the cluster: 203.0.113.N and 2001:db8::N.
    pub fn add_outside(&mut self, name: &str) -> Pod {
        let n = self.pods.len() as u8 + 10;
        self.add_peer(
            name,
            Ipv4Addr::new(203, 0, 113, n),
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n as u16),
        )
    }

    /// Loads a datapath with pins under this lab's bpffs directory.
    pub fn datapath(&self, tc_mode: TcMode) -> Datapath {
        let mut options = DatapathOptions::new(&self.pin_dir);
        options.tc_mode = tc_mode;
        options.conntrack_capacity = 65536;
        Datapath::load(options).unwrap_or_else(|e| panic!("load datapath: {}", chain(&e)))
    }

    /// Runs `f` with the calling thread in the node namespace (attach needs it).
    pub fn in_node<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = NetNsGuard::enter(&self.node);
        f()
    }

    /// Starts a long-running process inside a pod; it is killed when the lab drops. Waits
    /// for its first line on stdout ("ready").
    pub fn spawn_ready(&mut self, pod: &Pod, program: &str, args: &[&str]) {
        let mut child = pod
            .command(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} in {}: {e}", pod.name));
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready line");
        assert_eq!(
            line.trim(),
            "ready",
            "{program} in {} did not start",
            pod.name
        );
        self.children.push(child);
    }

    /// Starts a long-running process inside a pod without waiting for it; killed when the lab
    /// drops.
    pub fn spawn_background(&mut self, pod: &Pod, program: &str, args: &[&str]) {
        let child = pod
            .command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} in {}: {e}", pod.name));
        self.children.push(child);
    }

    /// Starts dnsmasq in a pod as a DNS server on its IPv4 address, answering only from
    /// `records` (dnsmasq options such as `--host-record=NAME,IP,TTL`), nothing upstream.
    pub fn spawn_dnsmasq(&mut self, pod: &Pod, records: &[String]) {
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--conf-file=/dev/null".into(),
            "--user=root".into(),
            format!("--listen-address={}", pod.ipv4),
            "--bind-interfaces".into(),
            "--pid-file=".into(),
        ];
        args.extend(records.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn_background(pod, "dnsmasq", &args);
    }

    /// Starts the traffic helper's echo servers in a pod.
    pub fn serve(&mut self, pod: &Pod, tcp: &[u16], udp: &[u16]) {
        let mut args: Vec<String> = vec!["serve".into()];
        for p in tcp {
            args.extend(["--tcp".into(), p.to_string()]);
        }
        for p in udp {
            args.extend(["--udp".into(), p.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn_ready(pod, traffic::helper(), &args);
    }

    /// Host-side interface statistics of a pod, read from the node namespace.
    pub fn link_stats(&self, pod: &Pod) -> LinkStats {
        let out = ip(&[
            "-n",
            &self.node,
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            &pod.host_if,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        let stats = &v[0]["stats64"];
        LinkStats {
            rx_packets: stats["rx"]["packets"].as_u64().expect("rx packets"),
            tx_packets: stats["tx"]["packets"].as_u64().expect("tx packets"),
        }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .status();
        }
        for pod in self.pods.iter().chain(&self.host_pods) {
            // Child cgroups a test made (containers) first.
            if let Ok(children) = fs::read_dir(&pod.cgroup) {
                for child in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = fs::remove_dir(child.path());
                }
            }
            remove_cgroup_up_to(&pod.cgroup, &self.cgroup_dir);
        }
        for ns in self.extra_netns.iter().chain([&self.node]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = fs::remove_dir(&self.cgroup_dir);
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// An error with its sources, one per line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!("\n  caused by: {s}"));
        source = s.source();
    }
    out
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
