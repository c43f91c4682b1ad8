//! The loaded datapath: the embedded object in the kernel, its maps, and what is attached.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use agent_common::{
    CONNTRACK_CAPACITY, LAYOUT_VERSION, LpmAddr, PolicyKey, PolicyValue, map_names, program_names,
};
use aya::{Ebpf, EbpfLoader, maps::RingBuf};
use tracing::{debug, warn};

use crate::{
    attach::{self, AttachError, AttachMethod, AttachPoint, Attachment, RouteKey, TcMode},
    flowlog::EventReader,
    maps::{DatapathMaps, MapsError},
    pins,
};

/// The kernel object, built from `agent-ebpf` by build.rs and embedded: one file to ship.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Errors of loading and driving the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("load the eBPF object (pins under {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(transparent)]
    Attach(Box<AttachError>),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("slot {slot} is already attached at {point:?}")]
    AlreadyAttached {
        slot: u32,
        point: Option<AttachPoint>,
    },
    #[error(
        "the pinned state under {pin_dir} has map layout {found:x?}, this binary uses {expected:x}: \
         it was left by a different Tollgate version. Nothing was changed. Either run the \
         version that wrote it, or start with --reset-state to detach the old programs and \
         remove their pins (enforcement lapses until this agent has attached again)"
    )]
    LayoutMismatch {
        pin_dir: PathBuf,
        found: Option<u64>,
        expected: u64,
    },
    #[error("event ring buffer: {0}")]
    Events(String),
}

impl From<AttachError> for DatapathError {
    fn from(e: AttachError) -> Self {
        DatapathError::Attach(Box::new(e))
    }
}

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Directory on bpffs where maps are pinned; a later load with the same directory adopts
    /// them (counters, tracked flows and rules continue).
    pub pin_dir: PathBuf,
    /// Capacity of the connection tracking table.
    pub conntrack_capacity: u32,
    /// How TC programs attach.
    pub tc_mode: TcMode,
}

impl DatapathOptions {
    /// Defaults with maps pinned under `pin_dir`.
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        DatapathOptions {
            pin_dir: pin_dir.into(),
            conntrack_capacity: CONNTRACK_CAPACITY,
            tc_mode: TcMode::Auto,
        }
    }
}

/// Summary of one attached workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedWorkload {
    pub slot: u32,
    pub point: Option<AttachPoint>,
    pub method: AttachMethod,
    pub key: RouteKey,
}

/// The datapath of this node.
pub struct Datapath {
    ebpf: Ebpf,
    /// Typed map handles.
    pub maps: DatapathMaps,
    attachments: BTreeMap<u32, Attachment>,
    options: DatapathOptions,
}

