//! The real `tollgate` agent on Debian 12's stock 6.1 kernel, the kernel most users still
//! run: no TCX, so TC programs go on a `clsact` qdisc.
//!
//! The test boots that kernel (the `linux-image-amd64` package) in qemu with software
//! emulation (the machines' KVM runs only specially built guests) from a throwaway initramfs:
//! busybox, the `tollgate` binary under test, iproute2 and bpftool with their libraries, and
//! the kernel's modules for veth and clsact. The guest (`tests/vm/init.sh`) runs `tollgate
//! selftest` (every program through the 6.1 verifier), builds a node with two pods, starts
//! `tollgate run --detach-on-exit` on `tests/vm/cluster.yaml` (web attached on clsact by its
//! route, client on its cgroup found from its UID), sends allowed and denied pings and a
//! probe from the node's address, prints `tollgate status`,
//! stops the agent and checks that nothing of it is left in the kernel. The guest prints its
//! findings between marker lines on the serial console; this side decides on them, since
//! qemu exits 0 whatever the guest did. Every failure message carries the console.
//!
//! Missing qemu, kernel or busybox is a failure that names the package, never a skip.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::{packets, tollgate_bin},
    support::temp_dir,
};

const INIT: &str = include_str!("../vm/init.sh");
const CLUSTER: &str = include_str!("../vm/cluster.yaml");
/// veth for the pods, sch_ingress for the clsact qdisc, cls_bpf and act_bpf for the filters;
/// their dependencies come from `modules.dep`.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf", "act_bpf"];
/// Host binaries the guest runs, with their shared libraries (busybox's applets `ip` and
/// `tc` cannot attach BPF filters).
const GUEST_TOOLS: &[&str] = &["/usr/sbin/ip", "/usr/sbin/tc", "/usr/sbin/bpftool"];
const BUSYBOX: &str = "/bin/busybox";
/// About 17 s measured (init at 2-3 s); CI machines are shared, and emulation suffers most.
const TIMEOUT: Duration = Duration::from_secs(180);
const INSTALL: &str = "apt-get install --no-install-recommends qemu-system-x86 \
                       linux-image-amd64 busybox-static cpio kmod xz-utils binutils (`cargo xtask test` does)";

