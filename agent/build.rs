//! Builds the kernel crate (`agent-ebpf`) with nightly, `-Z build-std=core` and bpf-linker,
//! and leaves the object in OUT_DIR for `include_bytes_aligned!`: one binary to ship.
//!
//! Same recipe as aya-build, with one shared target directory (`target/ebpf`) so the
//! kernel crate and its `core` are not rebuilt for every host profile and feature set.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("no workspace dir"))?;
    let ebpf_dir = workspace.join("agent-ebpf");
    let common_dir = workspace.join("agent-common");
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    println!("cargo:rerun-if-env-changed=TOLLGATE_EBPF_TOOLCHAIN");
    let toolchain = env::var("TOLLGATE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("ebpf");

    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let arch_cfg = format!("--cfg=bpf_target_arch=\"{arch}\"");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &toolchain,
        "cargo",
        "build",
        "--package",
        "agent-ebpf",
        "--bins",
    ])
    .args([
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(workspace)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [arch_cfg.as_str(), "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
    );
    // The outer cargo's settings must not leak into the nested nightly build.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd
        .output()
        .context("run `rustup run nightly cargo build` for agent-ebpf (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "building agent-ebpf failed (needs nightly with rust-src and bpf-linker; \
             `cargo xtask setup` installs them):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/agent-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::copy(&object, out_dir.join("agent-ebpf"))
        .with_context(|| format!("copy {}", object.display()))?;
    Ok(())
}
