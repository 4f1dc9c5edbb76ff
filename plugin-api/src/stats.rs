//! Statistics for plugins that compare arms: sufficient statistics per arm, confidence
//! intervals, Welch's test, the chi-square goodness-of-fit test and a HyperLogLog counter of
//! unique keys. Pure math, no I/O.
//!
//! The methods are the textbook ones:
//! - [`Moments`] keeps count, sum and sum of squares: enough for the mean and the sample
//!   variance, and two of them add up exactly (merging states loses nothing).
//! - [`Moments::interval`]: the mean with a Student-t interval, `mean ± t(1 − a/2, n − 1) · s/√n`.
//! - [`welch`]: the difference of two means with Welch's standard error
//!   `√(s₁²/n₁ + s₂²/n₂)` and the Welch–Satterthwaite degrees of freedom; the interval and the
//!   two-sided p-value use Student's t with those degrees of freedom.
//! - [`chi_square_fit`]: Pearson's goodness-of-fit statistic of observed counts against expected
//!   shares, and its p-value from the chi-square distribution with `k − 1` degrees of freedom.
//! - [`UniqueCount`]: a HyperLogLog with 2¹⁰ registers; its standard error is
//!   `1.04/√1024 ≈ 3.3 %` (small counts use linear counting and are near exact).
//!
//! ```
//! use plugin_api::stats::{Moments, welch};
//!
//! let mut control = Moments::default();
//! let mut treatment = Moments::default();
//! for x in [0.4, 0.5, 0.6, 0.5] { control.push(x); }
//! for x in [0.7, 0.8, 0.9, 0.8] { treatment.push(x); }
//! let interval = control.interval(0.95).unwrap();
//! assert!(interval.low < 0.5 && 0.5 < interval.high);
//! let test = welch(&control, &treatment, 0.95).unwrap();
//! assert!((test.diff - 0.3).abs() < 1e-12);
//! assert!(test.p_value < 0.01 && test.low > 0.0);
//! ```

use serde::{Deserialize, Serialize};

/// Count, sum and sum of squares of the observations of one arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Moments {
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// The sum of their squares.
    pub sum_sq: f64,
}

/// A mean with its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// The estimate.
    pub mean: f64,
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

impl Moments {
    /// Adds one observation.
    pub fn push(&mut self, x: f64) {
        self.count += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Adds another arm's observations.
    pub fn merge(&mut self, other: &Moments) {
        self.count += other.count;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
    }

    /// The mean, `None` without observations.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The sample variance (divisor `n − 1`), `None` below two observations.
    pub fn variance(&self) -> Option<f64> {
        if self.count < 2 {
            return None;
        }
        let n = self.count as f64;
        let mean = self.sum / n;
        // Clamped: rounding can make the difference slightly negative for constant data.
        Some(((self.sum_sq - n * mean * mean) / (n - 1.0)).max(0.0))
    }

    /// The mean with a two-sided Student-t interval at `level` (e.g. 0.95); `None` below two
    /// observations.
    pub fn interval(&self, level: f64) -> Option<Interval> {
        let mean = self.mean()?;
        let variance = self.variance()?;
        let n = self.count as f64;
        let half = student_t_quantile(0.5 + level / 2.0, n - 1.0) * (variance / n).sqrt();
        Some(Interval {
            mean,
            low: mean - half,
            high: mean + half,
        })
    }

    /// Whether the numbers can be sufficient statistics at all (finite, non-negative sum of
    /// squares): for checking a saved state.
    pub fn is_consistent(&self) -> bool {
        self.sum.is_finite() && self.sum_sq.is_finite() && self.sum_sq >= 0.0
    }
}

/// Welch's comparison of two arms: `treatment − control`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Welch {
    /// The difference of the means, treatment minus control.
    pub diff: f64,
    /// Lower bound of its interval.
    pub low: f64,
    /// Upper bound of its interval.
    pub high: f64,
    /// The standard error of the difference.
    pub se: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value of "no difference".
    pub p_value: f64,
}

/// Compares `treatment` with `control` (Welch's unequal-variance t): the difference, its
/// interval at `level` and the two-sided p-value. `None` while either arm has fewer than two
/// observations.
pub fn welch(control: &Moments, treatment: &Moments, level: f64) -> Option<Welch> {
    let (a, b) = (control, treatment);
    let diff = b.mean()? - a.mean()?;
    let (va, vb) = (
        a.variance()? / a.count as f64,
        b.variance()? / b.count as f64,
    );
    let se = (va + vb).sqrt();
    let df = if se > 0.0 {
        (va + vb).powi(2) / (va * va / (a.count as f64 - 1.0) + vb * vb / (b.count as f64 - 1.0))
    } else {
        (a.count + b.count - 2) as f64
    };
    let half = student_t_quantile(0.5 + level / 2.0, df) * se;
    let p_value = if se > 0.0 {
        2.0 * student_t_sf((diff / se).abs(), df)
    } else if diff == 0.0 {
        1.0
    } else {
        0.0
    };
    Some(Welch {
        diff,
        low: diff - half,
        high: diff + half,
        se,
        df,
        p_value: p_value.min(1.0),
    })
}

/// One-sided p-value of "treatment beats control by at most `margin`" (Welch's t on
/// `treatment − control − margin`): small when the treatment is better by more than the margin.
/// `None` while either arm has fewer than two observations.
pub fn welch_one_sided(control: &Moments, treatment: &Moments, margin: f64) -> Option<f64> {
    let w = welch(control, treatment, 0.95)?;
    let excess = w.diff - margin;
    Some(if w.se > 0.0 {
        student_t_sf(excess / w.se, w.df)
    } else if excess > 0.0 {
        0.0
    } else {
        1.0
    })
}