#[test]
fn the_agent_runs_on_the_stock_6_1_kernel_with_clsact_and_cgroup_attachments() {
    for program in ["qemu-system-x86_64", "cpio", "ldd", "strip"] {
        assert!(on_path(program), "{program} is missing: {INSTALL}");
    }
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: {INSTALL}"
    );
    for tool in GUEST_TOOLS {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install iproute2 bpftool (`cargo xtask test` does)"
        );
    }
    let (vmlinuz, modules) = kernel_6_1();
    let scratch = temp_dir("old-kernel-vm");
    let initrd = build_initramfs(&scratch, &modules);

    let started = Instant::now();
    let console = boot(&scratch, &vmlinuz, &initrd);
    let elapsed = started.elapsed();
    eprintln!("old kernel VM: {elapsed:.1?} from qemu start to power off");
    let vm = Console(console);

    let result = vm.marker("TOLLGATE-VM-RESULT");
    assert!(
        result == Some("ok"),
        "the guest reported {result:?}, not \"ok\"; its console:\n{}",
        vm.0
    );
    let kernel = vm.marker("TOLLGATE-VM-KERNEL").unwrap_or_default();
    vm.check(
        kernel.starts_with("6.1."),
        &format!("the guest runs a 6.1 kernel ({kernel})"),
    );

    // Every program passed this verifier, and the agent knows it must use clsact here.
    let selftest = vm.section("selftest");
    vm.check(
        selftest.contains("programs loaded and verified:"),
        "selftest loaded and verified the programs",
    );
    vm.check(
        selftest.contains("tc attach: clsact"),
        "selftest chose clsact on a kernel without TCX",
    );

    let status: serde_json::Value = serde_json::from_str(vm.section("status"))
        .unwrap_or_else(|e| panic!("status section is not JSON: {e}\n{}", vm.0));
    let workload = |pod: &str| {
        status["workloads"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["pod"] == pod))
            .unwrap_or_else(|| panic!("no workload {pod} in the status\n{}", vm.0))
            .clone()
    };
    let web = workload("web-0");
    let client = workload("client-0");
    let attach = |w: &serde_json::Value| (w["attach"].clone(), w["attached_at"].clone());
    vm.check_eq(
        attach(&web),
        ("clsact".into(), "hweb".into()),
        "web's attach",
    );
    vm.check_eq(
        attach(&client),
        (
            "cgroup".into(),
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7467c11e_0000_4000_8000_000000000001.slice".into(),
        ),
        "client's attach",
    );
    vm.check_eq(web["mode"].clone(), "drop".into(), "web's mode");
    vm.check_eq(client["mode"].clone(), "log".into(), "client's mode");

    // web: 3 answered pings from the client and 4 from the node (always allowed, even in drop
    // mode); 4 pings from the intruder dropped at its ingress.
    vm.check_eq(packets(&web), [7, 0, 4, 7, 0, 0], "web's packets");
    // client: 3 pings to web and 2 to the node out, their replies in; 2 pings to the
    // intruder that its egress policy denies, passed in log mode, replies included.
    vm.check_eq(packets(&client), [5, 2, 0, 5, 2, 0], "client's packets");

    // The flow log: each dropped packet, and the would-drop flow once.
    let flows: Vec<serde_json::Value> = vm
        .section("flow-log")
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("flow log line {l:?} is not JSON: {e}\n{}", vm.0))
        })
        .collect();
    let records = |verdict: &str, direction: &str, src: &str, dst: &str| {
        flows
            .iter()
            .filter(|f| {
                f["verdict"] == verdict
                    && f["direction"] == direction
                    && f["src_ip"] == src
                    && f["dst_ip"] == dst
            })
            .count()
    };
    vm.check_eq(
        records("dropped", "ingress", "10.1.0.12", "10.1.0.10"),
        4,
        "flow log records of the intruder's dropped pings",
    );
    vm.check_eq(
        records("would_drop", "egress", "10.1.0.11", "10.1.0.12"),
        1,
        "flow log records of the client's would-drop flow",
    );
    vm.check_eq(flows.len(), 5, "flow log records");

    // Attached as the kernel's own tools see it (the guest found none of it after the stop).
    let attached = vm.section("attached");
    for needle in [
        "name tc_from_pod",
        "name tc_to_pod",
        "name cg_ingress",
        "name cg_egress",
        "direct-action",
        "cgroup_inet_ingress",
        "cgroup_inet_egress",
    ] {
        vm.check(
            attached.contains(needle),
            &format!("bpftool or tc shows {needle:?} while the agent runs"),
        );
    }

    let log = vm.section("agent-log");
    for needle in [
        "attached namespace=shop pod=web-0 slot=",
        "attach=\"clsact\"",
        "attached namespace=clients pod=client-0 slot=",
        "attach=\"cgroup\"",
        "--detach-on-exit: programs detached, pins removed",
    ] {
        vm.check(log.contains(needle), &format!("agent log has {needle:?}"));
    }
}

/// The guest's serial console, with the checks that print it when they fail.
struct Console(String);

