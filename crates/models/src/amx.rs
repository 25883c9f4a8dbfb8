//! f32 linear layers on Intel AMX tiles (Sapphire Rapids and later), with f32-grade accuracy.
//!
//! AMX multiplies bf16 matrices into f32 accumulators at 16 times the rate of AVX-512 FMAs, but
//! bf16 keeps only 8 bits of mantissa. So each f32 operand is split into two bf16 numbers,
//! `x = hi + lo` (16 bits of mantissa together), and the product is taken as
//! `x·w ≈ xh·wh + xl·wh + xh·wl`: the "bf16x3" scheme of oneDNN's f32 math modes. The dropped
//! `xl·wl` term and the split's rounding are about 2⁻¹⁷ of each product; sums stay in f32. That is
//! the same work as a bf16 GEMM over an inner dimension three times as long, which is how it runs:
//! the weight is packed once as `[wh; wh; wl]` stacked along k, each block of activation rows as
//! `[xh, xl, xh]`.
//!
//! The microkernel keeps a 32×32 block of the output in four accumulator tiles and steps through
//! k 32 at a time: two 16×32 tiles of activations, two 16×(16 pairs) tiles of weights, four tile
//! products. Both operands are packed so that each tile is 1 KiB of contiguous memory (strided
//! tile loads from row-major data ran at a third of the speed), and the kernel prefetches two
//! steps ahead. Every output element sums its k terms in one fixed order whatever the batch, so
//! results do not depend on which other rows share the product.
//!
//! [`Precision::Bf16`] skips the split (one term, a third of the work) for callers that asked for
//! bf16 matrix products.
//!
//! Linux hands a process the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`available`] asks once. `RBON_AMX=0` in the environment turns the path off.

#![expect(unsafe_code, reason = "AMX tile instructions in inline asm, and arch_prctl through libc")]

use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::epilogue::{self, Epilogue, Mat};

/// Rows and columns of an output block; also the k step (32 bf16 values per tile row).
const BLOCK: usize = 32;
/// u16 values in one packed k step of a block: two 16×32 tiles.
const STEP: usize = 2 * 16 * BLOCK;
/// Packed activations per task: its run of row blocks stays in the core's L2 while the task
/// sweeps the weight panels (512 KiB measured best of 256 KiB to 2 MiB, by a little).
const TASK_BYTES: usize = 512 * 1024;

/// Whether this process can run AMX bf16 tile products: the CPU has AMX-TILE and AMX-BF16, the
/// kernel granted the tile state, and `RBON_AMX` is not `0`. Checked once.
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("RBON_AMX").is_ok_and(|v| v.trim() == "0") {
            return false;
        }
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that can run this binary.
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it fails (non-zero) on kernels
        // without AMX support, and then no tile instruction ever runs.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    })
}

/// Whether a [rows, cols] weight can take this path: whole 32-wide blocks both ways.
pub fn fits(rows: usize, cols: usize) -> bool {
    rows > 0 && cols > 0 && rows.is_multiple_of(BLOCK) && cols.is_multiple_of(BLOCK)
}

