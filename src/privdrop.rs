//! Dropping root once the forwarder is set up: the `user` / `group` config keys.
//!
//! `run` started as root binds its listeners (ports below 1024 included), opens its log and
//! tap files, and sets up every worker (rings, registered buffers, pipes) with root's
//! privileges and without root's resource limits; then, once everything is ready and before
//! the readiness lines are printed, [`drop_to`] switches the **whole process** to the
//! configured user and group:
//!
//! 1. `setgroups`: the user's supplementary groups (from the group database), or none but the
//!    target group;
//! 2. `setresgid(gid, gid, gid)`;
//! 3. `setresuid(uid, uid, uid)`: going from uid 0 to a non-zero uid with no
//!    `SECBIT_KEEP_CAPS` / `SECBIT_NO_SETUID_FIXUP` makes the kernel clear the permitted,
//!    effective and ambient capability sets.
//!
//! At the syscall level Linux changes credentials per thread. The glibc wrappers used here
//! (called through `nix`) apply each change to every thread of the process (nptl's "setxid"
//! broadcast), which is why this module never issues the raw syscalls. [`verify`] then checks
//! the result rather than trusting it: real, effective and saved ids, the group list,
//! `setuid(0)` / `setgid(0)` refused, and every thread in `/proc/self/task/*/status` with the
//! new uid and gid and empty permitted, effective and ambient capability sets.
//!
//! Names are resolved when the config is loaded ([`RunAs::resolve`]), so an unknown user is a
//! config error naming the key, and the drop itself makes no NSS lookups.

use std::ffi::CString;
use std::io;

use nix::errno::Errno;
use nix::unistd::{
    Gid, Group, Uid, User, getgrouplist, getgroups, getresgid, getresuid, setgid, setgroups,
    setresgid, setresuid, setuid,
};

/// Who `run` becomes once it is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The `user` key as written (a name).
    pub user: String,
    pub uid: u32,
    /// The group's name, or its number when the group database has no name for it.
    pub group: String,
    pub gid: u32,
    /// Supplementary groups after the drop: the user's groups in the group database plus
    /// `gid`, sorted and without duplicates.
    pub groups: Vec<u32>,
}

/// One entry of the user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Passwd {
    pub name: String,
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
}

/// Looks a user up by name in the user database (`/etc/passwd`, NSS).
///
/// # Errors
/// The lookup itself failed (not "no such user", which is `Ok(None)`).
pub fn lookup_user(name: &str) -> Result<Option<Passwd>, ResolveError> {
    let found = User::from_name(name).map_err(|source| ResolveError::Lookup {
        what: Entity::User,
        name: name.to_string(),
        source,
    })?;
    Ok(found.map(|u| Passwd {
        name: name.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    }))
}

/// A group by name, or by number (a string of digits with no such name): `(gid, name)`.
///
/// # Errors
/// The lookup itself failed (not "no such group", which is `Ok(None)`).
pub fn lookup_group(name: &str) -> Result<Option<(u32, String)>, ResolveError> {
    let failed = |source| ResolveError::Lookup {
        what: Entity::Group,
        name: name.to_string(),
        source,
    };
    if let Some(g) = Group::from_name(name).map_err(failed)? {
        return Ok(Some((g.gid.as_raw(), g.name)));
    }
    match name.parse::<u32>() {
        Ok(gid) => Ok(Some((gid, group_name(gid)?))),
        Err(_) => Ok(None),
    }
}

/// The name of a group, or its number as text when the database has none.
fn group_name(gid: u32) -> Result<String, ResolveError> {
    let g = Group::from_gid(Gid::from_raw(gid)).map_err(|source| ResolveError::Lookup {
        what: Entity::Group,
        name: gid.to_string(),
        source,
    })?;
    Ok(g.map_or_else(|| gid.to_string(), |g| g.name))
}

/// The groups `user` belongs to in the group database, plus `gid`: sorted, deduplicated.
///
/// # Errors
/// `getgrouplist` failed even with room for every possible group.
pub fn user_groups(user: &str, gid: u32) -> Result<Vec<u32>, ResolveError> {
    let failed = |source| ResolveError::Groups {
        user: user.to_string(),
        source,
    };
    let c = CString::new(user).map_err(|_| failed(Errno::EINVAL))?;
    let mut groups: Vec<u32> = getgrouplist(&c, Gid::from_raw(gid))
        .map_err(failed)?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    groups.push(gid);
    groups.sort_unstable();
    groups.dedup();
    Ok(groups)
}

