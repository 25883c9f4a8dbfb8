//! Reward models: `*ForSequenceClassification` folders. Decoder reward models (Llama, Mistral,
//! Qwen2, Qwen3: the Skywork-Reward and GRM families) score the conversation rendered with their
//! own chat template, reading the head at the last token as transformers does; DeBERTa-v2/v3
//! (OpenAssistant's reward-model-deberta-v3-large-v2, the RBoN paper's proxy) scores
//! (question, answer) text pairs. A decoder with its own head (Eurus-RM's `regression_head`)
//! reads that head at the last token or at a marked one; seq2seq judges (SteamSHP, the paper's
//! proxy) give the probability of a token at their first decoding step.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::Linear;
use candle_transformers::models::{debertav2, t5};
use rbon_core::Message;
use rbon_models::decoder::var_builder;
use rbon_models::{ChatTokenizer, Decoder, DecoderConfig, ModelDir, PackedDecoder, TemplateChoice};

use crate::config::{HeadPooling, PairAggregate, RewardKind, RewardSpec};
use crate::{ScoreError, candle, length_batches};

/// A loaded reward model.
#[derive(Debug)]
pub enum RewardModel {
    Decoder(Box<DecoderRm>),
    Deberta(Box<DebertaRm>),
    Seq2Seq(Box<Seq2SeqRm>),
    PairRm(Box<PairRm>),
}

/// A decoder reward model's body: packed rows on the CPU in f32, candle's padded batches
/// elsewhere.
#[derive(Debug)]
enum Body {
    Packed(PackedDecoder),
    Padded(Decoder),
}

#[derive(Debug)]
pub struct DecoderRm {
    body: Body,
    head: Linear,
    tokenizer: ChatTokenizer,
    bos: Option<u32>,
    pad: u32,
    max_len: usize,
    /// The token the head reads, when not the last (`pooling: { token }`).
    read_at: Option<u32>,
    /// What the reward entry calls it, for messages.
    name: String,
}

/// A seq2seq judge: the probability of `token` at the first decoding step, given the filled-in
/// template. candle's T5 encoder takes no padding mask, so inputs run one at a time.
pub struct Seq2SeqRm {
    model: t5::T5ForConditionalGeneration,
    tokenizer: tokenizers::Tokenizer,
    template: String,
    flatten_newlines: bool,
    token: u32,
    start: u32,
    device: Device,
}

impl std::fmt::Debug for Seq2SeqRm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seq2SeqRm").field("token", &self.token).finish_non_exhaustive()
    }
}

/// llm-blender's PairRM: a DeBERTa-v3 encoder reads `[CLS] <|source|> prompt [SEP] [CLS]
/// <|candidate1|> a [SEP] [CLS] <|candidate2|> b [SEP]`, and a two-layer head on (source,
/// candidate) gives logit(a, b) = head(h_src, h_a) − head(h_src, h_b). Each sample's reward comes
/// from all N(N−1) ordered comparisons among its prompt's samples ([`PairAggregate`]).
pub struct PairRm {
    model: debertav2::DebertaV2Model,
    head_in: Linear,
    head_out: Linear,
    tokenizer: tokenizers::Tokenizer,
    /// `<|source|>`, `<|candidate1|>`, `<|candidate2|>`, `<|candidate|>`.
    prefix: [u32; 4],
    pad: u32,
    /// Tokens of the source (1224 in the published model) and per candidate (412), [CLS] and
    /// [SEP] included; a candidate also gets half of what the source leaves unused.
    source_max: usize,
    candidate_max: usize,
    aggregate: PairAggregate,
    device: Device,
}

impl std::fmt::Debug for PairRm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairRm").field("aggregate", &self.aggregate).finish_non_exhaustive()
    }
}

/// The prefix strings PairRM's collator adds to its tokenizer; removed from texts, where they
/// would break the input's layout (llm-blender fails on them).
const PAIRRM_PREFIXES: [&str; 4] = ["<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"];

