//! The quality table as text: Markdown (docs/quality.md's table), JSON, and the marked region
//! of a document that the Markdown replaces. Everything here renders numbers that
//! [`table::measure`](super::table::measure) filled in; nothing is measured.

use super::table::{Cell, Row, Table, COMPARED, CONFIDENCE};
use crate::error::{DdpmError, Result};
use std::path::Path;

/// Where the table sits inside a document: the text between this marker and [`END`] is
/// replaced.
pub const BEGIN: &str = "<!-- quality-table:begin -->";
/// End of that region.
pub const END: &str = "<!-- quality-table:end -->";

/// The row's name in the table's first column.
fn label(row: Row) -> &'static str {
    match row {
        Row::Posterior => "posterior σ_t = β̄_{t−1}β_t/β̄_t",
        Row::Beta => "σ_t = β_t",
        Row::Isotropic => "isotropic, data std s",
        Row::Estimated => "estimated optimal σ_t",
        Row::Ddim => "DDIM η = 0",
    }
}

/// The table as Markdown; grid links are `prefix` + the cell's path.
pub fn markdown(table: &Table, prefix: &str) -> String {
    let cols = &table.plan.columns;
    let head = |first: &str| {
        let names: Vec<String> = cols.iter().map(|c| format!("{} steps", c.steps)).collect();
        format!(
            "| {first} | {} |\n|---|{}\n",
            names.join(" | "),
            "---|".repeat(cols.len())
        )
    };
    let find = |row: Row, steps: usize| {
        table
            .cells
            .iter()
            .find(|c| c.row == row && c.steps == steps)
    };
    let rows: Vec<Row> = Row::SIGMAS
        .into_iter()
        .chain((!table.plan.ddim_steps.is_empty()).then_some(Row::Ddim))
        .collect();
    let grid = |f: &dyn Fn(&Cell) -> String| -> String {
        rows.iter()
            .map(|&r| {
                let vals: Vec<String> = cols
                    .iter()
                    .map(|c| find(r, c.steps).map_or("—".into(), f))
                    .collect();
                format!("| {} | {} |\n", label(r), vals.join(" | "))
            })
            .collect()
    };
    let mut md = String::new();
    md += &format!(
        "FD-MNIST (lower is better) with its {} bootstrap interval ({} resamples); each value links to \
         the first {} samples of its cell.\n\n",
        percent(CONFIDENCE),
        table.plan.bootstrap_reps,
        table.plan.grid_images
    );
    md += &head("σ_t");
    md += &grid(&|c| {
        format!(
            "[{:.2}]({prefix}{}) [{:.2}, {:.2}]",
            c.fd, c.grid, c.fd_ci.lo, c.fd_ci.hi
        )
    });
    let floor: Vec<String> = cols
        .iter()
        .map(|c| {
            table
                .floors
                .iter()
                .find(|f| f.samples == c.samples)
                .map_or("—".into(), |f| {
                    format!("{:.2} [{:.2}, {:.2}]", f.fd, f.fd_ci.lo, f.fd_ci.hi)
                })
        })
        .collect();
    md += &format!(
        "| *real training images (floor)* | {} |\n",
        floor.join(" | ")
    );
    let counts: Vec<String> = cols.iter().map(|c| c.samples.to_string()).collect();
    md += &format!("| *images per cell* | {} |\n\n", counts.join(" | "));

    let k = table.classifiers.len();
    if k > 1 {
        let seeds: Vec<String> = (0..k).map(|i| i.to_string()).collect();
        md += &format!(
            "The same samples under each of the {k} classifiers (seeds {}; same architecture, data \
             and training, only the seed differs), FD-MNIST without intervals:\n\n",
            seeds.join(", ")
        );
        md += &head("σ_t");
        md += &grid(&|c| {
            let v: Vec<String> = c
                .fd_by_classifier
                .iter()
                .map(|f| format!("{f:.1}"))
                .collect();
            v.join(" / ")
        });
        md += "\n";
    }
    md += &format!(
        "Paired differences ΔFD = FD(row) − FD(other row) under classifier k, negative when the \
         first row is better; both rows use the same noise, and the {} interval resamples the \
         same image indices in both.\n\n",
        percent(CONFIDENCE)
    );
    md += &head("ΔFD-MNIST");
    for (row, against) in COMPARED {
        for i in 0..k {
            let vals: Vec<String> = cols
                .iter()
                .map(|c| {
                    table
                        .comparisons
                        .iter()
                        .find(|x| {
                            x.steps == c.steps
                                && x.row == row
                                && x.against == against
                                && x.classifier == i
                        })
                        .map_or("—".into(), |x| {
                            format!("{:+.2} [{:+.2}, {:+.2}]", x.diff, x.ci.lo, x.ci.hi)
                        })
                })
                .collect();
            md += &format!(
                "| {} − {}, k = {i} | {} |\n",
                row.name(),
                against.name(),
                vals.join(" | ")
            );
        }
    }
    md += "\n";
    if table.plan.bpd_images == 0 {
        // The published text names the flag; it stays as it was for byte-identical tables.
        md += "Bound: not measured (`--bpd-images 0`).\n";
    } else {
        md += &format!(
            "Bound (negative ELBO of the chain with that σ_t), bits/dim ± standard error over {} \
             held-out images (the same images and noise in every row of a column).\n\n",
            table.plan.bpd_images.min(table.heldout_images)
        );
        md += &head("σ_t");
        md += &grid(&|c| match (c.bits_per_dim, c.bits_per_dim_se) {
            (Some(b), Some(se)) => format!("{b:.3} ± {se:.3}"),
            _ => "—".into(),
        });
    }
    md += "\nClassifier entropies, nats: mean H(y|x) (sharpness; lower is more digit-like) / H(ȳ) \
           (diversity; ln 10 = 2.303 for balanced digits).\n\n";
    md += &head("σ_t");
    md += &grid(&|c| format!("{:.3} / {:.3}", c.entropy, c.marginal_entropy));
    md += "\nσ_t of each row on the full chain, with m_t = E‖ε − ε̂‖²/d.\n\n\
           | t | m_t | posterior | β_t | isotropic | estimated |\n|---|---|---|---|---|---|\n";
    for s in &table.sigmas {
        md += &format!(
            "| {} | {:.4} | {:.5} | {:.5} | {:.5} | {:.5} |\n",
            s.t, s.eps_mse, s.sigma[0], s.sigma[1], s.sigma[2], s.sigma[3]
        );
    }
    let secs: String = rows
        .iter()
        .map(|&r| {
            let v: Vec<String> = cols
                .iter()
                .map(|c| find(r, c.steps).map_or("—".into(), |x| format!("{:.0}", x.seconds)))
                .collect();
            format!("| {} | {} |\n", label(r), v.join(" | "))
        })
        .collect();
    md += &format!(
        "\nSeconds per cell (sampling and scoring):\n\n{}{}",
        head("σ_t"),
        secs
    );
    let accuracies: Vec<String> = table
        .classifiers
        .iter()
        .map(|c| format!("{:.1} %", 100.0 * c.heldout_accuracy))
        .collect();
    let first = &table.classifiers[0];
    md += &format!(
        "\nClassifiers (seed 0 scores the main table): {} held-out accuracy ({} training, {} held-out \
         images); data std s = {:.4}; m_t estimated in {:.0} s; whole table {:.0} s.\n",
        accuracies.join(" / "),
        first.train_images,
        first.heldout_images,
        table.data_std,
        table.eps_mse_seconds,
        table.seconds
    );
    md
}

