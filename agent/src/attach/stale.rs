//! Links of another agent's programs at this agent's attachment points: an earlier agent
//! that ran with another `--bpffs` (its pins, so its links, are somewhere this agent does
//! not adopt from) left its programs attached, enforcing its last rules beside ours. A
//! Tollgate program (by its name and the names of its maps) that is not one this process
//! loaded, linked (TCX or cgroup) where one of our workloads is attached, is detached, as Cilium takes its own old
//! programs off when it attaches. Programs of other names, and Tollgate programs attached
//! anywhere else, are left alone.

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

use agent_common::{map_names, program_names};
use aya::programs::loaded_programs;

use super::RouteKey;

/// The programs that a workload's links run.
const WORKLOAD_PROGRAMS: [&str; 4] = [
    program_names::TC_FROM_POD,
    program_names::TC_TO_POD,
    program_names::CG_INGRESS,
    program_names::CG_EGRESS,
];

// bpf(2) commands, link and attach types (the system's headers predate TCX).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// At most this many programs on one hook are looked at (ours and a CNI's are a handful).
const MAX_QUERIED: usize = 64;

/// A link of another agent's program that was detached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleLink {
    pub link_id: u32,
    pub prog_id: u32,
    pub prog: String,
    pub at: RouteKey,
}

/// What a sweep did: the links it detached, and what it could not look at or detach.
#[derive(Debug, Default)]
pub struct Sweep {
    pub removed: Vec<StaleLink>,
    pub errors: Vec<String>,
}

/// Detaches the links of Tollgate programs other than `ours` (program ids) at `points`.
/// One walk of the loaded programs; the links are looked at only when a Tollgate program
/// not ours is loaded at all. An error on one hook or link does not stop the rest.
pub fn remove_stale_links(ours: &BTreeSet<u32>, points: &BTreeSet<RouteKey>) -> Sweep {
    let mut sweep = Sweep::default();
    let foreign: Vec<(u32, String)> = loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| !ours.contains(&p.id()))
        .filter_map(|p| {
            let name = p.name_as_str()?.to_string();
            (WORKLOAD_PROGRAMS.contains(&name.as_str()) && uses_tollgate_maps(&p))
                .then(|| (p.id(), name))
        })
        .collect();
    if foreign.is_empty() || points.is_empty() {
        return sweep;
    }
    // Interfaces are asked what they run, in this agent's network namespace: a link's own
    // interface index does not say which namespace it is in (another node namespace, as in
    // the tests, can hold an interface of the same index).
    for point in points {
        let RouteKey::Ifindex(ifindex) = *point else {
            continue;
        };
        for attach_type in [BPF_TCX_INGRESS, BPF_TCX_EGRESS] {
            let links = match tcx_links(ifindex, attach_type) {
                Ok(links) => links,
                Err(e) => {
                    sweep
                        .errors
                        .push(format!("TCX programs of interface {ifindex}: {e}"));
                    continue;
                }
            };
            for (prog_id, link_id) in links {
                let Some((_, prog)) = foreign.iter().find(|(p, _)| *p == prog_id) else {
                    continue;
                };
                // Gone meanwhile: nothing to do.
                let Ok(fd) = link_fd(link_id) else { continue };
                sweep.detach(&fd, link_id, prog_id, prog, *point);
            }
        }
    }
    // cgroup ids are the same in every namespace: the links are walked.
    if !points.iter().any(|p| matches!(p, RouteKey::Cgroup(_))) {
        return sweep;
    }
    let mut id = 0;
    loop {
        let next = match next_link_id(id) {
            Ok(Some(next)) => next,
            Ok(None) => break,
            Err(e) => {
                sweep.errors.push(format!("links: {e}"));
                break;
            }
        };
        id = next;
        // Gone meanwhile: nothing to do.
        let Ok(fd) = link_fd(id) else { continue };
        let Ok(info) = link_info(&fd) else { continue };
        let Some((_, prog)) = foreign.iter().find(|(p, _)| *p == info.prog_id) else {
            continue;
        };
        if !matches!(info.at, RouteKey::Cgroup(_)) || !points.contains(&info.at) {
            continue;
        }
        sweep.detach(&fd, id, info.prog_id, prog, info.at);
    }
    sweep
}

