//! The member API's commands: `POST /upstreams/RULE/MEMBER?state=drain|up|down` and
//! `?weight=N`, read from the request and carried out on the serving config's pools.
//!
//! A command names a rule (`web`, or `web/ROUTE` for one SNI route's pool) and a member as the
//! pool shows it: its address (`10.0.0.1:80`, `[2001:db8::1]:80`) or its name as written in the
//! config (`api.svc:80`, which takes in every address the name resolved to). Parsing is I/O
//! free and tested here; the admin endpoint answers with what [`apply`] says, and the control
//! plane runs it on its own thread so that it never interleaves with a reload (which carries
//! every member's state over to the next config, [`super::Pool::inherit_admin`]).

use std::fmt;

use super::Pool;
use super::member::AdminState;
use crate::config::MAX_WEIGHT;

/// What to change on a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    State(AdminState),
    /// 1..=[`MAX_WEIGHT`].
    Weight(u32),
}

/// One member API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub rule: String,
    /// Only this route's pool (`RULE/ROUTE/MEMBER`); every pool of the rule when `None`.
    pub route: Option<String>,
    pub member: String,
    pub change: Change,
}

/// Why a member command was not carried out; each maps to an HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error(
        "usage: POST /upstreams/RULE/MEMBER?state=up|drain|down or ?weight=N (RULE/ROUTE/MEMBER for one SNI route)"
    )]
    Usage,
    #[error("unknown state {0:?} (expected one of {names})", names = AdminState::NAMES)]
    State(String),
    #[error("weight must be 1..={MAX_WEIGHT}, got {0:?}")]
    Weight(String),
    #[error("unknown rule {rule:?} (rules: {known})")]
    UnknownRule { rule: String, known: String },
    #[error("rule {rule:?} has no member {member:?} (members: {known})")]
    UnknownMember {
        rule: String,
        member: String,
        known: String,
    },
    /// No config serves yet, or the process is stopping.
    #[error("{0}")]
    Unavailable(String),
}

impl CommandError {
    /// The HTTP status the admin endpoint answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Usage | Self::State(_) | Self::Weight(_) => 400,
            Self::UnknownRule { .. } | Self::UnknownMember { .. } => 404,
            Self::Unavailable(_) => 503,
        }
    }
}

impl Command {
    /// Reads a command from the path after `/upstreams/` (percent-encoded segments) and the
    /// query string.
    ///
    /// # Errors
    /// The path or query is not a member command.
    pub fn parse(rest: &str, query: &str) -> Result<Self, CommandError> {
        let segments: Vec<String> = rest
            .split('/')
            .map(|s| {
                form_urlencoded::parse(format!("s={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let (rule, route, member) = match segments.as_slice() {
            [rule, member] => (rule.clone(), None, member.clone()),
            [rule, route, member] => (rule.clone(), Some(route.clone()), member.clone()),
            _ => return Err(CommandError::Usage),
        };
        if rule.is_empty() || member.is_empty() || route.as_deref() == Some("") {
            return Err(CommandError::Usage);
        }
        let mut change = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let c = match &*k {
                "state" => Change::State(
                    AdminState::parse(&v).ok_or_else(|| CommandError::State(v.to_string()))?,
                ),
                "weight" => Change::Weight(
                    v.parse::<u32>()
                        .ok()
                        .filter(|w| (1..=MAX_WEIGHT).contains(w))
                        .ok_or_else(|| CommandError::Weight(v.to_string()))?,
                ),
                _ => return Err(CommandError::Usage),
            };
            // One change per request: "state and weight at once" has no order to apply in.
            if change.replace(c).is_some() {
                return Err(CommandError::Usage);
            }
        }
        Ok(Self {
            rule,
            route,
            member,
            change: change.ok_or(CommandError::Usage)?,
        })
    }
}

/// One pool of the serving config: `(rule, route, pool)`.
pub type NamedPool<'a> = (&'a str, &'a str, &'a Pool);

/// What a command did to one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    pub rule: String,
    pub route: String,
    pub addr: std::net::SocketAddr,
    pub before: String,
    pub after: String,
}

impl fmt::Display for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}: {} (was {})",
            self.rule, self.route, self.addr, self.after, self.before
        )
    }
}

