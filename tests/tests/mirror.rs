//! The mirror table of docs/architecture.md ("Mirror: reference ↔ accelerated") is complete and
//! true: every public item of `reference/src/` has a row; every accelerated entry names an item
//! that `accelerated/src/` defines publicly (or says `— (why)`); every named test exists. A
//! text scan, so it needs no libtorch: items are found as `pub fn NAME` / `pub struct NAME` /
//! `pub enum NAME` / `pub trait NAME` / `pub const NAME` at any indentation (methods included),
//! tests as `fn NAME`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The heading of the table's section.
const SECTION: &str = "## Mirror: reference ↔ accelerated";
/// The table's header row.
const HEADER: &str = "| concept | reference | accelerated | held together by |";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "target") {
                    todo.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The names of the public items of one source file (`pub fn`, `pub struct`, …).
fn public_items(source: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in source.lines() {
        let line = line.trim_start();
        for kw in [
            "pub fn ",
            "pub struct ",
            "pub enum ",
            "pub trait ",
            "pub const ",
            "pub type ",
        ] {
            if let Some(rest) = line.strip_prefix(kw) {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        }
    }
    names
}

/// One row of the table: its line, the reference path, the accelerated paths (empty when the
/// cell says `— (reason)`), the test paths.
struct Row {
    line: usize,
    reference: String,
    accelerated: Vec<String>,
    tests: Vec<String>,
}

/// The backticked spans of a cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Splits a Markdown table row at its unescaped `|`.
fn cells(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.trim().trim_start_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    if out.last().is_some_and(|c| c.trim().is_empty()) {
        out.pop();
    }
    out.into_iter().map(|c| c.trim().to_string()).collect()
}

/// The table's rows, parsed from the architecture page's text.
fn table(doc: &str) -> Vec<Row> {
    let start = doc
        .find(SECTION)
        .expect("docs/architecture.md has the mirror section");
    let mut rows = Vec::new();
    let mut in_table = false;
    for (i, line) in doc[start..].lines().enumerate() {
        let line_no = doc[..start].lines().count() + i + 1;
        if !in_table {
            in_table = line.trim() == HEADER;
            continue;
        }
        if !line.trim_start().starts_with('|') {
            break;
        }
        if line.contains("|---") {
            continue;
        }
        let c = cells(line);
        assert_eq!(
            c.len(),
            4,
            "docs/architecture.md:{line_no}: a row needs 4 cells: {line}"
        );
        let reference = code_spans(&c[1]);
        assert_eq!(
            reference.len(),
            1,
            "docs/architecture.md:{line_no}: one reference item per row"
        );
        let accelerated = if c[2].starts_with('—') {
            assert!(
                c[2].contains('(') && c[2].contains(')'),
                "docs/architecture.md:{line_no}: `—` needs a reason in parentheses"
            );
            Vec::new()
        } else {
            let spans = code_spans(&c[2]);
            assert!(
                !spans.is_empty(),
                "docs/architecture.md:{line_no}: name the accelerated item or write — (why)"
            );
            spans
        };
        let tests = code_spans(&c[3]);
        assert!(
            !tests.is_empty(),
            "docs/architecture.md:{line_no}: name the test that holds the row"
        );
        rows.push(Row {
            line: line_no,
            reference: reference[0].clone(),
            accelerated,
            tests,
        });
    }
    assert!(!rows.is_empty(), "the mirror table has no rows");
    rows
}

/// The module path `a::b::Item::method` resolved under `src`: the longest prefix that is a
/// file (`a/b.rs` or `a/b/mod.rs`), and the item names after it.
fn resolve(src: &Path, path: &str) -> Option<(PathBuf, Vec<String>)> {
    let parts: Vec<&str> = path.split("::").collect();
    for split in (1..parts.len()).rev() {
        let dir: PathBuf = parts[..split].iter().collect();
        for file in [
            src.join(&dir).with_extension("rs"),
            src.join(&dir).join("mod.rs"),
        ] {
            if file.is_file() {
                return Some((file, parts[split..].iter().map(|s| s.to_string()).collect()));
            }
        }
    }
    None
}

/// Errors of one path: a file that does not exist, or an item (type or function) it does not
/// define publicly.
fn check_path(src: &Path, side: &str, path: &str, line: usize) -> Option<String> {
    let Some((file, items)) = resolve(src, path) else {
        return Some(format!(
            "docs/architecture.md:{line}: {side} `{path}`: no such module under {}",
            src.display()
        ));
    };
    let defined = public_items(&read(&file));
    items
        .iter()
        .find(|item| !defined.contains(*item))
        .map(|item| {
            format!(
                "docs/architecture.md:{line}: {side} `{path}`: {} defines no public `{item}`",
                file.display()
            )
        })
}

#[test]
fn every_reference_item_has_a_mirror_row_and_every_row_is_true() {
    let root = root();
    let doc = read(&root.join("docs/architecture.md"));
    let rows = table(&doc);
    let (reference_src, accelerated_src) =
        (root.join("reference/src"), root.join("accelerated/src"));
    let mut errors = Vec::new();

    // (a) every public item of every reference module has a row naming it.
    let listed: BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| {
            let parts: Vec<&str> = r.reference.split("::").collect();
            (parts[0].to_string(), parts[parts.len() - 1].to_string())
        })
        .collect();
    for file in rust_files(&reference_src) {
        let module = file.file_stem().unwrap().to_string_lossy().to_string();
        if module == "lib" {
            continue;
        }
        for item in public_items(&read(&file)) {
            if !listed.contains(&(module.clone(), item.clone())) {
                errors.push(format!(
                    "reference/src/{module}.rs: public `{item}` has no row in the mirror table of docs/architecture.md"
                ));
            }
        }
    }

    // The rows' own paths: reference items exist, accelerated items exist.
    for row in &rows {
        errors.extend(check_path(
            &reference_src,
            "reference",
            &row.reference,
            row.line,
        ));
        for path in &row.accelerated {
            errors.extend(check_path(&accelerated_src, "accelerated", path, row.line));
        }
    }

    // (c) every named test exists: `file::name` is `fn name` in a file of that stem under
    // tests/, proofs/, accelerated/ or reference/.
    let test_files: Vec<PathBuf> = ["tests", "proofs", "accelerated", "reference"]
        .iter()
        .flat_map(|d| rust_files(&root.join(d)))
        .collect();
    for row in &rows {
        for test in &row.tests {
            let (stem, name) = test.rsplit_once("::").unwrap_or(("", test.as_str()));
            let needle = format!("fn {name}(");
            let found = test_files.iter().any(|f| {
                (stem.is_empty() || f.file_stem().is_some_and(|s| s == stem))
                    && read(f).contains(&needle)
            });
            if !found {
                errors.push(format!(
                    "docs/architecture.md:{}: test `{test}` does not exist",
                    row.line
                ));
            }
        }
    }

    assert!(
        errors.is_empty(),
        "the mirror table is out of date:\n  {}",
        errors.join("\n  ")
    );
}

/// The scanner itself: it finds methods and types, skips `pub(crate)`, and splits escaped `|`.
#[test]
fn the_scanner_reads_items_and_cells() {
    let items = public_items(
        "pub fn a() {}\n    pub fn b(&self) {}\npub(crate) fn c() {}\npub struct D;\nfn e() {}\n",
    );
    assert_eq!(
        items,
        ["D", "a", "b"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(
        cells("| p(x\\|y) | `m::f` | — (why) | `t::u` |"),
        vec!["p(x|y)", "`m::f`", "— (why)", "`t::u`"]
    );
    assert_eq!(code_spans("`a`, `b::c`"), vec!["a", "b::c"]);
}
