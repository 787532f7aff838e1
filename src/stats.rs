//! Small statistics helpers shared by the simulator and dataset summaries.
//! Quantiles are nearest-rank, as in the serf peer harness, so figures are
//! defined identically on both sides.

/// Nearest-rank quantile of an ascending slice (NaN when empty).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[rank_index(sorted.len(), q)]
}

/// Index of the nearest-rank `q` quantile in a sorted slice of `len` values.
pub fn rank_index(len: usize, q: f64) -> usize {
    let k = (q * len as f64).ceil() as isize - 1;
    k.clamp(0, len as isize - 1) as usize
}

/// Nearest-rank quantiles of unsorted data without a full sort (the data is
/// reordered). `qs` must be ascending. NaN for empty data.
pub fn quantiles_unsorted(data: &mut [f64], qs: &[f64]) -> Vec<f64> {
    if data.is_empty() {
        return vec![f64::NAN; qs.len()];
    }
    let mut out = Vec::with_capacity(qs.len());
    let mut lo = 0usize;
    for &q in qs {
        let k = rank_index(data.len(), q);
        if k < lo {
            // Already partitioned past it: everything below lo is <= data[lo].
            let (_, v, _) = data[..=lo].select_nth_unstable_by(k, f64::total_cmp);
            out.push(*v);
            continue;
        }
        let (_, v, _) = data[lo..].select_nth_unstable_by(k - lo, f64::total_cmp);
        out.push(*v);
        lo = k;
    }
    out
}

/// Arithmetic mean (NaN when empty).
pub fn mean(data: &[f64]) -> f64 {
    if data.is_empty() {
        return f64::NAN;
    }
    data.iter().sum::<f64>() / data.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_matches_definition() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile_sorted(&v, 0.5), 5.0);
        assert_eq!(quantile_sorted(&v, 0.9), 9.0);
        assert_eq!(quantile_sorted(&v, 0.99), 10.0);
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert!(quantile_sorted(&[], 0.5).is_nan());
        let mut shuffled = vec![7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 4.0, 6.0];
        assert_eq!(
            quantiles_unsorted(&mut shuffled, &[0.5, 0.9, 0.99]),
            vec![5.0, 9.0, 10.0]
        );
    }
}
