//! N samples per prompt from one shared prefill: the prompt runs once (batch 1), its KV cache is
//! forked into rows that decode in lock-step, and finished rows leave the batch so they stop
//! costing compute. Each sample draws from its own generator seeded by (seed, prompt id, k), so
//! samples do not depend on how many rows decode together.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use rbon_core::Message;
use rbon_core::seed::derive_seed;
use rbon_models::{ChatTokenizer, Decoder, Device, ModelDir, Tensor, chat::template_choice};

use crate::config::{PolicyConfig, SampleConfig};
use crate::sampler::{Draw, SamplingParams, draw};

/// Errors of the sample stage.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Model(#[from] rbon_models::ModelError),
    #[error("{context}: {source}")]
    Candle { context: String, source: candle_core::Error },
    /// The server connection failed (its message, shared by every worker).
    #[error("{0}")]
    Connect(String),
    #[error("the policy's server at {url}: {message}")]
    Server { url: String, message: String },
    /// A prompt that does not fit the model's context.
    #[error("{0}")]
    Context(String),
    #[error("prompt {prompt_id:?}: {message}")]
    Prompt { prompt_id: String, message: String },
    #[error(transparent)]
    Core(#[from] rbon_core::CoreError),
}

fn candle(context: &str) -> impl FnOnce(candle_core::Error) -> SampleError + '_ {
    move |source| SampleError::Candle { context: context.to_owned(), source }
}

/// Why a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One sampled response.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub sample_idx: u32,
    /// The generated ids, EOS included when it was drawn; exactly the tokens of `text`.
    pub token_ids: Vec<u32>,
    /// The text of `token_ids`, special tokens skipped. A stop string ends the response at the
    /// last token boundary before it (the stop string and the token holding its start are not
    /// kept); a cut at `max_new_tokens` drops trailing tokens that hold only part of a character.
    pub text: String,
    pub finish_reason: FinishReason,
    /// Σ log π_ref over `token_ids` at temperature 1 without truncation.
    pub logprob: f64,
    pub seed: u64,
}

/// A decode step's logits [rows, vocab]: copied to the host for rbon's CPU sampler, or left on
/// the device for [`crate::device::draw_rows`].
enum Logits {
    /// [rows, vocab], row-major.
    Host(Vec<f32>),
    Device(Tensor),
}

/// The seed of sample `k` of a prompt.
pub fn sample_seed(seed: u64, prompt_id: &str, k: u32) -> u64 {
    let mut tag = b"sample".to_vec();
    tag.extend_from_slice(&k.to_le_bytes());
    derive_seed(seed, prompt_id, &tag)
}

/// A loaded policy: decoder, tokenizer, template.
#[derive(Debug)]
pub struct Policy {
    decoder: Decoder,
    tokenizer: ChatTokenizer,
}

