//! bpf(2) for the commands aya 0.14 does not offer: creating a map of maps with an inner
//! template of our own (`maps::tries`), a pinned link's program switched in place
//! (`attach`), BPF_PROG_TEST_RUN (`datapath`).

use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};

/// Runs bpf(2) command `cmd` with `attr`, the command's part of `union bpf_attr` (the
/// kernel reads no further than its size). Returns the command's non-negative result.
///
/// # Safety
/// Every pointer inside `attr` must be valid for what the command does with it (read, or
/// written for an output buffer) for the duration of the call.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is valid and writable for its size; its pointers are the caller's
    // promise.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size_of::<A>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// As [`bpf`], for a command that returns a new descriptor.
///
/// # Safety
/// As [`bpf`]; and the command must be one that returns a new descriptor.
pub unsafe fn bpf_fd<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<OwnedFd> {
    // SAFETY: as the caller promises.
    let fd = unsafe { bpf(cmd, attr) }?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
