//! Server names as a TLS client sends them (SNI) and as a route lists them: what a valid host
//! name is, and a route's pattern (an exact name or `*.` and a name), checked once.

/// Longest DNS name (RFC 1035, without the trailing dot).
pub const MAX_NAME_LEN: usize = 253;

/// Whether `name` (already lower-case) is a DNS host name a client may put in SNI:
/// 1 to 253 bytes, no trailing dot (the parser drops one before asking), labels of 1 to 63 letters, digits and hyphens
/// not starting or ending with a hyphen (RFC 1123), and a last label that is not all digits,
/// which rules out the IPv4 literals SNI forbids (IPv6 ones fail on ':'). Underscores are
/// refused: they are not valid in host names, whatever some internal zones do.
pub fn is_valid_host_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return false;
    }
    let mut last_all_digits = false;
    for label in name.split(|&b| b == b'.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label[0] != b'-'
            && label[label.len() - 1] != b'-'
            && label
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return false;
        }
        last_all_digits = label.iter().all(u8::is_ascii_digit);
    }
    !last_all_digits
}

/// A route's server-name pattern, checked and normalised: lower-case, one trailing dot
/// dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SniPattern {
    /// `api.example.com`: that name only.
    Exact(String),
    /// `*.example.com`, kept as what follows `*.`: exactly one more leading label.
    Wildcard(String),
}

impl SniPattern {
    /// The pattern, or `None` when it is neither a valid host name nor `*.` followed by one
    /// (a `*` anywhere else, an empty label, a character outside letters, digits, hyphens
    /// and dots).
    pub fn parse(pattern: &str) -> Option<Self> {
        let lower = pattern.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower),
        };
        if !is_valid_host_name(name.as_bytes()) {
            return None;
        }
        let name = name.to_string();
        Some(if wildcard {
            Self::Wildcard(name)
        } else {
            Self::Exact(name)
        })
    }
}

/// A route pattern that cannot match any valid server name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "SNI pattern \"{pattern}\" of route {route}: not a host name (letters, digits, hyphens, dots; labels of 1 to 63, at most 253 in all) nor \"*.\" followed by one"
)]
pub struct SniPatternError {
    /// The route index the pattern was given for.
    pub route: usize,
    /// The pattern as written.
    pub pattern: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One check for the config (at load) and the matcher (at run): lower-cased, one
    /// trailing dot dropped, `*.` only in front.
    #[test]
    fn patterns_are_checked_and_normalised_once() {
        assert_eq!(
            SniPattern::parse("API.Example.com."),
            Some(SniPattern::Exact("api.example.com".into()))
        );
        assert_eq!(
            SniPattern::parse("*.Example.com"),
            Some(SniPattern::Wildcard("example.com".into()))
        );
        for bad in [
            "a.*.example.com",
            "*",
            "*.",
            "",
            "under_score.example",
            "10.0.0.1",
        ] {
            assert_eq!(SniPattern::parse(bad), None, "{bad:?}");
        }
    }
}
