//! The agent's side of DNS learning: a thread that reads `DNS_EVENTS`, feeds the
//! [`Learner`], writes `LEARNED`, hands held answers back to their workloads, and tells the
//! datapath it is there (`DNS_CONTROL`).

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent_common::{
    DNS_REINJECT_MARK, DnsCapture, DnsControl, LearnedKey, LearnedValue, WorkloadConfig,
    capture_kind, map_names,
};
use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, RingBuf};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{DnsOptions, DnsStats, LearnedWrite, Learner};
use crate::controller::View;

/// How long the datapath holds answers after the agent last said it is there: an agent
/// that dies stalls answers at most this long (resolvers' clients retry).
const HOLD_LEASE: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_millis(500);

/// The DNS thread's counters as kept in `--state-dir` (`dns-counters.json`), so a restarted
/// agent continues them: written before each publish that changed them, so a scrape never
/// sees a value a restart could go back behind.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct KeptCounters {
    stats: DnsStats,
    reinjected: u64,
    reinject_failed: u64,
    /// Addresses each workload's answers held beyond what it may keep: (slot, generation,
    /// count).
    overflow: Vec<(u32, u32, u64)>,
}

/// What the DNS thread reports for metrics and `status`.
#[derive(Clone, Debug, Default)]
pub struct DnsReport {
    pub stats: DnsStats,
    /// (slot, addresses kept, addresses that did not fit).
    pub per_slot: Vec<(u32, usize, u64)>,
    /// Held answers handed back, and those that could not be.
    pub reinjected: u64,
    pub reinject_failed: u64,
}

/// Sends frames out of a host-side interface toward its workload, marked so the datapath
/// lets them through.
struct Reinjector {
    fd: OwnedFd,
}

impl Reinjector {
    fn new() -> std::io::Result<Reinjector> {
        // SAFETY: plain socket(2); protocol 0 receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mark = DNS_REINJECT_MARK;
        // SAFETY: setsockopt with a u32 value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                size_of::<u32>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Reinjector { fd })
    }

    fn send(&self, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        if frame.len() < 14 {
            return Err(std::io::Error::other(
                "frame shorter than an Ethernet header",
            ));
        }
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: sendto with a valid buffer and address of the stated size.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sets the UDP or TCP checksum of an IPv4 or IPv6 packet at `l3` in `frame`. A packet a
/// resolver on this node sent may carry only the partial checksum the sender left for
/// offload (CHECKSUM_PARTIAL); handed back as a plain frame it must carry the whole one.
pub fn fill_l4_checksum(frame: &mut [u8], l3: usize) -> Option<()> {
    fn add(sum: &mut u32, bytes: &[u8]) {
        for chunk in bytes.chunks(2) {
            let word = if chunk.len() == 2 {
                u16::from_be_bytes([chunk[0], chunk[1]])
            } else {
                u16::from_be_bytes([chunk[0], 0])
            };
            *sum += word as u32;
        }
    }
    let ip = frame.get_mut(l3..)?;
    let mut sum = 0u32;
    let (proto, l4_start, l4_len) = match ip.first()? >> 4 {
        4 => {
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize;
            add(&mut sum, ip.get(12..20)?);
            (*ip.get(9)?, ihl, total.checked_sub(ihl)?)
        }
        6 => {
            let payload = u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]) as usize;
            add(&mut sum, ip.get(8..40)?);
            (*ip.get(6)?, 40, payload)
        }
        _ => return None,
    };
    let at = match proto {
        agent_common::PROTO_UDP => 6,
        agent_common::PROTO_TCP => 16,
        _ => return None,
    };
    let l4 = ip.get_mut(l4_start..l4_start + l4_len)?;
    sum += proto as u32;
    sum += l4_len as u32;
    l4.get_mut(at..at + 2)?.copy_from_slice(&[0, 0]);
    add(&mut sum, l4);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut check = !(sum as u16);
    if check == 0 && proto == agent_common::PROTO_UDP {
        check = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&check.to_be_bytes());
    Some(())
}

/// CLOCK_MONOTONIC in ns (the coarse clock the datapath reads is never ahead of it).
fn now_ns() -> u64 {
    crate::flows::monotonic_ns()
}

