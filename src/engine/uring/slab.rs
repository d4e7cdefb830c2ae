//! The worker's connection table: a slab of entries addressed by slot and generation.
//!
//! The slab is allocated once, at its full capacity, and never grows past it, so an entry does
//! not move while it lives: the kernel may read from it (a connect's target address) until the
//! op's completion. A removed slot's generation changes, so a completion that still names the
//! old generation is recognised as stale instead of reaching the slot's next connection.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use socket2::SockAddr;

use super::conn::Conn;
use super::splice::Pipe;
use crate::metrics::Direction;
use crate::metrics::tap::TapSession;
use crate::session::Session;

/// A live connection.
pub struct Entry {
    pub conn: Conn,
    pub session: Session,
    pub rule: usize,
    pub client: OwnedFd,
    /// The current attempt's socket (none between a failed attempt and the next dial).
    pub upstream: Option<OwnedFd>,
    /// The current attempt's address; the kernel reads it until the connect completes.
    pub target: SockAddr,
    /// Ops pushed for this connection whose last completion has not arrived.
    pub in_flight: u32,
    /// The pipe each direction leased while on the splice path.
    pub pipes: [Option<Pipe>; 2],
    /// This connection's session in the rule's traffic tap, if the rule has one.
    pub tap: Option<TapSession>,
}

impl Entry {
    /// A freshly admitted connection: no upstream socket yet, nothing in flight.
    pub fn new(conn: Conn, session: Session, rule: usize, client: OwnedFd) -> Self {
        Self {
            conn,
            session,
            rule,
            client,
            upstream: None,
            target: SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0))),
            in_flight: 0,
            pipes: [None, None],
            tap: None,
        }
    }

    fn upstream_raw(&self) -> RawFd {
        // -1 makes an op fail with EBADF (and the connection close) rather than touch
        // another fd; the machine never asks for upstream I/O before the connect succeeded.
        self.upstream.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Where the direction reads from.
    pub fn src(&self, dir: Direction) -> RawFd {
        match dir {
            Direction::ClientToUpstream => self.client.as_raw_fd(),
            Direction::UpstreamToClient => self.upstream_raw(),
        }
    }

    /// Where the direction writes to.
    pub fn dst(&self, dir: Direction) -> RawFd {
        match dir {
            Direction::ClientToUpstream => self.upstream_raw(),
            Direction::UpstreamToClient => self.client.as_raw_fd(),
        }
    }

    /// The fds ops may be in flight on.
    pub fn fds(&self) -> impl Iterator<Item = (RawFd, Direction)> + '_ {
        std::iter::once((self.client.as_raw_fd(), Direction::ClientToUpstream)).chain(
            self.upstream
                .as_ref()
                .map(|u| (u.as_raw_fd(), Direction::UpstreamToClient)),
        )
    }
}

struct Slot {
    generation: u16,
    entry: Option<Entry>,
}

/// Fixed-capacity table of live connections.
pub struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

impl Slab {
    /// Reserves room for `capacity` connections (address space only until used).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            slots: Vec::with_capacity(capacity),
            free: Vec::new(),
            live: 0,
        }
    }

    pub fn live(&self) -> usize {
        self.live
    }

    /// Highest slot index ever used plus one (for scans).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Whether [`Slab::insert`] has room.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty() || self.slots.len() < self.slots.capacity()
    }

    /// Stores an entry and says where.
    ///
    /// # Panics
    /// The slab is full (check [`Slab::has_room`] first): growing it would move live entries
    /// the kernel may be reading.
    pub fn insert(&mut self, entry: Entry) -> (u32, u16) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                assert!(self.slots.len() < self.slots.capacity(), "slab full");
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.entry = Some(entry);
        self.live += 1;
        (slot, s.generation)
    }

    /// The entry in `slot` if it is still of `generation`.
    pub fn get(&self, slot: u32, generation: u16) -> Option<&Entry> {
        self.slots
            .get(slot as usize)
            .filter(|s| s.generation == generation)
            .and_then(|s| s.entry.as_ref())
    }

    pub fn get_mut(&mut self, slot: u32, generation: u16) -> Option<&mut Entry> {
        self.slots
            .get_mut(slot as usize)
            .filter(|s| s.generation == generation)
            .and_then(|s| s.entry.as_mut())
    }

    /// The generation of a live slot.
    pub fn generation(&self, slot: u32) -> Option<u16> {
        self.slots
            .get(slot as usize)
            .filter(|s| s.entry.is_some())
            .map(|s| s.generation)
    }

    /// Takes the entry out and retires the generation.
    pub fn remove(&mut self, slot: u32, generation: u16) -> Option<Entry> {
        let s = self
            .slots
            .get_mut(slot as usize)
            .filter(|s| s.generation == generation)?;
        let e = s.entry.take()?;
        s.generation = s.generation.wrapping_add(1);
        self.free.push(slot);
        self.live -= 1;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection memory target is 4 KiB; the slab entry is the only per-connection
    /// allocation of the engine (buffers are pooled, fds and sockets live in the kernel).
    #[test]
    fn a_connection_slot_stays_small() {
        let size = std::mem::size_of::<Slot>();
        assert!(size <= 512, "Slot grew to {size} bytes");
    }
}
