//! `watch_config = true`: reload when the `--config` file changes, once the change has
//! settled.
//!
//! Polled, not inotify: a Kubernetes ConfigMap volume updates by swapping a `..data` symlink
//! to a new directory, which an inotify watch on the file (or on the symlink) does not see.
//! Each poll ([`POLL`]) follows the path through every symlink and compares what it lands on —
//! device, inode, size, modification time — and the resolved path itself; any difference is a
//! change.
//!
//! A change is not applied the moment it is seen: a file rewritten in place (an editor that
//! truncates and writes, `cat > file`, a slow copy) is half-written for a while, and a reload
//! of it fails (counted, and alerted on) or, worse, succeeds with the rules written so far and
//! removes the others, resetting their connections. So ([`Settle`]):
//!
//! 1. the file must look the same at [`SETTLE_POLLS`] polls in a row after the change (size
//!    and modification time unchanged for [`SETTLE`], 500 ms);
//! 2. then it is read and parsed once. If it does not parse, or parses but lacks a rule the
//!    last applied file had, it is *suspicious* (most likely still being written): it must
//!    stay unchanged for [`SUSPECT_SETTLE`] (3 s) before it is applied — a removal the
//!    operator meant, or a broken file they must hear about, is then applied (and a broken one
//!    logged and counted as a failed reload, once);
//! 3. anything that changes the file meanwhile starts the wait over.
//!
//! A ConfigMap swap or an atomic `mv` into place is complete at once and applies after
//! [`SETTLE`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::{Event, Trigger};
use crate::config::Config;

/// How often the file is looked at.
pub const POLL: Duration = Duration::from_millis(250);
/// Polls after the one that saw a change that must see the very same file before it is
/// applied.
pub const SETTLE_POLLS: u32 = 2;
/// How long a change must rest before it is applied: [`SETTLE_POLLS`] × [`POLL`].
pub const SETTLE: Duration = Duration::from_millis(500);
/// Polls a suspicious change (does not parse, or lost rules) must rest: [`SUSPECT_SETTLE`].
pub const SUSPECT_POLLS: u32 = 12;
/// How long a suspicious change must rest before it is applied.
pub const SUSPECT_SETTLE: Duration = Duration::from_secs(3);

// The durations the docs and the log name are the poll counts' (checked when compiling).
const _: () = assert!(SETTLE.as_millis() == POLL.as_millis() * SETTLE_POLLS as u128);
const _: () = assert!(SUSPECT_SETTLE.as_millis() == POLL.as_millis() * SUSPECT_POLLS as u128);

/// What identifies the file's content without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    resolved: Option<PathBuf>,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

