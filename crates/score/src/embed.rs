//! Sentence embeddings from sentence-transformers folders (BERT family): `modules.json`
//! (Transformer → Pooling → optional Normalize), `1_Pooling/config.json` (mean, cls or max),
//! `sentence_bert_config.json` (max_seq_length). The paper's RBoN_WD uses all-MiniLM-L6-v2.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert;
use rayon::prelude::*;
use rbon_models::decoder::var_builder;
use rbon_models::{BertConfig, ModelDir, PackedBert};

use crate::{ScoreError, candle, length_batches};

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

/// The encoder: packed rows on the CPU (no padding, fused kernels), candle's BERT on other
/// devices.
enum Encoder {
    Packed(PackedBert),
    Candle(bert::BertModel),
}

/// A loaded sentence embedder.
pub struct Embedder {
    model: Encoder,
    tokenizer: tokenizers::Tokenizer,
    pooling: Pooling,
    normalize: bool,
    pad: u32,
    device: Device,
    dim: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("pooling", &self.pooling).field("dim", &self.dim).finish_non_exhaustive()
    }
}

fn json(dir: &ModelDir, name: &str) -> Result<Option<serde_json::Value>, ScoreError> {
    match dir.file(name) {
        None => Ok(None),
        Some(p) => serde_json::from_str(&dir.read(name)?)
            .map(Some)
            .map_err(|e| ScoreError::Config(format!("{}: {e}", p.display()))),
    }
}

