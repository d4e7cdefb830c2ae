//! The traffic tap: a hexdump of both directions of every session of one rule, written to a
//! file by a thread of its own (Go's `io.TeeReader` monitor, made safe for a forwarder).
//!
//! A tap is a debugging aid and must never slow the traffic it watches. The relay hands a copy
//! of each chunk it read to a bounded queue with one non-blocking `try_send` and goes on; the
//! writer thread formats and writes. When the queue is full (the disk is slower than the
//! network) the chunk is dropped and counted, a warning is logged once, and the file gets a
//! line saying how much is missing, so a reader never mistakes a gap for the stream. When a
//! write fails the tap logs once and switches itself off for good; the relay then pays one
//! relaxed atomic load per chunk.
//!
//! File format, one block per event (times are UTC, stamped when the relay read the chunk):
//! ```text
//! 2026-11-22T10:15:03.123456Z #1 open client=127.0.0.1:50000 upstream=127.0.0.1:8080
//! 2026-11-22T10:15:03.123501Z #1 client_to_upstream 11 bytes
//! 00000000  68 65 6c 6c 6f 20 77 6f  72 6c 64                 |hello world|
//! 2026-11-22T10:15:03.123977Z #1 close eof client_to_upstream=11 upstream_to_client=11
//! ```
//! The hex offsets count from the start of that direction of that session.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{CloseReason, Direction};

/// Events the queue holds at most.
const QUEUE_EVENTS: usize = 1024;
/// Payload bytes the queue holds at most (bounds the tap's memory whatever the chunk size).
const QUEUE_BYTES: usize = 8 << 20;
/// The writer's buffer; it is flushed whenever the queue runs empty.
const WRITE_BUFFER: usize = 64 << 10;

/// Why a tap could not start.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap {path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("tap {path}: cannot start the writer thread: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

enum Event {
    Open {
        id: u64,
        at: SystemTime,
        client: Option<SocketAddr>,
        upstream: SocketAddr,
    },
    Data {
        id: u64,
        at: SystemTime,
        dir: Direction,
        offset: u64,
        bytes: Vec<u8>,
    },
    Close {
        id: u64,
        at: SystemTime,
        reason: CloseReason,
        totals: [u64; 2],
    },
}

/// What the relay side and the writer thread share.
struct State {
    path: PathBuf,
    rule: String,
    /// Set for good once a write failed (or the writer is gone).
    off: AtomicBool,
    queued_bytes: AtomicUsize,
    dropped_events: AtomicU64,
    dropped_bytes: AtomicU64,
    warned_drop: AtomicBool,
}

/// One rule's tap. Every method takes `&self` and never blocks.
pub struct Tap {
    tx: SyncSender<Event>,
    state: Arc<State>,
    next_session: AtomicU64,
}

/// One tapped session: its number in the file and how far each direction has got.
/// Owned by the connection (no borrow of the [`Tap`]), so any engine can keep it in its
/// per-connection state.
#[derive(Debug)]
pub struct TapSession {
    id: u64,
    offsets: [AtomicU64; 2],
}

impl TapSession {
    /// The session's number in the tap file (`#N`).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Tap {
    /// Opens (appending to) `path` and starts the writer thread. `rule` names the rule in logs.
    ///
    /// # Errors
    /// The file cannot be opened for appending, or the thread cannot start.
    pub fn open(path: &Path, rule: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| TapError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let (tx, rx) = sync_channel(QUEUE_EVENTS);
        let state = Arc::new(State {
            path: path.to_path_buf(),
            rule: rule.to_string(),
            off: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            dropped_events: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            warned_drop: AtomicBool::new(false),
        });
        let writer_state = state.clone();
        std::thread::Builder::new()
            .name("ringfwd-tap".into())
            .spawn(move || writer(file, &rx, &writer_state))
            .map_err(|source| TapError::Thread {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            tx,
            state,
            next_session: AtomicU64::new(1),
        })
    }

    /// Whether the tap still writes (false after a write error).
    pub fn is_on(&self) -> bool {
        !self.state.off.load(Ordering::Relaxed)
    }

