//! A BERT encoder for the CPU in f32 over packed rows: the tokens of every row of a batch sit
//! end to end in one [tokens, hidden] matrix, so the linear layers are single large GEMMs with
//! no padding, and attention runs per row over exactly its tokens. Used for sentence
//! embedders (all-MiniLM-L6-v2 and the rest of the BERT family); other devices and dtypes use
//! candle-transformers' `BertModel`, which this matches (see `crates/score/tests/parity.rs`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Deserialize;

use crate::kernels::{self, Mat, Visibility, Weight};

type Result<T> = std::result::Result<T, candle_core::Error>;

/// What the packed encoder reads of a BERT config.json.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Whether the packed encoder implements this config (else use candle's `BertModel`).
    pub fn supported(&self) -> bool {
        self.hidden_act == "gelu"
            && self.position_embedding_type.as_deref().is_none_or(|p| p == "absolute")
            && self.num_attention_heads > 0
            && self.hidden_size.is_multiple_of(self.num_attention_heads)
    }
}

#[derive(Debug)]
struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
}

#[derive(Debug)]
struct Layer {
    /// Query, key and value weights stacked: one GEMM of [tokens, 3·hidden].
    qkv_w: Weight,
    qkv_b: Vec<f32>,
    o_w: Weight,
    o_b: Vec<f32>,
    ln1: Norm,
    up_w: Weight,
    up_b: Vec<f32>,
    down_w: Weight,
    down_b: Vec<f32>,
    ln2: Norm,
}

/// A BERT encoder over packed rows (CPU, f32).
#[derive(Debug)]
pub struct PackedBert {
    cfg: BertConfig,
    word: Vec<f32>,
    pos: Vec<f32>,
    types: Vec<f32>,
    ln: Norm,
    layers: Vec<Layer>,
}

fn vec(t: Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()
}

fn norm(vb: &VarBuilder, size: usize) -> Result<Norm> {
    let get = |names: [&str; 2]| -> Result<Vec<f32>> {
        let name = names.into_iter().find(|n| vb.contains_tensor(n)).unwrap_or(names[0]);
        vec(vb.get(size, name)?)
    };
    Ok(Norm { w: get(["weight", "gamma"])?, b: get(["bias", "beta"])? })
}

