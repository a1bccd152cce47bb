//! The benchmarks' figures: tab-separated lines of keys and a number last, under a header line.

use std::path::Path;

/// One line: its keys (every column but the last) and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub keys: Vec<String>,
    pub value: f64,
}

impl Row {
    pub fn key(&self, i: usize) -> &str {
        self.keys.get(i).map(String::as_str).unwrap_or("")
    }
}

/// Parses the text of a file: the header line and lines whose last column is not a number are
/// skipped.
pub fn parse(text: &str) -> Vec<Row> {
    text.lines()
        .filter_map(|line| {
            let mut cols: Vec<&str> = line.split('\t').collect();
            let value = cols.pop()?.trim().parse::<f64>().ok()?;
            Some(Row {
                keys: cols.into_iter().map(str::to_string).collect(),
                value,
            })
        })
        .collect()
}

pub fn read(path: &Path) -> std::io::Result<Vec<Row>> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

/// The first value whose keys are `keys`.
pub fn get(rows: &[Row], keys: &[&str]) -> Option<f64> {
    rows.iter()
        .find(|r| r.keys.iter().map(String::as_str).eq(keys.iter().copied()))
        .map(|r| r.value)
}

/// The distinct values of key column `i`, in order of first appearance.
pub fn distinct(rows: &[Row], i: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in rows {
        let k = r.key(i);
        if !k.is_empty() && !out.iter().any(|o| o == k) {
            out.push(k.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_skips_the_header() {
        let rows =
            parse("row\ttarget\tfigure\tvalue\nget\tkeelson\trps\t37022\nget\tnginx\trps\tn/a\n");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key(1), "keelson");
        assert_eq!(get(&rows, &["get", "keelson", "rps"]), Some(37022.0));
        assert_eq!(get(&rows, &["get", "nginx", "rps"]), None);
    }

    #[test]
    fn distinct_keeps_the_first_order() {
        let rows = parse("a\tx\t1\nb\ty\t2\na\tz\t3\n");
        assert_eq!(distinct(&rows, 0), ["a", "b"]);
    }
}
