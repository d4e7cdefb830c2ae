//! A worker's listeners: one-shot accepts kept in flight on each, paced by the connections
//! the worker has not settled yet, backed off when fds run out, cancelled at drain; and the
//! hand-over of listening sockets between engine instances (see
//! [`Listeners::accept_completed`]).
//!
//! Pacing: at most [`ACCEPT_WINDOW`] accepts per listener in flight, and none while a rule
//! holds its share of the worker's accept bound in connections that are not relaying yet or
//! are closing (see [`Listeners::fill`]). Every count here goes up when an accept is pushed
//! or a connection is taken on, and down exactly once, at the accept's completion or when the
//! connection settles or is disposed of.
#![allow(unsafe_code)]

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use super::ring::{Op, Ring};
use super::token::{OpKind, Token};
use crate::net;
use crate::vocab::Direction;

/// One-shot accepts a listener keeps in flight at most (while the worker is under its
/// accept bound). One-shot, not multishot: a multishot accept drains the whole listen queue
/// into the completion queue at once (thousands of fds in one burst under a connection flood),
/// where one-shot accepts let the worker take no more than it can dispose of.
const ACCEPT_WINDOW: u32 = 64;

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Accepting (as many accepts in flight as the window and the accept bound allow).
    Open,
    /// Out of fds: no new accept before this instant.
    Backoff(Instant),
    /// Cancel submitted; waiting for the last accept in flight to complete.
    Cancelling,
    Closed,
}

/// A listener handed to a worker: the rule it serves and its port group in
/// [`crate::engine::Listeners`] (to give it back in place if the engine stands down).
pub struct Bound {
    pub rule: usize,
    pub port: usize,
    pub listener: TcpListener,
}

struct Listener {
    fd: Option<OwnedFd>,
    rule: usize,
    /// The port it listens on (a range rule's sessions map the upstream port from it).
    port: u16,
    /// In [`Listeners::to_arm`].
    queued: bool,
    state: State,
    /// One-shot accepts submitted and not yet completed.
    in_flight: u32,
    exhausted: net::ExhaustionLog,
}

/// A worker's listeners and the counts that pace their accepts.
pub struct Listeners {
    worker: usize,
    all: Vec<Listener>,
    /// Open listeners that may want more accepts armed (each at most once): only these are
    /// looked at by [`Listeners::fill`], so a worker with thousands of mostly idle
    /// listeners does not walk them all on every loop.
    to_arm: Vec<usize>,
    /// This worker's listeners per rule (a port range has one per port).
    by_rule: Vec<usize>,
    /// Accepts in flight, per rule.
    accepts_by_rule: Vec<usize>,
    /// Connections accepted and not yet relaying, or closing, per rule: the fds the worker
    /// holds for connections it has not settled or not yet disposed of.
    unsettled_by_rule: Vec<usize>,
    /// No new accept for a rule while its unsettled connections and accepts in flight reach
    /// its share of this.
    accept_bound: usize,
    draining: bool,
}

/// What an accept's completion brought.
pub struct Accepted {
    pub client: OwnedFd,
    pub rule: usize,
    pub port: u16,
}

impl Listeners {
    pub fn new(worker: usize, rules: usize, accept_bound: usize) -> Self {
        Self {
            worker,
            all: Vec::new(),
            to_arm: Vec::new(),
            by_rule: vec![0; rules],
            accepts_by_rule: vec![0; rules],
            unsettled_by_rule: vec![0; rules],
            accept_bound: accept_bound.max(1),
            draining: false,
        }
    }

    /// Takes the worker's listeners on, every one queued for its first accepts.
    pub fn install(&mut self, bound: Vec<Bound>) {
        for b in &bound {
            self.by_rule[b.rule] += 1;
            // For the re-check of a cancelled accept (`take_queued`), which must not block;
            // io_uring's own accepts poll a non-blocking socket as they would a blocking one.
            if let Err(e) = b.listener.set_nonblocking(true) {
                tracing::warn!(worker = self.worker, error = %e, "cannot make a listener non-blocking");
            }
        }
        self.to_arm = (0..bound.len()).collect();
        self.all = bound
            .into_iter()
            .map(|b| Listener {
                port: b.listener.local_addr().map_or(0, |a| a.port()),
                fd: Some(OwnedFd::from(b.listener)),
                rule: b.rule,
                queued: true,
                state: State::Open,
                in_flight: 0,
                exhausted: net::ExhaustionLog::default(),
            })
            .collect();
    }

