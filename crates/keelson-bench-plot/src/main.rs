//! `keelson-bench-plot [DIR]`: draws SVG charts from the figures that `make bench-router` and
//! `make bench-scale` write as tab-separated files into DIR (default `target/bench`), and writes the
//! charts beside them. A missing file means its charts are skipped, not an error.
//!
//! - `router.tsv` (`row target figure value`) gives `router.svg` (requests/s and added p99 per
//!   proxy for each kind of load) and `router-instructions.svg` (instructions per request).
//! - `scale.tsv` (`n target figure value`, with one `children_ms` line per job) gives
//!   `scale-latency.svg` (the create → children distribution per target and N) and
//!   `scale-growth.svg` (peak RSS and writes per job against N).

mod router;
mod scale;
mod tsv;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use plotters::style::RGBColor;

/// What a chart function returns: the drawing backend's errors are boxed.
type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One colour per target, the same in every chart.
fn color(target: &str) -> RGBColor {
    match target {
        "keelson" => RGBColor(31, 119, 180),
        "nginx" => RGBColor(44, 160, 44),
        "haproxy" => RGBColor(255, 127, 14),
        "anchor" => RGBColor(214, 39, 40),
        "raw" => RGBColor(148, 103, 189),
        _ => RGBColor(127, 127, 127),
    }
}

fn run(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let router = dir.join("router.tsv");
    if router.exists() {
        let rows = tsv::read(&router)?;
        written.extend(router::draw(&rows, dir)?);
    }
    let scale = dir.join("scale.tsv");
    if scale.exists() {
        let rows = tsv::read(&scale)?;
        written.extend(scale::draw(&rows, dir)?);
    }
    Ok(written)
}

fn main() -> ExitCode {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/bench".into()),
    );
    match run(&dir) {
        Ok(written) if written.is_empty() => {
            eprintln!(
                "no router.tsv or scale.tsv in {}: run make bench-router or make bench-scale first",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(written) => {
            for p in written {
                println!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keelson-bench-plot: {e}");
            ExitCode::FAILURE
        }
    }
}
