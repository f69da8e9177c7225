//! Numbers a test takes from its environment (seeds, scales, counts), read the way the
//! tests print them, so that a value copied from a test's output reproduces the run.

/// The number in environment variable `name`, if it is set: decimal, or hexadecimal
/// with `0x`, either with `_` separators (`0x5eed_c0de` as `{:#x}` prints it, `1_000`).
/// A value that is not a number fails the test: a run that silently took the default
/// instead would not be the run that was asked for.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        parse_u64(&v).unwrap_or_else(|| {
            panic!("{name}={v}: not a number (decimal, or hexadecimal with 0x)")
        }),
    )
}

/// `text` as a number in the forms [`env_u64`] takes.
pub fn parse_u64(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => t.replace('_', "").parse::<u64>().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_u64;

    #[test]
    fn printed_forms_parse_back() {
        assert_eq!(
            parse_u64(&format!("{:#x}", 0x5eed_c0de_u64)),
            Some(0x5eed_c0de)
        );
        assert_eq!(parse_u64("0x5eed_c0de"), Some(0x5eed_c0de));
        assert_eq!(parse_u64("0X1F"), Some(31));
        assert_eq!(parse_u64(" 1_000 "), Some(1000));
        assert_eq!(parse_u64(&u64::MAX.to_string()), Some(u64::MAX));
        assert_eq!(parse_u64("ten"), None);
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64("-1"), None);
    }
}