/// Carries `cmd` out on `pools`: every member of the named rule (and route) whose address or
/// config name is `cmd.member`. Returns one [`Done`] per member changed.
///
/// # Errors
/// No such rule, route or member.
pub fn apply(pools: &[NamedPool<'_>], cmd: &Command) -> Result<Vec<Done>, CommandError> {
    let of_rule: Vec<&NamedPool<'_>> = pools
        .iter()
        .filter(|(rule, route, _)| {
            *rule == cmd.rule && cmd.route.as_deref().is_none_or(|r| r == *route)
        })
        .collect();
    if of_rule.is_empty() {
        let mut known: Vec<String> = pools.iter().map(|(r, _, _)| format!("{r:?}")).collect();
        known.dedup();
        return Err(CommandError::UnknownRule {
            rule: match &cmd.route {
                Some(route) => format!("{}/{route}", cmd.rule),
                None => cmd.rule.clone(),
            },
            known: known.join(", "),
        });
    }
    let mut done = Vec::new();
    for (rule, route, pool) in &of_rule {
        for m in &pool.members().members {
            if m.addr.to_string() != cmd.member && *m.name != *cmd.member {
                continue;
            }
            let (before, after) = match cmd.change {
                Change::State(s) => (m.set_admin(s).as_str().to_string(), s.as_str().to_string()),
                Change::Weight(w) => (format!("weight {}", m.set_weight(w)), format!("weight {w}")),
            };
            done.push(Done {
                rule: (*rule).to_string(),
                route: (*route).to_string(),
                addr: m.addr,
                before,
                after,
            });
        }
    }
    if done.is_empty() {
        let mut known: Vec<String> = of_rule
            .iter()
            .flat_map(|(_, _, p)| {
                p.members()
                    .members
                    .iter()
                    .map(|m| m.addr.to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        known.sort();
        known.dedup();
        return Err(CommandError::UnknownMember {
            rule: cmd.rule.clone(),
            member: cmd.member.clone(),
            known: known.join(", "),
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MemberSpec, Upstream};
    use std::time::Instant;

    fn pool(rule: &str, members: &[(&str, &[&str])]) -> Pool {
        Pool::new(
            rule,
            &Upstream::with_members(
                members
                    .iter()
                    .map(|(text, addrs)| {
                        MemberSpec::new(*text, addrs.iter().map(|a| a.parse().unwrap()).collect())
                    })
                    .collect(),
            ),
            Instant::now(),
        )
    }

    #[test]
    fn commands_are_read_from_path_and_query() {
        let c = Command::parse("web/10.0.0.1:80", "state=drain").unwrap();
        assert_eq!(
            c,
            Command {
                rule: "web".into(),
                route: None,
                member: "10.0.0.1:80".into(),
                change: Change::State(AdminState::Drain),
            }
        );
        let c = Command::parse("tls/api/%5B2001%3Adb8%3A%3A1%5D%3A443", "weight=7").unwrap();
        assert_eq!(c.route.as_deref(), Some("api"));
        assert_eq!(c.member, "[2001:db8::1]:443");
        assert_eq!(c.change, Change::Weight(7));
        // Bad input, each with its own words.
        assert_eq!(Command::parse("web", "state=up"), Err(CommandError::Usage));
        assert_eq!(Command::parse("web/m", ""), Err(CommandError::Usage));
        assert_eq!(
            Command::parse("web/m", "state=up&weight=2"),
            Err(CommandError::Usage)
        );
        assert_eq!(
            Command::parse("web/m", "state=maint"),
            Err(CommandError::State("maint".into()))
        );
        for w in ["0", "1001", "x", "-1"] {
            assert_eq!(
                Command::parse("web/m", &format!("weight={w}")),
                Err(CommandError::Weight(w.into()))
            );
        }
        assert!(
            CommandError::State("maint".into())
                .to_string()
                .contains("up, drain, down")
        );
    }

    #[test]
    fn a_command_reaches_members_by_address_or_name_and_names_what_exists() {
        let web = pool(
            "web",
            &[
                ("api.svc:80", &["10.0.0.1:80", "10.0.0.2:80"]),
                ("10.0.0.3:80", &["10.0.0.3:80"]),
            ],
        );
        let db = pool("db", &[("10.0.0.9:5432", &["10.0.0.9:5432"])]);
        let pools = [("web", "default", &web), ("db", "default", &db)];
        // 1. By address: that member only.
        let cmd = Command::parse("web/10.0.0.3:80", "state=down").unwrap();
        let done = apply(&pools, &cmd).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(
            done[0].to_string(),
            "web default 10.0.0.3:80: down (was up)"
        );
        assert_eq!(web.members().members[2].admin(), AdminState::Down);
        // 2. By config name: every address it resolved to.
        let cmd = Command::parse("web/api.svc:80", "weight=4").unwrap();
        let done = apply(&pools, &cmd).unwrap();
        assert_eq!(done.len(), 2);
        assert!(web.members().members[..2].iter().all(|m| m.weight() == 4));
        assert_eq!(done[0].before, "weight 1");
        // 3. Unknown rule or member: what exists.
        let e = apply(&pools, &Command::parse("cache/x:1", "state=up").unwrap()).unwrap_err();
        assert_eq!(e.status(), 404);
        assert!(e.to_string().contains("\"web\", \"db\""), "{e}");
        let e = apply(
            &pools,
            &Command::parse("db/10.0.0.1:80", "state=up").unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "rule \"db\" has no member \"10.0.0.1:80\" (members: 10.0.0.9:5432)"
        );
        let e = apply(
            &pools,
            &Command::parse("web/other/10.0.0.3:80", "state=up").unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown rule \"web/other\""), "{e}");
    }
}
