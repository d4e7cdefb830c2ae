//! `watch_config = true`: reload when the `--config` file changes.
//!
//! Polled, not inotify: a Kubernetes ConfigMap volume updates by swapping a `..data` symlink
//! to a new directory, which an inotify watch on the file (or on the symlink) does not see.
//! Each poll follows the path through every symlink and compares what it lands on — device,
//! inode, size, modification time — and the resolved path itself; any difference is a change.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::{Event, Trigger};

/// How often the file is looked at.
pub const POLL: Duration = Duration::from_millis(500);

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

/// Starts the poller; it asks for a reload while `enabled` holds and the file changed.
///
/// # Errors
/// The thread cannot start.
pub fn spawn(
    path: PathBuf,
    enabled: Arc<AtomicBool>,
    events: mpsc::Sender<Event>,
) -> std::io::Result<()> {
    let mut last = identity(&path);
    std::thread::Builder::new()
        .name("ringfwd-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(POLL);
                let now = identity(&path);
                // A file that cannot be read (mid-swap, or removed) is not a change: the next
                // poll that finds it again compares with the last one that was read.
                if now.is_none() || now == last {
                    continue;
                }
                last = now;
                if enabled.load(Ordering::Relaxed)
                    && events.send(Event::Reload(Trigger::Watch, None)).is_err()
                {
                    return;
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
}
