//! Federated feature statistics for standardisation.
//!
//! Each site contributes, per model input, its count of non-missing values, Σx and Σx² as
//! fixed-point integers in Z/2^64 (negative values wrap, and wrap back when the sum is read as
//! i64). Summed with secure aggregation, they give every site the same global mean and standard
//! deviation without any site revealing its own.

/// Fixed-point scale: 2^16 keeps four decimal digits and leaves room for ~10^14 in Σx².
pub const FIXED_SCALE: f64 = 65536.0;

/// Length of the statistics vector for `inputs` model inputs: the row count, then
/// [count, Σx, Σx²] per input.
pub fn vector_len(inputs: usize) -> usize {
    1 + 3 * inputs
}

pub fn to_fixed(x: f64) -> u64 {
    (x * FIXED_SCALE).round() as i64 as u64
}

/// Sites a statistics sum has room for: each site keeps its own Σ|x|·2^16 and Σx²·2^16 below
/// 2^63 / this, so the sum over up to this many sites cannot wrap past i64 and come back as a
/// plausible but wrong number.
pub const MAX_SITES: u64 = 1024;

/// Why a statistics vector cannot be summed safely, or a summed one is not a sum of honest
/// vectors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    #[error(
        "model input {input}: its values are too large for the federated statistics (Σx² = {sum_sq:e} at this site; the limit is {limit:e} so that {MAX_SITES} sites cannot overflow): rescale the column"
    )]
    TooLarge {
        input: usize,
        sum_sq: f64,
        limit: f64,
    },
    #[error("the statistics sum has {got} elements, expected {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("model input {input}: {detail}")]
    Inconsistent { input: usize, detail: String },
}

/// The largest |Σx| or Σx² (in the data's units) one site may contribute.
pub fn site_limit() -> f64 {
    (i64::MAX as u64 / MAX_SITES) as f64 / FIXED_SCALE
}

/// Checks that one site's rows leave the sum headroom (see [`MAX_SITES`]), in f64 from the
/// rows themselves: the wrapped fixed-point vector cannot show its own overflow.
pub fn check_site_headroom<'a>(
    rows: impl Iterator<Item = &'a [Option<f64>]>,
    inputs: usize,
) -> Result<(), StatsError> {
    let mut sum_sq = vec![0f64; inputs];
    let mut sum_abs = vec![0f64; inputs];
    for row in rows {
        for (j, x) in row.iter().enumerate().take(inputs) {
            if let Some(x) = x {
                sum_sq[j] += x * x;
                sum_abs[j] += x.abs();
            }
        }
    }
    let limit = site_limit();
    for j in 0..inputs {
        if sum_sq[j] > limit || sum_abs[j] > limit || !sum_sq[j].is_finite() {
            return Err(StatsError::TooLarge {
                input: j,
                sum_sq: sum_sq[j],
                limit,
            });
        }
    }
    Ok(())
}

/// Checks an unmasked statistics sum before it is used: per input, the count is at most the
/// row count, Σx² is not negative and not below (Σx)²/n (no honest sum is), so a wrapped sum
/// or a site that sent garbage stops the statistics round instead of standardising every
/// site's data with nonsense.
pub fn check_sum(sum: &[u64], inputs: usize) -> Result<(), StatsError> {
    if sum.len() != vector_len(inputs) {
        return Err(StatsError::WrongLength {
            got: sum.len(),
            expected: vector_len(inputs),
        });
    }
    let rows = sum[0];
    for j in 0..inputs {
        let n = sum[1 + 3 * j];
        let s = sum[2 + 3 * j] as i64 as f64 / FIXED_SCALE;
        let ss = sum[3 + 3 * j] as i64 as f64 / FIXED_SCALE;
        let bad = |detail: String| Err(StatsError::Inconsistent { input: j, detail });
        if n > rows {
            return bad(format!("{n} values counted in {rows} rows"));
        }
        if ss < 0.0 {
            return bad(format!("Σx² = {ss} is negative (the sum overflowed)"));
        }
        // Cauchy–Schwarz: (Σx)² ≤ n Σx². Each fixed-point term rounds by at most 2^-17, so
        // Σx and Σx² are each off by at most n·2^-17; the slack covers that (twice over).
        let nf = n as f64;
        let slack = (2.0 * s.abs() * nf + nf * nf) / FIXED_SCALE + 1.0;
        if n > 0 && s * s > nf * ss + slack {
            return bad(format!(
                "(Σx)² = {:e} exceeds n·Σx² = {:e} (not a sum of real values)",
                s * s,
                n as f64 * ss
            ));
        }
        if n == 0 && (s != 0.0 || ss != 0.0) {
            return bad("sums without values".into());
        }
    }
    Ok(())
}