/// Pearson's chi-square goodness of fit of `observed` counts to `weights` (shares, any
/// positive scale): the p-value of "the counts follow the weights". Categories with weight 0
/// must have no counts (else the p-value is 0). `None` without observations or with fewer than
/// two categories of positive weight.
pub fn chi_square_fit(observed: &[u64], weights: &[f64]) -> Option<f64> {
    let total: u64 = observed.iter().sum();
    let weight: f64 = weights.iter().filter(|w| **w > 0.0).sum();
    let categories = weights.iter().filter(|w| **w > 0.0).count();
    if total == 0 || categories < 2 || observed.len() != weights.len() {
        return None;
    }
    let mut statistic = 0.0;
    for (&o, &w) in observed.iter().zip(weights) {
        if w <= 0.0 {
            if o > 0 {
                return Some(0.0);
            }
            continue;
        }
        let expected = total as f64 * w / weight;
        statistic += (o as f64 - expected).powi(2) / expected;
    }
    Some(chi_square_sf(statistic, (categories - 1) as f64))
}

/// `P(X > x)` for a chi-square variable with `k` degrees of freedom.
pub fn chi_square_sf(x: f64, k: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(k / 2.0, x / 2.0)
}

/// The standard normal distribution function.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// `P(T > t)` for Student's t with `df` degrees of freedom (`df` may be fractional; above
/// 1e7 the normal is used).
pub fn student_t_sf(t: f64, df: f64) -> f64 {
    if t.is_nan() {
        return f64::NAN;
    }
    if df > 1e7 {
        return 1.0 - normal_cdf(t);
    }
    let tail = 0.5 * beta_inc(df / 2.0, 0.5, df / (df + t * t));
    if t > 0.0 { tail } else { 1.0 - tail }
}

/// The `p` quantile of Student's t with `df` degrees of freedom (bisection on
/// [`student_t_sf`]; `p` in (0, 1)).
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    if p == 0.5 {
        return 0.0;
    }
    let (mut lo, mut hi) = (-1e6, 1e6);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if 1.0 - student_t_sf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-12 * (1.0 + mid.abs()) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// The complementary error function (Numerical Recipes' Chebyshev fit, relative error below
/// 1.2e-7 everywhere).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
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
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized upper incomplete gamma function `Q(a, x)` (series below `a + 1`, continued
/// fraction above).
fn gamma_q(a: f64, x: f64) -> f64 {
    if x < a + 1.0 {
        let mut sum = 1.0 / a;
        let mut term = sum;
        let mut n = a;
        for _ in 0..1000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - (sum.ln() - x + a * x.ln() - ln_gamma(a)).exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (-x + a * x.ln() - ln_gamma(a)).exp() * h
    }
}

/// The regularized incomplete beta function `I_x(a, b)` (Lentz's continued fraction).
fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - beta_inc(b, a, 1.0 - x);
    }
    let tiny = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..1000 {
        let m = m as f64;
        let even = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 + even * d;
        if d.abs() < tiny {
            d = tiny;
        }
        c = 1.0 + even / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        h *= d * c;
        let odd = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 + odd * d;
        if d.abs() < tiny {
            d = tiny;
        }
        c = 1.0 + odd / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-15 {
            break;
        }
    }
    front * h / a
}

/// Registers of a [`UniqueCount`]: 2^10.
const HLL_BITS: u32 = 10;
const HLL_REGISTERS: usize = 1 << HLL_BITS;

/// A HyperLogLog estimate of how many distinct keys were seen: 1 KiB whatever the count, with
/// a standard error of about 3.3 % (`1.04/√1024`); below about 2,500 keys linear counting
/// takes over and the count is near exact. Feed it well-mixed 64-bit hashes (e.g.
/// [`stable_hash`](crate::assign::stable_hash)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UniqueCount {
    registers: Vec<u8>,
}

impl Default for UniqueCount {
    fn default() -> Self {
        Self {
            registers: vec![0; HLL_REGISTERS],
        }
    }
}

impl UniqueCount {
    /// Counts one key by its hash.
    pub fn add(&mut self, hash: u64) {
        let index = (hash >> (64 - HLL_BITS)) as usize;
        // The rank of the first 1 bit in the rest; the sentinel bit caps it.
        let rank = ((hash << HLL_BITS) | (1 << (HLL_BITS - 1))).leading_zeros() as u8 + 1;
        if let Some(r) = self.registers.get_mut(index) {
            *r = (*r).max(rank);
        }
    }

    /// Adds the keys another counter saw.
    pub fn merge(&mut self, other: &UniqueCount) {
        for (r, o) in self.registers.iter_mut().zip(&other.registers) {
            *r = (*r).max(*o);
        }
    }

    /// Whether the registers have the expected shape (for checking a saved state).
    pub fn is_consistent(&self) -> bool {
        self.registers.len() == HLL_REGISTERS
            && self
                .registers
                .iter()
                .all(|r| u32::from(*r) <= 65 - HLL_BITS)
    }

    /// The estimated number of distinct keys.
    pub fn estimate(&self) -> u64 {
        let m = HLL_REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let sum: f64 = self
            .registers
            .iter()
            .map(|r| 2f64.powi(-i32::from(*r)))
            .sum();
        let raw = alpha * m * m / sum;
        let zeros = self.registers.iter().filter(|r| **r == 0).count();
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }
}

#[cfg(test)]
mod tests;
