//! The loss curve of a run, `loss.png` beside `metrics.jsonl`: the logged mean loss against
//! the step, redrawn at every log interval.
//!
//! plotters draws into an RGB buffer in memory (`BitMapBackend::with_buffer`); the image
//! crate encodes it as PNG and [`crate::fsio`] writes it atomically, so a reader never finds a
//! partial `loss.png`. Text (title, axis names, tick labels) is rendered with ab_glyph from a
//! font embedded in the crate (`accelerated/assets/`, a cut-down DejaVu Sans): no system
//! font library and no font files are needed. The y axis is logarithmic when the loss spans
//! a decade or more (the first steps of a run are far above the rest), linear otherwise.
//! `metrics.jsonl` holds one mean loss a log interval and no smoothed loss, so one curve is
//! drawn; steps whose loss was not finite (written as null) are left out.

use crate::error::{DdpmError, Result};
use image::{ExtendedColorType, ImageFormat};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Width of the loss curve PNG, in pixels.
pub const WIDTH: u32 = 800;
/// Height of the loss curve PNG, in pixels.
pub const HEIGHT: u32 = 480;
/// The curve's colour (a blue no text or axis uses).
pub const CURVE: [u8; 3] = [31, 119, 180];
/// The file name of the loss curve in a run directory.
pub const FILE_NAME: &str = "loss.png";

/// Printable ASCII (and · – — −) of DejaVu Sans 2.37; licence in accelerated/assets/.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");
/// The family name the embedded font is registered under.
const FAMILY: &str = "sans-serif";

/// The loss curve of the run in `run_dir`.
pub fn loss_curve_path(run_dir: &Path) -> PathBuf {
    run_dir.join(FILE_NAME)
}

/// Registers the embedded font with plotters, once per process.
fn font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(encode_error("the embedded font does not parse"))
    }
}

fn encode_error(cause: impl ToString) -> DdpmError {
    DdpmError::Encode {
        what: "the loss curve",
        cause: cause.to_string(),
    }
}

/// The points of `points` that can be drawn: finite losses (positive ones on a log axis).
fn drawable(points: &[(u64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter(|(_, loss)| loss.is_finite() && *loss >= 0.0)
        .map(|&(step, loss)| (step as f64, loss))
        .collect()
}

/// Whether the loss spans a decade or more (then the y axis is logarithmic).
pub fn spans_decades(points: &[(u64, f64)]) -> bool {
    let losses: Vec<f64> = drawable(points).into_iter().map(|(_, y)| y).collect();
    let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    lo > 0.0 && hi / lo >= 10.0
}

/// The loss curve of `points` ((step, loss) as logged) as `WIDTH`×`HEIGHT` RGB bytes, row
/// by row; `None` when fewer than 2 points can be drawn (nothing to show yet).
pub fn render(points: &[(u64, f64)]) -> Result<Option<Vec<u8>>> {
    let log_y = spans_decades(points);
    let pts: Vec<(f64, f64)> = drawable(points)
        .into_iter()
        .filter(|&(_, y)| !log_y || y > 0.0)
        .collect();
    if pts.len() < 2 {
        return Ok(None);
    }
    font()?;
    let x0 = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x1 = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(encode_error)?;
        let title = format!(
            "training loss ({} logged steps, last {})",
            pts.len(),
            short(pts[pts.len() - 1].1)
        );
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64);
        let curve = RGBColor(CURVE[0], CURVE[1], CURVE[2]).stroke_width(2);
        // The two axes differ in type, so the drawing is spelt out once per kind.
        macro_rules! draw {
            ($y:expr, $y_name:expr) => {{
                let mut chart = builder
                    .build_cartesian_2d(x0..x1, $y)
                    .map_err(encode_error)?;
                chart
                    .configure_mesh()
                    .x_desc("step")
                    .y_desc($y_name)
                    .x_label_formatter(&|x| format!("{}", x.round() as i64))
                    .y_label_formatter(&|y| short(*y))
                    .label_style((FAMILY, 13))
                    .axis_desc_style((FAMILY, 15))
                    .x_labels(10)
                    .y_labels(12)
                    .light_line_style(WHITE)
                    .bold_line_style(RGBColor(220, 220, 220))
                    .draw()
                    .map_err(encode_error)?;
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), curve))
                    .map_err(encode_error)?;
            }};
        }
        if log_y {
            let (y0, y1) = (lo / 1.25, hi * 1.25);
            draw!(
                (y0..y1).log_scale().with_key_points(log_ticks(y0, y1)),
                "loss (log scale)"
            );
        } else {
            let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.02).max(1e-12);
            draw!((lo - pad).max(0.0)..hi + pad, "loss");
        }
        root.present().map_err(encode_error)?;
    }
    Ok(Some(buf))
}

/// 1, 2 and 5 times the powers of ten in [lo, hi] (lo > 0): the labels of a log axis, which
/// plotters' own choice leaves out below the top decade.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    (first..=last)
        .flat_map(|k| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(k)))
        .filter(|v| (lo..=hi).contains(v))
        .collect()
}