    /// Every listener's fd (for the worker's epoll set, before the first accept).
    pub fn fds(&self) -> impl Iterator<Item = std::os::fd::BorrowedFd<'_>> + '_ {
        self.all
            .iter()
            .filter_map(|l| l.fd.as_ref().map(std::os::fd::AsFd::as_fd))
    }

    /// The rule listener `i` serves.
    pub fn rule(&self, i: usize) -> usize {
        self.all[i].rule
    }

    /// A connection of `rule` was taken on and is not relaying yet, or went back to closing.
    pub fn unsettled(&mut self, rule: usize) {
        self.unsettled_by_rule[rule] += 1;
    }

    /// A connection of `rule` counted by [`Listeners::unsettled`] now relays, or is gone
    /// (listeners held back by the rule's share stay queued and are looked at again by the
    /// next [`Listeners::fill`]).
    pub fn settled(&mut self, rule: usize) {
        debug_assert!(self.unsettled_by_rule[rule] > 0, "settled twice");
        self.unsettled_by_rule[rule] -= 1;
    }

    /// Whether any connection counted by [`Listeners::unsettled`] is not settled yet.
    pub fn any_unsettled(&self) -> bool {
        self.unsettled_by_rule.iter().any(|&n| n > 0)
    }

    /// Whether every listener is closed (after [`Listeners::drain`]).
    pub fn all_closed(&self) -> bool {
        self.all.iter().all(|l| l.state == State::Closed)
    }

    /// Tops up the open listeners' one-shot accepts, as long as each rule holds fewer than
    /// its share of the worker's accept bound in unsettled or closing connections plus accepts
    /// in flight: a flood of connections that reset at once is then accepted no faster than
    /// it is disposed of, and the rest waits in the kernel's listen queue instead of costing
    /// fds here.
    ///
    /// Every rule gets its own share of the bound, counted on its own connections: a rule
    /// whose upstream hangs (its connections stay unsettled) cannot stall another rule's
    /// accepts, and a worker with many rules cannot spend the bound on its first ones. A
    /// rule's listeners (one per port of a range) split its share as their window (at most
    /// [`ACCEPT_WINDOW`], at least 1); each open listener keeps at least one accept armed while
    /// the rule is under its share, even when a range has more ports than the share — an
    /// io_uring listener with no accept in flight would not see its connections at all.
    pub fn fill(&mut self, ring: &mut Ring) {
        if self.draining || self.to_arm.is_empty() {
            return;
        }
        let rules_here = self.by_rule.iter().filter(|&&n| n > 0).count();
        let share = crate::engine::accept::listener_share(self.accept_bound, rules_here);
        let mut queue = std::mem::take(&mut self.to_arm);
        for &i in &queue {
            let rule = self.all[i].rule;
            let window = u32::try_from(share / self.by_rule[rule].max(1))
                .unwrap_or(u32::MAX)
                .clamp(1, ACCEPT_WINDOW);
            self.all[i].queued = false;
            while self.all[i].state == State::Open
                && self.all[i].in_flight < window
                && (self.unsettled_by_rule[rule] + self.accepts_by_rule[rule] < share
                    || (self.all[i].in_flight == 0 && self.unsettled_by_rule[rule] < share))
            {
                if !self.push_accept(i, ring) {
                    break;
                }
            }
            let l = &mut self.all[i];
            if l.state == State::Open && l.in_flight < window {
                // Held back by the rule's share: try again when its connections settle.
                l.queued = true;
            }
        }
        queue.retain(|&i| self.all[i].queued);
        // Listeners queued meanwhile were not in `queue` (each is queued at most once).
        queue.append(&mut self.to_arm);
        self.to_arm = queue;
    }

    /// Puts listener `i` up for [`Listeners::fill`] (once).
    fn queue_arm(&mut self, i: usize) {
        let l = &mut self.all[i];
        if !l.queued && l.state == State::Open {
            l.queued = true;
            self.to_arm.push(i);
        }
    }