impl Datapath {
    /// Loads the embedded object: maps pinned (or adopted) under the pin directory, programs
    /// loaded and verified, and whatever an earlier agent left attached adopted: its pinned
    /// links switched to the new programs in place. Pins of another map layout are refused
    /// before anything is touched.
    pub fn load(options: DatapathOptions) -> Result<Self, DatapathError> {
        raise_memlock_limit();
        pins::ensure_bpffs_dir(&options.pin_dir).map_err(|source| DatapathError::Bpffs {
            path: options.pin_dir.clone(),
            source,
        })?;
        check_layout(&options.pin_dir)?;
        raise_open_files_limit();
        crate::maps::pin_map_of_tries::<PolicyKey, PolicyValue>(
            &options.pin_dir,
            map_names::POLICY,
            agent_common::POLICY_CAPACITY,
        )?;
        crate::maps::pin_map_of_tries::<LpmAddr, u32>(
            &options.pin_dir,
            map_names::CIDR_RULES,
            agent_common::CIDR_RULE_CAPACITY,
        )?;
        // The maps of maps are BTF maps, which carry no pinning of their own: pinned above.
        let policy_pin = pins::map_pin(&options.pin_dir, map_names::POLICY);
        let cidr_rules_pin = pins::map_pin(&options.pin_dir, map_names::CIDR_RULES);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&options.pin_dir)
            .map_pin_path(map_names::POLICY, policy_pin.as_path())
            .map_pin_path(map_names::CIDR_RULES, cidr_rules_pin.as_path())
            .map_max_entries(map_names::CONNTRACK, options.conntrack_capacity)
            .map_max_entries(
                map_names::CT_OVERFLOW,
                (options.conntrack_capacity / agent_common::CONNTRACK_OVERFLOW_DIVISOR).max(1024),
            )
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: options.pin_dir.clone(),
                source: Box::new(source),
            })?;
        attach::load_programs(&mut ebpf)?;
        let maps = DatapathMaps::new(&mut ebpf, &options.pin_dir)?;
        let attachments = attach::adopt(
            &mut ebpf,
            &options.pin_dir,
            &maps.tc_routes(),
            &maps.cgroup_routes(),
        )?;
        warn_of_other_tc_method(&attachments, options.tc_mode);
        let mut datapath = Datapath {
            ebpf,
            maps,
            attachments,
            options,
        };
        match datapath.jiffy_clock() {
            Some((ns_per_jiffy, offset_ns)) => {
                datapath.maps.set_clock(ns_per_jiffy, offset_ns)?;
                debug!(ns_per_jiffy, "the programs read time from jiffies");
            }
            None => warn!(
                "could not tie jiffies to CLOCK_MONOTONIC_COARSE: the programs read the coarse clock (slower)"
            ),
        }
        Ok(datapath)
    }

    /// The kernel's jiffies, read by running `tc_jiffies`.
    fn jiffies(&self) -> Option<u64> {
        let run = self
            .test_run(program_names::TC_JIFFIES, &[0u8; 64], 1)
            .ok()?;
        Some(u64::from_ne_bytes(run.data.get(..8)?.try_into().ok()?))
    }

    /// Ties jiffies to CLOCK_MONOTONIC_COARSE, the clock of every expiry and deadline in
    /// the maps: reading jiffies costs the programs one load, the coarse clock a seqlock
    /// read of the timekeeper (12 ns a packet in the test-run loop, about 40 in single runs,
    /// 2026-11-26). The tick length comes from two readings 50 ms apart, snapped to the
    /// kernel's possible HZ; the offset from a reading no tick interrupted, less a tick so
    /// the programs' clock is never ahead of CLOCK_MONOTONIC (it lags by at most two ticks).
    /// `None` when the readings make no sense: the programs keep the coarse clock.
    fn jiffy_clock(&self) -> Option<(u32, u64)> {
        let read = || {
            (0..5).find_map(|_| {
                let before = crate::flows::coarse_monotonic_ns();
                let jiffies = self.jiffies()?;
                let after = crate::flows::coarse_monotonic_ns();
                (before == after).then_some((jiffies, after))
            })
        };
        let (j0, t0) = read()?;
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (j1, t1) = read()?;
        if j1 <= j0 || t1 <= t0 {
            return None;
        }
        let measured_hz = (j1 - j0) as f64 * 1e9 / (t1 - t0) as f64;
        let hz = [100u64, 250, 300, 1000].into_iter().min_by(|a, b| {
            (*a as f64 - measured_hz)
                .abs()
                .total_cmp(&(*b as f64 - measured_hz).abs())
        })?;
        if (measured_hz - hz as f64).abs() > hz as f64 * 0.25 {
            return None;
        }
        // TICK_NSEC.
        let tick = (1_000_000_000 + hz / 2) / hz;
        let offset = t1.wrapping_sub(j1.wrapping_mul(tick)).wrapping_sub(tick);
        Some((tick as u32, offset))
    }

    /// Attaches the empty program `tc_baseline` at `iface` (both directions, TCX) in the
    /// caller's network namespace, for benchmarks: what the hook itself costs in real
    /// traffic. Detached when the returned links drop.
    pub fn attach_empty_tc(
        &mut self,
        iface: &str,
    ) -> Result<Vec<aya::programs::links::FdLink>, DatapathError> {
        Ok(attach::attach_empty_tc(&mut self.ebpf, iface)?)
    }

    /// The options this datapath was loaded with.
    pub fn options(&self) -> &DatapathOptions {
        &self.options
    }

    /// Attaches the programs for workload `slot` at `point`. The slot is routed before the
    /// programs attach, so the first packet already counts for the workload.
    pub fn attach(
        &mut self,
        slot: u32,
        point: &AttachPoint,
    ) -> Result<AttachMethod, DatapathError> {
        self.attach_with(slot, point, self.options.tc_mode)
    }

    /// Like `attach`, choosing how TC programs attach for this workload.
    pub fn attach_with(
        &mut self,
        slot: u32,
        point: &AttachPoint,
        tc_mode: TcMode,
    ) -> Result<AttachMethod, DatapathError> {
        if let Some(existing) = self.attachments.get(&slot) {
            return Err(DatapathError::AlreadyAttached {
                slot,
                point: existing.point.clone(),
            });
        }
        let key = attach::point_key(point)?;
        self.route(key, Some(slot))?;
        match attach::attach(&mut self.ebpf, point, tc_mode, &self.options.pin_dir, slot) {
            Ok(attachment) => {
                let method = attachment.method;
                self.attachments.insert(slot, attachment);
                Ok(method)
            }
            Err(e) => {
                self.route(key, None)?;
                Err(e.into())
            }
        }
    }

    fn route(&mut self, key: RouteKey, slot: Option<u32>) -> Result<(), MapsError> {
        match (key, slot) {
            (RouteKey::Ifindex(i), Some(slot)) => self.maps.set_tc_slot(i, slot),
            (RouteKey::Ifindex(i), None) => self.maps.remove_tc_slot(i),
            (RouteKey::Cgroup(c), Some(slot)) => self.maps.set_cgroup_slot(c, slot),
            (RouteKey::Cgroup(c), None) => self.maps.remove_cgroup_slot(c),
        }
    }

    /// Takes the programs off workload `slot` and forgets its routing. Its rules and
    /// counters stay until `maps.clear_workload`.
    pub fn detach(&mut self, slot: u32) -> Result<bool, DatapathError> {
        let Some(attachment) = self.attachments.remove(&slot) else {
            return Ok(false);
        };
        let key = attachment.key;
        attach::detach(attachment)?;
        self.route(key, None)?;
        Ok(true)
    }

    /// The slot attached at `key` by an earlier agent and not yet claimed (not in `owned`),
    /// naming its attachment point from now on. A slot some workload owns is never handed to
    /// another pod, whatever it claims.
    pub fn claim(
        &mut self,
        key: RouteKey,
        point: &AttachPoint,
        owned: &std::collections::BTreeSet<u32>,
    ) -> Option<(u32, AttachMethod)> {
        let (slot, a) = self
            .attachments
            .iter_mut()
            .find(|(slot, a)| a.key == key && !owned.contains(*slot))?;
        a.point = Some(point.clone());
        Some((*slot, a.method))
    }

    /// What is attached, by slot.
    pub fn attached(&self) -> Vec<AttachedWorkload> {
        self.attachments
            .iter()
            .map(|(slot, a)| AttachedWorkload {
                slot: *slot,
                point: a.point.clone(),
                method: a.method,
                key: a.key,
            })
            .collect()
    }

    /// Kernel ids of the loaded programs (what `bpftool prog` and `bpftool link` show).
    pub fn program_ids(&self) -> Vec<u32> {
        self.ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok().map(|i| i.id()))
            .collect()
    }

    /// Takes another agent's Tollgate programs off this agent's attachment points (see
    /// `attach::stale`); returns what it took off.
    pub fn remove_stale_links(&self) -> attach::stale::Sweep {
        let ours = self.program_ids().into_iter().collect();
        let points = self.attachments.values().map(|a| a.key).collect();
        attach::stale::remove_stale_links(&ours, &points)
    }

    /// The reader of flow events. The ring buffer has one consumer: call once.
    pub fn events(&mut self) -> Result<EventReader, DatapathError> {
        let map = self
            .ebpf
            .take_map(map_names::EVENTS)
            .ok_or_else(|| DatapathError::Events("map missing or already taken".into()))?;
        let ring = RingBuf::try_from(map).map_err(|e| DatapathError::Events(e.to_string()))?;
        Ok(EventReader::new(ring))
    }

    /// The DNS ring buffer (`dns`). One consumer: call once.
    pub fn dns_events(&mut self) -> Result<RingBuf<aya::maps::MapData>, DatapathError> {
        let map = self
            .ebpf
            .take_map(map_names::DNS_EVENTS)
            .ok_or_else(|| DatapathError::Events("DNS ring missing or already taken".into()))?;
        RingBuf::try_from(map).map_err(|e| DatapathError::Events(e.to_string()))
    }

    /// Detaches everything, then removes the pinned maps: nothing of this datapath stays in
    /// the kernel once the process exits (`--detach-on-exit`).
    pub fn remove(mut self) -> Result<(), DatapathError> {
        self.detach_and_unpin()
    }

    /// Detaches every workload and removes every pin; the maps live on only as long as this
    /// process holds them.
    pub fn detach_and_unpin(&mut self) -> Result<(), DatapathError> {
        let slots: Vec<u32> = self.attachments.keys().copied().collect();
        for slot in slots {
            self.detach(slot)?;
        }
        let pin_dir = self.options.pin_dir.clone();
        pins::remove_pins(&pin_dir).map_err(|source| DatapathError::Bpffs {
            path: pin_dir,
            source,
        })
    }
}

