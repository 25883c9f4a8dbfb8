//! The Llama-family decoder, with a KV cache we own so that a prompt is prefilled once and its
//! cache forked into N rows that decode in lock-step, and finished rows are dropped.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::host::{HostCache, HostModel, LayerParts};
use crate::kernels::Weight;
use crate::linear::Linear;
use crate::packed::{PackedDecoder, PackedLayer};

use crate::config::DecoderConfig;
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::hub::ModelDir;

type Result<T> = std::result::Result<T, candle_core::Error>;

/// Keys and values of every layer for a batch of rows that share one length. Each layer's
/// buffers have room to grow along the sequence, so a decode step writes one position in place
/// instead of copying the whole cache (not `Clone`: clones would share the buffers).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Positions to allocate at once (the prompt plus every token to be drawn), so that on a
    /// GPU decoding never reallocates and copies the cache.
    room: usize,
    /// The host decoder's cache (then `layers` is unused).
    host: Option<HostCache>,
}

/// Appends `new` [b, h, t, d] after `len` positions of `buf` [b, h, cap, d], growing it when
/// full (to at least `room` positions); returns the valid part [b, h, len + t, d].
fn append(buf: &mut Option<Tensor>, new: &Tensor, len: usize, room: usize) -> Result<Tensor> {
    let (b, h, t, d) = new.dims4()?;
    let cap = buf.as_ref().map_or(0, |x| x.dim(2).unwrap_or(0));
    if len + t > cap {
        let grown = Tensor::zeros((b, h, (len + t).max(2 * cap).max(64).max(room), d), new.dtype(), new.device())?;
        if let Some(old) = buf.as_ref()
            && len > 0
        {
            grown.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
        *buf = Some(grown);
    }
    let Some(x) = buf.as_ref() else { candle_core::bail!("kv buffer missing") };
    x.slice_set(&new.contiguous()?, 2, len)?;
    x.narrow(2, 0, len + t)
}

impl KvCache {
    /// Cached positions per row.
    pub fn len(&self) -> usize {
        self.host.as_ref().map_or(self.len, |h| h.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies row 0 of a cache into `n` rows: the shared prefill becomes N independent rows.
    pub fn fork(&self, n: usize) -> Result<Self> {
        if let Some(h) = &self.host {
            return Ok(Self { layers: Vec::new(), len: 0, room: self.room, host: Some(h.fork(n)?) });
        }
        let idx = Tensor::zeros(n, DType::U32, self.device()?)?;
        self.index_rows(&idx)
    }

    /// Keeps `rows` (in that order), dropping the others, e.g. rows that finished.
    pub fn select(&self, rows: &[u32]) -> Result<Self> {
        if let Some(h) = &self.host {
            return Ok(Self { layers: Vec::new(), len: 0, room: self.room, host: Some(h.select(rows)?) });
        }
        let idx = Tensor::new(rows, self.device()?)?;
        self.index_rows(&idx)
    }

    /// [`KvCache::select`] in place, for `rows` in increasing order (on the host decoder the
    /// kept rows are moved, not copied).
    pub fn keep(&mut self, rows: &[u32]) -> Result<()> {
        match &mut self.host {
            Some(h) => h.keep(rows),
            None => {
                *self = self.select(rows)?;
                Ok(())
            }
        }
    }

    fn device(&self) -> Result<&Device> {
        match self.layers.iter().flatten().next() {
            Some((k, _)) => Ok(k.device()),
            None => candle_core::bail!("the cache is empty"),
        }
    }

    fn index_rows(&self, idx: &Tensor) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.index_select(idx, 0)?, v.index_select(idx, 0)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, len: self.len, room: self.room, host: None })
    }
}

