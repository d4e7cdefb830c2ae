//! Configuration errors, and where in the file a value was written.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::raw;
use super::units::format_duration;

/// Where in a config file something was written: the file's name as given, the line and
/// the column (both from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Why a configuration cannot be used, with where it went wrong. `Display` gives the one line
/// an operator reads: `FILE:LINE:COL: KEY: why`, `--FLAG: why`, or the sentence of a variant
/// without a place.
#[derive(Debug)]
pub enum ConfigError {
    /// The file cannot be read.
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The text is not TOML, or does not have the shape of a config (an unknown key, a value
    /// of the wrong type): the parser's words, the key when one is written on that line, and
    /// a hint when one fits. `at` is `None` when the parser gave no position.
    Toml {
        file: String,
        at: Option<(usize, usize)>,
        key: Option<String>,
        message: String,
        hint: Option<String>,
    },
    /// A well-formed value refused by a check: out of range, unresolvable, in conflict with
    /// another key.
    Value {
        at: Location,
        key: String,
        message: String,
    },
    /// A command-line flag's value refused (`run --listen ...`).
    Flag { flag: &'static str, message: String },
    /// This host refuses a socket option a rule asks for (an unknown device, a mark without
    /// `CAP_NET_ADMIN`, MPTCP disabled): `at` names the rule (and route), `source` the key
    /// and the kernel's answer.
    Host {
        at: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Neither `--config` nor `--listen`/`--upstream` was given.
    NothingToRun,
    /// The configuration has no `[[rule]]`.
    NoRule,
}

impl ConfigError {
    /// Where in the file the error is, when it is in a file and the position is known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Self::Toml {
                file,
                at: Some((line, column)),
                ..
            } => Some(Location {
                file: file.clone(),
                line: *line,
                column: *column,
            }),
            Self::Value { at, .. } => Some(at.clone()),
            Self::Read { .. }
            | Self::Toml { at: None, .. }
            | Self::Host { .. }
            | Self::Flag { .. }
            | Self::NothingToRun
            | Self::NoRule => None,
        }
    }

    /// The key (or flag, without its dashes) the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Toml { key, .. } => key.as_deref(),
            Self::Value { key, .. } => Some(key),
            Self::Flag { flag, .. } => Some(flag),
            Self::Read { .. } | Self::Host { .. } | Self::NothingToRun | Self::NoRule => None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { file, source } => {
                write!(f, "{}: cannot read config: {source}", file.display())
            }
            Self::Toml {
                file,
                at,
                key,
                message,
                hint,
            } => {
                f.write_str(file)?;
                if let Some((line, column)) = at {
                    write!(f, ":{line}:{column}")?;
                }
                if let Some(key) = key {
                    write!(f, ": {key}")?;
                }
                write!(f, ": {message}")?;
                if let Some(hint) = hint {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
            Self::Value { at, key, message } => write!(f, "{at}: {key}: {message}"),
            Self::Flag { flag, message } => write!(f, "--{flag}: {message}"),
            Self::Host { at, source } => write!(f, "{at}: {source}"),
            Self::NothingToRun => f.write_str(
                "nothing to run: give --config FILE, or --listen ADDR --upstream ADDR",
            ),
            Self::NoRule => f.write_str(
                "no rule to run: add a [[rule]] table to the config, or pass --listen and --upstream",
            ),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::Host { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

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
        let (line, column) = self.line_col(span.start);
        ConfigError::Value {
            at: Location {
                file: self.name.to_string(),
                line,
                column,
            },
            key: key.to_string(),
            message: msg.to_string(),
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
