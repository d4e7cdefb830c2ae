//! A worker's listeners: one-shot accepts kept in flight on each, paced by the connections
//! the worker has not settled yet, backed off when fds run out, cancelled at drain; and the
//! hand-over of listening sockets from an older engine instance.
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
use std::time::{Duration, Instant};

use super::ring::{Op, Ring};
use super::token::{OpKind, Token};
use crate::metrics::Direction;
use crate::net;

/// One-shot accepts a listener keeps in flight at most (while the worker is under its
/// accept bound). One-shot, not multishot: a multishot accept drains the whole listen queue
/// into the completion queue at once (thousands of fds in one burst under a connection flood),
/// where one-shot accepts let the worker take no more than it can dispose of.
const ACCEPT_WINDOW: u32 = 64;

/// How long after it starts a worker looks for connections whose accept wake-up was lost
/// to an older instance's cancelled accepts (see [`Listeners::pick_up_lost_wakeups`]).
const HANDOFF_WATCH: Duration = Duration::from_secs(5);

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
    /// See [`Listeners::pick_up_lost_wakeups`].
    handoff_watch_until: Instant,
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
            handoff_watch_until: Instant::now(),
        }
    }

    /// Takes the worker's listeners on, every one queued for its first accepts.
    pub fn install(&mut self, bound: Vec<Bound>, now: Instant) {
        for b in &bound {
            self.by_rule[b.rule] += 1;
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
        self.handoff_watch_until = now + HANDOFF_WATCH;
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
        let share = super::listener_share(self.accept_bound, rules_here);
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
        if l.state == State::Cancelling {
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
        // SAFETY: a successful accept completion carries a new fd that nothing else owns.
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

    /// The first [`HANDOFF_WATCH`] of a worker's life, when an older engine instance (a
    /// reload's previous generation, or the process this one took the sockets over from)
    /// cancels its accepts on the same sockets: io_uring accepts wait as *exclusive* waiters
    /// on a listener, so a connection's one wake-up can go to an accept that is being
    /// cancelled and is then lost — the connection sits in the queue, with this worker's
    /// accepts armed, until the next connection arrives. Each tick of that window looks
    /// (one `poll(2)` over every open listener) for a queue with a connection in it and
    /// submits one more accept there, whose first, inline attempt takes it.
    pub fn pick_up_lost_wakeups(&mut self, now: Instant, ring: &mut Ring) {
        if self.draining || now >= self.handoff_watch_until {
            return;
        }
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let open: Vec<usize> = (0..self.all.len())
            .filter(|&i| self.all[i].state == State::Open && self.all[i].fd.is_some())
            .collect();
        let ready: Vec<usize> = {
            let mut fds: Vec<PollFd<'_>> = open
                .iter()
                .filter_map(|&i| self.all[i].fd.as_ref())
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                .collect();
            if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
                return;
            }
            open.iter()
                .zip(&fds)
                .filter(|(_, p)| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
                .map(|(&i, _)| i)
                .collect()
        };
        for i in ready {
            self.push_accept(i, ring);
        }
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