/// The line a measured cell is announced with while the table runs.
pub fn cell_note(cell: &Cell) -> String {
    format!(
        "{} at {} steps: FD {:.2} [{:.2}, {:.2}], {} images in {:.0} s",
        cell.row.name(),
        cell.steps,
        cell.fd,
        cell.fd_ci.lo,
        cell.fd_ci.hi,
        cell.samples,
        cell.seconds
    )
}

/// A coverage level as the table states it: 0.95 → "95 %".
fn percent(level: f64) -> String {
    format!("{:.0} %", 100.0 * level)
}

/// The table as pretty-printed JSON (table.json).
pub fn json(table: &Table) -> Result<String> {
    serde_json::to_string_pretty(table).map_err(|e| DdpmError::Encode {
        what: "the quality table as JSON",
        cause: e.to_string(),
    })
}

/// Writes `out/table.json` and `out/table.md` and, with `doc`, the table into the document's
/// marked region (its grid links made relative to the document).
pub fn write_all(table: &Table, out: &Path, doc: Option<&Path>) -> Result<()> {
    write(&out.join("table.json"), &json(table)?)?;
    write(&out.join("table.md"), &markdown(table, ""))?;
    match doc {
        Some(doc) => insert_into(doc, &markdown(table, &link_prefix(doc, out))),
        None => Ok(()),
    }
}

