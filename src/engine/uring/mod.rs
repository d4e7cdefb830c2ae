//! The io_uring thread-per-core engine.
//!
//! One [`worker::Worker`] per core, pinned, each with its own ring, its own `SO_REUSEPORT`
//! listener per rule ([`listeners`]: accepts, their pacing, the hand-over), its own registered
//! buffer pool ([`bufpool`]) and pipe pool ([`pipepool`]), and its own slab of connections
//! ([`slab`], whose entries count their ops in flight) whose state machine ([`conn`]) is free
//! of I/O. [`ops`] says and builds what each of the machine's actions submits; [`ring`] is the
//! one place that pushes SQEs; completions are routed by a typed `user_data` ([`token`]);
//! [`worker`] runs the loop and carries the actions out, sleeping in the ring or, with
//! `[uring] wait = "epoll"`, on an epoll set of its sockets ([`wait`]); [`budget`] sizes the pools to the
//! process's limits; [`probe`] says whether io_uring runs here at all, and if not, why.
//! See `docs/ARCHITECTURE.md` for the loop, the ops and their lifetimes.

pub mod budget;
pub mod bufpool;
pub mod conn;
pub mod listeners;
pub mod ops;
pub mod pipepool;
pub mod probe;
pub mod ring;
pub mod slab;
pub mod splice;
pub mod stamp;
pub mod steer;
pub mod token;
pub mod wait;
pub mod worker;

use std::net::TcpListener;
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::{Listeners, RunContext};
use crate::config::Config;
use crate::net;

pub use budget::{Budget, FD_SLACK, Limits, budget, raise_memlock};
use probe::explain_failures;
pub use probe::{Features, HostEvidence, SECCOMP_FIX, Unavailable, features, probe};

/// The uring engine could not start; the listeners are handed back untouched (still open,
/// their queued connections kept) so that another engine can serve them.
pub struct SetupFailed {
    pub why: Unavailable,
    pub listeners: Listeners,
}

/// What a worker thread reports to the engine while starting.
enum Report {
    /// Set up; waits to be told to run or to stand down.
    Ready(worker::SetupNotes),
    /// Could not set up; its listeners come back.
    Failed(String, Option<i32>, Vec<listeners::Bound>),
    /// Stood down; its listeners come back.
    Returned(Vec<listeners::Bound>),
}

/// Every worker set up and waiting for [`Started::run`].
pub struct Started {
    go: Vec<mpsc::Sender<bool>>,
    handles: Vec<JoinHandle<()>>,
}

