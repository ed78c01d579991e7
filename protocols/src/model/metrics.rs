//! Test metrics, computed the same way at a site, at the coordinator and in the simulator.
//!
//! A site reports a [`Tally`]: counts from which every metric of its test split follows (a
//! confusion matrix for classification; residual sums for regression). Tallies add, and the
//! sum of the sites' tallies is the tally of their test sets pooled, so the example-weighted
//! metrics of a round are exact, not a weighted mean of ratios. [`Metrics`] are what the
//! tallies mean; AUC is the one metric that needs scores, so it travels beside the tally.

use serde::{Deserialize, Serialize};

/// Residual sums of a regression test set, in the label's units.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Residuals {
    pub n: u64,
    /// Σ (y − ŷ)²
    pub sse: f64,
    /// Σ |y − ŷ|
    pub sae: f64,
    /// Σ y
    pub sum_y: f64,
    /// Σ y²
    pub sum_y2: f64,
}

/// What a test split's predictions come to.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Classification: k×k counts, row = true class, column = predicted class. Empty for
    /// regression.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residuals: Option<Residuals>,
}

/// The metrics of one test set, or a mean of several. `None`: not defined for this task or
/// this data (AUC of a split with one class, R² of a constant label).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean recall over the classes present in the test set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balanced_accuracy: Option<f64>,
    /// Binary: F1 of the positive class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// Multiclass: unweighted mean of the per-class F1 over classes that occur (as truth or
    /// prediction); a class never predicted has precision 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auc: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_class_recall: Vec<Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mae: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r2: Option<f64>,
}

impl Tally {
    /// An empty tally for `classes` classes.
    pub fn classification(classes: usize) -> Self {
        Tally {
            confusion: vec![0; classes * classes],
            residuals: None,
        }
    }

    pub fn regression() -> Self {
        Tally {
            confusion: Vec::new(),
            residuals: Some(Residuals::default()),
        }
    }

    pub fn classes(&self) -> usize {
        (self.confusion.len() as f64).sqrt().round() as usize
    }

    /// Counts one classified example (both indices below [`Tally::classes`]).
    pub fn count(&mut self, truth: usize, predicted: usize) {
        let k = self.classes();
        if truth < k && predicted < k {
            self.confusion[truth * k + predicted] += 1;
        }
    }

    /// Adds one regression example.
    pub fn residual(&mut self, y: f64, predicted: f64) {
        if let Some(r) = &mut self.residuals {
            let e = y - predicted;
            r.n += 1;
            r.sse += e * e;
            r.sae += e.abs();
            r.sum_y += y;
            r.sum_y2 += y * y;
        }
    }

    pub fn examples(&self) -> u64 {
        match &self.residuals {
            Some(r) => r.n,
            None => self.confusion.iter().sum(),
        }
    }

