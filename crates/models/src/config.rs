//! `config.json` of the Llama-family decoders we run: Llama 2/3, Mistral, Qwen2/2.5, Qwen3 and
//! Gemma-2. They differ by flags (attention bias, q/k norm, tied embeddings, sliding window,
//! head_dim, RoPE scaling, Gemma-2's soft caps and extra norms); one struct covers them.

use serde::Deserialize;

use crate::error::ModelError;

/// `rope_scaling` as written by transformers (`rope_type`, or `type` in older files).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
struct Raw {
    model_type: String,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<RopeScaling>,
    /// transformers 5 writes RoPE settings here.
    #[serde(default)]
    rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    num_labels: Option<usize>,
    #[serde(default)]
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pad_token_id: Option<serde_json::Value>,
    // Gemma-2.
    #[serde(default)]
    hidden_activation: Option<String>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
    #[serde(default)]
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
}

/// What Gemma-2 adds to the Llama layout: embeddings scaled by √hidden, RMSNorm weights used as
/// (1 + w), a norm after attention and around the MLP, GeGLU with tanh-approximated GELU,
/// attention scaled by `query_pre_attn_scalar`^-½, soft-capped attention scores and final logits
/// (c · tanh(x / c)), and the sliding window on some layers only.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma2 {
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    pub query_pre_attn_scalar: f64,
    /// Per layer: whether it attends within `sliding_window` only.
    pub sliding_layers: Vec<bool>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_max_pos() -> usize {
    4096
}

/// What the decoder needs to know, with each architecture's defaults resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub model_type: String,
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub sliding_window: Option<usize>,
    /// Labels of a sequence-classification head (reward models).
    pub num_labels: usize,
    pub pad_token_id: Option<u32>,
    /// Gemma-2's differences, for `model_type: gemma2`.
    pub gemma2: Option<Gemma2>,
}

/// Architectures the generic decoder runs.
pub const SUPPORTED: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "gemma2"];

impl DecoderConfig {
    /// Parses a `config.json`; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ModelError> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| ModelError::Config { path: origin.to_owned(), message: e.to_string() })?;
        let bad = |message: String| ModelError::Config { path: origin.to_owned(), message };
        let mt = raw.model_type.as_str();
        if !SUPPORTED.contains(&mt) {
            return Err(bad(format!("model_type `{mt}` is not supported (supported: {})", SUPPORTED.join(", "))));
        }
        let gemma = mt == "gemma2";
        let act =
            if gemma { raw.hidden_activation.as_ref().or(raw.hidden_act.as_ref()) } else { raw.hidden_act.as_ref() };
        let want = if gemma { "gelu_pytorch_tanh" } else { "silu" };
        if let Some(act) = act
            && act != want
        {
            return Err(bad(format!("hidden_act `{act}` is not supported for {mt} (only {want})")));
        }
        if raw.num_attention_heads == 0
            || !raw.hidden_size.is_multiple_of(raw.num_attention_heads) && raw.head_dim.is_none()
        {
            return Err(bad("hidden_size must be a multiple of num_attention_heads".into()));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad("num_attention_heads must be a multiple of num_key_value_heads".into()));
        }
        let scaling = raw.rope_scaling.clone().or(raw.rope_parameters.clone());
        let rope_theta = raw.rope_theta.or(scaling.as_ref().and_then(|s| s.rope_theta)).unwrap_or(10_000.0);
        let scaling = scaling.filter(|s| s.rope_type != "default");
        if let Some(s) = &scaling
            && s.rope_type != "llama3"
        {
            return Err(bad(format!("rope scaling `{}` is not supported (only llama3)", s.rope_type)));
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let qwen2 = mt == "qwen2";
        let gemma2 = if gemma {
            // Older configs have no layer_types: even layers slide (transformers' default).
            let sliding_layers: Vec<bool> = match &raw.layer_types {
                Some(t) if t.len() == raw.num_hidden_layers => t.iter().map(|x| x == "sliding_attention").collect(),
                Some(t) => {
                    return Err(bad(format!(
                        "layer_types has {} entries for {} layers",
                        t.len(),
                        raw.num_hidden_layers
                    )));
                }
                None => (0..raw.num_hidden_layers).map(|i| i % 2 == 0).collect(),
            };
            let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
            Some(Gemma2 {
                attn_softcap: raw.attn_logit_softcapping,
                final_softcap: raw.final_logit_softcapping,
                query_pre_attn_scalar: raw.query_pre_attn_scalar.unwrap_or(head_dim as f64),
                sliding_layers,
            })
        } else {
            None
        };
        let sliding_window = match mt {
            "mistral" | "gemma2" => raw.sliding_window,
            "qwen2" | "qwen3" if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        };
        let num_labels = raw.num_labels.or(raw.id2label.as_ref().map(|m| m.len())).unwrap_or(1);
        Ok(Self {
            model_type: raw.model_type.clone(),
            architectures: raw.architectures,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads),
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling: scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            qk_norm: mt == "qwen3",
            sliding_window,
            num_labels,
            pad_token_id: raw.pad_token_id.and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok()),
            gemma2,
        })
    }

    /// Inverse frequencies of RoPE, with Llama 3 scaling when configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
        let Some(s) = &self.rope_scaling else {
            return base.into_iter().map(|f| f as f32).collect();
        };
        // transformers' _compute_llama3_parameters.
        let factor = s.factor.unwrap_or(8.0);
        let low = s.low_freq_factor.unwrap_or(1.0);
        let high = s.high_freq_factor.unwrap_or(4.0);
        let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
        let low_wavelen = old / low;
        let high_wavelen = old / high;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let scaled = if wavelen > low_wavelen { f / factor } else { f };
                let smooth = (old / wavelen - low) / (high - low);
                // Wavelengths are finite, so this is transformers' ~(w < high) & ~(w > low).
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                let out = if medium { (1.0 - smooth) * scaled / factor + smooth * scaled } else { scaled };
                out as f32
            })
            .collect()
    }
}

/// Weight precision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeName {
    #[default]
    F32,
    Bf16,
    F16,
}

impl std::fmt::Display for DTypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl DTypeName {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }
}
