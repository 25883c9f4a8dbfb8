//! The run directory (DESIGN §3): a frozen copy of the config, `manifest.json`, one directory of
//! shards per stage and the exports. The shards are the source of truth; the manifest is a
//! summary for people and for `rbon status`, rewritten atomically after every change.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};
use crate::seed::hex;
use crate::shard::{self, ShardMeta};
use crate::stage::{StageName, shard_file_name};

/// The frozen copy of the pipeline that made the run.
pub const FROZEN_CONFIG: &str = "pipeline.yaml";
/// Per stage: fingerprint, shards done, counters.
pub const MANIFEST: &str = "manifest.json";
/// The report of a merged run.
pub const REPORT_DIR: &str = "report";
/// The variational-BoN export.
pub const VBON_DIR: &str = "vbon";
/// Entries rbon writes in a run directory besides the stages' folders.
pub const OWNED_FILES: [&str; 5] = [FROZEN_CONFIG, MANIFEST, REPORT_DIR, VBON_DIR, RANKS_DIR];
/// Where each rank records its plan and progress.
pub const RANKS_DIR: &str = "ranks";
/// The manifest's entry for the exports (beside the stages').
pub const EXPORT_ENTRY: &str = "export";

/// Hash of a stage's own configuration and its inputs' fingerprints. Configs serialize with a
/// fixed field order (no hash maps), so equal configs give equal fingerprints.
pub fn fingerprint<T: Serialize>(stage: &str, config: &T, upstream: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(stage.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(config).unwrap_or_default());
    for u in upstream {
        h.update([0]);
        h.update(u.as_bytes());
    }
    hex(&h.finalize()[..16])
}

/// Per-stage state in the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageState {
    /// Fingerprint of the configuration and inputs the stage's output was made with.
    pub fingerprint: String,
    /// Shards the stage has in all.
    pub shards: usize,
    /// Shards written so far.
    pub done: usize,
    /// Every shard is written.
    pub complete: bool,
    /// Sums of the shards' counters.
    pub counters: BTreeMap<String, u64>,
}

/// `manifest.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of rbon that last wrote the run.
    pub rbon_version: String,
    /// The pipeline's `name`.
    pub name: String,
    /// Per stage (`prompts`, `samples`, `scores`, `selections`, `pairs`, `export`).
    pub stages: BTreeMap<String, StageState>,
}

/// One rank's plan and progress, `ranks/rank-00003.json`, written only by that rank (so ranks
/// never contend for a file on a shared filesystem). `rbon status` and `rbon finalize` read them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankState {
    pub rank: usize,
    pub world_size: usize,
    /// Shards of the whole run (all ranks).
    pub shards: usize,
    /// The shard stages in pipeline order.
    pub chain: Vec<StageName>,
    /// Per stage: fingerprint, and this rank's shards (`shards` = owned, `done`, counters).
    pub stages: BTreeMap<String, StageState>,
    /// Fingerprint the merged exports must carry.
    pub export_fingerprint: String,
    /// Every owned shard went through every stage.
    pub complete: bool,
}

impl RankState {
    /// The shards rank `rank` of `world_size` owns among `shards`.
    pub fn owned(rank: usize, world_size: usize, shards: usize) -> impl Iterator<Item = usize> {
        (rank..shards).step_by(world_size.max(1))
    }
}

/// What a shard on disk is, to a run about to make it.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardState {
    Done(ShardMeta),
    ToMake,
    /// Made under this configuration but not intact any more; says what is wrong.
    Corrupt(String),
}