/// `x` with three significant digits, without a long tail of zeros (1.23e4 as 12300).
fn short(x: f64) -> String {
    if x != 0.0 && (x.abs() >= 1e6 || x.abs() < 1e-3) {
        format!("{x:.2e}")
    } else {
        let digits = (2 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
        let s = format!("{x:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// Draws the loss curve of `points` and writes it as a PNG at `path` (atomically, see
/// [`crate::fsio`]); returns `false`, writing nothing, when fewer than 2 points can be drawn.
pub fn write_loss_curve(points: &[(u64, f64)], path: &Path) -> Result<bool> {
    let Some(rgb) = render(points)? else {
        return Ok(false);
    };
    let mut png = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(
        &mut png,
        &rgb,
        WIDTH,
        HEIGHT,
        ExtendedColorType::Rgb8,
        ImageFormat::Png,
    )
    .map_err(encode_error)?;
    crate::fsio::write_bytes_atomic(path, png.get_ref())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    /// The rows (0 = top) of the curve's pixels in column `x`.
    fn curve_rows(rgb: &[u8], x: u32) -> Vec<u32> {
        (0..HEIGHT)
            .filter(|&y| {
                let i = ((y * WIDTH + x) * 3) as usize;
                rgb[i..i + 3] == CURVE
            })
            .collect()
    }

    /// The leftmost and rightmost columns holding curve pixels.
    fn curve_columns(rgb: &[u8]) -> (u32, u32) {
        let cols: Vec<u32> = (0..WIDTH)
            .filter(|&x| !curve_rows(rgb, x).is_empty())
            .collect();
        (cols[0], cols[cols.len() - 1])
    }

    fn mean_row(rgb: &[u8], x: u32) -> f64 {
        let rows = curve_rows(rgb, x);
        assert!(!rows.is_empty(), "no curve pixel in column {x}");
        rows.iter().map(|&r| r as f64).sum::<f64>() / rows.len() as f64
    }

    #[test]
    fn a_falling_loss_is_drawn_falling_from_left_to_right() {
        // 40 → 20 linearly over steps 10..=1000: a linear axis (less than a decade).
        let points: Vec<(u64, f64)> = (1..=100)
            .map(|k| (10 * k, 40.0 - 20.0 * (k - 1) as f64 / 99.0))
            .collect();
        assert!(!spans_decades(&points));
        let rgb = render(&points).unwrap().unwrap();
        assert_eq!(rgb.len(), (WIDTH * HEIGHT * 3) as usize);
        let (left, right) = curve_columns(&rgb);
        assert!(right - left > WIDTH / 2, "the curve spans {left}..{right}");
        let span = (right - left) as f64;
        let at = |f: f64| mean_row(&rgb, left + (f * span) as u32);
        let (near_left, middle, near_right) = (at(0.1), at(0.5), at(0.9));
        // Higher on the image (a smaller row) at the left, where the loss is larger.
        assert!(
            near_left + 50.0 < near_right,
            "left row {near_left}, right row {near_right}"
        );
        // A straight line on a linear axis: the middle halfway between.
        let halfway = (near_left + near_right) / 2.0;
        assert!(
            (middle - halfway).abs() < 4.0,
            "middle {middle} vs {halfway}"
        );
    }

    #[test]
    fn a_loss_spanning_decades_gets_a_log_axis() {
        // 1000 · 10^(−k/50): three decades, a straight line on a log axis only.
        let points: Vec<(u64, f64)> = (0..=150)
            .map(|k| (k + 1, 1000.0 * 10f64.powf(-(k as f64) / 50.0)))
            .collect();
        assert!(spans_decades(&points));
        let rgb = render(&points).unwrap().unwrap();
        let (left, right) = curve_columns(&rgb);
        let span = (right - left) as f64;
        let at = |f: f64| mean_row(&rgb, left + (f * span) as u32);
        let (a, m, b) = (at(0.1), at(0.5), at(0.9));
        assert!(a + 100.0 < b, "rows {a}, {b}");
        // On a linear axis the middle (loss ≈ 32, 3 % of the top) would sit near the bottom.
        assert!(
            (m - (a + b) / 2.0).abs() < 4.0,
            "middle {m} vs {}",
            (a + b) / 2.0
        );
    }

    #[test]
    fn text_is_drawn_with_the_embedded_font() {
        let points = [(1, 5.0), (2, 4.0)];
        let rgb = render(&points).unwrap().unwrap();
        // The title is centred in the top band: dark, anti-aliased pixels there.
        let dark = (0..30u32)
            .flat_map(|y| (WIDTH / 4..3 * WIDTH / 4).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let i = ((y * WIDTH + x) * 3) as usize;
                rgb[i..i + 3].iter().all(|&v| v < 128)
            })
            .count();
        assert!(dark > 100, "{dark} dark pixels where the title should be");
    }

    #[test]
    fn fewer_than_two_points_write_nothing_and_two_write_a_png() {
        let dir = test_dir("plot_write");
        let path = loss_curve_path(&dir);
        assert!(!write_loss_curve(&[], &path).unwrap());
        assert!(!write_loss_curve(&[(1, 3.0), (2, f64::NAN)], &path).unwrap());
        assert!(!path.exists());
        assert!(write_loss_curve(&[(1, 3.0), (2, 2.0), (3, f64::NAN)], &path).unwrap());
        let back = image::open(&path).unwrap();
        assert_eq!((back.width(), back.height()), (WIDTH, HEIGHT));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_target_that_fails_every_write_is_an_error() {
        let err = write_loss_curve(&[(1, 3.0), (2, 2.0)], Path::new("/dev/full")).unwrap_err();
        assert!(err.to_string().contains("/dev/full"), "{err}");
    }

    #[test]
    fn a_log_axis_is_labelled_at_one_two_and_five() {
        assert_eq!(log_ticks(150.0, 3300.0), [200.0, 500.0, 1000.0, 2000.0]);
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(short(12345.0), "12345");
        assert_eq!(short(41.237), "41.2");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(1.0), "1");
        assert_eq!(short(2.5e7), "2.50e7");
    }
}
