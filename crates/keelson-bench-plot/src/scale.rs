//! Charts of `make bench-scale`: the create → children distribution per target and N, and peak RSS
//! and writes per job against N.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::tsv::{self, Row};
use crate::{color, Result};

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Writes scale-latency.svg and scale-growth.svg.
pub fn draw(rows: &[Row], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut ns: Vec<u64> = tsv::distinct(rows, 0)
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    ns.sort_unstable();
    let targets = tsv::distinct(rows, 1);
    if ns.is_empty() {
        return Ok(Vec::new());
    }
    let mut written = Vec::new();

    let path = dir.join("scale-latency.svg");
    let root = SVGBackend::new(&path, (520 * ns.len() as u32, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, n) in root.split_evenly((1, ns.len())).iter().zip(&ns) {
        let series: Vec<(String, Vec<f64>)> = targets
            .iter()
            .map(|t| (t.clone(), samples(rows, *n, t)))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        distribution(area, *n, &series)?;
    }
    root.present()?;
    written.push(path.clone());

    let path = dir.join("scale-growth.svg");
    let root = SVGBackend::new(&path, (1000, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let figures = [
        ("rss_mib", "peak RSS of the operator", "MiB"),
        ("writes_per_job", "API writes per job", "writes"),
    ];
    for (area, (figure, title, unit)) in panels.iter().zip(figures) {
        let series: Vec<(String, Vec<(f64, f64)>)> = targets
            .iter()
            .map(|t| {
                let points = ns
                    .iter()
                    .filter_map(|n| {
                        Some((*n as f64, tsv::get(rows, &[&n.to_string(), t, figure])?))
                    })
                    .collect();
                (t.clone(), points)
            })
            .filter(|(_, p): &(String, Vec<(f64, f64)>)| !p.is_empty())
            .collect();
        let xs: Vec<f64> = ns.iter().map(|n| *n as f64).collect();
        growth(area, title, unit, &xs, &series)?;
    }
    root.present()?;
    written.push(path.clone());
    Ok(written)
}

/// The per-job create → children latencies (seconds) of one target and N, sorted.
fn samples(rows: &[Row], n: u64, target: &str) -> Vec<f64> {
    let n = n.to_string();
    let mut v: Vec<f64> = rows
        .iter()
        .filter(|r| r.key(0) == n && r.key(1) == target && r.key(2) == "children_ms")
        .map(|r| r.value / 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The share of jobs with all their children by each time: one line per target.
fn distribution(area: &Area<'_>, n: u64, series: &[(String, Vec<f64>)]) -> Result {
    let max = series
        .iter()
        .filter_map(|(_, v)| v.last().copied())
        .fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("N = {n}: create → children"), ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..(max * 1.05).max(0.001), 0f64..1.0)?;
    chart
        .configure_mesh()
        .max_light_lines(1)
        .x_desc("seconds after the create")
        .x_label_formatter(&|x| crate::router::axis_label(*x, max))
        .y_desc("share of jobs")
        .draw()?;
    for (target, v) in series {
        let len = v.len() as f64;
        let steps = v
            .iter()
            .enumerate()
            .flat_map(|(i, s)| [(*s, i as f64 / len), (*s, (i + 1) as f64 / len)]);
        let c = color(target);
        chart
            .draw_series(LineSeries::new(
                std::iter::once((0.0, 0.0)).chain(steps),
                c.stroke_width(2),
            ))?
            .label(target.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One figure against N (logarithmic), one line per target.
fn growth(
    area: &Area<'_>,
    title: &str,
    unit: &str,
    ns: &[f64],
    series: &[(String, Vec<(f64, f64)>)],
) -> Result {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
    let (lo, hi) = xs.fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{title} against N"), ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(
            ((lo / 1.5).max(1.0)..hi * 1.5)
                .log_scale()
                .with_key_points(ns.to_vec()),
            0f64..(top * 1.15).max(1.0),
        )?;
    chart
        .configure_mesh()
        .max_light_lines(1)
        .x_desc("N jobs (4 pods each)")
        .y_desc(unit)
        .y_label_formatter(&|y| crate::router::axis_label(*y, top))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for (target, points) in series {
        let c = color(target);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?
            .label(target.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
