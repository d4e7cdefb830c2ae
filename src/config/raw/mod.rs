//! Stage one of configuration: the TOML file as written, deserialized with serde.
//!
//! Values that carry a unit are parsed right here (so a bad `"5 fortnights"` is reported at
//! its own line and column), but nothing is resolved or cross-checked: that is
//! the `validate` stage's job. Every table denies unknown keys.

use serde::{Deserialize, Deserializer};
use std::num::NonZeroUsize;
use std::time::Duration;
use toml::Spanned;

use super::units::{ByteSize, format_duration, parse_duration, parse_size};

mod pool;
pub use pool::{RawPool, WithPool};

/// `TCP_KEEPCNT` above this is refused by Linux (`MAX_TCP_KEEPCNT`).
pub const MAX_KEEPALIVE_COUNT: u32 = 127;
/// `TCP_KEEPIDLE` / `TCP_KEEPINTVL` take whole seconds, 1..=32767 (`MAX_TCP_KEEPIDLE`).
pub const KEEPALIVE_TIME_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(32767);

/// A value written either as an integer or as a string; each unit type maps the two cases.
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrText<I> {
    Int(I),
    Text(String),
}

/// An [`IntOrText`], or the error `expected` when the value is neither.
fn int_or_text<'de, D: Deserializer<'de>, I: Deserialize<'de>>(
    d: D,
    expected: &str,
) -> Result<IntOrText<I>, D::Error> {
    IntOrText::deserialize(d).map_err(|_| serde::de::Error::custom(expected))
}

/// A duration written with a unit, e.g. `"5s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match int_or_text::<D, i64>(d, "expected a duration with a unit, such as \"5s\"")? {
            IntOrText::Int(n) => Err(serde::de::Error::custom(format!(
                "invalid duration {n}: a unit is required, written as a string such as \"{n}s\""
            ))),
            IntOrText::Text(t) => parse_duration(&t)
                .map(DurationValue)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A size written with a unit, e.g. `"64KiB"`, or a bare integer of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeValue(pub ByteSize);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match int_or_text::<D, u64>(d, "expected a size such as \"64KiB\" or a number of bytes")? {
            IntOrText::Int(n) => Ok(SizeValue(ByteSize(n))),
            IntOrText::Text(t) => parse_size(&t)
                .map(SizeValue)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `workers = "auto"` or `workers = 4` (1..=1024, checked here so the error has a position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkersValue {
    Auto,
    Count(NonZeroUsize),
}

/// The most worker threads a config may ask for.
pub const MAX_WORKERS: usize = 1024;

impl<'de> Deserialize<'de> for WorkersValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = || format!("expected \"auto\" or 1..={MAX_WORKERS}");
        match int_or_text::<D, i64>(d, &expected())? {
            IntOrText::Int(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_WORKERS)
                .and_then(NonZeroUsize::new)
                .map(WorkersValue::Count)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("invalid workers {n}: {}", expected()))
                }),
            IntOrText::Text(t) if t == "auto" => Ok(WorkersValue::Auto),
            IntOrText::Text(t) => Err(serde::de::Error::custom(format!(
                "invalid workers {t:?}: {}",
                expected()
            ))),
        }
    }
}

/// `keepalive = true`, `keepalive = false`, or a table with the probe timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepaliveValue {
    Enabled(bool),
    Tuned(KeepaliveTable),
}

