//! GGUF files (llama.cpp's format) of Llama-family decoders, for quantized policies: the
//! metadata becomes a [`DecoderConfig`] and the tensors the layers of the same [`Decoder`] that
//! safetensors folders load into, so prefill, cache forking and teacher forcing are shared.
//!
//! Two conversions of llama.cpp's `convert_hf_to_gguf.py` must be undone to match transformers:
//! - for the `llama` architecture (Llama and Mistral), the rows of `attn_q`/`attn_k` are permuted
//!   from Hugging Face's rotate-half RoPE layout to interleaved pairs (`LlamaModel.permute`).
//!   Rather than permuting them back, the decoder applies RoPE to interleaved pairs, as llama.cpp
//!   does: q·k is the same under a permutation applied to both, so the logits are unchanged and
//!   quantized rows stay as they are in the file. Qwen2 and Qwen3 files are not permuted.
//! - Llama 3 RoPE scaling is stored as the `rope_freqs` tensor, one divisor per frequency.
//!
//! [`Decoder`]: crate::Decoder

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::config::DecoderConfig;
use crate::error::ModelError;

/// `general.architecture` values the decoder runs (Mistral files use `llama`).
pub const SUPPORTED_ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "qwen3"];

/// Tensor types the decoder loads: dense, and the block quantizations candle multiplies.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// A GGUF file's header: metadata and tensor descriptions (no tensor data).
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
}

/// What a GGUF file says about its model.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufModel {
    pub config: DecoderConfig,
    /// `general.architecture`.
    pub architecture: String,
    /// RoPE over interleaved pairs (llama.cpp's layout of the `llama` architecture).
    pub rope_interleaved: bool,
    /// Llama 3 scaling: the `rope_freqs` tensor is present.
    pub rope_freqs: bool,
}