/// The bf16 nearest to `x` (ties to even), as bits.
#[inline(always)]
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` as hi + lo, both bf16.
#[inline(always)]
fn split(x: f32) -> (u16, u16) {
    let hi = bf16(x);
    (hi, bf16(x - f32::from_bits(u32::from(hi) << 16)))
}

/// How a product is taken on the tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// bf16x3: within about 2⁻¹⁶ of an f32 product.
    F32,
    /// Operands rounded to bf16 (8-bit mantissa), sums in f32.
    Bf16,
}

impl Precision {
    /// Terms per product: the inner dimension is this many times k.
    fn terms(self) -> usize {
        match self {
            Self::F32 => 3,
            Self::Bf16 => 1,
        }
    }
}

/// A linear layer's weight [n, k] (out, in) packed for [`matmul_t`]: for each panel of 32
/// outputs, for each k step of the inner dimension (`[wh; wh; wl]` for [`Precision::F32`], `wh`
/// for bf16), two 1 KiB tiles of 16 k-pairs × 16 outputs (the pair-interleaved layout the tile
/// product reads).
#[derive(Debug)]
pub struct Packed {
    n: usize,
    k: usize,
    precision: Precision,
    data: Vec<u16>,
}

impl Packed {
    /// Whether the products take bf16 operands ([`Precision::Bf16`]).
    pub fn is_bf16(&self) -> bool {
        self.precision == Precision::Bf16
    }

    /// Packs `w` ([n, k], row-major). `None` unless [`fits`].
    pub fn new(w: &[f32], n: usize, k: usize, precision: Precision) -> Option<Self> {
        if !fits(n, k) || w.len() != n * k {
            return None;
        }
        let kt = precision.terms() * k;
        let steps = kt / BLOCK;
        let mut data = vec![0u16; n * kt];
        data.par_chunks_mut(steps * STEP).enumerate().for_each(|(p, panel)| {
            for (q, step) in panel.chunks_exact_mut(STEP).enumerate() {
                // Segments along the tripled k: wh, wh, wl (against xh, xl, xh).
                let (seg, k0) = (q * BLOCK / k, q * BLOCK % k);
                for (i, pair) in step.chunks_exact_mut(2).enumerate() {
                    let (half, r, j) = (i / 256, i / 16 % 16, i % 16);
                    let row = &w[(p * BLOCK + half * 16 + j) * k..][..k];
                    for (e, v) in pair.iter_mut().enumerate() {
                        let x = row[k0 + 2 * r + e];
                        *v = if seg == 2 { split(x).1 } else { bf16(x) };
                    }
                }
            }
        });
        Some(Self { n, k, precision, data })
    }
}

/// Packs rows `rows` of `x` (row stride `ldx`, `k` wide) into the start of `buf` as blocks of 32
/// rows (the last one padded with stale values), each block as k steps (`[xh, xl, xh]` for f32,
/// `xh` for bf16) of two 16×32 tiles. Returns that start of `buf`.
fn pack_rows<'b>(
    x: &[f32],
    ldx: usize,
    k: usize,
    precision: Precision,
    rows: std::ops::Range<usize>,
    buf: &'b mut Vec<u16>,
) -> &'b [u16] {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn v4<'b>(
        x: &[f32],
        ldx: usize,
        k: usize,
        precision: Precision,
        rows: std::ops::Range<usize>,
        buf: &'b mut Vec<u16>,
    ) -> &'b [u16] {
        pack_rows_generic(x, ldx, k, precision, rows, buf)
    }
    // SAFETY: every CPU with AMX has AVX-512 F/BW/VL (Sapphire Rapids on), and this is only
    // reached through `matmul_t`, which requires `available()`.
    unsafe { v4(x, ldx, k, precision, rows, buf) }
}

#[inline(always)]
fn pack_rows_generic<'b>(
    x: &[f32],
    ldx: usize,
    k: usize,
    precision: Precision,
    rows: std::ops::Range<usize>,
    buf: &'b mut Vec<u16>,
) -> &'b [u16] {
    let blocks = rows.len().div_ceil(BLOCK);
    let steps = precision.terms() * k / BLOCK;
    // The last block's rows past `rows.end` keep whatever an earlier call left there: they only
    // reach output rows that are never stored.
    let need = blocks * steps * STEP;
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let buf = &mut buf[..need];
    let kq = k / BLOCK;
    for (b, block) in buf.chunks_exact_mut(steps * STEP).enumerate() {
        for i in 0..BLOCK {
            let row = rows.start + b * BLOCK + i;
            if row >= rows.end {
                break;
            }
            let src = &x[row * ldx..][..k];
            // Row i of the block is row i % 16 of tile i / 16 in every step.
            let at = (i / 16) * 16 * BLOCK + (i % 16) * BLOCK;
            for c in 0..kq {
                let vals = &src[c * BLOCK..][..BLOCK];
                let mut hi = [0u16; BLOCK];
                if precision == Precision::Bf16 {
                    for (h, &v) in hi.iter_mut().zip(vals) {
                        *h = bf16(v);
                    }
                    block[c * STEP + at..][..BLOCK].copy_from_slice(&hi);
                    continue;
                }
                let mut lo = [0u16; BLOCK];
                for (e, &v) in vals.iter().enumerate() {
                    (hi[e], lo[e]) = split(v);
                }
                block[c * STEP + at..][..BLOCK].copy_from_slice(&hi);
                block[(kq + c) * STEP + at..][..BLOCK].copy_from_slice(&lo);
                block[(2 * kq + c) * STEP + at..][..BLOCK].copy_from_slice(&hi);
            }
        }
    }
    buf
}

/// The tile configuration: eight tiles of 16 rows × 64 bytes (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile configuration on this thread for the duration of `f`, then releases the tiles
/// (so the OS need not save them on context switches).
fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
    let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    // SAFETY: only called after `available()` (the CPU has AMX and the process holds the tile
    // state); `cfg` is a valid, 64-byte aligned palette-1 configuration.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly)) };
    let r = f();
    // SAFETY: as above; no tile is live past this point.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    r
}

/// Prefetch of the k step two ahead of the current one (2 KiB of each operand).
macro_rules! prefetch_ahead {
    ($($off:literal)*) => {
        concat!($("prefetcht0 [{a} + ", $off, "]\n", "prefetcht0 [{b} + ", $off, "]\n",)*)
    };
}

/// Where a block's four accumulator tiles start from.
#[derive(Clone, Copy)]
enum Init {
    Zero,
    /// 32 rows of 32 f32 values at a row stride in elements (0: one row read for all 32).
    Load(*const f32, usize),
}

/// `out[32×32] ← init + a · b` over `steps` packed k steps: `a` one packed block of rows, `b` one
/// packed weight panel, `out` f32 with row stride `ldo` (elements).
///
/// # Safety
/// Tiles configured by [`with_tiles`] on this thread; `a` and `b` hold `steps · STEP` values;
/// `out` has 32 rows of 32 values at stride `ldo`, and so has `init` at its stride.
#[inline(never)]
unsafe fn block(a: *const u16, b: *const u16, steps: usize, init: Init, out: *mut f32, ldo: usize) {
    let (cin, ldi) = match init {
        Init::Zero => (std::ptr::null(), 0),
        Init::Load(c, ld) => (c, ld),
    };
    // SAFETY: the caller's contract bounds every tile load and store: 16-row tiles of 64 bytes
    // at stride 64 within a and b, at stride ldi·4 within init and ldo·4 within out.
    // Prefetches never fault.
    unsafe {
        asm!(
            "test {cin}, {cin}",
            "jnz 3f",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "jmp 2f",
            "3:",
            "tileloadd tmm0, [{cin} + {ldi}*1]",
            "tileloadd tmm1, [{cin} + {ldi}*1 + 64]",
            "tileloadd tmm2, [{cin2} + {ldi}*1]",
            "tileloadd tmm3, [{cin2} + {ldi}*1 + 64]",
            "2:",
            "tileloadd tmm4, [{a} + {s64}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            prefetch_ahead!(
                4096 4160 4224 4288 4352 4416 4480 4544 4608 4672 4736 4800 4864 4928 4992 5056
                5120 5184 5248 5312 5376 5440 5504 5568 5632 5696 5760 5824 5888 5952 6016 6080
            ),
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            "tilestored [{c2} + {ldc}*1], tmm2",
            "tilestored [{c2} + {ldc}*1 + 64], tmm3",
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            n = inout(reg) steps => _,
            s64 = in(reg) 64usize,
            cin = in(reg) cin,
            cin2 = in(reg) cin.wrapping_add(16 * ldi),
            ldi = in(reg) ldi * 4,
            c = in(reg) out,
            c2 = in(reg) out.add(16 * ldo),
            ldc = in(reg) ldo * 4,
            options(nostack),
        );
    }
}

thread_local! {
    static ROWS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Rows `0..rows` of a 32-column block at `src` (row stride `lds`) to `out` (stride `ldo`; the
/// same place, or another), adding `bias` (those 32 columns' values) and applying GELU on the
/// way.
///
/// # Safety
/// `src` and `out` have `rows` rows of 32 values at their strides, borrowed nowhere else.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn finish_block(
    src: *mut f32,
    lds: usize,
    rows: usize,
    bias: Option<&[f32]>,
    gelu: bool,
    out: *mut f32,
    ldo: usize,
) {
    for i in 0..rows {
        // SAFETY: by the caller's contract; a slice of `out` is made only when it is not `src`.
        unsafe {
            let row = std::slice::from_raw_parts_mut(src.add(i * lds), BLOCK);
            epilogue::finish(row, bias, gelu);
            if src != out {
                std::slice::from_raw_parts_mut(out.add(i * ldo), BLOCK).copy_from_slice(row);
            }
        }
    }
}

/// `out ← gelu?((accumulate ? out : 0) + x · wᵀ + bias)` (see [`Epilogue`]) for x [m, k] and a
/// packed weight; `out` [m, n] with row stride `ldo`. A fresh sum's accumulators start from
/// the bias; GELU, and a residual's bias, are applied to each 32×32 block of the output as soon
/// as its sums are done. `threads`: spread the work over rayon's pool.
///
/// Call only when [`available`]. Panics when the buffers are too small for the shapes (a bug in
/// the caller, like the gemm path of the CPU kernels).
pub fn matmul_t(x: Mat, w: &Packed, out: &mut [f32], ldo: usize, then: Epilogue, threads: bool) {
    let (n, k) = (w.n, w.k);
    let (m, ldx, x_cols) = (x.rows, x.stride, x.cols);
    let x = x.data;
    assert!(available(), "amx::matmul_t without AMX");
    assert_eq!(x_cols, k, "amx: inner dimensions differ");
    assert!(m == 0 || ((m - 1) * ldx + k <= x.len() && ldx >= k), "amx: the input exceeds its buffer");
    assert!(m == 0 || ((m - 1) * ldo + n <= out.len() && ldo >= n), "amx: the output exceeds its buffer");
    assert!(then.bias.is_none_or(|b| b.len() == n), "amx: the bias is not one value per output");
    if m == 0 {
        return;
    }
    let steps = w.precision.terms() * k / BLOCK;
    let panels = n / BLOCK;
    let blocks = m.div_ceil(BLOCK);
    // A task: a run of row blocks (TASK_BYTES of them packed) against a run of panels;
    // panels are split further when there are too few row runs to keep the pool busy.
    let per_task = (TASK_BYTES / (steps * STEP * 2)).clamp(1, blocks);
    let row_runs = blocks.div_ceil(per_task);
    let pool = if threads { rayon::current_num_threads() } else { 1 };
    let panel_runs = (2 * pool).div_ceil(row_runs).clamp(1, panels);
    let panels_per = panels.div_ceil(panel_runs);
    let tasks: Vec<(usize, usize)> = (0..row_runs).flat_map(|r| (0..panel_runs).map(move |p| (r, p))).collect();
    // Each task writes only rows of its row run and columns of its panel run, so tasks write
    // disjoint parts of `out`. The raw pointer lets them share it.
    struct Out(*mut f32);
    // SAFETY: see above; the tasks' writes are disjoint.
    unsafe impl Sync for Out {}
    let dst = Out(out.as_mut_ptr());
    let run = |&(r, pr): &(usize, usize)| {
        let dst = &dst;
        let row0 = r * per_task * BLOCK;
        let row1 = (row0 + per_task * BLOCK).min(m);
        let (p0, p1) = (pr * panels_per, ((pr + 1) * panels_per).min(panels));
        ROWS.with_borrow_mut(|buf| {
            let packed = pack_rows(x, ldx, k, w.precision, row0..row1, buf);
            with_tiles(|| {
                // A block with GELU goes through `near` (always in L1) and then to `out`:
                // vector loads of output lines that a tile store has only just written (and
                // that were not in the cache) wait for the store to complete. So do partial
                // blocks, whose rows past `m` have nowhere to go (those rows of `near` hold
                // whatever was there; nobody reads them).
                let mut near = [0f32; BLOCK * BLOCK];
                // Weight panels outer, row blocks inner: a panel (32 outputs × all of k) is
                // reused from L2 across the task's blocks, and the kernel prefetches both
                // streams. (Passes over k in L1-sized chunks ran slower: each pass loads and
                // stores the accumulators again.)
                for p in p0..p1 {
                    let b = &w.data[p * steps * STEP..][..steps * STEP];
                    let bias = then.bias.map(|b| &b[p * BLOCK..][..BLOCK]);
                    for (bi, a) in packed.chunks_exact(steps * STEP).enumerate() {
                        let first = row0 + bi * BLOCK;
                        let valid = (row1 - first).min(BLOCK);
                        // SAFETY: `a` and `b` hold steps·STEP values; the output block is rows
                        // first..first+valid (< m) and columns p·32..p·32+32 (≤ n ≤ ldo), inside
                        // `out` by the asserts above; `near` is 32×32 at stride 32, and a bias
                        // read with stride 0 is one row of 32 values.
                        unsafe {
                            let c = dst.0.add(first * ldo + p * BLOCK);
                            let np = near.as_mut_ptr();
                            // A fresh sum starts from the bias; a residual from `out`.
                            let init = match (then.accumulate, bias) {
                                (false, None) => Init::Zero,
                                (false, Some(b)) => Init::Load(b.as_ptr(), 0),
                                (true, _) if valid == BLOCK => Init::Load(c, ldo),
                                (true, _) => {
                                    for i in 0..valid {
                                        std::ptr::copy_nonoverlapping(c.add(i * ldo), np.add(i * BLOCK), BLOCK);
                                    }
                                    Init::Load(np, BLOCK)
                                }
                            };
                            // The bias of a fresh sum is in `init` already.
                            let add = if then.accumulate { bias } else { None };
                            if valid == BLOCK && !then.gelu {
                                block(a.as_ptr(), b.as_ptr(), steps, init, c, ldo);
                                // A residual's lines were in L1 for the tile load.
                                if add.is_some() {
                                    finish_block(c, ldo, BLOCK, add, false, c, ldo);
                                }
                                continue;
                            }
                            block(a.as_ptr(), b.as_ptr(), steps, init, np, BLOCK);
                            finish_block(np, BLOCK, valid, add, then.gelu, c, ldo);
                        }
                    }
                }
            })
        })
    };
    if threads && tasks.len() > 1 {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// One thread's buffers for [`attention`], reused across calls.
#[derive(Debug, Default)]
pub struct AttentionScratch {
    /// A head's queries, packed as blocks of rows (k = d).
    q: Vec<u16>,
    /// A head's keys as weight panels of 32 keys (k = d), in bf16 pairs.
    k: Vec<u32>,
    /// A head's values as weight panels of 32 dimensions (k = the keys), in bf16 pairs.
    v: Vec<u32>,
    /// One block of rows of attention weights, packed (k = the keys), in bf16 pairs.
    p: Vec<u32>,
    /// One block of rows of scores, f32.
    s: Vec<f32>,
    /// One row of weights as bf16 pairs.
    pairs: Vec<u32>,
}

/// Whether [`attention`] takes heads of `d` dimensions: whole k steps.
pub fn attention_fits(d: usize) -> bool {
    d > 0 && d.is_multiple_of(BLOCK)
}

/// Bidirectional scaled dot-product attention over one packed row of `t` tokens, every head, on
/// the tiles with bf16 operands and f32 sums: `q`, `k` and `v` are [t, heads·d] views; writes
/// [t, heads·d] into `out` (row stride `ldo`). The scores and the softmax are f32; the weights
/// are rounded to bf16 for the second product (as in [`crate::panels`]'s attention). Keys past
/// `t` in the last panel are zero and get no weight. Each query's result depends only on its
/// own row's keys and values.
///
/// Call only when [`available`] and [`attention_fits`]`(d)`. Panics when the views do not fit
/// their buffers (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: Mat,
    k: Mat,
    v: Mat,
    heads: usize,
    d: usize,
    out: &mut [f32],
    ldo: usize,
    s: &mut AttentionScratch,
) {
    let t = q.rows;
    assert!(available(), "amx::attention without AMX");
    assert!(attention_fits(d), "amx::attention: heads of {d} dimensions");
    assert!(k.rows == t && v.rows == t, "amx::attention: queries, keys and values differ in length");
    for m in [&q, &k, &v] {
        assert!(m.cols >= heads * d && m.fits(), "amx::attention: a view exceeds its buffer");
    }
    if t == 0 || heads == 0 {
        return;
    }
    assert!(
        (t - 1) * ldo + heads * d <= out.len() && ldo >= heads * d,
        "amx::attention: the output exceeds its buffer"
    );
    let scale = 1.0 / (d as f32).sqrt();
    let padded = t.div_ceil(BLOCK) * BLOCK;
    let (d_steps, t_steps) = (d / BLOCK, padded / BLOCK);
    let AttentionScratch { q: qs, k: ks, v: vs, p: ps, s: scores, pairs } = s;
    ks.resize(padded * d / 2, 0);
    vs.resize(d * padded / 2, 0);
    ps.resize(t_steps * STEP / 2, 0);
    scores.resize(BLOCK * padded, 0.0);
    with_tiles(|| {
        let mut near = [0f32; BLOCK * BLOCK];
        for h in 0..heads {
            let col = h * d;
            let qa = pack_rows(&q.data[col..], q.stride, d, Precision::Bf16, 0..t, qs);
            pack_keys(k, col, d, ks, pairs);
            pack_values(v, col, d, vs);
            // A row's weights fill its first `live` pairs; the pairs of the padding keys stay
            // zero for every block of the head.
            let live = t.div_ceil(2);
            pairs.resize(padded / 2, 0);
            pairs[live..].fill(0);
            for (b, qb) in qa.chunks_exact(d_steps * STEP).enumerate() {
                let (first, valid) = (b * BLOCK, (t - b * BLOCK).min(BLOCK));
                // Scores of the block's queries against every key panel.
                for (p, kp) in ks.chunks_exact(d_steps * STEP / 2).enumerate() {
                    // SAFETY: `qb` and `kp` hold d_steps·STEP values; `scores` is 32 rows of
                    // `padded` values, and this panel's columns p·32..p·32+32 lie inside them.
                    unsafe {
                        block(
                            qb.as_ptr(),
                            kp.as_ptr().cast(),
                            d_steps,
                            Init::Zero,
                            scores.as_mut_ptr().add(p * BLOCK),
                            padded,
                        )
                    };
                }
                // The softmax of each query's scores over the row's keys, as bf16 pairs into
                // the packed weights (a query row's k step c: pairs 16c..16c+16).
                for i in 0..valid {
                    crate::panels::softmax_pairs(&mut scores[i * padded..][..t], scale, &mut pairs[..live]);
                    let at = (i / 16) * 256 + (i % 16) * 16;
                    for (step, row) in ps.chunks_exact_mut(STEP / 2).zip(pairs.chunks_exact(BLOCK / 2)) {
                        step[at..][..BLOCK / 2].copy_from_slice(row);
                    }
                }
                // Weights · values, a panel of 32 dimensions at a time.
                for (p, vp) in vs.chunks_exact(t_steps * STEP / 2).enumerate() {
                    // SAFETY: `ps` and `vp` hold t_steps·STEP values; a full block's rows
                    // first..first+32 (≤ t) and columns col+p·32..+32 (≤ heads·d ≤ ldo) are
                    // inside `out` by the assert above; `near` is 32×32.
                    unsafe {
                        let c = out.as_mut_ptr().add(first * ldo + col + p * BLOCK);
                        if valid == BLOCK {
                            block(ps.as_ptr().cast(), vp.as_ptr().cast(), t_steps, Init::Zero, c, ldo);
                        } else {
                            block(
                                ps.as_ptr().cast(),
                                vp.as_ptr().cast(),
                                t_steps,
                                Init::Zero,
                                near.as_mut_ptr(),
                                BLOCK,
                            );
                            for i in 0..valid {
                                std::ptr::copy_nonoverlapping(near.as_ptr().add(i * BLOCK), c.add(i * ldo), BLOCK);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Keys `0..k.rows` of the head at column `col` (`d` wide) as weight panels of 32 keys (in
/// [`Packed`]'s layout, as bf16 pairs), the keys past the last zero: panel p, k step c, tile half
/// (keys 16·half..), pair row r and key j at `(p·steps + c)·STEP/2 + half·256 + r·16 + j`, holding
/// dimensions 32c + 2r and 32c + 2r + 1. `row`: room for d/2 pairs.
fn pack_keys(k: Mat, col: usize, d: usize, out: &mut [u32], row: &mut Vec<u32>) {
    let steps = d / BLOCK;
    row.resize(d / 2, 0);
    for (p, panel) in out.chunks_exact_mut(steps * STEP / 2).enumerate() {
        for kk in 0..BLOCK {
            let key = p * BLOCK + kk;
            if key < k.rows {
                crate::panels::round_row(&k.data[key * k.stride + col..][..d], row);
            } else {
                row.fill(0);
            }
            let at = (kk / 16) * 256 + kk % 16;
            for (step, pairs) in panel.chunks_exact_mut(STEP / 2).zip(row.chunks_exact(BLOCK / 2)) {
                for (r, &pair) in pairs.iter().enumerate() {
                    step[at + r * 16] = pair;
                }
            }
        }
    }
}

/// Values `0..v.rows` of the head at column `col` (`d` wide) as weight panels of 32 dimensions
/// with the keys as k (in [`Packed`]'s layout, as bf16 pairs), the keys past the last zero: panel
/// p, k step s, tile half (dimensions 16·half..), pair row r and dimension j at
/// `(p·steps + s)·STEP/2 + half·256 + r·16 + j`, holding keys 32s + 2r and 32s + 2r + 1.
fn pack_values(v: Mat, col: usize, d: usize, out: &mut [u32]) {
    let steps = 2 * out.len() / d / BLOCK;
    let row = |key: usize, dims: usize| (key < v.rows).then(|| &v.data[key * v.stride + col + dims..][..16]);
    for (p, panel) in out.chunks_exact_mut(steps * STEP / 2).enumerate() {
        for (s, step) in panel.chunks_exact_mut(STEP / 2).enumerate() {
            for (r, pairs) in step.chunks_exact_mut(16).enumerate() {
                // Row r of tile half r / 16: keys 32s + 2(r % 16) and the next, 16 dimensions.
                let (key, dims) = (s * BLOCK + 2 * (r % 16), p * BLOCK + (r / 16) * 16);
                match row(key, dims) {
                    Some(lo) => crate::panels::interleave(lo, row(key + 1, dims), pairs),
                    None => pairs.fill(0),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        crate::epilogue::uniform(seed, 2.0)
    }

    #[test]
    fn split_keeps_sixteen_bits() {
        let mut r = lcg(3);
        for _ in 0..10_000 {
            let x = r() * 1e3;
            let (hi, lo) = split(x);
            let back = f32::from_bits(u32::from(hi) << 16) + f32::from_bits(u32::from(lo) << 16);
            assert!((back - x).abs() <= x.abs() * 2f32.powi(-16), "{x} → {back}");
        }
        assert_eq!(bf16(1.0), 0x3f80);
        assert_eq!(split(-2.5).1, 0);
    }

    /// Against f64 sums: shapes with partial row blocks, several panels and steps, strided input
    /// and output, accumulating and not, threaded and not.
    #[test]
    fn matches_f64_products() {
        if !available() {
            return;
        }
        let mut r = lcg(7);
        for (m, k, n, ldx, ldo, accumulate, threads) in [
            (1, 32, 32, 32, 32, false, true),
            (31, 64, 64, 70, 64, true, true),
            (33, 96, 96, 96, 100, false, false),
            (100, 384, 160, 384, 160, true, true),
            (257, 1536, 64, 1536, 64, true, true),
        ] {
            let x: Vec<f32> = (0..(m - 1) * ldx + k).map(|_| r()).collect();
            let wv: Vec<f32> = (0..n * k).map(|_| r()).collect();
            let w = Packed::new(&wv, n, k, Precision::F32).expect("fits");
            let init: Vec<f32> = (0..(m - 1) * ldo + n).map(|_| r()).collect();
            let mut out = init.clone();
            let then = if accumulate { Epilogue::accumulate(None) } else { Epilogue::overwrite(None) };
            matmul_t(Mat { data: &x, rows: m, cols: k, stride: ldx }, &w, &mut out, ldo, then, threads);
            for i in 0..m {
                for j in 0..n {
                    let xs = &x[i * ldx..][..k];
                    let ws = &wv[j * k..][..k];
                    let want: f64 = xs.iter().zip(ws).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()
                        + if accumulate { f64::from(init[i * ldo + j]) } else { 0.0 };
                    let scale: f64 = xs.iter().zip(ws).map(|(a, b)| f64::from(a.abs() * b.abs())).sum::<f64>() + 1.0;
                    let got = f64::from(out[i * ldo + j]);
                    assert!((got - want).abs() < 2e-5 * scale, "({m},{k},{n}) [{i},{j}]: {got} vs {want}");
                }
                // Padding between rows is untouched.
                for j in n..ldo.min(out.len() - i * ldo) {
                    assert_eq!(out[i * ldo + j], init[i * ldo + j]);
                }
            }
        }
    }

    /// bf16 products are exact products of the bf16-rounded operands, summed in f32.
    #[test]
    fn bf16_products_round_the_operands_only() {
        if !available() {
            return;
        }
        let mut r = lcg(5);
        let (m, k, n) = (45, 160, 96);
        let x: Vec<f32> = (0..m * k).map(|_| r()).collect();
        let wv: Vec<f32> = (0..n * k).map(|_| r()).collect();
        let w = Packed::new(&wv, n, k, Precision::Bf16).expect("fits");
        let mut out = vec![0f32; m * n];
        matmul_t(Mat::new(&x, m, k), &w, &mut out, n, Epilogue::default(), true);
        let round = |v: f32| f64::from(f32::from_bits(u32::from(bf16(v)) << 16));
        let mut worst_exact = 0f64;
        for i in 0..m {
            for j in 0..n {
                let (xs, ws) = (&x[i * k..][..k], &wv[j * k..][..k]);
                let want: f64 = xs.iter().zip(ws).map(|(a, b)| round(*a) * round(*b)).sum();
                let exact: f64 = xs.iter().zip(ws).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                let scale: f64 = xs.iter().zip(ws).map(|(a, b)| f64::from(a.abs() * b.abs())).sum();
                let got = f64::from(out[i * n + j]);
                assert!((got - want).abs() < 1e-5 * scale, "[{i},{j}]: {got} vs {want}");
                worst_exact = worst_exact.max((got - exact).abs() / scale);
            }
        }
        // And they are visibly less exact than the f32 path's (which the test above bounds).
        assert!(worst_exact > 1e-4, "bf16 products look exact: {worst_exact}");
    }

    #[test]
    fn a_row_does_not_depend_on_its_neighbours() {
        if !available() {
            return;
        }
        let mut r = lcg(11);
        let (k, n) = (128, 64);
        let x: Vec<f32> = (0..70 * k).map(|_| r()).collect();
        let wv: Vec<f32> = (0..n * k).map(|_| r()).collect();
        let w = Packed::new(&wv, n, k, Precision::F32).expect("fits");
        let mut all = vec![0f32; 70 * n];
        // On this thread, so that the single rows below reuse (and must not read past their
        // part of) the larger packing buffer this leaves behind.
        matmul_t(Mat::new(&x, 70, k), &w, &mut all, n, Epilogue::default(), false);
        for i in [0, 31, 32, 69] {
            let mut one = vec![0f32; n];
            matmul_t(Mat::new(&x[i * k..][..k], 1, k), &w, &mut one, n, Epilogue::default(), false);
            assert_eq!(one, all[i * n..][..n], "row {i}");
        }
    }

    /// Attention on the tiles against f64 attention over the bf16-rounded queries, keys and
    /// values: within the rounding of the weights to bf16 (2⁻⁸ of the largest value allowed),
    /// for several heads, rows shorter and longer than a block and not a multiple of it, heads of
    /// 32 and 64, and an output wider than the heads; columns past the heads stay as they were.
    #[test]
    fn attention_matches_an_f64_reference() {
        if !available() {
            return;
        }
        let mut r = lcg(13);
        let mut s = AttentionScratch::default();
        for (t, heads, d) in [(1, 2, 32), (31, 2, 32), (32, 1, 64), (45, 3, 32), (70, 2, 64), (5, 1, 32)] {
            let width = heads * d + 5;
            let qkv: Vec<f32> = (0..t * 3 * width).map(|_| r()).collect();
            let view = |c: usize| Mat { data: &qkv[c * width..], rows: t, cols: width, stride: 3 * width };
            let ldo = heads * d + 2;
            let mut out = vec![7f32; t * ldo];
            attention(view(0), view(1), view(2), heads, d, &mut out, ldo, &mut s);
            crate::epilogue::assert_attention(&qkv, width, t, heads, d, &out, ldo);
        }
    }
}