impl RunAs {
    /// Resolves the `user` key and the optional `group` key (default: the user's primary
    /// group). Error messages name the value, for the config to prefix with file, line and key.
    ///
    /// # Errors
    /// [`ResolveError`]: an empty, unknown or root user or group, or a database that could
    /// not be read.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<Self, ResolveError> {
        if user.is_empty() {
            return Err(ResolveError::NoUser);
        }
        let pw = lookup_user(user)?.ok_or_else(|| ResolveError::UnknownUser(user.to_string()))?;
        if pw.uid == 0 {
            return Err(ResolveError::RootUser(user.to_string()));
        }
        let (gid, group) = match group {
            None => (pw.gid, group_name(pw.gid)?),
            Some("") => return Err(ResolveError::NoGroup),
            Some(g) => lookup_group(g)?.ok_or_else(|| ResolveError::UnknownGroup(g.to_string()))?,
        };
        if gid == 0 {
            return Err(ResolveError::RootGroup(group));
        }
        let groups = user_groups(user, gid)?;
        Ok(Self {
            user: user.to_string(),
            uid: pw.uid,
            group,
            gid,
            groups,
        })
    }
}

/// User or group: which database a lookup went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity {
    User,
    Group,
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::User => "user",
            Self::Group => "group",
        })
    }
}

/// Why the `user` / `group` keys name no one ringfwd can become. The text names the value;
/// the config prefixes file, line and [`ResolveError::key`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("must name a user, such as \"ringfwd\"")]
    NoUser,
    #[error(
        "unknown user {0:?} (no such entry in the user database; create it, e.g. adduser --system --group --no-create-home {0})"
    )]
    UnknownUser(String),
    #[error(
        "{0:?} is uid 0: name an unprivileged user to drop to, or remove the key to keep running as root"
    )]
    RootUser(String),
    #[error("must name a group, such as \"ringfwd\"; remove the key for the user's primary group")]
    NoGroup,
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("group {0:?} is gid 0 (root's group): name an unprivileged group")]
    RootGroup(String),
    /// The user or group database could not be read (NSS failed, not "no such entry").
    #[error("cannot look up {what} {name:?}: {source}")]
    Lookup {
        what: Entity,
        name: String,
        #[source]
        source: Errno,
    },
    /// `getgrouplist` failed even with room for every possible group.
    #[error("cannot list the groups of user {user:?}: {source}")]
    Groups {
        user: String,
        #[source]
        source: Errno,
    },
}

impl ResolveError {
    /// The config key the error belongs to: `"user"` or `"group"`.
    pub fn key(&self) -> &'static str {
        match self {
            Self::NoGroup
            | Self::UnknownGroup(_)
            | Self::RootGroup(_)
            | Self::Lookup {
                what: Entity::Group,
                ..
            } => "group",
            _ => "user",
        }
    }
}

/// Why the process cannot, or did not, become the configured user: it must then not serve,
/// since it may be partly privileged.
#[derive(Debug)]
pub enum PrivDropError {
    /// `user` is set, but the process is neither root (so it cannot switch) nor already that
    /// user and group.
    NeedsRoot {
        user: String,
        uid: u32,
        gid: u32,
        euid: u32,
        egid: u32,
    },
    /// A credential call failed (`setgroups(...)`, `setresgid(...)`, `setresuid(...)`,
    /// `getgroups`).
    Call { call: String, source: io::Error },
    /// The real, effective and saved uids (or gids) are not the asked ones after the switch.
    Ids {
        which: &'static str,
        got: (u32, u32, u32),
        want: (u32, u32, u32),
    },
    /// The supplementary groups are not the asked ones after the switch.
    Groups { got: Vec<u32>, want: Vec<u32> },
    /// `setuid(0)` or `setgid(0)` succeeded after the switch.
    Regainable { call: &'static str },
    /// `/proc/self/task` cannot be listed, so the threads cannot be checked.
    Threads { source: io::Error },
    /// A thread's status file has no credential lines.
    Unreadable { path: std::path::PathBuf },
    /// A thread kept other ids or some capability ([`TaskCreds::mismatch`]).
    Thread {
        tid: String,
        name: String,
        bad: String,
    },
    /// No thread was found to check.
    NoThread,
}

impl std::fmt::Display for PrivDropError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NeedsRoot {
                user,
                uid,
                gid,
                euid,
                egid,
            } => write!(
                f,
                "user = {user:?}: switching to uid {uid} gid {gid} needs root, but ringfwd runs as uid {euid} gid {egid}; start it as root, or as that user and remove the key"
            ),
            Self::Call { call, source } => write!(f, "{call}: {source}"),
            Self::Ids { which, got, want } => {
                write!(f, "{which} are {got:?} after the switch, not {want:?}")
            }
            Self::Groups { got, want } => write!(
                f,
                "supplementary groups are {got:?} after the switch, not {want:?}"
            ),
            Self::Regainable { call } => write!(
                f,
                "{call} succeeded after the switch: {} could be regained",
                if call.starts_with("setuid") {
                    "root"
                } else {
                    "root's group"
                }
            ),
            Self::Threads { source } => write!(
                f,
                "cannot read /proc/self/task to check every thread: {source}"
            ),
            Self::Unreadable { path } => write!(f, "{}: no Uid/Gid/Cap lines", path.display()),
            Self::Thread { tid, name, bad } => write!(f, "thread {tid} ({name}): {bad}"),
            Self::NoThread => f.write_str("no thread found in /proc/self/task to check"),
        }
    }
}