impl GgufFile {
    /// Reads the header of `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let f = File::open(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })?;
        let content = Content::read(&mut BufReader::new(f)).map_err(|e| {
            let msg = e.to_string();
            let hint = if msg.contains("unknown dtype") {
                format!(" (a tensor type candle cannot load; supported: {SUPPORTED_TYPES})")
            } else {
                String::new()
            };
            ModelError::Config {
                path: path.display().to_string(),
                message: format!("not a readable GGUF file: {msg}{hint}"),
            }
        })?;
        // A truncated file: the header reads, but the tensors it lists run past the end.
        let len = std::fs::metadata(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })?.len();
        for (name, t) in &content.tensor_infos {
            let elems = t.shape.elem_count() as u64;
            let block = t.ggml_dtype.block_size() as u64;
            let bytes = elems / block.max(1) * t.ggml_dtype.type_size() as u64;
            let stop = content.tensor_data_offset.saturating_add(t.offset).saturating_add(bytes);
            if stop > len {
                return Err(ModelError::Config {
                    path: path.display().to_string(),
                    message: format!(
                        "truncated: tensor {name} ends at byte {stop} but the file has {len} bytes (an interrupted \
                         download?)"
                    ),
                });
            }
        }
        Ok(Self { path: path.to_owned(), content })
    }

    fn bad(&self, message: impl Into<String>) -> ModelError {
        ModelError::Config { path: self.path.display().to_string(), message: message.into() }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let n = match v {
            Value::U8(x) => u64::from(*x),
            Value::U16(x) => u64::from(*x),
            Value::U32(x) => u64::from(*x),
            Value::U64(x) => *x,
            Value::I8(x) => u64::try_from(*x).unwrap_or(u64::MAX),
            Value::I16(x) => u64::try_from(*x).unwrap_or(u64::MAX),
            Value::I32(x) => u64::try_from(*x).unwrap_or(u64::MAX),
            Value::I64(x) => u64::try_from(*x).unwrap_or(u64::MAX),
            // Per-layer lists (varying head counts) are not Llama-family models we run.
            _ => return Err(self.bad(format!("metadata `{key}` is not a single non-negative integer"))),
        };
        usize::try_from(n).map(Some).map_err(|_| self.bad(format!("metadata `{key}` is out of range")))
    }

    fn required(&self, key: &str) -> Result<usize, ModelError> {
        self.usize(key)?.ok_or_else(|| self.bad(format!("metadata `{key}` is missing")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(self.bad(format!("metadata `{key}` is not a number"))),
        }
    }

    fn string(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Shape of a tensor in candle's order ([rows, columns] = [out, in] for weights).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|t| t.shape.dims())
    }

    /// Maps the metadata to the decoder's configuration, checking what the decoder cannot run.
    pub fn model(&self) -> Result<GgufModel, ModelError> {
        let arch = self
            .string("general.architecture")
            .ok_or_else(|| self.bad("metadata `general.architecture` is missing"))?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(self.bad(format!(
                "architecture `{arch}` is not supported (supported: {}; Mistral files use llama)",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let k = |key: &str| format!("{arch}.{key}");
        let hidden = self.required(&k("embedding_length"))?;
        let heads = self.required(&k("attention.head_count"))?;
        let kv_heads = self.usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(self.bad(format!("{heads} attention heads are not a multiple of {kv_heads} key/value heads")));
        }
        let head_dim = match self.usize(&k("attention.key_length"))? {
            Some(d) => d,
            None if hidden.is_multiple_of(heads) => hidden / heads,
            None => return Err(self.bad("embedding_length is not a multiple of attention.head_count")),
        };
        if let Some(v) = self.usize(&k("attention.value_length"))?
            && v != head_dim
        {
            return Err(self.bad(format!("attention.value_length {v} differs from key_length {head_dim}")));
        }
        if let Some(r) = self.usize(&k("rope.dimension_count"))?
            && r != head_dim
        {
            return Err(self.bad(format!("rope.dimension_count {r} is not the head size {head_dim} (partial RoPE)")));
        }
        let rms_norm_eps = self
            .f64(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| self.bad(format!("metadata `{}` is missing", k("attention.layer_norm_rms_epsilon"))))?;
        match self.string(&k("rope.scaling.type")) {
            None | Some("none") => {}
            Some(t) => {
                return Err(self.bad(format!("rope scaling `{t}` is not supported (Llama 3's rope_freqs tensor is)")));
            }
        }
        let embd = self.shape("token_embd.weight").ok_or_else(|| self.bad("tensor `token_embd.weight` is missing"))?;
        let vocab_size = match self.usize(&k("vocab_size"))? {
            Some(v) => v,
            None => embd.first().copied().unwrap_or(0),
        };
        if embd != [vocab_size, hidden] {
            return Err(self.bad(format!("token_embd.weight is {embd:?}, expected [{vocab_size}, {hidden}]")));
        }
        let intermediate_size = self.required(&k("feed_forward_length"))?;
        let layers = self.required(&k("block_count"))?;
        for i in 0..layers {
            for t in
                ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"]
            {
                let name = format!("blk.{i}.{t}.weight");
                if !self.has_tensor(&name) {
                    return Err(self.bad(format!("tensor `{name}` is missing")));
                }
            }
        }
        if !self.has_tensor("output_norm.weight") {
            return Err(self.bad("tensor `output_norm.weight` is missing"));
        }
        let bias = |t: &str| self.has_tensor(&format!("blk.0.{t}.bias"));
        let config = DecoderConfig {
            model_type: arch.to_owned(),
            architectures: Vec::new(),
            vocab_size,
            hidden_size: hidden,
            intermediate_size,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta: self.f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling: None,
            max_position_embeddings: self.usize(&k("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !self.has_tensor("output.weight"),
            qkv_bias: bias("attn_q"),
            o_bias: bias("attn_output"),
            mlp_bias: bias("ffn_gate"),
            qk_norm: self.has_tensor("blk.0.attn_q_norm.weight"),
            sliding_window: self.usize(&k("attention.sliding_window"))?.filter(|&w| w > 0),
            num_labels: 1,
            pad_token_id: self.usize("tokenizer.ggml.padding_token_id")?.and_then(|v| u32::try_from(v).ok()),
            gemma2: None,
        };
        if let Some(s) = self.shape("rope_freqs.weight")
            && s != [head_dim / 2]
        {
            return Err(self.bad(format!("rope_freqs.weight is {s:?}, expected [{}]", head_dim / 2)));
        }
        Ok(GgufModel {
            config,
            architecture: arch.to_owned(),
            rope_interleaved: arch == "llama",
            rope_freqs: self.has_tensor("rope_freqs.weight"),
        })
    }
}

/// Reads and checks a GGUF file's header without loading weights.
pub fn inspect(path: &Path) -> Result<GgufModel, ModelError> {
    GgufFile::open(path)?.model()
}
