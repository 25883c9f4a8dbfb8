//! Content digests of the files a stage's output depends on (model weights, tokenizers, chat
//! templates, generation configs), so that a file edited in place redoes the stages that read
//! it. Each file is hashed whole (SHA-256) once per version: the digest is cached by the file's
//! canonical path, size, modification time and (on Unix) status-change time, which every write
//! to the file moves and which tools that preserve modification times cannot set back.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};

/// The cache's file, in the run directory.
pub const DIGESTS: &str = "digests.json";

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    modified_ns: i64,
    changed_ns: i64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        let ns = |t: std::io::Result<std::time::SystemTime>| {
            t.ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(-1, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        };
        #[cfg(unix)]
        let changed_ns = {
            use std::os::unix::fs::MetadataExt;
            meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec())
        };
        #[cfg(not(unix))]
        let changed_ns = -1;
        Self { size: meta.len(), modified_ns: ns(meta.modified()), changed_ns }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    stamp: Stamp,
    sha256: String,
}

/// Digests of files, cached (in the run directory) across runs.
#[derive(Debug, Default)]
pub struct FileDigests {
    cache: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, Entry>>,
    changed: AtomicBool,
}

impl FileDigests {
    /// Digests cached in `file` (read when present; an unreadable cache is only a slower run).
    pub fn cached_in(file: PathBuf) -> Self {
        let entries = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Self { cache: Some(file), entries: Mutex::new(entries), changed: AtomicBool::new(false) }
    }

    fn entries(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Entry>>> {
        self.entries.lock().map_err(|_| CoreError::internal("the digest cache's lock is poisoned"))
    }

    /// The SHA-256 of `path`'s content, as hex.
    pub fn digest(&self, path: &Path) -> Result<String> {
        let canonical = path.canonicalize().map_err(|e| CoreError::io(path, e))?;
        let meta = std::fs::metadata(&canonical).map_err(|e| CoreError::io(path, e))?;
        let stamp = Stamp::of(&meta);
        let key = canonical.display().to_string();
        if let Some(e) = self.entries()?.get(&key)
            && e.stamp == stamp
        {
            return Ok(e.sha256.clone());
        }
        let sha256 = sha256_file(&canonical)?;
        self.entries()?.insert(key, Entry { stamp, sha256: sha256.clone() });
        self.changed.store(true, Ordering::Relaxed);
        Ok(sha256)
    }

    /// Writes the cache back (atomically) when a digest was computed.
    pub fn save(&self) -> Result<()> {
        let Some(file) = &self.cache else { return Ok(()) };
        if !self.changed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(dir) = file.parent().filter(|d| d.is_dir()) else { return Ok(()) };
        let entries = self.entries()?;
        let text = serde_json::to_vec_pretty(&*entries).map_err(|e| CoreError::internal(e.to_string()))?;
        // Ranks on several hosts may share the folder (and a pid): the name is theirs alone.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = dir.join(format!(".{DIGESTS}.tmp-{}-{nanos}", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| CoreError::io(&tmp, e))?;
        std::fs::rename(&tmp, file).map_err(|e| CoreError::io(file, e))
    }
}

impl FileDigests {
    /// The digests of `files`, each named by its path below `root` (or its file name).
    pub fn of_files(&self, root: &Path, files: &[PathBuf]) -> Result<Vec<(String, String)>> {
        files
            .iter()
            .map(|f| {
                let name = f.strip_prefix(root).unwrap_or(f).display().to_string();
                Ok((name, self.digest(f)?))
            })
            .collect()
    }
}

/// The SHA-256 of a file's content, as hex, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| CoreError::io(path, e))?;
    Ok(crate::seed::hex(&h.finalize()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_in_place_changes_the_digest_even_with_the_old_mtime() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("w.bin");
        std::fs::write(&f, b"weights-1").unwrap();
        let cache = d.path().join(DIGESTS);
        let digests = FileDigests::cached_in(cache.clone());
        let first = digests.digest(&f).unwrap();
        assert_eq!(first, crate::seed::sha256_hex(b"weights-1"));
        digests.save().unwrap();
        // Cached: a second run reads the digest back without hashing.
        let again = FileDigests::cached_in(cache.clone());
        assert_eq!(again.digest(&f).unwrap(), first);
        assert!(!again.changed.load(Ordering::Relaxed));
        // Same size, modification time set back: the status-change time still moves.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"weights-2").unwrap();
        File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        let after = FileDigests::cached_in(cache);
        assert_eq!(after.digest(&f).unwrap(), crate::seed::sha256_hex(b"weights-2"));
    }
}
