//! Reward models: `*ForSequenceClassification` folders. Decoder reward models (Llama, Mistral,
//! Qwen2, Qwen3: the Skywork-Reward and GRM families) score the conversation rendered with their
//! own chat template, reading the head at the last token as transformers does; DeBERTa-v2/v3
//! (OpenAssistant's reward-model-deberta-v3-large-v2, the RBoN paper's proxy) scores
//! (question, answer) text pairs.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::Linear;
use candle_transformers::models::debertav2;
use rbon_core::Message;
use rbon_models::decoder::var_builder;
use rbon_models::{ChatTokenizer, Decoder, DecoderConfig, ModelDir, PackedDecoder, TemplateChoice};

use crate::{ScoreError, candle, length_batches};

/// A loaded reward model.
#[derive(Debug)]
pub enum RewardModel {
    Decoder(Box<DecoderRm>),
    Deberta(Box<DebertaRm>),
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
        let dir = ModelDir::resolve(spec)?;
        let text = dir.read("config.json")?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ScoreError::Config(format!("{}: {e}", dir.root().join("config.json").display())))?;
        let model_type = raw.get("model_type").and_then(|m| m.as_str()).unwrap_or_default().to_owned();
        let ctx = format!("loading the reward model {}", dir.root().display());
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
        if !cfg.architectures.iter().any(|a| a.ends_with("ForSequenceClassification")) {
            return Err(ScoreError::Config(format!(
                "{} is not a reward model: its architectures are {:?}, expected *ForSequenceClassification",
                dir.root().display(),
                cfg.architectures
            )));
        }
        let vb = var_builder(&dir, dtype, device)?;
        let head = candle_nn::linear_no_bias(cfg.hidden_size, cfg.num_labels, vb.pp("score")).map_err(candle(&ctx))?;
        let tokenizer = ChatTokenizer::load(&dir, template)?;
        let bos = raw.get("bos_token_id").and_then(|b| b.as_u64()).map(|b| b as u32);
        let pad = cfg.pad_token_id.unwrap_or(0);
        let max_len = cfg.max_position_embeddings;
        let decoder = Decoder::from_var_builder(cfg, vb, false).map_err(candle(&ctx))?;
        let body = match decoder.packed().map_err(candle(&ctx))? {
            Some(p) => Body::Packed(p),
            None => Body::Padded(decoder),
        };
        Ok(Self::Decoder(Box::new(DecoderRm { body, head, tokenizer, bos, pad, max_len })))
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
                // The score is read at the last token: keep the end of an over-long input.
                if ids.len() > m.max_len {
                    ids.drain(..ids.len() - m.max_len);
                }
                Ok((ids, Vec::new()))
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
