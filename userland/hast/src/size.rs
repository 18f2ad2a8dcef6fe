//! Sizes as hastctl reads and prints them: `parse_size` follows FreeBSD's
//! expand_number(3) (binary suffixes), `humanize` prints exactly what the
//! reference's `%N` printf conversion prints (humanize_number(3) into a
//! 5-byte buffer with HN_AUTOSCALE, HN_NOSPACE and HN_DECIMAL).

/// A size argument that is not a number with an optional unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("invalid size {0:?}: expected a number with an optional B, K, M, G, T, P or E suffix")]
    Invalid(String),
    #[error("invalid size {0:?}: unknown unit (use B, K, M, G, T, P or E)")]
    BadUnit(String),
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses a size like expand_number(3): a number (decimal, `0x` hexadecimal
/// or `0` octal, as strtoumax with base 0 reads it) followed by an optional
/// case-insensitive unit `B` (x1), `K`, `M`, `G`, `T`, `P`, `E` (powers of
/// 1024). A `B` or `iB` after K..E is accepted (`2MB`, `2MiB`), as the
/// reference ignores what follows the unit letter. Unlike the reference, a
/// sign, surrounding blanks and any other trailing text are refused, and
/// overflow of 64 bits is an error.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(s.to_string());
    let overflow = || SizeError::Overflow(s.to_string());
    let bytes = s.as_bytes();
    let (radix, start) = match bytes {
        [b'0', b'x' | b'X', c, ..] if c.is_ascii_hexdigit() => (16, 2),
        [b'0', ..] => (8, 0),
        [c, ..] if c.is_ascii_digit() => (10, 0),
        _ => return Err(invalid()),
    };
    let digits_end = bytes
        .iter()
        .skip(start)
        .position(|c| !(*c as char).is_digit(radix))
        .map_or(bytes.len(), |p| p + start);
    let digits = s.get(start..digits_end).ok_or_else(invalid)?;
    if digits.is_empty() {
        return Err(invalid());
    }
    let number = u64::from_str_radix(digits, radix).map_err(|_| overflow())?;
    let unit = s.get(digits_end..).ok_or_else(invalid)?;
    let mut chars = unit.chars();
    let shift = match chars.next().map(|c| c.to_ascii_lowercase()) {
        None => return Ok(number),
        Some('b') => {
            return if chars.as_str().is_empty() {
                Ok(number)
            } else {
                Err(SizeError::BadUnit(s.to_string()))
            }
        }
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some('p') => 50,
        Some('e') => 60,
        Some(_) => return Err(SizeError::BadUnit(s.to_string())),
    };
    match chars.as_str() {
        "" | "b" | "B" | "ib" | "iB" | "Ib" | "IB" => {}
        _ => return Err(SizeError::BadUnit(s.to_string())),
    }
    if number.leading_zeros() < shift {
        return Err(overflow());
    }
    Ok(number << shift)
}

/// What the reference's `%N` prints for `n` (callers append "B"):
/// 1024-based, at most 4 characters, one decimal when the scaled value is
/// below 9.5 and a unit was needed. `0` -> "0", `512` -> "512",
/// `1000` -> "1.0K", `2097152` -> "2.0M", `1073737216` -> "1.0G".
/// The reference passes the value as a signed 64-bit integer; values of
/// 2^63 and more are shown as the negative numbers it would print.
pub fn humanize(n: u64) -> String {
    humanize_signed(n as i64)
}

/// [`humanize`] for a signed value (`%N` takes an intmax_t).
pub fn humanize_signed(n: i64) -> String {
    const DIVISOR: i64 = 1024;
    const DECCUT: i64 = 973; // ceil(0.95 * 1024)
    const MAXSCALE: usize = 6;
    const PREFIXES: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    const BUFLEN: usize = 5; // the reference's buffer, NUL included

    let negative = n < 0;
    // One column for the prefix, one for a digit, one more for a sign.
    let baselen: usize = if negative { 3 } else { 2 };
    let mut quotient = n.wrapping_abs();
    let mut remainder: i64 = 0;
    let max = 10i64.pow((BUFLEN - baselen) as u32);
    let mut scale = 0usize;
    while (quotient >= max
        || (quotient == max - 1 && (remainder >= DECCUT || remainder >= DIVISOR / 2)))
        && scale < MAXSCALE
    {
        remainder = quotient % DIVISOR;
        quotient /= DIVISOR;
        scale += 1;
    }
    let sign: i64 = if negative { -1 } else { 1 };
    let prefix = PREFIXES.get(scale).copied().unwrap_or("");
    let text = if ((quotient == 9 && remainder < DECCUT) || quotient < 9) && scale > 0 {
        let tenths = (remainder * 10 + DIVISOR / 2) / DIVISOR;
        let s1 = quotient + tenths / 10;
        let s2 = tenths % 10;
        format!("{}.{}{}", sign * s1, s2, prefix)
    } else {
        let rounded = quotient.wrapping_add((remainder + DIVISOR / 2) / DIVISOR);
        format!("{}{}", sign.wrapping_mul(rounded), prefix)
    };
    // snprintf into the 5-byte buffer keeps at most 4 characters.
    text.chars().take(BUFLEN - 1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanize_reference_vectors() {
        // Worked by hand from humanize_number.c's rules (divisor 1024,
        // 5-byte buffer, max 999 unscaled, decimal below 9.5).
        let cases: &[(u64, &str)] = &[
            (0, "0"),
            (1, "1"),
            (512, "512"),
            (999, "999"),
            (1000, "1.0K"),
            (1023, "1.0K"),
            (1024, "1.0K"),
            (1536, "1.5K"),
            (9 * 1024 + 972, "9.9K"),
            (9 * 1024 + 973, "10K"),
            (10239, "10K"),
            (10240, "10K"),
            (65536, "64K"),
            (1023 * 1024, "1.0M"),
            (998 * 1024 + 511, "998K"),
            (998 * 1024 + 512, "999K"),
            (999 * 1024 + 511, "999K"),
            (999 * 1024 + 512, "1.0M"),
            (2097152, "2.0M"),
            (4194304, "4.0M"),
            (1073737216, "1.0G"),
            (1073741824, "1.0G"),
            (1 << 40, "1.0T"),
            ((1 << 40) - 4096 - 65536, "1.0T"),
            (1 << 50, "1.0P"),
            (1 << 60, "1.0E"),
            (i64::MAX as u64, "8.0E"),
        ];
        for (n, want) in cases {
            assert_eq!(humanize(*n), *want, "humanize({n})");
        }
        assert_eq!(humanize_signed(-1), "-1");
        // "-2.0K" does not fit the 5-byte buffer: snprintf cuts it.
        assert_eq!(humanize_signed(-2048), "-2.0");
    }

    #[test]
    fn parse_size_units_and_edges() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("2MB"), Ok(2 << 20));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1p"), Ok(1 << 50));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size("0x10k"), Ok(16 << 10));
        assert_eq!(parse_size("010"), Ok(8));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(parse_size("16E"), Err(SizeError::Overflow(_))));
        assert!(matches!(
            parse_size("16777216T"),
            Err(SizeError::Overflow(_))
        ));
        assert_eq!(parse_size("16777215T"), Ok(16777215u64 << 40));
        for bad in [
            "", "k", "-1", "+1", " 1", "1 ", "1x", "1kx", "1bb", "0x", "08", "1.5M",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