/// The file `path` leads to now (following symlinks), or `None` if it cannot be read.
pub fn identity(path: &Path) -> Option<Identity> {
    let m = std::fs::metadata(path).ok()?;
    Some(Identity {
        resolved: std::fs::canonicalize(path).ok(),
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

/// What a settled file holds, as far as deciding whether to apply it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// It parses; the names of its rules.
    Rules(Vec<String>),
    /// It cannot be read or does not parse (the reason, for the log).
    Broken(String),
}

/// Reads and parses the file at `path` (as `run --config` would, without the flags).
pub fn content(path: &Path) -> Content {
    match Config::load(path) {
        Ok(c) => Content::Rules(c.rules.into_iter().map(|r| r.name).collect()),
        Err(e) => Content::Broken(e.to_string()),
    }
}

/// The decision of one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do (no change, or a change still settling).
    Wait,
    /// A settled change looks incomplete; it is applied only if it rests for
    /// [`SUSPECT_SETTLE`]. Returned once per change, for the log.
    Suspicious(String),
    /// Apply the change now.
    Apply,
}

/// The settling logic, poll by poll (see the module docs); no clock, no file access of its
/// own, so it can be tested step by step.
#[derive(Debug)]
pub struct Settle {
    /// The file as last applied (or as the running config was read from).
    applied: Option<Identity>,
    /// The rules of the last applied file that parsed (`None`: not known).
    known: Option<Vec<String>>,
    /// A change being waited for: what the file looks like, the polls since, and (once
    /// settled) what it holds.
    pending: Option<(Identity, u32, Option<Content>)>,
}

impl Settle {
    /// Starts from the file as the running config was read from it (`applied`) and that
    /// config's rules (`known`).
    pub fn new(applied: Option<Identity>, known: Option<Vec<String>>) -> Self {
        Self {
            applied,
            known,
            pending: None,
        }
    }

    /// One poll: the file looks like `now` (`None`: it cannot be read, which is not a change
    /// — mid-swap, or removed); `read` tells what it holds, called at most once per change.
    pub fn poll(&mut self, now: Option<Identity>, read: impl FnOnce() -> Content) -> Step {
        let Some(now) = now else {
            return Step::Wait;
        };
        if Some(&now) == self.applied.as_ref() {
            // Changed back to what runs (or never changed).
            self.pending = None;
            return Step::Wait;
        }
        let polls = match &mut self.pending {
            Some((id, polls, _)) if *id == now => {
                *polls += 1;
                *polls
            }
            _ => {
                // A new change, or the pending one changed again: start over.
                self.pending = Some((now, 0, None));
                return Step::Wait;
            }
        };
        if polls < SETTLE_POLLS {
            return Step::Wait;
        }
        let Some((_, _, cached)) = &mut self.pending else {
            return Step::Wait;
        };
        let first_look = cached.is_none();
        let content = cached.get_or_insert_with(read).clone();
        let suspicion = match &content {
            Content::Broken(why) => Some(format!("it does not parse ({why})")),
            Content::Rules(names) => {
                let lost: Vec<&str> = self
                    .known
                    .iter()
                    .flatten()
                    .filter(|k| !names.contains(k))
                    .map(String::as_str)
                    .collect();
                (!lost.is_empty()).then(|| format!("it lost rule(s) {}", lost.join(", ")))
            }
        };
        if let Some(why) = suspicion
            && polls < SUSPECT_POLLS
        {
            return if first_look {
                Step::Suspicious(why)
            } else {
                Step::Wait
            };
        }
        self.applied = Some(now);
        self.pending = None;
        if let Content::Rules(names) = content {
            self.known = Some(names);
        }
        Step::Apply
    }
}

/// Starts the poller; it asks for a reload while `enabled` holds and the file changed (and
/// settled, see the module docs) since `baseline` (what the running config was read from;
/// `None`: the file as it is now).
///
/// # Errors
/// The thread cannot start.
pub fn spawn(
    path: PathBuf,
    baseline: Option<Identity>,
    enabled: Arc<AtomicBool>,
    events: mpsc::Sender<Event>,
) -> std::io::Result<()> {
    let baseline = baseline.or_else(|| identity(&path));
    // The rules the running config has, as near as the watcher can tell: those of the file
    // now (it was read from it moments ago).
    let known = match content(&path) {
        Content::Rules(names) => Some(names),
        Content::Broken(_) => None,
    };
    let mut settle = Settle::new(baseline, known);
    std::thread::Builder::new()
        .name("ringfwd-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(POLL);
                match settle.poll(identity(&path), || content(&path)) {
                    Step::Wait => {}
                    Step::Suspicious(why) => tracing::info!(
                        path = %path.display(),
                        "config file changed, but {why}: waiting until it has not changed for {SUSPECT_SETTLE:?} before reloading"
                    ),
                    Step::Apply => {
                        if enabled.load(Ordering::Relaxed)
                            && events.send(Event::Reload(Trigger::Watch, None)).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_swap_is_a_change() {
        let dir = std::env::temp_dir().join(format!("ringfwd-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("b")).unwrap();
        std::fs::write(dir.join("a/ringfwd.toml"), "x").unwrap();
        std::fs::write(dir.join("b/ringfwd.toml"), "x").unwrap();
        std::os::unix::fs::symlink("a", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/ringfwd.toml", dir.join("ringfwd.toml")).unwrap();
        let path = dir.join("ringfwd.toml");
        let before = identity(&path).unwrap();
        assert_eq!(identity(&path), Some(before.clone()));
        // What the kubelet does: a new symlink renamed over `..data`.
        std::os::unix::fs::symlink("b", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert_ne!(identity(&path), Some(before));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn id(size: u64) -> Option<Identity> {
        Some(Identity {
            resolved: None,
            dev: 1,
            ino: 1,
            size,
            mtime: (i64::try_from(size).unwrap(), 0),
        })
    }

    fn rules(names: &[&str]) -> Content {
        Content::Rules(names.iter().map(|n| (*n).to_string()).collect())
    }

    #[test]
    fn a_change_applies_once_it_has_rested_for_the_settle_polls() {
        let mut s = Settle::new(id(10), Some(vec!["a".into()]));
        assert_eq!(s.poll(id(10), || unreachable!()), Step::Wait);
        // Growing at every poll: never read, never applied.
        for size in 11..20 {
            assert_eq!(s.poll(id(size), || unreachable!()), Step::Wait);
        }
        assert_eq!(s.poll(id(20), || unreachable!()), Step::Wait);
        assert_eq!(s.poll(id(20), || unreachable!()), Step::Wait);
        assert_eq!(s.poll(id(20), || rules(&["a", "b"])), Step::Apply);
        // Applied: the same file again is no change.
        assert_eq!(s.poll(id(20), || unreachable!()), Step::Wait);
        // An unreadable moment is not a change either.
        assert_eq!(s.poll(None, || unreachable!()), Step::Wait);
        assert_eq!(s.poll(id(20), || unreachable!()), Step::Wait);
    }

    #[test]
    fn a_file_that_lost_rules_or_does_not_parse_must_rest_longer() {
        let mut s = Settle::new(id(10), Some(vec!["a".into(), "b".into()]));
        // Truncated and half rewritten: only rule a so far.
        s.poll(id(5), || unreachable!());
        s.poll(id(5), || unreachable!());
        assert!(matches!(
            s.poll(id(5), || rules(&["a"])),
            Step::Suspicious(why) if why.contains("lost rule(s) b")
        ));
        for _ in SETTLE_POLLS + 1..SUSPECT_POLLS - 1 {
            assert_eq!(s.poll(id(5), || unreachable!()), Step::Wait);
        }
        // The writer goes on: a broken half rule, then the whole file.
        s.poll(id(8), || unreachable!());
        s.poll(id(8), || unreachable!());
        assert!(matches!(
            s.poll(id(8), || Content::Broken("line 9: missing upstream".into())),
            Step::Suspicious(why) if why.contains("does not parse")
        ));
        s.poll(id(12), || unreachable!());
        s.poll(id(12), || unreachable!());
        assert_eq!(s.poll(id(12), || rules(&["a", "b"])), Step::Apply);

        // A removal that is meant (or a broken file) is applied once it has rested long.
        s.poll(id(6), || unreachable!());
        let mut steps = Vec::new();
        for _ in 0..SUSPECT_POLLS {
            steps.push(s.poll(id(6), || rules(&["a"])));
        }
        assert_eq!(steps.last(), Some(&Step::Apply), "{steps:?}");
        assert_eq!(
            steps.iter().filter(|s| **s == Step::Apply).count(),
            1,
            "{steps:?}"
        );
        // It is the new reference: a file without b is no longer suspicious.
        s.poll(id(7), || unreachable!());
        s.poll(id(7), || unreachable!());
        assert_eq!(s.poll(id(7), || rules(&["a", "c"])), Step::Apply);
    }
}
