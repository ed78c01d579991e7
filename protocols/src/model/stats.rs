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
    }
}
