//! Where Tollgate keeps things on bpffs. Every pin path is built here.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// Default bpffs directory of the agent (`--bpffs`).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/tollgate";
/// Where bpffs is mounted on a standard system.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Path of a pinned map.
pub fn map_pin(pin_dir: &Path, map: &str) -> PathBuf {
    pin_dir.join(map)
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid C string and a zeroed statfs buffer.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `dir` exists on bpffs, mounting bpffs at /sys/fs/bpf if nothing is mounted
/// there yet (a fresh machine).
pub fn ensure_bpffs_dir(dir: &Path) -> io::Result<()> {
    if dir.starts_with(BPFFS_MOUNT) && !is_bpffs(Path::new(BPFFS_MOUNT)) {
        let source = CString::new("bpf").expect("literal");
        let target = CString::new(BPFFS_MOUNT).expect("literal");
        // SAFETY: valid C strings; mounting bpffs has no data argument.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                source.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    std::fs::create_dir_all(dir)?;
    if !is_bpffs(dir) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not on a bpf filesystem", dir.display()),
        ));
    }
    Ok(())
}

/// Removes every pin under `dir` and the directory itself.
pub fn remove_pins(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