    /// Submits one one-shot accept on listener `i`; false if it has no fd.
    fn push_accept(&mut self, i: usize, ring: &mut Ring) -> bool {
        let l = &mut self.all[i];
        let Some(fd) = l.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return false;
        };
        l.in_flight += 1;
        self.accepts_by_rule[l.rule] += 1;
        ring.push(Op::Accept { listener: fd }, accept_token(i));
        true
    }

    /// An accept of listener `li` completed with `res`: the accepted connection, if any.
    /// Backs the listener off when fds ran out; closes it when it was cancelling and this
    /// was its last accept.
    ///
    /// An accept that ends cancelled or failed may have taken a connection's wake-up with it:
    /// io_uring accepts wait on a listener as *exclusive* waiters, so a new connection wakes
    /// only the first, and when that one is cancelled before it ran (a drain at a hand-over,
    /// while another engine instance's accepts wait on the same socket) the connection stays
    /// queued and nobody is woken for it. So the listener is looked at again right here:
    /// an open one is re-armed (the new accept's first, inline attempt takes what is queued),
    /// and a cancelling one, which will not arm again, takes one queued connection with a
    /// non-blocking `accept4(2)` before its fd may close — one per cancelled accept, as many
    /// as wake-ups could have been lost. What it takes is served like any other (a draining
    /// generation at a hand-over still serves what it accepted).
    pub fn accept_completed(
        &mut self,
        li: usize,
        res: i32,
        now: Instant,
        rule_name: &str,
    ) -> Option<Accepted> {
        // A one-shot accept: every completion is its last.
        let l = &mut self.all[li];
        debug_assert!(l.in_flight > 0, "accept completion without an accept");
        l.in_flight -= 1;
        self.accepts_by_rule[l.rule] -= 1;
        let mut res = res;
        if l.state == State::Cancelling {
            if res < 0 {
                res = l.fd.as_ref().map_or(res, take_queued);
            }
            if l.in_flight == 0 {
                l.state = State::Closed;
                l.fd = None;
            }
        } else if res < 0 && net::is_resource_exhaustion(&io::Error::from_raw_os_error(-res)) {
            // io_uring's accept takes the fd before looking at the queue, so this also
            // happens with nothing pending: no connection was rejected, none is lost.
            if let Some(held_back) = l.exhausted.hit(now) {
                tracing::warn!(worker = self.worker, rule = %rule_name, error = %io::Error::from_raw_os_error(-res), held_back, "accept: out of file descriptors; backing off");
            }
            l.state = State::Backoff(now + net::ACCEPT_BACKOFF);
        }
        self.queue_arm(li);
        if res < 0 {
            return None;
        }
        // SAFETY: a successful accept (the ring's, or `take_queued`'s) returns a new fd that
        // nothing else owns.
        let client = unsafe { OwnedFd::from_raw_fd(res) };
        let l = &mut self.all[li];
        if l.exhausted.recovered() {
            tracing::info!(worker = self.worker, rule = %rule_name, "accept: file descriptors available again");
        }
        Some(Accepted {
            client,
            rule: l.rule,
            port: l.port,
        })
    }

    /// Listeners whose back-off ended accept again.
    pub fn resume(&mut self, now: Instant) {
        if self.draining {
            return;
        }
        for i in 0..self.all.len() {
            if let State::Backoff(until) = self.all[i].state
                && now >= until
            {
                self.all[i].state = State::Open;
                self.queue_arm(i);
            }
        }
    }

    /// Stops accepting: cancels every listener's accepts in flight and closes each listener
    /// once its last accept completed (at once when none is in flight).
    pub fn drain(&mut self, ring: &mut Ring) {
        if self.draining {
            return;
        }
        self.draining = true;
        for (i, l) in self.all.iter_mut().enumerate() {
            if l.state == State::Cancelling || l.state == State::Closed {
                continue;
            }
            if l.in_flight == 0 {
                l.state = State::Closed;
                l.fd = None;
                continue;
            }
            l.state = State::Cancelling;
            let cancel = Token {
                kind: OpKind::CancelAccept,
                ..accept_token(i)
            };
            ring.push(
                Op::Cancel {
                    target: accept_token(i),
                    all: true,
                },
                cancel,
            );
        }
    }
}