impl std::error::Error for PrivDropError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Call { source, .. } | Self::Threads { source } => Some(source),
            _ => None,
        }
    }
}

/// What `run` does about privileges, decided before anything is bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Root, and `user` is set: drop to it once ready.
    Drop(RunAs),
    /// Root without `user`: keep running as root (warn once).
    StayRoot,
    /// Not root, and either no `user` or already running as exactly that user and group.
    Unprivileged,
}

/// Decides what to do about privileges from who the process is now.
///
/// # Errors
/// `user` is set but the process is neither root nor already that user and group: it could
/// not switch.
pub fn plan(run_as: Option<&RunAs>) -> Result<Plan, PrivDropError> {
    let (ruid, euid, _) = resuid();
    let (_, egid, _) = resgid();
    match run_as {
        Some(r) if euid == 0 => Ok(Plan::Drop(r.clone())),
        None if euid == 0 => Ok(Plan::StayRoot),
        Some(r) if ruid == r.uid && euid == r.uid && egid == r.gid => Ok(Plan::Unprivileged),
        Some(r) => Err(PrivDropError::NeedsRoot {
            user: r.user.clone(),
            uid: r.uid,
            gid: r.gid,
            euid,
            egid,
        }),
        None => Ok(Plan::Unprivileged),
    }
}

fn resuid() -> (u32, u32, u32) {
    // getresuid cannot fail for the calling process.
    getresuid().map_or((u32::MAX, u32::MAX, u32::MAX), |r| {
        (r.real.as_raw(), r.effective.as_raw(), r.saved.as_raw())
    })
}

fn resgid() -> (u32, u32, u32) {
    getresgid().map_or((u32::MAX, u32::MAX, u32::MAX), |r| {
        (r.real.as_raw(), r.effective.as_raw(), r.saved.as_raw())
    })
}

fn check(call: String, r: nix::Result<()>) -> Result<(), PrivDropError> {
    r.map_err(|e| PrivDropError::Call {
        call,
        source: io::Error::from(e),
    })
}

/// Switches every thread of the process to `to` (see the module docs), then [`verify`]s it.
///
/// # Errors
/// A step failed or the result is not what was asked for; the process must then stop, since
/// it may be partly privileged.
pub fn drop_to(to: &RunAs) -> Result<(), PrivDropError> {
    // The glibc wrappers (which nix calls) broadcast each change to every thread of the
    // process.
    let groups: Vec<Gid> = to.groups.iter().copied().map(Gid::from_raw).collect();
    check(format!("setgroups({:?})", to.groups), setgroups(&groups))?;
    let gid = Gid::from_raw(to.gid);
    check(format!("setresgid({})", to.gid), setresgid(gid, gid, gid))?;
    let uid = Uid::from_raw(to.uid);
    check(format!("setresuid({})", to.uid), setresuid(uid, uid, uid))?;
    verify(to)
}

