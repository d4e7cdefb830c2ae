//! The HdrHistogram interval log: every `hdr_log_interval`, what each rule's histograms
//! recorded during that interval, written by a background thread in HdrHistogram's standard
//! interval-log format (V2 + DEFLATE, base64), one line per rule and histogram.
//!
//! Lines are tagged `Tag=<rule>.<metric>` (e.g. `web.upstream_connect`; characters a tag may
//! not hold — space, comma, CR, LF — become `_`). Values are microseconds. Timestamps are
//! seconds since the `#[StartTime]` header, as the Java `HistogramLogWriter` writes them, so
//! `HistogramLogProcessor -tag web.first_byte` and HistogramLogAnalyzer read the file as is.
//!
//! Intervals are deltas of the cumulative shards: the thread keeps the previous merged
//! snapshot and subtracts it. Every bucket counter only grows, so the subtraction is exact
//! even though a snapshot is not one atomic read. The file is truncated at start (one run,
//! one log) and each interval is written with one `write` call; [`HdrLog::finish`] writes the last, partial one.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};

use super::{HistogramKind, Metrics};

/// Why the interval log could not start.
#[derive(Debug, thiserror::Error)]
pub enum HdrLogError {
    #[error("hdr_log {path}: cannot create: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("hdr_log: cannot start the writer thread: {0}")]
    Thread(io::Error),
}