    /// Events (chunks, opens, closes) dropped because the writer fell behind, and the payload
    /// bytes they carried.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.state.dropped_events.load(Ordering::Relaxed),
            self.state.dropped_bytes.load(Ordering::Relaxed),
        )
    }

    /// Starts a session: writes its `open` line and returns the handle the relay passes to
    /// [`Tap::data`] and [`Tap::close_session`].
    pub fn open_session(&self, client: Option<SocketAddr>, upstream: SocketAddr) -> TapSession {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.send(
            Event::Open {
                id,
                at: SystemTime::now(),
                client,
                upstream,
            },
            0,
        );
        TapSession {
            id,
            offsets: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// Records a chunk that was read in direction `dir`. Costs one copy of the chunk and one
    /// non-blocking queue push; drops the chunk (and counts it) when the writer is behind.
    #[inline]
    pub fn data(&self, session: &TapSession, dir: Direction, bytes: &[u8]) {
        let offset = session.offsets[dir as usize].fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if bytes.is_empty() || !self.is_on() {
            return;
        }
        let len = bytes.len();
        if self.state.queued_bytes.load(Ordering::Relaxed) + len > QUEUE_BYTES {
            self.count_drop(len);
            return;
        }
        self.send(
            Event::Data {
                id: session.id,
                at: SystemTime::now(),
                dir,
                offset,
                bytes: bytes.to_vec(),
            },
            len,
        );
    }

    /// Ends a session: writes its `close` line with the reason and the bytes seen each way.
    pub fn close_session(&self, session: TapSession, reason: CloseReason) {
        let totals = [
            session.offsets[0].load(Ordering::Relaxed),
            session.offsets[1].load(Ordering::Relaxed),
        ];
        self.send(
            Event::Close {
                id: session.id,
                at: SystemTime::now(),
                reason,
                totals,
            },
            0,
        );
    }

    fn send(&self, ev: Event, payload: usize) {
        if !self.is_on() {
            return;
        }
        self.state
            .queued_bytes
            .fetch_add(payload, Ordering::Relaxed);
        match self.tx.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.state
                    .queued_bytes
                    .fetch_sub(payload, Ordering::Relaxed);
                self.count_drop(payload);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.state
                    .queued_bytes
                    .fetch_sub(payload, Ordering::Relaxed);
                self.state.off.store(true, Ordering::Relaxed);
            }
        }
    }

    fn count_drop(&self, payload: usize) {
        self.state.dropped_events.fetch_add(1, Ordering::Relaxed);
        self.state
            .dropped_bytes
            .fetch_add(payload as u64, Ordering::Relaxed);
        if !self.state.warned_drop.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                rule = %self.state.rule,
                tap = %self.state.path.display(),
                "tap writer is behind the traffic: dropping chunks (the file notes each gap; this is logged once)"
            );
        }
    }
}

/// The writer thread: formats events and writes them, flushing whenever the queue is empty.
fn writer(file: File, rx: &Receiver<Event>, state: &State) {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut text = String::new();
    let (mut noted_drops, mut noted_bytes) = (0u64, 0u64);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(ev) = next {
            if let Event::Data { bytes, .. } = &ev {
                state.queued_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
            }
            text.clear();
            let drops = state.dropped_events.load(Ordering::Relaxed);
            if drops != noted_drops {
                let bytes = state.dropped_bytes.load(Ordering::Relaxed);
                let _ = writeln!(
                    text,
                    "{} tap dropped {} events ({} bytes) since the last note: the dump has gaps here",
                    format_time(SystemTime::now()),
                    drops - noted_drops,
                    bytes - noted_bytes
                );
                (noted_drops, noted_bytes) = (drops, bytes);
            }
            format_event(&mut text, &ev);
            if let Err(e) = out.write_all(text.as_bytes()) {
                return fail(state, &e);
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            return fail(state, &e);
        }
    }
}

fn fail(state: &State, e: &io::Error) {
    state.off.store(true, Ordering::Relaxed);
    tracing::error!(
        rule = %state.rule,
        tap = %state.path.display(),
        error = %e,
        "tap write failed; the tap is off until restart (traffic is unaffected)"
    );
}

fn format_event(out: &mut String, ev: &Event) {
    match ev {
        Event::Open {
            id,
            at,
            client,
            upstream,
        } => {
            let client = client.map_or_else(|| "-".to_string(), |c| c.to_string());
            let _ = writeln!(
                out,
                "{} #{id} open client={client} upstream={upstream}",
                format_time(*at)
            );
        }
        Event::Data {
            id,
            at,
            dir,
            offset,
            bytes,
        } => {
            let _ = writeln!(
                out,
                "{} #{id} {} {} bytes",
                format_time(*at),
                dir.as_str(),
                bytes.len()
            );
            hexdump(out, *offset, bytes);
        }
        Event::Close {
            id,
            at,
            reason,
            totals,
        } => {
            let _ = writeln!(
                out,
                "{} #{id} close {} client_to_upstream={} upstream_to_client={}",
                format_time(*at),
                reason.as_str(),
                totals[0],
                totals[1]
            );
        }
    }
}

/// `hexdump -C` layout: offset, 16 bytes in two groups of 8, printable ASCII between bars.
pub fn hexdump(out: &mut String, start: u64, bytes: &[u8]) {
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:08x} ", start + 16 * i as u64);
        for j in 0..16 {
            if j == 8 {
                out.push(' ');
            }
            match line.get(j) {
                Some(b) => {
                    let _ = write!(out, " {b:02x}");
                }
                None => out.push_str("   "),
            }
        }
        out.push_str("  |");
        out.extend(line.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
}

