//! Configuration errors, and where in the file a value was written.

use std::fmt;
use std::time::Duration;

use super::raw;
use super::units::format_duration;

/// A configuration error, already worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where a value came from, for error messages.
pub(super) struct Source<'a> {
    pub(super) name: &'a str,
    pub(super) text: &'a str,
    /// Warnings found deep in the parse (an upstream name that does not resolve yet), moved
    /// to [`super::Config::warnings`] at the end.
    pub(super) warnings: std::cell::RefCell<Vec<String>>,
}

impl Source<'_> {
    pub(super) fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, col)
    }

    /// The key written at the start of the given line, if any.
    pub(super) fn key_on_line(&self, line: usize) -> Option<String> {
        let text = self.text.lines().nth(line.checked_sub(1)?)?;
        let (key, _) = text.split_once('=')?;
        let key = key.trim();
        (!key.is_empty() && !key.starts_with('#')).then(|| key.to_string())
    }

    pub(super) fn error_at(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        msg: impl fmt::Display,
    ) -> ConfigError {
        ConfigError {
            message: self.at(span, key, msg),
        }
    }

    /// `FILE:LINE:COL: KEY: MSG`.
    pub(super) fn at(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        msg: impl fmt::Display,
    ) -> String {
        let (line, col) = self.line_col(span.start);
        format!("{}:{line}:{col}: {key}: {msg}", self.name)
    }

    /// A duration key checked against its range. `zero`: what `"0s"` means where it is
    /// allowed (`None`: it is not); the caller maps a zero to its meaning.
    pub(super) fn duration(
        &self,
        s: &toml::Spanned<raw::DurationValue>,
        key: &str,
        zero: Option<&str>,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Result<Duration, ConfigError> {
        let d = s.get_ref().0;
        if (d.is_zero() && zero.is_some()) || (!d.is_zero() && range.contains(&d)) {
            return Ok(d);
        }
        let (lo, hi) = (
            format_duration(*range.start()),
            format_duration(*range.end()),
        );
        let want = match zero {
            None => format!("more than 0s and at most {hi}"),
            Some(_) if range.start().is_zero() => format!("0s..={hi}"),
            Some(meaning) => format!("0s ({meaning}) or {lo}..={hi}"),
        };
        Err(self.error_at(
            s.span(),
            key,
            format!("must be {want}, got {}", format_duration(d)),
        ))
    }

    /// An integer key checked against `lo..=hi`.
    pub(super) fn count(
        &self,
        s: &toml::Spanned<i64>,
        key: &str,
        lo: u32,
        hi: u32,
    ) -> Result<u32, ConfigError> {
        u32::try_from(*s.get_ref())
            .ok()
            .filter(|v| (lo..=hi).contains(v))
            .ok_or_else(|| {
                self.error_at(
                    s.span(),
                    key,
                    format!("must be {lo}..={hi}, got {}", s.get_ref()),
                )
            })
    }
}
