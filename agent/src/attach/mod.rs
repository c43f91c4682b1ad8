//! Attaching the programs to a workload and taking them off again.
//!
//! Two kinds of attachment point:
//! - `tc`: the host side of the workload's interface. TCX links where the kernel has them
//!   (6.6+), a `clsact` qdisc with direct-action filters otherwise.
//! - `cgroup`: the workload's cgroup v2 directory (cgroup_skb ingress and egress), which
//!   works with any CNI and for host-network pods.

pub mod netlink;
pub mod points;
pub mod routes;
pub mod stale;

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsFd as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_common::program_names;
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, ProgramError, SchedClassifier,
        TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};

/// Errors of attach and detach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("pin {path}: switch to the new program: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("program {prog}: {source}")]
    Program {
        prog: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attach {prog} to interface {iface}: {source}")]
    Tc {
        prog: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("add clsact qdisc to {iface}: {source}")]
    Clsact {
        iface: String,
        #[source]
        source: tc::TcError,
    },
    #[error("interface {iface}: {source}")]
    Interface {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}: {source}")]
    CgroupOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attach {prog} to cgroup {path}: {source}")]
    Cgroup {
        prog: &'static str,
        path: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("detach {prog}: {source}")]
    Detach {
        prog: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// TCX when the kernel has it (6.6+), `clsact` otherwise.
    #[default]
    Auto,
    /// TCX links only.
    Tcx,
    /// `clsact` qdisc filters only (what kernels before 6.6 have).
    Clsact,
}

/// Where a workload's traffic is seen.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachPoint {
    /// Host side of the workload's network interface.
    Tc { iface: String },
    /// The workload's cgroup v2 directory.
    Cgroup { path: PathBuf },
}

/// The mechanism an attachment ended up using.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMethod {
    Tcx,
    Clsact,
    Cgroup,
}

impl AttachMethod {
    /// The `attach` column of `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMethod::Tcx => "tcx",
            AttachMethod::Clsact => "clsact",
            AttachMethod::Cgroup => "cgroup",
        }
    }
}

/// One attached program. Both kinds outlive the agent process: TCX and cgroup links are
/// pinned on bpffs, clsact filters live in the qdisc. So enforcement never lapses while the
/// agent restarts, and a restarted agent adopts what it finds.
#[derive(Debug)]
enum LinkHandle {
    /// A TCX or cgroup bpf_link, pinned at `path`.
    Pinned {
        prog: &'static str,
        link: FdLink,
        path: PathBuf,
    },
    /// A clsact direct-action filter at Tollgate's priority and handle on `iface`.
    Clsact {
        prog: &'static str,
        iface: String,
        attach_type: TcAttachType,
    },
}

/// Priority and handle of Tollgate's clsact filters: fixed, so a restarted agent finds and
/// replaces them in place instead of adding a second one.
pub const CLSACT_PRIORITY: u16 = 0x7467;
pub const CLSACT_HANDLE: TcHandle = TcHandle::new(0x7467, 1);

/// What an attachment is keyed by in the datapath's routing maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKey {
    /// Interface index of a TC attachment.
    Ifindex(u32),
    /// cgroup v2 id of a cgroup attachment.
    Cgroup(u64),
}

/// The programs attached for one workload.
#[derive(Debug)]
pub struct Attachment {
    /// Where it is attached; `None` for an adopted cgroup attachment until the reconciler
    /// names its directory again.
    pub point: Option<AttachPoint>,
    pub method: AttachMethod,
    pub key: RouteKey,
    links: Vec<LinkHandle>,
}

/// Loads the programs of the object into the kernel.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    for prog in [
        program_names::TC_FROM_POD,
        program_names::TC_TO_POD,
        program_names::TC_BASELINE,
        program_names::TC_JIFFIES,
        program_names::TC_TABLE_FLOOR,
    ] {
        classifier(ebpf, prog)?
            .load()
            .map_err(|source| AttachError::Program { prog, source })?;
    }
    for prog in [program_names::CG_INGRESS, program_names::CG_EGRESS] {
        cgroup_program(ebpf, prog)?
            .load()
            .map_err(|source| AttachError::Program { prog, source })?;
    }
    Ok(())
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    prog: &'static str,
) -> Result<&'a mut SchedClassifier, AttachError> {
    ebpf.program_mut(prog)
        .ok_or(AttachError::MissingProgram(prog))?
        .try_into()
        .map_err(|source| AttachError::Program { prog, source })
}