/// PairRM's (source, candidate) texts for a prompt and a response, as llm-blender builds them:
/// one user turn (after any system turn) is the source as it is; a multi-turn conversation is
/// `compare_conversations`' format, its user turns in the source and every assistant turn, the
/// response last, in the candidate. Literal `[SEP]` becomes a space, as its collator does.
pub fn pairrm_texts(prompt: &[Message], response: &str) -> (String, String) {
    let clean = |t: &str| {
        let mut t = t.replace("[SEP]", " ");
        // Until none is left: removing one can join the pieces of another.
        while let Some(p) = PAIRRM_PREFIXES.iter().find(|p| t.contains(**p)) {
            t = t.replace(p, "");
        }
        t
    };
    let users: Vec<&str> = prompt.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
    let assistants: Vec<&str> =
        prompt.iter().filter(|m| m.role == "assistant").map(|m| m.content.as_str()).chain([response]).collect();
    if assistants.len() == 1 {
        let source: Vec<&str> = prompt.iter().map(|m| m.content.as_str()).collect();
        return (clean(&source.join("\n\n")), clean(response));
    }
    let input: Vec<String> =
        users.iter().enumerate().map(|(i, u)| format!("USER: {u}\nAssistant: <Response {}>", i + 1)).collect();
    let cand: Vec<String> = assistants.iter().enumerate().map(|(i, a)| format!("<Response {}>: {a}", i + 1)).collect();
    let source = format!(
        "Finish the following coversation in each i-th turn by filling in <Response i> with your response.{}",
        input.join("\n")
    );
    (clean(&source), clean(&cand.join("\n")))
}

