//! The paired test of a method against BoN: Student's t on the per-prompt differences of the
//! gold reward, its two-sided p-value, and how many prompts the observed difference would need
//! to reach p < 0.05.

/// The significance level `prompts_needed` aims at (two-sided).
pub const ALPHA: f64 = 0.05;

/// A paired t-test of per-prompt differences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    /// Prompts compared.
    pub n: u64,
    /// Mean difference (method − BoN) and its sample standard deviation.
    pub mean: f64,
    pub std: f64,
    /// Two-sided p-value of "the mean difference is 0" (`None` with fewer than two prompts, or
    /// when every difference is 0).
    pub p_value: Option<f64>,
    /// The fewest prompts at which a mean difference and spread like these would give p <
    /// [`ALPHA`] (`None` when the mean difference is 0, with fewer than two prompts, or when more
    /// than a billion would be needed).
    pub prompts_needed: Option<u64>,
}

impl Paired {
    /// The test from the count, mean and sample standard deviation of the differences.
    pub fn from_moments(n: u64, mean: f64, std: f64) -> Self {
        let none = Self { n, mean, std, p_value: None, prompts_needed: None };
        if n < 2 || !mean.is_finite() || !std.is_finite() {
            return none;
        }
        if std == 0.0 {
            // Every difference is the same: a nonzero one is certain with any two prompts.
            return if mean == 0.0 { none } else { Self { p_value: Some(0.0), prompts_needed: Some(2), ..none } };
        }
        let p = |k: u64| two_sided_p(mean.abs() * (k as f64).sqrt() / std, (k - 1) as f64);
        Self { p_value: Some(p(n)), prompts_needed: prompts_needed(mean, std, p), ..none }
    }
}

/// Past this many prompts the answer is "never, in practice" (and t's tail, computed here, is no
/// longer accurate).
const MAX_PROMPTS: u64 = 1_000_000_000;

/// The smallest k ≥ 2 with p(k) < [`ALPHA`], p falling in k; `None` when the mean difference is 0
/// or more than [`MAX_PROMPTS`] would be needed.
fn prompts_needed(mean: f64, std: f64, p: impl Fn(u64) -> f64) -> Option<u64> {
    if mean == 0.0 {
        return None;
    }
    // The normal approximation is a lower bound (t's quantile exceeds z's).
    let z = 1.959_963_984_540_054;
    let guess = (z * std / mean.abs()).powi(2).ceil();
    if !guess.is_finite() || guess >= MAX_PROMPTS as f64 {
        return None;
    }
    let mut lo = (guess as u64).max(2);
    if p(lo) < ALPHA {
        return Some(lo);
    }
    // Double until significant, then bisect: p(lo) ≥ α > p(hi).
    let mut hi = lo;
    while p(hi) >= ALPHA {
        lo = hi;
        hi = hi.saturating_mul(2);
        if hi > MAX_PROMPTS {
            return None;
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if p(mid) < ALPHA { hi = mid } else { lo = mid }
    }
    Some(hi)
}

/// P(|T| ≥ t) for Student's t with `nu` degrees of freedom: I_{ν/(ν+t²)}(ν/2, ½).
pub fn two_sided_p(t: f64, nu: f64) -> f64 {
    if !t.is_finite() {
        return 0.0;
    }
    let x = nu / (nu + t * t);
    regularized_beta(x, nu / 2.0, 0.5).clamp(0.0, 1.0)
}

/// The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
/// Lentz), on the side where it converges fast.
fn regularized_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_fraction(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * beta_fraction(1.0 - x, b, a) / b
    }
}

fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=500 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        let even = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
        d = 1.0 + even * d;
        d = if d.abs() < TINY { 1.0 / TINY } else { 1.0 / d };
        c = 1.0 + even / c;
        if c.abs() < TINY {
            c = TINY;
        }
        h *= d * c;
        let odd = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
        d = 1.0 + odd * d;
        d = if d.abs() < TINY { 1.0 / TINY } else { 1.0 / d };
        c = 1.0 + odd / c;
        if c.abs() < TINY {
            c = TINY;
        }
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms: about 15 digits).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut s = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        s += c / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests: unwraps are the assertions")]
mod tests {
    use super::*;

    #[test]
    fn p_values_match_scipy() {
        // 2 * scipy.stats.t.sf(t, df), scipy 1.17.1.
        let cases = [
            (2.0, 10.0, 0.073_388_034_770_740_37),
            (1.0, 1.0, 0.5),
            (0.5, 3.0, 0.651_447_964_848_151),
            (3.5, 23.0, 0.001_928_060_552_427_504_2),
            (10.0, 100.0, 9.901_688_984_594_13e-17),
            (0.0, 5.0, 1.0),
            (1.96, 1e6, 0.049_996_067_585_269_85),
        ];
        for (t, nu, want) in cases {
            let got = two_sided_p(t, nu);
            assert!((got - want).abs() <= 1e-9 * want.max(1e-7), "t {t} ν {nu}: {got} vs {want}");
        }
    }

    #[test]
    fn prompts_needed_is_the_smallest_count_that_reaches_the_level() {
        let t = Paired::from_moments(24, 0.1, 0.5);
        let k = t.prompts_needed.unwrap();
        let p = |k: u64| two_sided_p(0.1 * (k as f64).sqrt() / 0.5, (k - 1) as f64);
        assert!(p(k) < ALPHA && p(k - 1) >= ALPHA, "{k}");
        // (1.96 · 0.5 / 0.1)² ≈ 96 prompts by the normal approximation; t needs a few more.
        assert!((97..=101).contains(&k), "{k}");
        assert!(t.p_value.unwrap() > ALPHA);
        // No difference: never significant; identical nonzero differences: always.
        assert_eq!(Paired::from_moments(24, 0.0, 0.5).prompts_needed, None);
        assert_eq!(Paired::from_moments(24, 0.0, 0.0).p_value, None);
        assert_eq!(Paired::from_moments(24, 0.2, 0.0).p_value, Some(0.0));
        assert_eq!(Paired::from_moments(1, 0.2, 0.1).p_value, None);
        // A difference far below its spread: never, in practice (not a saturated count).
        assert_eq!(Paired::from_moments(24, 1e-12, 1.0).prompts_needed, None);
        let k = Paired::from_moments(24, 1e-3, 1.0).prompts_needed.unwrap();
        let p = |k: u64| two_sided_p(1e-3 * (k as f64).sqrt(), (k - 1) as f64);
        assert!(p(k) < ALPHA && p(k - 1) >= ALPHA, "{k}");
    }
}
