//! Project chores, one subcommand each: `cargo xtask setup | build | test | bench | demo`.
//!
//! Every task that needs the toolchain or system packages runs `setup` first, which installs
//! only what is missing, so each command works on a fresh Debian 12 machine (as root) and is
//! quick on a prepared one.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tollgate's build, test, benchmark and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src for nightly,
    /// bpf-linker 0.13 against LLVM 22) and mount bpffs. Skips what is already there.
    Setup,
    /// Build the `tollgate` binary (release), with the eBPF object embedded.
    Build,
    /// Run the whole test suite: unit tests and the end-to-end tests on real eBPF and real
    /// traffic. Needs root; fails (never skips) without it.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks and write docs/benchmarks.md and docs/benchmarks.json.
    Bench {
        /// Repetitions per measurement.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Only these sections: datapath, control, net (default: all three).
        #[arg(long)]
        only: Vec<String>,
    },
    /// The local demo: network-namespace workloads of a small bank, a sample policy set,
    /// would-drops in log mode, then the ledger flipped to drop. Cleans up after itself.
    Demo,
}

/// Debian packages: to build (bpf-linker against LLVM 22), and to test and benchmark.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "iputils-ping",
    "procps",
    "util-linux",
    "prometheus",
    // kube-proxy's own rules in the lab's node namespace (Services, hairpin masquerade).
    "iptables",
    // `tollgate graph -o svg` renders with graphviz's dot.
    "graphviz",
    // The lab's cluster DNS for EgressAllowlist tests.
    "dnsmasq-base",
];
const BENCH_PACKAGES: &[&str] = &["iperf3", "sockperf", "iptables", "nftables"];
/// The old-kernel test (`tests/tests/old_kernel.rs`): Debian's 6.1 kernel booted in qemu from
/// an initramfs of busybox and the host's binaries (modules may be xz-compressed).
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "linux-image-amd64",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    // `strip`: the guest's copy of the debug build without its symbols.
    "binutils",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            cargo(&root, &["build", "--release", "--package", "tollgate"])
        }
        Task::Test { args } => {
            require_root("the end-to-end tests load eBPF programs and create network namespaces")?;
            setup()?;
            apt_install(VM_PACKAGES.iter())?;
            sweep_leftovers();
            // The end-to-end tests run the `tollgate` binary itself.
            cargo(&root, &["build", "--package", "tollgate", "--bins"])?;
            // Default members: everything but the kernel crate, which only builds for BPF.
            let mut cmd = vec!["test", "--no-fail-fast"];
            cmd.extend(args.iter().map(String::as_str));
            cargo(&root, &cmd)
        }
        Task::Bench { runs, only } => {
            require_root("benchmarks load eBPF programs")?;
            setup()?;
            apt_install(BENCH_PACKAGES.iter())?;
            let runs = runs.to_string();
            // The control-plane and traffic benchmarks run `tollgate` itself.
            build_release_binaries(&root)?;
            let bench = root.join("target/release/tg-bench");
            let out = root.join("docs");
            let mut bench_args = vec!["--runs", &runs, "--out", out.to_str().expect("utf-8 path")];
            for section in &only {
                bench_args.extend(["--only", section.as_str()]);
            }
            sh(bench.to_str().expect("utf-8 path"), &bench_args)
        }
        Task::Demo => {
            require_root("the demo loads eBPF programs and creates network namespaces")?;
            setup()?;
            sweep_leftovers();
            // The demo runs `tollgate` itself, and the traffic helper inside the pods.
            build_release_binaries(&root)?;
            sh(
                root.join("target/release/tg-demo")
                    .to_str()
                    .expect("utf-8 path"),
                &[],
            )
        }
    }
}

/// `tollgate` and the lab's binaries (traffic helper, demo, benchmark), release builds.
fn build_release_binaries(root: &Path) -> Result<()> {
    for package in ["tollgate", "tollgate-tests"] {
        cargo(
            root,
            &[
                "build",
                "--quiet",
                "--release",
                "--package",
                package,
                "--bins",
            ],
        )?;
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: no arguments.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn sh(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> Result<()> {
    apt_install(BUILD_PACKAGES.iter().chain(TEST_PACKAGES))?;
    nightly_rust_src()?;
    bpf_linker()?;
    mount_bpffs()?;
    Ok(())
}

fn apt_install<'a>(packages: impl Iterator<Item = &'a &'a str>) -> Result<()> {
    let missing: Vec<&str> = packages
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("installing {}", missing.join(" ")))?;
    eprintln!("setup: installing {}", missing.join(" "));
    sh("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let installed = output("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain");
        sh(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let components = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        sh(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new(env!("CARGO"))
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", path)
        .status()
        .context("cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    require_root("mounting bpffs")?;
    sh("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
}

/// Removes a cgroup directory tree: leaves first, each only once empty (cgroupfs refuses to
/// remove a directory that still has children or processes).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten().filter(|c| c.path().is_dir()) {
            remove_cgroup_tree(&child.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Namespaces, cgroups and pins that a killed test run left behind (all named `tgt*`).
fn sweep_leftovers() {
    if let Some(list) = output("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with("tgt") || name.starts_with("tgdemo") {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    for root in ["/sys/fs/bpf", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("tgt") || name.starts_with("tgdemo")) {
                continue;
            }
            if root == "/sys/fs/bpf" {
                let _ = std::fs::remove_dir_all(entry.path());
            } else {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // Scratch directories of killed test runs: `tollgate-<what>-<pid>`, the pid gone.
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("tollgate-")
                .and_then(|rest| rest.rsplit_once('-'))
                .and_then(|(_, pid)| pid.parse::<u32>().ok());
            if let Some(pid) = pid
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}
