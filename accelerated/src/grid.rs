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

/// The most a grid is scaled up (`sample.grid_scale`): 16 makes a 128-pixel image 2048 pixels
/// wide, past which a grid stops fitting a screen and grows to hundreds of MB.
pub const MAX_SCALE: u32 = 16;

/// `[C, H, W]` pixels scaled up `s` times by nearest neighbour: each pixel becomes an `s`×`s`
/// block, so pixel (i, j) of the result is pixel (i / s, j / s) of `pixels`, exactly (the
/// gaps of a grid scale too). `s` = 1 returns the pixels as they are.
pub fn scale_up(pixels: &Tensor, s: u32) -> Result<Tensor> {
    if !(1..=MAX_SCALE).contains(&s) {
        return Err(DdpmError::OutOfRange {
            key: "scale",
            value: s.to_string(),
            expected: format!("between 1 and {MAX_SCALE}"),
        });
    }
    let size = pixels.size();
    if size.len() != 3 {
        return Err(DdpmError::ShapeMismatch {
            what: "the pixels to scale up",
            expected: "[C, H, W]".into(),
            got: size,
        });
    }
    if s == 1 {
        return Ok(pixels.shallow_clone());
    }
    let s = i64::from(s);
    Ok(pixels
        .f_repeat_interleave_self_int(s, Some(1), None)?
        .f_repeat_interleave_self_int(s, Some(2), None)?)
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

/// [`save_grid`] scaled up `scale` times by nearest neighbour (see [`scale_up`]): at 4, a
/// 28-pixel digit is 112 pixels and the 2-pixel gaps between cells are 8.
pub fn save_grid_scaled(
    images: &Tensor,
    path: &Path,
    columns: Option<i64>,
    scale: u32,
) -> Result<()> {
    write_png(&scale_up(&tile(images, columns)?, scale)?, path)
}

/// Writes each of `[N, C, H, W]` images in [−1, 1] as `dir/NNNNN.png`, numbered from `first`
/// (five digits at least; more past 99999), each through the atomic writer.
pub fn save_each(images: &Tensor, dir: &Path, first: usize) -> Result<()> {
    let px = to_pixels(images)?;
    for i in 0..px.size()[0] {
        let name = format!("{:05}.png", first + i as usize);
        write_png(&px.f_get(i)?, &dir.join(name))?;
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
        save_each(&rgb, &dir.join("each"), 0).unwrap();
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
    /// Row-major bytes of `[C, H, W]` Uint8 pixels.
    fn bytes(px: &Tensor) -> Vec<u8> {
        Vec::<u8>::try_from(px.contiguous().view([-1])).unwrap()
    }

    #[test]
    fn a_scaled_grid_is_the_raw_grid_in_blocks_of_s_by_s_pixels() {
        // Sizes (n, c, h, w) and scales over a small lattice; deterministic pixel values.
        for (n, c, h, w) in [(1, 1, 3, 5), (5, 3, 2, 3), (7, 1, 4, 4), (4, 3, 1, 6)] {
            let count = n * c * h * w;
            let imgs = Tensor::linspace(-1.0, 1.0, count, (Kind::Float, Device::Cpu))
                .view([n, c, h, w])
                .index_select(0, &Tensor::from_slice(&(0..n).rev().collect::<Vec<i64>>()));
            let raw = tile(&imgs, None).unwrap();
            let [_, rh, rw] = raw.size()[..] else {
                unreachable!()
            };
            let raw_bytes = bytes(&raw);
            for s in [1u32, 2, 3, 4, 7] {
                let big = scale_up(&raw, s).unwrap();
                let s = i64::from(s);
                assert_eq!(big.size(), vec![c, rh * s, rw * s]);
                let big_bytes = bytes(&big);
                for ch in 0..c {
                    for i in 0..rh * s {
                        for j in 0..rw * s {
                            let got = big_bytes[((ch * rh * s + i) * rw * s + j) as usize];
                            let want = raw_bytes[((ch * rh + i / s) * rw + j / s) as usize];
                            assert_eq!(got, want, "n {n} c {c} s {s} at ({ch}, {i}, {j})");
                        }
                    }
                }
            }
        }
        for s in [0, MAX_SCALE + 1] {
            let raw = Tensor::zeros([1, 2, 2], (Kind::Uint8, Device::Cpu));
            assert!(matches!(
                scale_up(&raw, s),
                Err(DdpmError::OutOfRange { key: "scale", .. })
            ));
        }
    }

    #[test]
    fn a_scaled_grid_png_has_the_scaled_size() {
        let dir = test_dir("grid_scaled_png");
        let grey = Tensor::linspace(-1.0, 1.0, 6 * 28 * 28, (Kind::Float, Device::Cpu))
            .view([6, 1, 28, 28]);
        save_grid_scaled(&grey, &dir.join("g.png"), Some(3), 4).unwrap();
        let back = image::open(dir.join("g.png")).unwrap().to_luma8();
        let (w, h) = (3 * (28 + GAP) + GAP, 2 * (28 + GAP) + GAP);
        assert_eq!((back.width(), back.height()), (4 * w as u32, 4 * h as u32));
        // The last image's last pixel (x = 1, so 255) fills a 4×4 block, then the 8-pixel gap.
        let x = 4 * (GAP + 2 * (28 + GAP) + 27) as u32;
        let y = 4 * (GAP + (28 + GAP) + 27) as u32;
        for (dx, dy) in [(0, 0), (3, 0), (0, 3), (3, 3)] {
            assert_eq!(back.get_pixel(x + dx, y + dy).0, [255]);
        }
        assert_eq!(back.get_pixel(x + 4, y).0, [0]);
        assert_eq!(back.get_pixel(x, y + 4).0, [0]);
    }
}