impl<'de> Deserialize<'de> for KeepaliveValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Not `#[serde(untagged)]`: its error ("data did not match any variant") hides
        // which key of the table was wrong.
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = KeepaliveValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false, or a table such as { idle = \"60s\", interval = \"10s\", count = 5 }")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(KeepaliveValue::Enabled(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let t =
                    KeepaliveTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                if t.count == Some(0) {
                    return Err(serde::de::Error::custom("count must be at least 1"));
                }
                if let Some(c) = t.count.filter(|c| *c > MAX_KEEPALIVE_COUNT) {
                    return Err(serde::de::Error::custom(format!(
                        "count must be 1..={MAX_KEEPALIVE_COUNT} (the kernel's limit), got {c}"
                    )));
                }
                for (key, d) in [("idle", t.idle), ("interval", t.interval)] {
                    if let Some(DurationValue(d)) = d
                        && (!KEEPALIVE_TIME_RANGE.contains(&d) || d.subsec_nanos() != 0)
                    {
                        return Err(serde::de::Error::custom(format!(
                            "{key} must be whole seconds, {}..={} (the kernel's unit and limit), got {}",
                            format_duration(*KEEPALIVE_TIME_RANGE.start()),
                            format_duration(*KEEPALIVE_TIME_RANGE.end()),
                            format_duration(d)
                        )));
                    }
                }
                Ok(KeepaliveValue::Tuned(t))
            }
        }
        d.deserialize_any(Visitor)
    }
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
    pub shutdown_grace: Option<Spanned<DurationValue>>,
    pub shutdown_delay: Option<Spanned<DurationValue>>,
    pub reload_drain_timeout: Option<Spanned<DurationValue>>,
    pub admin: Option<Spanned<String>>,
    pub admin_allow_remote: Option<bool>,
    pub admin_token_file: Option<Spanned<String>>,
    pub log_format: Option<Spanned<String>>,
    pub access_log: Option<bool>,
    pub hdr_log: Option<Spanned<String>>,
    pub hdr_log_interval: Option<Spanned<DurationValue>>,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub control_socket: Option<Spanned<String>>,
    pub watch_config: Option<bool>,
    pub uring: Option<RawUring>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUring {
    pub ring_entries: Option<Spanned<u32>>,
    pub buffer_size: Option<Spanned<SizeValue>>,
    pub buffers: Option<Spanned<u32>>,
    pub pipe_size: Option<Spanned<SizeValue>>,
    pub pipes: Option<Spanned<u32>>,
    pub auto_up_reads: Option<Spanned<u32>>,
    pub auto_down_pumps: Option<Spanned<u32>>,
    pub pin: Option<bool>,
    pub busy_poll: Option<Spanned<DurationValue>>,
    pub wait: Option<Spanned<String>>,
    /// Deprecated: the default of every rule's `max_connections`.
    pub max_connections: Option<Spanned<i64>>,
}

/// The keys of a `[[rule]]` that are its own; its pool keys are in [`RawPool`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleKeys {
    pub name: Option<Spanned<String>>,
    pub listen: Spanned<String>,
    /// Required unless the rule has routes (then it is the default route).
    pub upstream: Option<Spanned<UpstreamValue>>,
    pub max_connections: Option<Spanned<i64>>,
    pub nodelay: Option<bool>,
    pub keepalive: Option<KeepaliveValue>,
    pub linger: Option<Spanned<DurationValue>>,
    pub recv_buffer: Option<SizeValue>,
    pub send_buffer: Option<SizeValue>,
    pub connect_timeout: Option<Spanned<DurationValue>>,
    pub idle_timeout: Option<Spanned<DurationValue>>,
    pub tap: Option<Spanned<String>>,
    pub proxy_protocol: Option<Spanned<String>>,
    pub accept_proxy: Option<Spanned<bool>>,
    pub proxy_trusted: Option<Spanned<CidrList>>,
    pub proxy_header_timeout: Option<Spanned<DurationValue>>,
    pub allow: Option<Spanned<CidrList>>,
    pub deny: Option<Spanned<CidrList>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub max_new_connections_per_ip: Option<Spanned<RateText>>,
    pub per_ip_prefix_v6: Option<Spanned<i64>>,
    pub per_ip_prefix_v4: Option<Spanned<i64>>,
    pub first_byte_timeout: Option<Spanned<DurationValue>>,
    /// Listen with MPTCP (plain TCP clients are served too).
    pub mptcp: Option<Spanned<bool>>,
    /// Per-connection caps, `"10MiB/s"`.
    pub upload_rate: Option<Spanned<String>>,
    pub download_rate: Option<Spanned<String>>,
    /// Upstream side (also on a route): connect from the client's address.
    pub transparent: Option<Spanned<bool>>,
    pub source: Option<Spanned<String>>,
    pub mark: Option<Spanned<i64>>,
    pub interface: Option<Spanned<String>>,
    pub upstream_mptcp: Option<Spanned<bool>>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
}

