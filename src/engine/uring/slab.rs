//! The worker's connection table: a slab of entries addressed by slot and generation.
//!
//! The slab is allocated once, at its full capacity, and never grows past it, so an entry does
//! not move while it lives: the kernel may read from it (a connect's target address) until the
//! op's completion. A removed slot's generation changes, so a completion that still names the
//! old generation is recognised as stale instead of reaching the slot's next connection.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::conn::Conn;
use super::splice::{Pipe, SpliceDir, SysPipeIo};
use crate::metrics::tap::TapSession;
use crate::session::{Session, Step};
use crate::vocab::Direction;

/// A live connection.
///
/// The slab holds one per connection for as long as it lives, so an idle connection costs
/// what this costs (`a_connection_slot_stays_small` holds the budget): what only some
/// connections need, or only for a while, sits behind a pointer instead.
pub struct Entry {
    pub conn: Conn,
    pub session: Session,
    pub client: OwnedFd,
    /// The current attempt's socket (none between a failed attempt and the next dial).
    pub upstream: Option<OwnedFd>,
    rule: u32,
    /// Ops pushed for this connection whose last completion has not arrived: counted only
    /// by [`Entry::submitted`] and [`Entry::completed`].
    in_flight: u32,
    /// What the connection needs only until it relays, and the splice pipes and the tap
    /// session, which most connections never have: one allocation, made when the first is
    /// needed and freed when the last goes (for an idle connection, once it relays).
    aside: Option<Box<Aside>>,
}

/// A connection's state before it relays.
pub struct Setup {
    /// The session's last step not yet carried out (where to connect next, the preamble to
    /// send, or the close it decided on, kept until the machine finishes).
    pub step: Option<Step>,
    /// The current attempt's address; the kernel reads it until the connect completes.
    pub target: Target,
    /// Header and preamble bytes, only for rules that read or send a PROXY header.
    pub preamble: Option<Box<Preamble>>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            step: None,
            target: Target::from(SocketAddr::from(([0, 0, 0, 0], 0))),
            preamble: None,
        }
    }
}

/// What only some connections hold, or only for a while.
#[derive(Default)]
struct Aside {
    /// Until the connection relays (and, for a session that ends before, until it closes):
    /// dropped by [`Entry::relaying`].
    setup: Option<Setup>,
    /// The pipe each direction leased while on the splice path.
    pipes: [Option<Pipe>; 2],
    /// This connection's session in the rule's traffic tap, if the rule has one.
    tap: Option<TapSession>,
}

impl Aside {
    fn is_empty(&self) -> bool {
        self.setup.is_none() && self.pipes.iter().all(Option::is_none) && self.tap.is_none()
    }
}
/// A connection's own small buffer for the PROXY header it reads and the preamble it sends.
/// The kernel writes into (or reads from) `buf` while an op is in flight, so it is resized
/// only between completions.
#[derive(Debug, Default)]
pub struct Preamble {
    /// Header bytes read so far live in `buf[..filled]`; after the header, what goes to the
    /// upstream lives in `buf[sent..filled]`.
    pub buf: Vec<u8>,
    pub filled: usize,
    pub sent: usize,
    /// `buf` holds the outgoing preamble (built once, at the first send).
    pub outgoing: bool,
    /// The header must be complete by then.
    pub deadline: Option<std::time::Instant>,
}

impl Entry {
    /// A freshly admitted connection: no upstream socket yet, nothing in flight, `step` to
    /// carry out.
    ///
    /// # Panics
    /// `rule` does not fit 32 bits (the config holds far fewer rules).
    pub fn new(conn: Conn, session: Session, rule: usize, client: OwnedFd, step: Step) -> Self {
        Self {
            conn,
            session,
            client,
            upstream: None,
            rule: u32::try_from(rule).expect("rule index fits 32 bits"),
            in_flight: 0,
            aside: Some(Box::new(Aside {
                setup: Some(Setup {
                    step: Some(step),
                    ..Setup::default()
                }),
                ..Aside::default()
            })),
        }
    }

    /// The connection's rule (index into the worker's rules).
    pub fn rule(&self) -> usize {
        self.rule as usize
    }

    /// The state before the relay (made again if a close comes after it was dropped).
    pub fn setup_mut(&mut self) -> &mut Setup {
        self.aside
            .get_or_insert_with(Box::default)
            .setup
            .get_or_insert_with(Setup::default)
    }

    pub fn setup(&self) -> Option<&Setup> {
        self.aside.as_ref()?.setup.as_ref()
    }

