//! Parsing of human-written durations ("250ms", "5s", "2m") and sizes ("64KiB", "1MiB").
//!
//! Config values carry their unit in the text so that a reader of `ringfwd.toml` never has
//! to guess whether `idle_timeout = 300` means seconds or milliseconds. A bare integer is
//! accepted only for sizes (bytes), never for durations.

use std::fmt;
use std::time::Duration;

/// A byte count that was written with a unit in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// The size as a `usize`.
    ///
    /// # Panics
    /// Never on 64-bit targets; sizes are validated to fit at parse time.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).expect("size validated at parse time")
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (name, mult) in UNITS {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{}", self.0 / mult, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// Parses "64KiB", "1 MiB", "4096", "16k", "2M".
///
/// ```
/// use ringfwd::config::{ByteSize, parse_size};
/// assert_eq!(parse_size("64KiB"), Ok(ByteSize(65536)));
/// assert!(parse_size("64 parsecs").unwrap_err().contains("unknown unit"));
/// ```
///
/// # Errors
/// A message naming what was wrong with the text.
pub fn parse_size(text: &str) -> Result<ByteSize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size {text:?}: expected a number followed by a unit such as 64KiB"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {text:?}: number too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "KB" | "kB" | "kb" => 1 << 10,
        "M" | "m" | "MiB" | "MB" | "mb" => 1 << 20,
        "G" | "g" | "GiB" | "GB" | "gb" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    let bytes = n
        .checked_mul(mult)
        .filter(|b| usize::try_from(*b).is_ok())
        .ok_or_else(|| format!("invalid size {text:?}: too large"))?;
    Ok(ByteSize(bytes))
}

/// Parses "250ms", "5s", "2m", "1h", "100us". A unit is required.
///
/// ```
/// use std::time::Duration;
/// use ringfwd::config::parse_duration;
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert!(parse_duration("300").unwrap_err().contains("a unit is required"));
/// ```
///
/// # Errors
/// A message naming what was wrong with the text.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid duration {text:?}: expected a number followed by a unit such as 5s"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
    // Saturating here once let "18446744073709551615h" through as ~585 billion years, which
    // later overflowed `Instant + Duration`: a value that does not fit is an error instead.
    let too_large = || format!("invalid duration {text:?}: too large");
    let d = match unit.trim() {
        "us" | "µs" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_large)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_large)?),
        "" => {
            return Err(format!(
                "invalid duration {text:?}: a unit is required (us, ms, s, m or h)"
            ));
        }
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?} (use us, ms, s, m or h)"
            ));
        }
    };
    Ok(d)
}

/// Formats a duration the way the config accepts it back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_nanos() == 0 {
        let s = d.as_secs();
        if s != 0 && s.is_multiple_of(3600) {
            return format!("{}h", s / 3600);
        }
        if s != 0 && s.is_multiple_of(60) {
            return format!("{}m", s / 60);
        }
        return format!("{s}s");
    }
    if d.as_nanos().is_multiple_of(1_000_000) {
        return format!("{ms}ms");
    }
    format!("{}us", d.as_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("64KiB").unwrap(), ByteSize(65536));
        assert_eq!(parse_size("1 MiB").unwrap(), ByteSize(1 << 20));
        assert_eq!(parse_size("4096").unwrap(), ByteSize(4096));
        assert_eq!(parse_size("2G").unwrap(), ByteSize(2 << 30));
    }

    #[test]
    fn size_errors_say_why() {
        assert!(parse_size("KiB").unwrap_err().contains("expected a number"));
        assert!(
            parse_size("10 parsecs")
                .unwrap_err()
                .contains("unknown unit \"parsecs\"")
        );
        assert!(
            parse_size("99999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(
            parse_duration("300")
                .unwrap_err()
                .contains("a unit is required")
        );
        assert!(
            parse_duration("3 fortnights")
                .unwrap_err()
                .contains("unknown unit")
        );
    }

    #[test]
    fn durations_that_overflow_are_rejected() {
        for text in [
            "18446744073709551615h",
            "307445734561825861m",
            "99999999999999999999s",
        ] {
            let e = parse_duration(text).unwrap_err();
            assert!(e.contains("too large"), "{text}: {e}");
        }
        // The largest whole number of seconds still parses.
        assert_eq!(
            parse_duration("18446744073709551615s").unwrap(),
            Duration::from_secs(u64::MAX)
        );
    }

    #[test]
    fn display_round_trips() {
        for text in ["64KiB", "1MiB", "100B", "2GiB"] {
            assert_eq!(parse_size(text).unwrap().to_string(), text);
        }
        for text in ["250ms", "5s", "2m", "1h", "100us"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
