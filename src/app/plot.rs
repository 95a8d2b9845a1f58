//! Pictures of a training run: the loss curve (plotters on an RGB buffer) and labels in a
//! built-in 5x7 pixel font, so that no system font is needed anywhere.

use std::path::Path;

use image::RgbImage;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// Glyph rows, 5 bits each (bit 4 is the leftmost pixel).
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '<' => [2, 4, 8, 16, 8, 4, 2],
        '>' => [8, 4, 2, 1, 2, 4, 8],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        ' ' => [0; 7],
        _ => [14, 17, 1, 2, 4, 0, 4],
    }
}

/// Width in pixels of `text` drawn at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    (text.chars().count() as u32 * 6).saturating_sub(1) * scale
}

/// Height in pixels of a line of text at `scale`.
pub fn text_height(scale: u32) -> u32 {
    7 * scale
}

/// Draws `text` (upper-cased) with its top-left corner at `(x, y)`; pixels outside
/// the image are skipped.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: [u8; 3]) {
    let s = i64::from(scale.max(1));
    for (i, c) in text.chars().enumerate() {
        let gx = x + i as i64 * 6 * s;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..5 {
                if bits & (16 >> col) == 0 {
                    continue;
                }
                for dy in 0..s {
                    for dx in 0..s {
                        let (px, py) = (gx + col * s + dx, y + row as i64 * s + dy);
                        if px >= 0
                            && py >= 0
                            && px < i64::from(img.width())
                            && py < i64::from(img.height())
                        {
                            img.put_pixel(px as u32, py as u32, image::Rgb(color));
                        }
                    }
                }
            }
        }
    }
}

/// One point of the loss curve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossPoint {
    pub step: u64,
    pub loss: f32,
}

/// Exponential moving average with bias correction (as TensorBoard's smoothing), so the
/// first values are not pulled towards zero.
pub fn smooth(values: &[f32], weight: f64) -> Vec<f64> {
    let mut avg = 0.0;
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        avg = avg * weight + f64::from(*v) * (1.0 - weight);
        out.push(avg / (1.0 - weight.powi(i as i32 + 1)));
    }
    out
}

/// Tick values at a "nice" spacing (1, 2 or 5 times a power of ten) covering `lo..=hi`.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut ticks = Vec::new();
    let mut t = (lo / step).ceil() * step;
    while t <= hi + step * 1e-9 && ticks.len() < 50 {
        ticks.push(t);
        t += step;
    }
    (ticks, step)
}

fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Input {
        what: "loss plot".into(),
        reason: e.to_string(),
    }
}

/// Room around the plot area in pixels: tick labels on the left and below, the title and
/// the legend above.
const MARGIN_LEFT: u32 = 76;
const MARGIN_RIGHT: u32 = 20;
const MARGIN_TOP: u32 = 34;
const MARGIN_BOTTOM: u32 = 44;

/// Text colours: labels, and the curves' own colours for the title and legend.
const INK: [u8; 3] = [40, 40, 40];
const RAW_INK: [u8; 3] = [120, 160, 225];
const SMOOTH_INK: [u8; 3] = [20, 60, 160];

/// The data range each axis shows.
#[derive(Clone, Copy, Debug)]
struct Axes {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Axes {
    /// The steps run from the one before the first point to the last; the losses from the
    /// lowest to the 98th percentile, padded by 5%.
    fn fit(points: &[LossPoint]) -> Self {
        let x0 = points.first().map_or(0, |p| p.step.saturating_sub(1)) as f64;
        let x1 = (points.last().map_or(1, |p| p.step) as f64).max(x0 + 1.0);
        // The top of the axis ignores the highest 2% of losses: single spikes would flatten
        // the curve that matters.
        let mut sorted: Vec<f32> = points.iter().map(|p| p.loss).collect();
        sorted.sort_by(f32::total_cmp);
        let lo = sorted.first().map_or(0.0, |v| f64::from(*v));
        let hi_index = ((sorted.len() as f64 - 1.0) * 0.98).round().max(0.0) as usize;
        let hi = sorted.get(hi_index).map_or(1.0, |v| f64::from(*v)).max(lo);
        let pad = ((hi - lo) * 0.05).max(1e-6);
        // Losses are not negative: the axis starts at zero at the lowest.
        let y0 = (lo - pad).max(lo.min(0.0));
        let y1 = hi + pad;
        Self { x0, x1, y0, y1 }
    }

