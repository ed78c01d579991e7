//! `accuracy.png`: the task's metric per round — accuracy for classification, RMSE in the
//! label's units for regression — for each site, the mean of sites and the example-weighted
//! (pooled) value, beside the loss, on axes scaled to the data, titled secure or plain.
//!
//! Text is rendered with a bundled DejaVu Sans (assets/), so plotting needs no system fonts.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::run::Summary;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

pub fn accuracy_png(summary: &Summary, path: &Path) -> Result<()> {
    // Registering twice is harmless; the first registration wins.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let root = BitMapBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(480);
    // The task's metric: accuracy for classification, RMSE (label units) for regression.
    let rmse = summary.metric == "rmse";
    let value = |m: &cohort_protocols::model::metrics::Metrics| {
        if rmse { m.rmse } else { m.accuracy }
    };
    let mut points: Vec<(u64, Option<f64>, f64)> =
        vec![(0, value(&summary.initial.site_mean), summary.initial.loss)];
    points.extend(
        summary
            .rounds
            .iter()
            .map(|r| (r.round, value(&r.site_mean), r.loss)),
    );
    let mean: Vec<(u64, f64)> = points
        .iter()
        .filter_map(|p| p.1.map(|v| (p.0, v)))
        .collect();
    let last = points.last().map_or(1, |p| p.0).max(1);
    let epsilon = epsilon_series(summary);
    let title = match (summary.secure, epsilon.as_ref().and_then(|e| e.1.last())) {
        (true, Some((_, eps))) => format!("secure aggregation, ε = {eps:.2}"),
        (false, Some((_, eps))) => format!("plain (insecure), ε = {eps:.2}"),
        (true, None) => "secure aggregation".to_string(),
        (false, None) => "plain (insecure)".to_string(),
    };

    let sites = site_series(summary);
    let weighted: Vec<(u64, f64)> = std::iter::once((0, value(&summary.initial.weighted)))
        .chain(summary.rounds.iter().map(|r| (r.round, value(&r.weighted))))
        .filter_map(|(r, v)| v.map(|v| (r, v)))
        .collect();
    let all = mean
        .iter()
        .map(|p| p.1)
        .chain(weighted.iter().map(|p| p.1))
        .chain(sites.values().flatten().map(|p| p.1));
    let (lo, hi) = y_range(all, !rmse);
    let (caption, axis) = if rmse {
        (format!("Test RMSE, label units ({title})"), "RMSE")
    } else {
        (format!("Test accuracy ({title})"), "accuracy")
    };
    let mut acc = ChartBuilder::on(&left)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0u64..last, lo..hi)
        .map_err(|e| anyhow!("{e}"))?;
    acc.configure_mesh()
        .x_desc("round")
        .y_desc(axis)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (site, series)) in sites.iter().enumerate() {
        let colour = Palette99::pick(i + 3).mix(0.6);
        acc.draw_series(LineSeries::new(
            series.iter().copied(),
            colour.stroke_width(1),
        ))
        .map_err(|e| anyhow!("{e}"))?
        .label(site.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    acc.draw_series(LineSeries::new(mean.iter().copied(), BLUE.stroke_width(3)))
        .map_err(|e| anyhow!("{e}"))?
        .label("mean of sites")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(3)));
    acc.draw_series(LineSeries::new(
        weighted.iter().copied(),
        BLACK.stroke_width(2),
    ))
    .map_err(|e| anyhow!("{e}"))?
    .label("weighted by test examples")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(2)));
    acc.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(if rmse {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::LowerRight
        })
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;

    let max_loss = points.iter().map(|p| p.2).fold(0.0, f64::max).max(1e-3) * 1.1;
    let max_eps = epsilon.as_ref().map_or(1.0, |e| {
        e.1.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1
    });
    let caption = match &epsilon {
        Some((kind, _)) => format!("Test loss and {kind} ε spent"),
        None => "Test loss (example-weighted)".to_string(),
    };
    let mut loss = ChartBuilder::on(&right)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .right_y_label_area_size(if epsilon.is_some() { 48 } else { 0 })
        .build_cartesian_2d(0u64..last, 0f64..max_loss)
        .map_err(|e| anyhow!("{e}"))?
        .set_secondary_coord(0u64..last, 0f64..max_eps);
    loss.configure_mesh()
        .x_desc("round")
        .y_desc("loss (training objective)")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    loss.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.2)), &RED))
        .map_err(|e| anyhow!("{e}"))?
        .label("loss (example-weighted)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    if let Some((kind, series)) = &epsilon {
        loss.configure_secondary_axes()
            .y_desc(format!("ε ({kind}, at the run's δ)"))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let green = GREEN.mix(0.9).stroke_width(2);
        loss.draw_secondary_series(LineSeries::new(series.iter().copied(), green))
            .map_err(|e| anyhow!("{e}"))?
            .label(format!("ε ({kind})"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], green));
        loss.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The ε the run spent after each round (from round 0 at 0), and which kind: site-level when
