//! The server engine: samples drawn by an OpenAI-compatible completions server (vLLM, SGLang,
//! TGI, llama.cpp) instead of the embedded candle decoder.
//!
//! rbon renders and encodes every prompt itself, with the policy's tokenizer and chat template,
//! and sends the token ids (or the rendered text), so the context is exactly what is recorded
//! and exported. One request is one sample (`n: 1`) with its own seed, `sample_seed(seed,
//! prompt_id, k)` halved to fit the servers' signed 64-bit seeds, so a sample does not depend on
//! N, the shard size or the ranks, as far as the server's seeded sampling is reproducible. Every
//! sampling parameter is sent, so the model's generation_config defaults never apply. The
//! response's token ids and per-token log-probs are read back; the stop-string and
//! `max_new_tokens` rules are the embedded engine's, applied to those tokens.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rbon_core::Message;
use rbon_models::{ChatTokenizer, ModelDir, chat::template_choice};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::config::{LogprobSource, PolicyConfig, PromptForm, SampleConfig, ServerConfig};
use crate::generate::{Generated, Policy, SampleError, ending, prompt_ids, sample_seed, turn_end};

/// The seed sent for sample `k` of a prompt (and recorded in its `seed` column): the sample's
/// seed in 63 bits, since servers take a signed 64-bit seed.
pub fn server_seed(seed: u64, prompt_id: &str, k: u32) -> u64 {
    sample_seed(seed, prompt_id, k) >> 1
}

/// How far a shard's requests have come, after each response.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// Requests sent and not yet answered.
    pub in_flight: usize,
    /// Tokens of the response that just came back.
    pub tokens: usize,
}

/// A connected server: the policy's tokenizer and template, an HTTP client, and the server's
/// context length when it reports one.
pub struct ServerPolicy {
    cfg: ServerConfig,
    tokenizer: ChatTokenizer,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
    key: Option<String>,
    /// Tokens of context (prompt and response), from `/v1/models` (vLLM's `max_model_len`).
    context: Option<usize>,
    /// At most `server.concurrency` requests in flight, across the workers that share this.
    permits: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for ServerPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerPolicy").field("url", &self.cfg.url).field("model", &self.cfg.model).finish()
    }
}

/// Why a request did not give a completion.
#[derive(Debug)]
struct Refused {
    /// The HTTP status, when the server answered.
    status: Option<u16>,
    message: String,
}

