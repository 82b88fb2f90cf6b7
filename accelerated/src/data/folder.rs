//! Any folder of PNG/JPEG images (CelebA-HQ style): each image centre-cropped to a square,
//! resized to the target side, converted to grey or RGB, and kept as 8-bit pixels.

use super::Dataset;
use crate::error::{DdpmError, Result};
use image::imageops::FilterType;
use image::DynamicImage;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Colour channels the images are converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channels {
    /// One channel (luma).
    #[default]
    Grey,
    /// Three channels.
    Rgb,
}

impl Channels {
    /// Number of channels C.
    pub fn count(self) -> i64 {
        match self {
            Channels::Grey => 1,
            Channels::Rgb => 3,
        }
    }
}

/// The image files directly inside `dir` (`.png`, `.jpg`, `.jpeg`, any case), sorted by name
/// so that the data order, and hence a seeded run, does not depend on the file system.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(DdpmError::BadData {
            set: format!("the image folder {}", dir.display()),
            reason: "does not exist or is not a directory".into(),
        });
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| DdpmError::io(format!("cannot list {}", dir.display()), e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| DdpmError::io(format!("cannot list {}", dir.display()), e))?
            .path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"));
        if is_image && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(DdpmError::BadData {
            set: format!("the image folder {}", dir.display()),
            reason: "holds no .png/.jpg/.jpeg files".into(),
        });
    }
    files.sort();
    Ok(files)
}

/// Loads every image of `dir` as `[N, C, side, side]` 8-bit pixels, decoding on all cores.
/// Errors name the file that cannot be decoded or is smaller than `side`.
pub fn load(dir: &Path, side: u32, channels: Channels) -> Result<Dataset> {
    if side == 0 {
        return Err(DdpmError::OutOfRange {
            key: "side",
            value: "0".into(),
            expected: "positive".into(),
        });
    }
    let files = image_files(dir)?;
    let images = decode(dir, &files, side, channels)?;
    Dataset::from_pixels(images, format!("image folder {}", dir.display()))
}

/// The class subfolders of `dir` (every directory directly inside it whose name does not
/// start with `.`), sorted by name: their names are the classes, in label order.
pub fn class_folders(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let set = || format!("the image folder {}", dir.display());
    if !dir.is_dir() {
        return Err(DdpmError::BadData {
            set: set(),
            reason: "does not exist or is not a directory".into(),
        });
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| DdpmError::io(format!("cannot list {}", dir.display()), e))?;
    let mut classes = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| DdpmError::io(format!("cannot list {}", dir.display()), e))?
            .path();
        let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
        match name {
            Some(name) if path.is_dir() && !name.starts_with('.') => classes.push((name, path)),
            None if path.is_dir() => {
                return Err(DdpmError::BadData {
                    set: set(),
                    reason: format!(
                        "the subfolder {} has a name that is not UTF-8 (class names must be text)",
                        path.display()
                    ),
                })
            }
            _ => {}
        }
    }
    classes.sort();
    Ok(classes)
}

/// A labelled folder for conditional training: one subfolder a class (see
/// [`class_folders`]), each holding its images; the classes are the subfolders' names sorted,
/// the samples class after class, each class's files sorted by name. Images directly inside
/// `dir` are refused (they belong to no class), so is a folder without subfolders.
pub fn load_classes(dir: &Path, side: u32, channels: Channels) -> Result<Dataset> {
    if side == 0 {
        return Err(DdpmError::OutOfRange {
            key: "side",
            value: "0".into(),
            expected: "positive".into(),
        });
    }
    let classes = class_folders(dir)?;
    if classes.is_empty() {
        return Err(DdpmError::NotConditional {
            what: format!("the image folder {}", dir.display()),
            reason: "it has no subfolders, one a class".into(),
            advice: "put each class's images in a subfolder named after the class, or train without train.conditional (--conditional)".into(),
        });
    }
    if let Ok(loose) = image_files(dir) {
        return Err(DdpmError::BadData {
            set: format!("the image folder {}", dir.display()),
            reason: format!(
                "holds {} images outside its class subfolders ({}, …): move each into its class's subfolder",
                loose.len(),
                loose[0].display()
            ),
        });
    }
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for (k, (_, path)) in classes.iter().enumerate() {
        let these = image_files(path)?;
        labels.extend(std::iter::repeat_n(k as i64, these.len()));
        files.extend(these);
    }
    let images = decode(dir, &files, side, channels)?;
    Dataset::from_pixels(images, format!("image folder {}", dir.display()))?
        .with_labels(&labels, classes.into_iter().map(|(n, _)| n).collect())
}