/// Says so when an earlier agent attached workloads by another TC method than the
/// `--tc-mode` asked for: they stay as they are (switching would mean a moment with both
/// programs, counting packets twice, or with neither, enforcing nothing), and the mode
/// applies to workloads attached from now on.
fn warn_of_other_tc_method(attachments: &BTreeMap<u32, Attachment>, tc_mode: TcMode) {
    let wanted = match tc_mode {
        TcMode::Auto => return,
        TcMode::Tcx => AttachMethod::Tcx,
        TcMode::Clsact => AttachMethod::Clsact,
    };
    let other = attachments
        .values()
        .filter(|a| matches!(a.method, AttachMethod::Tcx | AttachMethod::Clsact))
        .filter(|a| a.method != wanted)
        .count();
    if other > 0 {
        warn!(
            workloads = other,
            tc_mode = wanted.as_str(),
            "workloads an earlier agent attached by the other TC method stay attached as they \
             are; --tc-mode applies to workloads attached from now on (restart with \
             --reset-state to attach every workload anew)"
        );
    }
}

/// Refuses pins written by an agent with another map layout: adopting them would mean reading
/// and writing maps whose keys and values mean something else.
fn check_layout(pin_dir: &Path) -> Result<(), DatapathError> {
    let layout_pin = pin_dir.join(map_names::LAYOUT);
    // The maps of ruleset tries are pinned before the loader runs (`pin_map_of_tries`): on
    // their own they are what a start that failed before the loader left.
    let made_before_the_loader = [map_names::POLICY, map_names::CIDR_RULES];
    let has_pins = std::fs::read_dir(pin_dir).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| !made_before_the_loader.iter().any(|m| e.file_name() == *m))
    });
    if !has_pins {
        return Ok(());
    }
    let found = aya::maps::MapData::from_pin(&layout_pin)
        .ok()
        .and_then(|data| aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(data)).ok())
        .and_then(|array| array.get(&0, 0).ok());
    match found {
        Some(v) if v == LAYOUT_VERSION => Ok(()),
        // Maps created by this layout but not yet stamped (an agent killed mid-start).
        Some(0) => Ok(()),
        other => Err(DatapathError::LayoutMismatch {
            pin_dir: pin_dir.into(),
            found: other,
            expected: LAYOUT_VERSION,
        }),
    }
}

