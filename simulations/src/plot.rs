//! `accuracy.png`: test accuracy and loss per round.
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
    let mut points: Vec<(u64, f64, f64)> =
        vec![(0, summary.initial.accuracy, summary.initial.loss)];
    points.extend(summary.rounds.iter().map(|r| (r.round, r.accuracy, r.loss)));
    let last = points.last().map_or(1, |p| p.0).max(1);
    let title = if summary.secure {
        "secure aggregation"
    } else {
        "plain (insecure)"
    };

    let mut acc = ChartBuilder::on(&left)
        .caption(
            format!("Mean site test accuracy ({title})"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0u64..last, 0f64..1f64)
        .map_err(|e| anyhow!("{e}"))?;
    acc.configure_mesh()
        .x_desc("round")
        .y_desc("accuracy")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    acc.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &BLUE))
        .map_err(|e| anyhow!("{e}"))?;
    acc.draw_series(
        points
            .iter()
            .map(|p| Circle::new((p.0, p.1), 3, BLUE.filled())),
    )
    .map_err(|e| anyhow!("{e}"))?;

    let max_loss = points.iter().map(|p| p.2).fold(0.0, f64::max).max(1e-3) * 1.1;
    let mut loss = ChartBuilder::on(&right)
        .caption("Test loss (example-weighted)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0u64..last, 0f64..max_loss)
        .map_err(|e| anyhow!("{e}"))?;
    loss.configure_mesh()
        .x_desc("round")
        .y_desc("BCE loss")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    loss.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.2)), &RED))
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
