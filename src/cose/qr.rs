//! QR codes (ISO 18004) for HC1 strings: alphanumeric mode (the Base45 alphabet is the QR
//! alphanumeric set), error correction level Q, a 4-module quiet zone.

use qrcode::{Color, EcLevel, QrCode};

use super::CoseError;

/// Pixels per module in the PNG.
const SCALE: usize = 4;
/// Quiet zone in modules.
const QUIET: usize = 4;

fn code(hc1: &str) -> Result<QrCode, CoseError> {
    QrCode::with_error_correction_level(hc1.as_bytes(), EcLevel::Q)
        .map_err(|e| CoseError::Qr(e.to_string()))
}

/// The QR version chosen for `hc1` (real certificates land at 16–25).
pub fn version(hc1: &str) -> Result<i16, CoseError> {
    match code(hc1)?.version() {
        qrcode::Version::Normal(v) | qrcode::Version::Micro(v) => Ok(v),
    }
}

/// A greyscale PNG of the QR code.
pub fn png(hc1: &str) -> Result<Vec<u8>, CoseError> {
    let qr = code(hc1)?;
    let modules = qr.width();
    let colors = qr.to_colors();
    let side = (modules + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c == Color::Dark {
            let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
            for dy in 0..SCALE {
                let row = (my * SCALE + dy) * side;
                pixels[row + mx * SCALE..row + mx * SCALE + SCALE].fill(0);
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side as u32, side as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| CoseError::Qr(e.to_string()))?;
        w.write_image_data(&pixels)
            .map_err(|e| CoseError::Qr(e.to_string()))?;
    }
    Ok(out)
}

/// An SVG of the QR code.
pub fn svg(hc1: &str) -> Result<String, CoseError> {
    let qr = code(hc1)?;
    Ok(qr
        .render::<qrcode::render::svg::Color<'_>>()
        .quiet_zone(true)
        .min_dimensions(256, 256)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphanumeric_mode_keeps_the_version_small() {
        // 550 characters of HC1 text: alphanumeric mode at ECC Q fits in version 18; byte mode
        // would need version 22 or more.
        let hc1 = format!("HC1:{}", "NCFOXN%TSMAHN-H".repeat(37));
        let v = version(&hc1[..550]).unwrap();
        assert!((14..=18).contains(&v), "version {v}");
        let png = png(&hc1[..550]).unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
        assert!(svg("HC1:ABC").unwrap().starts_with("<?xml"));
    }
}