    /// Adds `other` (another site's test set) to this one.
    pub fn add(&mut self, other: &Tally) -> Result<(), String> {
        if self.confusion.len() != other.confusion.len()
            || self.residuals.is_some() != other.residuals.is_some()
        {
            return Err("tallies of different tasks cannot be added".into());
        }
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a += b;
        }
        if let (Some(a), Some(b)) = (&mut self.residuals, &other.residuals) {
            a.n += b.n;
            a.sse += b.sse;
            a.sae += b.sae;
            a.sum_y += b.sum_y;
            a.sum_y2 += b.sum_y2;
        }
        Ok(())
    }

    /// Checks a tally received from a site: the task's shape, `examples` examples, sums an
    /// honest test set can have. Names what is wrong.
    pub fn check(&self, classes: usize, examples: u64) -> Result<(), String> {
        if classes == 0 {
            let Some(r) = &self.residuals else {
                return Err("a regression task needs residual sums".into());
            };
            if !self.confusion.is_empty() {
                return Err("a regression task has no confusion matrix".into());
            }
            if r.n != examples {
                return Err(format!("residuals over {} examples, not {examples}", r.n));
            }
            if ![r.sse, r.sae, r.sum_y, r.sum_y2]
                .iter()
                .all(|v| v.is_finite())
                || r.sse < 0.0
                || r.sae < 0.0
                || r.sum_y2 < 0.0
            {
                return Err("residual sums are negative or not finite".into());
            }
            return Ok(());
        }
        if self.residuals.is_some() {
            return Err("a classification task has no residual sums".into());
        }
        if self.confusion.len() != classes * classes {
            return Err(format!(
                "the confusion matrix has {} cells, the task's {classes} classes need {}",
                self.confusion.len(),
                classes * classes
            ));
        }
        if self.examples() != examples {
            return Err(format!(
                "the confusion matrix counts {} examples, not {examples}",
                self.examples()
            ));
        }
        Ok(())
    }

    /// The metrics of this test set; `auc` is passed through (it needs the scores).
    pub fn metrics(&self, auc: Option<f64>) -> Metrics {
        if let Some(r) = &self.residuals {
            if r.n == 0 {
                return Metrics::default();
            }
            let n = r.n as f64;
            let total = r.sum_y2 - r.sum_y * r.sum_y / n;
            return Metrics {
                rmse: Some((r.sse / n).sqrt()),
                mae: Some(r.sae / n),
                // A (near-)constant label has no variance to explain.
                r2: (total > 1e-12 * r.sum_y2.max(1.0)).then(|| 1.0 - r.sse / total),
                ..Metrics::default()
            };
        }
        let k = self.classes();
        let total = self.examples();
        if total == 0 {
            return Metrics::default();
        }
        let cell = |t: usize, p: usize| self.confusion[t * k + p] as f64;
        let row = |t: usize| (0..k).map(|p| cell(t, p)).sum::<f64>();
        let col = |p: usize| (0..k).map(|t| cell(t, p)).sum::<f64>();
        let recall: Vec<Option<f64>> = (0..k)
            .map(|c| (row(c) > 0.0).then(|| cell(c, c) / row(c)))
            .collect();
        let present: Vec<f64> = recall.iter().flatten().copied().collect();
        let f1 = |c: usize| {
            let (tp, r, p) = (cell(c, c), row(c), col(c));
            (r + p > 0.0).then(|| 2.0 * tp / (r + p))
        };
        let f1s: Vec<f64> = (0..k).filter_map(f1).collect();
        let binary = k == 2;
        Metrics {
            accuracy: Some((0..k).map(|c| cell(c, c)).sum::<f64>() / total as f64),
            balanced_accuracy: (!present.is_empty())
                .then(|| present.iter().sum::<f64>() / present.len() as f64),
            f1: if binary { f1(1) } else { None },
            macro_f1: (!binary && !f1s.is_empty())
                .then(|| f1s.iter().sum::<f64>() / f1s.len() as f64),
            auc,
            per_class_recall: if binary { Vec::new() } else { recall },
            ..Metrics::default()
        }
    }
}

impl Metrics {
    /// The unweighted mean over sites of each metric, over the sites where it is defined.
    pub fn mean<'a>(all: impl IntoIterator<Item = &'a Metrics> + Clone) -> Metrics {
        fn avg(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
            let (sum, n) = v.flatten().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
            (n > 0).then(|| sum / n as f64)
        }
        let k = all
            .clone()
            .into_iter()
            .map(|m| m.per_class_recall.len())
            .max()
            .unwrap_or(0);
        let field = |f: fn(&Metrics) -> Option<f64>| avg(all.clone().into_iter().map(f));
        Metrics {
            accuracy: field(|m| m.accuracy),
            balanced_accuracy: field(|m| m.balanced_accuracy),
            f1: field(|m| m.f1),
            macro_f1: field(|m| m.macro_f1),
            auc: field(|m| m.auc),
            per_class_recall: (0..k)
                .map(|c| {
                    avg(all
                        .clone()
                        .into_iter()
                        .map(|m| m.per_class_recall.get(c).copied().flatten()))
                })
                .collect(),
            rmse: field(|m| m.rmse),
            mae: field(|m| m.mae),
            r2: field(|m| m.r2),
        }
    }

    /// The metric a task is judged by first: accuracy for classification, RMSE for
    /// regression. `(name, value)`.
    pub fn headline(&self) -> Option<(&'static str, f64)> {
        match (self.accuracy, self.rmse) {
            (Some(a), _) => Some(("accuracy", a)),
            (None, Some(r)) => Some(("rmse", r)),
            _ => None,
        }
    }
}

