//! Stage one of configuration: the TOML file as written, deserialized with serde.
//!
//! Values that carry a unit are parsed right here (so a bad `"5 fortnights"` is reported at
//! its own line and column), but nothing is resolved or cross-checked: that is
//! [`super::Config::from_raw`]'s job. Every table denies unknown keys.

use serde::{Deserialize, Deserializer};
use std::time::Duration;
use toml::Spanned;

use super::units::{ByteSize, parse_duration, parse_size};

/// A duration written with a unit, e.g. `"5s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(DurationValue)
            .map_err(serde::de::Error::custom)
    }
}

/// A size written with a unit, e.g. `"64KiB"`, or a bare integer of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeValue(pub ByteSize);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Int(u64),
            Text(String),
        }
        match Either::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a size such as \"64KiB\" or a number of bytes")
        })? {
            Either::Int(n) => Ok(SizeValue(ByteSize(n))),
            Either::Text(t) => parse_size(&t)
                .map(SizeValue)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `workers = "auto"` or `workers = 4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkersValue {
    Auto,
    Count(u64),
}

impl<'de> Deserialize<'de> for WorkersValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Int(u64),
            Text(String),
        }
        match Either::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected \"auto\" or a positive number"))?
        {
            Either::Int(n) => Ok(WorkersValue::Count(n)),
            Either::Text(t) if t == "auto" => Ok(WorkersValue::Auto),
            Either::Text(t) => Err(serde::de::Error::custom(format!(
                "invalid workers {t:?}: expected \"auto\" or a positive number"
            ))),
        }
    }
}

/// `keepalive = true`, `keepalive = false`, or a table with the probe timings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(
    untagged,
    expecting = "keepalive must be true, false or a table such as { idle = \"60s\", interval = \"10s\", count = 5 }"
)]
pub enum KeepaliveValue {
    Enabled(bool),
    Tuned(KeepaliveTable),
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveTable {
    pub idle: Option<DurationValue>,
    pub interval: Option<DurationValue>,
    pub count: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub workers: Option<WorkersValue>,
    pub engine: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub shutdown_grace: Option<DurationValue>,
    pub admin: Option<Spanned<String>>,
    pub admin_allow_remote: Option<bool>,
    pub log_format: Option<Spanned<String>>,
    pub access_log: Option<bool>,
    pub hdr_log: Option<Spanned<String>>,
    pub hdr_log_interval: Option<Spanned<DurationValue>>,
    pub uring: Option<RawUring>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUring {
    pub ring_entries: Option<u32>,
    pub buffer_size: Option<SizeValue>,
    pub buffers: Option<u32>,
    pub pipe_size: Option<SizeValue>,
    pub pipes: Option<u32>,
    pub max_connections: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Option<Spanned<String>>,
    pub listen: Spanned<String>,
    pub upstream: Spanned<String>,
    pub nodelay: Option<bool>,
    pub keepalive: Option<KeepaliveValue>,
    pub linger: Option<DurationValue>,
    pub recv_buffer: Option<SizeValue>,
    pub send_buffer: Option<SizeValue>,
    pub connect_timeout: Option<DurationValue>,
    pub idle_timeout: Option<DurationValue>,
    pub tap: Option<String>,
}