/// Takes one connection waiting in `listener`'s queue without blocking: its fd, or the
/// negated errno (`-EAGAIN` when none waits) as an accept completion would carry it.
fn take_queued(listener: &OwnedFd) -> i32 {
    // SAFETY: `listener` is an open socket owned by this worker; null address and length
    // ask for no peer address.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EAGAIN)
    } else {
        fd
    }
}

/// The user data of listener `i`'s accepts.
fn accept_token(i: usize) -> Token {
    Token::new(
        u32::try_from(i).unwrap_or(u32::MAX),
        0,
        Direction::ClientToUpstream,
        OpKind::Accept,
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use std::time::Duration;

    use super::super::ring;
    use super::*;

    /// One engine instance's worker, reduced to its listener and ring.
    struct Instance {
        ring: Ring,
        listeners: Listeners,
        cqes: Vec<(u64, i32, u32)>,
    }

    impl Instance {
        fn on(listener: &TcpListener) -> Self {
            let (raw, _) = ring::build(64).expect("io_uring set-up");
            let mut listeners = Listeners::new(0, 1, 8);
            listeners.install(vec![Bound {
                rule: 0,
                port: 0,
                listener: listener.try_clone().expect("dup the listener"),
            }]);
            let mut me = Self {
                ring: Ring::new(raw),
                listeners,
                // `reap` fills at most the spare capacity.
                cqes: Vec::with_capacity(64),
            };
            me.listeners.fill(&mut me.ring);
            me.ring.submit_and_peek().expect("submit the accepts");
            me
        }

        /// Runs the ring for up to `wait` and returns the connections its accepts brought.
        fn turn(&mut self, wait: Duration) -> Vec<OwnedFd> {
            self.ring.submit_and_wait(wait).expect("io_uring_enter");
            self.cqes.clear();
            self.ring.reap(&mut self.cqes);
            let mut got = Vec::new();
            for &(ud, res, _) in &self.cqes {
                let t = Token::decode(ud).expect("a token of ours");
                if t.kind == OpKind::Accept
                    && let Some(a) =
                        self.listeners
                            .accept_completed(t.slot as usize, res, Instant::now(), "r")
                {
                    got.push(a.client);
                }
            }
            got
        }
    }

    /// The hand-over race, step by step: an older instance's accepts wait on a listening
    /// socket ahead of a newer instance's (io_uring accepts wait as exclusive waiters, so a
    /// connection wakes only the first); a client connects, and its one wake-up goes to the
    /// older instance's accept; that instance then drains and cancels its accepts before its
    /// ring ran the woken accept (DEFER_TASKRUN runs it only when the worker next enters the
    /// kernel), so the accept completes cancelled and the connection stays queued while the
    /// newer instance sleeps. The older instance must look at the queue again when an accept
    /// of it ends cancelled, and serve what it finds.
    #[test]
    fn a_connection_whose_wake_up_went_to_a_cancelled_accept_is_still_served() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut old = Instance::on(&listener);
        let mut new = Instance::on(&listener);
        let mut client = TcpStream::connect(addr).expect("connect");
        // The connection is queued (and its wake-up delivered) before the old one drains.
        let mut pfd = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&listener),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(2000u16));
        assert!(
            matches!(ready, Ok(1)),
            "the connection reached the listen queue"
        );
        old.listeners.drain(&mut old.ring);
        let mut served = Vec::new();
        for _ in 0..40 {
            served.extend(old.turn(Duration::from_millis(25)));
            served.extend(new.turn(Duration::from_millis(25)));
            if old.listeners.all_closed() && !served.is_empty() {
                break;
            }
        }
        assert!(
            old.listeners.all_closed(),
            "the old instance closed its listener"
        );
        assert_eq!(
            served.len(),
            1,
            "the connection was accepted by one of the instances, not left in the queue"
        );
        // And it is the client's connection.
        let mut server = TcpStream::from(served.pop().expect("one connection"));
        server.set_nonblocking(false).expect("blocking");
        client.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        server.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"x");
    }
}
