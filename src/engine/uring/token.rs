//! Typed `user_data`: which connection slot, which generation of it, which direction and
//! which kind of operation a completion belongs to, packed into the SQE's 64 bits.
//!
//! The generation makes a completion for a slot that has since been reused recognisable as
//! stale (it can only happen for ops that were never counted, which is a bug, but the check
//! turns a silent corruption into a logged one).

use crate::vocab::Direction;

/// What an in-flight operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// Multishot accept on a listener; `slot` is the listener index.
    Accept = 1,
    /// Upstream connect (linked to a [`OpKind::ConnectTimeout`]).
    Connect = 2,
    /// The link timeout of a connect.
    ConnectTimeout = 3,
    /// Single-shot recv with a buffer selected from the ring.
    Recv = 4,
    /// Send of a pooled buffer.
    Send = 5,
    /// Cancel of every op on one of the connection's fds.
    Cancel = 6,
    /// Cancel of a listener's accept.
    CancelAccept = 7,
    /// Multishot POLLIN on a spliced direction's source.
    Poll = 8,
    /// One-shot POLLOUT on a spliced direction's destination.
    PollOut = 9,
    /// Recv of the client's PROXY header into the connection's header buffer.
    HeaderRecv = 10,
    /// Send of the preamble (PROXY header, early client bytes) to the upstream.
    PreambleSend = 11,
    /// One-shot POLLIN on an idle copy direction's source, in place of its recv.
    ParkPoll = 12,
}

impl OpKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Accept,
            2 => Self::Connect,
            3 => Self::ConnectTimeout,
            4 => Self::Recv,
            5 => Self::Send,
            6 => Self::Cancel,
            7 => Self::CancelAccept,
            8 => Self::Poll,
            9 => Self::PollOut,
            10 => Self::HeaderRecv,
            11 => Self::PreambleSend,
            12 => Self::ParkPoll,
            _ => return None,
        })
    }
}

/// The decoded form of a completion's `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub slot: u32,
    pub generation: u16,
    pub dir: Direction,
    pub kind: OpKind,
}

// Layout: slot in the high 32 bits, generation in bits 16..32, direction in bit 8, kind in
// the low byte. 0 is never a valid token (kind 0 does not exist).
impl Token {
    pub fn new(slot: u32, generation: u16, dir: Direction, kind: OpKind) -> Self {
        Self {
            slot,
            generation,
            dir,
            kind,
        }
    }

    pub fn encode(self) -> u64 {
        (u64::from(self.slot) << 32)
            | (u64::from(self.generation) << 16)
            | ((self.dir as u64) << 8)
            | self.kind as u64
    }

    /// `None` for a value this engine never submitted.
    pub fn decode(v: u64) -> Option<Self> {
        let kind = OpKind::from_u8((v & 0xff) as u8)?;
        let dir = match (v >> 8) & 0xff {
            0 => Direction::ClientToUpstream,
            1 => Direction::UpstreamToClient,
            _ => return None,
        };
        Some(Self {
            slot: (v >> 32) as u32,
            generation: ((v >> 16) & 0xffff) as u16,
            dir,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_field() {
        for kind in [
            OpKind::Accept,
            OpKind::Connect,
            OpKind::ConnectTimeout,
            OpKind::Recv,
            OpKind::Send,
            OpKind::Cancel,
            OpKind::CancelAccept,
            OpKind::Poll,
        ] {
            for dir in Direction::ALL {
                for (slot, generation) in [(0, 0), (1, 1), (u32::MAX, u16::MAX), (123_456, 789)] {
                    let t = Token::new(slot, generation, dir, kind);
                    assert_eq!(Token::decode(t.encode()), Some(t));
                }
            }
        }
    }

    #[test]
    fn foreign_values_are_rejected() {
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(0xff), None);
        assert_eq!(Token::decode((2 << 8) | OpKind::Recv as u64), None);
    }

    #[test]
    fn generations_tell_reused_slots_apart() {
        let old = Token::new(7, 1, Direction::ClientToUpstream, OpKind::Recv).encode();
        let new = Token::new(7, 2, Direction::ClientToUpstream, OpKind::Recv).encode();
        assert_ne!(old, new);
    }
}