impl Embedder {
    /// Loads a sentence-transformers folder (or a plain BERT folder: mean pooling, normalised).
    ///
    /// The encoder's weights and activations are f32, whatever `dtype` asks: candle's BERT
    /// builds its attention mask as `(1 − mask) · f32::MIN`, which is −∞ in f16 and bf16 and
    /// turns every score into NaN (0 · −∞). On a CPU with AMX (Intel Sapphire Rapids and later),
    /// `bf16` runs the packed encoder's matrix products in bf16 (sums in f32), three times less
    /// tile work than the f32-accurate products there; on one with AVX-512-BF16 but no AMX (AMD
    /// Zen 4 on), on `vdpbf16ps`, attention's products (queries by keys, weights by values)
    /// included. Elsewhere the products stay f32.
    pub fn load(spec: &str, requested: DType, device: &Device) -> Result<Self, ScoreError> {
        let dtype = DType::F32;
        let bf16_products = requested == DType::BF16;
        let dir = ModelDir::resolve(spec)?;
        let modules = json(&dir, "modules.json")?;
        let types: Vec<(String, String)> = modules
            .as_ref()
            .and_then(|m| m.as_array())
            .map(|a| {
                a.iter()
                    .map(|m| {
                        let t = m.get("type").and_then(|t| t.as_str()).unwrap_or_default().to_owned();
                        let p = m.get("path").and_then(|p| p.as_str()).unwrap_or_default().to_owned();
                        (t, p)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let pooling_dir = types.iter().find(|(t, _)| t.ends_with("Pooling")).map(|(_, p)| p.clone());
        let normalize = modules.is_none() || types.iter().any(|(t, _)| t.ends_with("Normalize"));
        let pooling = match pooling_dir {
            Some(p) => {
                let cfg = json(&dir, &format!("{p}/config.json"))?.unwrap_or_default();
                let on = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
                if on("pooling_mode_cls_token") {
                    Pooling::Cls
                } else if on("pooling_mode_max_tokens") {
                    Pooling::Max
                } else if on("pooling_mode_mean_tokens") || cfg.is_null() {
                    Pooling::Mean
                } else {
                    return Err(ScoreError::Config(format!(
                        "{}/{p}/config.json: only mean, cls and max pooling are supported",
                        dir.root().display()
                    )));
                }
            }
            None => Pooling::Mean,
        };
        let cfg_text = dir.read("config.json")?;
        let cfg: bert::Config = serde_json::from_str(&cfg_text)
            .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("config.json").display())))?;
        let max_len = json(&dir, "sentence_bert_config.json")?
            .and_then(|c| c.get("max_seq_length").and_then(|m| m.as_u64()))
            .map_or(cfg.max_position_embeddings, |m| m as usize);
        let packed_cfg: BertConfig = serde_json::from_str(&cfg_text)
            .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("config.json").display())))?;
        let vb = var_builder(&dir, dtype, device)?;
        let ctx = format!("loading the embedder {}", dir.root().display());
        let model = if rbon_models::path::host_kernels(device) && packed_cfg.supported() {
            let pb = PackedBert::load(vb, &packed_cfg, cfg.model_type.as_deref(), bf16_products);
            Encoder::Packed(pb.map_err(candle(&ctx))?)
        } else {
            Encoder::Candle(bert::BertModel::load(vb, &cfg).map_err(candle(&ctx))?)
        };
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.root().join("tokenizer.json"))
            .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("tokenizer.json").display())))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| ScoreError::Config(e.to_string()))?;
        tokenizer.with_padding(None);
        let pad = cfg.pad_token_id as u32;
        Ok(Self { model, tokenizer, pooling, normalize, pad, device: device.clone(), dim: cfg.hidden_size })
    }

    /// The embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Token ids of a text as the embedder reads it (truncated at max_seq_length).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ScoreError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ScoreError::Config(format!("tokenizing for the embedder: {e}")))
    }

    /// Embeds texts. On the packed encoder (the CPU), every text goes through in groups of
    /// rows with no padding, a few groups in flight at a time; elsewhere, in batches of
    /// similar lengths up to `batch_tokens` padded tokens.
    pub fn embed(&self, texts: &[&str], batch_tokens: usize) -> Result<Vec<Vec<f32>>, ScoreError> {
        let ids: Vec<Vec<u32>> = texts.par_iter().map(|t| self.encode(t)).collect::<Result<_, _>>()?;
        let model = match &self.model {
            Encoder::Packed(m) => m,
            Encoder::Candle(m) => {
                let mut out = vec![Vec::new(); ids.len()];
                for rows in length_batches(&ids.iter().map(Vec::len).collect::<Vec<_>>(), batch_tokens) {
                    let batch: Vec<&Vec<u32>> = rows.iter().map(|&i| &ids[i]).collect();
                    for (&i, e) in rows.iter().zip(self.embed_padded(m, &batch)?) {
                        out[i] = e;
                    }
                }
                return Ok(out);
            }
        };
        // Similar lengths side by side, so that a group of rows holds few long ones; an empty
        // text still reads one (pad) token, as in a padded batch.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| (ids[i].len(), i));
        let pad = [self.pad];
        let rows: Vec<&[u32]> = order.iter().map(|&i| if ids[i].is_empty() { &pad[..] } else { &ids[i][..] }).collect();
        let d = self.dim;
        let pooled = model.forward(&rows, None, |_, h| self.pool(h.chunks_exact(d))).map_err(candle("embedding"))?;
        let mut out = vec![Vec::new(); ids.len()];
        for (i, v) in order.into_iter().zip(pooled) {
            out[i] = v;
        }
        Ok(out)
    }

    /// One padded batch through candle's BERT.
    fn embed_padded(&self, model: &bert::BertModel, rows: &[&Vec<u32>]) -> Result<Vec<Vec<f32>>, ScoreError> {
        let ctx = "embedding";
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for r in rows {
            ids.extend(r.iter().copied().chain(std::iter::repeat_n(self.pad, t - r.len())));
            mask.extend(std::iter::repeat_n(1u32, r.len()).chain(std::iter::repeat_n(0, t - r.len())));
        }
        let shape = (rows.len(), t);
        let ids = Tensor::from_vec(ids, shape, &self.device).map_err(candle(ctx))?;
        let mask = Tensor::from_vec(mask, shape, &self.device).map_err(candle(ctx))?;
        let types = ids.zeros_like().map_err(candle(ctx))?;
        let h = model.forward(&ids, &types, Some(&mask)).map_err(candle(ctx))?;
        // Pooled where the model ran (on a GPU, only [rows, dim] comes back); an empty text
        // pools its one pad token, as on the packed path.
        let mut pool_mask = vec![0f32; rows.len() * t];
        for (i, r) in rows.iter().enumerate() {
            pool_mask[i * t..i * t + r.len().max(1)].fill(1.0);
        }
        let pooled = self.pool_device(&h, &pool_mask, (rows.len(), t)).map_err(candle(ctx))?;
        Ok(pooled.into_iter().map(|v| self.normalized(v)).collect())
    }

    /// [`Self::pool`] on the device: `h` [rows, t, dim], `mask` 1 on the tokens to pool.
    fn pool_device(&self, h: &Tensor, mask: &[f32], shape: (usize, usize)) -> candle_core::Result<Vec<Vec<f32>>> {
        let h = h.to_dtype(DType::F32)?;
        let m = Tensor::from_slice(mask, shape, &self.device)?.unsqueeze(2)?;
        let pooled = match self.pooling {
            Pooling::Cls => h.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?,
            Pooling::Max => {
                let floor = Tensor::full(f32::MIN, h.shape(), &self.device)?;
                m.broadcast_as(h.shape())?.ne(0f32)?.where_cond(&h, &floor)?.max(1)?
            }
        };
        pooled.to_vec2()
    }

    /// One sentence vector from the token vectors of a text (no padding among them).
    fn pool<'a>(&self, tokens: impl Iterator<Item = &'a [f32]> + Clone) -> Vec<f32> {
        let v = match self.pooling {
            Pooling::Cls => tokens.clone().next().map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0; self.dim]),
            Pooling::Mean => {
                let mut acc = vec![0f64; self.dim];
                let mut n = 0usize;
                for tok in tokens {
                    n += 1;
                    for (a, x) in acc.iter_mut().zip(tok) {
                        *a += f64::from(*x);
                    }
                }
                acc.iter().map(|a| (a / n.max(1) as f64) as f32).collect()
            }
            Pooling::Max => (0..self.dim).map(|d| tokens.clone().map(|tok| tok[d]).fold(f32::MIN, f32::max)).collect(),
        };
        self.normalized(v)
    }

    /// L2-normalised when the model's modules end with `Normalize`.
    fn normalized(&self, mut v: Vec<f32>) -> Vec<f32> {
        if self.normalize {
            let n = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x = (f64::from(*x) / n) as f32);
        }
        v
    }
}
