//! Sockets on both sides of the forwarder: clients, upstream listeners the test drives by hand,
//! threaded backends, and upstream addresses that refuse or never answer.
//!
//! Every stream made here carries read and write timeouts of [`STEP_TIMEOUT`], so a relay that
//! loses a byte or an end-of-stream fails the test with a timeout instead of hanging it. The
//! end of a stream is observed with [`wait_end`], which tells a clean EOF from a reset: the
//! difference is exactly what a forwarder must not blur.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::STEP_TIMEOUT;

/// Backlog of every test listener: far above the 1000 connections the largest scenario opens.
const BACKLOG: i32 = 2048;
/// Stack of a backend connection thread; the handlers are small loops.
const HANDLER_STACK: usize = 256 << 10;

/// Puts the test's bounds on a stream: read and write timeouts, no Nagle delay.
pub fn bounded(s: &TcpStream) {
    s.set_read_timeout(Some(STEP_TIMEOUT))
        .expect("set read timeout");
    s.set_write_timeout(Some(STEP_TIMEOUT))
        .expect("set write timeout");
    s.set_nodelay(true).expect("set TCP_NODELAY");
}

/// Connects to `addr` within [`STEP_TIMEOUT`]; the stream is [`bounded`].
///
/// # Panics
/// The connection failed.
pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Connects to `addr` within [`STEP_TIMEOUT`]; the stream is [`bounded`].
///
/// # Errors
/// The connect error. Note that a connection the forwarder accepts and resets at once (a
/// refused upstream) can fail here with ECONNRESET: the reset arrived before the connect
/// call collected its result.
pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)?;
    bounded(&s);
    Ok(s)
}

/// Connects to `addr` and waits up to `within` for the forwarder to close the connection
/// without sending anything; returns how it ended and after how long. A reset that beats
/// the connect call counts as [`End::Reset`].
pub fn connect_expect_closed(addr: SocketAddr, within: Duration) -> (End, Duration) {
    let started = Instant::now();
    match try_connect(addr) {
        Ok(mut s) => {
            let (end, data) = wait_end(&mut s, within);
            assert!(
                data.is_empty(),
                "{} unexpected bytes before the close",
                data.len()
            );
            (end, started.elapsed())
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => (End::Reset, started.elapsed()),
        Err(e) => panic!("connect to {addr}: {e}"),
    }
}

/// Closes `s` with an RST instead of a FIN (`SO_LINGER` 0).
pub fn reset(s: TcpStream) {
    SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER 0");
    drop(s);
}

/// Reads exactly `n` bytes.
///
/// # Panics
/// The stream ended, failed or stalled for [`STEP_TIMEOUT`] first.
pub fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// How a stream ended, as seen by a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `read` returned 0: the peer sent FIN.
    Eof,
    /// `read` failed with ECONNRESET: the peer sent RST.
    Reset,
    /// Still open when the deadline passed.
    Open,
    /// Any other error.
    Failed(io::ErrorKind),
}

impl End {
    /// EOF or reset: the peer is gone, one way or the other.
    pub fn is_closed(self) -> bool {
        matches!(self, End::Eof | End::Reset)
    }
}

/// Reads until the stream ends or `within` passes; returns how it ended and the bytes read
/// before that (an RST may legitimately follow data).
pub fn wait_end(s: &mut TcpStream, within: Duration) -> (End, Vec<u8>) {
    let deadline = Instant::now() + within;
    let mut data = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break End::Open;
        }
        s.set_read_timeout(Some(left)).expect("set read timeout");
        match s.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break End::Reset,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break End::Failed(e.kind()),
        }
    };
    let _ = s.set_read_timeout(Some(STEP_TIMEOUT));
    (end, data)
}

/// Reads to a clean EOF.
///
/// # Panics
/// The stream was reset, failed, or did not end within [`STEP_TIMEOUT`].
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    match wait_end(s, STEP_TIMEOUT) {
        (End::Eof, data) => data,
        (end, data) => panic!(
            "expected data then EOF, got {end:?} after {} bytes",
            data.len()
        ),
    }
}

/// A TCP listener on loopback port 0 that the test accepts from by hand, so it controls the
/// upstream side of a connection step by step.
pub struct Upstream {
    listener: TcpListener,
}

impl Upstream {
    /// Listens on `127.0.0.1:0`.
    pub fn bind() -> Self {
        Self::bind_on("127.0.0.1:0".parse().expect("loopback address"))
    }

    /// Listens on `addr` (port 0 for a free port).
    ///
    /// # Panics
    /// The address cannot be bound.
    pub fn bind_on(addr: SocketAddr) -> Self {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .expect("socket");
        s.bind(&addr.into())
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self::from_socket(s)
    }

    /// Starts listening on an already bound socket.
    ///
    /// # Panics
    /// `listen(2)` failed.
    pub fn from_socket(s: Socket) -> Self {
        s.listen(BACKLOG).expect("listen");
        Self { listener: s.into() }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("listener address")
    }

