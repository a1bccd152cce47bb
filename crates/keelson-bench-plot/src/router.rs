//! Charts of `make bench-router`: per kind of load, requests/s and added p99 per target; and the
//! instructions per request under callgrind.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::tsv::{self, Row};
use crate::{color, Result};

const TARGETS: [&str; 4] = ["direct", "keelson", "nginx", "haproxy"];
const PROXIES: [&str; 3] = ["keelson", "nginx", "haproxy"];

/// The kinds of load, in the order of the script's tables.
const LOADS: [(&str, &str); 3] = [
    ("get", "GET, no body"),
    ("body", "POST, 1 MiB body"),
    ("h2c", "h2c / gRPC unary"),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Writes router.svg and, when the instruction counts are there, router-instructions.svg.
pub fn draw(rows: &[Row], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let loads: Vec<(&str, &str)> = LOADS
        .into_iter()
        .filter(|(row, _)| rows.iter().any(|r| r.key(0) == *row))
        .collect();
    if !loads.is_empty() {
        let path = dir.join("router.svg");
        let root = SVGBackend::new(&path, (1000, 300 * loads.len() as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((loads.len(), 2));
        for (i, (row, title)) in loads.iter().enumerate() {
            let figure = |targets: &[&str], name: &str| -> Vec<(String, f64)> {
                targets
                    .iter()
                    .filter_map(|t| Some((t.to_string(), tsv::get(rows, &[row, t, name])?)))
                    .collect()
            };
            let unit = if *row == "h2c" {
                "calls/s"
            } else {
                "requests/s"
            };
            bars(
                &panels[2 * i],
                &format!("{title}: {unit} (median of rounds)"),
                unit,
                &figure(&TARGETS, "rps"),
            )?;
            bars(
                &panels[2 * i + 1],
                &format!("{title}: p99 added over direct"),
                "ms",
                &figure(&PROXIES, "added_p99_ms"),
            )?;
        }
        root.present()?;
        written.push(path.clone());
    }
    let instructions: Vec<(String, f64)> = PROXIES
        .iter()
        .filter_map(|t| {
            Some((
                t.to_string(),
                tsv::get(rows, &["instructions", t, "per_request"])?,
            ))
        })
        .collect();
    if !instructions.is_empty() {
        let path = dir.join("router-instructions.svg");
        let root = SVGBackend::new(&path, (500, 300)).into_drawing_area();
        root.fill(&WHITE)?;
        bars(
            &root,
            "user-space instructions per GET (callgrind)",
            "instructions",
            &instructions,
        )?;
        root.present()?;
        written.push(path.clone());
    }
    Ok(written)
}

/// A figure as a bar label: no decimals from 100 on, else two.
fn label(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// An axis label: as many decimals as a span of that size needs.
pub fn axis_label(v: f64, span: f64) -> String {
    if span >= 20.0 {
        format!("{v:.0}")
    } else if span >= 2.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A bar chart, one bar per (target, value), coloured by target and labelled with its value.
fn bars(area: &Area<'_>, title: &str, unit: &str, items: &[(String, f64)]) -> Result {
    let hi = items.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    let lo = items.iter().map(|(_, v)| *v).fold(0.0, f64::min);
    let span = if hi - lo > 0.0 { hi - lo } else { 1.0 };
    let n = items.len().max(1) as u32;
    let names: Vec<String> = items.iter().map(|(t, _)| t.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (0u32..n - 1).into_segmented(),
            (lo - 0.05 * span.min(lo.abs()))..(hi + 0.15 * span),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .max_light_lines(1)
        .y_desc(unit)
        .y_label_formatter(&|y| axis_label(*y, hi - lo))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i as usize).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    chart.draw_series(items.iter().zip(0u32..).map(|((t, v), i)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            color(t).filled(),
        );
        bar.set_margin(0, 0, 14, 14);
        bar
    }))?;
    let style =
        TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(items.iter().zip(0u32..).map(|((_, v), i)| {
        Text::new(
            label(*v),
            (SegmentValue::CenterOf(i), v.max(0.0)),
            style.clone(),
        )
    }))?;
    Ok(())
}
