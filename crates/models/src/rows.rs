//! Row statistics of logits where they were computed (on a GPU: without copying them to the
//! host). The exponentials are summed on the device in chunks of [`CHUNK`] tokens and the chunk
//! sums finished in f64 on the host, so a row costs `vocab / CHUNK` values of transfer and its
//! log-sum-exp is accurate to f32 rounding within a chunk, however large the vocabulary.

use candle_core::{D, DType, Tensor};

type Result<T> = std::result::Result<T, candle_core::Error>;

/// Tokens per chunk.
pub const CHUNK: usize = 256;

/// Logits [rows, vocab] as f32 [rows, chunks, CHUNK], padded with −∞ (weight 0) to whole chunks.
pub fn chunked(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let (rows, vocab) = logits.dims2()?;
    let chunks = vocab.div_ceil(CHUNK);
    let pad = chunks * CHUNK - vocab;
    let padded = if pad == 0 {
        logits.contiguous()?
    } else {
        let fill = Tensor::full(f32::NEG_INFINITY, (rows, pad), logits.device())?;
        Tensor::cat(&[&logits, &fill], 1)?
    };
    padded.reshape((rows, chunks, CHUNK))
}

/// Each row's maximum: [rows, 1, 1] on the device, and on the host.
pub fn row_max(chunked: &Tensor) -> Result<(Tensor, Vec<f32>)> {
    let max = chunked.max_keepdim(D::Minus1)?.max_keepdim(1)?;
    let host = max.flatten_all()?.to_vec1::<f32>()?;
    Ok((max, host))
}

/// Per row and chunk, Σ exp((l − max) · scale) over the chunk's tokens (summed in f32 on the
/// device), on the host as f64.
pub fn chunk_sums(chunked: &Tensor, max: &Tensor, scale: f64) -> Result<Vec<Vec<f64>>> {
    let shifted = chunked.broadcast_sub(max)?;
    let scaled = if scale == 1.0 { shifted } else { (shifted * scale)? };
    let sums: Vec<Vec<f32>> = scaled.exp()?.sum(D::Minus1)?.to_vec2()?;
    Ok(sums.into_iter().map(|r| r.into_iter().map(f64::from).collect()).collect())
}

/// log Σ exp(l) of each row from its maximum and chunk sums of exp(l − max).
pub fn log_sum_exp(max: &[f32], sums: &[Vec<f64>]) -> Vec<f64> {
    max.iter().zip(sums).map(|(&m, s)| f64::from(m) + s.iter().sum::<f64>().ln()).collect()
}

/// log softmax(logits[r])[ids[r]] for each row r of logits [rows, vocab]: what teacher forcing
/// needs, with only the picked logits and the row statistics leaving the device.
pub fn log_softmax_at(logits: &Tensor, ids: &[u32]) -> Result<Vec<f64>> {
    let (rows, _) = logits.dims2()?;
    if rows != ids.len() {
        candle_core::bail!("log_softmax_at: {rows} rows but {} ids", ids.len());
    }
    let c = chunked(logits)?;
    let (max, host_max) = row_max(&c)?;
    let lse = log_sum_exp(&host_max, &chunk_sums(&c, &max, 1.0)?);
    let idx = Tensor::new(ids, logits.device())?.unsqueeze(1)?;
    let picked: Vec<f32> = logits.to_dtype(DType::F32)?.contiguous()?.gather(&idx, 1)?.squeeze(1)?.to_vec1()?;
    Ok(picked.iter().zip(&lse).map(|(&p, &l)| f64::from(p) - l).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn log_softmax_at_matches_an_f64_reference_past_one_chunk() {
        // 3 rows × 1000 tokens (three full chunks and a partial one), wide logits.
        let (rows, vocab) = (3, 1000);
        let vals: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919) % 1013) as f32 * 0.02 - 10.0).collect();
        let t = Tensor::from_vec(vals.clone(), (rows, vocab), &Device::Cpu).unwrap();
        let ids = [0u32, 999, 512];
        let got = log_softmax_at(&t, &ids).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let row = &vals[r * vocab..(r + 1) * vocab];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let want = row[id as usize] as f64 - lse;
            assert!((got[r] - want).abs() < 1e-5, "row {r}: {} vs {want}", got[r]);
        }
    }
}