    /// The relay state, the session and the state before the relay, borrowed together.
    pub fn parts(&mut self) -> (&mut Conn, &mut Session, Option<&mut Setup>) {
        let setup = self.aside.as_mut().and_then(|a| a.setup.as_mut());
        (&mut self.conn, &mut self.session, setup)
    }

    /// The step not yet carried out, taken.
    pub fn take_step(&mut self) -> Option<Step> {
        self.aside.as_mut()?.setup.as_mut()?.step.take()
    }

    pub fn set_step(&mut self, step: Step) {
        self.setup_mut().step = Some(step);
    }

    pub fn preamble(&self) -> Option<&Preamble> {
        self.setup()?.preamble.as_deref()
    }

    pub fn preamble_mut(&mut self) -> Option<&mut Preamble> {
        self.aside.as_mut()?.setup.as_mut()?.preamble.as_deref_mut()
    }

    /// The connection relays: what it needed before is freed (no op reads it any more: the
    /// connect completed and the preamble went out).
    pub fn relaying(&mut self) {
        if let Some(a) = self.aside.as_mut() {
            a.setup = None;
        }
        self.drop_empty_aside();
    }

    /// The pipe the direction leased, if it is on the splice path.
    pub fn pipe(&self, dir: Direction) -> Option<&Pipe> {
        self.aside.as_ref()?.pipes[dir as usize].as_ref()
    }

    pub fn set_pipe(&mut self, dir: Direction, pipe: Pipe) {
        self.aside.get_or_insert_with(Box::default).pipes[dir as usize] = Some(pipe);
    }

    pub fn take_pipe(&mut self, dir: Direction) -> Option<Pipe> {
        let pipe = self.aside.as_mut()?.pipes[dir as usize].take();
        self.drop_empty_aside();
        pipe
    }

    /// This connection's tap session, if its rule taps traffic.
    pub fn tap(&self) -> Option<&TapSession> {
        self.aside.as_ref()?.tap.as_ref()
    }

    pub fn set_tap(&mut self, tap: TapSession) {
        self.aside.get_or_insert_with(Box::default).tap = Some(tap);
    }

    pub fn take_tap(&mut self) -> Option<TapSession> {
        let tap = self.aside.as_mut()?.tap.take();
        self.drop_empty_aside();
        tap
    }

    /// What a spliced direction's pump works on: its state and the real splices between its
    /// source, its pipe and its destination (none unless the direction is on the splice path
    /// with a pipe and the upstream exists).
    pub fn splice_parts(&mut self, dir: Direction) -> Option<(&mut SpliceDir, SysPipeIo<'_>)> {
        let upstream = self.upstream.as_ref()?;
        let pipe = self.aside.as_ref()?.pipes[dir as usize].as_ref()?;
        let state = self.conn.splice_mut(dir)?;
        let (src, dst) = match dir {
            Direction::ClientToUpstream => (&self.client, upstream),
            Direction::UpstreamToClient => (upstream, &self.client),
        };
        Some((state, SysPipeIo { src, dst, pipe }))
    }

    fn drop_empty_aside(&mut self) {
        if self.aside.as_ref().is_some_and(|x| x.is_empty()) {
            self.aside = None;
        }
    }

    /// Ops submitted for this connection whose last completion has not arrived.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// `n` more SQEs were pushed for this connection.
    pub fn submitted(&mut self, n: u32) {
        self.in_flight += n;
    }

    /// The last completion of one of this connection's ops arrived.
    ///
    /// # Panics
    /// (Debug builds) nothing was in flight: a completion counted twice, a bug.
    pub fn completed(&mut self) {
        debug_assert!(self.in_flight > 0, "completion without an op in flight");
        self.in_flight -= 1;
    }

    /// The sockets ops may be in flight on (client, and upstream once it exists).
    pub fn open_fds(&self) -> u32 {
        1 + u32::from(self.upstream.is_some())
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

/// A connect's target as the kernel reads it: a `sockaddr_in` or `sockaddr_in6` (32 bytes
/// at most, where a generic `sockaddr_storage` would take 128 in every slot).
#[derive(Clone, Copy)]
pub enum Target {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(a) => Self::V4(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            }),
            SocketAddr::V6(a) => Self::V6(libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            }),
        }
    }
}

impl Target {
    /// The address for the kernel (valid as long as `self` does not move).
    pub fn as_ptr(&self) -> *const libc::sockaddr {
        match self {
            Self::V4(a) => std::ptr::from_ref(a).cast(),
            Self::V6(a) => std::ptr::from_ref(a).cast(),
        }
    }

