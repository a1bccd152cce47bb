//! The scale bench's tables, and its figures as `target/bench/scale.tsv` for the charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::Figures;

/// Reads one figure out of a row.
type Figure = dyn Fn(&Figures) -> f64;

/// The figures of every target and N so far, by (N, target).
pub type All = BTreeMap<(usize, &'static str), Figures>;

fn fmt_ms(v: [f64; 3]) -> String {
    if v.iter().any(|x| x.is_nan()) {
        return "-".into();
    }
    format!("{:.0} / {:.0} / {:.0}", v[0], v[1], v[2])
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

pub fn print_table(n: usize, rows: &[(&'static str, Figures)]) {
    let get = |t: &str| rows.iter().find(|(x, _)| *x == t).map(|(_, f)| f.clone());
    let (k, a, r) = (get("keelson"), get("anchor"), get("raw"));
    println!("\nN = {n} jobs of 4 ranks ({} pods)", n * 4);
    println!("| figure | keelson | anchor | raw | keelson/anchor | keelson/raw |");
    println!("|---|---:|---:|---:|---:|---:|");
    // `operator`: a figure of an operator process, which the raw row has not.
    let row = |name: &str, operator: bool, f: &dyn Fn(&Figures) -> String, v: &Figure| {
        let cell = |x: &Option<Figures>| match x {
            Some(x) if !(operator && x.raw) => f(x),
            _ => "-".into(),
        };
        let vs = |o: &Option<Figures>| match (&k, o) {
            (Some(k), Some(o)) if !(operator && o.raw) => ratio(v(k), v(o)),
            _ => "-".into(),
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            cell(&k),
            cell(&a),
            cell(&r),
            vs(&a),
            vs(&r)
        );
    };
    row(
        "create → children, p50/p99/max ms",
        false,
        &|f| fmt_ms(f.children_ms),
        &|f| f.children_ms[1],
    );
    row(
        "time to all children, ms",
        false,
        &|f| format!("{:.0}", f.all_children_ms),
        &|f| f.all_children_ms,
    );
    row(
        "create → Running, p50/p99/max ms",
        true,
        &|f| fmt_ms(f.running_ms),
        &|f| f.running_ms[1],
    );
    row(
        "children per job",
        false,
        &|f| format!("{:.0}", f.children_created / n as f64),
        &|f| f.children_created,
    );
    row(
        "API writes per child",
        true,
        &|f| format!("{:.2}", f.writes_per_child()),
        &|f| f.writes_per_child(),
    );
    row(
        "API writes per job",
        true,
        &|f| format!("{:.2}", f.writes_total() / n as f64),
        &|f| f.writes_total(),
    );
    row(
        "writes in a forced no-op resync",
        true,
        &|f| format!("{:.0}", f.resync_writes),
        &|f| f.resync_writes,
    );
    row(
        "peak RSS MiB",
        true,
        &|f| format!("{:.1}", f.rss_mib),
        &|f| f.rss_mib,
    );
    row("CPU seconds", true, &|f| format!("{:.1}", f.cpu_s), &|f| {
        f.cpu_s
    });
    row(
        "jobs not complete at the deadline",
        false,
        &|f| f.incomplete.to_string(),
        &|f| f.incomplete as f64,
    );
    if let Some(r) = &r {
        println!(
            "\nraw: the bench created the children of Keelson's build itself, {} requests at once",
            r.raw_concurrency
        );
    }
    for (t, f) in rows.iter().filter(|(_, f)| !f.raw) {
        println!(
            "\n{t} writes per job by verb and resource: {}",
            f.writes
                .iter()
                .map(|(k, v)| format!("{k} {:.2}", v / n as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !f.resync_breakdown.is_empty() {
            println!(
                "{t} writes in the no-op resync: {}",
                f.resync_breakdown
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}

pub fn print_growth(lo: usize, hi: usize, all: &All) {
    println!("\nGrowth from N={lo} to N={hi} (×{}; linear is ×{} in totals, ×1 in per-child and latency figures)", hi / lo, hi / lo);
    println!("| figure | keelson | anchor | raw |");
    println!("|---|---:|---:|---:|");
    let g = |t: &str, operator: bool, f: &Figure| match (all.get(&(lo, t)), all.get(&(hi, t))) {
        (Some(a), Some(b)) if !(operator && a.raw) => ratio(f(b), f(a)),
        _ => "-".into(),
    };
    let rows: [(&str, bool, &Figure); 7] = [
        ("create → children p99", false, &|f| f.children_ms[1]),
        ("time to all children", false, &|f| f.all_children_ms),
        ("create → Running p99", true, &|f| f.running_ms[1]),
        ("API writes per child", true, &|f| f.writes_per_child()),
        ("API writes total", true, &|f| f.writes_total()),
        ("peak RSS", true, &|f| f.rss_mib),
        ("CPU seconds", true, &|f| f.cpu_s),
    ];
    for (name, operator, f) in rows {
        println!(
            "| {name} | {} | {} | {} |",
            g("keelson", operator, f),
            g("anchor", operator, f),
            g("raw", operator, f)
        );
    }
}

/// Every figure as `n target figure value` lines, with one `children_ms` line per job.
pub fn tsv(all: &All) -> String {
    let mut out = String::from("n\ttarget\tfigure\tvalue\n");
    for ((n, t), f) in all {
        let mut put = |figure: &str, v: f64| {
            if v.is_finite() {
                let _ = writeln!(out, "{n}\t{t}\t{figure}\t{v:.3}");
            }
        };
        put("children_p50_ms", f.children_ms[0]);
        put("children_p99_ms", f.children_ms[1]);
        put("children_max_ms", f.children_ms[2]);
        put("all_children_ms", f.all_children_ms);
        put("incomplete", f.incomplete as f64);
        if !f.raw {
            put("running_p99_ms", f.running_ms[1]);
            put("writes_per_job", f.writes_total() / *n as f64);
            put("writes_per_child", f.writes_per_child());
            put("resync_writes", f.resync_writes);
            put("rss_mib", f.rss_mib);
            put("cpu_s", f.cpu_s);
        }
        for v in &f.children_samples {
            put("children_ms", *v);
        }
    }
    out
}