/// A running interval-log writer. Dropping it without [`HdrLog::finish`] leaves the thread
/// running until the process exits (every finished interval is in the file regardless).
pub struct HdrLog {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl HdrLog {
    /// Creates (truncates) `path`, writes the header and starts writing one interval every
    /// `interval`.
    ///
    /// # Errors
    /// The file cannot be created, or the thread cannot start.
    pub fn start(
        path: &Path,
        interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, HdrLogError> {
        let file = File::create(path).map_err(|source| HdrLogError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        // The baseline is taken here, not on the thread, so the first interval holds exactly
        // what is recorded after `start` returns.
        let baseline = baseline(&metrics);
        let started = (Instant::now(), SystemTime::now());
        let (stop, stopped) = channel();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("ringfwd-hdrlog".into())
            .spawn(move || {
                if let Err(e) = run(file, interval, &metrics, baseline, started, &stopped) {
                    tracing::error!(hdr_log = %path.display(), error = %e, "HDR interval log stopped");
                }
            })
            .map_err(HdrLogError::Thread)?;
        Ok(Self { stop, thread })
    }

    /// Writes the last (partial) interval, flushes and stops the thread.
    pub fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// A tag for `rule` and `kind`, with the characters tags may not contain replaced.
pub fn tag_for(rule: &str, kind: HistogramKind) -> String {
    let rule: String = rule
        .chars()
        .map(|c| match c {
            ' ' | ',' | '\r' | '\n' => '_',
            c => c,
        })
        .collect();
    format!("{rule}.{}", kind.as_str())
}

/// Every rule's histograms now, in [`HistogramKind::ALL`] order.
fn baseline(metrics: &Metrics) -> Vec<Vec<Histogram<u64>>> {
    metrics
        .rules()
        .iter()
        .map(|r| {
            let s = r.snapshot();
            HistogramKind::ALL.map(|k| s.histogram(k).clone()).to_vec()
        })
        .collect()
}

fn run(
    mut file: File,
    interval: Duration,
    metrics: &Metrics,
    mut previous: Vec<Vec<Histogram<u64>>>,
    (start, start_wall): (Instant, SystemTime),
    stopped: &Receiver<()>,
) -> io::Result<()> {
    // Each interval is formatted into `buf` and written with one call, so the file only ever
    // holds whole lines and needs no flush (the interval-log writer borrows its output and
    // cannot flush it).
    let mut buf = Vec::with_capacity(64 << 10);
    let mut serializer = V2DeflateSerializer::new();
    IntervalLogWriterBuilder::new()
        .add_comment("[Logged with ringfwd; values in microseconds; Tag=<rule>.<metric>]")
        .add_comment("[Histogram log format version 1.3]")
        .with_start_time(start_wall)
        .begin_log_with(&mut buf, &mut serializer)?;
    file.write_all(&buf)?;
    let tags: Vec<Vec<String>> = metrics
        .rules()
        .iter()
        .map(|r| HistogramKind::ALL.map(|k| tag_for(&r.name, k)).to_vec())
        .collect();
    let mut interval_start = start;
    let mut next = start + interval;
    loop {
        let last = match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
        };
        let now = Instant::now();
        buf.clear();
        // No headers configured: this writes nothing until a histogram is written.
        let mut log = IntervalLogWriterBuilder::new().begin_log_with(&mut buf, &mut serializer)?;
        for ((rule, prev), tags) in metrics.rules().iter().zip(&mut previous).zip(&tags) {
            let snap = rule.snapshot();
            for ((kind, prev), tag) in HistogramKind::ALL.iter().zip(prev.iter_mut()).zip(tags) {
                let current = snap.histogram(*kind);
                let mut delta = current.clone();
                if delta.subtract(&*prev).is_err() {
                    // Cannot happen with monotonic counters; never write a wrong interval.
                    delta.reset();
                }
                log.write_histogram(
                    &delta,
                    interval_start - start,
                    now - interval_start,
                    Tag::new(tag),
                )
                .map_err(|e| io::Error::other(e.to_string()))?;
                *prev = current.clone();
            }
        }
        file.write_all(&buf)?;
        if last {
            return Ok(());
        }
        interval_start = now;
        while next <= now {
            next += interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::Deserializer;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    #[test]
    fn tags_never_hold_forbidden_characters() {
        assert_eq!(
            tag_for("my web, v2\r\n", HistogramKind::FirstByte),
            "my_web__v2__.first_byte"
        );
        assert!(Tag::new(&tag_for("a b,c", HistogramKind::Session)).is_some());
    }

    #[test]
    fn log_parses_back_with_per_interval_deltas() {
        let dir = std::env::temp_dir().join(format!("ringfwd-hdrlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.hlog");
        let m = Metrics::new(&["web", "db 2"], 2);
        // Recorded before the log starts: must not appear in any interval.
        m.rule(0).shard(0).connected(Duration::from_millis(7));

        let log = HdrLog::start(&path, Duration::from_secs(3600), m.clone()).unwrap();
        m.rule(0).shard(0).connected(Duration::from_micros(250));
        m.rule(0).shard(1).connected(Duration::from_micros(250));
        m.rule(1).shard(1).closed(Duration::from_millis(20));
        log.finish();

        let text = std::fs::read(&path).unwrap();
        let mut start_time = None;
        let mut intervals = Vec::new();
        for entry in IntervalLogIterator::new(&text) {
            match entry.unwrap() {
                LogEntry::StartTime(t) => start_time = Some(t),
                LogEntry::BaseTime(_) => panic!("no BaseTime is written"),
                LogEntry::Interval(h) => {
                    let bytes = base64::Engine::decode(
                        &base64::engine::general_purpose::STANDARD,
                        h.encoded_histogram(),
                    )
                    .unwrap();
                    let hist: Histogram<u64> = Deserializer::new()
                        .deserialize(&mut bytes.as_slice())
                        .unwrap();
                    intervals.push((h.tag().unwrap().as_str().to_string(), hist));
                }
            }
        }
        assert!(start_time.is_some());
        // One (partial) interval: 2 rules × 5 histograms, tagged rule.metric.
        assert_eq!(intervals.len(), 10);
        let get = |tag: &str| &intervals.iter().find(|(t, _)| t == tag).unwrap().1;
        let connect = get("web.upstream_connect");
        assert_eq!(
            connect.len(),
            2,
            "only what was recorded during the interval"
        );
        assert_eq!(connect.max(), 250);
        assert_eq!(get("db_2.session").len(), 1);
        assert_eq!(get("web.session").len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn intervals_follow_the_clock() {
        let dir = std::env::temp_dir().join(format!("ringfwd-hdrlog2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tick.hlog");
        let m = Metrics::new(&["web"], 1);
        let log = HdrLog::start(&path, Duration::from_millis(20), m.clone()).unwrap();
        // Wait (bounded) until at least two timed intervals are in the file.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("Tag=web.session,"))
                .count();
            if n >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "no intervals written");
            std::thread::sleep(Duration::from_millis(5));
        }
        log.finish();
        let text = std::fs::read(&path).unwrap();
        let starts: Vec<Duration> = IntervalLogIterator::new(&text)
            .filter_map(|e| match e.unwrap() {
                LogEntry::Interval(h) if h.tag().unwrap().as_str() == "web.session" => {
                    Some(h.start_timestamp())
                }
                _ => None,
            })
            .collect();
        assert!(starts.len() >= 3, "{starts:?}");
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