impl PackedBert {
    /// Loads the encoder from weights under `embeddings.` and `encoder.` (or under `bert.` /
    /// `<model_type>.`, as `BertModel::load` accepts). `bf16_products`: the linear layers
    /// multiply in bf16 where the CPU has AMX (see [`Weight::bf16`]), in f32 otherwise.
    pub fn load(vb: VarBuilder, cfg: &BertConfig, model_type: Option<&str>, bf16_products: bool) -> Result<Self> {
        let weight = if bf16_products { Weight::bf16 } else { Weight::new };
        let key = "embeddings.word_embeddings.weight";
        let vb = if vb.contains_tensor(key) {
            vb
        } else if vb.contains_tensor(&format!("bert.{key}")) {
            vb.pp("bert")
        } else if let Some(mt) = model_type.filter(|mt| vb.contains_tensor(&format!("{mt}.{key}"))) {
            vb.pp(mt)
        } else {
            vb
        };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let e = vb.pp("embeddings");
        let word = vec(e.get((cfg.vocab_size, h), "word_embeddings.weight")?)?;
        let pos = vec(e.get((cfg.max_position_embeddings, h), "position_embeddings.weight")?)?;
        let types = vec(e.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?)?;
        let ln = norm(&e.pp("LayerNorm"), h)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let l = vb.pp(format!("encoder.layer.{l}"));
                let a = l.pp("attention");
                let lin = |vb: VarBuilder, out: usize, inp: usize| -> Result<(Vec<f32>, Vec<f32>)> {
                    Ok((vec(vb.get((out, inp), "weight")?)?, vec(vb.get(out, "bias")?)?))
                };
                let (qw, qb) = lin(a.pp("self.query"), h, h)?;
                let (kw, kb) = lin(a.pp("self.key"), h, h)?;
                let (vw, vb_) = lin(a.pp("self.value"), h, h)?;
                let (o_w, o_b) = lin(a.pp("output.dense"), h, h)?;
                let (up_w, up_b) = lin(l.pp("intermediate.dense"), i, h)?;
                let (down_w, down_b) = lin(l.pp("output.dense"), h, i)?;
                Ok(Layer {
                    qkv_w: weight([qw, kw, vw].concat(), 3 * h, h),
                    qkv_b: [qb, kb, vb_].concat(),
                    o_w: weight(o_w, h, h),
                    o_b,
                    ln1: norm(&a.pp("output.LayerNorm"), h)?,
                    up_w: weight(up_w, i, h),
                    up_b,
                    down_w: weight(down_w, h, i),
                    down_b,
                    ln2: norm(&l.pp("output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg: cfg.clone(), word, pos, types, ln, layers })
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// The last hidden states of `rows` (token ids; `type_ids` alike, or all 0), packed: row r
    /// is `out[offsets[r]..offsets[r + 1]]` in units of `hidden_size`. Positions restart at 0
    /// in every row. Returns (hidden, offsets).
    pub fn forward(&self, rows: &[&[u32]], type_ids: Option<&[&[u32]]>) -> Result<(Vec<f32>, Vec<usize>)> {
        let h = self.cfg.hidden_size;
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0);
        for r in rows {
            if r.len() > self.cfg.max_position_embeddings {
                candle_core::bail!(
                    "a row of {} tokens exceeds the encoder's {} positions",
                    r.len(),
                    self.cfg.max_position_embeddings
                );
            }
            offsets.push(offsets.last().copied().unwrap_or(0) + r.len());
        }
        let total = offsets.last().copied().unwrap_or(0);
        // Embeddings: word + position + token type, then LayerNorm.
        let mut tokens = Vec::with_capacity(total);
        for (r, ids) in rows.iter().enumerate() {
            for (p, &id) in ids.iter().enumerate() {
                let ty = type_ids.and_then(|t| t.get(r)).and_then(|t| t.get(p)).copied().unwrap_or(0);
                if id as usize >= self.cfg.vocab_size || ty as usize >= self.cfg.type_vocab_size {
                    candle_core::bail!("token id {id} (type {ty}) is outside the encoder's vocabulary");
                }
                tokens.push((id as usize, p, ty as usize));
            }
        }
        let mut x = vec![0f32; total * h];
        x.par_chunks_mut(h).zip(tokens.par_iter()).for_each(|(row, &(id, p, ty))| {
            let (w, ps, t) = (&self.word[id * h..][..h], &self.pos[p * h..][..h], &self.types[ty * h..][..h]);
            for (((o, a), b), c) in row.iter_mut().zip(w).zip(ps).zip(t) {
                *o = a + b + c;
            }
        });
        kernels::layer_norm(&mut x, &self.ln.w, &self.ln.b, self.cfg.layer_norm_eps as f32);
        let heads = self.cfg.num_attention_heads;
        let d = h / heads;
        let i = self.cfg.intermediate_size;
        let mut qkv = vec![0f32; total * 3 * h];
        let mut ctx = vec![0f32; total * h];
        let mut up = vec![0f32; total * i];
        for l in &self.layers {
            kernels::fill_rows(&mut qkv, Some(&l.qkv_b), 3 * h);
            kernels::linear(Mat::new(&x, total, h), &l.qkv_w, &mut qkv, 3 * h, true, true);
            let qkv_ref = &qkv;
            kernels::split_rows(&mut ctx, &offsets, h).into_par_iter().enumerate().for_each_init(
                Vec::new,
                |scratch, (r, out)| {
                    let (s, t) = (offsets[r], offsets[r + 1] - offsets[r]);
                    let at = |c: usize| Mat { data: &qkv_ref[s * 3 * h + c..], rows: t, cols: h, stride: 3 * h };
                    kernels::attention(at(0), at(h), at(2 * h), heads, heads, d, Visibility::All, out, h, scratch);
                },
            );
            // x ← LayerNorm(x + ctx·Woᵀ + b)
            kernels::add_rows(&mut x, &l.o_b);
            kernels::linear(Mat::new(&ctx, total, h), &l.o_w, &mut x, h, true, true);
            kernels::layer_norm(&mut x, &l.ln1.w, &l.ln1.b, self.cfg.layer_norm_eps as f32);
            kernels::fill_rows(&mut up, Some(&l.up_b), i);
            kernels::linear(Mat::new(&x, total, h), &l.up_w, &mut up, i, true, true);
            kernels::gelu_erf(&mut up);
            kernels::add_rows(&mut x, &l.down_b);
            kernels::linear(Mat::new(&up, total, i), &l.down_w, &mut x, h, true, true);
            kernels::layer_norm(&mut x, &l.ln2.w, &l.ln2.b, self.cfg.layer_norm_eps as f32);
        }
        Ok((x, offsets))
    }
}
