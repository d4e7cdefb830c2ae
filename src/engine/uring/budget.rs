//! What every worker may create at start, sized to the process's fd and locked-memory limits:
//! splice pipes, buffer registration, and the accept bound that paces accepts.

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};

use crate::config::{Config, DataPath};
use crate::engine::accept::ACCEPT_BOUND_MAX;

/// Raises the soft `RLIMIT_MEMLOCK` to the hard limit so buffer registration has room.
pub fn raise_memlock() {
    use nix::sys::resource::setrlimit;
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard)
    {
        tracing::debug!(error = %e, "cannot raise RLIMIT_MEMLOCK");
    }
}

/// Descriptors kept aside at start for what is not a connection: the admin endpoint and its
/// clients, log and tap files, health-check sockets, the resolver.
pub const FD_SLACK: usize = 16;
/// The `CapEff` bit of CAP_IPC_LOCK (`linux/capability.h`).
const CAP_IPC_LOCK: u32 = 14;

/// What every worker may create at start, sized to the process's limits (after
/// [`net::raise_nofile_limit`] and [`raise_memlock`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Pipes per worker for the splice pool.
    pub pipes: usize,
    /// Whether the copy buffers are registered (pinned, counted as locked memory).
    pub register_buffers: bool,
    /// See [`super::worker::WorkerSetup::accept_bound`].
    pub accept_bound: usize,
    /// One line per cut, for the one start-up warning.
    pub cuts: Vec<String>,
}

/// The process's limits and usage the budget is computed from.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Soft RLIMIT_NOFILE.
    pub nofile: u64,
    /// Descriptors open now (listeners included).
    pub open: usize,
    /// Soft RLIMIT_MEMLOCK in bytes, `None` when it does not apply (unlimited, or
    /// CAP_IPC_LOCK).
    pub memlock: Option<u64>,
}

impl Limits {
    /// This process's limits now.
    pub fn current() -> Self {
        let nofile = getrlimit(Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(s, _)| s);
        // The directory handle itself is one of the entries.
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1));
        let capped = !has_cap_ipc_lock();
        let memlock = getrlimit(Resource::RLIMIT_MEMLOCK)
            .ok()
            .map(|(s, _)| s)
            .filter(|&s| capped && s != RLIM_INFINITY);
        Self {
            nofile,
            open,
            memlock,
        }
    }
}

fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Locked memory one ring of `entries` takes: SQEs (64 B), CQEs (16 B, four per SQE), the
/// SQ index array, and a page of ring headers.
fn ring_bytes(entries: u32) -> u64 {
    let e = u64::from(entries.next_power_of_two());
    e * 64 + e * 4 * 16 + e * 4 + 4096
}