impl Started {
    /// Lets every worker run; `ready` is called once they all do. Returns at shutdown.
    pub fn run(self, ready: impl FnOnce()) {
        for g in &self.go {
            let _ = g.send(true);
        }
        ready();
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Starts one worker per configured core and sets each up (ring, buffer pool, pipe pool),
/// without running them yet. If any worker cannot set up, all of them stand down and the
/// listeners come back in [`SetupFailed`], with one explanation for all workers.
///
/// # Errors
/// [`SetupFailed`] when a worker could not set up or its thread could not be spawned.
pub fn start(
    config: &Config,
    listeners: Listeners,
    ctx: &RunContext,
) -> Result<Started, Box<SetupFailed>> {
    raise_memlock();
    let n = config.worker_count();
    let ports_per_rule: Vec<usize> = listeners.per_rule.iter().map(Vec::len).collect();
    let budget = budget(config, n, Limits::current());
    if !budget.cuts.is_empty() {
        tracing::warn!("{}", budget.cuts.join("; "));
    }
    let cpus = net::allowed_cpus();
    let steered = steer::steer_groups(config.uring.pin, n, &cpus, &listeners);
    let mut per_worker: Vec<Vec<listeners::Bound>> = (0..n).map(|_| Vec::new()).collect();
    for (rule, ports) in listeners.per_rule.into_iter().enumerate() {
        for (port, ls) in ports.into_iter().enumerate() {
            for (w, listener) in ls.into_iter().enumerate() {
                per_worker[w % n].push(listeners::Bound {
                    rule,
                    port,
                    listener,
                });
            }
        }
    }
    let (report_tx, report_rx) = mpsc::channel::<(usize, Report)>();
    let mut go = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    let mut back: Vec<Vec<listeners::Bound>> = (0..n).map(|_| Vec::new()).collect();
    let mut spawn_error = None;
    for (id, ls) in per_worker.into_iter().enumerate() {
        // Pinned only where the accepts are steered: then a connection's worker is the one on
        // the CPU its packets (and, on loopback, its peers) run on. A pinned worker that
        // hashed accepts would pull every connection to a fixed CPU away from its peers.
        let cpu = steered.then(|| cpus[id % cpus.len()]);
        let (config, runtime, metrics, shutdown, report) = (
            config.clone(),
            ctx.runtime.clone(),
            ctx.metrics.clone(),
            ctx.shutdown.clone(),
            report_tx.clone(),
        );
        let setup = worker::WorkerSetup {
            id,
            cpu,
            pipes: budget.pipes,
            register_buffers: budget.register_buffers,
            accept_bound: budget.accept_bound,
        };
        let (go_tx, go_rx) = mpsc::channel::<bool>();
        // The listeners travel with the thread; if it cannot be spawned they come back here.
        let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(ls)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ringfwd-w{id}"))
            .spawn(move || {
                let ls = theirs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .unwrap_or_default();
                if let Some(cpu) = cpu {
                    net::pin_current_thread(cpu);
                }
                // A panic while setting up is reported like a failure: the engine waits for
                // one report per worker and must not wait forever.
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker::Worker::new(&config, &setup, runtime, metrics, shutdown)
                }));
                let built = match built {
                    Ok(b) => b,
                    Err(_) => {
                        let why = format!("worker {id}: panicked while setting up");
                        let _ = report.send((id, Report::Failed(why, None, ls)));
                        return;
                    }
                };
                match built {
                    Ok((w, notes)) => {
                        let _ = report.send((id, Report::Ready(notes)));
                        if go_rx.recv() == Ok(true) {
                            w.run(ls);
                        } else {
                            drop(w);
                            let _ = report.send((id, Report::Returned(ls)));
                        }
                    }
                    Err(e) => {
                        let errno = match &e {
                            worker::WorkerError::Ring { source, .. } => source.raw_os_error(),
                            worker::WorkerError::Pool { .. } => None,
                        };
                        let _ = report.send((id, Report::Failed(e.to_string(), errno, ls)));
                    }
                }
            });
        match spawned {
            Ok(h) => {
                go.push(go_tx);
                handles.push(h);
            }
            Err(e) => {
                back[id] = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .unwrap_or_default();
                spawn_error = Some(format!("cannot start worker thread {id}: {e}"));
                break;
            }
        }
    }
    drop(report_tx);
    // Every spawned worker answers once: ready, or failed.
    let mut failures: Vec<(usize, String, Option<i32>)> = Vec::new();
    let mut notes = Vec::new();
    for _ in 0..handles.len() {
        match report_rx.recv() {
            Ok((id, Report::Ready(n))) => notes.push((id, n)),
            Ok((id, Report::Failed(e, errno, ls))) => {
                back[id] = ls;
                failures.push((id, e, errno));
            }
            Ok((_, Report::Returned(_))) | Err(_) => {}
        }
    }
    report_notes(n, &notes);
    if failures.is_empty() && spawn_error.is_none() {
        return Ok(Started { go, handles });
    }
    // Stand every ready worker down and take its listeners back.
    for g in &go {
        let _ = g.send(false);
    }
    for _ in 0..notes.len() {
        if let Ok((id, Report::Returned(ls))) = report_rx.recv() {
            back[id] = ls;
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let why = match spawn_error {
        Some(e) => Unavailable::Other(e),
        None => explain_failures(n, &failures),
    };
    // Back in their places: rule, port group, then worker order (workers come back in
    // order, and each worker's listeners in the order it was given them).
    let mut per_rule: Vec<Vec<Vec<TcpListener>>> = ports_per_rule
        .iter()
        .map(|&p| (0..p).map(|_| Vec::new()).collect())
        .collect();
    for ls in back {
        for b in ls {
            per_rule[b.rule][b.port].push(b.listener);
        }
    }
    Err(Box::new(SetupFailed {
        why,
        listeners: Listeners { per_rule },
    }))
}

/// Logs, once for all workers, what fell short while they set up (pipes, registration, the
/// epoll wait).
fn report_notes(n: usize, notes: &[(usize, worker::SetupNotes)]) {
    let short: Vec<&(usize, String)> = notes
        .iter()
        .filter_map(|(_, s)| s.pipes_short.as_ref())
        .collect();
    if let Some((_, why)) = short.first() {
        let created: usize = short.iter().map(|(c, _)| c).sum();
        tracing::warn!(
            workers = short.len(),
            of = n,
            created,
            "{why}; those workers have fewer splice pipes than asked and the rest of their traffic uses the copy path"
        );
    }
    let unregistered: Vec<&String> = notes
        .iter()
        .filter_map(|(_, s)| s.registration.as_ref())
        .collect();
    if let Some(why) = unregistered.first() {
        tracing::warn!(
            workers = unregistered.len(),
            of = n,
            "cannot register the copy buffers with io_uring ({why}): RLIMIT_MEMLOCK too low; raise it with `ulimit -l`, LimitMEMLOCK= in the systemd unit, or CAP_IPC_LOCK, or lower [uring] buffers/buffer_size; continuing with unregistered buffers"
        );
    }
    let no_epoll: Vec<&String> = notes.iter().filter_map(|(_, s)| s.epoll.as_ref()).collect();
    if let Some(why) = no_epoll.first() {
        tracing::warn!(
            workers = no_epoll.len(),
            of = n,
            "cannot set up [uring] wait = \"epoll\" ({why}); those workers sleep in their rings"
        );
    }
}
