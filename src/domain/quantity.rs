//! Kubernetes resource quantities ("1Gi", "500M", "1.5e9") as byte counts.

use std::fmt;

/// Why a quantity string is not a byte count we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError(pub String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantityError {}

/// Parses a Kubernetes quantity into whole bytes, rounding fractions up as Kubernetes does.
pub fn parse_bytes(input: &str) -> Result<u64, QuantityError> {
    let s = input.trim();
    let err = |why: &str| QuantityError(format!("{input:?} is not a valid quantity: {why}"));
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    if number.starts_with('-') {
        return Err(err("it is negative"));
    }
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.is_empty()
        || number == "."
        || number.matches('.').count() > 1
        || number.contains(['+', '-'])
    {
        return Err(err("expected a number such as 1Gi or 500Mi"));
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));

    // value = mantissa / 10^frac_digits * multiplier, kept exact in u128.
    let mantissa: u128 = format!("{int_part}{frac_part}")
        .trim_start_matches('0')
        .parse::<u128>()
        .or_else(|e| {
            if int_part.chars().chain(frac_part.chars()).all(|c| c == '0') {
                Ok(0)
            } else {
                Err(e)
            }
        })
        .map_err(|_| err("the number is too large"))?;
    let mut denominator: u128 = 10u128
        .checked_pow(frac_part.len() as u32)
        .ok_or_else(|| err("too many decimal places"))?;
    let scale: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "m" => {
            denominator = denominator
                .checked_mul(1000)
                .ok_or_else(|| err("too many decimal places"))?;
            1
        }
        other if other.starts_with(['e', 'E']) => {
            let exp: i32 = other[1..].parse().map_err(|_| err("bad exponent"))?;
            if !(0..=30).contains(&exp) {
                return Err(err("exponent out of range"));
            }
            10u128.pow(exp as u32)
        }
        other => {
            return Err(err(&format!(
                "unknown suffix {other:?}; use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E"
            )));
        }
    };
    let scaled = mantissa
        .checked_mul(scale)
        .ok_or_else(|| err("the number is too large"))?;
    let bytes = scaled.div_ceil(denominator);
    u64::try_from(bytes).map_err(|_| err("the number is too large"))
}

/// Formats bytes in the largest binary unit that keeps one decimal, e.g. `1.5Gi`, `512Mi`, `100`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 6] = [
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            let tenths = (bytes as u128 * 10).div_ceil(size as u128);
            return if tenths.is_multiple_of(10) {
                format!("{}{unit}", tenths / 10)
            } else {
                format!("{}.{}{unit}", tenths / 10, tenths % 10)
            };
        }
    }
    bytes.to_string()
}

/// Formats bytes as an exact Kubernetes quantity (largest binary suffix that divides evenly).
pub fn to_quantity(bytes: u64) -> String {
    for (unit, size) in [
        ("Ei", 1u64 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_kubernetes_accepts() {
        let cases: &[(&str, u64)] = &[
            ("1Gi", 1 << 30),
            ("1Ki", 1024),
            ("500Mi", 500 << 20),
            ("1.5Gi", 3 << 29),
            ("1G", 1_000_000_000),
            ("1k", 1000),
            ("100", 100),
            ("+100", 100),
            ("0.5", 1),
            ("1500m", 2),
            ("1e3", 1000),
            ("1E6", 1_000_000),
            ("0", 0),
            ("0Gi", 0),
            (" 2Gi ", 2 << 30),
            ("1Ei", 1 << 60),
        ];
        for (input, want) in cases {
            assert_eq!(parse_bytes(input), Ok(*want), "{input}");
        }
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in [
            "",
            "Gi",
            "-1Gi",
            "1GB",
            "1.2.3",
            "abc",
            "1 Gi x",
            "99999999999999999999Ei",
            "1e99",
        ] {
            let e = parse_bytes(bad).unwrap_err();
            assert!(e.0.contains("not a valid quantity"), "{bad}: {e}");
        }
    }

    #[test]
    fn formats_for_people_and_for_the_api() {
        assert_eq!(format_bytes(1 << 30), "1Gi");
        assert_eq!(format_bytes(3 << 29), "1.5Gi");
        assert_eq!(format_bytes(999), "999");
        assert_eq!(to_quantity(1 << 30), "1Gi");
        assert_eq!(to_quantity(1_000_000), "1000000");
        assert_eq!(to_quantity(5 << 20), "5Mi");
    }
}