/// RFC 3339 UTC with microseconds, without a date crate.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn hexdump_matches_hexdump_c_layout() {
        let mut s = String::new();
        hexdump(&mut s, 0x10, b"hello world, tap!\x00\xff");
        assert_eq!(
            s,
            "00000010  68 65 6c 6c 6f 20 77 6f  72 6c 64 2c 20 74 61 70  |hello world, tap|\n\
             00000020  21 00 ff                                          |!..|\n"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T23:59:59.5Z, a leap day.
        let t = UNIX_EPOCH + Duration::from_micros(1_709_251_199_500_000);
        assert_eq!(format_time(t), "2024-02-29T23:59:59.500000Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_time(t), "2000-02-29T00:00:00.000000Z");
    }

    fn wait_for_file(path: &Path, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(what) {
                return text;
            }
            assert!(Instant::now() < deadline, "{what:?} never written: {text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn sessions_are_written_with_offsets_and_totals() {
        let dir = std::env::temp_dir().join(format!("ringfwd-tap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.tap");
        let _ = std::fs::remove_file(&path);
        let tap = Tap::open(&path, "web").unwrap();
        let up: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let s = tap.open_session(Some("127.0.0.1:5000".parse().unwrap()), up);
        tap.data(&s, Direction::ClientToUpstream, b"GET /");
        tap.data(&s, Direction::ClientToUpstream, b" HTTP/1.0\r\n");
        tap.data(&s, Direction::UpstreamToClient, b"ok");
        let id = s.id();
        tap.close_session(s, CloseReason::Eof);
        let text = wait_for_file(&path, " close ");
        assert!(
            text.contains(&format!(
                "#{id} open client=127.0.0.1:5000 upstream=127.0.0.1:8080"
            )),
            "{text}"
        );
        assert!(text.contains("client_to_upstream 5 bytes\n00000000  47 45 54 20 2f"));
        // The second chunk continues at offset 5 of its direction.
        assert!(text.contains("client_to_upstream 11 bytes\n00000005  20 48 54 54 50"));
        assert!(text.contains("upstream_to_client 2 bytes\n00000000  6f 6b"));
        assert!(text.contains("close eof client_to_upstream=16 upstream_to_client=2"));
        assert_eq!(tap.dropped(), (0, 0));
        assert!(tap.is_on());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tap_that_cannot_write_switches_off_without_blocking() {
        // /dev/full accepts the open but fails every write with ENOSPC.
        let tap = Tap::open(Path::new("/dev/full"), "web").unwrap();
        let up: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let s = tap.open_session(None, up);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tap.is_on() {
            assert!(Instant::now() < deadline, "tap never noticed the failure");
            tap.data(&s, Direction::ClientToUpstream, &[0u8; 4096]);
            std::thread::yield_now();
        }
        // Off: further calls are no-ops and never block.
        for _ in 0..10_000 {
            tap.data(&s, Direction::UpstreamToClient, &[1u8; 4096]);
        }
        tap.close_session(s, CloseReason::Eof);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        // The tap writes into a FIFO that nobody reads until the pushing is done: the writer
        // blocks once the pipe and its buffer are full, so the queue certainly fills, however
        // fast or slow this machine is.
        let dir = std::env::temp_dir().join(format!("ringfwd-tap-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Removed however the test ends (a failed assertion included).
        struct RemoveOnDrop(std::path::PathBuf);
        impl Drop for RemoveOnDrop {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = RemoveOnDrop(dir.clone());
        let path = dir.join("b.tap");
        let _ = std::fs::remove_file(&path);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Opened first, non-blocking, so that the tap's open for writing finds a reader.
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let tap = Tap::open(&path, "web").unwrap();
        let s = tap.open_session(None, "127.0.0.1:1".parse().unwrap());
        let chunk = vec![0x41u8; 256 << 10];
        for _ in 0..(4 * QUEUE_BYTES / chunk.len()) {
            tap.data(&s, Direction::ClientToUpstream, &chunk);
        }
        let (events, bytes) = tap.dropped();
        assert!(
            events > 0,
            "nothing was dropped: the tap waited for its writer"
        );
        assert_eq!(bytes, events * chunk.len() as u64);
        tap.close_session(s, CloseReason::Eof);
        // Now drain the FIFO: the gap note and the close line follow the queued chunks.
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut seen_gap, mut tail, mut buf) = (false, Vec::new(), vec![0u8; 1 << 16]);
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(1)),
                Ok(n) => tail.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&tail);
            seen_gap |= text.contains("the dump has gaps here");
            if text.contains(" close ") {
                break;
            }
            // Keep a window big enough to hold a line split across reads.
            if tail.len() > 1 << 20 {
                tail.drain(..tail.len() - 4096);
            }
            assert!(Instant::now() < deadline, "the close line never came");
        }
        assert!(seen_gap, "gap not noted");
    }
}
