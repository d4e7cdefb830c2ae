//! The pools of a rule: its own (the default route) and its SNI routes', each checked by the
//! same function from the same pool keys.

use std::num::NonZeroU32;
use std::time::Duration;

use super::super::error::Source;
use super::super::model::*;
use super::super::raw::{self, MemberValue, RawPool, RuleKeys, UpstreamValue};
use super::super::resolve::{Unresolved, lookup_member};
use super::super::units::format_duration;
use super::super::{ConfigError, UNRESOLVED_RETRY};

/// A rule's own pool (its default route) and its SNI routes, each with its own pool.
pub(super) fn pools_from_raw(
    r: &RuleKeys,
    pool: &RawPool,
    listen: &Listen,
    src: &Source<'_>,
) -> Result<(Option<Upstream>, Vec<Route>), ConfigError> {
    let upstream = match &r.upstream {
        Some(u) => Some(upstream_from_raw(u, pool, listen, src)?),
        None if r.routes.is_empty() => {
            return Err(src.error_at(
                r.listen.span(),
                "upstream",
                "missing: give the rule an upstream = \"host:port\" (or [[rule.route]] tables with upstreams of their own)",
            ));
        }
        None => {
            if let Some((key, span)) = pool.written(r.listen.span()).into_iter().next() {
                return Err(src.error_at(
                    span,
                    key,
                    "is set but the rule has no upstream of its own (no default route): set it in the [[rule.route]] tables, or give the rule an upstream",
                ));
            }
            None
        }
    };
    let mut routes: Vec<Route> = Vec::with_capacity(r.routes.len());
    // Lower-cased pattern → the route that listed it first.
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (i, route) in r.routes.iter().enumerate() {
        let rr = &route.keys;
        let patterns = rr.sni.get_ref();
        if patterns.is_empty() {
            return Err(src.error_at(
                rr.sni.span(),
                "sni",
                "an empty list matches no connection: list server names such as [\"api.example.com\", \"*.example.com\"]",
            ));
        }
        for p in patterns {
            crate::session::sni::SniRoutes::new(&[(i + 1, vec![p.get_ref().clone()])])
                .map_err(|e| src.error_at(p.span(), "sni", e))?;
        }
        let name = match &rr.name {
            Some(n) if n.get_ref().trim().is_empty() => {
                return Err(src.error_at(n.span(), "name", "must not be empty"));
            }
            Some(n) if n.get_ref() == DEFAULT_ROUTE => {
                return Err(src.error_at(
                    n.span(),
                    "name",
                    "\"default\" names the rule's own upstream: choose another route name",
                ));
            }
            Some(n) => n.get_ref().clone(),
            None => patterns[0].get_ref().to_ascii_lowercase(),
        };
        for p in patterns {
            let key = p.get_ref().to_ascii_lowercase();
            let key = key.strip_suffix('.').unwrap_or(&key).to_string();
            if let Some(prev) = seen.get(&key) {
                return Err(src.error_at(
                    p.span(),
                    "sni",
                    format!(
                        "{:?} is already routed by route {prev:?}: a name goes to one route; remove one of them",
                        p.get_ref()
                    ),
                ));
            }
            seen.insert(key, name.clone());
        }
        if routes.iter().any(|prev| prev.name == name) {
            let span = rr.name.as_ref().map_or_else(|| rr.sni.span(), |n| n.span());
            return Err(src.error_at(
                span,
                "name",
                format!("route name {name:?} is used twice in this rule: give each route a different name"),
            ));
        }
        let upstream = upstream_from_raw(&rr.upstream, &route.pool, listen, src)?;
        routes.push(Route {
            name,
            sni: patterns.iter().map(|p| p.get_ref().clone()).collect(),
            upstream,
        });
    }
    Ok((upstream, routes))
}