/// A seq2seq judge's template with `{prompt}` and `{response}` filled in one pass (a prompt that
/// itself contains `{response}` stays as it is).
fn fill(template: &str, prompt: &str, response: &str) -> String {
    let mut out = String::with_capacity(template.len() + prompt.len() + response.len());
    let mut rest = template;
    loop {
        let next = [("{prompt}", prompt), ("{response}", response)]
            .into_iter()
            .filter_map(|(key, value)| rest.find(key).map(|at| (at, key, value)))
            .min_by_key(|&(at, _, _)| at);
        match next {
            Some((at, key, value)) => {
                out.push_str(&rest[..at]);
                out.push_str(value);
                rest = &rest[at + key.len()..];
            }
            None => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

/// `[CLS] … [SEP]` cut to `max` tokens as the tokenizer's right truncation does: the content is
/// shortened, the special tokens stay.
fn truncated(ids: &[u32], max: usize) -> Vec<u32> {
    if ids.len() <= max || ids.len() < 2 {
        return ids.to_vec();
    }
    let mut out = ids[..max.saturating_sub(1)].to_vec();
    out.push(ids[ids.len() - 1]);
    out
}

impl PairRm {
    /// logit(a, b) of every ordered pair `(a, b)` of one prompt's encoded inputs.
    fn logits(
        &self,
        source: &[u32],
        cands: &[&[u32]],
        pairs: &[(usize, usize)],
        budget: usize,
    ) -> Result<Vec<f64>, ScoreError> {
        let ctx = "scoring with PairRM";
        let (src, cands) = self.truncate(source, cands);
        let rows: Vec<(Vec<u32>, [usize; 3])> =
            pairs.iter().map(|&(a, b)| self.row(&src, &cands[a], &cands[b])).collect();
        let lens: Vec<usize> = rows.iter().map(|r| r.0.len()).collect();
        let mut out = vec![0.0; rows.len()];
        for batch in length_batches(&lens, budget) {
            let t = batch.iter().map(|&i| lens[i]).max().unwrap_or(1);
            let (mut ids, mut mask) = (Vec::with_capacity(batch.len() * t), Vec::with_capacity(batch.len() * t));
            for &i in &batch {
                let pad = t - lens[i];
                ids.extend(rows[i].0.iter().copied().chain(std::iter::repeat_n(self.pad, pad)));
                mask.extend(std::iter::repeat_n(1u32, lens[i]).chain(std::iter::repeat_n(0, pad)));
            }
            let shape = (batch.len(), t);
            let ids = Tensor::from_vec(ids, shape, &self.device).map_err(candle(ctx))?;
            let mask = Tensor::from_vec(mask, shape, &self.device).map_err(candle(ctx))?;
            let h = self.model.forward(&ids, None, Some(mask)).map_err(candle(ctx))?;
            let (mut left, mut right) = (Vec::with_capacity(batch.len()), Vec::with_capacity(batch.len()));
            for (b, &i) in batch.iter().enumerate() {
                let [ps, pa, pb] = rows[i].1;
                let row = |p: usize| h.i((b, p, ..));
                let hs = row(ps).map_err(candle(ctx))?;
                left.push(Tensor::cat(&[&hs, &row(pa).map_err(candle(ctx))?], 0).map_err(candle(ctx))?);
                right.push(Tensor::cat(&[&hs, &row(pb).map_err(candle(ctx))?], 0).map_err(candle(ctx))?);
            }
            let head = |x: Vec<Tensor>| -> Result<Vec<f32>, ScoreError> {
                let x = Tensor::stack(&x, 0).map_err(candle(ctx))?;
                let y = self.head_in.forward(&x).and_then(|y| y.tanh()).and_then(|y| self.head_out.forward(&y));
                y.and_then(|y| y.to_dtype(DType::F32))
                    .and_then(|y| y.flatten_all())
                    .and_then(|y| y.to_vec1())
                    .map_err(candle(ctx))
            };
            let (l, r) = (head(left)?, head(right)?);
            for (k, &i) in batch.iter().enumerate() {
                out[i] = f64::from(l[k]) - f64::from(r[k]);
            }
        }
        Ok(out)
    }

    /// Each input's reward among the inputs that share its source (one prompt's samples).
    fn score_groups(&self, inputs: &[(Vec<u32>, Vec<u32>)], budget: usize) -> Result<Vec<f64>, ScoreError> {
        let mut out = vec![0.0; inputs.len()];
        let mut groups: Vec<(&[u32], Vec<usize>)> = Vec::new();
        for (i, (src, _)) in inputs.iter().enumerate() {
            match groups.iter_mut().find(|g| g.0 == src.as_slice()) {
                Some(g) => g.1.push(i),
                None => groups.push((src.as_slice(), vec![i])),
            }
        }
        for (src, members) in groups {
            let n = members.len();
            let cands: Vec<&[u32]> = members.iter().map(|&i| inputs[i].1.as_slice()).collect();
            let pairs: Vec<(usize, usize)> =
                (0..n).flat_map(|a| (0..n).filter(move |&b| b != a).map(move |b| (a, b))).collect();
            let logits = self.logits(src, &cands, &pairs, budget)?;
            let mut m = vec![vec![0.0f64; n]; n];
            for (&(a, b), l) in pairs.iter().zip(logits) {
                m[a][b] = l;
            }
            for (a, reward) in pairwise_rewards(&m, self.aggregate).into_iter().enumerate() {
                out[members[a]] = reward;
            }
        }
        Ok(out)
    }

    /// logit(a, b) for one (source, candidate a, candidate b), for tests and checks.
    pub fn compare(&self, a: &(Vec<u32>, Vec<u32>), b: &(Vec<u32>, Vec<u32>)) -> Result<f64, ScoreError> {
        Ok(self.logits(&a.0, &[&a.1, &b.1], &[(0, 1)], usize::MAX)?[0])
    }

    /// The encoder input of (a, b) as [`PairRm::compare`] builds it.
    pub fn pair_ids(&self, a: &(Vec<u32>, Vec<u32>), b: &(Vec<u32>, Vec<u32>)) -> Vec<u32> {
        let (src, cands) = self.truncate(&a.0, &[&a.1, &b.1]);
        self.row(&src, &cands[0], &cands[1]).0
    }

    /// The source cut to `source_max`, and each candidate to `candidate_max` plus half of what
    /// the source leaves unused.
    fn truncate(&self, source: &[u32], cands: &[&[u32]]) -> (Vec<u32>, Vec<Vec<u32>>) {
        let src = truncated(source, self.source_max);
        let room = self.candidate_max + self.source_max.saturating_sub(src.len()) / 2;
        let cands = cands.iter().map(|c| truncated(c, room)).collect();
        (src, cands)
    }

    /// One encoder input, source then a as candidate 1 and b as candidate 2, with the positions
    /// of the three prefix tokens the head reads.
    fn row(&self, src: &[u32], a: &[u32], b: &[u32]) -> (Vec<u32>, [usize; 3]) {
        let [_, c1, c2, c] = self.prefix;
        let mut ids = src.to_vec();
        let pa = ids.len() + 1;
        ids.extend(a.iter().map(|&t| if t == c { c1 } else { t }));
        let pb = ids.len() + 1;
        ids.extend(b.iter().map(|&t| if t == c { c2 } else { t }));
        (ids, [1, pa, pb])
    }
}

/// Rewards from the comparison matrix `m[a][b]` = logit(a, b) (diagonal unused).
pub fn pairwise_rewards(m: &[Vec<f64>], aggregate: PairAggregate) -> Vec<f64> {
    let n = m.len();
    let d = |a: usize, b: usize| m[a][b] - m[b][a];
    // llm-blender's "max_logits" scores: the mean over all N columns of M − Mᵀ.
    let scores: Vec<f64> =
        (0..n).map(|a| (0..n).filter(|&b| b != a).map(|b| d(a, b)).sum::<f64>() / n as f64).collect();
    match aggregate {
        PairAggregate::MeanLogit => scores,
        PairAggregate::Rank => (0..n)
            .map(|a| {
                if n < 2 {
                    return 1.0;
                }
                let better = scores.iter().filter(|&&s| s > scores[a]).count();
                1.0 - better as f64 / (n - 1) as f64
            })
            .collect(),
        PairAggregate::WinRate => (0..n)
            .map(|a| {
                if n < 2 {
                    return 0.5;
                }
                let wins: f64 = (0..n)
                    .filter(|&b| b != a)
                    .map(|b| {
                        let x = d(a, b);
                        if x > 0.0 {
                            1.0
                        } else if x == 0.0 {
                            0.5
                        } else {
                            0.0
                        }
                    })
                    .sum();
                wins / (n - 1) as f64
            })
            .collect(),
    }
}

pub struct DebertaRm {
    model: debertav2::DebertaV2SeqClassificationModel,
    tokenizer: tokenizers::Tokenizer,
    pad: u32,
    device: Device,
}

impl std::fmt::Debug for DebertaRm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebertaRm").finish_non_exhaustive()
    }
}

/// The (question, answer) texts a text-pair reward model sees: the prompt's turns joined by
/// blank lines, and the response.
pub fn question_text(prompt: &[Message]) -> String {
    prompt.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n")
}

impl Seq2SeqRm {
    /// softmax(logits of the first decoding step)[token], computed in f64 from the f32 logits.
    fn score_one(&self, ids: &[u32]) -> Result<f64, ScoreError> {
        let ctx = "scoring with the seq2seq judge";
        // The model holds its decoder's KV cache; a clone (weights shared) starts empty.
        let mut model = self.model.clone();
        model.clear_kv_cache();
        let input = Tensor::new(ids, &self.device).and_then(|t| t.unsqueeze(0)).map_err(candle(ctx))?;
        let start = Tensor::new(&[[self.start]], &self.device).map_err(candle(ctx))?;
        let enc = model.encode(&input).map_err(candle(ctx))?;
        let logits: Vec<f32> = model
            .decode(&start, &enc)
            .and_then(|l| l.to_dtype(DType::F32))
            .and_then(|l| l.flatten_all())
            .and_then(|l| l.to_vec1())
            .map_err(candle(ctx))?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let at = logits.get(self.token as usize).copied().ok_or_else(|| {
            ScoreError::Config(format!(
                "the judged token {} is outside the model's vocabulary ({})",
                self.token,
                logits.len()
            ))
        })?;
        Ok(f64::from(at - max).exp() / z)
    }
}

impl DecoderRm {
    /// Scores with the packed decoder: the inputs' common prefix once per batch, then each
    /// input's remaining tokens (at least one, the token the head reads).
    fn score_shared(
        &self,
        p: &PackedDecoder,
        inputs: &[(Vec<u32>, Vec<u32>)],
        budget: usize,
    ) -> Result<Vec<f64>, ScoreError> {
        let ctx = "scoring with a reward model";
        // An empty input reads one pad token, as a padded batch would.
        let pad = [self.pad];
        let ids: Vec<&[u32]> = inputs.iter().map(|r| if r.0.is_empty() { &pad[..] } else { r.0.as_slice() }).collect();
        let mut shared = ids.iter().map(|r| r.len() - 1).min().unwrap_or(0);
        for r in &ids[1..] {
            shared = shared.min(ids[0].iter().zip(r.iter()).take_while(|(a, b)| a == b).count());
        }
        let prefix = &ids[0][..shared];
        let lens: Vec<usize> = ids.iter().map(|r| r.len() - shared).collect();
        let mut out = vec![0.0; inputs.len()];
        for rows in length_batches(&lens, budget.saturating_sub(shared).max(1)) {
            let suffixes: Vec<&[u32]> = rows.iter().map(|&i| &ids[i][shared..]).collect();
            let h = p.last_hidden_shared(prefix, &suffixes).map_err(candle(ctx))?;
            let dim = h.len() / rows.len().max(1);
            let last = Tensor::from_vec(h, (rows.len(), dim), &Device::Cpu).map_err(candle(ctx))?;
            let logits = self.head.forward(&last).and_then(|l| l.to_vec2::<f32>()).map_err(candle(ctx))?;
            for (&i, l) in rows.iter().zip(logits) {
                out[i] = f64::from(l[0]);
            }
        }
        Ok(out)
    }
}

impl RewardModel {
    /// Loads a sequence-classification folder; the architecture comes from config.json.
    pub fn load(spec: &str, template: &TemplateChoice, dtype: DType, device: &Device) -> Result<Self, ScoreError> {
        Self::load_spec(&RewardSpec::classifier("reward", spec), template, dtype, device)
    }

    /// Loads the reward model a `score.rewards` entry describes (its kind, head and pooling).
    pub fn load_spec(
        r: &RewardSpec,
        template: &TemplateChoice,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ScoreError> {
        let spec = r.model.as_str();
        let dir = ModelDir::resolve(spec)?;
        let text = dir.read("config.json")?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("config.json").display())))?;
        let model_type = raw.get("model_type").and_then(|m| m.as_str()).unwrap_or_default().to_owned();
        let ctx = format!("loading the reward model {}", dir.root().display());
        let bad_config = |e: &dyn std::fmt::Display| {
            ScoreError::Config(format!("{}: {e}", dir.root().join("config.json").display()))
        };
        if let Some((template, token, flatten_newlines)) = r.seq2seq() {
            if model_type != "t5" {
                return Err(ScoreError::Config(format!(
                    "reward `{}`: {} is a `{model_type}` model; a seq2seq judge is a T5 folder",
                    r.name,
                    dir.root().display()
                )));
            }
            let mut cfg: t5::Config = serde_json::from_value(raw.clone()).map_err(|e| bad_config(&e))?;
            let vb = var_builder(&dir, dtype, device)?;
            // Flan-T5 / T5 v1.1 judges (SteamSHP) have an lm_head of their own and do not rescale
            // the decoder output (transformers 5 writes `tie_word_embeddings: true` for every T5
            // but keeps a head present in the weights). Original T5's tied, rescaled head is
            // not supported: candle's T5 rescales it by √d where transformers uses 1/√d.
            if !vb.contains_tensor("lm_head.weight")
                || raw.get("scale_decoder_outputs").and_then(|v| v.as_bool()) == Some(true)
            {
                return Err(ScoreError::Config(format!(
                    "reward `{}`: {} ties its output head to the embeddings (original T5); seq2seq judges must be \
                     Flan-T5 / T5 v1.1 models with an lm_head of their own",
                    r.name,
                    dir.root().display()
                )));
            }
            cfg.tie_word_embeddings = false;
            let model = t5::T5ForConditionalGeneration::load(vb, &cfg).map_err(candle(&ctx))?;
            let mut tokenizer = tokenizers::Tokenizer::from_file(dir.root().join("tokenizer.json"))
                .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("tokenizer.json").display())))?;
            // The whole input, as the reference encodes it (whatever tokenizer.json was saved with).
            tokenizer
                .with_truncation(None)
                .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("tokenizer.json").display())))?;
            tokenizer.with_padding(None);
            let ids = tokenizer
                .encode(token, false)
                .map_err(|e| ScoreError::Config(format!("reward `{}`: tokenizing {token:?}: {e}", r.name)))?;
            let [token_id] = ids.get_ids() else {
                return Err(ScoreError::Config(format!(
                    "reward `{}`: {token:?} is {} tokens of {}'s tokenizer ({:?}); the judged token must be one",
                    r.name,
                    ids.get_ids().len(),
                    dir.root().display(),
                    ids.get_tokens()
                )));
            };
            let start = cfg.decoder_start_token_id.unwrap_or(cfg.pad_token_id) as u32;
            return Ok(Self::Seq2Seq(Box::new(Seq2SeqRm {
                model,
                tokenizer,
                template: template.to_owned(),
                flatten_newlines,
                token: *token_id,
                start,
                device: device.clone(),
            })));
        }
        if model_type == "t5" {
            return Err(ScoreError::Config(format!(
                "reward `{}`: {} is a T5 (seq2seq) model: set `kind: shp` or `kind: seq2seq`",
                r.name,
                dir.root().display()
            )));
        }
        if r.kind == RewardKind::Pairrm {
            return Ok(Self::PairRm(Box::new(load_pairrm(r, &dir, &raw, dtype, device)?)));
        }
        if raw.get("cand1_prefix_id").is_some() {
            return Err(ScoreError::Config(format!(
                "reward `{}`: {} is a PairRM pairwise ranker: set `kind: pairrm`",
                r.name,
                dir.root().display()
            )));
        }
        if model_type == "deberta-v2" {
            let cfg: debertav2::Config = serde_json::from_value(raw.clone())
                .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("config.json").display())))?;
            let vb = var_builder(&dir, dtype, device)?;
            let model =
                debertav2::DebertaV2SeqClassificationModel::load(vb.pp("deberta"), &cfg, None).map_err(candle(&ctx))?;
            let mut tokenizer = tokenizers::Tokenizer::from_file(dir.root().join("tokenizer.json"))
                .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("tokenizer.json").display())))?;
            let max = cfg.max_position_embeddings.min(512);
            tokenizer
                .with_truncation(Some(tokenizers::TruncationParams { max_length: max, ..Default::default() }))
                .map_err(|e| ScoreError::Config(e.to_string()))?;
            tokenizer.with_padding(None);
            let pad = cfg.pad_token_id.unwrap_or(0) as u32;
            return Ok(Self::Deberta(Box::new(DebertaRm { model, tokenizer, pad, device: device.clone() })));
        }
        let cfg = DecoderConfig::from_json(&text, &dir.root().join("config.json").display().to_string())?;
        if r.head.is_none() && !cfg.architectures.iter().any(|a| a.ends_with("ForSequenceClassification")) {
            return Err(ScoreError::Config(format!(
                "{} is not a reward model: its architectures are {:?}, expected *ForSequenceClassification \
                 (or name its head: `head: regression_head` for Eurus-RM)",
                dir.root().display(),
                cfg.architectures
            )));
        }
        let mut vb = var_builder(&dir, dtype, device)?;
        let (head_name, outputs) = match &r.head {
            Some(h) => (h.as_str(), 1),
            None => ("score", cfg.num_labels),
        };
        if !vb.contains_tensor(&format!("{head_name}.weight")) {
            return Err(ScoreError::Config(format!(
                "reward `{}`: {} has no `{head_name}.weight` tensor to read the reward with",
                r.name,
                dir.root().display()
            )));
        }
        let head = candle_nn::linear_no_bias(cfg.hidden_size, outputs, vb.pp(head_name)).map_err(candle(&ctx))?;
        // A body saved under another name than transformers' `model.` (Starling-RM's
        // `transformer.`) is read as if it were.
        if !vb.contains_tensor("model.embed_tokens.weight")
            && let Some(prefix) = ["transformer", "backbone"]
                .into_iter()
                .find(|p| vb.contains_tensor(&format!("{p}.embed_tokens.weight")))
        {
            let prefix = prefix.to_owned();
            vb = vb.rename_f(move |name| match name.strip_prefix("model.") {
                Some(rest) => format!("{prefix}.{rest}"),
                None => name.to_owned(),
            });
        }
        let tokenizer = ChatTokenizer::load(&dir, template)?;
        let read_at = match &r.pooling {
            Some(HeadPooling::Token { token }) => {
                let ids = tokenizer.encode_text(token)?;
                let [id] = ids.as_slice() else {
                    return Err(ScoreError::Config(format!(
                        "reward `{}`: pooling token {token:?} is {} tokens of {}'s tokenizer; it must be one",
                        r.name,
                        ids.len(),
                        dir.root().display()
                    )));
                };
                Some(*id)
            }
            _ => None,
        };
        let bos = raw.get("bos_token_id").and_then(|b| b.as_u64()).map(|b| b as u32);
        let pad = cfg.pad_token_id.unwrap_or(0);
        let max_len = cfg.max_position_embeddings;
        let decoder = Decoder::from_var_builder(cfg, vb, false).map_err(candle(&ctx))?;
        let body = match decoder.packed().map_err(candle(&ctx))? {
            Some(p) => Body::Packed(p),
            None => Body::Padded(decoder),
        };
        Ok(Self::Decoder(Box::new(DecoderRm {
            body,
            head,
            tokenizer,
            bos,
            pad,
            max_len,
            read_at,
            name: r.name.clone(),
        })))
    }

    /// Token ids of one (prompt, response) as this model reads them.
    pub fn encode(&self, prompt: &[Message], response: &str) -> Result<(Vec<u32>, Vec<u32>), ScoreError> {
        match self {
            Self::Decoder(m) => {
                let mut conv = prompt.to_vec();
                conv.push(Message::assistant(response));
                let text = m.tokenizer.render(&conv, false)?;
                let mut ids = m.tokenizer.encode_prompt(&text)?;
                // A template that writes BOS into text whose tokenizer adds it again.
                if let Some(b) = m.bos
                    && ids.len() > 1
                    && ids[0] == b
                    && ids[1] == b
                {
                    ids.remove(0);
                }
                // A head read at a marked token sees nothing after it (the mask is causal): end
                // the input there.
                if let Some(t) = m.read_at {
                    let Some(at) = ids.iter().rposition(|&x| x == t) else {
                        return Err(ScoreError::Config(format!(
                            "reward `{}`: the input has no pooling token (id {t}) to read the head at",
                            m.name
                        )));
                    };
                    ids.truncate(at + 1);
                }
                // The score is read at the last token: keep the end of an over-long input.
                if ids.len() > m.max_len {
                    ids.drain(..ids.len() - m.max_len);
                }
                Ok((ids, Vec::new()))
            }
            Self::PairRm(m) => {
                let (source, cand) = pairrm_texts(prompt, response);
                let [s, _, _, c] = PAIRRM_PREFIXES;
                let enc = |t: String| {
                    m.tokenizer
                        .encode(t, true)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(|e| ScoreError::Config(format!("tokenizing for PairRM: {e}")))
                };
                Ok((enc(format!("{s}{source}"))?, enc(format!("{c}{cand}"))?))
            }
            Self::Seq2Seq(m) => {
                let flat = |t: &str| if m.flatten_newlines { t.replace('\n', " ") } else { t.to_owned() };
                let text = fill(&m.template, &flat(&question_text(prompt)), &flat(response));
                let enc = m
                    .tokenizer
                    .encode(text, true)
                    .map_err(|e| ScoreError::Config(format!("tokenizing for the seq2seq judge: {e}")))?;
                Ok((enc.get_ids().to_vec(), Vec::new()))
            }
            Self::Deberta(m) => {
                let enc = m
                    .tokenizer
                    .encode((question_text(prompt), response.to_owned()), true)
                    .map_err(|e| ScoreError::Config(format!("tokenizing for the DeBERTa reward model: {e}")))?;
                Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
            }
        }
    }

    /// Scores encoded inputs (from [`Self::encode`]), batching rows of similar length up to
    /// `batch_tokens` padded tokens. Returns one score per input, in input order.
    ///
    /// On the CPU in f32 a decoder reward model computes the longest common prefix of the inputs
    /// once per batch (the score stage passes the N responses of one prompt, whose rendered
    /// prompt is that prefix), so the prompt costs one forward pass instead of N.
    pub fn score(&self, inputs: &[(Vec<u32>, Vec<u32>)], batch_tokens: usize) -> Result<Vec<f64>, ScoreError> {
        if let Self::PairRm(m) = self {
            return m.score_groups(inputs, batch_tokens);
        }
        if let Self::Decoder(m) = self
            && let Body::Packed(p) = &m.body
            && !inputs.is_empty()
        {
            return m.score_shared(p, inputs, batch_tokens);
        }
        let lens: Vec<usize> = inputs.iter().map(|i| i.0.len()).collect();
        let mut out = vec![0.0; inputs.len()];
        for rows in length_batches(&lens, batch_tokens) {
            let scores = self.score_batch(&rows.iter().map(|&i| &inputs[i]).collect::<Vec<_>>())?;
            for (&i, s) in rows.iter().zip(scores) {
                out[i] = s;
            }
        }
        Ok(out)
    }

    fn score_batch(&self, rows: &[&(Vec<u32>, Vec<u32>)]) -> Result<Vec<f64>, ScoreError> {
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(1);
        match self {
            Self::PairRm(_) => Err(ScoreError::Config("PairRM scores whole prompts through score_groups".into())),
            Self::Seq2Seq(m) => rows.iter().map(|r| m.score_one(&r.0)).collect(),
            Self::Decoder(m) => {
                let ctx = "scoring with a reward model";
                let Body::Padded(decoder) = &m.body else {
                    return Err(ScoreError::Config("the packed reward model scores through score_shared".into()));
                };
                // Right padding: under a causal mask the real tokens never see the pads, so
                // each row's last real token is exactly as if it ran alone.
                let dev = decoder.device();
                let mut ids = Vec::with_capacity(rows.len() * t);
                for r in rows {
                    ids.extend_from_slice(&r.0);
                    ids.extend(std::iter::repeat_n(m.pad, t - r.0.len()));
                }
                let ids = Tensor::from_vec(ids, (rows.len(), t), dev).map_err(candle(ctx))?;
                let mut cache = decoder.new_cache();
                let h = decoder.forward_hidden(&ids, &mut cache).map_err(candle(ctx))?;
                let last: Vec<Tensor> = rows
                    .iter()
                    .enumerate()
                    .map(|(b, r)| h.i((b, r.0.len().saturating_sub(1), ..)))
                    .collect::<Result<_, _>>()
                    .map_err(candle(ctx))?;
                let last = Tensor::stack(&last, 0).map_err(candle(ctx))?;
                let logits = m.head.forward(&last).and_then(|l| l.to_dtype(DType::F32)).map_err(candle(ctx))?;
                let logits: Vec<Vec<f32>> = logits.to_vec2().map_err(candle(ctx))?;
                Ok(logits.into_iter().map(|l| f64::from(l[0])).collect())
            }
            Self::Deberta(m) => {
                let ctx = "scoring with the DeBERTa reward model";
                let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
                for r in rows {
                    let pad = t - r.0.len();
                    ids.extend(r.0.iter().copied().chain(std::iter::repeat_n(m.pad, pad)));
                    types.extend(r.1.iter().copied().chain(std::iter::repeat_n(0, pad)));
                    mask.extend(std::iter::repeat_n(1u32, r.0.len()).chain(std::iter::repeat_n(0, pad)));
                }
                let shape = (rows.len(), t);
                let ids = Tensor::from_vec(ids, shape, &m.device).map_err(candle(ctx))?;
                let types = Tensor::from_vec(types, shape, &m.device).map_err(candle(ctx))?;
                let mask = Tensor::from_vec(mask, shape, &m.device).map_err(candle(ctx))?;
                let logits = m.model.forward(&ids, Some(types), Some(mask)).map_err(candle(ctx))?;
                let logits: Vec<Vec<f32>> =
                    logits.to_dtype(DType::F32).and_then(|l| l.to_vec2()).map_err(candle(ctx))?;
                Ok(logits.into_iter().map(|l| f64::from(l[0])).collect())
            }
        }
    }
}

