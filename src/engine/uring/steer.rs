//! CPU-affine accept: each port's `SO_REUSEPORT` group is steered by a classic-BPF program so
//! that a connection is accepted by the worker pinned on the CPU that processed its SYN
//! (on loopback, the connecting process's CPU; on a NIC, the CPU its receive queue
//! interrupts). The connection's packets, its wake-ups and the worker then meet on one CPU
//! instead of crossing between cores on every segment.
//!
//! The program, attached with `SO_ATTACH_REUSEPORT_CBPF` to one socket of the group, runs
//! for every SYN and returns an index into the group's sockets in the order they joined it;
//! an index past the end makes the kernel fall back to its hash. The engine binds one
//! listener per worker per port in worker order, and pins worker `k` to the `k`-th allowed
//! CPU, so the program maps each allowed CPU number to its worker's index (a jump table:
//! allowed CPUs need not be contiguous, as under a partial cpuset) and any other CPU to the
//! hash. Steering is only attached when every worker is pinned to a CPU of its own
//! ([`plan`]); otherwise the groups keep plain reuseport hashing (and a program a previous
//! generation attached is removed).
//!
//! Whether it works is visible per accepted connection: `SO_INCOMING_CPU` says which CPU
//! took its packets, counted against the worker's own CPU in `ringfwd_accepts_total`.
#![allow(unsafe_code)]

use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;

use crate::engine::Listeners;

/// Whether the groups are steered, and why not when they are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Group index `k` belongs to the worker pinned on `cpus[k]`.
    Steer { cpus: Vec<usize> },
    /// Plain reuseport hashing.
    Hash { why: String },
}

/// Steering is worth it (and right) only when worker `k` runs on `cpus[k]` and nowhere else:
/// with `pin`, one worker per allowed CPU. Fewer workers than CPUs would leave CPUs whose
/// SYNs have no worker of their own (they would hash anyway), and unpinned workers move.
pub fn plan(pin: bool, workers: usize, allowed: &[usize]) -> Plan {
    if !pin {
        return Plan::Hash {
            why: "workers are not pinned (pin = false)".into(),
        };
    }
    if workers != allowed.len() {
        return Plan::Hash {
            why: format!(
                "{workers} workers for {} allowed CPUs (steering needs one pinned worker per CPU)",
                allowed.len()
            ),
        };
    }
    if workers < 2 {
        return Plan::Hash {
            why: "one worker: nothing to steer".into(),
        };
    }
    Plan::Steer {
        cpus: allowed.to_vec(),
    }
}

/// `BPF_LD | BPF_W | BPF_ABS` of the ancillary "current CPU" word.
const LD_CPU: libc::sock_filter = libc::sock_filter {
    code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
    jt: 0,
    jf: 0,
    k: (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
};

/// What the program returns for a CPU without a worker: past any group's end, so the kernel
/// hashes.
const NO_WORKER: u32 = u32::MAX;

/// The program: load the CPU; for each `cpus[k]`, if equal return `k`; else return
/// [`NO_WORKER`].
pub fn program(cpus: &[usize]) -> Vec<libc::sock_filter> {
    let mut p = Vec::with_capacity(2 + 2 * cpus.len());
    p.push(LD_CPU);
    for (k, &cpu) in cpus.iter().enumerate() {
        p.push(libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: u32::try_from(cpu).unwrap_or(NO_WORKER),
        });
        p.push(ret(u32::try_from(k).unwrap_or(NO_WORKER)));
    }
    p.push(ret(NO_WORKER));
    p
}

fn ret(k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Attaches `program` to the reuseport group `listener` belongs to (replacing any program
/// the group had).
///
/// # Errors
/// `setsockopt` failed (an old kernel, or a program the verifier refused).
pub fn attach(listener: &TcpListener, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program.len()` valid instructions for the duration of the
    // call (the kernel copies them); the option length is the size of `sock_fprog`.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes the group's program, if any (a previous generation's): hashing again.
pub fn detach(listener: &TcpListener) {
    let zero: libc::c_int = 0;
    // SAFETY: the option value is a readable `c_int` (ignored by the kernel) of that size.
    let _ = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            std::ptr::from_ref(&zero).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Steers every port group's accepts to the worker on the CPU that took the SYN, when
/// [`plan`] says it fits (`pin`, one worker per allowed CPU); otherwise removes any
/// program an earlier generation attached, and says why in the log. Returns whether the
/// groups are steered (then worker `k` must be pinned to `cpus[k]`).
pub fn steer_groups(pin: bool, workers: usize, cpus: &[usize], listeners: &Listeners) -> bool {
    let groups = || {
        listeners
            .per_rule
            .iter()
            .flatten()
            .filter_map(|g| g.first())
    };
    match plan(pin, workers, cpus) {
        Plan::Steer { cpus } => {
            let program = program(&cpus);
            let failed = groups().find_map(|l| attach(l, &program).err());
            match failed {
                None => {
                    tracing::info!(
                        ?cpus,
                        "accepts steered to the worker pinned on the CPU that took each connection's SYN (SO_ATTACH_REUSEPORT_CBPF)"
                    );
                    true
                }
                Some(e) => {
                    groups().for_each(detach);
                    tracing::info!(error = %e, "cannot steer accepts by CPU; plain SO_REUSEPORT hashing, workers not pinned");
                    false
                }
            }
        }
        Plan::Hash { why } => {
            groups().for_each(detach);
            tracing::info!(
                "accepts not steered by CPU ({why}): plain SO_REUSEPORT hashing, workers not pinned"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn steering_needs_one_pinned_worker_per_allowed_cpu() {
        assert_eq!(plan(true, 2, &[0, 1]), Plan::Steer { cpus: vec![0, 1] });
        assert_eq!(
            plan(true, 2, &[1, 3]),
            Plan::Steer { cpus: vec![1, 3] },
            "a partial cpuset is steered by CPU number"
        );
        assert!(matches!(plan(false, 2, &[0, 1]), Plan::Hash { .. }));
        assert!(matches!(plan(true, 1, &[0, 1]), Plan::Hash { .. }));
        assert!(matches!(plan(true, 1, &[0]), Plan::Hash { .. }));
    }

    #[test]
    fn the_program_maps_each_cpu_to_its_worker_and_others_to_the_hash() {
        let p = program(&[1, 3]);
        assert_eq!(p.len(), 6);
        // Interpret it for every CPU.
        let run = |cpu: u32| {
            let mut pc = 1;
            loop {
                let i = p[pc];
                if i.code == (libc::BPF_RET | libc::BPF_K) as u16 {
                    return i.k;
                }
                pc += 1 + usize::from(if cpu == i.k { i.jt } else { i.jf });
            }
        };
        assert_eq!(run(1), 0);
        assert_eq!(run(3), 1);
        assert_eq!(run(0), NO_WORKER);
        assert_eq!(run(2), NO_WORKER);
    }

    /// The kernel takes the program on a reuseport group, and the group still accepts.
    #[test]
    fn the_kernel_takes_the_program_and_the_group_still_accepts() {
        let listeners = crate::net::bind_listeners("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let cpus = crate::net::allowed_cpus();
        attach(&listeners[0], &program(&cpus)).expect("SO_ATTACH_REUSEPORT_CBPF");
        let addr = listeners[0].local_addr().unwrap();
        for l in &listeners {
            l.set_nonblocking(true).unwrap();
        }
        for _ in 0..8 {
            let _c = TcpStream::connect(addr).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                if listeners.iter().any(|l| l.accept().is_ok()) {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "not accepted");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        detach(&listeners[0]);
    }
}
