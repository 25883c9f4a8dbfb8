//! An export folder built under a temporary sibling name and swapped into place when complete.

use std::fs;
use std::path::PathBuf;

use rbon_core::CoreError;

/// A folder built under a temporary sibling name and swapped into place when complete, so an
/// export is either whole or absent (never a partial set of parts).
pub(super) struct Staged {
    pub(super) tmp: PathBuf,
    dest: PathBuf,
}

impl Staged {
    pub(super) fn new(dest: PathBuf) -> Result<Self, CoreError> {
        let parent = dest.parent().map(PathBuf::from).unwrap_or_default();
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        fs::create_dir_all(&parent).map_err(|e| CoreError::io(&parent, e))?;
        // Leftovers of killed runs.
        let prefix = format!(".{name}.tmp-");
        for e in fs::read_dir(&parent).map_err(|e| CoreError::io(&parent, e))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                fs::remove_dir_all(e.path()).map_err(|err| CoreError::io(e.path(), err))?;
            }
        }
        let tmp = parent.join(format!("{prefix}{}", std::process::id()));
        fs::create_dir_all(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
        Ok(Self { tmp, dest })
    }

    pub(super) fn commit(self) -> Result<PathBuf, CoreError> {
        if self.dest.exists() {
            fs::remove_dir_all(&self.dest).map_err(|e| CoreError::io(&self.dest, e))?;
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| CoreError::io(&self.dest, e))?;
        Ok(self.dest)
    }
}
