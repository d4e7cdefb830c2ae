//! A rate of new connections (`"50/s"`, `"600/m"`), with the burst it allows.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A rate: `count` new connections per `period`, with a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    count: u32,
    period: Duration,
    burst: u32,
}

/// Why a rate was refused, quoting what the operator wrote.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not of the form `N/s`, `N/m` or `N/h`.
    #[error(
        "\"{0}\": expected a number of connections per second, minute or hour, e.g. \"50/s\", \"600/m\""
    )]
    Syntax(String),
    /// A count of zero (it would refuse everything: leave the limit out instead).
    #[error("\"{0}\": the count must be at least 1 (to disable the limit, leave it out)")]
    Zero(String),
}

impl Rate {
    /// `count` connections per `period` (which must be longer than zero), with the default
    /// burst: what the rate allows in one second, rounded up, at least 1.
    ///
    /// # Errors
    /// [`RateError::Zero`] for a zero count, [`RateError::Syntax`] for a zero period.
    pub fn new(count: u32, period: Duration) -> Result<Self, RateError> {
        let shown = || format!("{count}/{period:?}");
        if count == 0 {
            return Err(RateError::Zero(shown()));
        }
        if period.is_zero() {
            return Err(RateError::Syntax(shown()));
        }
        let per_second = (u128::from(count) * 1_000_000_000).div_ceil(period.as_nanos());
        let burst = u32::try_from(per_second).unwrap_or(u32::MAX).max(1);
        Ok(Self {
            count,
            period,
            burst,
        })
    }

    /// Parses `"N/s"`, `"N/m"` or `"N/h"` (spaces around the parts allowed).
    ///
    /// # Errors
    /// [`RateError`] quoting `s`: not of that form, or a count of zero.
    pub fn parse(s: &str) -> Result<Self, RateError> {
        let syntax = || RateError::Syntax(s.to_owned());
        let (n, unit) = s.split_once('/').ok_or_else(syntax)?;
        let (n, unit) = (n.trim(), unit.trim());
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let count: u32 = n.parse().map_err(|_| syntax())?;
        let period = match unit {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(syntax()),
        };
        if count == 0 {
            return Err(RateError::Zero(s.to_owned()));
        }
        Self::new(count, period)
    }

    /// The same rate with another burst (at least 1).
    pub fn with_burst(self, burst: u32) -> Self {
        Self {
            burst: burst.max(1),
            ..self
        }
    }

    /// Connections per period.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The period `count` applies to.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Connections a fresh (or long quiet) address may open at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The steady spacing between connections: `period / count`, rounded up to the
    /// nanosecond (so never faster than configured).
    pub fn interval(&self) -> Duration {
        let ns = self
            .period
            .as_nanos()
            .div_ceil(u128::from(self.count))
            .max(1);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

impl FromStr for Rate {
    type Err = RateError;
    fn from_str(s: &str) -> Result<Self, RateError> {
        Self::parse(s)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period.as_secs() {
            1 if self.period.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.period.subsec_nanos() == 0 => write!(f, "{}/m", self.count),
            3600 if self.period.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{:?}", self.count, self.period),
        }
    }
}
