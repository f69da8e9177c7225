//! Sizes as qemu-img reads and prints them.

use anyhow::{bail, Result};

/// Parses a size such as `65536`, `64k`, `1.5G` or `2T` (binary units, as qemu-img).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" | "kB" => 10,
        "m" | "M" | "MiB" | "MB" => 20,
        "g" | "G" | "GiB" | "GB" => 30,
        "t" | "T" | "TiB" | "TB" => 40,
        "p" | "P" | "PiB" | "PB" => 50,
        "e" | "E" | "EiB" | "EB" => 60,
        _ => bail!("invalid size '{s}': unknown unit '{unit}' (use k, M, G, T, P or E)"),
    };
    if num.is_empty() {
        bail!("invalid size '{s}': expected a number, optionally followed by k, M, G, T");
    }
    let value = if num.contains('.') {
        let f: f64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid size '{s}': not a number"))?;
        let v = f * (1u64 << shift) as f64;
        if !v.is_finite() || v >= u64::MAX as f64 {
            bail!("invalid size '{s}': too large");
        }
        v as u64
    } else {
        let n: u64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid size '{s}': too large or not a number"))?;
        n.checked_mul(1 << shift)
            .ok_or_else(|| anyhow::anyhow!("invalid size '{s}': too large"))?
    };
    Ok(value)
}

/// Formats a number like C's `%0.3g` for values below 1000.
fn three_digits(v: f64) -> String {
    let s = if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else if v >= 0.9995 || v == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Formats a size as qemu-img's human output does: `10 MiB`, `260 KiB`, `1.88 GiB`.
pub fn human_size(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // Switch to the next unit once the integer part would reach 1000.
    let scaled = val as f64 * 1024.0 / 1000.0;
    let exp = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as usize
    };
    let i = (exp / 10).min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", three_digits(val as f64 / div), SUFFIXES[i])
}

/// Formats a byte count as qemu-io does: `4 KiB`, `63.902 KiB`, `100 bytes`.
pub fn io_size(val: u64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, "EiB"),
        (50, "PiB"),
        (40, "TiB"),
        (30, "GiB"),
        (20, "MiB"),
        (10, "KiB"),
    ];
    let (v, unit) = UNITS
        .iter()
        .find(|(shift, _)| val >= 1u64 << shift)
        .map(|&(shift, unit)| (val as f64 / (1u64 << shift) as f64, unit))
        .unwrap_or((val as f64, "bytes"));
    let s = format!("{v:.3}");
    let s = s.strip_suffix(".000").unwrap_or(&s);
    format!("{s} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("10M").unwrap(), 10 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("1e30").is_err());
    }

    #[test]
    fn human_sizes_match_qemu_img() {
        assert_eq!(human_size(10 << 20), "10 MiB");
        assert_eq!(human_size(266240), "260 KiB");
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(64 << 40), "64 TiB");
    }

    #[test]
    fn io_sizes_match_qemu_io() {
        assert_eq!(io_size(4096), "4 KiB");
        assert_eq!(io_size(65436), "63.902 KiB");
        assert_eq!(io_size(100), "100 bytes");
    }
}