/// Global mean and standard deviation per input from the summed statistics vectors.
/// Constant or empty columns get std 1 so they standardise to 0 instead of NaN.
pub fn from_sum(sum: &[u64], inputs: usize) -> (Vec<f64>, Vec<f64>) {
    (0..inputs)
        .map(|j| {
            let n = sum.get(1 + 3 * j).copied().unwrap_or(0) as f64;
            let s = sum.get(2 + 3 * j).copied().unwrap_or(0) as i64 as f64 / FIXED_SCALE;
            let ss = sum.get(3 + 3 * j).copied().unwrap_or(0) as i64 as f64 / FIXED_SCALE;
            if n < 1.0 {
                return (0.0, 1.0);
            }
            let mean = s / n;
            let var = (ss / n - mean * mean).max(0.0);
            let std = if var.sqrt() > 1e-9 { var.sqrt() } else { 1.0 };
            (mean, std)
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_values_survive_wrapping() {
        // two sites: values {-2, 4} and {1}
        let mut sum = vec![0u64; vector_len(1)];
        for x in [-2.0f64, 4.0, 1.0] {
            sum[1] += 1;
            sum[2] = sum[2].wrapping_add(to_fixed(x));
            sum[3] = sum[3].wrapping_add(to_fixed(x * x));
        }
        let (mean, std) = from_sum(&sum, 1);
        assert!((mean[0] - 1.0).abs() < 1e-9);
        assert!((std[0] - 6f64.sqrt()).abs() < 1e-9);
        assert_eq!(from_sum(&[0; 4], 1), (vec![0.0], vec![1.0]));
        sum[0] = 3;
        assert_eq!(check_sum(&sum, 1), Ok(()));
    }

    #[test]
    fn a_wrapped_or_forged_sum_is_refused() {
        let mut sum = vec![0u64; vector_len(1)];
        sum[0] = 3;
        sum[1] = 3;
        sum[2] = to_fixed(6.0);
        sum[3] = to_fixed(2.0); // (Σx)² = 36 > 3·2
        assert!(matches!(
            check_sum(&sum, 1),
            Err(StatsError::Inconsistent { input: 0, .. })
        ));
        sum[3] = (-5i64) as u64; // negative Σx²: wrapped
        assert!(matches!(
            check_sum(&sum, 1),
            Err(StatsError::Inconsistent { .. })
        ));
        sum[3] = to_fixed(20.0);
        sum[1] = 4; // more values than rows
        assert!(matches!(
            check_sum(&sum, 1),
            Err(StatsError::Inconsistent { .. })
        ));
        assert!(matches!(
            check_sum(&sum[..3], 1),
            Err(StatsError::WrongLength { .. })
        ));
    }

    #[test]
    fn a_site_whose_values_could_overflow_the_sum_is_stopped_before_it_sends() {
        let ok: Vec<Vec<Option<f64>>> = vec![vec![Some(120.0), None]; 1000];
        assert_eq!(
            check_site_headroom(ok.iter().map(|r| r.as_slice()), 2),
            Ok(())
        );
        // Incomes in cents: 1e9² × 1000 rows is far past what 1024 sites can sum in i64.
        let big: Vec<Vec<Option<f64>>> = vec![vec![Some(1.0), Some(1e9)]; 1000];
        let err = check_site_headroom(big.iter().map(|r| r.as_slice()), 2).unwrap_err();
        assert!(
            matches!(err, StatsError::TooLarge { input: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("rescale"));
    }
}
