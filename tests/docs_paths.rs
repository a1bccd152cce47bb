//! Every repository path that README.md and docs/*.md name exists, so that the docs do not keep
//! pointing at files after they move.
//!
//! A path is "named" when it is a relative link target (`[text](docs/api.md)`, resolved from the
//! file that holds the link), or a word of inline code or of a fenced block that starts with one of
//! the repository's top-level directories (`src/`, `crates/`, `tests/`, ...) or is one of its
//! top-level files (`Makefile`, `Cargo.toml`, ...). URLs, `make` targets and absolute paths (an
//! in-container `/data`, `~/.cache/...`) are not repository paths and are not checked. A `<name>` or
//! `*` in a path stands for any part of one file name (`config/argocd/health/keelson.dev_<Kind>.lua`);
//! a path that ends with `/` must be a directory.
//!
//! Std only, so it also runs without cargo:
//! `rustc --edition 2021 --test tests/docs_paths.rs -o /tmp/dp && /tmp/dp` from the repository root.

use std::fs;
use std::path::{Component, Path, PathBuf};

/// Top-level directories whose paths the docs may name.
const DIRS: &[&str] = &[
    "src/",
    "crates/",
    "docs/",
    "config/",
    "crds/",
    "examples/",
    "tests/",
    "hack/",
    "benches/",
    "charts/",
    ".ci/",
];
/// Top-level files the docs may name.
const FILES: &[&str] = &[
    "Makefile",
    "Dockerfile",
    "Cargo.toml",
    "Cargo.lock",
    "README.md",
    "rust-toolchain.toml",
    "clippy.toml",
];

/// The repository root: cargo sets CARGO_MANIFEST_DIR; a plain rustc build runs from the root.
fn root() -> PathBuf {
    PathBuf::from(option_env!("CARGO_MANIFEST_DIR").unwrap_or("."))
}

/// A path named in a doc, with where it was named.
#[derive(Debug, PartialEq)]
struct Named {
    line: usize,
    /// Relative to the repository root.
    path: String,
}

/// The repository path a word of code stands for, if it is one.
fn repo_path(word: &str) -> Option<String> {
    let w = word
        .trim_start_matches(['(', '[', '"', '\'', '`'])
        .trim_end_matches([',', ';', ':', '.', ')', ']', '"', '\'', '`']);
    let named = DIRS.iter().any(|d| w.starts_with(d)) || FILES.contains(&w);
    named.then(|| w.to_string())
}

/// The words of `code` that are repository paths.
fn paths_in_code(code: &str, line: usize, out: &mut Vec<Named>) {
    for word in code.split(|c: char| c.is_whitespace() || c == '=') {
        if let Some(path) = repo_path(word) {
            out.push(Named { line, path });
        }
    }
}

/// A link target as a path from the repository root; `None` for URLs and in-page anchors.
fn link_path(doc_dir: &Path, target: &str) -> Option<String> {
    let target = target.split_whitespace().next()?; // drop a "title"
    let target = target.split('#').next()?;
    if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    for c in doc_dir.join(target).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    let mut path = parts.join("/");
    if target.ends_with('/') {
        path.push('/');
    }
    Some(path)
}

/// Every repository path named in `text`, a markdown file in `doc_dir` (relative to the root).
fn named_paths(text: &str, doc_dir: &Path) -> Vec<Named> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let t = line.trim_start();
        if let Some(f) = fence {
            if t.starts_with(f) {
                fence = None;
            } else {
                paths_in_code(line, n, &mut out);
            }
            continue;
        }
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = Some(&t[..3]);
            continue;
        }
        // Inline code: text between runs of backticks of the same length.
        let mut rest = line;
        while let Some(start) = rest.find('`') {
            let ticks = rest[start..].len() - rest[start..].trim_start_matches('`').len();
            let after = &rest[start + ticks..];
            let close = "`".repeat(ticks);
            let Some(end) = after.find(&close) else { break };
            paths_in_code(&after[..end], n, &mut out);
            rest = &after[end + ticks..];
        }
        // Links: inline `](target)` and reference definitions `[label]: target`.
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            if let Some(path) = link_path(doc_dir, &after[..end]) {
                out.push(Named { line: n, path });
            }
            rest = &after[end..];
        }
        if let Some(def) = t.strip_prefix('[').and_then(|s| s.split_once("]: ")) {
            if let Some(path) = link_path(doc_dir, def.1) {
                out.push(Named { line: n, path });
            }
        }
    }
    out
}