/// Loads `llm-blender/PairRM-hf`'s layout: a DeBERTa-v2 config with the prefix ids, the encoder
/// under `pretrained_model.`, the head as `head_layer.1` and `head_layer.4`.
fn load_pairrm(
    r: &RewardSpec,
    dir: &ModelDir,
    raw: &serde_json::Value,
    dtype: DType,
    device: &Device,
) -> Result<PairRm, ScoreError> {
    let bad = |m: String| {
        ScoreError::Config(format!("reward `{}`: {}: {m}", r.name, dir.root().join("config.json").display()))
    };
    let id = |k: &str| raw.get(k).and_then(|v| v.as_u64()).map(|v| v as u32).ok_or_else(|| bad(format!("no `{k}`")));
    let prefix = [id("source_prefix_id")?, id("cand1_prefix_id")?, id("cand2_prefix_id")?, id("cand_prefix_id")?];
    let n_tasks = raw.get("n_tasks").and_then(|v| v.as_u64()).unwrap_or(1);
    if n_tasks != 1 {
        return Err(bad(format!("n_tasks {n_tasks}: PairRM models with one task are supported")));
    }
    let len = |k: &str, default: usize| raw.get(k).and_then(|v| v.as_u64()).map_or(default, |v| v as usize);
    let (source_max, candidate_max) = (len("source_maxlength", 1224), len("candidate_maxlength", 412));
    // [CLS], the prefix token and [SEP] at least: the head reads the prefix tokens' positions.
    if source_max < 3 || candidate_max < 3 {
        return Err(bad(format!(
            "source_maxlength {source_max} and candidate_maxlength {candidate_max} must each be at least 3"
        )));
    }
    let mut cfg: debertav2::Config = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
    // The input (up to source + 2 candidates, 2048 tokens) is longer than the absolute position
    // table, which PairRM never reads (position_biased_input is false) but candle slices; the
    // relative positions' log buckets keep the original span.
    if cfg.position_biased_input {
        return Err(bad("position_biased_input: PairRM's DeBERTa-v3 reads relative positions only".into()));
    }
    if cfg.max_relative_positions < 1 {
        cfg.max_relative_positions = cfg.max_position_embeddings as isize;
    }
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(source_max + 2 * candidate_max);
    let ctx = format!("loading PairRM {}", dir.root().display());
    let vb = var_builder(dir, dtype, device)?;
    let model = debertav2::DebertaV2Model::load(vb.pp("pretrained_model"), &cfg).map_err(candle(&ctx))?;
    let h = cfg.hidden_size;
    let head_in = candle_nn::linear(2 * h, h, vb.pp("head_layer.1")).map_err(candle(&ctx))?;
    let head_out = candle_nn::linear(h, 1, vb.pp("head_layer.4")).map_err(candle(&ctx))?;
    let path = dir.root().join("tokenizer.json");
    let mut tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    // Truncation is PairRM's own (per part); pads would land inside the joined input.
    tokenizer.with_truncation(None).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    tokenizer.with_padding(None);
    for (text, want) in PAIRRM_PREFIXES.iter().zip(prefix) {
        if tokenizer.token_to_id(text) != Some(want) {
            return Err(bad(format!("{} does not hold {text} as id {want}", path.display())));
        }
    }
    let pad = cfg.pad_token_id.unwrap_or(0) as u32;
    Ok(PairRm {
        model,
        head_in,
        head_out,
        tokenizer,
        prefix,
        pad,
        source_max,
        candidate_max,
        aggregate: r.aggregate.unwrap_or_default(),
        device: device.clone(),
    })
}
