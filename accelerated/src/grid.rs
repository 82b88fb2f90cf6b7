//! Images in model space [−1, 1] written as PNG: a grid of many, or one file each.

use crate::error::{DdpmError, Result};
use image::{ExtendedColorType, ImageFormat};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Pixels between grid cells (and around the grid), drawn black.
const GAP: i64 = 2;

/// x ∈ [−1, 1] ↦ k = round((x + 1)·255/2) ∈ 0..=255 (values outside are clipped), as
/// Uint8 on the CPU — the inverse of [`crate::data::pixels_to_model`].
pub fn to_pixels(images: &Tensor) -> Result<Tensor> {
    Ok(images
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_clamp(-1.0, 1.0)?
        .f_add_scalar(1.0)?
        .f_mul_scalar(255.0 / 2.0)?
        .f_round()?
        .f_to_kind(Kind::Uint8)?)
}

/// Arranges `[N, C, H, W]` images (C = 1 grey or 3 RGB) in rows of `columns` (default
/// ceil(sqrt N)) as one `[C, rows·(H+gap)+gap, columns·(W+gap)+gap]` Uint8 tensor.
pub fn tile(images: &Tensor, columns: Option<i64>) -> Result<Tensor> {
    let size = images.size();
    let [n, c, h, w] = size[..] else {
        return Err(DdpmError::ShapeMismatch {
            what: "the images of a grid",
            expected: "[N, C, H, W]".into(),
            got: size,
        });
    };
    if n == 0 || !(c == 1 || c == 3) {
        return Err(DdpmError::ShapeMismatch {
            what: "the images of a grid",
            expected: "N ≥ 1 images with 1 or 3 channels".into(),
            got: size,
        });
    }
    let cols = columns
        .unwrap_or_else(|| (n as f64).sqrt().ceil() as i64)
        .clamp(1, n);
    let rows = (n + cols - 1) / cols;
    let px = to_pixels(images)?;
    // Blank cells fill the last row; each cell gets a gap on its top and left.
    let filled = Tensor::f_cat(
        &[
            px,
            Tensor::zeros([rows * cols - n, c, h, w], (Kind::Uint8, Device::Cpu)),
        ],
        0,
    )?;
    let cells = filled.f_constant_pad_nd([GAP, 0, GAP, 0])?;
    let (ch, cw) = (h + GAP, w + GAP);
    let grid = cells
        .f_view([rows, cols, c, ch, cw])?
        .f_permute([2, 0, 3, 1, 4])?
        .f_reshape([c, rows * ch, cols * cw])?;
    Ok(grid.f_constant_pad_nd([0, GAP, 0, GAP])?)
}

/// Writes `[C, H, W]` Uint8 pixels (C = 1 or 3) as a PNG file.
pub fn write_png(pixels: &Tensor, path: &Path) -> Result<()> {
    let size = pixels.size();
    let [c, h, w] = size[..] else {
        return Err(DdpmError::ShapeMismatch {
            what: "the pixels of a PNG",
            expected: "[C, H, W]".into(),
            got: size,
        });
    };
    let color = match c {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        _ => {
            return Err(DdpmError::ShapeMismatch {
                what: "the pixels of a PNG",
                expected: "1 or 3 channels".into(),
                got: size,
            })
        }
    };
    let hwc = pixels.f_permute([1, 2, 0])?.f_contiguous()?;
    let bytes = Vec::<u8>::try_from(hwc.f_reshape([-1])?)?;
    // Encoded in memory, then written by the one checked, atomic writer: a full disk or a
    // kill never leaves a 0-byte or truncated PNG under `path`.
    let mut png = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(
        &mut png,
        &bytes,
        w as u32,
        h as u32,
        color,
        ImageFormat::Png,
    )
    .map_err(|e| DdpmError::Encode {
        what: "a PNG",
        cause: e.to_string(),
    })?;
    crate::fsio::write_bytes_atomic(path, png.get_ref())
}

/// Errors now, before minutes of sampling, unless a file can be written at `path`; creates
/// its directory. Leaves no file behind that was not there.
pub fn ensure_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(DdpmError::io(
            format!("cannot write {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "it is a directory"),
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        ensure_dir(dir)?;
    }
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| DdpmError::io(format!("cannot write {}", path.display()), e))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Creates the directory `dir` (and its parents), saying so when a file is in the way.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        let hint = if dir.exists() || e.kind() == std::io::ErrorKind::NotADirectory {
            " (a file stands where a directory is needed)"
        } else {
            ""
        };
        DdpmError::io(
            format!("cannot create the directory {}{hint}", dir.display()),
            e,
        )
    })
}

/// Writes `[N, C, H, W]` images in [−1, 1] as one PNG grid.
pub fn save_grid(images: &Tensor, path: &Path, columns: Option<i64>) -> Result<()> {
    write_png(&tile(images, columns)?, path)
}

/// Writes each of `[N, C, H, W]` images in [−1, 1] as `dir/NNNNN.png`.
pub fn save_each(images: &Tensor, dir: &Path) -> Result<()> {
    let px = to_pixels(images)?;
    for i in 0..px.size()[0] {
        write_png(&px.get(i), &dir.join(format!("{i:05}.png")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    #[test]
    fn places_each_image_in_its_cell() {
        // Five 2×3 RGB images with constant value i/4·2 − 1 (pixel 0, 64, 128, 191, 255).
        let levels = Tensor::linspace(-1.0, 1.0, 5, (Kind::Float, Device::Cpu));
        let imgs = levels.view([5, 1, 1, 1]).expand([5, 3, 2, 3], false);
        let g = tile(&imgs, Some(3)).unwrap();
        assert_eq!(g.size(), vec![3, 2 * (2 + GAP) + GAP, 3 * (3 + GAP) + GAP]);
        let at = |r: i64, c: i64| {
            u8::try_from(g.get(1).get(GAP + r * (2 + GAP)).get(GAP + c * (3 + GAP))).unwrap()
        };
        assert_eq!(
            [at(0, 0), at(0, 1), at(0, 2), at(1, 0), at(1, 1), at(1, 2)],
            [0, 64, 128, 191, 255, 0]
        );
        assert_eq!(u8::try_from(g.get(0).get(0).get(0)).unwrap(), 0);
    }

    #[test]
    fn writes_grey_and_rgb_pngs_that_read_back() {
        let dir = test_dir("grid_png");
        // Deterministic values: unit tests must not draw from libtorch's shared generator.
        let grey = Tensor::linspace(-1.0, 1.0, 100, (Kind::Float, Device::Cpu)).view([4, 1, 5, 5]);
        save_grid(&grey, &dir.join("g.png"), None).unwrap();
        let back = image::open(dir.join("g.png")).unwrap();
        assert_eq!((back.width(), back.height()), (2 * 7 + 2, 2 * 7 + 2));
        assert_eq!(back.color(), image::ColorType::L8);
        let rgb = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        save_each(&rgb, &dir.join("each")).unwrap();
        let one = image::open(dir.join("each").join("00001.png"))
            .unwrap()
            .to_rgb8();
        assert_eq!(one.get_pixel(0, 0).0, [128, 128, 128]);
        assert!(tile(
            &Tensor::zeros([2, 2, 4, 4], (Kind::Float, Device::Cpu)),
            None
        )
        .is_err());
    }
}