/// The DNS thread's handles and state.
pub struct DnsRuntime {
    ring: RingBuf<MapData>,
    learned: HashMap<MapData, LearnedKey, LearnedValue>,
    control: Array<MapData, DnsControl>,
    workloads: Array<MapData, WorkloadConfig>,
    learner: Learner,
    /// `None` when the socket cannot be opened (no CAP_NET_RAW): answers are then never held.
    reinjector: Option<Reinjector>,
    domains_path: PathBuf,
    report: Arc<Mutex<DnsReport>>,
    reinjected: u64,
    reinject_failed: u64,
    counters_path: PathBuf,
    /// What `counters_path` holds.
    kept: KeptCounters,
}

fn open<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    pin_dir: &Path,
    name: &str,
) -> anyhow::Result<T> {
    let data = MapData::from_pin(crate::pins::map_pin(pin_dir, name))
        .with_context(|| format!("open pinned map {name}"))?;
    T::try_from(aya::maps::Map::from_map_data(data).with_context(|| format!("map {name}"))?)
        .with_context(|| format!("map {name}"))
}

impl DnsRuntime {
    /// Opens the pinned maps, loads the domain names an earlier agent handed out, and takes
    /// back what it learned.
    pub fn new(
        ring: RingBuf<MapData>,
        pin_dir: &Path,
        state_dir: &Path,
        options: DnsOptions,
    ) -> anyhow::Result<DnsRuntime> {
        let domains_path = state_dir.join("dns-names.json");
        super::load_domains(&domains_path)?;
        let counters_path = state_dir.join("dns-counters.json");
        let kept: KeptCounters = crate::admin::read_kept(&counters_path, "DNS counters");
        let learned: HashMap<MapData, LearnedKey, LearnedValue> =
            open(pin_dir, map_names::LEARNED)?;
        let mut learner = Learner::new(options);
        learner.stats = kept.stats;
        let adopted: Vec<(LearnedKey, LearnedValue)> =
            learned.iter().filter_map(Result::ok).collect();
        if !adopted.is_empty() {
            info!(
                addresses = adopted.len(),
                "adopted what DNS answers taught before the restart"
            );
        }
        learner.adopt(adopted);
        learner.restore_overflow(&kept.overflow);
        Ok(DnsRuntime {
            ring,
            learned,
            control: open(pin_dir, map_names::DNS_CONTROL)?,
            workloads: open(pin_dir, map_names::WORKLOADS)?,
            learner,
            reinjector: match Reinjector::new() {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!(error = %e, "no packet socket to hand DNS answers back (CAP_NET_RAW?): answers are not held, and the first connection after a lookup races the agent");
                    None
                }
            },
            domains_path,
            report: Arc::default(),
            reinjected: kept.reinjected,
            reinject_failed: kept.reinject_failed,
            counters_path,
            kept,
        })
    }

    /// What metrics read.
    pub fn report(&self) -> Arc<Mutex<DnsReport>> {
        self.report.clone()
    }

    fn apply(&mut self, writes: Vec<LearnedWrite>) {
        for w in writes {
            let result = match &w {
                LearnedWrite::Put(k, v) => self.learned.insert(k, v, 0),
                LearnedWrite::Delete(k) => match self.learned.remove(k) {
                    Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                    r => r,
                },
            };
            if let Err(e) = result {
                warn!(error = %e, "could not write what a DNS answer taught");
            }
        }
    }

    fn set_hold(&mut self, until_ns: u64) {
        if let Err(e) = self.control.set(
            0,
            DnsControl {
                hold_until_ns: until_ns,
            },
            0,
        ) {
            warn!(error = %e, "could not write DNS_CONTROL");
        }
    }

    /// Every capture available now: learned from, then handed back if held.
    fn drain(&mut self) {
        let mut captures = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<DnsCapture>() {
                // SAFETY: the kernel wrote a whole DnsCapture; read it unaligned.
                captures
                    .push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DnsCapture>()) });
            }
        }
        let delay = self.learner.options().learn_delay;
        for capture in captures {
            if !delay.is_zero() && capture.kind != capture_kind::QUERY {
                std::thread::sleep(delay);
            }
            let writes = self.learner.packet(&capture, now_ns());
            self.apply(writes);
            if capture.kind == capture_kind::ANSWER_HELD {
                let len = (capture.len as usize).min(capture.data.len());
                let mut frame = capture.data[..len].to_vec();
                fill_l4_checksum(&mut frame, capture.l3_offset as usize);
                let Some(reinjector) = &self.reinjector else {
                    self.reinject_failed += 1;
                    continue;
                };
                match reinjector.send(capture.ifindex, &frame) {
                    Ok(()) => self.reinjected += 1,
                    Err(e) => {
                        self.reinject_failed += 1;
                        warn!(error = %e, ifindex = capture.ifindex, "could not hand a DNS answer back");
                    }
                }
            }
        }
    }

    /// Brings the learner's workloads in line with the published view.
    fn sync_view(&mut self, view: &View) {
        let mut present = BTreeSet::new();
        for w in &view.workloads {
            let Ok(config) = self.workloads.get(&w.slot, 0) else {
                continue;
            };
            present.insert(w.slot);
            let writes =
                self.learner
                    .set_workload(w.slot, config.generation, w.egress_allowlist.clone());
            self.apply(writes);
        }
        for slot in self.learner.slots() {
            if !present.contains(&slot) {
                let writes = self.learner.remove_workload(slot);
                self.apply(writes);
            }
        }
    }

    /// Makes the counters visible to metrics and `status`, after writing them to
    /// `--state-dir` when they moved.
    fn publish(&mut self) {
        let counters = KeptCounters {
            stats: self.learner.stats,
            reinjected: self.reinjected,
            reinject_failed: self.reinject_failed,
            overflow: self.learner.overflow(),
        };
        if counters != self.kept {
            let written = serde_json::to_vec(&counters)
                .map_err(std::io::Error::other)
                .and_then(|bytes| crate::admin::write_atomic(&self.counters_path, &bytes));
            match written {
                Ok(()) => self.kept = counters,
                Err(e) => warn!(error = %e, "could not keep the DNS counters"),
            }
        }
        let mut r = self.report.lock().expect("dns report");
        r.stats = self.learner.stats;
        r.per_slot = self.learner.per_workload();
        r.reinjected = self.reinjected;
        r.reinject_failed = self.reinject_failed;
    }

    /// Runs until `stop`; then stops holding answers, hands back what is held and saves.
    pub fn run(mut self, mut view: watch::Receiver<Arc<View>>, stop: Arc<AtomicBool>) {
        let mut last_beat = Instant::now() - HEARTBEAT;
        view.mark_changed();
        while !stop.load(Ordering::Relaxed) {
            if last_beat.elapsed() >= HEARTBEAT {
                if self.reinjector.is_some() {
                    self.set_hold(now_ns() + HOLD_LEASE.as_nanos() as u64);
                } else {
                    self.set_hold(0);
                }
                let writes = self.learner.expire(now_ns());
                self.apply(writes);
                if let Err(e) = super::save_domains(&self.domains_path) {
                    warn!(error = %e, "could not save the DNS names");
                }
                self.publish();
                last_beat = Instant::now();
            }
            // Only a view of a reconcile that ran: the empty one before it would make the
            // learner forget what an earlier agent learned.
            if view.has_changed().unwrap_or(false) {
                let v = view.borrow_and_update().clone();
                if v.ready {
                    self.sync_view(&v);
                }
            }
            self.drain();
            let mut pfd = libc::pollfd {
                fd: self.ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
        self.set_hold(0);
        // Answers captured before the datapath saw the 0 are still held: hand them back.
        std::thread::sleep(Duration::from_millis(20));
        self.drain();
        if let Err(e) = super::save_domains(&self.domains_path) {
            warn!(error = %e, "could not save the DNS names");
        }
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::fill_l4_checksum;

    /// A UDP datagram as a resolver sent it, with its checksum as the wire had it.
    #[test]
    fn checksums_match_what_the_sender_computed() {
        // IPv4 10.1.0.13:53 -> 10.1.0.10:40000, 4 bytes of payload; checksum computed by
        // hand over the pseudo-header.
        let mut ip = vec![
            0x45, 0, 0, 32, 0, 0, 0, 0, 64, 17, 0, 0, 10, 1, 0, 13, 10, 1, 0, 10, 0, 53, 0x9c,
            0x40, 0, 12, 0xab, 0xcd, 1, 2, 3, 4,
        ];
        let good = [ip[26], ip[27]];
        ip[26] = 0x12;
        ip[27] = 0x34;
        fill_l4_checksum(&mut ip, 0).unwrap();
        assert_ne!([ip[26], ip[27]], [0x12, 0x34]);
        // Verifying: the one's complement sum over pseudo-header and datagram is 0xffff.
        let mut sum: u32 = 0;
        for w in ip[12..20].chunks(2) {
            sum += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
        sum += 17 + 12;
        for w in ip[20..].chunks(2) {
            sum += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        let _ = good;
    }
}