/// RMSNorm as transformers computes it in half precision: normalised in f32, rounded once to the
/// model's dtype, then scaled by the weight in that dtype. candle's CPU kernel rounds the RMS
/// itself to bf16 first, a per-row scale error of up to 0.4% that these chaotic models amplify;
/// f32 models, and other devices (whose fused kernel computes in f32 and rounds once), use
/// candle's op.
#[derive(Debug, Clone)]
struct RmsNorm {
    fused: candle_nn::RmsNorm,
    weight: Tensor,
    eps: f64,
    /// Gemma's (1 + w) in f32: applied to the f32 normalised value, rounded once (as
    /// transformers' Gemma2RMSNorm does, whatever the model's dtype).
    plus_one: Option<Tensor>,
}

impl RmsNorm {
    fn new(weight: Tensor, eps: f64) -> Self {
        Self { fused: candle_nn::RmsNorm::new(weight.clone(), eps), weight, eps, plus_one: None }
    }

    fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self::new(vb.get(size, "weight")?, eps))
    }

    /// Gemma's RMSNorm: scaled by (1 + w), in f32.
    fn load_plus_one(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let w = vb.get(size, "weight")?;
        let plus = (w.to_dtype(DType::F32)? + 1.0)?;
        let mut n = Self::new(plus.to_dtype(w.dtype())?, eps);
        n.plus_one = Some(plus);
        Ok(n)
    }

    fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if let Some(w) = &self.plus_one
            && dtype != DType::F32
        {
            let x32 = x.to_dtype(DType::F32)?;
            let var = x32.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            let normed = x32.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            return normed.broadcast_mul(w)?.to_dtype(dtype);
        }
        if dtype == DType::F32 || !x.device().is_cpu() {
            return self.fused.forward(x);
        }
        let x32 = x.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = x32.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)
    }
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// RoPE over interleaved pairs: q/k rows in llama.cpp's layout (see `gguf`).
    rope_interleaved: bool,
    /// The scores' scale: 1/√head_dim, or Gemma-2's 1/√query_pre_attn_scalar.
    scale: f64,
    /// Gemma-2's cap c of the scores: c · tanh(s / c).
    softcap: Option<f64>,
}

fn attention_scale(cfg: &DecoderConfig) -> f64 {
    match &cfg.gemma2 {
        Some(g) => 1.0 / g.query_pre_attn_scalar.sqrt(),
        None => 1.0 / (cfg.head_dim as f64).sqrt(),
    }
}

fn linear(inp: usize, out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out, inp), "weight")?;
    let b = if bias { Some(vb.get(out, "bias")?) } else { None };
    Ok(Linear::new(w, b))
}

impl Attention {
    fn load(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            if cfg.qk_norm { Ok(Some(RmsNorm::load(d, cfg.rms_norm_eps, vb.pp(name))?)) } else { Ok(None) }
        };
        Ok(Self {
            q: linear(h, cfg.num_heads * d, cfg.qkv_bias, vb.pp("q_proj"))?,
            k: linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, vb.pp("k_proj"))?,
            v: linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, vb.pp("v_proj"))?,
            o: linear(cfg.num_heads * d, h, cfg.o_bias, vb.pp("o_proj"))?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: d,
            rope_interleaved: false,
            scale: attention_scale(cfg),
            softcap: cfg.gemma2.as_ref().and_then(|g| g.attn_softcap),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
        (len, room): (usize, usize),
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        let shape = |y: Tensor, heads: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = y.reshape((b, t, heads, d))?;
            let y = match norm {
                Some(n) => n.forward(&y)?,
                None => y,
            };
            y.transpose(1, 2)?.contiguous()
        };
        let q = shape(self.q.forward(x)?, self.heads, &self.q_norm)?;
        let k = shape(self.k.forward(x)?, self.kv_heads, &self.k_norm)?;
        let v = shape(self.v.forward(x)?, self.kv_heads, &None)?;
        let rope = if self.rope_interleaved { candle_nn::rotary_emb::rope_i } else { candle_nn::rotary_emb::rope };
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        let (mut kb, mut vb) = match cache.take() {
            Some((kb, vb)) => (Some(kb), Some(vb)),
            None => (None, None),
        };
        let k = append(&mut kb, &k, len, room)?;
        let v = append(&mut vb, &v, len, room)?;
        if let (Some(kb), Some(vb)) = (kb, vb) {
            *cache = Some((kb, vb));
        }
        let s = k.dim(2)?;
        // Grouped-query attention without copying K/V: the `rep` query heads of each KV head
        // become extra rows of one matmul against that KV head.
        let rep = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, rep * t, d))?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        let scores = match self.softcap {
            Some(c) => ((scores / c)?.tanh()? * c)?,
            None => scores,
        };
        let scores = scores.reshape((b, self.heads, t, s))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let probs = probs.reshape((b, self.kv_heads, rep * t, s))?;
        let out = probs.matmul(&v)?.reshape((b, self.heads, t, d))?;
        let out = out.transpose(1, 2)?.reshape((b, t, self.heads * d))?;
        self.o.forward(&out)
    }
}