/// `files` decoded on all cores as `[N, C, side, side]` 8-bit pixels; `dir` names the set.
fn decode(dir: &Path, files: &[PathBuf], side: u32, channels: Channels) -> Result<Tensor> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len());
    let chunk = files.len().div_ceil(workers);
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || -> Result<Vec<u8>> {
                    let mut out = Vec::with_capacity(
                        part.len() * (side * side) as usize * channels.count() as usize,
                    );
                    for path in part {
                        out.extend(prepare(path, side, channels)?);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(DdpmError::BadData {
                        set: format!("the image folder {}", dir.display()),
                        reason: "an image decoder thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut pixels = Vec::new();
    for part in parts {
        pixels.extend(part?);
    }
    let (n, s, c) = (files.len() as i64, side as i64, channels.count());
    // Decoded images are height × width × channel; the model wants channel first.
    Ok(Tensor::from_slice(&pixels)
        .view([n, s, s, c])
        .permute([0, 3, 1, 2])
        .contiguous())
}

/// One image as `side × side × C` bytes: centre-cropped to a square, resized, converted.
pub fn prepare(path: &Path, side: u32, channels: Channels) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| DdpmError::io(format!("cannot open image {}", path.display()), e))?
        .with_guessed_format()
        .map_err(|e| DdpmError::io(format!("cannot read image {}", path.display()), e))?
        .decode()
        .map_err(|cause| DdpmError::Image {
            path: path.to_path_buf(),
            cause,
        })?;
    let (w, h) = (img.width(), img.height());
    if w.min(h) < side {
        return Err(DdpmError::BadData {
            set: format!("image {}", path.display()),
            reason: format!("is {w}×{h}, smaller than the target size {side}×{side} (choose a smaller model.image_size or remove it)"),
        });
    }
    let square = w.min(h);
    let cropped = img.crop_imm((w - square) / 2, (h - square) / 2, square, square);
    let resized = if square == side {
        cropped
    } else {
        cropped.resize_exact(side, side, FilterType::Lanczos3)
    };
    Ok(match channels {
        Channels::Grey => DynamicImage::ImageLuma8(resized.to_luma8()).into_bytes(),
        Channels::Rgb => DynamicImage::ImageRgb8(resized.to_rgb8()).into_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;
    use image::{Rgb, RgbImage};

    /// A w×h image whose left half is red and right half blue.
    fn picture(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    #[test]
    fn crops_the_centre_and_resizes() {
        let dir = test_dir("folder_ok");
        // 12×4: the centre 4×4 square spans x = 4..8, half red and half blue.
        picture(12, 4).save(dir.join("b.png")).unwrap();
        picture(8, 8).save(dir.join("a.PNG")).unwrap();
        std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
        let d = load(&dir, 4, Channels::Rgb).unwrap();
        assert_eq!((d.len(), d.item_shape()), (2, vec![3, 4, 4]));
        let raw = d.raw(&[0, 1]).unwrap();
        for i in 0..2 {
            let red = Vec::<u8>::try_from(raw.get(i).get(0).get(0)).unwrap();
            let blue = Vec::<u8>::try_from(raw.get(i).get(2).get(0)).unwrap();
            assert_eq!((red[0], red[3]), (255, 0), "image {i}");
            assert_eq!((blue[0], blue[3]), (0, 255), "image {i}");
        }
        let g = load(&dir, 2, Channels::Grey).unwrap();
        assert_eq!(g.item_shape(), vec![1, 2, 2]);
    }

    /// A tall image is cropped to its vertical centre as a wide one is to its horizontal one.
    #[test]
    fn crops_the_centre_of_a_tall_image() {
        let dir = test_dir("folder_tall");
        // 4×12, top half red: the centre 4×4 square spans y = 4..8, two rows of each.
        RgbImage::from_fn(4, 12, |_, y| {
            if y < 6 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
        .save(dir.join("tall.png"))
        .unwrap();
        let raw = load(&dir, 4, Channels::Rgb).unwrap().raw(&[0]).unwrap();
        let red_column = Vec::<u8>::try_from(raw.get(0).get(0).select(1, 0)).unwrap();
        assert_eq!(red_column, [255, 255, 0, 0]);
    }

    /// The classes are the subfolders, sorted by name; hidden folders and files are not
    /// classes, a file whose name is not UTF-8 is passed over, a subfolder's is an error.
    #[test]
    fn class_folders_are_the_visible_subfolders_sorted() {
        use std::os::unix::ffi::OsStrExt;
        let dir = test_dir("class_folders");
        for sub in ["b", "a", ".hidden"] {
            std::fs::create_dir(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("c"), "a file").unwrap();
        std::fs::write(dir.join(std::ffi::OsStr::from_bytes(b"f\xff")), "x").unwrap();
        let classes = class_folders(&dir).unwrap();
        assert_eq!(
            classes,
            [
                ("a".to_string(), dir.join("a")),
                ("b".to_string(), dir.join("b"))
            ]
        );
        std::fs::create_dir(dir.join(std::ffi::OsStr::from_bytes(b"d\xff"))).unwrap();
        let err = class_folders(&dir).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
        let err = class_folders(&dir.join("a").join("none")).unwrap_err();
        assert!(matches!(err, DdpmError::BadData { .. }), "{err}");
    }

    /// A labelled folder: the samples class after class, each labelled with its subfolder's
    /// rank; a side of 0 is refused.
    #[test]
    fn a_labelled_folder_labels_each_image_by_its_subfolder() {
        let dir = test_dir("load_classes");
        for (class, n) in [("cats", 2), ("ants", 1)] {
            std::fs::create_dir(dir.join(class)).unwrap();
            for i in 0..n {
                picture(4, 4)
                    .save(dir.join(class).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        let d = load_classes(&dir, 4, Channels::Grey).unwrap();
        assert_eq!(
            d.class_names(),
            Some(&["ants".to_string(), "cats".to_string()][..])
        );
        let labels = d.labels_at(&[0, 1, 2]).unwrap().unwrap();
        assert_eq!(Vec::<i64>::try_from(labels).unwrap(), [0, 1, 1]);
        let err = load_classes(&dir, 0, Channels::Grey).unwrap_err();
        assert!(
            matches!(err, DdpmError::OutOfRange { key: "side", .. }),
            "{err}"
        );
    }

    #[test]
    fn clear_errors_for_bad_folders_and_files() {
        let bad_data = |err: &DdpmError, needle: &str| matches!(err, DdpmError::BadData { set, reason } if format!("{set} {reason}").contains(needle));
        let missing = load(Path::new("/nonexistent/celeba"), 8, Channels::Rgb).unwrap_err();
        assert!(bad_data(&missing, "does not exist"), "{missing}");

        let empty = test_dir("folder_empty");
        let err = load(&empty, 8, Channels::Rgb).unwrap_err();
        assert!(bad_data(&err, "no .png"), "{err}");

        let small = test_dir("folder_small");
        picture(6, 9).save(small.join("tiny.png")).unwrap();
        let err = load(&small, 8, Channels::Rgb).unwrap_err();
        assert!(bad_data(&err, "tiny.png is 6×9"), "{err}");

        let broken = test_dir("folder_truncated");
        picture(16, 16).save(broken.join("whole.png")).unwrap();
        let bytes = std::fs::read(broken.join("whole.png")).unwrap();
        std::fs::write(broken.join("cut.png"), &bytes[..bytes.len() / 2]).unwrap();
        let err = load(&broken, 8, Channels::Rgb).unwrap_err().to_string();
        assert!(err.contains("cut.png"), "{err}");
    }
}