/// The agent holds a descriptor per ruleset trie (`maps::tries`): up to two per slot and
/// direction, more than the usual soft limit of 1,024 open files. Raised to the hard limit.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!("could not raise RLIMIT_NOFILE");
            }
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

/// Whether `path` exists on a bpffs mount.
pub fn is_on_bpffs(path: &Path) -> bool {
    pins::is_bpffs(path)
}

/// Result of running a program on one packet with `BPF_PROG_TEST_RUN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (TC: -1 pass, 2 drop; cgroup: 1 pass, 0 drop).
    pub retval: i32,
    /// Average run time per repetition, ns, as the kernel measured it.
    pub duration_ns: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
}

/// `union bpf_attr` as used by BPF_PROG_TEST_RUN (uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

impl Datapath {
    /// Runs a loaded program on `packet` (an ethernet frame for TC programs) `repeat` times
    /// in the kernel with BPF_PROG_TEST_RUN. The packet arrives on the loopback device of
    /// the caller's network namespace: route its ifindex (1) to a slot to attribute it.
    pub fn test_run(
        &self,
        prog: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> std::io::Result<TestRun> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let program = self.ebpf.program(prog).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("program {prog}"))
        })?;
        let fd = program
            .fd()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .as_fd()
            .as_raw_fd();
        let mut out = vec![0u8; packet.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: fd as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ..Default::default()
        };
        // SAFETY: attr points at the packet and the output buffer, both alive for the call
        // and as long as the sizes it gives.
        unsafe { crate::sys::bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
        out.truncate(attr.data_size_out as usize);
        Ok(TestRun {
            retval: attr.retval as i32,
            duration_ns: attr.duration,
            data: out,
        })
    }
}