    /// A loss held inside the axis, so that a spike runs along the top edge.
    fn clamp(&self, v: f64) -> f64 {
        v.clamp(self.y0, self.y1)
    }
}

/// The raw curve and its moving average, as (step, loss) inside the axes.
type Curves = (Vec<(f64, f64)>, Vec<(f64, f64)>);

fn curves(points: &[LossPoint], axes: &Axes) -> Curves {
    let raw = points
        .iter()
        .map(|p| (p.step as f64, axes.clamp(f64::from(p.loss))))
        .collect();
    let losses: Vec<f32> = points.iter().map(|p| p.loss).collect();
    let smoothed = points
        .iter()
        .zip(smooth(&losses, 0.9))
        .map(|(p, s)| (p.step as f64, axes.clamp(s)))
        .collect();
    (raw, smoothed)
}

/// A tick's label and the pixel where its grid line meets the axis.
type TickLabel = ((i32, i32), String);

/// Draws the grid, the frame and the curves with plotters into `buf` (RGB, `width` x
/// `height`); returns the tick labels of the x and y axes, for [`draw_tick_labels`].
fn draw_plot(
    buf: &mut [u8],
    (width, height): (u32, u32),
    axes: &Axes,
    (raw, smoothed): Curves,
) -> Result<(Vec<TickLabel>, Vec<TickLabel>)> {
    let Axes { x0, x1, y0, y1 } = *axes;
    let (x_ticks, x_step) = nice_ticks(x0, x1, 8);
    let (y_ticks, y_step) = nice_ticks(y0, y1, 8);
    let mut x_labels = Vec::new();
    let mut y_labels = Vec::new();
    let root = BitMapBackend::with_buffer(buf, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .margin_top(MARGIN_TOP)
        .margin_bottom(MARGIN_BOTTOM)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    let grid = RGBColor(228, 228, 228);
    for &t in &x_ticks {
        chart
            .draw_series(LineSeries::new([(t, y0), (t, y1)], grid))
            .map_err(plot_err)?;
        x_labels.push((chart.backend_coord(&(t, y0)), tick_label(t, x_step)));
    }
    for &t in &y_ticks {
        chart
            .draw_series(LineSeries::new([(x0, t), (x1, t)], grid))
            .map_err(plot_err)?;
        y_labels.push((chart.backend_coord(&(x0, t)), tick_label(t, y_step)));
    }
    let frame = RGBColor(90, 90, 90);
    chart
        .draw_series(LineSeries::new(
            [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)],
            frame,
        ))
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(raw, RGBColor(160, 190, 235)))
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(
            smoothed,
            RGBColor(20, 60, 160).stroke_width(2),
        ))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok((x_labels, y_labels))
}

/// Step labels centred below their ticks, loss labels right-aligned left of theirs.
fn draw_tick_labels(img: &mut RgbImage, x_labels: &[TickLabel], y_labels: &[TickLabel]) {
    for ((x, y), label) in x_labels {
        let w = i64::from(text_width(label, 2));
        draw_text(img, i64::from(*x) - w / 2, i64::from(*y) + 8, label, 2, INK);
    }
    for ((x, y), label) in y_labels {
        let w = i64::from(text_width(label, 2));
        draw_text(img, i64::from(*x) - w - 8, i64::from(*y) - 7, label, 2, INK);
    }
}

/// The title above the plot, the legend at the top right in the curves' own colours and
/// the step axis's name below.
fn draw_titles(img: &mut RgbImage) {
    let (width, height) = img.dimensions();
    draw_text(img, i64::from(MARGIN_LEFT), 10, "loss", 2, SMOOTH_INK);
    let (raw_label, smooth_label) = ("raw", "smoothed (ema 0.9)");
    let lw = i64::from(text_width(raw_label, 1) + 12 + text_width(smooth_label, 1));
    let lx = i64::from(width - MARGIN_RIGHT) - lw;
    draw_text(img, lx, 14, raw_label, 1, RAW_INK);
    let sx = lx + i64::from(text_width(raw_label, 1)) + 12;
    draw_text(img, sx, 14, smooth_label, 1, SMOOTH_INK);
    let xlabel = "step";
    let xw = i64::from(text_width(xlabel, 2));
    draw_text(
        img,
        i64::from(width) / 2 - xw / 2,
        i64::from(height) - 16,
        xlabel,
        2,
        INK,
    );
}

