//! The JSON document served at `/upstreams` and read by `ringfwd stats`: every rule's pool,
//! each member with its state, load, counters and last error.
//!
//! One set of types serves both ends, like [`super::report`].

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::session::Runtime;
use crate::session::outcome::ConnectError;

/// The whole `/upstreams` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamsReport {
    pub rules: Vec<PoolReport>,
}

/// One pool of a rule: its own upstream (route `default`) or an SNI route's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolReport {
    pub rule: String,
    #[serde(default = "default_route")]
    pub route: String,
    pub balance: String,
    pub members: Vec<MemberReport>,
}

/// One member: `addr` is the address connected to, `name` the member as written in the
/// config (the host name it resolved from, or the address itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    pub addr: String,
    pub name: String,
    pub weight: u32,
    pub backup: bool,
    /// Takes new connections: healthy and in rotation (`state` is `up`).
    pub up: bool,
    /// What the operator set through the member API: `up`, `drain` or `down`.
    #[serde(default = "default_state")]
    pub state: String,
    pub active: u64,
    /// Connections established to this member.
    pub connections: u64,
    /// Failed connects, all reasons together.
    pub connect_errors: u64,
    /// Failed connects by reason (`refused`, `timeout`, `unreachable`, `other`).
    pub connect_errors_by_reason: BTreeMap<String, u64>,
    /// Active health checks by result (`ok`, `fail`).
    pub health_checks: BTreeMap<String, u64>,
    /// The member's last failure (connect or health check); `null` once it answered again
    /// (a connect or a check passed).
    pub last_error: Option<String>,
    /// When `last_error` happened, Unix seconds; `null` with it.
    #[serde(default)]
    pub last_error_at: Option<u64>,
}

fn default_state() -> String {
    "up".to_string()
}

fn default_route() -> String {
    crate::config::DEFAULT_ROUTE.to_string()
}

impl UpstreamsReport {
    /// Every pool's members now.
    pub fn collect(runtime: &Runtime) -> Self {
        let now = Instant::now();
        Self {
            rules: runtime
                .rules
                .iter()
                .flat_map(|r| r.pools.iter().map(move |p| (r, p)))
                .map(|(r, p)| PoolReport {
                    rule: r.rule.name.clone(),
                    route: p.route.clone(),
                    balance: p.pool.balance.as_str().to_string(),
                    members: p
                        .pool
                        .snapshot(now)
                        .into_iter()
                        .map(|m| MemberReport {
                            addr: m.addr.to_string(),
                            name: m.name,
                            weight: m.weight,
                            backup: m.backup,
                            up: m.up,
                            state: m.admin.as_str().to_string(),
                            active: m.active,
                            connections: m.connections,
                            connect_errors: m.connect_errors.iter().sum(),
                            connect_errors_by_reason: ConnectError::ALL
                                .iter()
                                .map(|e| (e.as_str().to_string(), m.connect_errors[*e as usize]))
                                .collect(),
                            health_checks: [("ok", m.checks[0]), ("fail", m.checks[1])]
                                .into_iter()
                                .map(|(k, v)| (k.to_string(), v))
                                .collect(),
                            last_error: m.last_error,
                            last_error_at: m.last_error_at,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}
