//! The upstream-side keys of a rule or route — `transparent`, `source`, `mark`, `interface`,
//! `upstream_mptcp` — checked and turned into an [`Egress`](crate::config::Egress).
//!
//! A rule's keys apply to its own pool and are the defaults of its routes; a route's own key
//! overrides the rule's. What only the host can tell (a capability, a device, an address the
//! host owns, MPTCP in the kernel) is probed later, by [`Config::ensure_runnable`](super::super::Config::ensure_runnable),
//! so that `ringfwd check` and a reload see it too.

use std::net::IpAddr;

use toml::Spanned;

use super::super::ConfigError;
use super::super::error::Source;
use super::super::raw::{RouteKeys, RuleKeys};
use crate::config::Egress;

/// Longest device name Linux takes (`IFNAMSIZ` less the NUL).
const MAX_INTERFACE_LEN: usize = 15;

/// The upstream-side keys as written in one table.
pub(super) struct EgressKeys<'a> {
    transparent: Option<&'a Spanned<bool>>,
    source: Option<&'a Spanned<String>>,
    mark: Option<&'a Spanned<i64>>,
    interface: Option<&'a Spanned<String>>,
    upstream_mptcp: Option<&'a Spanned<bool>>,
}

/// The [`EgressKeys`] of a raw table that has the five keys as fields (a rule's or a route's).
macro_rules! egress_keys_of {
    ($r:expr) => {
        EgressKeys {
            transparent: $r.transparent.as_ref(),
            source: $r.source.as_ref(),
            mark: $r.mark.as_ref(),
            interface: $r.interface.as_ref(),
            upstream_mptcp: $r.upstream_mptcp.as_ref(),
        }
    };
}

impl<'a> EgressKeys<'a> {
    pub(super) fn of_rule(r: &'a RuleKeys) -> Self {
        egress_keys_of!(r)
    }

    pub(super) fn of_route(r: &'a RouteKeys) -> Self {
        egress_keys_of!(r)
    }

    /// The first key written here that needs `CAP_NET_ADMIN` when sockets are opened, with
    /// where it was written.
    fn needing_net_admin(&self) -> Option<(&'static str, std::ops::Range<usize>)> {
        self.transparent
            .filter(|t| *t.get_ref())
            .map(|t| ("transparent", t.span()))
            .or_else(|| self.mark.map(|m| ("mark", m.span())))
    }

    /// These keys over `inherit` (the rule's egress, for a route; the default, for a rule).
    pub(super) fn resolve(
        &self,
        inherit: &Egress,
        src: &Source<'_>,
    ) -> Result<Egress, ConfigError> {
        let mut out = inherit.clone();
        if let (Some(t), Some(s)) = (self.transparent, self.source)
            && *t.get_ref()
        {
            return Err(src.error_at(
                s.span(),
                "source",
                "cannot be set with transparent = true, which connects from each client's own address: remove one of them",
            ));
        }
        if let Some(t) = self.transparent {
            out.transparent = *t.get_ref();
            if out.transparent {
                out.source = None;
            }
        }
        if let Some(s) = self.source {
            out.source = Some(source(s, src)?);
            out.transparent = false;
        }
        if let Some(m) = self.mark {
            let mark = src.count(m, "mark", 1, u32::MAX)?;
            out.mark = Some(mark);
        }
        if let Some(i) = self.interface {
            out.interface = Some(interface(i, src)?);
        }
        if let Some(m) = self.upstream_mptcp {
            out.mptcp = *m.get_ref();
        }
        Ok(out)
    }
}

fn source(s: &Spanned<String>, src: &Source<'_>) -> Result<IpAddr, ConfigError> {
    let ip: IpAddr = s.get_ref().parse().map_err(|_| {
        src.error_at(
            s.span(),
            "source",
            format!(
                "{:?} is not an IP address (give one of this host's addresses, without a port, e.g. \"192.0.2.10\" or \"2001:db8::10\")",
                s.get_ref()
            ),
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(src.error_at(
            s.span(),
            "source",
            format!("{ip} is not an address a connection can come from: give one of this host's addresses, or remove source"),
        ));
    }
    Ok(ip)
}

fn interface(s: &Spanned<String>, src: &Source<'_>) -> Result<String, ConfigError> {
    let name = s.get_ref();
    let bad = name.is_empty()
        || name.len() > MAX_INTERFACE_LEN
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(src.error_at(
            s.span(),
            "interface",
            format!(
                "{name:?} is not a network device name (1 to {MAX_INTERFACE_LEN} characters, no '/', ':' or spaces), e.g. \"eth1\" or a VRF's name"
            ),
        ));
    }
    Ok(name.clone())
}

/// Smallest and largest `upload_rate` / `download_rate`, bytes per second: below 1 KiB/s a
/// single full-sized segment takes more than a second; above 1 TiB/s is no cap.
pub(super) const RATE_RANGE: std::ops::RangeInclusive<u64> = 1 << 10..=1 << 40;

/// An `upload_rate` / `download_rate` value: a size per second, `"10MiB/s"`.
pub(super) fn rate(
    s: &Spanned<String>,
    key: &str,
    src: &Source<'_>,
) -> Result<super::super::ByteSize, ConfigError> {
    let text = s.get_ref();
    let size = text
        .trim()
        .strip_suffix("/s")
        .ok_or_else(|| {
            format!("invalid rate {text:?}: a size per second is required, such as \"10MiB/s\"")
        })
        .and_then(super::super::parse_size)
        .map_err(|m| src.error_at(s.span(), key, m))?;
    if size.0 == 0 {
        return Err(src.error_at(
            s.span(),
            key,
            format!(
                "{text:?} would never send a byte: remove {key} for no cap, or give at least 1KiB/s"
            ),
        ));
    }
    if !RATE_RANGE.contains(&size.0) {
        return Err(src.error_at(
            s.span(),
            key,
            format!("must be 1KiB/s..=1024GiB/s, got {text:?}"),
        ));
    }
    Ok(size)
}

/// Refuses `transparent` and `mark` together with `user`: opening such sockets needs
/// `CAP_NET_ADMIN` in every worker thread, and the switch to `user` clears every capability.
/// The way to keep exactly that one is to start as the user with it as an ambient
/// capability (the systemd unit's `AmbientCapabilities=`), which needs no switch.
pub(super) fn check_no_switch(r: &RuleKeys, src: &Source<'_>) -> Result<(), ConfigError> {
    let found = EgressKeys::of_rule(r).needing_net_admin().or_else(|| {
        r.routes
            .iter()
            .find_map(|route| EgressKeys::of_route(&route.keys).needing_net_admin())
    });
    match found {
        None => Ok(()),
        Some((key, span)) => Err(src.error_at(
            span,
            key,
            "needs CAP_NET_ADMIN while the forwarder runs, but the switch to `user` gives up every capability: remove `user` and start ringfwd as that user with CAP_NET_ADMIN as an ambient capability (systemd: User= and AmbientCapabilities=CAP_NET_ADMIN; see docs/DEPLOY.md)",
        )),
    }
}
