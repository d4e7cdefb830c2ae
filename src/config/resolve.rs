//! Addresses written `host:port`, checked and looked up.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::model::{MemberSpec, Upstream};

/// Resolves "host:port" / "[v6]:port" to one address (the first the resolver gives).
///
/// # Errors
/// A message for the operator.
pub fn resolve_one(text: &str) -> Result<SocketAddr, String> {
    resolve_addrs(text).map(|a| a[0])
}

/// Resolves "host:port" to every address it names (never an empty list).
///
/// # Errors
/// A message for the operator.
pub fn resolve_addrs(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    check_host_port(text)?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
    {
        // The resolver may list an address twice (e.g. two /etc/hosts lines): keep one.
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() {
        return Err(format!("cannot resolve {text:?}: no addresses"));
    }
    Ok(addrs)
}

/// Checks that `text` is written "host:port" (a bracketed IPv6 host, a valid port), without
/// looking anything up.
///
/// # Errors
/// A message for the operator.
pub(super) fn check_host_port(text: &str) -> Result<(), String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} is not an address: expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"
        ));
    };
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        // "fe80::1:8080" could be an address without a port or one with port 8080.
        return Err(format!(
            "{text:?}: an IPv6 address needs brackets around it, e.g. [::1]:8080"
        ));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!("{text:?}: invalid port {port:?}"));
    }
    if host.is_empty() {
        return Err(format!("{text:?}: missing host before the port"));
    }
    Ok(())
}

/// Why an upstream member has no address.
#[derive(Debug)]
pub(super) enum Unresolved {
    /// Written wrong (no port, port 0, an IPv6 address without brackets): a config error.
    Invalid(String),
    /// Well written, but the lookup failed or found nothing now.
    Lookup(String),
}

/// How often a member name that did not resolve is looked up again when its pool has
/// `resolve_interval = "0s"` (resolve only at start), until it resolves once.
pub const UNRESOLVED_RETRY: Duration = Duration::from_secs(5);

/// [`resolve_member`], telling a malformed member from one whose lookup failed.
pub(super) fn lookup_member(text: &str) -> Result<Vec<SocketAddr>, Unresolved> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return resolve_member(&addr.to_string()).map_err(Unresolved::Invalid);
    }
    check_host_port(text).map_err(Unresolved::Invalid)?;
    if text
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse() == Ok(0u16))
    {
        return Err(Unresolved::Invalid(format!(
            "upstream port 0 in {text:?}: give the port the upstream listens on"
        )));
    }
    resolve_member(text).map_err(Unresolved::Lookup)
}

/// Resolves one upstream member's text: [`resolve_addrs`], and no port 0 (a listen address
/// may ask the kernel for any port; a connect cannot).
///
/// # Errors
/// A message for the operator.
pub fn resolve_member(text: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs = resolve_addrs(text)?;
    if addrs.iter().any(|a| a.port() == 0) {
        return Err(format!(
            "upstream port 0 in {text:?}: give the port the upstream listens on"
        ));
    }
    Ok(addrs)
}

/// Resolves the `--upstream` flag: one member, or a comma-separated list of members
/// (`127.0.0.1:9001,127.0.0.1:9002`), each of weight 1, every pool setting at its default.
///
/// # Errors
/// A message for the operator: a member that does not resolve, port 0, an empty member, or an
/// address listed twice.
pub fn resolve_upstream(text: &str) -> Result<Upstream, String> {
    let mut members: Vec<MemberSpec> = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!(
                "{text:?}: empty member in the list; separate members with single commas"
            ));
        }
        let addrs = resolve_member(part)?;
        if let Some((prev, a)) = members.iter().find_map(|m| {
            addrs
                .iter()
                .find(|a| m.addrs.contains(a))
                .map(|a| (&m.text, a))
        }) {
            return Err(format!(
                "{a} is in the pool twice (members {prev:?} and {part:?}); list each address once"
            ));
        }
        members.push(MemberSpec::new(part, addrs));
    }
    Ok(Upstream::with_members(members))
}