fn cgroup_program<'a>(
    ebpf: &'a mut Ebpf,
    prog: &'static str,
) -> Result<&'a mut CgroupSkb, AttachError> {
    ebpf.program_mut(prog)
        .ok_or(AttachError::MissingProgram(prog))?
        .try_into()
        .map_err(|source| AttachError::Program { prog, source })
}

/// Interface index of a network interface in this process's network namespace.
pub fn ifindex(iface: &str) -> Result<u32, AttachError> {
    let name = std::ffi::CString::new(iface).map_err(|e| AttachError::Interface {
        iface: iface.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(AttachError::Interface {
            iface: iface.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(index)
}

/// The cgroup v2 id of a directory: its inode number on cgroup2fs.
pub fn cgroup_id(path: &Path) -> Result<u64, AttachError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| AttachError::CgroupOpen {
            path: path.into(),
            source,
        })
}

/// Whether this kernel has TCX links.
pub fn kernel_has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The routing key of an attachment point (interface index or cgroup id), resolved before
/// attaching so the slot is known to the datapath before the first packet.
pub fn point_key(point: &AttachPoint) -> Result<RouteKey, AttachError> {
    match point {
        AttachPoint::Tc { iface } => ifindex(iface).map(RouteKey::Ifindex),
        AttachPoint::Cgroup { path } => cgroup_id(path).map(RouteKey::Cgroup),
    }
}

/// Where the pinned links of a slot live.
pub fn link_pin(pin_dir: &Path, slot: u32, prog: &str) -> PathBuf {
    pin_dir.join("links").join(format!("slot-{slot}-{prog}"))
}

fn pin_link(link: FdLink, path: &Path, prog: &'static str) -> Result<LinkHandle, AttachError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| AttachError::Pin {
            path: path.into(),
            reason: source.to_string(),
        })?;
    }
    let pinned = link.pin(path).map_err(|e| AttachError::Pin {
        path: path.into(),
        reason: e.to_string(),
    })?;
    Ok(LinkHandle::Pinned {
        prog,
        link: pinned.into(),
        path: path.into(),
    })
}

/// Attaches both directions of workload `slot` at `point`, pinning the links under
/// `pin_dir`. On failure nothing stays attached.
pub fn attach(
    ebpf: &mut Ebpf,
    point: &AttachPoint,
    tc_mode: TcMode,
    pin_dir: &Path,
    slot: u32,
) -> Result<Attachment, AttachError> {
    let key = point_key(point)?;
    let mut links = Vec::new();
    let method = match point {
        AttachPoint::Tc { iface } => {
            let use_tcx = match tc_mode {
                TcMode::Tcx => true,
                TcMode::Clsact => false,
                TcMode::Auto => kernel_has_tcx(),
            };
            if !use_tcx {
                add_clsact(iface)?;
            }
            for (prog, attach_type) in [
                (program_names::TC_FROM_POD, TcAttachType::Ingress),
                (program_names::TC_TO_POD, TcAttachType::Egress),
            ] {
                let result = if use_tcx {
                    attach_tcx(
                        ebpf,
                        prog,
                        iface,
                        attach_type,
                        &link_pin(pin_dir, slot, prog),
                    )
                } else {
                    attach_clsact(ebpf, prog, iface, attach_type)
                };
                match result {
                    Ok(handle) => links.push(handle),
                    Err(e) => {
                        detach_links(links)?;
                        return Err(e);
                    }
                }
            }
            if use_tcx {
                AttachMethod::Tcx
            } else {
                AttachMethod::Clsact
            }
        }
        AttachPoint::Cgroup { path } => {
            for (prog, attach_type) in [
                (program_names::CG_INGRESS, CgroupSkbAttachType::Ingress),
                (program_names::CG_EGRESS, CgroupSkbAttachType::Egress),
            ] {
                let result = attach_cgroup(
                    ebpf,
                    prog,
                    path,
                    attach_type,
                    &link_pin(pin_dir, slot, prog),
                );
                match result {
                    Ok(handle) => links.push(handle),
                    Err(e) => {
                        detach_links(links)?;
                        return Err(e);
                    }
                }
            }
            AttachMethod::Cgroup
        }
    };
    Ok(Attachment {
        point: Some(point.clone()),
        method,
        key,
        links,
    })
}

