//! How the binary writes numbers for people: one place, so a size looks the
//! same in `ckpt ls`, `simulate` and the benchmark tables.

/// A byte count in binary units with at most two decimals and no trailing
/// zeros: `512 B`, `1.5 KiB`, `4 MiB`, `117.74 MiB`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let digits = format!("{value:.2}");
    let digits = digits.trim_end_matches('0').trim_end_matches('.');
    format!("{digits} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.0), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes((4u64 << 20) as f64), "4 MiB");
        assert_eq!(human_bytes((5u64 << 30) as f64), "5 GiB");
        assert_eq!(human_bytes(123_456_789.0), "117.74 MiB");
        assert_eq!(human_bytes(1e18), "909494.7 TiB");
    }
}