#[derive(Debug)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Gemma-2's GELU (tanh approximation) instead of SiLU.
    gelu: bool,
}

impl Mlp {
    fn load(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate: linear(h, i, b, vb.pp("gate_proj"))?,
            up: linear(h, i, b, vb.pp("up_proj"))?,
            down: linear(i, h, b, vb.pp("down_proj"))?,
            gelu: cfg.gemma2.is_some(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        let g = if self.gelu { g.gelu()? } else { candle_nn::ops::silu(&g)? };
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

#[derive(Debug)]
struct Layer {
    attn: Attention,
    mlp: Mlp,
    /// Before attention, and before the MLP.
    ln1: RmsNorm,
    ln2: RmsNorm,
    /// Gemma-2: on the attention's output, and on the MLP's.
    post_attn: Option<RmsNorm>,
    post_mlp: Option<RmsNorm>,
    /// Attends within the sliding window only (every layer of a windowed Mistral).
    sliding: bool,
}

/// Token embeddings: dense, or GGUF blocks dequantized row by row on lookup, or moved into the
/// host decoder with every other weight.
#[derive(Debug)]
enum Embed {
    Dense(Embedding),
    Quantized(Arc<QTensor>),
    OnHost,
}

impl Embed {
    fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(e) => e.forward(ids),
            Self::Quantized(q) => q.embedding(ids)?.to_dtype(dtype),
            Self::OnHost => candle_core::bail!("the weights are on the host decoder"),
        }
    }
}

/// A Llama-family decoder-only transformer.
#[derive(Debug)]
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Embed,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
    /// The same model on rbon's host decoder (see [`crate::host`]), which then holds every
    /// weight: `embed`, `layers` and `lm_head` are emptied.
    host: Option<Box<HostModel>>,
}

/// Loads the weights of a folder; `unsafe` is confined to the memory map.
pub fn var_builder(
    dir: &ModelDir,
    dtype: DType,
    device: &Device,
) -> std::result::Result<VarBuilder<'static>, ModelError> {
    let files = dir.safetensors()?;
    let ctx = format!("loading the weights of {}", dir.root().display());
    // SAFETY: the files are mapped read-only for the model's lifetime; like every safetensors
    // loader we assume they are not modified while the model is loaded.
    #[expect(unsafe_code, reason = "memory-mapping the weights")]
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) };
    vb.map_err(ModelError::candle(ctx))
}