impl Policy {
    /// Loads the model folder of a `policy` section.
    pub fn load(cfg: &PolicyConfig, device: &Device) -> Result<Self, SampleError> {
        let dir = ModelDir::resolve(&cfg.model)?;
        let decoder = Decoder::load(&dir, cfg.dtype.dtype(), device)?;
        let tokenizer = ChatTokenizer::load(&dir, &template_choice(&cfg.chat_template, std::path::Path::new(".")))?;
        Ok(Self { decoder, tokenizer })
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// The prompt as token ids: the conversation exactly as given (with `policy.system_prompt`
    /// already applied, see [`PolicyConfig::conversation`]), rendered with the chat template and
    /// its generation prompt.
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>, SampleError> {
        prompt_ids(&self.tokenizer, messages)
    }

    /// The tokens that close an assistant turn after `messages`, as the chat template writes
    /// them: the template's text after an assistant message, encoded, up to and including its
    /// first EOS id (Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`, Mistral's `</s>`). Without a
    /// template, or when the template's closing holds no EOS id, the first EOS id.
    pub fn turn_end(&self, messages: &[Message]) -> Result<Vec<u32>, SampleError> {
        turn_end(&self.tokenizer, messages)
    }

    /// Teacher forcing of responses given as text (candidates made elsewhere) after the
    /// conversation `messages`: each response is encoded and closed as the chat template closes
    /// an assistant turn ([`Policy::turn_end`]). Returns per response Σ log π_ref over those
    /// tokens and their count.
    pub fn teacher_force(&self, messages: &[Message], responses: &[&str]) -> Result<Vec<(f64, u32)>, SampleError> {
        let ids = responses.iter().map(|r| self.tokenizer.encode_text(r)).collect::<Result<Vec<_>, _>>()?;
        self.teacher_force_ids(messages, &ids)
    }

    /// [`Policy::teacher_force`] of responses given as token ids (without the turn's closing).
    pub fn teacher_force_ids(
        &self,
        messages: &[Message],
        responses: &[Vec<u32>],
    ) -> Result<Vec<(f64, u32)>, SampleError> {
        let prompt = self.prompt_ids(messages)?;
        let close = self.turn_end(messages)?;
        responses
            .iter()
            .map(|r| {
                let ids = [r.as_slice(), &close].concat();
                let logprob = self.score(&prompt, &ids)?.iter().fold(0.0, |a, b| a + b);
                Ok((logprob, ids.len() as u32))
            })
            .collect()
    }

    /// Log-probabilities of `response` after `prompt` by teacher forcing (one per token).
    pub fn score(&self, prompt: &[u32], response: &[u32]) -> Result<Vec<f64>, SampleError> {
        self.decoder.score(prompt, response).map_err(candle("teacher forcing"))
    }

    /// Draws one response per `(sample_idx, seed)` from one prefill of `prompt`, decoding up to
    /// `max_rows` rows together.
    pub fn sample(
        &self,
        prompt: &[u32],
        cfg: &SampleConfig,
        seeds: &[(u32, u64)],
        max_rows: usize,
    ) -> Result<Vec<Generated>, SampleError> {
        if prompt.is_empty() {
            return Err(SampleError::Candle {
                context: "sampling".into(),
                source: candle_core::Error::Msg("the prompt encodes to no tokens".into()),
            });
        }
        // A response ends at the model's last position, as one that reached max_new_tokens.
        let positions = self.decoder.config().max_position_embeddings;
        if prompt.len() >= positions {
            return Err(SampleError::Context(format!(
                "its {} prompt tokens fill the policy's {positions} positions: nothing can be sampled (shorten \
                 the prompt, or use a model with a longer context)",
                prompt.len()
            )));
        }
        let room = (positions - prompt.len()).min(u32::MAX as usize) as u32;
        let limited;
        let cfg = if cfg.max_new_tokens > room {
            limited = SampleConfig { max_new_tokens: room, ..cfg.clone() };
            &limited
        } else {
            cfg
        };
        let params = SamplingParams {
            temperature: cfg.temperature,
            top_k: cfg.top_k as usize,
            top_p: cfg.top_p,
            min_p: cfg.min_p,
        };
        let dev = self.decoder.device();
        // rbon's CPU path copies each step's logits to the host sampler; elsewhere (a GPU, or
        // RBON_KERNELS=candle) the logits stay on the device and only small summaries cross.
        let host = rbon_models::path::host_kernels(dev);
        let mut base = if host {
            self.decoder.new_cache()
        } else {
            self.decoder.new_cache_with_room(prompt.len() + cfg.max_new_tokens as usize)
        };
        let (first_host, first) = if host {
            (self.decoder.forward_last_vec(prompt, 1, &mut base).map_err(candle("prefill"))?, None)
        } else {
            let ids = Tensor::new(prompt, dev).and_then(|t| t.unsqueeze(0)).map_err(candle("prefill"))?;
            (Vec::new(), Some(self.decoder.forward_last(&ids, &mut base).map_err(candle("prefill"))?))
        };
        let mut out = Vec::with_capacity(seeds.len());
        for chunk in seeds.chunks(max_rows.max(1)) {
            struct Row {
                rng: ChaCha8Rng,
                tokens: Vec<u32>,
                /// Per token, so a cut can drop the log-probs of the tokens it drops.
                logprobs: Vec<f64>,
                done: Option<FinishReason>,
                text: Option<String>,
            }
            let mut rows: Vec<Row> = chunk
                .iter()
                .map(|&(_, s)| Row {
                    rng: ChaCha8Rng::seed_from_u64(s),
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    done: None,
                    text: None,
                })
                .collect();
            let mut cache = base.fork(chunk.len()).map_err(candle("fork"))?;
            let mut logits = match &first {
                None => Logits::Host(first_host.repeat(chunk.len())),
                Some(first) => {
                    let (_, vocab) = first.dims2().map_err(candle("prefill"))?;
                    Logits::Device(first.broadcast_as((chunk.len(), vocab)).map_err(candle("fork"))?)
                }
            };
            let mut active: Vec<usize> = (0..chunk.len()).collect();
            loop {
                let mut next = Vec::with_capacity(active.len());
                let mut keep = Vec::with_capacity(active.len());
                // One uniform per row from its own generator, then the draws: each is a pure
                // function of its row's logits and uniform.
                let us: Vec<f64> = active.iter().map(|&r| rows[r].rng.random::<f64>()).collect();
                let draws: Vec<Draw> = match &logits {
                    Logits::Host(l) => {
                        let vocab = l.len() / active.len().max(1);
                        l.par_chunks(vocab.max(1)).zip(us.par_iter()).map(|(l, &u)| draw(l, &params, u)).collect()
                    }
                    Logits::Device(t) => crate::device::draw_rows(t, &params, &us).map_err(candle("sampling"))?,
                };
                for (slot, &r) in active.iter().enumerate() {
                    let row = &mut rows[r];
                    let d = draws[slot];
                    row.tokens.push(d.token);
                    row.logprobs.push(d.logprob);
                    if let Some(end) = ending(&self.tokenizer, cfg, &row.tokens, cfg.max_new_tokens as usize, false)? {
                        row.tokens.truncate(end.keep);
                        row.logprobs.truncate(end.keep);
                        row.text = end.text;
                        row.done = Some(end.reason);
                    }
                    if row.done.is_none() {
                        next.push(d.token);
                        keep.push(slot as u32);
                    }
                }
                if next.is_empty() {
                    break;
                }
                if keep.len() < active.len() {
                    cache.keep(&keep).map_err(candle("dropping finished rows"))?;
                    active = keep.iter().map(|&s| active[s as usize]).collect();
                }
                logits = if host {
                    Logits::Host(
                        self.decoder.forward_last_vec(&next, next.len(), &mut cache).map_err(candle("decode"))?,
                    )
                } else {
                    let ids =
                        Tensor::new(next.as_slice(), dev).and_then(|t| t.unsqueeze(1)).map_err(candle("decode"))?;
                    Logits::Device(self.decoder.forward_last(&ids, &mut cache).map_err(candle("decode"))?)
                };
            }
            for (row, &(sample_idx, seed)) in rows.into_iter().zip(chunk) {
                let text = match row.text {
                    Some(t) => t,
                    None => self.tokenizer.decode(&row.tokens)?,
                };
                out.push(Generated {
                    sample_idx,
                    token_ids: row.tokens,
                    text,
                    finish_reason: row.done.unwrap_or(FinishReason::Length),
                    // Summed in drawing order from 0.0, as the tokens came.
                    logprob: row.logprobs.iter().fold(0.0, |a, b| a + b),
                    seed,
                });
            }
        }
        Ok(out)
    }
}

/// The prompt as token ids: the conversation exactly as given (with `policy.system_prompt`
/// already applied, see [`PolicyConfig::conversation`]), rendered with the chat template and its
/// generation prompt.
pub fn prompt_ids(tok: &ChatTokenizer, messages: &[Message]) -> Result<Vec<u32>, SampleError> {
    let text = tok.render(messages, true)?;
    Ok(tok.encode_prompt(&text)?)
}

/// The tokens that close an assistant turn after `messages` ([`Policy::turn_end`]).
pub fn turn_end(tok: &ChatTokenizer, messages: &[Message]) -> Result<Vec<u32>, SampleError> {
    // A marker no template trims or rewrites, to find where the response ends.
    const MARK: &str = "\u{E000}rbon-response\u{E000}";
    let eos = tok.eos_ids();
    let first: Vec<u32> = eos.first().copied().into_iter().collect();
    if !tok.has_template() {
        return Ok(first);
    }
    let mut conversation = messages.to_vec();
    conversation.push(Message::assistant(MARK));
    let text = tok.render(&conversation, false)?;
    let Some(at) = text.rfind(MARK) else { return Ok(first) };
    let after = tok.encode_text(&text[at + MARK.len()..])?;
    Ok(match after.iter().position(|t| eos.contains(t)) {
        Some(p) => after[..=p].to_vec(),
        None => first,
    })
}

/// How a response ends: the tokens it keeps, their text when a cut made it, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ending {
    pub keep: usize,
    pub text: Option<String>,
    pub reason: FinishReason,
}