/// ROC AUC as the Mann–Whitney statistic (ties count one half); `None` when the labels hold
/// one class only, where AUC is undefined (reporting 0.5 would pull a mean of sites towards
/// chance for a reason that has nothing to do with the model).
pub fn auc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len().min(positive.len())).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut pos) = (0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if positive[k] {
                rank_sum += avg_rank;
                pos += 1.0;
            }
        }
        i = j + 1;
    }
    let neg = idx.len() as f64 - pos;
    (pos > 0.0 && neg > 0.0).then(|| (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    #[test]
    fn binary_metrics_match_hand_computed_values() {
        // truth/pred: TN 5, FP 1, FN 2, TP 2
        let mut t = Tally::classification(2);
        for (y, p, n) in [(0, 0, 5), (0, 1, 1), (1, 0, 2), (1, 1, 2)] {
            for _ in 0..n {
                t.count(y, p);
            }
        }
        let m = t.metrics(Some(0.8));
        assert!(close(m.accuracy, 0.7));
        assert!(close(m.balanced_accuracy, (5.0 / 6.0 + 0.5) / 2.0));
        // precision 2/3, recall 1/2 -> F1 = 4/7
        assert!(close(m.f1, 4.0 / 7.0));
        assert_eq!(m.auc, Some(0.8));
        assert_eq!(m.macro_f1, None);
        assert_eq!(m.rmse, None);
    }

    #[test]
    fn multiclass_metrics_and_pooling() {
        let mut a = Tally::classification(3);
        for (y, p) in [(0, 0), (0, 0), (1, 1), (1, 2), (2, 2)] {
            a.count(y, p);
        }
        let m = a.metrics(None);
        assert!(close(m.accuracy, 0.8));
        assert_eq!(m.per_class_recall, vec![Some(1.0), Some(0.5), Some(1.0)]);
        assert!(close(m.balanced_accuracy, 2.5 / 3.0));
        // F1: class 0 = 1, class 1 = 2·1/(2+1) = 2/3, class 2 = 2·1/(1+2) = 2/3
        assert!(close(m.macro_f1, (1.0 + 4.0 / 3.0) / 3.0));
        // A site without class 2 in its test set: recall undefined there, not zero.
        let mut b = Tally::classification(3);
        b.count(0, 1);
        b.count(1, 1);
        let mb = b.metrics(None);
        assert_eq!(mb.per_class_recall, vec![Some(0.0), Some(1.0), None]);
        let mut pooled = a.clone();
        pooled.add(&b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pooled.examples(), 7);
        assert!(close(pooled.metrics(None).accuracy, 5.0 / 7.0));
        let mean = Metrics::mean([&m, &mb]);
        assert!(close(mean.accuracy, (0.8 + 0.5) / 2.0));
        assert_eq!(mean.per_class_recall[2], Some(1.0));
        assert!(pooled.add(&Tally::classification(2)).is_err());
        assert!(a.check(3, 5).is_ok());
        assert!(a.check(3, 6).unwrap_err().contains("counts 5 examples"));
        assert!(a.check(2, 5).unwrap_err().contains("9 cells"));
    }

    #[test]
    fn regression_metrics_in_label_units() {
        let mut t = Tally::regression();
        for (y, p) in [(1.0, 2.0), (3.0, 3.0), (5.0, 2.0)] {
            t.residual(y, p);
        }
        let m = t.metrics(None);
        // errors -1, 0, 3: SSE 10, SAE 4; mean y 3, SST 8
        assert!(close(m.rmse, (10.0f64 / 3.0).sqrt()));
        assert!(close(m.mae, 4.0 / 3.0));
        assert!(close(m.r2, 1.0 - 10.0 / 8.0));
        assert_eq!(m.accuracy, None);
        assert_eq!(m.headline().map(|h| h.0), Some("rmse"));
        let mut constant = Tally::regression();
        constant.residual(2.0, 2.5);
        constant.residual(2.0, 1.5);
        assert_eq!(constant.metrics(None).r2, None);
        assert!(t.check(0, 3).is_ok());
        assert!(t.check(0, 4).is_err());
        assert!(t.check(2, 3).is_err());
        let mut bad = t.clone();
        if let Some(r) = &mut bad.residuals {
            r.sse = -1.0;
        }
        assert!(bad.check(0, 3).is_err());
    }

    #[test]
    fn auc_is_undefined_for_one_class() {
        assert_eq!(
            auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]),
            Some(0.75)
        );
        assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), Some(0.5));
    }
}
