//! The library knows nothing of its command line (issue 12): no source file of the `ddpm`
//! library outside `src/bin/` uses clap, indicatif, anyhow or tracing-subscriber, and those
//! crates are optional dependencies that only the binary's `cli` feature turns on.

use std::path::{Path, PathBuf};

const CLI_CRATES: [&str; 4] = ["clap", "indicatif", "anyhow", "tracing_subscriber"];

fn library_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                library_sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code lines of `text` that name `krate` as a path (`clap::`, `use clap`), comments skipped.
fn uses(text: &str, krate: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .filter(|l| {
            l.contains(&format!("{krate}::"))
                || l.contains(&format!("use {krate}"))
                || l.contains(&format!("extern crate {krate}"))
        })
        .map(String::from)
        .collect()
}

#[test]
fn the_library_sources_use_no_cli_crate() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    library_sources(&src, &mut files);
    assert!(files.len() > 20, "found only {} library files", files.len());
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for krate in CLI_CRATES {
            for line in uses(&text, krate) {
                found.push(format!("{}: {line}", file.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the library uses CLI crates:\n{}",
        found.join("\n")
    );
    // The scan itself must see a use where there is one.
    assert_eq!(
        uses("use clap::Parser;\n// clap:: in a comment", "clap").len(),
        1
    );
}

#[test]
fn cli_crates_are_optional_and_only_the_cli_feature_enables_them() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let doc: toml::Table = toml::from_str(&manifest).unwrap();
    let deps = doc["dependencies"].as_table().unwrap();
    let features = doc["features"].as_table().unwrap();
    let cli: Vec<&str> = features["cli"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for krate in CLI_CRATES {
        let name = krate.replace('_', "-");
        let dep = deps[&name]
            .as_table()
            .unwrap_or_else(|| panic!("{name} is not a table"));
        assert_eq!(
            dep.get("optional").and_then(|v| v.as_bool()),
            Some(true),
            "{name}"
        );
        assert!(
            cli.contains(&format!("dep:{name}").as_str()),
            "{name} not in the cli feature"
        );
    }
    let bin = doc["bin"].as_array().unwrap()[0].as_table().unwrap();
    assert_eq!(
        bin["required-features"].as_array().unwrap()[0].as_str(),
        Some("cli")
    );
}
