//! systemd's service notifications (`sd_notify(3)`) and the worker heartbeats the watchdog is
//! fed from.
//!
//! With `NOTIFY_SOCKET` set (a `Type=notify` or `Type=notify-reload` unit), the process says:
//! - `READY=1` once every listener is bound and every worker runs (privileges dropped);
//! - `RELOADING=1` with `MONOTONIC_USEC=…` when a reload starts reading the config, and
//!   `READY=1` when it is done, applied or not (the unit's `ExecReload` is then SIGHUP, sent by
//!   systemd itself under `Type=notify-reload`);
//! - `STOPPING=1` at the first SIGTERM/SIGINT;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, but only while every worker's event loop has
//!   turned within the last `WATCHDOG_USEC`: a worker wedged in a system call or a loop that
//!   never ends stops the pings, and systemd restarts the service (`WatchdogSec=`).
//!
//! Each event loop calls [`beat`] once per turn (the io_uring workers and the `std` engine's
//! accept loop wake at least every 100 ms even when idle; the tokio engine runs a timer task
//! that beats, [`tokio_ticker`]). A thread's heartbeat is registered at its first beat and
//! removed when the thread ends, so generations that drain and exit leave nothing stale
//! behind. Beats cost one relaxed load when no watchdog is asked for.
//!
//! Without `NOTIFY_SOCKET` every call here does nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Whether [`beat`] records anything: set once a watchdog is asked for.
static WATCHING: AtomicBool = AtomicBool::new(false);

/// The heartbeats of the event loops running now.
static BEATS: Mutex<Vec<Arc<Beat>>> = Mutex::new(Vec::new());

/// One event loop's heartbeat: when it last turned, in milliseconds since [`epoch`] (+1, so
/// that 0 means "never").
#[derive(Debug)]
pub struct Beat {
    name: String,
    last_ms: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

fn registry() -> std::sync::MutexGuard<'static, Vec<Arc<Beat>>> {
    BEATS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A registered heartbeat; removed from the registry when dropped.
#[derive(Debug)]
pub struct Heartbeat(Arc<Beat>);

impl Heartbeat {
    /// Registers a heartbeat named `name` (for the log line when it goes stale), beating now.
    pub fn register(name: String) -> Self {
        let beat = Arc::new(Beat {
            name,
            last_ms: AtomicU64::new(now_ms()),
        });
        registry().push(beat.clone());
        Self(beat)
    }

    /// The loop turned.
    #[inline]
    pub fn beat(&self) {
        self.0.last_ms.store(now_ms(), Ordering::Relaxed);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        registry().retain(|b| !Arc::ptr_eq(b, &self.0));
    }
}

thread_local! {
    /// This thread's heartbeat, registered at its first [`beat`], removed at thread exit.
    static MINE: Heartbeat = Heartbeat::register(
        std::thread::current().name().unwrap_or("unnamed").to_string(),
    );
}

/// The calling thread's event loop turned: one call per turn of every engine's loop.
#[inline]
pub fn beat() {
    if WATCHING.load(Ordering::Relaxed) {
        MINE.with(Heartbeat::beat);
    }
}

/// Beats every 100 ms for the tokio engine, whose event loops are the runtime's own: while
/// the runtime can still run a timer task, it is not wedged. Ends with the runtime.
pub async fn tokio_ticker() {
    if !WATCHING.load(Ordering::Relaxed) {
        return;
    }
    let hb = Heartbeat::register("ringfwd-tokio runtime".into());
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        hb.beat();
    }
}

/// The heartbeats that have not beaten within `max_age`, by name.
pub fn stale(max_age: Duration) -> Vec<String> {
    let now = now_ms();
    let max = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    registry()
        .iter()
        .filter(|b| now.saturating_sub(b.last_ms.load(Ordering::Relaxed)) > max)
        .map(|b| b.name.clone())
        .collect()
}

/// Sends `states` to systemd if it listens (`NOTIFY_SOCKET`); a failure is logged, never
/// fatal: the forwarder serves whether or not anyone hears it.
fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// `READY=1`: serving (start-up done, or a reload finished). `status` goes with it as
/// `STATUS=`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` and `MONOTONIC_USEC=` (which `Type=notify-reload` requires with it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog period systemd asks for (`WATCHDOG_USEC`, for this process per
/// `WATCHDOG_PID`), if any. Call before the engines start: it turns the heartbeats on.
pub fn watchdog_period() -> Option<Duration> {
    // Only a service manager that listens asks for a watchdog.
    std::env::var_os("NOTIFY_SOCKET")?;
    let period = watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    WATCHING.store(true, Ordering::Relaxed);
    Some(period)
}

/// The watchdog period from `WATCHDOG_USEC` and `WATCHDOG_PID`, as `sd_watchdog_enabled(3)`
/// reads them: a period above 0, for this process when a pid is given (a pid that is not
/// ours means the variables were inherited from a parent, meant for it).
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec = usec?.trim().parse::<u64>().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// Starts the thread that sends `WATCHDOG=1` every half `period` while every heartbeat is
/// younger than `period`; while one is not, it sends nothing and says which once.
///
/// # Errors
/// The thread cannot start.
pub fn spawn_watchdog(period: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ringfwd-watchdog".into())
        .spawn(move || {
            let mut wedged = false;
            loop {
                let stale = stale(period);
                if stale.is_empty() {
                    if wedged {
                        tracing::info!("every event loop turns again; watchdog pings resume");
                        wedged = false;
                    }
                    send(&[NotifyState::Watchdog]);
                } else if !wedged {
                    wedged = true;
                    tracing::error!(
                        loops = %stale.join(", "),
                        period = ?period,
                        "an event loop has not turned within the watchdog period; withholding WATCHDOG=1 so that systemd restarts the service"
                    );
                }
                std::thread::sleep(period / 2);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_for_this_process_only() {
        let half = Some(Duration::from_millis(500));
        assert_eq!(watchdog_from(Some("500000"), None, 7), half);
        assert_eq!(watchdog_from(Some("500000"), Some("7"), 7), half);
        assert_eq!(watchdog_from(Some("500000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_from(None, Some("7"), 7), None);
    }

    #[test]
    fn a_loop_that_stops_turning_goes_stale_and_one_that_ends_leaves() {
        // 1. A loop that beats, then stops (wedged).
        let hb = Heartbeat::register("test-loop-a".into());
        hb.beat();
        assert!(!stale(Duration::from_secs(60)).contains(&"test-loop-a".to_string()));
        std::thread::sleep(Duration::from_millis(30));
        assert!(stale(Duration::from_millis(10)).contains(&"test-loop-a".to_string()));
        // 2. It turns again: fresh.
        hb.beat();
        assert!(!stale(Duration::from_millis(20)).contains(&"test-loop-a".to_string()));
        // 3. It ends: gone from the registry, never stale.
        drop(hb);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!stale(Duration::from_millis(10)).contains(&"test-loop-a".to_string()));
        // 4. A thread's own heartbeat leaves with the thread.
        WATCHING.store(true, Ordering::Relaxed);
        std::thread::Builder::new()
            .name("test-loop-b".into())
            .spawn(beat)
            .unwrap()
            .join()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert!(!stale(Duration::from_millis(10)).contains(&"test-loop-b".to_string()));
    }
}