/// Whether one file name matches a pattern in which `<...>` and `*` stand for any text.
fn matches(pattern: &str, name: &str) -> bool {
    let mut literals: Vec<&str> = Vec::new();
    let mut rest = pattern;
    loop {
        let at = rest.find(['<', '*']);
        let Some(at) = at else {
            literals.push(rest);
            break;
        };
        literals.push(&rest[..at]);
        rest = if rest[at..].starts_with('<') {
            match rest[at..].find('>') {
                Some(e) => &rest[at + e + 1..],
                None => return pattern == name,
            }
        } else {
            &rest[at + 1..]
        };
    }
    let (first, last) = (literals[0], literals[literals.len() - 1]);
    if literals.len() == 1 {
        return name == first;
    }
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut pos = first.len();
    let end = name.len() - last.len();
    for lit in &literals[1..literals.len() - 1] {
        match name[pos..end].find(lit) {
            Some(i) => pos += i + lit.len(),
            None => return false,
        }
    }
    true
}

/// Whether `path` (relative to `root`, maybe with patterns) names something that exists.
fn exists(root: &Path, path: &str) -> bool {
    let want_dir = path.ends_with('/');
    let mut found = vec![root.to_path_buf()];
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let mut next = Vec::new();
        for dir in &found {
            if part.contains(['<', '*']) {
                let Ok(entries) = fs::read_dir(dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    if matches(part, &e.file_name().to_string_lossy()) {
                        next.push(e.path());
                    }
                }
            } else if dir.join(part).exists() {
                next.push(dir.join(part));
            }
        }
        found = next;
    }
    found.iter().any(|p| !want_dir || p.is_dir())
}

/// README.md and every docs/*.md, relative to the root.
fn docs(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("README.md")];
    if let Ok(entries) = fs::read_dir(root.join("docs")) {
        let mut md: Vec<PathBuf> = entries
            .flatten()
            .map(|e| PathBuf::from("docs").join(e.file_name()))
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .collect();
        md.sort();
        files.extend(md);
    }
    files
}

#[test]
fn every_path_named_in_the_docs_exists() {
    let root = root();
    let files = docs(&root);
    assert!(
        files.len() > 1,
        "no docs/*.md found under {}",
        root.display()
    );
    let (mut checked, mut missing) = (0, Vec::new());
    for file in &files {
        let text = match fs::read_to_string(root.join(file)) {
            Ok(t) => t,
            Err(e) => panic!("{}: {e}", file.display()),
        };
        let dir = file.parent().unwrap_or(Path::new(""));
        for named in named_paths(&text, dir) {
            checked += 1;
            if !exists(&root, &named.path) {
                missing.push(format!(
                    "  {}:{}: {}",
                    file.display(),
                    named.line,
                    named.path
                ));
            }
        }
    }
    // The docs name dozens of paths: finding few means the extraction broke, not that all is well.
    assert!(
        checked >= 50,
        "only {checked} paths found in {files:?}: is the extraction broken?"
    );
    assert!(
        missing.is_empty(),
        "{} of {checked} repository paths named in the docs do not exist:\n{}",
        missing.len(),
        missing.join("\n")
    );
}

#[test]
fn extraction_takes_code_words_and_links_but_not_urls_make_targets_or_absolute_paths() {
    let md = "\
See `crates/keelson-router/` and [the API](api.md#status), [up](../examples/a.yaml), \
[web](https://example.com/src/x.rs).
Run `make bench-router` or `SKIP_BUILD=1 hack/bench/router.sh`; edit `Makefile`, not `make`.
```yaml
mountPath: /data   # hostPath: {path: /mapr/cluster1/projects}
args: [\"tests/x.rs\", \"--out=crds/\"]
```
[ref]: ../Cargo.toml
";
    let got: Vec<(usize, String)> = named_paths(md, Path::new("docs"))
        .into_iter()
        .map(|n| (n.line, n.path))
        .collect();
    let want: Vec<(usize, String)> = [
        (1, "crates/keelson-router/"),
        (1, "docs/api.md"),
        (1, "examples/a.yaml"),
        (2, "hack/bench/router.sh"),
        (2, "Makefile"),
        (5, "tests/x.rs"),
        (5, "crds/"),
        (7, "Cargo.toml"),
    ]
    .iter()
    .map(|(l, p)| (*l, p.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn placeholders_match_one_file_name_and_a_trailing_slash_needs_a_directory() {
    assert!(matches(
        "keelson.dev_<Kind>.lua",
        "keelson.dev_Notebook.lua"
    ));
    assert!(matches("*.yaml", "notebooks.yaml"));
    assert!(!matches(
        "keelson.dev_<Kind>.lua",
        "keelson.dev_Notebook.yaml"
    ));
    assert!(matches("a<x>b", "axyzb"));
    assert!(!matches("a<x>b", "ba"));
    let root = root();
    assert!(exists(&root, "tests/"));
    assert!(exists(&root, "tests/docs_paths.rs"));
    assert!(!exists(&root, "tests/docs_paths.rs/"));
    assert!(exists(&root, "tests/docs_<what>.rs"));
    assert!(!exists(&root, "tests/no_such_file.rs"));
}