/// Sizes the pools of `workers` workers to `limits`:
///
/// - **fds**: every worker's ring costs one and every pooled pipe two; after what is open and
///   [`FD_SLACK`], the pipe pools get at most half of what is left, so connections always
///   keep the other half (each costs two: client and upstream);
/// - **locked memory**: when the rings and the registered buffers of every worker cannot all
///   fit RLIMIT_MEMLOCK, the buffers are left unregistered (plain sends from the same
///   memory) so that the rings fit;
/// - **accepts**: each worker stops accepting while [`Budget::accept_bound`] connections
///   are unsettled or closing, a quarter of the connections' share of fds spread over the
///   workers (at most [`ACCEPT_BOUND_MAX`], at least 1).
pub fn budget(config: &Config, workers: usize, limits: Limits) -> Budget {
    let n = workers.max(1);
    let mut cuts = Vec::new();
    let nofile = usize::try_from(limits.nofile).unwrap_or(usize::MAX);
    let free = nofile
        .saturating_sub(limits.open)
        .saturating_sub(FD_SLACK)
        .saturating_sub(n);
    let wanted = if config.mode == DataPath::Copy {
        0
    } else {
        config.uring.pipes as usize
    };
    let pipes = wanted.min(free / 2 / (2 * n));
    if pipes < wanted {
        let needed = limits.open + FD_SLACK + n + 2 * (n * 2 * wanted);
        cuts.push(format!(
            "the open-files limit ({nofile}, {} in use) leaves room for {pipes} splice pipes per worker instead of {wanted} (each costs 2 fds; connections keep at least half of the {free} free fds): raise it to at least {needed} (ulimit -n, LimitNOFILE= in a systemd unit) or lower [uring] pipes",
            limits.open
        ));
    }
    let conn_fds = free - n * 2 * pipes;
    let accept_bound = (conn_fds / 2 / n / 4).clamp(1, ACCEPT_BOUND_MAX);
    let mut register_buffers = true;
    if let Some(memlock) = limits.memlock {
        let ring = ring_bytes(config.uring.ring_entries);
        let buffers = u64::from(config.uring.buffers) * config.uring.buffer_size.bytes();
        let all = n as u64 * (ring + buffers);
        // When not even the rings fit, set-up fails and says so; nothing to cut here.
        if all > memlock && n as u64 * ring <= memlock {
            register_buffers = false;
            cuts.push(format!(
                "the locked-memory limit (RLIMIT_MEMLOCK, {} KiB) cannot hold {n} workers' rings and registered buffers ({} KiB): the buffers stay unregistered (plain sends, a little slower); raise it to at least {} KiB (ulimit -l, LimitMEMLOCK= in a systemd unit, or CAP_IPC_LOCK) or lower [uring] buffers / buffer_size",
                memlock >> 10,
                all >> 10,
                all.div_ceil(1024)
            ));
        }
    }
    Budget {
        pipes,
        register_buffers,
        accept_bound,
        cuts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: &str) -> Config {
        let text = format!(
            "mode = \"{mode}\"\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n"
        );
        Config::parse("t.toml", &text).expect("valid config")
    }

    const ROOMY: Limits = Limits {
        nofile: 20_000,
        open: 10,
        memlock: None,
    };

    #[test]
    fn a_roomy_host_gets_the_configured_pools() {
        let b = budget(&config("splice"), 2, ROOMY);
        assert_eq!(b.pipes, 16);
        assert!(b.register_buffers);
        assert_eq!(b.accept_bound, ACCEPT_BOUND_MAX);
        assert!(b.cuts.is_empty(), "{:?}", b.cuts);
    }

    #[test]
    fn a_low_fd_limit_cuts_the_pipes_and_keeps_half_for_connections() {
        let limits = Limits {
            nofile: 64,
            open: 7,
            memlock: None,
        };
        let b = budget(&config("splice"), 2, limits);
        // 64 - 7 open - 16 slack - 2 rings = 39 free; pipes take at most half.
        assert_eq!(b.pipes, 4);
        // 2 workers × 2 fds per pipe.
        assert!(2 * 2 * b.pipes <= 39 / 2);
        assert!(b.accept_bound >= 1);
        assert_eq!(b.cuts.len(), 1);
        assert!(b.cuts[0].contains("ulimit -n"), "{}", b.cuts[0]);
        // A limit that cannot even hold the rings leaves no pipes, not an underflow.
        let b = budget(
            &config("auto"),
            4,
            Limits {
                nofile: 16,
                open: 10,
                memlock: None,
            },
        );
        assert_eq!((b.pipes, b.accept_bound), (0, 1));
    }

    #[test]
    fn the_copy_path_asks_for_no_pipes_and_warns_of_none() {
        let limits = Limits {
            nofile: 64,
            open: 7,
            memlock: None,
        };
        let b = budget(&config("copy"), 2, limits);
        assert_eq!(b.pipes, 0);
        assert!(b.cuts.is_empty(), "{:?}", b.cuts);
    }

    #[test]
    fn buffers_stay_unregistered_when_memlock_holds_only_the_rings() {
        let c = config("copy");
        let ring = ring_bytes(c.uring.ring_entries);
        let memlock = Some(4 * ring + (1 << 20));
        let b = budget(&c, 4, Limits { memlock, ..ROOMY });
        assert!(!b.register_buffers);
        assert!(b.cuts[0].contains("ulimit -l"), "{}", b.cuts[0]);
        // Not even the rings fit: nothing to cut, set-up will fail and say so.
        let b = budget(
            &c,
            4,
            Limits {
                memlock: Some(64 << 10),
                ..ROOMY
            },
        );
        assert!(b.register_buffers && b.cuts.is_empty());
        // Enough for everything.
        let b = budget(
            &c,
            4,
            Limits {
                memlock: Some(64 << 20),
                ..ROOMY
            },
        );
        assert!(b.register_buffers && b.cuts.is_empty());
    }
}
