//! The admin interface: a Unix socket (root only, peer credentials checked) that `tollgate
//! status`, `tollgate mode` and `tollgate flows` talk to, one JSON request and one JSON
//! reply per connection. Also the runtime mode overrides and their audit log.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::compile::model::Target;
use crate::compile::model::{Mode, PodInfo, most_specific};

/// Default path of the admin socket (`--admin-socket`).
pub const DEFAULT_SOCKET: &str = "/run/tollgate/admin.sock";

/// A request to the running agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Sets (mode `Some`) or clears (`None`) the runtime override of a target.
    Mode {
        target: String,
        mode: Option<Mode>,
        /// Seconds: refuse a flip to drop unless every workload the target matches here was
        /// observed that long without a would-drop (`mode set --if-quiet`).
        #[serde(default)]
        if_quiet: Option<u64>,
        /// Who asked, as the client knows it (e.g. `$SUDO_USER`); the agent adds the peer's
        /// uid and pid from the socket.
        who: Option<String>,
    },
    /// The busiest flow series and the latest would-drops.
    Flows {
        limit: usize,
    },
    /// The peer pairs observed within `window` seconds (`tollgate graph`).
    Observed {
        window: u64,
    },
    /// Policies from the peer pairs observed within `window` seconds (`tollgate advise`).
    Advise {
        window: u64,
        #[serde(default)]
        options: crate::compile::advise::AdviseOptions,
    },
}

/// The agent's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Mode(ModeChange),
    Flows(Flows),
    Advice(crate::compile::advise::Advice),
    /// (A struct variant: an internally tagged enum cannot hold a bare list.)
    Observed {
        flows: Vec<crate::compile::advise::ObservedFlow>,
    },
    Error {
        message: String,
    },
}

/// Packets and bytes of one direction by verdict.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirectionCounters {
    pub allowed: u64,
    pub would_drop: u64,
    pub dropped: u64,
    pub allowed_bytes: u64,
    pub would_drop_bytes: u64,
    pub dropped_bytes: u64,
}

/// One workload in `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub namespace: String,
    pub pod: String,
    pub workload: String,
    /// `tcx`, `clsact` or `cgroup`.
    pub attach: String,
    /// Interface or cgroup directory.
    pub attached_at: String,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    pub mode: Mode,
    /// Where the mode comes from: `node-override`, `cluster-override`, `pod`, `namespace` or
    /// `default`.
    pub mode_source: String,
    pub ingress: DirectionCounters,
    pub egress: DirectionCounters,
    /// Seconds since the last would-drop of its workload (any of its pods, across
    /// rollouts and agent restarts), if any was seen.
    pub seconds_since_would_drop: Option<u64>,
    /// Seconds its workload has been observed on this node (how long the quiet above has
    /// had to prove itself: two hours have not seen the nightly batch job).
    #[serde(default)]
    pub observed_seconds: Option<u64>,
    /// Would-drop packets of its workload in the last hour and the last day.
    #[serde(default)]
    pub would_drop_last_hour: u64,
    #[serde(default)]
    pub would_drop_last_day: u64,
    /// Its latest would-drop flow the flow log sampled (one line), and why it is denied
    /// with the smallest change that would allow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_would_drop: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_would_drop_explanation: Option<String>,
    /// Packets it sent from addresses that are not its own.
    #[serde(default)]
    pub spoofed: u64,
    /// EgressAllowlists that select it (`NAMESPACE/NAME`): it is isolated for egress to
    /// addresses outside the cluster, which only ipBlocks and its DNS answers allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allowlists: Vec<String>,
    /// New connections to addresses whose DNS answer had expired (TTL, floor, grace).
    #[serde(default)]
    pub egress_expired: u64,
    /// Why its rules are not fully in force, if they are not.
    #[serde(default)]
    pub degraded: Option<String>,
}

/// The agent's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    /// As `/readyz`: the policy synced and nothing degraded (`degraded` says why not).
    pub ready: bool,
    pub workloads: Vec<WorkloadStatus>,
    pub policies: usize,
    pub policy_errors: Vec<String>,
    /// Node-local overrides (break glass), by target.
    pub overrides: BTreeMap<String, Mode>,
    /// Cluster `ModeOverride`s.
    #[serde(default)]
    pub cluster_overrides: Vec<ClusterOverride>,
    /// Notes on the cluster state that are not errors (ignored mode annotations, SCTP).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Pods refused an attachment point that is not provably theirs.
    #[serde(default)]
    pub refused: Vec<String>,
    /// Why the agent is degraded (`/readyz` fails while this is not empty).
    #[serde(default)]
    pub degraded: Vec<String>,
    /// The node's own addresses (the peer `host`).
    #[serde(default)]
    pub host_addresses: Vec<String>,
}

/// A cluster `ModeOverride` in `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterOverride {
    pub name: String,
    pub target: String,
    pub mode: Mode,
    pub reason: String,
}

/// What a mode change did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModeChange {
    pub target: String,
    pub old: Option<Mode>,
    pub new: Option<Mode>,
    /// Workloads whose effective mode changed: (namespace/pod, old, new).
    pub changed: Vec<(String, Mode, Mode)>,
    /// Workloads the target matches.
    pub matched: usize,
}

/// One flow series.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowRow {
    pub direction: String,
    pub verdict: String,
    pub src: String,
    pub dst: String,
    pub protocol: String,
    pub port: String,
    pub packets: u64,
    /// The DNS name a destination outside the cluster was resolved from (`dst` is then
    /// `world:NAME`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst_domain: String,
    /// For a would-drop or drop: the side that denies it, the policies isolating that
    /// side and the smallest change that would allow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
}

