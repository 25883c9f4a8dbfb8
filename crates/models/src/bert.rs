//! A BERT encoder for the CPU in f32 over packed rows: the tokens of every row of a batch sit
//! end to end in one [tokens, hidden] matrix, so the linear layers are GEMMs with no padding
//! (over groups of a few hundred tokens, one group per thread), and attention runs per row over
//! exactly its tokens. Used for sentence
//! embedders (all-MiniLM-L6-v2 and the rest of the BERT family); other devices and dtypes use
//! candle-transformers' `BertModel`, which this matches (see `crates/score/tests/parity.rs`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Deserialize;

use crate::kernels::{self, Epilogue, Mat, Visibility, Weight};
use crate::panels::{self, Input, Lhs, Out};

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
    /// multiply in bf16 where the CPU has AMX or AVX-512-BF16 (see [`Weight::bf16`]), in f32
    /// otherwise; attention's two products do too (on AMX tiles for heads a multiple of 32
    /// wide, on AVX-512-BF16 panels without AMX).
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

    /// Runs the encoder over `rows` (token ids; `type_ids` alike, or all 0) and hands each
    /// row's last hidden states ([tokens, hidden_size], positions from 0) to `each` with the
    /// row's index; returns what `each` gave, in row order.
    ///
    /// Rows go through the encoder in groups of about [`GROUP_TOKENS`] tokens (twice that on AMX
    /// tiles), one group per thread from the embeddings to `each`: a group's activations stay
    /// in its core's L2 cache, no layer waits for the others' threads, and only the groups in
    /// flight hold activations. The threads take the groups from one queue, the costliest
    /// first, so that none waits long for the last. A batch too small to keep the pool busy
    /// that way runs as one group with every product spread over the pool. A row's result does
    /// not depend on the rows it is grouped with.
    pub fn forward<T: Send>(
        &self,
        rows: &[&[u32]],
        type_ids: Option<&[&[u32]]>,
        each: impl Fn(usize, &[f32]) -> T + Sync,
    ) -> Result<Vec<T>> {
        let h = self.cfg.hidden_size;
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0);
        for (r, ids) in rows.iter().enumerate() {
            if ids.len() > self.cfg.max_position_embeddings {
                candle_core::bail!(
                    "a row of {} tokens exceeds the encoder's {} positions",
                    ids.len(),
                    self.cfg.max_position_embeddings
                );
            }
            for (p, &id) in ids.iter().enumerate() {
                let ty = type_id(type_ids, r, p);
                if id as usize >= self.cfg.vocab_size || ty as usize >= self.cfg.type_vocab_size {
                    candle_core::bail!("token id {id} (type {ty}) is outside the encoder's vocabulary");
                }
            }
            offsets.push(offsets.last().copied().unwrap_or(0) + ids.len());
        }
        // On AMX tiles the products outrun the weights' stream from memory at GROUP_TOKENS:
        // twice the rows per pass over the weights ran 1.2x faster there (in f32 and bf16).
        let on_amx = self.layers.first().is_some_and(|l| l.up_w.on_amx());
        let groups = groups(&offsets, if on_amx { 2 * GROUP_TOKENS } else { GROUP_TOKENS });
        let threads = rayon::current_num_threads();
        if groups.len() < 2 * threads {
            let mut x = Vec::new();
            self.embeddings(rows, type_ids, 0..rows.len(), &mut x);
            self.layers(&mut x, &offsets, true, &mut Scratch::default());
            let x = &x;
            return Ok((0..rows.len())
                .into_par_iter()
                .map(|r| each(r, &x[offsets[r] * h..offsets[r + 1] * h]))
                .collect());
        }
        // The costliest groups first: per token, the linear layers cost 2h + i and attention
        // the row's length (in units of 4h multiply-adds).
        let per_token = 2 * h + self.cfg.intermediate_size;
        let cost = |g: &std::ops::Range<usize>| -> usize {
            g.clone().map(|r| offsets[r + 1] - offsets[r]).map(|t| t * (per_token + t)).sum()
        };
        let mut queue: Vec<(usize, std::ops::Range<usize>)> = groups.into_iter().map(|g| (cost(&g), g)).collect();
        queue.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.start.cmp(&b.1.start)));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = |_| {
            let (mut scratch, mut x, mut done) = (Scratch::default(), Vec::new(), Vec::new());
            loop {
                let at = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((_, g)) = queue.get(at) else { break };
                let local: Vec<usize> = offsets[g.start..=g.end].iter().map(|o| o - offsets[g.start]).collect();
                self.embeddings(rows, type_ids, g.clone(), &mut x);
                self.layers(&mut x, &local, false, &mut scratch);
                for (r, w) in g.clone().zip(local.windows(2)) {
                    done.push((r, each(r, &x[w[0] * h..w[1] * h])));
                }
            }
            done
        };
        // One worker per thread; a worker that starts after the queue has run dry just returns.
        let mut done: Vec<(usize, T)> = (0..threads).into_par_iter().with_max_len(1).flat_map_iter(work).collect();
        done.sort_unstable_by_key(|(r, _)| *r);
        Ok(done.into_iter().map(|(_, v)| v).collect())
    }

    /// The embeddings (word + position + token type) of `rows[range]`, packed, into `x`.
    fn embeddings(
        &self,
        rows: &[&[u32]],
        type_ids: Option<&[&[u32]]>,
        range: std::ops::Range<usize>,
        x: &mut Vec<f32>,
    ) {
        let h = self.cfg.hidden_size;
        x.clear();
        for r in range {
            for (p, &id) in rows[r].iter().enumerate() {
                let (id, ty) = (id as usize, type_id(type_ids, r, p) as usize);
                let (w, ps, t) = (&self.word[id * h..][..h], &self.pos[p * h..][..h], &self.types[ty * h..][..h]);
                x.extend(w.iter().zip(ps).zip(t).map(|((a, b), c)| a + b + c));
            }
        }
    }

    /// The embedding LayerNorm and every layer over the packed rows `x` (row r is tokens
    /// `offsets[r]..offsets[r + 1]`), in place. `threads`: spread each step over rayon's pool.
    fn layers(&self, x: &mut [f32], offsets: &[usize], threads: bool, s: &mut Scratch) {
        let h = self.cfg.hidden_size;
        let total = x.len() / h;
        let eps = self.cfg.layer_norm_eps as f32;
        let heads = self.cfg.num_attention_heads;
        let d = h / heads;
        let i = self.cfg.intermediate_size;
        let Scratch { qkv, ctx, up, pairs, attn } = s;
        for (buf, width) in [(&mut *qkv, 3 * h), (&mut *ctx, h)] {
            // Every element is written before it is read, so old values may stay (likewise in
            // `up` and `pairs`, sized where they are used).
            buf.resize(total * width, 0.0);
        }
        let (qkv, ctx) = (&mut qkv[..total * 3 * h], &mut ctx[..total * h]);
        kernels::layer_norm(x, &self.ln.w, &self.ln.b, eps, threads);
        for l in &self.layers {
            // With bf16 panels for the linear layers, attention multiplies in bf16 as well.
            let on_panels = l.up_w.in_bf16() && !l.up_w.on_amx();
            // With bf16 products on AMX tiles, attention's two products run on the tiles too.
            let on_tiles = l.up_w.in_bf16() && l.up_w.on_amx() && tiles_take(d);
            kernels::linear(Mat::new(x, total, h), &l.qkv_w, qkv, 3 * h, Epilogue::overwrite(Some(&l.qkv_b)), threads);
            let qkv_ref = &*qkv;
            let one_row = |r: usize, out: &mut [f32], attn: &mut AttentionBuffers| {
                let (s, t) = (offsets[r], offsets[r + 1] - offsets[r]);
                let at = |c: usize| Mat { data: &qkv_ref[s * 3 * h + c..], rows: t, cols: h, stride: 3 * h };
                if on_tiles {
                    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                    crate::amx::attention(at(0), at(h), at(2 * h), heads, d, out, h, &mut attn.amx);
                } else if on_panels {
                    crate::panels::attention(at(0), at(h), at(2 * h), heads, d, out, h, &mut attn.bf16);
                } else {
                    kernels::attention(
                        at(0),
                        at(h),
                        at(2 * h),
                        heads,
                        heads,
                        d,
                        Visibility::All,
                        out,
                        h,
                        &mut attn.f32,
                    );
                }
            };
            let rows = kernels::split_rows(ctx, offsets, h);
            if threads {
                rows.into_par_iter()
                    .enumerate()
                    .for_each_init(AttentionBuffers::default, |attn, (r, out)| one_row(r, out, attn));
            } else {
                rows.into_iter().enumerate().for_each(|(r, out)| one_row(r, out, attn));
            }
            // x ← LayerNorm(x + ctx·Woᵀ + b)
            kernels::linear(Mat::new(ctx, total, h), &l.o_w, x, h, Epilogue::accumulate(Some(&l.o_b)), threads);
            kernels::layer_norm(x, &l.ln1.w, &l.ln1.b, eps, threads);
            // x ← x + GELU(x·Wupᵀ + b)·Wdownᵀ + b; with bf16 panels, in blocks of rows on one
            // thread, so that a block's intermediate activations stay in L2 from the first
            // product to the second (gemm's f32 path packs its weight per call, and would pay
            // for that on every block).
            let block = if threads || !on_panels { total.max(1) } else { MLP_ROWS };
            let up_then = Epilogue::overwrite(Some(&l.up_b)).gelu();
            let down_then = Epilogue::accumulate(Some(&l.down_b));
            for x in x.chunks_mut(block * h) {
                let rows = x.len() / h;
                if let (Some(up_w), Some(down_w)) = (l.up_w.panels(), l.down_w.panels()) {
                    // The intermediate activations as the bf16 pairs the second product reads.
                    let ip = i.div_ceil(2);
                    pairs.resize(rows * ip, 0);
                    panels::linear(Input::Rows(Mat::new(x, rows, h)), up_w, Out::Pairs(pairs, ip), up_then, threads);
                    let up = Input::Pairs { a: Lhs { data: pairs, stride: ip }, rows };
                    panels::linear(up, down_w, Out::F32(x, h), down_then, threads);
                } else {
                    up.resize(rows * i, 0.0);
                    let up = &mut up[..rows * i];
                    kernels::linear(Mat::new(x, rows, h), &l.up_w, up, i, up_then, threads);
                    kernels::linear(Mat::new(up, rows, i), &l.down_w, x, h, down_then, threads);
                }
            }
            kernels::layer_norm(x, &l.ln2.w, &l.ln2.b, eps, threads);
        }
    }
}