    /// The next connection, if one arrives within `within`; the stream is [`bounded`].
    pub fn accept_within(&self, within: Duration) -> Option<TcpStream> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            match poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return None,
                Ok(_) => {
                    let (s, _) = self.listener.accept().expect("accept");
                    s.set_nonblocking(false).expect("blocking stream");
                    bounded(&s);
                    return Some(s);
                }
                Err(nix::Error::EINTR) => {}
                Err(e) => panic!("poll on a test listener: {e}"),
            }
        }
    }

    /// The next connection.
    ///
    /// # Panics
    /// None arrived within [`STEP_TIMEOUT`].
    pub fn accept(&self) -> TcpStream {
        self.accept_within(STEP_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "the forwarder did not connect to the upstream {} within {STEP_TIMEOUT:?}",
                self.addr()
            )
        })
    }
}

/// An upstream server on its own threads: one accept thread, one thread per connection
/// running `handler`. Stopped (accept thread joined) on drop; handler threads end with their
/// connections, which are bounded like every test stream.
pub struct Backend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Serves `handler` on `127.0.0.1:0`.
    pub fn spawn(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Self {
        Self::spawn_on(Upstream::bind(), handler)
    }

    /// Serves `handler` on an existing listener.
    pub fn spawn_on(
        upstream: Upstream,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Self {
        let addr = upstream.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::Builder::new()
                .name("test-backend-accept".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let Some(s) = upstream.accept_within(Duration::from_millis(50)) else {
                            continue;
                        };
                        accepted.fetch_add(1, Ordering::AcqRel);
                        let h = handler.clone();
                        std::thread::Builder::new()
                            .name("test-backend-conn".into())
                            .stack_size(HANDLER_STACK)
                            .spawn(move || h(s))
                            .expect("spawn a backend connection thread");
                    }
                })
                .expect("spawn the backend accept thread")
        };
        Self {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// An echo server: every byte back, FIN after FIN.
    pub fn echo() -> Self {
        Self::spawn(echo)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echo handler: writes back everything it reads; answers EOF with EOF, a reset or a stall
/// by dropping the connection.
pub fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A loopback port that refuses connections: a socket bound to it but not listening, held so
/// no other test can take the port meanwhile. [`ClosedPort::listen`] turns it into a working
/// upstream on the same address.
pub struct ClosedPort {
    socket: Socket,
    addr: SocketAddr,
}

impl ClosedPort {
    /// # Panics
    /// No loopback port could be bound.
    pub fn new() -> Self {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("loopback address");
        socket.bind(&any.into()).expect("bind a loopback port");
        let addr = socket
            .local_addr()
            .expect("bound address")
            .as_socket()
            .expect("an IP address");
        Self { socket, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts listening on the port: connections to it now succeed.
    pub fn listen(self) -> Upstream {
        Upstream::from_socket(self.socket)
    }
}

/// A loopback address whose TCP handshake never completes: a listener with backlog 0 whose
/// accept queue is already full and never drained, so the kernel drops every further SYN
/// (`LISTENOVERFLOWS`) and a connect hangs until the caller's timeout.
pub struct Unresponsive {
    _listener: Socket,
    _queued: Vec<Socket>,
    addr: SocketAddr,
}

impl Unresponsive {
    /// # Panics
    /// The accept queue could not be filled within a few bounded attempts (the kernel did not
    /// drop SYNs to a full queue as Linux does).
    pub fn new() -> Self {
        let listener =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("loopback address");
        listener.bind(&any.into()).expect("bind a loopback port");
        listener.listen(0).expect("listen with backlog 0");
        let addr = listener
            .local_addr()
            .expect("bound address")
            .as_socket()
            .expect("an IP address");
        // Linux queues backlog + 1 connections; a connect that then times out proves the
        // queue is full. A few attempts at most.
        let mut queued = Vec::new();
        for _ in 0..8 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
            match s.connect_timeout(&addr.into(), Duration::from_millis(300)) {
                Ok(()) => queued.push(s),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    return Self {
                        _listener: listener,
                        _queued: queued,
                        addr,
                    };
                }
                Err(e) => panic!("filling the accept queue of {addr}: {e}"),
            }
        }
        panic!("the accept queue of a backlog-0 listener never filled: connects keep completing");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// One short exchange through `addr` to an echo backend: connect, 16 bytes (`n`, in
/// decimal) there, the same 16 back. The client loops of the control-plane tests count
/// these, telling a refused connect (`ConnectionRefused`) from any other failure.
///
/// # Errors
/// The connect, a write or a read failed, or other bytes came back.
pub fn echo_exchange(addr: SocketAddr, n: u64) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    s.set_write_timeout(Some(STEP_TIMEOUT))?;
    let msg = format!("{n:016}");
    s.write_all(msg.as_bytes())?;
    let mut back = [0u8; 16];
    s.read_exact(&mut back)?;
    if back != msg.as_bytes() {
        return Err(io::Error::other(format!(
            "echo mismatch on {addr}: sent {msg:?}, got {:?}",
            String::from_utf8_lossy(&back)
        )));
    }
    Ok(())
}