    pub fn len(&self) -> libc::socklen_t {
        match self {
            Self::V4(_) => std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            Self::V6(_) => std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        }
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Fixed-capacity table of live connections.
pub struct Slab {
    /// A slot is `None` while free (the entry's sockets give `Option` a spare value, so a
    /// slot costs exactly an entry).
    slots: Vec<Option<Entry>>,
    /// Each slot's generation, beside the slots rather than in them: two bytes, where in a
    /// slot alignment would make them eight.
    generations: Vec<u16>,
    free: Vec<u32>,
    live: usize,
    /// Entries ever inserted.
    inserted: u64,
}

impl Slab {
    /// Reserves room for `capacity` connections (address space only until used).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            slots: Vec::with_capacity(capacity),
            generations: Vec::with_capacity(capacity),
            free: Vec::new(),
            live: 0,
            inserted: 0,
        }
    }

    /// Entries ever inserted (connections admitted by this worker).
    pub fn inserted(&self) -> u64 {
        self.inserted
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
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[slot as usize] = Some(entry);
        self.live += 1;
        self.inserted += 1;
        (slot, self.generations[slot as usize])
    }

    fn is_current(&self, slot: u32, generation: u16) -> bool {
        self.generations.get(slot as usize) == Some(&generation)
    }

    /// The entry in `slot` if it is still of `generation`.
    pub fn get(&self, slot: u32, generation: u16) -> Option<&Entry> {
        if !self.is_current(slot, generation) {
            return None;
        }
        self.slots.get(slot as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, slot: u32, generation: u16) -> Option<&mut Entry> {
        if !self.is_current(slot, generation) {
            return None;
        }
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// The generation of a live slot.
    pub fn generation(&self, slot: u32) -> Option<u16> {
        self.slots
            .get(slot as usize)?
            .as_ref()
            .map(|_| self.generations[slot as usize])
    }

    /// Takes the entry out and retires the generation.
    pub fn remove(&mut self, slot: u32, generation: u16) -> Option<Entry> {
        if !self.is_current(slot, generation) {
            return None;
        }
        let s = self.slots.get_mut(slot as usize)?;
        debug_assert!(
            s.as_ref().is_none_or(|e| e.in_flight == 0),
            "slab entry removed with ops in flight"
        );
        let e = s.take()?;
        let g = &mut self.generations[slot as usize];
        *g = g.wrapping_add(1);
        self.free.push(slot);
        self.live -= 1;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn a_target_is_what_socket2_would_hand_the_kernel() {
        for text in ["10.1.2.3:8443", "[2001:db8::7]:443", "[fe80::1%2]:80"] {
            let addr: SocketAddr = text.parse().unwrap();
            let ours = Target::from(addr);
            let theirs = socket2::SockAddr::from(addr);
            assert_eq!(ours.len(), theirs.len(), "{text}");
            // SAFETY: both pointers are valid for `len` bytes for the duration of the test.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts(ours.as_ptr().cast::<u8>(), ours.len() as usize),
                    std::slice::from_raw_parts(theirs.as_ptr().cast::<u8>(), theirs.len() as usize),
                )
            };
            assert_eq!(a, b, "{text}");
        }
    }

    /// An idle uring connection costs its slot (the entry, and its generation beside it)
    /// and little else: the budget is 256 B of memory per idle connection, and what the
    /// worker allocates around a burst of connections (their set-up state) and at its first
    /// connections (first-use state) comes on top of the slot in the measurement
    /// (docs/BENCHMARKS.md, "Idle memory per connection, measured warm"). So the slot stays
    /// at what it is now, 226 B (session 120 B, relay state 80 B): anything added comes out
    /// of that margin, and goes behind the one pointer (`Aside`) unless every connection
    /// needs it for its whole life.
    #[test]
    fn a_connection_slot_stays_small() {
        use std::mem::size_of;
        const SLOT_BUDGET: usize = 226;
        let slot = size_of::<Option<Entry>>() + size_of::<u16>();
        assert_eq!(
            size_of::<Option<Entry>>(),
            size_of::<Entry>(),
            "a free slot must cost no tag"
        );
        assert!(
            slot <= SLOT_BUDGET,
            "a slot grew to {slot} B (entry {} B: relay state {} B, session {} B)",
            size_of::<Entry>(),
            size_of::<Conn>(),
            size_of::<Session>()
        );
    }
}