impl ServerPolicy {
    /// Loads the policy's tokenizer and template, then checks the server: that it answers, that
    /// it serves `server.model`, and (with `check_seed`) that the same seeded request gives the
    /// same sample twice. Fails fast with what is wrong.
    pub fn connect(policy: &PolicyConfig, sample: &SampleConfig) -> Result<Self, SampleError> {
        let Some(cfg) = policy.server().cloned() else {
            return Err(SampleError::Core(rbon_core::CoreError::internal(
                "the server engine without a server section",
            )));
        };
        let dir = ModelDir::resolve(&policy.model)?;
        let tokenizer = ChatTokenizer::load(&dir, &template_choice(&policy.chat_template, std::path::Path::new(".")))?;
        let key = match &cfg.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| SampleError::Server {
                url: cfg.url.clone(),
                message: format!("the API key's environment variable {var} is not set"),
            })?),
            None => None,
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(cfg.timeout_s))
            .connect_timeout(Duration::from_secs_f64(cfg.timeout_s.min(30.0)))
            .pool_max_idle_per_host(cfg.concurrency as usize)
            .build()
            .map_err(|e| SampleError::Server { url: cfg.url.clone(), message: format!("HTTP client: {e}") })?;
        // One thread drives every request (of every worker that shares this connection).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rbon-http")
            .enable_all()
            .build()
            .map_err(|e| SampleError::Server { url: cfg.url.clone(), message: format!("async runtime: {e}") })?;
        let permits = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1) as usize));
        let mut me = Self { cfg, tokenizer, client, rt, key, context: None, permits };
        me.context = me.check_model()?;
        if me.cfg.check_seed {
            me.check_seed(sample)?;
        }
        Ok(me)
    }

    fn err(&self, message: impl Into<String>) -> SampleError {
        SampleError::Server { url: self.cfg.url.clone(), message: message.into() }
    }

    /// `GET /models`: the server answers and serves `server.model`; its context length.
    fn check_model(&self) -> Result<Option<usize>, SampleError> {
        let url = self.cfg.models_url();
        let mut req = self.client.get(&url);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let body: Value = self
            .rt
            .block_on(async {
                let resp = req.send().await.map_err(|e| describe(&e))?;
                let status = resp.status();
                let text = resp.text().await.map_err(|e| describe(&e))?;
                if !status.is_success() {
                    return Err(format!("GET {url} answered {status}: {}", server_message(&text)));
                }
                serde_json::from_str(&text).map_err(|e| format!("GET {url}: not JSON ({e})"))
            })
            .map_err(|m| self.err(format!("cannot list the served models: {m}")))?;
        let models = body.get("data").and_then(Value::as_array).cloned().unwrap_or_default();
        let names: Vec<&str> = models.iter().filter_map(|m| m.get("id").and_then(Value::as_str)).collect();
        let Some(entry) = models.iter().find(|m| m.get("id").and_then(Value::as_str) == Some(&self.cfg.model)) else {
            return Err(self.err(format!(
                "it does not serve a model named {:?} (policy.server.model); it serves: {}",
                self.cfg.model,
                if names.is_empty() { "nothing".to_owned() } else { names.join(", ") }
            )));
        };
        Ok(entry.get("max_model_len").and_then(Value::as_u64).map(|n| n as usize))
    }

    /// The same request twice, one after the other, with one seed: a server that ignores the
    /// seed (or samples without it) gives two different samples.
    fn check_seed(&self, sample: &SampleConfig) -> Result<(), SampleError> {
        let messages = [Message::new("user", "Write one sentence about the sea.")];
        let ids = prompt_ids(&self.tokenizer, &messages)?;
        let probe = SampleConfig { max_new_tokens: sample.max_new_tokens.min(16), ..sample.clone() };
        let prompt = self.prompt_value(&ids, &messages)?;
        let body = Arc::new(self.body(&prompt, &probe, probe.max_new_tokens, 12345));
        let mut got = Vec::new();
        for _ in 0..2 {
            let url = self.cfg.completions_url();
            let v = self
                .rt
                .block_on(post(self.client.clone(), url, self.key.clone(), body.clone(), self.cfg.retries))
                .map_err(|r| self.err(format!("a probe request failed: {}", r.message)))?;
            let d = parse_choice(&v).map_err(|m| self.err(format!("its answer to a probe request: {m}")))?;
            self.usable(&d).map_err(|m| self.err(m))?;
            got.push((d.tokens, d.text));
        }
        if got[0] != got[1] {
            return Err(self.err(
                "two identical requests with the same seed gave different samples, so it ignores the seed and a \
                 run could not be reproduced or resumed consistently (vLLM and SGLang honour `seed`; set \
                 policy.server.check_seed: false to sample anyway)",
            ));
        }
        Ok(())
    }

    /// What a response must carry for this configuration.
    fn usable(&self, d: &Drawn) -> Result<(), String> {
        if self.cfg.logprobs == LogprobSource::Server {
            if d.tokens.is_none() {
                return Err("it returned no token ids (vLLM returns them with `return_token_ids`); exact log-probs \
                     need them: set policy.server.logprobs: teacher_forcing to encode the text and teacher-force it \
                     locally"
                    .into());
            }
            match &d.logprobs {
                None => {
                    return Err("it returned no per-token log-probs; set policy.server.logprobs: teacher_forcing to \
                         compute them with the local policy"
                        .into());
                }
                Some(l) if l.iter().any(|x| !x.is_finite() || *x > 1e-6) => {
                    return Err(format!("it returned a log-prob that is not ≤ 0: {l:?}"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The prompt as sent: the token ids, or (`prompt: text`) the rendered conversation.
    fn prompt_value(&self, ids: &[u32], messages: &[Message]) -> Result<Value, SampleError> {
        Ok(match self.cfg.prompt {
            PromptForm::Tokens => json!(ids),
            PromptForm::Text => json!(self.tokenizer.render(messages, true)?),
        })
    }

    /// The completion request of one sample, serialized: every sampling parameter explicit.
    fn body(&self, prompt: &Value, cfg: &SampleConfig, max_tokens: u32, seed: u64) -> Vec<u8> {
        let body = json!({
            "model": self.cfg.model,
            "prompt": prompt,
            "n": 1,
            "stream": false,
            "echo": false,
            "max_tokens": max_tokens,
            "min_tokens": 0,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": if cfg.top_k == 0 { -1 } else { i64::from(cfg.top_k) },
            "min_p": cfg.min_p,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": seed,
            "stop": cfg.stop,
            "stop_token_ids": self.tokenizer.eos_ids(),
            "ignore_eos": false,
            "skip_special_tokens": true,
            "logprobs": 0,
            "return_tokens_as_token_ids": true,
            "return_token_ids": true,
        });
        body.to_string().into_bytes()
    }

    /// Samples `cfg.n` responses for every prompt, with at most `server.concurrency` requests
    /// in flight (shared with every caller at once); returns them per prompt in sample order.
    /// Any request that fails after its retries fails the whole call (naming the prompt), so a
    /// shard is written only when all its samples are back. With `forcing`, log-probs are that
    /// policy's teacher forcing of the returned tokens.
    pub fn sample_prompts(
        &self,
        prompts: &[(String, Vec<Message>)],
        cfg: &SampleConfig,
        seed: u64,
        forcing: Option<&Policy>,
        tick: &mut dyn FnMut(Tick),
    ) -> Result<Vec<Vec<Generated>>, SampleError> {
        struct Job {
            prompt: usize,
            k: u32,
            seed: u64,
            body: Arc<Vec<u8>>,
        }
        let mut asked = Vec::with_capacity(prompts.len());
        let mut jobs = Vec::with_capacity(prompts.len() * cfg.n as usize);
        for (p, (id, messages)) in prompts.iter().enumerate() {
            let perr = |message: String| SampleError::Prompt { prompt_id: id.clone(), message };
            let ids = prompt_ids(&self.tokenizer, messages).map_err(|e| perr(e.to_string()))?;
            if ids.is_empty() {
                return Err(perr("the prompt encodes to no tokens".into()));
            }
            let max_tokens = match self.context {
                Some(ctx) if ids.len() >= ctx => {
                    return Err(perr(format!(
                        "its {} prompt tokens fill the server's context of {ctx} tokens: nothing can be sampled \
                         (shorten the prompt or serve a longer context)",
                        ids.len()
                    )));
                }
                // A response ends at the context's end, like one that reached max_new_tokens.
                Some(ctx) => cfg.max_new_tokens.min((ctx - ids.len()) as u32),
                None => cfg.max_new_tokens,
            };
            let prompt = self.prompt_value(&ids, messages).map_err(|e| perr(e.to_string()))?;
            for k in 0..cfg.n {
                let s = server_seed(seed, id, k);
                jobs.push(Job { prompt: p, k, seed: s, body: Arc::new(self.body(&prompt, cfg, max_tokens, s)) });
            }
            asked.push(Asked { messages, ids, max_tokens, close: OnceLock::new() });
        }
        let url = self.cfg.completions_url();
        let cap = self.cfg.concurrency.max(1) as usize;
        let retries = self.cfg.retries;
        let mut drawn: Vec<Vec<Option<(u64, Drawn)>>> =
            prompts.iter().map(|_| (0..cfg.n).map(|_| None).collect()).collect();
        let failure = self.rt.block_on(async {
            let mut set: JoinSet<(usize, u32, u64, Result<Value, Refused>)> = JoinSet::new();
            for j in &jobs {
                let (client, url, key, body) = (self.client.clone(), url.clone(), self.key.clone(), j.body.clone());
                let (p, k, s, permits) = (j.prompt, j.k, j.seed, self.permits.clone());
                set.spawn(async move {
                    // Closed never: the semaphore lives as long as the connection.
                    let _permit = permits.acquire_owned().await.ok();
                    (p, k, s, post(client, url, key, body, retries).await)
                });
            }
            loop {
                let joined = set.join_next().await?;
                let (p, k, s, res) = match joined {
                    Ok(r) => r,
                    Err(e) => return Some(self.err(format!("a request task failed: {e}"))),
                };
                let perr = |message: String| SampleError::Prompt { prompt_id: prompts[p].0.clone(), message };
                let d = match res {
                    Ok(v) => match parse_choice(&v) {
                        Ok(d) => d,
                        Err(m) => return Some(perr(format!("sample {k}: the server's answer: {m}"))),
                    },
                    Err(r) => {
                        return Some(perr(self.refusal(&r, k, asked[p].ids.len(), asked[p].max_tokens)));
                    }
                };
                if let Err(m) = self.usable(&d) {
                    return Some(perr(format!("sample {k}: {m}")));
                }
                let in_flight = cap - self.permits.available_permits().min(cap);
                tick(Tick { in_flight, tokens: d.tokens.as_ref().map_or(0, Vec::len) });
                drawn[p][k as usize] = Some((s, d));
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let mut out = Vec::with_capacity(prompts.len());
        for ((id, _), (row, a)) in prompts.iter().zip(drawn.into_iter().zip(&asked)) {
            let perr = |message: String| SampleError::Prompt { prompt_id: id.clone(), message };
            let mut samples = Vec::with_capacity(row.len());
            for (k, slot) in row.into_iter().enumerate() {
                let Some((s, d)) = slot else { return Err(perr(format!("sample {k} never came back"))) };
                let g = self.finish(a, cfg, k as u32, s, d, forcing).map_err(|m| perr(format!("sample {k}: {m}")))?;
                samples.push(g);
            }
            out.push(samples);
        }
        Ok(out)
    }

    /// The message of a request that failed for good.
    fn refusal(&self, r: &Refused, k: u32, prompt_len: usize, max_tokens: u32) -> String {
        let lower = r.message.to_lowercase();
        if r.status == Some(400) && (lower.contains("context length") || lower.contains("maximum context")) {
            return format!(
                "its {prompt_len} prompt tokens and up to {max_tokens} new ones do not fit the server's context: {}",
                r.message
            );
        }
        match r.status {
            Some(s) => format!("sample {k}: the server answered {s}: {}", r.message),
            None => format!("sample {k}: {} (at {})", r.message, self.cfg.url),
        }
    }

    /// One response, closed by the embedded engine's rules ([`ending`]) after its first EOS id;
    /// its log-prob is the sum over the kept tokens (or their teacher forcing by `forcing`).
    fn finish(
        &self,
        a: &Asked<'_>,
        cfg: &SampleConfig,
        k: u32,
        seed: u64,
        d: Drawn,
        forcing: Option<&Policy>,
    ) -> Result<Generated, String> {
        let tok = &self.tokenizer;
        let (mut tokens, logprobs) = match d.tokens {
            Some(t) => (t, d.logprobs),
            // A server that returns only text: rbon encodes it, and a turn the model ended
            // (finish `stop` without a stop string) is closed as the chat template closes it.
            None => {
                let mut t = tok.encode_text(&d.text).map_err(words)?;
                if d.finish.as_deref() == Some("stop") && !d.stopped_by_string {
                    if a.close.get().is_none() {
                        let _ = a.close.set(turn_end(tok, a.messages).map_err(words)?);
                    }
                    t.extend(a.close.get().into_iter().flatten());
                }
                (t, None)
            }
        };
        if let Some(l) = &logprobs
            && l.len() != tokens.len()
        {
            return Err(format!("{} token ids but {} log-probs", tokens.len(), l.len()));
        }
        if let Some(p) = tokens.iter().position(|t| tok.eos_ids().contains(t)) {
            tokens.truncate(p + 1);
        }
        let at_limit = d.finish.as_deref() == Some("length");
        let Some(end) = ending(tok, cfg, &tokens, a.max_tokens as usize, at_limit).map_err(words)? else {
            return Err(format!(
                "the server ended it after {} tokens with finish_reason {:?}, at neither an EOS id of the policy \
                 {:?} nor a stop string nor max_new_tokens (start vLLM with --generation-config vllm so that only \
                 the request's stop conditions apply)",
                tokens.len(),
                d.finish.as_deref().unwrap_or("none"),
                tok.eos_ids(),
            ));
        };
        tokens.truncate(end.keep);
        let logprob = match (forcing, logprobs) {
            (Some(policy), _) => policy.score(&a.ids, &tokens).map_err(words)?.iter().fold(0.0, |a, b| a + b),
            (None, Some(l)) => l[..tokens.len()].iter().fold(0.0, |a, b| a + b),
            (None, None) => return Err("no log-probs".into()),
        };
        let text = match end.text {
            Some(t) => t,
            None => tok.decode(&tokens).map_err(words)?,
        };
        Ok(Generated { sample_idx: k, token_ids: tokens, text, finish_reason: end.reason, logprob, seed })
    }
}

/// A prompt as asked: its conversation, token ids, the most new tokens its requests allow, and
/// (for servers that return only text) how the chat template closes its turn, made once.
struct Asked<'a> {
    messages: &'a [Message],
    ids: Vec<u32>,
    max_tokens: u32,
    close: OnceLock<Vec<u32>>,
}

fn words(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One completion choice as read from the response.
#[derive(Debug, Clone, PartialEq)]
struct Drawn {
    /// The generated token ids: `token_ids` (vLLM's `return_token_ids`), else the
    /// `token_id:N` strings of `logprobs.tokens` (vLLM's `return_tokens_as_token_ids`).
    tokens: Option<Vec<u32>>,
    /// `logprobs.token_logprobs`.
    logprobs: Option<Vec<f64>>,
    text: String,
    finish: Option<String>,
    /// True when `stop_reason` names a stop string (vLLM).
    stopped_by_string: bool,
}

fn parse_choice(v: &Value) -> Result<Drawn, String> {
    let choice =
        v.get("choices").and_then(Value::as_array).and_then(|c| c.first()).ok_or_else(|| "no `choices`".to_owned())?;
    let text = choice.get("text").and_then(Value::as_str).unwrap_or_default().to_owned();
    let finish = choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned);
    let stopped_by_string = choice.get("stop_reason").is_some_and(Value::is_string);
    let ids = |a: &Vec<Value>| -> Result<Vec<u32>, String> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .or_else(|| t.as_str().and_then(|s| s.strip_prefix("token_id:")).and_then(|n| n.parse().ok()))
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("{t} is not a token id"))
            })
            .collect()
    };
    let lp = choice.get("logprobs").filter(|l| !l.is_null());
    let tokens = match choice.get("token_ids").and_then(Value::as_array) {
        Some(a) => Some(ids(a)?),
        None => match lp.and_then(|l| l.get("tokens")).and_then(Value::as_array) {
            Some(a) if a.iter().all(|t| t.as_str().is_some_and(|s| s.starts_with("token_id:"))) => Some(ids(a)?),
            _ => None,
        },
    };
    let logprobs = match lp.and_then(|l| l.get("token_logprobs")).and_then(Value::as_array) {
        Some(a) => Some(
            a.iter()
                .map(|x| x.as_f64().ok_or_else(|| format!("log-prob {x} is not a number")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    Ok(Drawn { tokens, logprobs, text, finish, stopped_by_string })
}

/// The wait before retry `attempt` (0-based): 0.5 s doubling, at most 30 s, or what the
/// server's `Retry-After` asks (at most 5 minutes).
fn backoff(attempt: u32, retry_after: Option<f64>) -> Duration {
    let exp = 0.5 * 2f64.powi(attempt.min(16) as i32);
    Duration::from_secs_f64(retry_after.map_or(exp.min(30.0), |s| s.clamp(0.0, 300.0)))
}

/// `POST` with retries on 429, 5xx, timeouts and lost connections; any other answer that is not
/// a success fails at once with the server's message.
async fn post(
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    body: Arc<Vec<u8>>,
    retries: u32,
) -> Result<Value, Refused> {
    let mut attempt = 0;
    loop {
        let mut req =
            client.post(&url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.as_ref().clone());
        if let Some(k) = &key {
            req = req.bearer_auth(k);
        }
        let (refused, retry_after) = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|s| s.trim().parse::<f64>().ok());
                match resp.text().await {
                    Ok(text) if status.is_success() => match serde_json::from_str::<Value>(&text) {
                        Ok(v) => return Ok(v),
                        Err(e) => {
                            return Err(Refused { status: Some(status.as_u16()), message: format!("not JSON ({e})") });
                        }
                    },
                    Ok(text) => {
                        let r = Refused { status: Some(status.as_u16()), message: server_message(&text) };
                        if status.as_u16() != 429 && !status.is_server_error() {
                            return Err(r);
                        }
                        (r, retry_after)
                    }
                    // The body broke off: the connection was lost.
                    Err(e) => (Refused { status: None, message: describe(&e) }, None),
                }
            }
            Err(e) => (Refused { status: None, message: describe(&e) }, None),
        };
        if attempt >= retries {
            let tries = if retries == 0 { String::new() } else { format!(" (after {retries} retries)") };
            return Err(Refused { message: format!("{}{tries}", refused.message), ..refused });
        }
        tokio::time::sleep(backoff(attempt, retry_after)).await;
        attempt += 1;
    }
}

/// A transport error in words: unreachable, timed out, or the connection lost.
fn describe(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "no answer within policy.server.timeout_s".to_owned()
    } else if e.is_connect() {
        "cannot connect (is the server running, and is policy.server.url right?)".to_owned()
    } else {
        "the connection failed".to_owned()
    };
    let mut src: Option<&dyn std::error::Error> = Some(e);
    let mut last = String::new();
    while let Some(s) = src {
        last = s.to_string();
        src = s.source();
    }
    if !last.is_empty() {
        msg.push_str(&format!(": {last}"));
    }
    msg
}

/// The message of an error body: OpenAI's `{"error": {"message": …}}`, vLLM's older
/// `{"message": …}`, TGI's `{"error": "…"}`, or the text itself (shortened).
fn server_message(text: &str) -> String {
    let v: Option<Value> = serde_json::from_str(text).ok();
    let found = v.as_ref().and_then(|v| {
        v.get("error")
            .and_then(|e| e.get("message").and_then(Value::as_str).or_else(|| e.as_str()))
            .or_else(|| v.get("message").and_then(Value::as_str))
            .or_else(|| v.get("detail").and_then(Value::as_str))
            .map(str::to_owned)
    });
    let s = found.unwrap_or_else(|| text.trim().to_owned());
    if s.chars().count() > 400 { format!("{}…", s.chars().take(400).collect::<String>()) } else { s }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn choices_give_ids_from_token_ids_or_token_strings() {
        let v = json!({"choices": [{"text": "a", "finish_reason": "stop", "stop_reason": null, "token_ids": [5, 7],
            "logprobs": {"tokens": ["token_id:5", "token_id:7"], "token_logprobs": [-0.5, -1.25]}}]});
        let d = parse_choice(&v).unwrap();
        assert_eq!(d.tokens, Some(vec![5, 7]));
        assert_eq!(d.logprobs, Some(vec![-0.5, -1.25]));
        assert!(!d.stopped_by_string);
        let v = json!({"choices": [{"text": "a", "finish_reason": "stop", "stop_reason": "\n",
            "logprobs": {"tokens": ["token_id:9"], "token_logprobs": [-2.0]}}]});
        let d = parse_choice(&v).unwrap();
        assert_eq!(d.tokens, Some(vec![9]));
        assert!(d.stopped_by_string);
        let v = json!({"choices": [{"text": "hi", "finish_reason": "length", "logprobs": {"tokens": ["h", "i"], "token_logprobs": [-1.0, null]}}]});
        assert!(parse_choice(&v).unwrap_err().contains("null"));
        let v = json!({"choices": [{"text": "hi", "finish_reason": "length", "logprobs": null}]});
        let d = parse_choice(&v).unwrap();
        assert_eq!((d.tokens, d.logprobs), (None, None));
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(server_message(r#"{"error": {"message": "too long", "code": 400}}"#), "too long");
        assert_eq!(server_message(r#"{"object": "error", "message": "no model"}"#), "no model");
        assert_eq!(server_message(r#"{"error": "Input validation error"}"#), "Input validation error");
        assert_eq!(server_message("  plain text \n"), "plain text");
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_obeys_retry_after() {
        assert_eq!(backoff(0, None), Duration::from_millis(500));
        assert_eq!(backoff(3, None), Duration::from_secs(4));
        assert_eq!(backoff(20, None), Duration::from_secs(30));
        assert_eq!(backoff(0, Some(7.0)), Duration::from_secs(7));
        assert_eq!(backoff(0, Some(1e9)), Duration::from_secs(300));
    }

    #[test]
    fn server_seeds_fit_a_signed_64_bit_integer_and_follow_the_sample_seed() {
        for k in 0..100 {
            let s = server_seed(u64::MAX, "p", k);
            assert!(s <= i64::MAX as u64);
            assert_eq!(s, sample_seed(u64::MAX, "p", k) >> 1);
        }
    }
}