/// Whether a response whose last token was just drawn has ended, by the rules every engine
/// records ([`Generated::text`]): on an EOS id (kept), at a stop string (cut at the last token
/// boundary before it), or at `limit` tokens, or earlier when `at_limit` (a server stopped at
/// its context), keeping whole characters.
pub(crate) fn ending(
    tok: &ChatTokenizer,
    cfg: &SampleConfig,
    tokens: &[u32],
    limit: usize,
    at_limit: bool,
) -> Result<Option<Ending>, SampleError> {
    if tokens.last().is_some_and(|t| tok.eos_ids().contains(t)) {
        return Ok(Some(Ending { keep: tokens.len(), text: None, reason: FinishReason::Stop }));
    }
    if !cfg.stop.is_empty() {
        let text = tok.decode(tokens)?;
        if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            let (keep, kept) = before_stop(tok, tokens, &text[..cut])?;
            return Ok(Some(Ending { keep, text: Some(kept), reason: FinishReason::Stop }));
        }
    }
    if at_limit || tokens.len() >= limit {
        let (keep, kept) = whole_chars(tok, tokens, tok.decode(tokens)?)?;
        return Ok(Some(Ending { keep, text: Some(kept), reason: FinishReason::Length }));
    }
    Ok(None)
}

/// Where a response that reached a stop string ends: the longest run of whole tokens whose
/// text is a prefix of `before` (the text before the stop string). A token that holds the
/// start of the stop string is dropped with any text it holds before it, so the stored text,
/// its token ids and its log-prob always describe the same tokens.
fn before_stop(tok: &ChatTokenizer, tokens: &[u32], before: &str) -> Result<(usize, String), SampleError> {
    for keep in (0..tokens.len()).rev() {
        let text = tok.decode(&tokens[..keep])?;
        if before.starts_with(&text) {
            return Ok((keep, text));
        }
    }
    Ok((0, String::new()))
}

/// A response cut at `max_new_tokens` keeps whole characters: when its last tokens hold only
/// the first bytes of a character (byte-level tokens split multi-byte characters), which
/// decode to U+FFFD, those tokens are dropped (at most three: a character has four bytes).
fn whole_chars(tok: &ChatTokenizer, tokens: &[u32], text: String) -> Result<(usize, String), SampleError> {
    if !text.ends_with(char::REPLACEMENT_CHARACTER) {
        return Ok((tokens.len(), text));
    }
    for keep in (tokens.len().saturating_sub(3)..tokens.len()).rev() {
        let shorter = tok.decode(&tokens[..keep])?;
        if !shorter.ends_with(char::REPLACEMENT_CHARACTER) && text.starts_with(&shorter) {
            return Ok((keep, shorter));
        }
    }
    Ok((tokens.len(), text))
}