/// Attaches the empty program `tc_baseline` at `iface`, ingress and egress, with TCX
/// links that go when the returned handles drop. Never done by the agent: benchmarks run
/// real traffic through it to tell the hook's own cost from the programs'.
pub fn attach_empty_tc(ebpf: &mut Ebpf, iface: &str) -> Result<Vec<FdLink>, AttachError> {
    [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .map(|attach_type| {
            tcx_link(
                ebpf,
                program_names::TC_BASELINE,
                iface,
                attach_type,
                Path::new(iface),
            )
        })
        .collect()
}

fn attach_tcx(
    ebpf: &mut Ebpf,
    prog: &'static str,
    iface: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<LinkHandle, AttachError> {
    let fd = tcx_link(ebpf, prog, iface, attach_type, pin)?;
    pin_link(fd, pin, prog)
}

/// A TCX link of `prog` at `iface`, held by its file descriptor; `pin` names it in errors.
fn tcx_link(
    ebpf: &mut Ebpf,
    prog: &'static str,
    iface: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<FdLink, AttachError> {
    let program = classifier(ebpf, prog)?;
    let tc_err = |source| AttachError::Tc {
        prog,
        iface: iface.into(),
        source,
    };
    let id = program
        .attach_with_options(
            iface,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(tc_err)?;
    let link = program.take_link(id).map_err(tc_err)?;
    FdLink::try_from(link).map_err(|e| AttachError::Pin {
        path: pin.into(),
        reason: e.to_string(),
    })
}

fn attach_clsact(
    ebpf: &mut Ebpf,
    prog: &'static str,
    iface: &str,
    attach_type: TcAttachType,
) -> Result<LinkHandle, AttachError> {
    let program = classifier(ebpf, prog)?;
    let options = NlOptions {
        priority: CLSACT_PRIORITY,
        handle: CLSACT_HANDLE,
        classid: None,
    };
    let tc_err = |source| AttachError::Tc {
        prog,
        iface: iface.into(),
        source,
    };
    let id =
        match program.attach_with_options(iface, attach_type, TcAttachOptions::Netlink(options)) {
            Ok(id) => id,
            // Our filter is already there (an earlier agent): replace its program in place.
            Err(_) => {
                let existing = SchedClassifierLink::attached(
                    iface,
                    attach_type,
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                )
                .map_err(|e| AttachError::Interface {
                    iface: iface.into(),
                    source: e,
                })?;
                program.attach_to_link(existing).map_err(tc_err)?
            }
        };
    let link = program.take_link(id).map_err(tc_err)?;
    // The filter must outlive this process: dropping the link object would detach it.
    std::mem::forget(link);
    Ok(LinkHandle::Clsact {
        prog,
        iface: iface.into(),
        attach_type,
    })
}

fn attach_cgroup(
    ebpf: &mut Ebpf,
    prog: &'static str,
    path: &Path,
    attach_type: CgroupSkbAttachType,
    pin: &Path,
) -> Result<LinkHandle, AttachError> {
    let dir = File::open(path).map_err(|source| AttachError::CgroupOpen {
        path: path.into(),
        source,
    })?;
    let program = cgroup_program(ebpf, prog)?;
    let cg_err = |source| AttachError::Cgroup {
        prog,
        path: path.into(),
        source,
    };
    // A bpf_link (5.7+) is always multi-program: other agents' cgroup programs keep running
    // beside ours. Link creation takes no flags.
    let id = program
        .attach(&dir, attach_type, CgroupAttachMode::Single)
        .map_err(cg_err)?;
    let link = program.take_link(id).map_err(cg_err)?;
    let fd = FdLink::try_from(link).map_err(|e| AttachError::Pin {
        path: pin.into(),
        reason: e.to_string(),
    })?;
    pin_link(fd, pin, prog)
}

/// Adds a clsact qdisc unless the interface has one. It stays after detach: it is shared
/// with anything else that attaches TC programs there, and empty it costs nothing.
fn add_clsact(iface: &str) -> Result<(), AttachError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(AttachError::Clsact {
            iface: iface.into(),
            source,
        }),
    }
}

/// Takes the programs off an attachment point: pinned links are unpinned and closed, clsact
/// filters deleted.
pub fn detach(attachment: Attachment) -> Result<(), AttachError> {
    detach_links(attachment.links)
}

fn detach_links(links: Vec<LinkHandle>) -> Result<(), AttachError> {
    let mut first_error = None;
    for link in links {
        let result = match link {
            LinkHandle::Pinned { prog, link, path } => {
                let unpinned = std::fs::remove_file(&path);
                drop(link);
                unpinned.map_err(|e| AttachError::Pin {
                    path,
                    reason: format!("unpin {prog}: {e}"),
                })
            }
            LinkHandle::Clsact {
                prog,
                iface,
                attach_type,
            } => SchedClassifierLink::attached(
                &iface,
                attach_type,
                CLSACT_PRIORITY,
                CLSACT_HANDLE,
                None,
            )
            .map_err(|source| AttachError::Interface {
                iface: iface.clone(),
                source,
            })
            .and_then(|l| {
                use aya::programs::links::Link as _;
                l.detach()
                    .map_err(|source| AttachError::Detach { prog, source })
            }),
        };
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Points the bpf_link pinned at `path` at another program, atomically (BPF_OBJ_GET, then
/// BPF_LINK_UPDATE; aya 0.14 has no public call for cgroup links).
fn link_update_pinned(path: &Path, prog_fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET returns a new descriptor; the path is NUL-terminated and outlives
    // the call.
    let link_fd = unsafe { crate::sys::bpf_fd(BPF_OBJ_GET, &mut get) }?;
    let mut update = LinkUpdateAttr {
        link_fd: link_fd.as_raw_fd() as u32,
        new_prog_fd: prog_fd.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the attribute holds descriptors only, no pointers.
    unsafe { crate::sys::bpf(BPF_LINK_UPDATE, &mut update) }?;
    Ok(())
}

/// Whether an error says a link's interface or cgroup is gone (`ENOLINK`, "link has been
/// severed"), anywhere in its chain of causes.
fn severed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::ENOLINK)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Adopts what an earlier agent left attached: every pinned link under `pin_dir` (switched to
/// this agent's programs in place, so new code takes over without a gap), and clsact filters
/// on the interfaces of `tc_slots` that have no pinned links. Returns the attachments by slot.
pub fn adopt(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    tc_slots: &[(u32, u32)],
    cgroup_slots: &[(u64, u32)],
) -> Result<BTreeMap<u32, Attachment>, AttachError> {
    let mut out: BTreeMap<u32, Attachment> = BTreeMap::new();
    let dir = pin_dir.join("links");
    let mut pins: Vec<(u32, &'static str, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let parsed = name
                .strip_prefix("slot-")
                .and_then(|rest| rest.split_once('-'));
            let Some((slot, prog)) = parsed else { continue };
            let Ok(slot) = slot.parse::<u32>() else {
                continue;
            };
            let prog = match prog {
                p if p == program_names::TC_FROM_POD => program_names::TC_FROM_POD,
                p if p == program_names::TC_TO_POD => program_names::TC_TO_POD,
                p if p == program_names::CG_INGRESS => program_names::CG_INGRESS,
                p if p == program_names::CG_EGRESS => program_names::CG_EGRESS,
                _ => continue,
            };
            pins.push((slot, prog, entry.path()));
        }
    }
    pins.sort();
    for (slot, prog, path) in pins {
        let pinned = PinnedLink::from_pin(&path).map_err(|e| AttachError::Pin {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let fd: FdLink = pinned.into();
        let is_tc = prog == program_names::TC_FROM_POD || prog == program_names::TC_TO_POD;
        let switched = if is_tc {
            let program = classifier(ebpf, prog)?;
            let tc_link = SchedClassifierLink::try_from(fd).map_err(|e| AttachError::Pin {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            program
                .attach_to_link(tc_link)
                .map_err(|source| AttachError::Program { prog, source })
                .and_then(|id| {
                    let link = program
                        .take_link(id)
                        .map_err(|source| AttachError::Program { prog, source })?;
                    FdLink::try_from(link).map_err(|e| AttachError::Pin {
                        path: path.clone(),
                        reason: e.to_string(),
                    })
                })
        } else {
            let program = cgroup_program(ebpf, prog)?;
            let prog_fd = program
                .fd()
                .map_err(|source| AttachError::Program { prog, source })?;
            link_update_pinned(&path, prog_fd.as_fd())
                .map(|()| fd)
                .map_err(|e| AttachError::Link {
                    path: path.clone(),
                    source: e,
                })
        };
        let link = match switched {
            Ok(link) => link,
            // The interface or cgroup went while no agent ran (a pod deleted during an
            // upgrade): the link is dead and enforces nothing. Its pin goes, and its slot
            // is left to the reconcile like any other no pod claims.
            Err(e) if severed(&e) => {
                tracing::warn!(slot, prog, path = %path.display(), "a pinned link's interface or cgroup is gone: unpinned");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            Err(e) => return Err(e),
        };
        let key = if is_tc {
            tc_slots
                .iter()
                .find(|(_, s)| *s == slot)
                .map(|(i, _)| RouteKey::Ifindex(*i))
        } else {
            cgroup_slots
                .iter()
                .find(|(_, s)| *s == slot)
                .map(|(c, _)| RouteKey::Cgroup(*c))
        };
        let Some(key) = key else {
            // A link whose workload has no routing entry: nothing can use it.
            let _ = std::fs::remove_file(&path);
            continue;
        };
        let entry = out.entry(slot).or_insert_with(|| Attachment {
            point: match key {
                RouteKey::Ifindex(i) => ifname(i).map(|iface| AttachPoint::Tc { iface }),
                RouteKey::Cgroup(_) => None,
            },
            method: if is_tc {
                AttachMethod::Tcx
            } else {
                AttachMethod::Cgroup
            },
            key,
            links: vec![],
        });
        entry.links.push(LinkHandle::Pinned { prog, link, path });
    }
    // clsact filters: TC routing entries without pinned links.
    for (ifindex, slot) in tc_slots {
        if out.contains_key(slot) {
            continue;
        }
        let Some(iface) = ifname(*ifindex) else {
            continue;
        };
        let mut links = Vec::new();
        for (prog, attach_type) in [
            (program_names::TC_FROM_POD, TcAttachType::Ingress),
            (program_names::TC_TO_POD, TcAttachType::Egress),
        ] {
            let Ok(existing) = SchedClassifierLink::attached(
                &iface,
                attach_type,
                CLSACT_PRIORITY,
                CLSACT_HANDLE,
                None,
            ) else {
                continue;
            };
            let program = classifier(ebpf, prog)?;
            if let Ok(id) = program.attach_to_link(existing)
                && let Ok(link) = program.take_link(id)
            {
                std::mem::forget(link);
                links.push(LinkHandle::Clsact {
                    prog,
                    iface: iface.clone(),
                    attach_type,
                });
            }
        }
        if !links.is_empty() {
            out.insert(
                *slot,
                Attachment {
                    point: Some(AttachPoint::Tc { iface }),
                    method: AttachMethod::Clsact,
                    key: RouteKey::Ifindex(*ifindex),
                    links,
                },
            );
        }
    }
    Ok(out)
}

/// Name of an interface index in this network namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}