impl Decoder {
    /// Loads a model folder (config.json plus safetensors, or a GGUF file) in `dtype` on
    /// `device`.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> std::result::Result<Self, ModelError> {
        if let Some(file) = dir.gguf() {
            let ctx = format!("loading the weights of {}", file.display());
            return Self::load_gguf(file, dtype, device)?.onto_host().map_err(ModelError::candle(ctx));
        }
        let text = dir.read("config.json")?;
        let cfg = DecoderConfig::from_json(&text, &dir.root().join("config.json").display().to_string())?;
        let vb = var_builder(dir, dtype, device)?;
        let ctx = format!("loading the weights of {}", dir.root().display());
        Self::from_var_builder(cfg, vb, true).and_then(Self::onto_host).map_err(ModelError::candle(ctx))
    }

    /// The model moved onto rbon's host decoder ([`crate::host`]) where it applies: rbon's CPU
    /// path (not `RBON_KERNELS=candle`), f32, bf16 or f16, dense weights, a language-model head,
    /// and not Gemma-2 (whose caps, scaled embeddings and extra norms run on candle's layers).
    /// Otherwise unchanged.
    fn onto_host(mut self) -> Result<Self> {
        if !crate::path::host_kernels(&self.device) || self.cfg.gemma2.is_some() || !HostModel::supports(self.dtype) {
            return Ok(self);
        }
        fn dense(l: &Linear) -> Option<(Tensor, Option<Tensor>)> {
            l.weight().map(|w| (w.clone(), l.bias().cloned()))
        }
        let (Embed::Dense(embed), Some(head)) = (&self.embed, &self.lm_head) else { return Ok(self) };
        let Some(head_w) = head.weight() else { return Ok(self) };
        let (embed, head_w) = (embed.embeddings().clone(), head_w.clone());
        // Handles on the weights (not copies).
        let mut parts = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (a, f) = (&l.attn, &l.mlp);
            let (Some(q), Some(k), Some(v), Some(o), Some(gate), Some(up), Some(down)) =
                (dense(&a.q), dense(&a.k), dense(&a.v), dense(&a.o), dense(&f.gate), dense(&f.up), dense(&f.down))
            else {
                return Ok(self);
            };
            parts.push(LayerParts {
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
                q_norm: a.q_norm.as_ref().map(|n| n.weight().clone()),
                k_norm: a.k_norm.as_ref().map(|n| n.weight().clone()),
                ln1: l.ln1.weight().clone(),
                ln2: l.ln2.weight().clone(),
            });
        }
        // A tied head multiplies by the embeddings themselves (one copy in memory).
        let tied = self.cfg.tie_word_embeddings;
        let interleaved = self.layers.first().is_some_and(|l| l.attn.rope_interleaved);
        // `parts` now holds the only handles on the layers' weights: each layer's storage is
        // freed once converted, so loading holds about one copy of the weights, not two.
        self.layers = Vec::new();
        let host = HostModel::new(
            &self.cfg,
            self.dtype,
            &embed,
            (!tied).then_some(&head_w),
            parts.into_iter(),
            self.norm.weight(),
            &self.inv_freq,
            interleaved,
        )?;
        self.host = Some(Box::new(host));
        self.embed = Embed::OnHost;
        self.lm_head = None;
        Ok(self)
    }

    /// Whether the model runs on rbon's host decoder ([`crate::host`]) rather than candle's ops.
    pub fn on_host(&self) -> bool {
        self.host.is_some()
    }

    /// Builds the decoder from weights under `model.` (and `lm_head.` when `with_lm_head`).
    pub fn from_var_builder(cfg: DecoderConfig, vb: VarBuilder, with_lm_head: bool) -> Result<Self> {
        let m = vb.pp("model");
        let embed = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let gemma = cfg.gemma2.as_ref();
        let norm = |vb: VarBuilder| {
            if gemma.is_some() { RmsNorm::load_plus_one(h, eps, vb) } else { RmsNorm::load(h, eps, vb) }
        };
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                let sliding = match gemma {
                    Some(g) => g.sliding_layers.get(i).copied().unwrap_or(false),
                    None => true,
                };
                // Gemma-2's post_attention_layernorm normalises the attention's output; the
                // pre-MLP norm is pre_feedforward_layernorm.
                let (ln2, post_attn, post_mlp) = match gemma {
                    Some(_) => (
                        norm(l.pp("pre_feedforward_layernorm"))?,
                        Some(norm(l.pp("post_attention_layernorm"))?),
                        Some(norm(l.pp("post_feedforward_layernorm"))?),
                    ),
                    None => (norm(l.pp("post_attention_layernorm"))?, None, None),
                };
                Ok(Layer {
                    attn: Attention::load(&cfg, l.pp("self_attn"))?,
                    mlp: Mlp::load(&cfg, l.pp("mlp"))?,
                    ln1: norm(l.pp("input_layernorm"))?,
                    ln2,
                    post_attn,
                    post_mlp,
                    sliding,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = norm(m.pp("norm"))?;
        let lm_head = match (with_lm_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(Linear::new(embed.embeddings().clone(), None)),
            (true, false) => Some(linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?),
        };
        let inv_freq = cfg.inv_freq();
        let embed = Embed::Dense(embed);
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            cfg,
            host: None,
        })
    }

    /// Loads a GGUF file. Quantized weights stay quantized (candle's quantized matmul); F32,
    /// F16 and BF16 tensors become dense tensors in `dtype`. Activations run in `dtype`; the
    /// quantized matmul itself takes and returns f32 and rounds its input rows to 8 bits, as
    /// llama.cpp does.
    pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, ModelError> {
        Self::load_gguf_with(path, dtype, device, false)
    }

    /// [`Decoder::load_gguf`], or with every weight dequantized to `dtype` when `dequantize`:
    /// the model a dequantizing loader (transformers' `gguf_file=`) runs, at the memory of a
    /// dense model.
    pub fn load_gguf_with(
        path: &Path,
        dtype: DType,
        device: &Device,
        dequantize: bool,
    ) -> std::result::Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let model = file.model()?;
        let ctx = format!("loading the weights of {}", path.display());
        let f = std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })?;
        let reader = std::cell::RefCell::new(std::io::BufReader::new(f));
        let cfg = model.config.clone();
        let get = |name: &str| -> Result<Arc<QTensor>> {
            Ok(Arc::new(file.content.tensor(&mut *reader.borrow_mut(), name, device)?))
        };
        (|| -> Result<Self> {
            let dense = |q: &QTensor| -> Result<Tensor> { q.dequantize(device)?.to_dtype(dtype) };
            let is_dense =
                |q: &QTensor| dequantize || matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            let lin = |w: Arc<QTensor>, b: Option<Arc<QTensor>>| -> Result<Linear> {
                let b = b.map(|b| dense(&b)).transpose()?;
                Ok(if is_dense(&w) { Linear::new(dense(&w)?, b) } else { Linear::quantized(w, b) })
            };
            let norm = |w: Arc<QTensor>| -> Result<RmsNorm> { Ok(RmsNorm::new(dense(&w)?, cfg.rms_norm_eps)) };
            let embd = get("token_embd.weight")?;
            let embed = if is_dense(&embd) {
                Embed::Dense(Embedding::new(dense(&embd)?, cfg.hidden_size))
            } else {
                Embed::Quantized(embd.clone())
            };
            let mut layers = Vec::with_capacity(cfg.num_layers);
            for i in 0..cfg.num_layers {
                let t = |name: &str| get(&format!("blk.{i}.{name}"));
                let bias = |name: &str, on: bool| -> Result<Option<Arc<QTensor>>> {
                    if on { Ok(Some(t(&format!("{name}.bias"))?)) } else { Ok(None) }
                };
                let (qb, kb, vb) =
                    (bias("attn_q", cfg.qkv_bias)?, bias("attn_k", cfg.qkv_bias)?, bias("attn_v", cfg.qkv_bias)?);
                let ob = bias("attn_output", cfg.o_bias)?;
                let (gb, ub, db) =
                    (bias("ffn_gate", cfg.mlp_bias)?, bias("ffn_up", cfg.mlp_bias)?, bias("ffn_down", cfg.mlp_bias)?);
                let (q_norm, k_norm) = if cfg.qk_norm {
                    (Some(norm(t("attn_q_norm.weight")?)?), Some(norm(t("attn_k_norm.weight")?)?))
                } else {
                    (None, None)
                };
                layers.push(Layer {
                    attn: Attention {
                        q: lin(t("attn_q.weight")?, qb)?,
                        k: lin(t("attn_k.weight")?, kb)?,
                        v: lin(t("attn_v.weight")?, vb)?,
                        o: lin(t("attn_output.weight")?, ob)?,
                        q_norm,
                        k_norm,
                        heads: cfg.num_heads,
                        kv_heads: cfg.num_kv_heads,
                        head_dim: cfg.head_dim,
                        rope_interleaved: model.rope_interleaved,
                        scale: attention_scale(&cfg),
                        softcap: None,
                    },
                    mlp: Mlp {
                        gate: lin(t("ffn_gate.weight")?, gb)?,
                        up: lin(t("ffn_up.weight")?, ub)?,
                        down: lin(t("ffn_down.weight")?, db)?,
                        gelu: false,
                    },
                    ln1: norm(t("attn_norm.weight")?)?,
                    ln2: norm(t("ffn_norm.weight")?)?,
                    post_attn: None,
                    post_mlp: None,
                    sliding: true,
                });
            }
            let norm = norm(get("output_norm.weight")?)?;
            let head = if cfg.tie_word_embeddings { embd } else { get("output.weight")? };
            let lm_head = Some(lin(head, None)?);
            let mut inv_freq = cfg.inv_freq();
            if model.rope_freqs {
                // Llama 3 scaling as llama.cpp stores it: each base frequency divided by its factor.
                let factors: Vec<f32> = get("rope_freqs.weight")?.dequantize(&Device::Cpu)?.to_vec1()?;
                for (f, d) in inv_freq.iter_mut().zip(factors) {
                    *f /= d;
                }
            }
            Ok(Self {
                embed,
                layers,
                norm,
                lm_head,
                inv_freq,
                device: device.clone(),
                dtype,
                cfg: cfg.clone(),
                host: None,
            })
        })()
        .map_err(ModelError::candle(ctx))
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The same model over packed rows for scoring (see [`PackedDecoder`]): on the CPU in f32
    /// with dense weights; None otherwise (quantized, half precision, another device, or
    /// `RBON_KERNELS=candle`).
    pub fn packed(&self) -> Result<Option<PackedDecoder>> {
        // Gemma-2's caps, scaled embeddings and extra norms run on candle's layers only.
        if !crate::path::host_kernels(&self.device) || self.dtype != DType::F32 || self.cfg.gemma2.is_some() {
            return Ok(None);
        }
        let Embed::Dense(embed) = &self.embed else { return Ok(None) };
        let vec = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
        let dense = |l: &Linear| -> Result<Option<Vec<f32>>> { l.weight().map(vec).transpose() };
        let bias = |l: &Linear| -> Result<Option<Vec<f32>>> { l.bias().map(vec).transpose() };
        // Weights stacked row-wise, with their biases (zeros for a layer without one).
        type Stacked = Option<(Vec<f32>, Option<Vec<f32>>)>;
        let stacked = |ls: &[&Linear]| -> Result<Stacked> {
            let mut w = Vec::new();
            let mut b = Vec::new();
            for l in ls {
                let Some(lw) = dense(l)? else { return Ok(None) };
                w.extend(lw);
                match bias(l)? {
                    Some(lb) => b.extend(lb),
                    None => b.extend(std::iter::repeat_n(0f32, l.weight().map_or(Ok(0), |t| t.dim(0))?)),
                }
            }
            let any_bias = ls.iter().any(|l| l.bias().is_some());
            Ok(Some((w, any_bias.then_some(b))))
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let a = &l.attn;
            let (Some((qkv_w, qkv_b)), Some((gate_up_w, gate_up_b)), Some(o_w), Some(down_w)) =
                (stacked(&[&a.q, &a.k, &a.v])?, stacked(&[&l.mlp.gate, &l.mlp.up])?, dense(&a.o)?, dense(&l.mlp.down)?)
            else {
                return Ok(None);
            };
            // Plain f32 products: AMX's f32-accurate mode is within 2⁻¹⁶ per product, which
            // through a decoder came to 8e-5 of a reward score (the parity bound is 1e-4), and
            // reward models decide the selection; the embedder uses it (see `PackedBert`).
            let (h, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size);
            let q_w = self.cfg.num_heads * self.cfg.head_dim;
            let qkv_rows = q_w + 2 * self.cfg.num_kv_heads * self.cfg.head_dim;
            layers.push(PackedLayer {
                qkv_w: Weight::portable(qkv_w, qkv_rows, h),
                qkv_b,
                o_w: Weight::portable(o_w, h, q_w),
                o_b: bias(&a.o)?,
                q_norm: a.q_norm.as_ref().map(|n| vec(n.weight())).transpose()?,
                k_norm: a.k_norm.as_ref().map(|n| vec(n.weight())).transpose()?,
                gate_up_w: Weight::portable(gate_up_w, 2 * inter, h),
                gate_up_b,
                down_w: Weight::portable(down_w, h, inter),
                down_b: bias(&l.mlp.down)?,
                ln1: vec(l.ln1.weight())?,
                ln2: vec(l.ln2.weight())?,
            });
        }
        let rope_interleaved = self.layers.first().is_some_and(|l| l.attn.rope_interleaved);
        Ok(Some(PackedDecoder {
            cfg: self.cfg.clone(),
            embed: vec(embed.embeddings())?,
            layers,
            norm: vec(self.norm.weight())?,
            inv_freq: self.inv_freq.clone(),
            rope_interleaved,
        }))
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_with_room(0)
    }

    /// An empty cache whose buffers are allocated for `positions` at once (prompt plus
    /// `max_new_tokens`): decoding then writes in place and never grows the cache.
    pub fn new_cache_with_room(&self, positions: usize) -> KvCache {
        let host = self.host.as_ref().map(|_| HostCache::new());
        KvCache { layers: vec![None; self.layers.len()], len: 0, room: positions, host }
    }

    fn rope(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        // Angles in f32 as transformers computes them, then cast to the model's dtype.
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(t * half);
        for p in start..start + t {
            angles.extend(self.inv_freq.iter().map(|f| p as f32 * f));
        }
        let a = Tensor::from_vec(angles, (t, half), &self.device)?;
        Ok((a.cos()?.to_dtype(self.dtype)?, a.sin()?.to_dtype(self.dtype)?))
    }

    /// Additive mask [t, s] for queries at positions start..start+t over keys 0..s: causal, and
    /// within the sliding window when the model has one. None when nothing is masked.
    fn mask(&self, start: usize, t: usize, s: usize, window: Option<usize>) -> Result<Option<Tensor>> {
        let window = window.unwrap_or(usize::MAX);
        let visible = |i: usize, j: usize| j <= start + i && start + i - j < window;
        if (0..t).all(|i| (0..s).all(|j| visible(i, j))) {
            return Ok(None);
        }
        let m: Vec<f32> =
            (0..t).flat_map(|i| (0..s).map(move |j| if visible(i, j) { 0.0 } else { f32::NEG_INFINITY })).collect();
        Ok(Some(Tensor::from_vec(m, (t, s), &self.device)?))
    }

    /// Runs `ids` [rows, t] after the cached positions and returns the final hidden states
    /// [rows, t, hidden]. Every row has the same length: rows of one prompt in lock-step.
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (rows, t) = ids.dims2()?;
        if let Some(host) = &self.host {
            let Some(hc) = cache.host.as_mut() else { candle_core::bail!("a cache of another decoder") };
            let flat = ids.flatten_all()?.to_vec1::<u32>()?;
            let hidden = host.hidden(&flat, rows, hc)?;
            return Tensor::from_vec(hidden, (rows, t, self.cfg.hidden_size), &self.device);
        }
        let start = cache.len;
        let (cos, sin) = self.rope(start, t)?;
        let windowed = self.cfg.sliding_window.filter(|_| self.layers.iter().any(|l| l.sliding));
        let sliding_mask = self.mask(start, t, start + t, windowed)?;
        let full_mask = match (windowed, self.layers.iter().all(|l| l.sliding)) {
            (Some(_), false) => self.mask(start, t, start + t, None)?,
            _ => sliding_mask.clone(),
        };
        let mut x = self.embed.forward(ids, self.dtype)?;
        if self.cfg.gemma2.is_some() {
            // √hidden, rounded to the weights' dtype as transformers does.
            let scale = Tensor::new((self.cfg.hidden_size as f32).sqrt(), &self.device)?.to_dtype(self.dtype)?;
            x = x.broadcast_mul(&scale)?;
        }
        let room = cache.room;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let mask = if layer.sliding { sliding_mask.as_ref() } else { full_mask.as_ref() };
            let h = layer.attn.forward(&layer.ln1.forward(&x)?, &cos, &sin, mask, c, (start, room))?;
            let h = match &layer.post_attn {
                Some(n) => n.forward(&h)?,
                None => h,
            };
            x = (x + h)?;
            let h = layer.mlp.forward(&layer.ln2.forward(&x)?)?;
            let h = match &layer.post_mlp {
                Some(n) => n.forward(&h)?,
                None => h,
            };
            x = (x + h)?;
        }
        cache.len += t;
        self.norm.forward(&x)
    }

    /// Logits (f32) of hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if let Some(host) = &self.host {
            let mut dims = hidden.dims().to_vec();
            let rows = dims[..dims.len().saturating_sub(1)].iter().product();
            let flat = hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let logits = host.logits(&flat, rows);
            if let Some(last) = dims.last_mut() {
                *last = self.cfg.vocab_size;
            }
            return Tensor::from_vec(logits, dims, &self.device);
        }
        let logits = match &self.lm_head {
            Some(h) => h.forward_f32(hidden)?,
            None => candle_core::bail!("this decoder was loaded without its language-model head"),
        };
        match self.cfg.gemma2.as_ref().and_then(|g| g.final_softcap) {
            Some(c) => (logits / c)?.tanh()? * c,
            None => Ok(logits),
        }
    }

    /// Logits (f32) of the last position of every row: [rows, vocab].
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let h = self.forward_hidden(ids, cache)?;
        self.logits(&h.i((.., t - 1..t, ..))?.squeeze(1)?)
    }

    /// [`Decoder::forward_last`] of `ids` [rows, t] given row-major, as host values [rows, vocab]
    /// row-major (on the host decoder without a copy of the logits).
    pub fn forward_last_vec(&self, ids: &[u32], rows: usize, cache: &mut KvCache) -> Result<Vec<f32>> {
        if let (Some(host), Some(hc)) = (&self.host, cache.host.as_mut()) {
            let hidden = host.hidden(ids, rows, hc)?;
            let (h, t) = (self.cfg.hidden_size, ids.len() / rows.max(1));
            let last: Vec<f32> = hidden.chunks_exact(h * t).flat_map(|r| r[(t - 1) * h..].iter().copied()).collect();
            return Ok(host.logits(&last, rows));
        }
        let t = ids.len() / rows.max(1);
        let ids = Tensor::from_slice(ids, (rows, t), &self.device)?;
        self.forward_last(&ids, cache)?.flatten_all()?.to_vec1::<f32>()
    }

    /// Log-probabilities of `response` after `prompt` under the unmodified model distribution
    /// (temperature 1, no truncation), one per response token, by teacher forcing.
    pub fn score(&self, prompt: &[u32], response: &[u32]) -> Result<Vec<f64>> {
        if prompt.is_empty() {
            candle_core::bail!("the prompt has no tokens");
        }
        if response.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<u32> = prompt.iter().chain(&response[..response.len() - 1]).copied().collect();
        let mut cache = self.new_cache();
        let h = self.forward_hidden(&Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?, &mut cache)?;
        let h = h.i((0, prompt.len() - 1.., ..))?;
        // On the device: only the picked logits and each position's log-sum-exp come back.
        crate::rows::log_softmax_at(&self.logits(&h)?, response)
    }
}
