//! The io_uring thread-per-core engine.
//!
//! One [`worker::Worker`] per core, pinned, each with its own ring, its own `SO_REUSEPORT`
//! listener per rule, its own registered buffer pool ([`bufpool`]) and pipe pool
//! ([`pipepool`]), and its own slab of connections ([`slab`]) whose state machine ([`conn`])
//! is free of I/O. [`ring`] is the one place that pushes SQEs; completions are routed by a
//! typed `user_data` ([`token`]); [`worker`] runs the loop and turns actions into ops. See `docs/ARCHITECTURE.md` for the loop, the ops and their
//! lifetimes.

pub mod bufpool;
pub mod conn;
pub mod pipepool;
pub mod ring;
pub mod slab;
pub mod splice;
pub mod token;
pub mod worker;

use std::fmt;

use io_uring::opcode;

use super::{EngineError, Listeners, RunContext};
use crate::config::Config;
use crate::net;

/// Why io_uring cannot be used here, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn io_uring_disabled_sysctl() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn explain_setup_error(e: &std::io::Error) -> Unavailable {
    let sysctl = io_uring_disabled_sysctl();
    let why = match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup is not implemented by this kernel (built without CONFIG_IO_URING, or older than 5.1); use a kernel with io_uring".to_string(),
        Some(libc::EPERM) if sysctl == Some(2) => "io_uring is disabled by sysctl kernel.io_uring_disabled=2; enable it with `sysctl kernel.io_uring_disabled=0`".to_string(),
        Some(libc::EPERM) if sysctl == Some(1) => "io_uring is restricted by sysctl kernel.io_uring_disabled=1 to the group in kernel.io_uring_group; run ringfwd in that group or set `sysctl kernel.io_uring_disabled=0`".to_string(),
        Some(libc::EPERM) => "io_uring_setup was denied (EPERM): typically a seccomp profile such as Docker's default (25+) or containerd's; allow io_uring_setup/io_uring_enter/io_uring_register in the profile (e.g. docker run --security-opt seccomp=<profile>)".to_string(),
        Some(libc::ENOMEM) => "io_uring_setup failed with ENOMEM: RLIMIT_MEMLOCK is too low for the ring on this kernel; raise it (ulimit -l)".to_string(),
        _ => format!("io_uring_setup failed: {e}"),
    };
    Unavailable(why)
}

/// Opcodes the copy path cannot do without.
const REQUIRED: [(u8, &str); 8] = [
    (opcode::AcceptMulti::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
];

/// Checks that a ring with every opcode the engine needs can be set up on this host.
///
/// # Errors
/// [`Unavailable`] saying why and how to enable io_uring.
pub fn probe() -> Result<(), Unavailable> {
    let (ring, _mode) = ring::build(8).map_err(|e| explain_setup_error(&e))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        Unavailable(format!(
            "cannot probe io_uring opcodes (kernel older than 5.6?): {e}"
        ))
    })?;
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(Unavailable(format!(
            "this kernel's io_uring lacks {}; ringfwd needs Linux 6.0 or newer",
            missing.join(", ")
        )));
    }
    if !ring.params().is_feature_ext_arg() {
        return Err(Unavailable(
            "this kernel's io_uring lacks EXT_ARG waits; ringfwd needs Linux 6.0 or newer".into(),
        ));
    }
    Ok(())
}

/// Raises the soft `RLIMIT_MEMLOCK` to the hard limit so buffer registration has room.
fn raise_memlock() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard)
    {
        tracing::debug!(error = %e, "cannot raise RLIMIT_MEMLOCK");
    }
}

/// Runs one worker per configured core until shutdown.
///
/// # Errors
/// A worker's ring or buffer pool could not be set up.
pub fn run(
    config: &Config,
    listeners: Listeners,
    ctx: RunContext,
    ready: impl FnOnce(),
) -> Result<(), EngineError> {
    raise_memlock();
    let n = config.worker_count();
    let cpus = net::allowed_cpus();
    let mut per_worker: Vec<Vec<(usize, std::net::TcpListener)>> =
        (0..n).map(|_| Vec::new()).collect();
    for (rule, ls) in listeners.per_rule.into_iter().enumerate() {
        for (w, l) in ls.into_iter().enumerate() {
            per_worker[w % n].push((rule, l));
        }
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::with_capacity(n);
    for (id, ls) in per_worker.into_iter().enumerate() {
        let cpu = (n <= cpus.len()).then(|| cpus[id % cpus.len()]);
        let (config, runtime, metrics, shutdown, ready) = (
            config.clone(),
            ctx.runtime.clone(),
            ctx.metrics.clone(),
            ctx.shutdown.clone(),
            ready_tx.clone(),
        );
        let h = std::thread::Builder::new()
            .name(format!("ringfwd-w{id}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    net::pin_current_thread(cpu);
                }
                let setup = worker::WorkerSetup {
                    id,
                    cpu,
                    listeners: ls,
                };
                match worker::Worker::new(&config, setup, runtime, metrics, shutdown.clone()) {
                    Ok(w) => {
                        let _ = ready.send(Ok(()));
                        w.run();
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                    }
                }
            })
            .map_err(|source| EngineError::Io {
                what: "cannot start a worker thread",
                source,
            })?;
        handles.push(h);
    }
    drop(ready_tx);
    let mut first_err = None;
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => break,
        }
    }
    if let Some(e) = first_err {
        // Stop the workers that did start, then report.
        ctx.shutdown.advance(crate::shutdown::Phase::Closing);
        for h in handles {
            let _ = h.join();
        }
        return Err(EngineError::UringUnavailable(Unavailable(e)));
    }
    ready();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
