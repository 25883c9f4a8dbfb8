//! The rows of the exports beside the pairs: BoNBoN's SFT completions and the variational-BoN
//! table of every sample.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use rbon_core::messages::messages_array;
use rbon_core::schema::{sft_schema, vbon_schema};
use rbon_core::tables::SampleScores;
use rbon_core::{CoreError, Message};
use rbon_regularize::{Method, SelectConfig, group_proxy, vbon_weights};

use crate::stage::PairError;

fn prompt<'a>(prompt_of: &HashMap<&str, &'a [Message]>, id: &str) -> Result<&'a [Message], CoreError> {
    prompt_of
        .get(id)
        .copied()
        .ok_or_else(|| CoreError::internal(format!("prompt {id:?} is missing from the prompts table")))
}

pub(super) fn sft_batch(
    picks: &[(&str, u32)],
    m: Method,
    b: f64,
    prompt_of: &HashMap<&str, &[Message]>,
    row_of: &HashMap<(&str, u32), usize>,
    data: &SampleScores,
) -> Result<RecordBatch, CoreError> {
    let mut prompts = Vec::with_capacity(picks.len());
    let mut completion = Vec::with_capacity(picks.len());
    for &(id, idx) in picks {
        prompts.push(prompt(prompt_of, id)?);
        let row = row_of
            .get(&(id, idx))
            .ok_or_else(|| CoreError::internal(format!("prompt {id:?}: selected sample {idx} does not exist")))?;
        completion.push(vec![Message::assistant(&data.responses[*row])]);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(picks.iter().map(|p| p.0))),
        Arc::new(StringArray::from_iter_values(picks.iter().map(|_| m.as_str()))),
        Arc::new(Float64Array::from_iter_values(picks.iter().map(|_| b))),
        messages_array(prompts),
        messages_array(completion.iter().map(Vec::as_slice)),
        Arc::new(UInt32Array::from_iter_values(picks.iter().map(|p| p.1))),
    ];
    RecordBatch::try_new(sft_schema(), cols).map_err(|e| CoreError::internal(format!("sft: {e}")))
}

pub(super) fn vbon_batch(
    select: &SelectConfig,
    prompt_of: &HashMap<&str, &[Message]>,
    data: &SampleScores,
) -> Result<RecordBatch, PairError> {
    let n = data.prompt_ids.len();
    let (mut reward, mut weights, mut prompts) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for g in &data.groups {
        let id = &data.prompt_ids[g.start];
        let (proxy, _) =
            group_proxy(select, data, g).map_err(|e| CoreError::internal(format!("prompt {id:?}: {e}")))?;
        let p = prompt(prompt_of, id)?;
        weights.extend(vbon_weights(&proxy));
        reward.extend(proxy);
        prompts.extend(std::iter::repeat_n(p, g.len()));
    }
    let completion: Vec<Vec<Message>> = data.responses.iter().map(|r| vec![Message::assistant(r)]).collect();
    let logprob: Float64Array = match &data.logprob {
        Some(l) => Float64Array::from_iter_values(l.iter().copied()),
        None => Float64Array::new_null(n),
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(data.prompt_ids.iter())),
        Arc::new(UInt32Array::from_iter_values(data.sample_idx.iter().copied())),
        messages_array(prompts),
        messages_array(completion.iter().map(Vec::as_slice)),
        Arc::new(logprob),
        Arc::new(Float64Array::from_iter_values(reward)),
        Arc::new(Float64Array::from_iter_values(weights.iter().map(|w| w.0))),
        Arc::new(Float64Array::from_iter_values(weights.iter().map(|w| w.1))),
    ];
    Ok(RecordBatch::try_new(vbon_schema(), cols).map_err(|e| CoreError::internal(format!("vbon: {e}")))?)
}