impl Sweep {
    fn detach(&mut self, fd: &OwnedFd, link_id: u32, prog_id: u32, prog: &str, at: RouteKey) {
        match detach(fd) {
            Ok(()) => self.removed.push(StaleLink {
                link_id,
                prog_id,
                prog: prog.to_string(),
                at,
            }),
            Err(e) => self
                .errors
                .push(format!("detach link {link_id} ({prog}): {e}")),
        }
    }
}

/// Whether a program uses maps of Tollgate's names: its workload table and its connection
/// tracking table. Program names alone are short and plain; another tool's could match.
fn uses_tollgate_maps(program: &aya::programs::ProgramInfo) -> bool {
    let Ok(Some(ids)) = program.map_ids() else {
        return false;
    };
    let names: Vec<String> = ids
        .into_iter()
        .filter_map(|id| aya::maps::MapInfo::from_id(id).ok())
        .filter_map(|m| m.name_as_str().map(str::to_string))
        .collect();
    [map_names::WORKLOADS, map_names::CONNTRACK]
        .iter()
        .all(|wanted| names.iter().any(|n| n == wanted))
}

#[repr(C)]
struct IdAttr {
    start_or_link_id: u32,
    next_id: u32,
    open_flags: u32,
}

fn next_link_id(start: u32) -> io::Result<Option<u32>> {
    let mut attr = IdAttr {
        start_or_link_id: start,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: the attribute holds ids only; the kernel writes `next_id`.
    match unsafe { crate::sys::bpf(BPF_LINK_GET_NEXT_ID, &mut attr) } {
        Ok(_) => Ok(Some(attr.next_id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn link_fd(id: u32) -> io::Result<OwnedFd> {
    let mut attr = IdAttr {
        start_or_link_id: id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: BPF_LINK_GET_FD_BY_ID returns a new descriptor; the attribute holds ids only.
    unsafe { crate::sys::bpf_fd(BPF_LINK_GET_FD_BY_ID, &mut attr) }
}

/// The (program id, link id) pairs of the TCX links at an interface of this namespace.
fn tcx_links(ifindex: u32, attach_type: u32) -> io::Result<Vec<(u32, u32)>> {
    #[repr(C)]
    struct QueryAttr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut prog_ids = [0u32; MAX_QUERIED];
    let mut link_ids = [0u32; MAX_QUERIED];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: prog_ids.as_mut_ptr() as u64,
        count: MAX_QUERIED as u32,
        _pad: 0,
        prog_attach_flags: 0,
        link_ids: link_ids.as_mut_ptr() as u64,
        link_attach_flags: 0,
        revision: 0,
    };
    // SAFETY: both arrays are writable for `count` ids each, for the call.
    match unsafe { crate::sys::bpf(BPF_PROG_QUERY, &mut attr) } {
        Ok(_) => {}
        // ENOSPC: more than MAX_QUERIED; the first ones were written.
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        // The interface is gone, or the kernel has no TCX: nothing there.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::EINVAL)) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    }
    let n = (attr.count as usize).min(MAX_QUERIED);
    Ok(prog_ids[..n]
        .iter()
        .zip(&link_ids[..n])
        .filter(|(_, link)| **link != 0)
        .map(|(p, l)| (*p, *l))
        .collect())
}

struct LinkInfo {
    prog_id: u32,
    at: RouteKey,
}

/// `struct bpf_link_info` as far as this needs: type, id, prog_id, then (8-aligned) a union
/// whose cgroup member starts with the cgroup id.
#[repr(C, align(8))]
#[derive(Default)]
struct RawLinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    target: u64,
    rest: [u64; 6],
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    let mut raw = RawLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: &mut raw as *mut RawLinkInfo as u64,
    };
    // SAFETY: `info` points at `raw`, writable for `info_len` bytes, for the call.
    unsafe { crate::sys::bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    if raw.kind != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::other("not a cgroup link"));
    }
    let at = RouteKey::Cgroup(raw.target);
    Ok(LinkInfo {
        prog_id: raw.prog_id,
        at,
    })
}

fn detach(fd: &OwnedFd) -> io::Result<()> {
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    let mut attr = DetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: the attribute holds a descriptor only.
    unsafe { crate::sys::bpf(BPF_LINK_DETACH, &mut attr) }?;
    Ok(())
}
