//! Finding a model folder: a local directory, or a hub id resolved in the local Hugging Face
//! cache (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`), offline. A GGUF model
//! is a `.gguf` file, or a folder holding exactly one; its folder carries the tokenizer files.

use std::path::{Path, PathBuf};

use crate::error::ModelError;

/// The files besides config and weights that loaders read when a folder has them.
const READ_BESIDE: [&str; 10] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
];

/// A Hugging Face model folder on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDir {
    root: PathBuf,
    /// The weights are this GGUF file (in `root`) rather than config.json and safetensors.
    gguf: Option<PathBuf>,
}

fn is_gguf(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl ModelDir {
    /// A local folder holding `config.json` (and safetensors), a `.gguf` file, a folder holding
    /// exactly one `.gguf` file and no safetensors, or a hub id (`org/name`, optionally
    /// `@revision`) already in the Hugging Face cache. Nothing is downloaded.
    pub fn resolve(spec: &str) -> Result<Self, ModelError> {
        let local = Path::new(spec);
        if local.is_file() {
            if !is_gguf(local) {
                return Err(ModelError::NotFound {
                    spec: spec.to_owned(),
                    looked: format!("{} (a file, but not a .gguf file; name the model folder)", local.display()),
                });
            }
            let root = local.parent().map(Path::to_owned).unwrap_or_default();
            return Ok(Self { root, gguf: Some(local.to_owned()) });
        }
        if local.is_dir() {
            let hf = Self::from_path(local);
            let safetensors =
                hf.file("model.safetensors").is_some() || hf.file("model.safetensors.index.json").is_some();
            let ggufs = if safetensors { Vec::new() } else { gguf_files(local)? };
            match ggufs.as_slice() {
                [one] => return Ok(Self { root: local.to_owned(), gguf: Some(one.clone()) }),
                [] => {}
                many => {
                    let names: Vec<String> =
                        many.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
                    return Err(ModelError::Config {
                        path: local.display().to_string(),
                        message: format!(
                            "holds {} .gguf files ({}): name the one to load, e.g. {}",
                            many.len(),
                            names.join(", "),
                            many[0].display()
                        ),
                    });
                }
            }
            if !local.join("config.json").is_file() {
                return Err(ModelError::NotFound {
                    spec: spec.to_owned(),
                    looked: format!("{} (a folder without config.json or a .gguf file)", local.display()),
                });
            }
            return Ok(hf);
        }
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev.to_owned()),
            None => (spec, "main".to_owned()),
        };
        // Python's huggingface_hub reads HF_HUB_CACHE first, then HF_HOME; hf-hub only the latter.
        let cache = match std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
            Some(p) => hf_hub::Cache::new(PathBuf::from(p)),
            None => hf_hub::Cache::from_env(),
        };
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
        Ok(Self { root, gguf: None })
    }

    /// A folder known to hold a model (no checks).
    pub fn from_path(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), gguf: None }
    }

    /// The folder: config.json and safetensors, or the GGUF file's folder; tokenizer files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The GGUF file holding the weights and configuration, when the model is one.
    pub fn gguf(&self) -> Option<&Path> {
        self.gguf.as_deref()
    }

    /// The files that define the model: the GGUF file, or config.json and the safetensors.
    pub fn model_files(&self) -> Result<Vec<PathBuf>, ModelError> {
        if let Some(g) = &self.gguf {
            return Ok(vec![g.clone()]);
        }
        let mut files = vec![self.root.join("config.json")];
        files.extend(self.safetensors()?);
        Ok(files)
    }

    /// Every file of the folder that a loader reads and that is present: the config and
    /// weights (or the GGUF file), and the tokenizer, chat template, generation defaults and
    /// sentence-transformers files beside them. A model's outputs depend on these files' content
    /// and nothing else of the folder; stages fingerprint them by content.
    pub fn input_files(&self) -> Result<Vec<PathBuf>, ModelError> {
        let mut files = self.model_files()?;
        for f in self.text_files() {
            if !files.contains(&f) {
                files.push(f);
            }
        }
        Ok(files)
    }

    /// The files beside the weights that are present: tokenizer, chat template, generation
    /// defaults, and config.json when there is one (what a policy served elsewhere reads here).
    pub fn text_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.file("config.json").into_iter().collect();
        files.extend(READ_BESIDE.iter().filter_map(|name| self.file(name)));
        files
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

/// The `.gguf` files of a folder, sorted.
fn gguf_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let io = |source| ModelError::Io { path: dir.to_owned(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.is_file() && is_gguf(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
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
    fn gguf_files_and_folders() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("tokenizer.json"), "{}").unwrap();
        std::fs::write(root.join("m-q8_0.gguf"), "").unwrap();
        let one = ModelDir::resolve(root.to_str().unwrap()).unwrap();
        assert_eq!(one.gguf(), Some(root.join("m-q8_0.gguf").as_path()));
        assert_eq!(one.root(), root);
        assert_eq!(one.model_files().unwrap(), vec![root.join("m-q8_0.gguf")]);
        std::fs::write(root.join("m-f32.gguf"), "").unwrap();
        let e = ModelDir::resolve(root.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("holds 2 .gguf files (m-f32.gguf, m-q8_0.gguf)"), "{e}");
        let file = ModelDir::resolve(root.join("m-f32.gguf").to_str().unwrap()).unwrap();
        assert_eq!((file.root(), file.gguf()), (root, Some(root.join("m-f32.gguf").as_path())));
        let e = ModelDir::resolve(root.join("tokenizer.json").to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("not a .gguf file"), "{e}");
        // Safetensors win over a stray .gguf: the folder is a Hugging Face one.
        std::fs::write(root.join("config.json"), "{}").unwrap();
        std::fs::write(root.join("model.safetensors"), "").unwrap();
        assert_eq!(ModelDir::resolve(root.to_str().unwrap()).unwrap().gguf(), None);
    }

    #[test]
    fn missing_hub_model_message() {
        let e = ModelDir::resolve("no-org/no-such-model-2").unwrap_err().to_string();
        assert!(e.contains("models--no-org--no-such-model-2"), "{e}");
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