impl Console {
    /// The rest of the first line with `name`, which may follow the firmware's screen
    /// escapes on the guest's first line.
    fn marker(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name} ");
        self.0
            .lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest.trim_end()))
    }

    /// What the guest printed between `TOLLGATE-VM-BEGIN name` and `TOLLGATE-VM-END name`.
    fn section(&self, name: &str) -> &str {
        let begin = format!("TOLLGATE-VM-BEGIN {name}\n");
        let end = format!("TOLLGATE-VM-END {name}\n");
        let start = self
            .0
            .find(&begin)
            .unwrap_or_else(|| panic!("no section {name} on the console\n{}", self.0))
            + begin.len();
        let len = self.0[start..]
            .find(&end)
            .unwrap_or_else(|| panic!("section {name} does not end\n{}", self.0));
        &self.0[start..start + len]
    }

    fn check(&self, ok: bool, what: &str) {
        assert!(ok, "{what}: no\n{}", self.0);
    }

    fn check_eq<T: PartialEq + std::fmt::Debug>(&self, got: T, want: T, what: &str) {
        assert!(
            got == want,
            "{what}: got {got:?}, want {want:?}\n{}",
            self.0
        );
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// The newest installed 6.1 kernel and its modules directory.
fn kernel_6_1() -> (PathBuf, PathBuf) {
    let mut versions: Vec<String> = fs::read_dir("/boot")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let version = name.strip_prefix("vmlinuz-")?;
                    (version.starts_with("6.1.")
                        && Path::new("/lib/modules").join(version).is_dir())
                    .then(|| version.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    // 6.1.0-9 before 6.1.0-56: compare the numbers, not the text.
    versions.sort_by_key(|v| {
        v.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    let version = versions
        .pop()
        .unwrap_or_else(|| panic!("no 6.1 kernel with modules in /boot: {INSTALL}"));
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{version}"));
    // Debian installs it 0600: qemu would fail later with a less helpful message.
    if let Err(e) = fs::File::open(&vmlinuz) {
        panic!("read {}: {e} (run as root)", vmlinuz.display());
    }
    (vmlinuz, Path::new("/lib/modules").join(version))
}

/// Writes the initramfs tree under `dir/root` and packs it as `dir/initrd.cpio`.
fn build_initramfs(dir: &Path, modules: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in [
        "bin",
        "usr/bin",
        "usr/sbin",
        "etc/tollgate",
        "lib/modules",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    write_executable(&root.join("init"), INIT);
    fs::write(root.join("etc/tollgate/cluster.yaml"), CLUSTER).unwrap();
    copy_binary(&root, Path::new(BUSYBOX), Path::new(BUSYBOX));
    copy_binary(
        &root,
        Path::new(tollgate_bin()),
        Path::new("/usr/bin/tollgate"),
    );
    // A debug build's symbols are most of its 300 MB: the initramfs is unpacked into the
    // guest's memory (1 GiB), where they do not fit beside everything else.
    let out = Command::new("strip")
        .arg("--strip-debug")
        .arg(root.join("usr/bin/tollgate"))
        .output()
        .expect("run strip (binutils)");
    assert!(
        out.status.success(),
        "strip the guest's tollgate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for tool in GUEST_TOOLS {
        copy_binary(&root, Path::new(tool), Path::new(tool));
    }

    let order = module_load_order(modules);
    for (name, file) in &order {
        let out = root.join("lib/modules").join(format!("{name}.ko"));
        copy_module(&modules.join(file), &out);
    }
    let names: Vec<String> = order.iter().map(|(n, _)| format!("{n}.ko\n")).collect();
    fs::write(root.join("lib/modules/load-order"), names.concat()).unwrap();

    let initrd = dir.join("initrd.cpio");
    let out = Command::new("sh")
        .args(["-c", "find . | cpio -o -H newc --quiet > ../initrd.cpio"])
        .current_dir(&root)
        .output()
        .expect("run find | cpio");
    assert!(
        out.status.success(),
        "pack the initramfs with cpio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    initrd
}

fn write_executable(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Copies `src` to `dst` inside `root`, with every shared library `ldd` lists at its own path.
fn copy_binary(root: &Path, src: &Path, dst: &Path) {
    copy_into(root, src, dst);
    let out = Command::new("ldd").arg(src).output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary (busybox-static): nothing to add.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("not a dynamic executable") || stderr.contains("not a dynamic"),
            "ldd {}: {stderr}",
            src.display()
        );
        return;
    }
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2
    // (0x...)`; linux-vdso has no path.
    for lib in text.lines().filter_map(|l| {
        l.split_whitespace()
            .find(|t| t.starts_with('/'))
            .map(Path::new)
    }) {
        copy_into(root, lib, lib);
    }
}

/// Copies the file behind `src` (symlinks followed) to the absolute path `dst` inside `root`.
fn copy_into(root: &Path, src: &Path, dst: &Path) {
    let target = root.join(dst.strip_prefix("/").expect("absolute path"));
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::copy(src, &target)
        .unwrap_or_else(|e| panic!("copy {} into the initramfs: {e}", src.display()));
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
}

/// `MODULES` and what they depend on, dependencies first: (name, path under `modules`).
fn module_load_order(modules: &Path) -> Vec<(String, String)> {
    let dep_file = modules.join("modules.dep");
    let text = fs::read_to_string(&dep_file)
        .unwrap_or_else(|e| panic!("read {}: {e}: {INSTALL}", dep_file.display()));
    // `kernel/net/sched/cls_bpf.ko: dep.ko ...`; modules may be .ko, .ko.xz, .ko.zst.
    let name_of = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let deps: ModuleDeps = text
        .lines()
        .filter_map(|l| {
            let (module, deps) = l.split_once(':')?;
            Some((
                name_of(module),
                (
                    module.to_string(),
                    deps.split_whitespace().map(name_of).collect(),
                ),
            ))
        })
        .collect();
    let mut order = Vec::new();
    for m in MODULES {
        add_module(m, &deps, &mut order, &dep_file);
    }
    order
}

/// Module name to (path in the modules directory, names of the modules it needs).
type ModuleDeps = std::collections::BTreeMap<String, (String, Vec<String>)>;

/// Appends `name` to `order` after what it needs, once.
fn add_module(name: &str, deps: &ModuleDeps, order: &mut Vec<(String, String)>, dep_file: &Path) {
    if order.iter().any(|(n, _)| n == name) {
        return;
    }
    let (path, needs) = deps.get(name).unwrap_or_else(|| {
        panic!(
            "module {name} is not in {}: built in, or renamed?",
            dep_file.display()
        )
    });
    for dep in needs {
        add_module(dep, deps, order, dep_file);
    }
    order.push((name.to_string(), path.clone()));
}

/// Copies a kernel module, decompressed: busybox's insmod reads plain .ko files only.
fn copy_module(src: &Path, dst: &Path) {
    let name = src.to_string_lossy();
    if name.ends_with(".ko") {
        fs::copy(src, dst).unwrap_or_else(|e| panic!("copy {name}: {e}"));
        return;
    }
    let (tool, package) = if name.ends_with(".xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".zst") {
        ("zstd", "zstd")
    } else {
        panic!("unknown module compression: {name}")
    };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("run {tool} for {name}: {e} (apt-get install {package})"));
    assert!(
        out.status.success(),
        "{tool} -dc {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(dst, out.stdout).unwrap();
}

/// Boots the kernel on the initramfs until the guest powers off (or `TIMEOUT`), and returns
/// the serial console, cleaned of carriage returns and terminal escapes.
fn boot(dir: &Path, vmlinuz: &Path, initrd: &Path) -> String {
    let console_path = dir.join("console.log");
    let stderr_path = dir.join("qemu.stderr");
    let mut qemu = Command::new("qemu-system-x86_64")
        // The machines' /dev/kvm runs only specially built guests: a stock kernel hangs.
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1G", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1: a guest that dies reboots at once, and -no-reboot turns that into an exit.
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&console_path).unwrap())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("start qemu-system-x86_64: {e}: {INSTALL}"));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = qemu.try_wait().expect("wait for qemu") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut raw = Vec::new();
    fs::File::open(&console_path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .expect("read the console");
    let console: String = String::from_utf8_lossy(&raw)
        .chars()
        .filter(|&c| c != '\r' && c != '\u{1b}')
        .collect();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => console,
        Some(s) => panic!("qemu failed: {s}\n{stderr}\nconsole:\n{console}"),
        None => {
            panic!("the VM did not power off within {TIMEOUT:?}\n{stderr}\nconsole:\n{console}")
        }
    }
}
