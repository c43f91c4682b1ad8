//! Attaching the programs to a workload and taking them off again.
//!
//! Two kinds of attachment point:
//! - `tc`: the host side of the workload's interface. TCX links where the kernel has them
//!   (6.6+), a `clsact` qdisc with direct-action filters otherwise.
//! - `cgroup`: the workload's cgroup v2 directory (cgroup_skb ingress and egress), which
//!   works with any CNI and for host-network pods.

pub mod routes;

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_common::program_names;
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, ProgramError, SchedClassifier,
        TcAttachType,
        cgroup_skb::CgroupSkbLinkId,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};

/// Errors of attach and detach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
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
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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

#[derive(Debug)]
enum LinkHandle {
    Tc(&'static str, SchedClassifierLinkId),
    Cgroup(&'static str, CgroupSkbLinkId),
}

/// The programs attached for one workload.
#[derive(Debug)]
pub struct Attachment {
    pub point: AttachPoint,
    pub method: AttachMethod,
    /// Interface index (tc) or cgroup id (cgroup): the key of the slot routing map.
    pub key: u64,
    links: Vec<LinkHandle>,
}

/// Loads the programs of the object into the kernel.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    for prog in [
        program_names::TC_FROM_POD,
        program_names::TC_TO_POD,
        program_names::TC_BASELINE,
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
pub fn point_key(point: &AttachPoint) -> Result<u64, AttachError> {
    match point {
        AttachPoint::Tc { iface } => ifindex(iface).map(u64::from),
        AttachPoint::Cgroup { path } => cgroup_id(path),
    }
}

/// Attaches both directions at `point`. On failure nothing stays attached.
pub fn attach(
    ebpf: &mut Ebpf,
    point: &AttachPoint,
    tc_mode: TcMode,
) -> Result<Attachment, AttachError> {
    let key = point_key(point)?;
    match point {
        AttachPoint::Tc { iface } => {
            let use_tcx = match tc_mode {
                TcMode::Tcx => true,
                TcMode::Clsact => false,
                TcMode::Auto => kernel_has_tcx(),
            };
            if !use_tcx {
                add_clsact(iface)?;
            }
            let mut links = Vec::new();
            for (prog, attach_type) in [
                (program_names::TC_FROM_POD, TcAttachType::Ingress),
                (program_names::TC_TO_POD, TcAttachType::Egress),
            ] {
                let options = if use_tcx {
                    TcAttachOptions::TcxOrder(LinkOrder::default())
                } else {
                    TcAttachOptions::Netlink(NlOptions::default())
                };
                let result =
                    classifier(ebpf, prog)?.attach_with_options(iface, attach_type, options);
                match result {
                    Ok(id) => links.push(LinkHandle::Tc(prog, id)),
                    Err(source) => {
                        detach_links(ebpf, links)?;
                        return Err(AttachError::Tc {
                            prog,
                            iface: iface.clone(),
                            source,
                        });
                    }
                }
            }
            Ok(Attachment {
                point: point.clone(),
                method: if use_tcx {
                    AttachMethod::Tcx
                } else {
                    AttachMethod::Clsact
                },
                key,
                links,
            })
        }
        AttachPoint::Cgroup { path } => {
            let mut links = Vec::new();
            for (prog, attach_type) in [
                (program_names::CG_INGRESS, CgroupSkbAttachType::Ingress),
                (program_names::CG_EGRESS, CgroupSkbAttachType::Egress),
            ] {
                let dir = File::open(path).map_err(|source| AttachError::CgroupOpen {
                    path: path.clone(),
                    source,
                })?;
                // Attached as a bpf_link (5.7+), which is always multi-program: other agents'
                // cgroup programs keep running beside ours. Link creation takes no flags.
                let result =
                    cgroup_program(ebpf, prog)?.attach(&dir, attach_type, CgroupAttachMode::Single);
                match result {
                    Ok(id) => links.push(LinkHandle::Cgroup(prog, id)),
                    Err(source) => {
                        detach_links(ebpf, links)?;
                        return Err(AttachError::Cgroup {
                            prog,
                            path: path.clone(),
                            source,
                        });
                    }
                }
            }
            Ok(Attachment {
                point: point.clone(),
                method: AttachMethod::Cgroup,
                key,
                links,
            })
        }
    }
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

/// Takes the programs off an attachment point.
pub fn detach(ebpf: &mut Ebpf, attachment: Attachment) -> Result<(), AttachError> {
    detach_links(ebpf, attachment.links)
}

fn detach_links(ebpf: &mut Ebpf, links: Vec<LinkHandle>) -> Result<(), AttachError> {
    let mut first_error = None;
    for link in links {
        let result = match link {
            LinkHandle::Tc(prog, id) => classifier(ebpf, prog)?
                .detach(id)
                .map_err(|source| AttachError::Detach { prog, source }),
            LinkHandle::Cgroup(prog, id) => cgroup_program(ebpf, prog)?
                .detach(id)
                .map_err(|source| AttachError::Detach { prog, source }),
        };
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