/// The loss curve as an RGB image: the raw loss per step (light) and its moving average
/// (dark), with step and loss ticks. Losses that are not finite are left out.
pub fn loss_chart(points: &[LossPoint], width: u32, height: u32) -> Result<RgbImage> {
    let size = (width.max(200), height.max(150));
    let finite: Vec<LossPoint> = points
        .iter()
        .copied()
        .filter(|p| p.loss.is_finite())
        .collect();
    let axes = Axes::fit(&finite);
    let mut buf = vec![255u8; size.0 as usize * size.1 as usize * 3];
    let (x_labels, y_labels) = draw_plot(&mut buf, size, &axes, curves(&finite, &axes))?;
    let mut img = RgbImage::from_raw(size.0, size.1, buf)
        .ok_or_else(|| plot_err("the chart buffer has the wrong size"))?;
    draw_tick_labels(&mut img, &x_labels, &y_labels);
    draw_titles(&mut img);
    Ok(img)
}

/// PNG bytes of an RGB image.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::Input {
            what: "PNG encoder".into(),
            reason: e.to_string(),
        })?;
    Ok(out.into_inner())
}

/// Writes an RGB image as a PNG, atomically.
pub fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    crate::io::write_atomic(path, &png_bytes(img)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_draws_curve_and_labels() -> Result<()> {
        let points: Vec<LossPoint> = (1..=300)
            .map(|s| LossPoint {
                step: s,
                loss: 0.3 / (s as f32).sqrt() + if s % 7 == 0 { 0.05 } else { 0.0 },
            })
            .collect();
        let img = loss_chart(&points, 640, 400)?;
        assert_eq!(img.dimensions(), (640, 400));
        let dark_blue = img.pixels().filter(|p| p.0 == [20, 60, 160]).count();
        assert!(dark_blue > 300, "{dark_blue} curve pixels");
        // An empty run still draws (axes only).
        loss_chart(&[], 320, 200)?;
        Ok(())
    }

    /// The charts of tests/fixtures/loss-chart/: a long run with spikes (one far above the
    /// rest, one not finite), a resumed run with small losses, a single point and no points
    /// at a size below the minimum.
    fn pinned_charts() -> Result<Vec<(&'static str, RgbImage)>> {
        let run: Vec<LossPoint> = (1..=300)
            .map(|s| LossPoint {
                step: s,
                loss: match s {
                    150 => 4.0,
                    200 => f32::NAN,
                    _ => 0.3 / (s as f32).sqrt() + if s % 7 == 0 { 0.05 } else { 0.0 },
                },
            })
            .collect();
        let resumed: Vec<LossPoint> = (1001..=1040)
            .map(|s| LossPoint {
                step: s,
                loss: 0.012 + 0.003 * ((s as f32) * 0.7).sin(),
            })
            .collect();
        let single = [LossPoint {
            step: 1,
            loss: 0.25,
        }];
        Ok(vec![
            ("run", loss_chart(&run, 800, 480)?),
            ("resumed", loss_chart(&resumed, 320, 200)?),
            ("single", loss_chart(&single, 400, 240)?),
            ("empty", loss_chart(&[], 100, 100)?),
        ])
    }

    /// The charts, pixel for pixel, against the committed pictures
    /// (`SDTI_WRITE_REFERENCE=1 cargo test --lib plot::tests::charts_match` rewrites them).
    #[test]
    fn charts_match_the_committed_pictures() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loss-chart");
        for (name, img) in pinned_charts()? {
            let path = dir.join(format!("{name}.png"));
            if std::env::var_os("SDTI_WRITE_REFERENCE").is_some() {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                write_png(&path, &img)?;
                continue;
            }
            let want = image::open(&path)
                .map_err(|e| plot_err(format!("{}: {e}", path.display())))?
                .to_rgb8();
            assert_eq!(img.dimensions(), want.dimensions(), "{name}");
            let differing = img
                .pixels()
                .zip(want.pixels())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                differing, 0,
                "{name}: {differing} pixels differ from {path:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn ticks_are_nice_and_smoothing_starts_unbiased() {
        let (t, step) = nice_ticks(0.0, 1000.0, 5);
        assert_eq!(step, 200.0);
        assert_eq!(t.first(), Some(&0.0));
        assert_eq!(tick_label(0.15, 0.05), "0.15");
        let s = smooth(&[2.0, 2.0, 2.0], 0.9);
        assert!(s.iter().all(|v| (v - 2.0).abs() < 1e-9));
    }
}