/// The path from the document's directory to `out`, ending in '/'.
fn link_prefix(doc: &Path, out: &Path) -> String {
    let base = doc.parent().unwrap_or(Path::new(""));
    let rel = out.strip_prefix(base).unwrap_or(out);
    let s = rel.to_string_lossy();
    if s.is_empty() {
        String::new()
    } else {
        format!("{s}/")
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    crate::fsio::write_bytes_atomic(path, text.as_bytes())
}

/// Replaces the text between the markers of `doc` by `table`.
fn insert_into(doc: &Path, table: &str) -> Result<()> {
    let (text, b, e) = marked_region(doc)?;
    write(
        doc,
        &format!("{}{BEGIN}\n\n{table}\n{}", &text[..b], &text[e..]),
    )
}

/// The text of `doc` and the byte offsets of its two markers (the caller checks a document
/// before any work, so one without them fails at once rather than after the first column).
pub fn marked_region(doc: &Path) -> Result<(String, usize, usize)> {
    let text = std::fs::read_to_string(doc)
        .map_err(|e| DdpmError::io(format!("cannot read {}", doc.display()), e))?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        return Err(DdpmError::MarkedRegion {
            path: doc.to_path_buf(),
            reason: format!("has no {BEGIN} … {END} region"),
        });
    };
    if e < b {
        return Err(DdpmError::MarkedRegion {
            path: doc.to_path_buf(),
            reason: format!("has {END} before {BEGIN}"),
        });
    }
    Ok((text, b, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quality::classifier::ClassifierRecord;
    use crate::quality::scores::Interval;
    use crate::quality::table::{Column, Comparison, Floor, Plan, SigmaSample};

    /// A table with fixed numbers (no model): two columns, DDIM in the first only, one floor
    /// and one comparison missing, two classifiers; `bare` has no bound, one classifier.
    fn fixed_table(bare: bool) -> Table {
        let interval = |lo: f64, hi: f64| Interval {
            lo,
            hi,
            level: 0.95,
        };
        let record = |seed| ClassifierRecord {
            format: 1,
            config: crate::quality::classifier::ClassifierConfig {
                seed,
                ..Default::default()
            },
            data_sha256: "ab".into(),
            weights_sha256: "cd".into(),
            train_images: 4500,
            heldout_images: 500,
            heldout_accuracy: 0.98 + 0.001 * seed as f64,
        };
        let k = if bare { 1 } else { 2 };
        let columns = vec![
            Column {
                steps: 10,
                samples: 6,
            },
            Column {
                steps: 20,
                samples: 4,
            },
        ];
        let mut cells = Vec::new();
        for (i, &row) in Row::SIGMAS.iter().chain([Row::Ddim].iter()).enumerate() {
            for (j, col) in columns.iter().enumerate() {
                if row == Row::Ddim && j == 1 {
                    continue;
                }
                let fd = 10.0 + 3.25 * i as f64 - 1.125 * j as f64;
                let bpd = (row != Row::Ddim && !bare).then_some(1.5 + 0.0625 * (i + j) as f64);
                cells.push(Cell {
                    row,
                    steps: col.steps,
                    samples: col.samples,
                    fd,
                    fd_by_classifier: (0..k).map(|c| fd + 0.55 * c as f64).collect(),
                    fd_ci: interval(fd - 1.004, fd + 2.996),
                    entropy: 0.1234 + 0.01 * i as f64,
                    marginal_entropy: 2.2 - 0.005 * j as f64,
                    bits_per_dim: bpd,
                    bits_per_dim_se: bpd.map(|b| b / 100.0),
                    grid: format!("grids/{}-{}.png", row.name(), col.steps),
                    seconds: 12.5 + i as f64,
                });
            }
        }
        let mut comparisons = Vec::new();
        for (p, (row, against)) in COMPARED.into_iter().enumerate() {
            for col in &columns {
                for classifier in 0..k {
                    if p == 2 && col.steps == 20 && classifier == 0 {
                        continue;
                    }
                    let diff = -0.5 + 0.75 * p as f64 + 0.1 * classifier as f64;
                    comparisons.push(Comparison {
                        steps: col.steps,
                        classifier,
                        row,
                        against,
                        diff,
                        ci: interval(diff - 0.333, diff + 0.666),
                    });
                }
            }
        }
        Table {
            plan: Plan {
                columns,
                ddim_steps: if bare { vec![] } else { vec![10] },
                bpd_images: if bare { 0 } else { 600 },
                bootstrap_reps: 200,
                batch: 250,
                grid_images: 64,
                seed: 0,
                clip_each_step: true,
            },
            classifiers: (0..k as u64).map(record).collect(),
            data_std: 0.61234,
            heldout_images: 500,
            cells,
            floors: vec![Floor {
                samples: 6,
                fd: 1.875,
                fd_ci: interval(1.5, 2.25),
            }],
            comparisons,
            sigmas: [1i64, 10, 20]
                .into_iter()
                .map(|t| SigmaSample {
                    t,
                    eps_mse: 0.5 / t as f64,
                    sigma: [0.01, 0.02, 0.03, 0.04].map(|s| s * t as f64),
                })
                .collect(),
            eps_mse_seconds: 41.6,
            seconds: 1234.5,
        }
    }

    /// The Markdown and JSON of fixed numbers, byte for byte (docs/quality.md embeds the one,
    /// scripts read the other).
    #[test]
    fn a_fixed_table_renders_byte_for_byte() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/quality/testdata");
        let check = |name: &str, got: String| {
            let path = format!("{dir}/{name}");
            if std::env::var_os("DDPM_BLESS").is_some() {
                std::fs::write(&path, &got).unwrap();
            }
            let want = std::fs::read_to_string(&path).unwrap();
            assert!(got == want, "{name} differs:\n{got}");
        };
        check("table.md", markdown(&fixed_table(false), "quality/"));
        check("table-bare.md", markdown(&fixed_table(true), ""));
        check("table.json", json(&fixed_table(false)).unwrap());
    }

    #[test]
    fn links_are_relative_to_the_document() {
        assert_eq!(
            link_prefix(Path::new("docs/quality.md"), Path::new("docs/quality")),
            "quality/"
        );
        assert_eq!(
            link_prefix(Path::new("quality.md"), Path::new("out")),
            "out/"
        );
    }

    #[test]
    fn the_table_replaces_only_the_marked_region() {
        let dir = crate::data::test_dir("quality_doc");
        let doc = dir.join("q.md");
        std::fs::write(&doc, format!("intro\n{BEGIN}\nold\n{END}\nreading\n")).unwrap();
        insert_into(&doc, "| new |\n").unwrap();
        insert_into(&doc, "| newer |\n").unwrap();
        let text = std::fs::read_to_string(&doc).unwrap();
        assert_eq!(
            text,
            format!("intro\n{BEGIN}\n\n| newer |\n\n{END}\nreading\n")
        );
        std::fs::write(&doc, "no markers").unwrap();
        assert!(matches!(
            insert_into(&doc, "x"),
            Err(DdpmError::MarkedRegion { .. })
        ));
        std::fs::write(&doc, format!("{END}\n{BEGIN}\n")).unwrap();
        assert!(matches!(
            marked_region(&doc),
            Err(DdpmError::MarkedRegion { .. })
        ));
    }
}