/// `[[rule]]`: its own keys and its pool's.
pub type RawRule = WithPool<RuleKeys>;

/// The keys of a `[[rule.route]]` that are its own: the TLS server names and the members of
/// the pool their connections go to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteKeys {
    pub name: Option<Spanned<String>>,
    pub sni: Spanned<Vec<Spanned<String>>>,
    pub upstream: Spanned<UpstreamValue>,
    /// Upstream side (also on a route): connect from the client's address.
    pub transparent: Option<Spanned<bool>>,
    pub source: Option<Spanned<String>>,
    pub mark: Option<Spanned<i64>>,
    pub interface: Option<Spanned<String>>,
    pub upstream_mptcp: Option<Spanned<bool>>,
}

/// `[[rule.route]]`: its own keys and its pool's.
pub type RawRoute = WithPool<RouteKeys>;

/// An array of CIDR strings (`allow`, `deny`, `proxy_trusted`), each kept with its position
/// so that a bad entry is reported where it was written. The entries are parsed later, by
/// [`crate::vocab::Cidr::parse`].
#[derive(Debug, Default)]
pub struct CidrList(pub Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for CidrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, so that `allow = "10.0.0.0/8"` says what to write instead of only
        // "invalid type: string, expected a sequence".
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CidrList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an array of addresses or prefixes, such as [\"10.0.0.0/8\", \"2001:db8::/32\"]",
                )
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(e) = seq.next_element::<Spanned<String>>()? {
                    entries.push(e);
                }
                Ok(CidrList(entries))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A rate written as a string, e.g. `"50/s"`; parsed later by
/// [`crate::vocab::Rate::parse`], whose errors quote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateText(pub String);

impl<'de> Deserialize<'de> for RateText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match int_or_text::<D, i64>(
            d,
            "expected a rate such as \"50/s\", \"600/m\" or \"100/h\"",
        )? {
            IntOrText::Int(n) => Err(serde::de::Error::custom(format!(
                "invalid rate {n}: a period is required, written as a string such as \"{n}/s\""
            ))),
            IntOrText::Text(t) => Ok(RateText(t)),
        }
    }
}

/// `[rule.health_check]`: every key optional, an empty table means the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub interval: Option<Spanned<DurationValue>>,
    pub timeout: Option<Spanned<DurationValue>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub send: Option<Spanned<String>>,
    pub expect: Option<Spanned<String>>,
}

/// `upstream = "host:port"` or an array of members (strings or tables, mixed if need be).
#[derive(Debug)]
pub enum UpstreamValue {
    One(String),
    Pool(Vec<Spanned<MemberValue>>),
}

impl<'de> Deserialize<'de> for UpstreamValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than `#[serde(untagged)]`, whose "did not match any variant" would
        // hide which member was wrong and why.
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UpstreamValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"host:port\", or an array of \"host:port\" strings or { addr = \"host:port\", weight = N, backup = BOOL } tables")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(UpstreamValue::One(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(m) = seq.next_element::<Spanned<MemberValue>>()? {
                    members.push(m);
                }
                Ok(UpstreamValue::Pool(members))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// One member of an `upstream` array: `"host:port"` or `{ addr, weight, backup }`.
#[derive(Debug)]
pub enum MemberValue {
    Text(String),
    Table(RawMember),
}

impl<'de> Deserialize<'de> for MemberValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = MemberValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a member \"host:port\" or { addr = \"host:port\", weight = N, backup = BOOL }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MemberValue::Text(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawMember::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(MemberValue::Table)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMember {
    pub addr: String,
    pub weight: Option<i64>,
    pub backup: Option<bool>,
}
