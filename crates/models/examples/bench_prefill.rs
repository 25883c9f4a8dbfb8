//! Times the prefill-shaped linear layer of scoring (`kernels::linear`, [M, K] · [N, K]ᵀ) with the
//! weight packed for AMX tiles against plain f32 gemm, alternating the two so that both see the
//! same machine: `bench_prefill M K N [ROUNDS] [POOL] [EPILOGUE]`. POOL 0 runs each product on
//! the calling thread (as the encoder's row groups do), 1 (the default) spreads it over rayon's
//! pool. EPILOGUE: 0 none (the default), 1 bias, 2 bias and GELU, 3 bias into a residual.
//! Without AMX, the bf16 weight runs on `vdpbf16ps` panels where the CPU has AVX-512-BF16, and
//! gemm runs in f32.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark program prints its figures")]

use std::time::Instant;

use rbon_models::kernels::{self, Epilogue, Mat, Weight};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let (m, k, n, rounds, pool, epilogue) = match a.as_slice() {
        [m, k, n] => (*m, *k, *n, 5, true, 0),
        [m, k, n, r] => (*m, *k, *n, *r, true, 0),
        [m, k, n, r, p] => (*m, *k, *n, *r, *p != 0, 0),
        [m, k, n, r, p, e] => (*m, *k, *n, *r, *p != 0, *e),
        _ => return Err("usage: bench_prefill M K N [ROUNDS] [POOL] [EPILOGUE]".into()),
    };
    let mut s = 1u64;
    let mut rnd = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
    let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
    let then = match epilogue {
        0 => Epilogue::overwrite(None),
        1 => Epilogue::overwrite(Some(&bias)),
        2 => Epilogue::overwrite(Some(&bias)).gelu(),
        _ => Epilogue::accumulate(Some(&bias)),
    };
    let packed = Weight::new(w.clone(), n, k);
    let bf16 = Weight::bf16(w.clone(), n, k);
    let plain = Weight::portable(w, n, k);
    let mut out = vec![0f32; m * n];
    let mut best = [f64::INFINITY; 3];
    for _ in 0..rounds {
        for (i, wt) in [&packed, &bf16, &plain].into_iter().enumerate() {
            if (i == 0 && !wt.on_amx()) || (i == 1 && !wt.in_bf16()) {
                continue;
            }
            let t = Instant::now();
            kernels::linear(Mat::new(&x, m, k), wt, &mut out, n, then, pool);
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    let bf16_name = if bf16.on_amx() { "amx bf16" } else { "vdpbf16ps" };
    for (name, secs) in ["amx bf16x3", bf16_name, "gemm f32"].iter().zip(best) {
        if secs.is_finite() {
            let gflops = 2.0 * (m * k * n) as f64 / secs / 1e9;
            println!("{name:>10} {m}x{k}x{n}: {:.3} ms ({gflops:.0} f32 GFLOP/s)", secs * 1e3);
        }
    }
    Ok(())
}