/// Checks that the process is `to` and can't become root again: real, effective and saved
/// uid and gid, the group list, `setuid(0)` and `setgid(0)` refused, and in every thread's
/// `/proc/self/task/*/status` the new ids (all four: real, effective, saved, filesystem) and
/// empty `CapPrm`, `CapEff` and `CapAmb`.
///
/// # Errors
/// The first thing found that is not as it should be.
pub fn verify(to: &RunAs) -> Result<(), PrivDropError> {
    let want_u = (to.uid, to.uid, to.uid);
    let want_g = (to.gid, to.gid, to.gid);
    if resuid() != want_u {
        return Err(PrivDropError::Ids {
            which: "uids",
            got: resuid(),
            want: want_u,
        });
    }
    if resgid() != want_g {
        return Err(PrivDropError::Ids {
            which: "gids",
            got: resgid(),
            want: want_g,
        });
    }
    let groups = current_groups()?;
    if groups != to.groups {
        return Err(PrivDropError::Groups {
            got: groups,
            want: to.groups.clone(),
        });
    }
    // Unprivileged, these fail on the calling thread and are not broadcast; if one succeeded
    // the process would be root again, which is reported.
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivDropError::Regainable { call: "setuid(0)" });
    }
    if setgid(Gid::from_raw(0)).is_ok() {
        return Err(PrivDropError::Regainable { call: "setgid(0)" });
    }
    let tasks =
        std::fs::read_dir("/proc/self/task").map_err(|source| PrivDropError::Threads { source })?;
    let mut checked = 0;
    for task in tasks {
        let Ok(task) = task else { continue };
        let path = task.path().join("status");
        // A thread that exited since the listing has nothing left to check.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(creds) = TaskCreds::parse(&status) else {
            return Err(PrivDropError::Unreadable { path });
        };
        if let Some(bad) = creds.mismatch(to.uid, to.gid) {
            return Err(PrivDropError::Thread {
                tid: task.file_name().to_string_lossy().into_owned(),
                name: creds.name,
                bad,
            });
        }
        checked += 1;
    }
    if checked == 0 {
        return Err(PrivDropError::NoThread);
    }
    Ok(())
}

fn current_groups() -> Result<Vec<u32>, PrivDropError> {
    let mut groups: Vec<u32> = getgroups()
        .map_err(|e| PrivDropError::Call {
            call: "getgroups".into(),
            source: io::Error::from(e),
        })?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Ok(groups)
}

/// The credentials lines of one `/proc/<pid>/task/<tid>/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskCreds {
    pub name: String,
    /// Real, effective, saved, filesystem.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_amb: u64,
}

impl TaskCreds {
    /// Parses the `Name`, `Uid`, `Gid`, `CapPrm`, `CapEff` and `CapAmb` lines.
    pub fn parse(status: &str) -> Option<Self> {
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .map(str::trim)
        };
        let ids = |key: &str| -> Option<[u32; 4]> {
            let v: Vec<u32> = field(key)?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            v.try_into().ok()
        };
        let cap = |key: &str| u64::from_str_radix(field(key)?, 16).ok();
        Some(Self {
            name: field("Name").unwrap_or("?").to_string(),
            uids: ids("Uid")?,
            gids: ids("Gid")?,
            cap_prm: cap("CapPrm")?,
            cap_eff: cap("CapEff")?,
            // Absent before Linux 4.3, where there is no ambient set to hold anything.
            cap_amb: cap("CapAmb").unwrap_or(0),
        })
    }

    /// What is wrong for a thread that should be `uid`/`gid` with no capabilities, if anything.
    pub fn mismatch(&self, uid: u32, gid: u32) -> Option<String> {
        if self.uids != [uid; 4] {
            return Some(format!("uids {:?}, expected {uid} in all four", self.uids));
        }
        if self.gids != [gid; 4] {
            return Some(format!("gids {:?}, expected {gid} in all four", self.gids));
        }
        if self.cap_prm != 0 || self.cap_eff != 0 || self.cap_amb != 0 {
            return Some(format!(
                "capabilities left: CapPrm {:016x} CapEff {:016x} CapAmb {:016x} (securebits keeping capabilities across setuid?)",
                self.cap_prm, self.cap_eff, self.cap_amb
            ));
        }
        None
    }
}

/// The process's effective uid and gid now.
pub fn effective_ids() -> (u32, u32) {
    (resuid().1, resgid().1)
}

