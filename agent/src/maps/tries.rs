//! One LPM trie per ruleset, held by ruleset in a map of maps (`POLICY`, `CIDR_RULES`).
//!
//! A lookup in one shared trie walks past the branches of every other ruleset on its way
//! down, so it got slower with every other workload's rules; a trie of its own holds only
//! the ruleset's entries. The tries are created here on a ruleset's first entry and stay
//! (empty) when its entries go, for the next workload of the slot: an empty trie is a few
//! hundred bytes of kernel memory.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use agent_common::RULESET_CAPACITY;
use aya::{
    Pod,
    maps::{ArrayOfMaps, LpmTrie, Map, MapData, lpm_trie::Key},
};

use super::{MapsError, ignore_missing, map_err};

/// `BPF_F_NO_PREALLOC` of the kernel's uapi: LPM tries must be created with it.
const BPF_F_NO_PREALLOC: u32 = 1;

/// The tries of one map of maps, by ruleset.
pub struct RulesetTries<K: Pod, V: Pod> {
    name: &'static str,
    outer: ArrayOfMaps<MapData, LpmTrie<MapData, K, V>>,
    /// The capacity of each trie: the kernel accepts only inner maps of the capacity the
    /// object declared.
    trie_capacity: u32,
    /// Where each trie is pinned (`<map>_RULESET_<ruleset>`; bpffs keeps dots in names for
    /// itself), beside the map of maps: how an agent after a restart finds them without
    /// CAP_SYS_ADMIN (which opening a map by id needs).
    pin_dir: PathBuf,
    /// Handles on the tries this process wrote or removed entries in (opened as it first
    /// touches a ruleset; a reader opens each trie only to count it).
    tries: BTreeMap<u32, LpmTrie<MapData, K, V>>,
}

impl<K: Pod, V: Pod> RulesetTries<K, V> {
    /// The tries of `map` (the map of maps named `name`), each of `trie_capacity` entries,
    /// pinned under `pin_dir`.
    pub fn new(
        name: &'static str,
        map: Map,
        trie_capacity: u32,
        pin_dir: &Path,
    ) -> Result<Self, MapsError> {
        let outer = ArrayOfMaps::try_from(map).map_err(map_err(name))?;
        Ok(RulesetTries {
            name,
            outer,
            trie_capacity,
            pin_dir: pin_dir.to_owned(),
            tries: BTreeMap::new(),
        })
    }

    fn pin_path(&self, ruleset: u32) -> PathBuf {
        self.pin_dir
            .join(format!("{}_RULESET_{ruleset}", self.name))
    }

