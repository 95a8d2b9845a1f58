//! Training images (temporary minimal version).

use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelFormat {
    Rgb8,
    Rgba8,
}

#[derive(Clone, Debug)]
pub enum ImageSource {
    File(PathBuf),
    Pixels {
        data: Vec<u8>,
        width: usize,
        height: usize,
        stride: usize,
        format: PixelFormat,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropMode {
    Center,
    Random,
}

pub struct PreparedImage {
    pub chw: Vec<f32>,
    pub flipped: bool,
    pub caption: Option<String>,
}

pub fn prepare_views(
    src: &ImageSource,
    caption: Option<&str>,
    res: usize,
    _crop: CropMode,
    _rng: &mut super::rng::Rng,
) -> Result<Vec<PreparedImage>, String> {
    let ImageSource::Pixels {
        data,
        width,
        height,
        stride,
        format,
    } = src
    else {
        return Err("files not yet".into());
    };
    let bpp = if *format == PixelFormat::Rgb8 { 3 } else { 4 };
    let mut chw = vec![0f32; 3 * res * res];
    for c in 0..3 {
        for y in 0..res {
            for x in 0..res {
                let sy = y * height / res;
                let sx = x * width / res;
                chw[c * res * res + y * res + x] =
                    data[sy * stride + sx * bpp + c] as f32 / 127.5 - 1.0;
            }
        }
    }
    let mut flip = chw.clone();
    for c in 0..3 {
        for y in 0..res {
            for x in 0..res {
                flip[c * res * res + y * res + x] = chw[c * res * res + y * res + res - 1 - x];
            }
        }
    }
    Ok(vec![
        PreparedImage {
            chw,
            flipped: false,
            caption: caption.map(str::to_string),
        },
        PreparedImage {
            chw: flip,
            flipped: true,
            caption: caption.map(str::to_string),
        },
    ])
}
