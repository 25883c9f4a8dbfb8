//! Finding a model folder: a local directory, or a hub id resolved in the local Hugging Face
//! cache (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`), offline.

use std::path::{Path, PathBuf};

use crate::error::ModelError;

/// A Hugging Face model folder on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDir {
    root: PathBuf,
}

impl ModelDir {
    /// A local folder holding `config.json`, or a hub id (`org/name`, optionally `@revision`)
    /// already in the Hugging Face cache. Nothing is downloaded.
    pub fn resolve(spec: &str) -> Result<Self, ModelError> {
        let local = Path::new(spec);
        if local.is_dir() {
            if !local.join("config.json").is_file() {
                return Err(ModelError::NotFound {
                    spec: spec.to_owned(),
                    looked: format!("{} (a folder without config.json)", local.display()),
                });
            }
            return Ok(Self { root: local.to_owned() });
        }
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev.to_owned()),
            None => (spec, "main".to_owned()),
        };
        let cache = hf_hub::Cache::from_env();
        let repo = hf_hub::Repo::with_revision(id.to_owned(), hf_hub::RepoType::Model, revision);
        let looked = format!(
            "{} (no such folder), and the Hugging Face cache at {} (set HF_HUB_CACHE or HF_HOME, or \
             download it there first with `huggingface-cli download {id}`)",
            local.display(),
            cache.path().join(repo.folder_name()).display()
        );
        let config =
            cache.repo(repo).get("config.json").ok_or(ModelError::NotFound { spec: spec.to_owned(), looked })?;
        let root = config.parent().map(Path::to_owned).unwrap_or_default();
        Ok(Self { root })
    }

    /// A folder known to hold a model (no checks).
    pub fn from_path(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A file of the folder, if present.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let p = self.root.join(name);
        p.is_file().then_some(p)
    }

    /// Reads a text file of the folder.
    pub fn read(&self, name: &str) -> Result<String, ModelError> {
        let p = self.root.join(name);
        std::fs::read_to_string(&p).map_err(|source| ModelError::Io { path: p, source })
    }

    /// The weight files: those of `model.safetensors.index.json`, or `model.safetensors`.
    pub fn safetensors(&self) -> Result<Vec<PathBuf>, ModelError> {
        if let Some(index) = self.file("model.safetensors.index.json") {
            let text = self.read("model.safetensors.index.json")?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Config { path: index.display().to_string(), message: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Config {
                path: index.display().to_string(),
                message: "no `weight_map`".into(),
            })?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
            files.sort();
            files.dedup();
            return files
                .into_iter()
                .map(|f| {
                    self.file(&f).ok_or_else(|| ModelError::NotFound {
                        spec: f.clone(),
                        looked: format!("{} (listed in model.safetensors.index.json)", self.root.display()),
                    })
                })
                .collect();
        }
        self.file("model.safetensors").map(|f| vec![f]).ok_or_else(|| ModelError::NotFound {
            spec: "model.safetensors".into(),
            looked: self.root.display().to_string(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn local_folder_and_missing_model_message() {
        let d = tempfile::tempdir().unwrap();
        let e = ModelDir::resolve(d.path().to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("without config.json"), "{e}");
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        assert_eq!(ModelDir::resolve(d.path().to_str().unwrap()).unwrap().root(), d.path());
        let e = ModelDir::resolve("no-org/no-such-model").unwrap_err().to_string();
        assert!(e.contains("Hugging Face cache at") && e.contains("models--no-org--no-such-model"), "{e}");
    }

    #[test]
    fn hub_id_resolves_in_the_cache_layout() {
        // The cache layout hf-hub and huggingface_hub write: refs/main → snapshots/<commit>/.
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        std::fs::write(repo.join("snapshots/abc123/config.json"), "{}").unwrap();
        let c = hf_hub::Cache::new(cache.path().to_owned());
        let got = c.repo(hf_hub::Repo::model("org/tiny".into())).get("config.json").unwrap();
        assert_eq!(got, repo.join("snapshots/abc123/config.json"));
    }
}