/// Whether the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    resuid().1 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tringfwd-w0\nUmask:\t0022\nState:\tS (sleeping)\n\
        Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
        CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";

    #[test]
    fn status_lines_are_parsed() {
        let c = TaskCreds::parse(STATUS).unwrap();
        assert_eq!(c.name, "ringfwd-w0");
        assert_eq!(c.uids, [65534; 4]);
        assert_eq!(c.gids, [65534; 4]);
        assert_eq!((c.cap_prm, c.cap_eff, c.cap_amb), (0, 0, 0));
        assert_eq!(c.mismatch(65534, 65534), None);
        assert!(c.mismatch(65534, 1).unwrap().contains("gids"));
    }

    #[test]
    fn a_saved_root_uid_or_a_capability_is_a_mismatch() {
        let saved = STATUS.replace(
            "Uid:\t65534\t65534\t65534\t65534",
            "Uid:\t65534\t65534\t0\t65534",
        );
        let c = TaskCreds::parse(&saved).unwrap();
        assert!(c.mismatch(65534, 65534).unwrap().contains("uids"));
        let caps = STATUS.replace("CapEff:\t0000000000000000", "CapEff:\t0000000000000400");
        let c = TaskCreds::parse(&caps).unwrap();
        assert!(
            c.mismatch(65534, 65534)
                .unwrap()
                .contains("CapEff 0000000000000400")
        );
    }

    /// The checks report what they found as data, worded by `Display`: a process that has not
    /// switched is caught at its ids, before anything else is looked at.
    #[test]
    fn a_switch_not_made_is_named_by_cause() {
        let (uid, gid) = effective_ids();
        let other = RunAs {
            user: "someone".into(),
            uid: uid + 1,
            group: "them".into(),
            gid: gid + 1,
            groups: vec![gid + 1],
        };
        let e = verify(&other).unwrap_err();
        assert!(
            matches!(&e, PrivDropError::Ids { which: "uids", got, want }
                if got.1 == uid && *want == (uid + 1, uid + 1, uid + 1)),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("uids are ("), "{e}");
        assert!(e.to_string().contains("after the switch, not"), "{e}");
        let e = PrivDropError::NeedsRoot {
            user: "web".into(),
            uid: 1000,
            gid: 1000,
            euid: 1001,
            egid: 1002,
        };
        assert_eq!(
            e.to_string(),
            "user = \"web\": switching to uid 1000 gid 1000 needs root, but ringfwd runs as uid 1001 gid 1002; start it as root, or as that user and remove the key"
        );
        match plan(Some(&other)) {
            Ok(Plan::Drop(to)) => assert!(is_root() && to == other),
            Err(PrivDropError::NeedsRoot { euid, .. }) => assert_eq!(euid, uid),
            other => panic!("{other:?}"),
        }
        let e = PrivDropError::Call {
            call: "setresuid(65534)".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(std::error::Error::source(&e).is_some());
        assert!(
            e.to_string()
                .starts_with("setresuid(65534): Operation not permitted"),
            "{e}"
        );
    }

    #[test]
    fn root_and_unknown_users_are_refused() {
        assert!(matches!(
            RunAs::resolve("root", None),
            Err(ResolveError::RootUser(u)) if u == "root"
        ));
        assert!(matches!(
            RunAs::resolve("ringfwd-no-such-user", None),
            Err(ResolveError::UnknownUser(_))
        ));
        let group = RunAs::resolve("nobody", Some("ringfwd-no-such-group")).unwrap_err();
        assert_eq!(
            group,
            ResolveError::UnknownGroup("ringfwd-no-such-group".into())
        );
        assert_eq!(group.key(), "group");
        assert_eq!(
            RunAs::resolve("nobody", Some("")).unwrap_err().key(),
            "group"
        );
        assert_eq!(RunAs::resolve("", None).unwrap_err().key(), "user");
        let lookup = ResolveError::Lookup {
            what: Entity::Group,
            name: "staff".into(),
            source: Errno::EIO,
        };
        assert_eq!(lookup.key(), "group");
        assert!(std::error::Error::source(&lookup).is_some());
        assert_eq!(
            lookup.to_string(),
            "cannot look up group \"staff\": EIO: I/O error"
        );
        assert_eq!(lookup_user("ringfwd-no-such-user"), Ok(None));
        assert_eq!(lookup_group("ringfwd-no-such-group"), Ok(None));
        assert_eq!(lookup_group("0").unwrap().unwrap().0, 0);
    }
}