/// Tokens per group of rows in [`PackedBert::forward`]: for MiniLM (hidden 384, intermediate
/// 1536) a group's widest buffer is 1.5 MB, inside a 2 MB L2. Twice that on AMX tiles, where
/// a pass over the weights per group costs more than the spill.
const GROUP_TOKENS: usize = 256;

/// Tokens per block of the MLP in a group's pass ([`PackedBert::forward`]): for MiniLM, a block's
/// intermediate activations take 288 KiB in f32, with room left in L2 for the weight panels.
const MLP_ROWS: usize = 48;

/// Consecutive rows, `offsets` as in [`PackedBert::forward`], in groups of at most `tokens`
/// tokens (a longer row is a group of its own), as ranges of row indices.
fn groups(offsets: &[usize], tokens: usize) -> Vec<std::ops::Range<usize>> {
    let rows = offsets.len().saturating_sub(1);
    let mut out = Vec::new();
    let mut start = 0;
    for r in 0..rows {
        if r > start && offsets[r + 1] - offsets[start] > tokens {
            out.push(start..r);
            start = r;
        }
    }
    if start < rows {
        out.push(start..rows);
    }
    out
}

/// Token type `p` of row `r` (0 when not given).
fn type_id(type_ids: Option<&[&[u32]]>, r: usize, p: usize) -> u32 {
    type_ids.and_then(|t| t.get(r)).and_then(|t| t.get(p)).copied().unwrap_or(0)
}

/// One thread's buffers for [`PackedBert::layers`], kept across groups.
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    up: Vec<f32>,
    /// bf16 pairs that feed a product on the panels.
    pairs: Vec<u32>,
    attn: AttentionBuffers,
}

/// One thread's buffers for a row's attention, in f32, on bf16 panels or on AMX tiles.
#[derive(Default)]
struct AttentionBuffers {
    f32: Vec<f32>,
    bf16: crate::panels::AttentionScratch,
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    amx: crate::amx::AttentionScratch,
}

/// Whether attention over heads of `d` dimensions can run on AMX tiles (only where the linear
/// layers' weights are there already, which needs AMX).
fn tiles_take(d: usize) -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    return crate::amx::attention_fits(d);
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = d;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_hold_whole_rows_up_to_the_budget() {
        // Rows of 100, 100, 100, 400 and 10 tokens.
        let offsets = [0, 100, 200, 300, 700, 710];
        assert_eq!(groups(&offsets, 256), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(groups(&offsets, 1000), vec![0..5]);
        assert_eq!(groups(&[0], 256), Vec::<std::ops::Range<usize>>::new());
    }
}
