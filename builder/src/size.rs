//! Disk sizes as morph's DISK_SIZE gives them: bytes, or K/M/G/T (powers of 1024).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: expected bytes or a number with K, M, G or T (e.g. 4G)")]
pub struct SizeError {
    pub input: String,
}

pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = || SizeError {
        input: input.to_owned(),
    };
    let s = input.trim();
    let (digits, shift) = match s.chars().last() {
        Some(c) if c.is_ascii_digit() => (s, 0),
        Some('k' | 'K') => (&s[..s.len() - 1], 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 30),
        Some('t' | 'T') => (&s[..s.len() - 1], 40),
        _ => return Err(err()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(err)?;
    if bytes == 0 {
        return Err(err());
    }
    Ok(bytes)
}

/// Sizes for people, in powers of 1024: "18 B", "1.5 KiB", "7.9 MiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_powers_of_1024() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn garbage_is_rejected_with_the_input_named() {
        for bad in ["", "G", "4GB", "-1", "1.5G", "0", "99999999999T", "4 G"] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.input, bad);
        }
    }
}