/// the run has it (it is the guarantee for a whole hospital), else example-level.
fn epsilon_series(summary: &Summary) -> Option<(&'static str, Vec<(u64, f64)>)> {
    let pick = |f: fn(&crate::run::RoundRow) -> Option<f64>| -> Vec<(u64, f64)> {
        std::iter::once((0, 0.0))
            .chain(
                summary
                    .rounds
                    .iter()
                    .filter_map(|r| f(r).map(|e| (r.round, e))),
            )
            .collect()
    };
    let site = pick(|r| r.site_epsilon);
    if site.len() > 1 {
        return Some(("site-level", site));
    }
    let example = pick(|r| r.epsilon);
    (example.len() > 1).then_some(("example-level", example))
}

/// Each site's value of the run's metric per round, by site name.
fn site_series(summary: &Summary) -> std::collections::BTreeMap<String, Vec<(u64, f64)>> {
    let mut sites: std::collections::BTreeMap<String, Vec<(u64, f64)>> = Default::default();
    for r in &summary.rounds {
        for (site, acc) in &r.site_metric {
            sites.entry(site.clone()).or_default().push((r.round, *acc));
        }
    }
    sites
}

/// The metric's axis: the data's range with a margin of a tenth of it (at least 0.02), kept
/// within [0, 1] for a share such as accuracy (`unit`) and above 0 for an error such as
/// RMSE, so a run that moves between 0.78 and 0.82 is not drawn as a flat line.
pub fn y_range(values: impl Iterator<Item = f64>, unit: bool) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    if !unit {
        let margin = ((hi - lo) * 0.1).max(hi.abs() * 0.02).max(1e-6);
        return ((lo - margin).max(0.0), hi + margin);
    }
    let margin = ((hi - lo) * 0.1).max(0.02);
    ((lo - margin).max(0.0), (hi + margin).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accuracy_axis_follows_the_data() {
        let (lo, hi) = y_range([0.78, 0.80, 0.82].into_iter(), true);
        assert!(
            (lo - 0.76).abs() < 1e-9 && (hi - 0.84).abs() < 1e-9,
            "{lo} {hi}"
        );
        assert_eq!(y_range([0.995, 1.0].into_iter(), true), (0.975, 1.0));
        assert_eq!(y_range([0.0, 0.01].into_iter(), true), (0.0, 0.03));
        assert_eq!(y_range(std::iter::empty(), true), (0.0, 1.0));
        assert_eq!(y_range([f64::NAN].into_iter(), true), (0.0, 1.0));
        // An RMSE in label units is not clipped at 1.
        let (lo, hi) = y_range([18.0, 22.0].into_iter(), false);
        assert!(
            (lo - 17.56).abs() < 1e-9 && (hi - 22.44).abs() < 1e-9,
            "{lo} {hi}"
        );
    }
}