/// A pool: its members, resolved and checked, and how to use them.
fn upstream_from_raw(
    upstream: &toml::Spanned<UpstreamValue>,
    pool: &RawPool,
    listen: &Listen,
    src: &Source<'_>,
) -> Result<Upstream, ConfigError> {
    let whole = upstream.span();
    // (where it was written, text, weight, backup)
    let written: Vec<(std::ops::Range<usize>, &str, Option<i64>, bool)> = match upstream.get_ref() {
        UpstreamValue::One(text) => vec![(whole.clone(), text.as_str(), None, false)],
        UpstreamValue::Pool(list) if list.is_empty() => {
            return Err(src.error_at(
                whole,
                "upstream",
                "an empty array has no member to forward to: give at least one \"host:port\"",
            ));
        }
        UpstreamValue::Pool(list) => list
            .iter()
            .map(|m| match m.get_ref() {
                MemberValue::Text(t) => (m.span(), t.as_str(), None, false),
                MemberValue::Table(t) => (
                    m.span(),
                    t.addr.as_str(),
                    t.weight,
                    t.backup.unwrap_or(false),
                ),
            })
            .collect(),
    };
    let mut members: Vec<MemberSpec> = Vec::with_capacity(written.len());
    // Members written with a port range (one-to-one with the listen range), and without.
    let (mut ranged, mut single): (Option<&str>, Option<&str>) = (None, None);
    for (span, written_text, weight, backup) in written {
        let (base, count) = split_port_range(written_text)
            .map_err(|m| src.error_at(span.clone(), "upstream", m))?;
        if count > 1 {
            if !listen.is_range() {
                return Err(src.error_at(
                    span,
                    "upstream",
                    format!(
                        "{written_text:?} is a port range ({count} ports) but listen {listen} is one port: a range maps one-to-one onto a listen range of the same length; give listen a range, or give the upstream one port"
                    ),
                ));
            }
            if count != listen.count {
                return Err(src.error_at(
                    span,
                    "upstream",
                    format!(
                        "{written_text:?} covers {count} ports but listen {listen} covers {}: a one-to-one range must have the listen range's length",
                        listen.count
                    ),
                ));
            }
            ranged.get_or_insert(written_text);
        } else {
            single.get_or_insert(written_text);
        }
        if let (Some(r), Some(s)) = (ranged, single) {
            return Err(src.error_at(
                span,
                "upstream",
                format!(
                    "members {r:?} and {s:?} mix a port range with a single port: in one pool, either every member is a range (one-to-one) or none is"
                ),
            ));
        }
        let text = base.as_str();
        // A name that does not resolve now is a member with no address, down until a later
        // lookup finds one (HAProxy's `init-addr none`): one bad DNS entry must not stop
        // every rule of the host. A malformed member is still an error.
        let addrs = match lookup_member(text) {
            Ok(addrs) => addrs,
            Err(Unresolved::Lookup(why)) => {
                src.warnings.borrow_mut().push(src.at(
                    span.clone(),
                    "upstream",
                    format!(
                        "{why}; the member is down until it resolves (looked up again every {})",
                        format_duration(pool.resolve_interval.as_ref().map_or(
                            DEFAULT_RESOLVE_INTERVAL,
                            |d| {
                                if d.get_ref().0.is_zero() {
                                    UNRESOLVED_RETRY
                                } else {
                                    d.get_ref().0
                                }
                            }
                        ))
                    ),
                ));
                Vec::new()
            }
            Err(Unresolved::Invalid(m)) => return Err(src.error_at(span.clone(), "upstream", m)),
        };
        let weight = match weight {
            None => NonZeroU32::MIN,
            Some(w) => u32::try_from(w)
                .ok()
                .filter(|w| (1..=MAX_WEIGHT).contains(w))
                .and_then(NonZeroU32::new)
                .ok_or_else(|| {
                    src.error_at(
                        span.clone(),
                        "upstream",
                        format!("member {text:?}: weight must be 1..={MAX_WEIGHT}, got {w}"),
                    )
                })?,
        };
        for prev in &members {
            if let Some(a) = addrs.iter().find(|a| prev.addrs.contains(a)) {
                return Err(src.error_at(
                    span,
                    "upstream",
                    format!(
                        "{a} is in the pool twice (members {:?} and {text:?}); list each address once",
                        prev.text
                    ),
                ));
            }
        }
        members.push(MemberSpec {
            text: text.to_string(),
            weight,
            backup,
            addrs,
        });
    }
    if members.iter().all(|m| m.backup) {
        return Err(src.error_at(
            whole,
            "upstream",
            "every member is a backup: at least one member must have backup = false",
        ));
    }
    let mut up = Upstream::with_members(members);
    up.one_to_one = ranged.is_some();
    if let Some(b) = pool.balance.as_ref() {
        up.balance = Balance::parse(b.get_ref()).ok_or_else(|| {
            src.error_at(
                b.span(),
                "balance",
                format!(
                    "unknown balance {:?} (expected one of {})",
                    b.get_ref(),
                    Balance::NAMES
                ),
            )
        })?;
    }
    if let Some(n) = pool.connect_retries.as_ref() {
        up.connect_retries = src.count(n, "connect_retries", 0, MAX_CONNECT_RETRIES)?;
    }
    if let Some(n) = pool.max_fails.as_ref() {
        up.max_fails = src.count(n, "max_fails", 0, MAX_MAX_FAILS)?;
    }
    if let Some(d) = pool.fail_timeout.as_ref() {
        up.fail_timeout =
            src.duration(d, "fail_timeout", None, Duration::ZERO..=MAX_FAIL_TIMEOUT)?;
    }
    if let Some(d) = pool.resolve_interval.as_ref() {
        let d = src.duration(
            d,
            "resolve_interval",
            Some("resolve only at start"),
            RESOLVE_INTERVAL_RANGE,
        )?;
        up.resolve_interval = (!d.is_zero()).then_some(d);
    }
    if let Some(h) = pool.health_check.as_ref() {
        let time = |v: &Option<toml::Spanned<raw::DurationValue>>, key: &str, default| match v {
            None => Ok(default),
            Some(d) => src.duration(
                d,
                &format!("health_check.{key}"),
                None,
                Duration::ZERO..=MAX_HEALTH_TIME,
            ),
        };
        let times = |v: &Option<toml::Spanned<i64>>, key: &str, default: NonZeroU32| match v {
            None => Ok(default),
            Some(n) => src
                .count(n, &format!("health_check.{key}"), 1, MAX_HEALTH_RISE_FALL)
                .map(|n| NonZeroU32::new(n).expect("checked at least 1")),
        };
        let payload = |v: &Option<toml::Spanned<String>>, key: &str| match v {
            None => Ok(None),
            Some(t) if t.get_ref().is_empty() || t.get_ref().len() > MAX_HEALTH_PAYLOAD => Err(src
                .error_at(
                    t.span(),
                    &format!("health_check.{key}"),
                    format!(
                        "must be 1..={MAX_HEALTH_PAYLOAD} bytes, got {} (leave it out to {})",
                        t.get_ref().len(),
                        if key == "send" {
                            "send nothing"
                        } else {
                            "check the connect only"
                        }
                    ),
                )),
            Some(t) => Ok(Some(t.get_ref().clone())),
        };
        up.health_check = Some(HealthCheck {
            interval: time(&h.interval, "interval", DEFAULT_HEALTH_INTERVAL)?,
            timeout: time(&h.timeout, "timeout", DEFAULT_HEALTH_TIMEOUT)?,
            rise: times(&h.rise, "rise", DEFAULT_HEALTH_RISE)?,
            fall: times(&h.fall, "fall", DEFAULT_HEALTH_FALL)?,
            send: payload(&h.send, "send")?,
            expect: payload(&h.expect, "expect")?,
        });
    }
    Ok(up)
}
