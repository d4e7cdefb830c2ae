//! What each action of the connection machine submits to the ring: [`pushed`] says how many
//! SQEs, [`build`] builds them. The worker counts what it pushes on the connection's entry
//! and checks (in debug builds) that it is what [`pushed`] says; the machine's test driver
//! counts with [`pushed`] too, so the two cannot drift apart.
//!
//! Actions that need no ring op (a buffer to release, bytes to count, a pump to run) push
//! nothing here; the worker carries them out itself.

use io_uring::types;

use super::bufpool::{BUFFER_GROUP, BufPool};
use super::conn::Action;
use super::ring::Op;
use super::slab::Entry;
use super::token::{OpKind, Token};
use crate::vocab::Direction;

/// What an idle copy direction's poll (or a spliced source's) waits for: data, or the peer's
/// FIN or reset.
const READABLE: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;

/// SQEs the worker pushes for `action`, for a connection with `open_fds` sockets (client,
/// and upstream once dialled) and `in_flight` ops in flight. A dial that finds no member
/// left, and a preamble with nothing (left) to send, push nothing and answer the machine
/// with an event instead; every other count is exact.
pub fn pushed(action: Action, open_fds: u32, in_flight: u32) -> u32 {
    match action {
        // The connect and its link timeout.
        Action::Dial => 2,
        Action::RecvHeader
        | Action::SendPreamble
        | Action::Recv(_)
        | Action::RecvMulti(_)
        | Action::Send { .. }
        | Action::PollIn(_)
        | Action::PollOut(_)
        | Action::CancelRecv(_)
        | Action::ParkPoll(_)
        | Action::LeaveSplice(_) => 1,
        // One cancel of every op per open socket, and only when something is in flight.
        Action::CancelAll if in_flight > 0 => open_fds,
        _ => 0,
    }
}

/// At most two ops with their tokens: what one action submits.
#[derive(Default)]
pub struct OpList<'a> {
    ops: [Option<(Op<'a>, Token)>; 2],
}

impl<'a> OpList<'a> {
    fn one(op: Op<'a>, token: Token) -> Self {
        Self {
            ops: [Some((op, token)), None],
        }
    }

    /// SQEs the list takes.
    pub fn sqes(&self) -> u32 {
        self.ops.iter().flatten().map(|(op, _)| op.sqes()).sum()
    }
}

impl<'a> IntoIterator for OpList<'a> {
    type Item = (Op<'a>, Token);
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<(Op<'a>, Token)>, 2>>;
    fn into_iter(self) -> Self::IntoIter {
        self.ops.into_iter().flatten()
    }
}

/// The ops `action` submits for the connection in `entry` (slot `slot` of `generation`),
/// built from the entry's sockets and buffers, the worker's pool and the rule's connect
/// timeout. The worker prepares what an op reads first (the upstream socket and target of a
/// dial, a grown header buffer, the built preamble).
pub fn build<'a>(
    action: Action,
    slot: u32,
    generation: u16,
    entry: &'a mut Entry,
    pool: &'a BufPool,
    connect_timeout: &'a types::Timespec,
) -> OpList<'a> {
    let token = |dir, kind| Token::new(slot, generation, dir, kind);
    let c2u = Direction::ClientToUpstream;
    match action {
        Action::Dial => {
            let fd = entry.dst(c2u);
            let Some(setup) = entry.setup() else {
                return OpList::default();
            };
            OpList::one(
                Op::Connect {
                    fd,
                    target: &setup.target,
                    timeout: connect_timeout,
                },
                token(c2u, OpKind::Connect),
            )
        }
        Action::RecvHeader => {
            let fd = entry.src(c2u);
            let Some(p) = entry.preamble_mut() else {
                return OpList::default();
            };
            let into = p.buf.get_mut(p.filled..).unwrap_or_default();
            OpList::one(Op::RecvInto { fd, into }, token(c2u, OpKind::HeaderRecv))
        }
        Action::SendPreamble => {
            let fd = entry.dst(c2u);
            let Some(p) = entry.preamble() else {
                return OpList::default();
            };
            let bytes = p.buf.get(p.sent..p.filled).unwrap_or_default();
            OpList::one(Op::Send { fd, bytes }, token(c2u, OpKind::PreambleSend))
        }
        Action::Recv(dir) | Action::RecvMulti(dir) => {
            // A multishot recv is armed where the socket is expected empty: it polls first.
            let multishot = matches!(action, Action::RecvMulti(_));
            OpList::one(
                Op::RecvSelect {
                    fd: entry.src(dir),
                    group: BUFFER_GROUP,
                    poll_first: multishot || entry.conn.expects_empty(dir),
                    multishot,
                },
                token(dir, OpKind::Recv),
            )
        }
        Action::Send { dir, buf, off, len } => {
            let fd = entry.dst(dir);
            let bytes = pool
                .filled(buf, off + len)
                .get(off as usize..)
                .unwrap_or_default();
            // A full buffer (a bulk stream) goes from its registered pages; a short message
            // by a plain send, which reaches the socket without the file write path's
            // set-up (a kiocb, an iterator over the registered pages): 0.5 us less of the
            // worker's CPU per round trip on one CPU (docs/BENCHMARKS.md).
            let op = if pool.registered() && off + len == pool.buf_size() {
                Op::WriteFixed {
                    fd,
                    bytes,
                    index: buf,
                }
            } else {
                Op::Send { fd, bytes }
            };
            OpList::one(op, token(dir, OpKind::Send))
        }
        Action::CancelRecv(dir) => OpList::one(
            Op::Cancel {
                target: token(dir, OpKind::Recv),
                all: false,
            },
            token(dir, OpKind::Cancel),
        ),
        Action::ParkPoll(dir) => OpList::one(
            Op::Poll {
                fd: entry.src(dir),
                events: READABLE,
                multishot: false,
            },
            token(dir, OpKind::ParkPoll),
        ),
        Action::PollIn(dir) => OpList::one(
            Op::Poll {
                fd: entry.src(dir),
                events: READABLE,
                multishot: true,
            },
            token(dir, OpKind::Poll),
        ),
        Action::PollOut(dir) => OpList::one(
            Op::Poll {
                fd: entry.dst(dir),
                events: libc::POLLOUT as u32,
                multishot: false,
            },
            token(dir, OpKind::PollOut),
        ),
        Action::LeaveSplice(dir) => OpList::one(
            Op::PollRemove {
                target: token(dir, OpKind::Poll),
            },
            token(dir, OpKind::Cancel),
        ),
        Action::CancelAll if entry.in_flight() > 0 => {
            let mut list = OpList::default();
            for (slot_, (fd, dir)) in list.ops.iter_mut().zip(entry.fds()) {
                *slot_ = Some((Op::CancelFd { fd }, token(dir, OpKind::Cancel)));
            }
            list
        }
        _ => OpList::default(),
    }
}