impl FlowRow {
    /// The series as an observed peer pair (for explanations).
    pub fn as_observed(&self) -> crate::compile::advise::ObservedFlow {
        let split = |s: &str| {
            let (ns, w) = s.split_once('/').unwrap_or((s, s));
            (ns.to_string(), w.to_string())
        };
        let (src_namespace, src_workload) = split(&self.src);
        let (dst_namespace, dst_workload) = if self.dst.starts_with("world:") {
            ("world".to_string(), "world".to_string())
        } else {
            split(&self.dst)
        };
        let packets = match self.verdict.as_str() {
            "would_drop" => [0, self.packets, 0],
            "dropped" => [0, 0, self.packets],
            _ => [self.packets, 0, 0],
        };
        crate::compile::advise::ObservedFlow {
            direction: self.direction.clone(),
            src_namespace,
            src_workload,
            dst_namespace,
            dst_workload,
            protocol: self.protocol.clone(),
            port: self.port.parse().unwrap_or(0),
            first_seen: 0,
            last_seen: 0,
            packets,
            dst_domain: self.dst_domain.clone(),
            world_addresses: Vec::new(),
            last_would_drop: 0,
        }
    }
}

/// The answer to `flows`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flows {
    pub busiest: Vec<FlowRow>,
    /// Latest flow log records (would-drops and drops), newest last.
    pub recent_denied: Vec<serde_json::Value>,
}

/// Sends one request to the agent and reads its reply.
pub fn request(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    use anyhow::Context as _;
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to the agent at {} (is `tollgate run` running, and are you root?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("read the agent's reply")?;
    serde_json::from_str(&reply).with_context(|| format!("the agent's reply {reply:?}"))
}

/// Runtime mode overrides by target, persisted in the state directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Overrides {
    pub targets: BTreeMap<String, Mode>,
}

impl Overrides {
    /// The override that applies to a pod: the most specific matching target.
    pub fn mode_for(&self, pod: &PodInfo) -> Option<Mode> {
        let parsed: Vec<(Target, Mode)> = self
            .targets
            .iter()
            .filter_map(|(t, m)| Target::parse(t).ok().map(|t| (t, *m)))
            .collect();
        most_specific(pod, parsed.iter().map(|(t, m)| (t, *m)))
    }

    pub fn load(path: &Path) -> anyhow::Result<Overrides> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e} (fix or remove the file)", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overrides::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(
            path,
            serde_json::to_string_pretty(self)
                .expect("serializable")
                .as_bytes(),
        )
    }
}

/// Reads what an earlier agent kept in `path` (JSON): the default when there is nothing
/// yet, and when it cannot be read (said so, naming `what` starts afresh).
pub fn read_kept<T: serde::de::DeserializeOwned + Default>(path: &Path, what: &str) -> T {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("{}: unreadable ({e}); {what} start afresh", path.display());
            T::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => T::default(),
        Err(e) => {
            tracing::warn!("{}: {e}; {what} start afresh", path.display());
            T::default()
        }
    }
}

/// Writes a file by rename, so a crash leaves the old or the new content, never half.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// One line of the audit log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditRecord {
    pub time: String,
    pub who: String,
    pub target: String,
    pub old_mode: Option<Mode>,
    pub new_mode: Option<Mode>,
    /// Workloads whose effective mode changed.
    pub changed: Vec<(String, Mode, Mode)>,
}

/// Appends a record to the audit log (JSON lines).
pub fn audit(path: &Path, record: &AuditRecord) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut line = serde_json::to_string(record).expect("serializable");
    line.push('\n');
    f.write_all(line.as_bytes())?;
    f.sync_data()
}

/// The peer's credentials on a Unix socket: (uid, pid).
pub fn peer_credentials(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<(u32, i32)> {
    use std::os::fd::AsRawFd as _;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid socket fd and a ucred-sized buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_override_wins() {
        let mut o = Overrides::default();
        o.targets.insert("*".into(), Mode::Drop);
        o.targets.insert("bank/*".into(), Mode::Log);
        o.targets.insert("bank/ledger-1".into(), Mode::Drop);
        let pod = |ns: &str, name: &str| PodInfo {
            namespace: ns.into(),
            name: name.into(),
            workload: name.trim_end_matches("-1").into(),
            ..PodInfo::default()
        };
        assert_eq!(o.mode_for(&pod("bank", "ledger-1")), Some(Mode::Drop));
        assert_eq!(o.mode_for(&pod("bank", "pot-1")), Some(Mode::Log));
        assert_eq!(o.mode_for(&pod("monitoring", "p")), Some(Mode::Drop));
        assert_eq!(Overrides::default().mode_for(&pod("a", "b")), None);
        // A workload name covers its pods; the pod's own name is more specific.
        o.targets.insert("bank/pot".into(), Mode::Drop);
        assert_eq!(o.mode_for(&pod("bank", "pot-1")), Some(Mode::Drop));
        o.targets.insert("bank/pot-1".into(), Mode::Log);
        assert_eq!(o.mode_for(&pod("bank", "pot-1")), Some(Mode::Log));
    }

    #[test]
    fn targets_are_validated() {
        assert_eq!(Target::parse("*"), Ok(Target::All));
        assert_eq!(
            Target::parse("bank/*"),
            Ok(Target::Namespace("bank".into()))
        );
        assert!(Target::parse("bank").is_err());
        assert!(Target::parse("Bank/x").is_err());
        assert!(Target::parse("/x").is_err());
        // A namespace is a DNS label: no dots (the CRD's pattern says so too).
        assert!(Target::parse("team.a/api").is_err());
        assert!(Target::parse("team-a/api.v2").is_ok());
    }
}