/// Holds a run directory's lock.
#[derive(Debug)]
pub struct RunLock(#[allow(dead_code)] fs::File);

/// A run directory on disk.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Opens (creating if needed) the run directory at `root`.
    pub fn create(root: &Path) -> Result<Self> {
        fs::create_dir_all(root).map_err(|e| CoreError::io(root, e))?;
        Ok(Self { root: root.to_owned() })
    }

    /// An existing run directory (one with `manifest.json`).
    pub fn open(root: &Path) -> Option<Self> {
        root.join(MANIFEST).is_file().then(|| Self { root: root.to_owned() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stage_dir(&self, stage: StageName) -> PathBuf {
        self.root.join(stage.as_str())
    }

    /// `<stage>/shard-00042.parquet`.
    pub fn shard_path(&self, stage: StageName, shard: usize) -> PathBuf {
        self.stage_dir(stage).join(shard_file_name(shard))
    }

    /// The metadata of a finished, intact shard made with `fingerprint`, or `None` when the
    /// shard must be (re)made.
    pub fn finished_shard(&self, stage: StageName, shard: usize, fingerprint: &str) -> Option<ShardMeta> {
        match self.shard_state(stage, shard, fingerprint) {
            ShardState::Done(m) => Some(m),
            _ => None,
        }
    }

    /// What a shard of `stage` is: done (made with `fingerprint`, and its bytes match its
    /// check), to be made (missing, or made under another configuration), or corrupt
    /// (unreadable, or made with `fingerprint` but changed since).
    pub fn shard_state(&self, stage: StageName, shard: usize, fingerprint: &str) -> ShardState {
        let p = self.shard_path(stage, shard);
        if !p.is_file() {
            return ShardState::ToMake;
        }
        match shard::read_checked(&p, fingerprint) {
            Ok(Some(Ok(m))) => ShardState::Done(m),
            Ok(Some(Err(why))) => ShardState::Corrupt(format!("{}: {why}", p.display())),
            Ok(None) => ShardState::ToMake,
            Err(e) => ShardState::Corrupt(e.to_string()),
        }
    }

    /// Deletes a stage's directory (its configuration or inputs changed).
    pub fn clear_stage(&self, stage: StageName) -> Result<()> {
        let d = self.stage_dir(stage);
        if d.exists() {
            fs::remove_dir_all(&d).map_err(|e| CoreError::io(&d, e))?;
        }
        Ok(())
    }

    /// Removes everything rbon owns in the directory, leaving files users put there.
    pub fn clear_all(&self) -> Result<()> {
        for name in StageName::ALL.iter().map(|s| s.as_str()).chain(OWNED_FILES) {
            let p = self.root.join(name);
            let res = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else if p.exists() {
                fs::remove_file(&p)
            } else {
                Ok(())
            };
            res.map_err(|e| CoreError::io(&p, e))?;
        }
        Ok(())
    }

    /// Takes the directory's lock so two runs cannot interleave their writes; held until the
    /// returned guard is dropped (the OS releases it if the process dies).
    pub fn lock(&self) -> Result<RunLock> {
        self.lock_named(".lock", "another rbon process is using this run directory")
    }

    /// Takes the lock of one rank: ranks share the directory, but a rank runs once at a time.
    pub fn lock_rank(&self, rank: usize) -> Result<RunLock> {
        self.lock_named(&format!(".lock-rank-{rank:05}"), &format!("another rbon process is running rank {rank} here"))
    }

    fn lock_named(&self, name: &str, busy: &str) -> Result<RunLock> {
        let p = self.root.join(name);
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| CoreError::io(&p, e))?;
        match f.try_lock() {
            Ok(()) => Ok(RunLock(f)),
            Err(fs::TryLockError::WouldBlock) => {
                Err(CoreError::RunDir { path: self.root.clone(), message: busy.to_owned() })
            }
            Err(fs::TryLockError::Error(e)) => Err(CoreError::io(&p, e)),
        }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.root.join(MANIFEST)
    }

    /// The manifest, or an empty one for a new directory.
    pub fn read_manifest(&self) -> Result<Manifest> {
        let p = self.manifest_path();
        match fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| CoreError::RunDir { path: p.clone(), message: format!("unreadable manifest: {e}") }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(CoreError::io(&p, e)),
        }
    }

    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(m).unwrap_or_default();
        bytes.push(b'\n');
        shard::write_atomic(&self.manifest_path(), &bytes)
    }

    pub fn rank_path(&self, rank: usize) -> PathBuf {
        self.root.join(RANKS_DIR).join(format!("rank-{rank:05}.json"))
    }

    pub fn write_rank(&self, r: &RankState) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(r).unwrap_or_default();
        bytes.push(b'\n');
        shard::write_atomic(&self.rank_path(r.rank), &bytes)
    }

    /// Every rank file, by rank.
    pub fn read_ranks(&self) -> Result<BTreeMap<usize, RankState>> {
        let dir = self.root.join(RANKS_DIR);
        let mut out = BTreeMap::new();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("rank-") && name.ends_with(".json")) {
                continue;
            }
            let p = e.path();
            let bytes = fs::read(&p).map_err(|err| CoreError::io(&p, err))?;
            let r: RankState = serde_json::from_slice(&bytes).map_err(|err| CoreError::RunDir {
                path: p.clone(),
                message: format!("unreadable rank file: {err}"),
            })?;
            out.insert(r.rank, r);
        }
        Ok(out)
    }

    /// Removes rank files of other world sizes (a rerun with fewer or more ranks).
    pub fn remove_other_ranks(&self, world_size: usize) -> Result<()> {
        for (rank, r) in self.read_ranks()? {
            if r.world_size != world_size || rank >= world_size {
                let p = self.rank_path(rank);
                fs::remove_file(&p).map_err(|e| CoreError::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// The frozen pipeline YAML.
    pub fn frozen_config_path(&self) -> PathBuf {
        self.root.join(FROZEN_CONFIG)
    }

    /// Freezes the config text that produced the run.
    pub fn freeze_config(&self, text: &str) -> Result<()> {
        shard::write_atomic(&self.frozen_config_path(), text.as_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_follow_config_and_upstream() {
        let a = fingerprint("s", &vec![1, 2], &["u"]);
        assert_eq!(a, fingerprint("s", &vec![1, 2], &["u"]));
        assert_ne!(a, fingerprint("s", &vec![1, 3], &["u"]));
        assert_ne!(a, fingerprint("s", &vec![1, 2], &["v"]));
        assert_ne!(a, fingerprint("t", &vec![1, 2], &["u"]));
    }

    #[test]
    fn clear_all_keeps_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path()).unwrap();
        let lock = run.lock().unwrap();
        assert!(run.lock().unwrap_err().to_string().contains("another rbon process"));
        drop(lock);
        fs::remove_file(d.path().join(".lock")).unwrap();
        fs::create_dir_all(run.stage_dir(StageName::Pairs)).unwrap();
        run.write_manifest(&Manifest::default()).unwrap();
        fs::write(d.path().join("notes.txt"), "mine").unwrap();
        run.clear_all().unwrap();
        let left: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
    }
}