    /// The rulesets whose tries are pinned now.
    fn pinned(&self) -> Result<Vec<u32>, MapsError> {
        let prefix = format!("{}_RULESET_", self.name);
        let dir = match std::fs::read_dir(&self.pin_dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => {
                return Err(MapsError::Io {
                    what: "the pin directory",
                    source,
                });
            }
        };
        Ok(dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix(&prefix)?
                    .parse::<u32>()
                    .ok()
            })
            .filter(|r| *r < RULESET_CAPACITY)
            .collect())
    }

    fn open(&self, ruleset: u32) -> Result<LpmTrie<MapData, K, V>, MapsError> {
        let data = MapData::from_pin(self.pin_path(ruleset)).map_err(map_err(self.name))?;
        let map = Map::from_map_data(data).map_err(map_err(self.name))?;
        LpmTrie::try_from(map).map_err(map_err(self.name))
    }

    /// The trie of `ruleset` if it has one (pinned by this process or an earlier one). A
    /// trie an earlier agent pinned is put in place again as it is first opened: the map
    /// of maps the programs read then holds it whatever happened in between.
    fn existing(&mut self, ruleset: u32) -> Result<Option<&mut LpmTrie<MapData, K, V>>, MapsError> {
        if !self.tries.contains_key(&ruleset) {
            if !self.pin_path(ruleset).exists() {
                return Ok(None);
            }
            let trie = self.open(ruleset)?;
            self.outer
                .set(ruleset, &trie, 0)
                .map_err(map_err(self.name))?;
            self.tries.insert(ruleset, trie);
        }
        Ok(self.tries.get_mut(&ruleset))
    }

    /// The trie of `ruleset`, created, pinned and put in place when it has none yet.
    fn trie_mut(&mut self, ruleset: u32) -> Result<&mut LpmTrie<MapData, K, V>, MapsError> {
        if self.existing(ruleset)?.is_none() {
            let created = LpmTrie::<MapData, K, V>::create(self.trie_capacity, BPF_F_NO_PREALLOC)
                .map_err(map_err(self.name))?;
            let path = self.pin_path(ruleset);
            // Pinning consumes the handle; the pin keeps the trie, and a new handle opens it.
            created
                .pin(&path)
                .map_err(|e| pin_error("pinning a ruleset trie", &path, e))?;
            let trie = self.open(ruleset)?;
            if let Err(e) = self.outer.set(ruleset, &trie, 0) {
                let _ = std::fs::remove_file(&path);
                return Err(map_err(self.name)(e));
            }
            self.tries.insert(ruleset, trie);
        }
        Ok(self.tries.get_mut(&ruleset).expect("inserted above"))
    }

    /// Writes `value` at (`prefix`, `data`) in the trie of `ruleset`.
    pub fn insert(
        &mut self,
        ruleset: u32,
        prefix: u32,
        data: K,
        value: V,
    ) -> Result<(), MapsError> {
        let name = self.name;
        self.trie_mut(ruleset)?
            .insert(&Key::new(prefix, data), value, 0)
            .map_err(map_err(name))
    }

    /// Removes (`prefix`, `data`) from the trie of `ruleset`; a missing entry (or trie) is
    /// not an error.
    pub fn remove(&mut self, ruleset: u32, prefix: u32, data: K) -> Result<(), MapsError> {
        let name = self.name;
        match self.existing(ruleset)? {
            Some(trie) => {
                ignore_missing(trie.remove(&Key::new(prefix, data))).map_err(map_err(name))
            }
            None => Ok(()),
        }
    }

    /// Every entry of every trie: (ruleset, prefix, data, value).
    pub fn entries(&mut self) -> Result<Vec<(u32, u32, K, V)>, MapsError> {
        let name = self.name;
        let mut out = Vec::new();
        for ruleset in self.pinned()? {
            if let Some(trie) = self.existing(ruleset)? {
                for item in trie.iter() {
                    let (key, value) = item.map_err(map_err(name))?;
                    out.push((ruleset, key.prefix_len(), key.data(), value));
                }
            }
        }
        Ok(out)
    }

    /// Entries of all tries pinned now, by whichever process.
    pub fn count(&self) -> Result<usize, MapsError> {
        let mut n = 0;
        for ruleset in self.pinned()? {
            n += match self.tries.get(&ruleset) {
                Some(known) => known.keys().count(),
                None => self.open(ruleset)?.keys().count(),
            };
        }
        Ok(n)
    }
}

/// The pin error of `path` with its cause (aya's own message leaves the errno out).
fn pin_error(what: &'static str, path: &Path, e: aya::pin::PinError) -> MapsError {
    let message = match std::error::Error::source(&e) {
        Some(cause) => format!("{}: {e}: {cause}", path.display()),
        None => format!("{}: {e}", path.display()),
    };
    MapsError::Io {
        what,
        source: std::io::Error::other(message),
    }
}

/// Creates the map of maps `name`, of tries keyed by `K` holding `V`, and pins it under
/// `pin_dir`, unless it is pinned there already; the loader then adopts the pin. Its
/// template trie has no BTF, like the tries created here: kernels before 6.2 refuse an
/// inner map whose BTF differs from the template's (a template the loader made from the
/// object's BTF has some), so the loader must not make it.
pub fn pin_map_of_tries<K: Pod, V: Pod>(
    pin_dir: &Path,
    name: &'static str,
    trie_capacity: u32,
) -> Result<(), MapsError> {
    let path = crate::pins::map_pin(pin_dir, name);
    if path.exists() {
        return Ok(());
    }
    let io = |what: &'static str| move |source| MapsError::Io { what, source };
    let template = create_map(
        BPF_MAP_TYPE_LPM_TRIE,
        size_of::<Key<K>>() as u32,
        size_of::<V>() as u32,
        trie_capacity,
        BPF_F_NO_PREALLOC,
        None,
    )
    .map_err(io("creating a ruleset trie template"))?;
    let outer = create_map(
        BPF_MAP_TYPE_ARRAY_OF_MAPS,
        4,
        4,
        RULESET_CAPACITY,
        0,
        Some(template.as_raw_fd()),
    )
    .map_err(io("creating a map of ruleset tries"))?;
    let outer = MapData::from_fd(outer).map_err(map_err(name))?;
    outer
        .pin(&path)
        .map_err(|e| pin_error("pinning a map of ruleset tries", &path, e))
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The `BPF_MAP_CREATE` part of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    btf_vmlinux_value_type_id: u32,
    map_extra: u64,
}

fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: Option<RawFd>,
) -> std::io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
        inner_map_fd: inner_map_fd.unwrap_or(0) as u32,
        ..MapCreateAttr::default()
    };
    // SAFETY: BPF_MAP_CREATE returns a new descriptor; its attribute holds no pointers.
    unsafe { crate::sys::bpf_fd(BPF_MAP_CREATE, &mut attr) }
}
