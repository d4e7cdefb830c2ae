//! Binary upgrade: the running process hands its listening sockets to a new one over a unix
//! control socket (`control_socket = PATH`), the way HAProxy's `-x` and Envoy's hot restart
//! do. The sockets move — the very same sockets, with their accept queues — so no connection
//! that reached a queue before or during the upgrade is refused.
//!
//! The conversation, one `SOCK_SEQPACKET` message each (boundaries kept, descriptors attached
//! with `SCM_RIGHTS`, at most [`fds::FDS_PER_MESSAGE`] per message):
//!
//! ```text
//! new → old   TAKEOVER ringfwd/1
//! old → new   SOCKETS\n(rule NAME ADDR | admin - ADDR)\n…     + one descriptor per line
//! old → new   END N                                         (N descriptors in all)
//!             the new process starts serving on them (and binds what it lacks)
//! new → old   READY
//! old → new   DRAINING PID                                  the old one stops accepting,
//!                                                           drains, exits
//! ```
//!
//! Anything else from a peer ends that conversation with an `ERR` line and a log line; the
//! old process serves on. A new process that goes away before `READY` changes nothing.
//!
//! **Who may talk to it.** Whoever completes this conversation gets every listening socket,
//! so the socket is guarded three ways ([`ControlSocket`]):
//!
//! - it is created at start, *before* privileges are dropped (`user = ...`), so a root-owned
//!   directory such as `/run/ringfwd` works, and a path that cannot be created is an error at
//!   start, not a surprise at upgrade time. It is bound beside its path (`.NAME.PID.new`) and
//!   renamed onto it once the process serves, still before the drop: a new process that fails
//!   before it serves leaves the old one's socket in place. (After a drop, the process may
//!   not be able to remove the file when it exits; the next start replaces it.)
//! - its directory must not let anyone else replace it: it must exist, be owned by root or by
//!   the user the forwarder serves as, and not be group- or world-writable unless it has the
//!   sticky bit (`/tmp`); the file itself is mode 0600, owned by that user;
//! - every connection's peer is checked with `SO_PEERCRED`: only root and the user the
//!   forwarder serves as (the `user` it drops to, or the user it runs as) are answered;
//!   anyone else gets `ERR` and a warning in the log. The new process checks the old one the
//!   same way before it trusts the sockets it is sent.
//!
//! Every socket call on this path retries `EINTR` (see [`fds::recv_with_fds`]).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use super::Event;
use super::fds::{self, FDS_PER_MESSAGE};

const HELLO: &str = "TAKEOVER ringfwd/1";
/// How long either side waits for the other's next message (the new process's set-up
/// between `END` and `READY` gets [`SETUP_WAIT`]).
const STEP_WAIT: Duration = Duration::from_secs(10);
const SETUP_WAIT: Duration = Duration::from_secs(120);
const MAX_MESSAGE: usize = 64 << 10;
/// How long a refused peer's first message is waited for (see [`refuse`]): short, since the
/// control thread serves one connection at a time.
const REFUSE_WAIT: Duration = Duration::from_millis(500);

/// The listening sockets a running process hands over.
pub struct Handoff {
    /// `(rule name, socket)`: every listener of the current generation (several per rule
    /// with the io_uring engine: one per worker).
    pub rules: Vec<(String, TcpListener)>,
    pub admin: Option<TcpListener>,
}

fn seqpacket() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
}

fn recv_text(sock: &Socket, buf: &mut [u8]) -> io::Result<(String, Vec<OwnedFd>)> {
    let (n, fds) = fds::recv_with_fds(sock, buf)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other process closed the control connection",
        ));
    }
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
}

fn send_text(sock: &Socket, text: &str) -> io::Result<()> {
    fds::send_with_fds(sock, text.as_bytes(), &[]).map_err(io::Error::from)
}

/// Who may talk to a control socket: root, and the user the forwarder serves as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The uid the forwarder serves as: the `user` it drops to, or the one it runs as.
    pub uid: u32,
    /// That user's group (the socket file's group).
    pub gid: u32,
}

impl Access {
    /// For a forwarder that drops to `run_as` (if set) or else stays who it is now.
    pub fn new(run_as: Option<&crate::privdrop::RunAs>) -> Self {
        match run_as {
            Some(r) => Self {
                uid: r.uid,
                gid: r.gid,
            },
            None => {
                let (uid, gid) = crate::privdrop::effective_ids();
                Self { uid, gid }
            }
        }
    }

    /// Whether a peer (or a directory owner) with this uid is trusted.
    pub fn allows(self, uid: u32) -> bool {
        uid == 0 || uid == self.uid
    }

    /// Who is allowed, for messages: "root" or "root and uid N".
    pub fn who(self) -> String {
        if self.uid == 0 {
            "root".into()
        } else {
            format!("root and uid {}", self.uid)
        }
    }
}

/// Why a control socket cannot be created (at start, or flagged by `ringfwd check`).
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    #[error(
        "control_socket {path:?}: its directory {dir:?} does not exist (create it first, e.g. RuntimeDirectory=ringfwd in the systemd unit for /run/ringfwd)"
    )]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("control_socket {path:?}: {dir:?} is not a directory")]
    NotADirectory { path: PathBuf, dir: PathBuf },
    #[error(
        "control_socket {path:?}: directory {dir:?} is unsafe: {why}; use a directory only root or the forwarder's user can write, such as /run/ringfwd"
    )]
    UnsafeDirectory {
        path: PathBuf,
        dir: PathBuf,
        why: String,
    },
    #[error("control_socket {path:?}: {path:?} is a directory")]
    IsADirectory { path: PathBuf },
    #[error(
        "control_socket {path:?}: the path is too long for a unix socket (at most {max} bytes here)"
    )]
    TooLong { path: PathBuf, max: usize },
    #[error("control_socket {path:?}: cannot {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The longest path `bind` takes for a unix socket (`sun_path` less its terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Where the socket is bound before [`ControlSocket::publish`] renames it to `path`: beside
/// it, named after this process (so two starting processes never collide).
fn staged_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(
        || "control.sock".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    path.with_file_name(format!(".{name}.{}.new", std::process::id()))
}

/// The directory a socket path lives in (`.` for a bare file name).
fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that a control socket can safely be created at `path` by a forwarder serving as
/// `access`: its directory exists, is owned by root or that user, and is not writable by
/// anyone else (group- or world-writable only with the sticky bit); the path itself is not
/// a directory and fits a unix socket address. Run at start and by `ringfwd check`.
///
/// # Errors
/// The first thing found that is not so.
pub fn check_path(path: &Path, access: Access) -> Result<(), ControlSocketError> {
    let dir = directory_of(path);
    // Followed through symlinks: `/var/run` is one to `/run` on most systems.
    let meta = match std::fs::metadata(&dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ControlSocketError::NoDirectory {
                path: path.into(),
                dir,
            });
        }
        Err(source) => {
            return Err(ControlSocketError::Io {
                path: path.into(),
                what: "look at its directory",
                source,
            });
        }
    };
    if !meta.is_dir() {
        return Err(ControlSocketError::NotADirectory {
            path: path.into(),
            dir,
        });
    }
    let unsafe_dir = |why: String| ControlSocketError::UnsafeDirectory {
        path: path.into(),
        dir: dir.clone(),
        why,
    };
    if !access.allows(meta.uid()) {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not by {}",
            meta.uid(),
            access.who()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(unsafe_dir(format!(
            "it is {}-writable (mode {mode:04o}) without the sticky bit, so another user could replace the socket",
            if mode & 0o002 != 0 { "world" } else { "group" }
        )));
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(ControlSocketError::IsADirectory { path: path.into() });
    }
    let longest = staged_path(path)
        .as_os_str()
        .len()
        .max(path.as_os_str().len());
    if longest > SUN_PATH_MAX {
        let overhead = longest - path.as_os_str().len();
        return Err(ControlSocketError::TooLong {
            path: path.into(),
            max: SUN_PATH_MAX - overhead,
        });
    }
    Ok(())
}

/// A control socket, created at start (see the module docs): bound beside its path, then
/// [`ControlSocket::publish`]ed there once this process serves, then [`ControlSocket::serve`]d.
pub struct ControlSocket {
    listener: Socket,
    path: PathBuf,
    access: Access,
    /// The staged file, removed on drop until it is published.
    staged: Option<PathBuf>,
    /// Device and inode of the socket file: what [`remove_if_ours`] compares with.
    id: (u64, u64),
}

impl ControlSocket {
    /// Checks the path ([`check_path`]) and binds the socket beside it, mode 0600, owned by
    /// `access`'s user; it is not reachable at `path` before [`ControlSocket::publish`], so
    /// the process it takes over from (if any) keeps its own until then.
    ///
    /// Call it before privileges are dropped: the directory may be writable by root only.
    ///
    /// # Errors
    /// The path is unsafe, or the socket cannot be created.
    pub fn create(path: &Path, access: Access) -> Result<Self, ControlSocketError> {
        check_path(path, access)?;
        let io = |what: &'static str| {
            move |source: io::Error| ControlSocketError::Io {
                path: path.into(),
                what,
                source,
            }
        };
        let staged = staged_path(path);
        let listener = seqpacket().map_err(io("create a unix socket"))?;
        match std::fs::remove_file(&staged) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove a stale staged socket")(e)),
        }
        let addr = SockAddr::unix(&staged).map_err(io("address the socket"))?;
        // Created 0600 from the start (never connectable by others, not even briefly). The
        // umask is the process's: nothing else creates files while the process starts up.
        let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = listener.bind(&addr);
        nix::sys::stat::umask(umask);
        bound.map_err(io("bind the socket"))?;
        let mut out = Self {
            listener,
            path: path.into(),
            access,
            staged: Some(staged.clone()),
            id: (0, 0),
        };
        // Owned by the user the forwarder serves as, so that user may connect too (the
        // kernel asks for write permission on the file); a no-op for a process that does
        // not drop privileges.
        let meta = std::fs::symlink_metadata(&staged).map_err(io("look at the socket"))?;
        if meta.uid() != access.uid || meta.gid() != access.gid {
            std::os::unix::fs::lchown(&staged, Some(access.uid), Some(access.gid))
                .map_err(io("give the socket to the forwarder's user"))?;
        }
        if meta.permissions().mode() & 0o177 != 0 {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .map_err(io("make the socket mode 0600"))?;
        }
        out.id = (meta.dev(), meta.ino());
        out.listener.listen(4).map_err(io("listen on the socket"))?;
        Ok(out)
    }

    /// The path it is (or will be) reachable at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the socket file, for [`remove_if_ours`].
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Makes the socket reachable at its path, replacing whatever file is there (a stale
    /// socket, or the one of the process this one takes over from), in one `rename`. Call it
    /// before privileges are dropped, like [`ControlSocket::create`].
    ///
    /// # Errors
    /// The rename failed.
    pub fn publish(&mut self) -> Result<(), ControlSocketError> {
        if let Some(staged) = self.staged.take()
            && let Err(source) = std::fs::rename(&staged, &self.path)
        {
            let _ = std::fs::remove_file(staged);
            return Err(ControlSocketError::Io {
                path: self.path.clone(),
                what: "move the socket into place",
                source,
            });
        }
        Ok(())
    }

    /// Serves takeover requests on a thread of its own.
    ///
    /// # Errors
    /// The thread cannot start.
    pub fn serve(self, events: mpsc::Sender<Event>) -> io::Result<()> {
        let path = self.path.clone();
        let access = self.access;
        let listener = self.listener.try_clone()?;
        std::thread::Builder::new()
            .name("ringfwd-control".into())
            .spawn(move || {
                loop {
                    let conn = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "control socket: accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    if let Err(why) = check_peer(&conn, access) {
                        tracing::warn!(path = %path.display(), "control socket: connection refused: {why}");
                        refuse(&conn, &why.to_string());
                        continue;
                    }
                    match handle(&conn, &events) {
                        Ok(true) => {
                            // Handed over: the new process owns the path now; this one no
                            // longer answers on it.
                            return;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            let _ = send_text(&conn, &format!("ERR {e}"));
                            tracing::warn!(path = %path.display(), error = %e, "control socket: takeover not done; still serving");
                        }
                    }
                }
            })?;
        Ok(())
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if let Some(staged) = self.staged.take() {
            let _ = std::fs::remove_file(staged);
        }
    }
}

/// Removes the socket file at `path` if it is still the one with `id` (not a newer
/// process's). Best effort: after a privilege drop the directory may not be writable any
/// more, and the file then stays until the next start replaces it.
pub fn remove_if_ours(path: &Path, id: (u64, u64)) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id) {
        let _ = std::fs::remove_file(path);
    }
}

/// Answers a peer that may not talk here with `ERR why`, without reading what it asked.
/// Its first message is taken off the queue (and dropped, with any descriptors) before the
/// connection closes: closing with an unread message makes the kernel reset the peer's end,
/// and the peer would read `ECONNRESET` instead of the answer.
fn refuse(conn: &Socket, why: &str) {
    let _ = send_text(conn, &format!("ERR {why}"));
    let _ = conn.set_read_timeout(Some(REFUSE_WAIT));
    let mut buf = [0u8; 64];
    let _ = fds::recv_with_fds(conn, &mut buf);
}

/// The peer's credentials (`SO_PEERCRED`: who connected, as of `connect`), if `access`
/// allows it; else why not.
fn check_peer(conn: &Socket, access: Access) -> Result<(), PeerError> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(PeerError::Credentials)?;
    if access.allows(cred.uid()) {
        return Ok(());
    }
    Err(PeerError::NotAllowed {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
        allowed: access.who(),
    })
}

/// Why the process at the other end of the control socket is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot read the peer's credentials: {0}")]
    Credentials(#[source] nix::Error),
    #[error(
        "peer pid {pid} uid {uid} gid {gid} is not allowed (only {allowed} may take this process's sockets)"
    )]
    NotAllowed {
        pid: i32,
        uid: u32,
        gid: u32,
        allowed: String,
    },
}

/// Why `run --takeover PATH` did not get (or confirm) the running process's sockets.
/// `Display` starts with `--takeover PATH: `, the flag the operator gave.
#[derive(Debug, thiserror::Error)]
#[error("--takeover {}: {why}", path.display())]
pub struct TakeoverError {
    pub path: PathBuf,
    pub why: TakeoverFailure,
}

/// What went wrong in a takeover conversation.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverFailure {
    /// Connecting, sending or receiving failed (no process there, a timeout, a reset).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The process listening there is not trusted.
    #[error("the process listening there: {0}")]
    Untrusted(#[source] PeerError),
    /// The running process answered `ERR`: it will not hand its sockets over.
    #[error("the running process refused: {0}")]
    Refused(String),
    /// `END n` announced another number of sockets than were received.
    #[error("announced {announced} sockets, received {received}")]
    Count { announced: String, received: usize },
    /// A message that is not part of the protocol.
    #[error("unexpected message {0:?}")]
    Unexpected(String),
    /// A `SOCKETS` message with more or fewer lines than descriptors.
    #[error("{described} sockets described, {received} received")]
    Described { described: usize, received: usize },
    /// A descriptor that is not a listening socket.
    #[error("{0:?} is not a listening socket")]
    NotAListener(String),
    /// A socket line that is neither `rule NAME ADDR` nor `admin - ADDR`.
    #[error("cannot read {0:?}")]
    BadLine(String),
}

/// One conversation; `Ok(true)` when the sockets were handed over and the new process is
/// serving (this process is now draining).
fn handle(conn: &Socket, events: &mpsc::Sender<Event>) -> io::Result<bool> {
    conn.set_read_timeout(Some(STEP_WAIT))?;
    conn.set_write_timeout(Some(STEP_WAIT))?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    // Descriptors a peer may have attached are dropped (closed) with the message.
    let (hello, _) = recv_text(conn, &mut buf)?;
    if hello.trim_end() != HELLO {
        return Err(io::Error::other(format!(
            "expected {HELLO:?}, got {:?}",
            hello.chars().take(64).collect::<String>()
        )));
    }
    let (tx, rx) = mpsc::channel();
    let _ = events.send(Event::Handoff(tx));
    let Ok(Some(handoff)) = rx.recv_timeout(STEP_WAIT) else {
        return Err(io::Error::other(
            "not serving (stopping or already handed over)",
        ));
    };
    let mut entries: Vec<(String, &TcpListener)> = Vec::new();
    for (name, l) in &handoff.rules {
        let addr = l.local_addr()?;
        // Names cannot hold a newline or a space here: both would break the line format.
        let name: String = name
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect();
        entries.push((format!("rule {name} {addr}"), l));
    }
    if let Some(a) = &handoff.admin {
        entries.push((format!("admin - {}", a.local_addr()?), a));
    }
    for chunk in entries.chunks(FDS_PER_MESSAGE) {
        let mut text = String::from("SOCKETS\n");
        for (line, _) in chunk {
            text.push_str(line);
            text.push('\n');
        }
        let raw: Vec<_> = chunk.iter().map(|(_, l)| l.as_raw_fd()).collect();
        fds::send_with_fds(conn, text.as_bytes(), &raw).map_err(io::Error::from)?;
    }
    send_text(conn, &format!("END {}", entries.len()))?;
    let sent = entries.len();
    drop(entries);
    drop(handoff);
    tracing::info!(
        sockets = sent,
        "control socket: listening sockets sent to a new process; serving on until it is ready"
    );
    conn.set_read_timeout(Some(SETUP_WAIT))?;
    let (ready, _) = recv_text(conn, &mut buf)?;
    if ready.trim_end() != "READY" {
        return Err(io::Error::other(format!(
            "expected READY, got {:?}",
            ready.chars().take(64).collect::<String>()
        )));
    }
    // READY is the hand-over: from here this process drains whatever happens to the answer
    // (a new process that stops listening for it serves the sockets all the same).
    let _ = events.send(Event::TakenOver);
    tracing::info!("control socket: the new process serves the sockets; draining and exiting");
    if let Err(e) = send_text(conn, &format!("DRAINING {}", std::process::id())) {
        tracing::debug!(error = %e, "control socket: the new process did not read the answer");
    }
    Ok(true)
}

/// What `run --takeover PATH` received.
pub struct Received {
    /// `(rule name in the old process, socket)`.
    pub rules: Vec<(String, TcpListener)>,
    pub admin: Option<TcpListener>,
    conn: Socket,
    path: PathBuf,
}

/// Asks the process listening on `path` for its listening sockets. That process must run
/// as root or as `access`'s user (checked with `SO_PEERCRED`), as this one would.
///
/// # Errors
/// No process answers there, it is not trusted, or it sent something other than the
/// protocol.
pub fn receive(path: &Path, access: Access) -> Result<Received, TakeoverError> {
    let fail = |why: TakeoverFailure| TakeoverError {
        path: path.to_path_buf(),
        why,
    };
    let why = |e: io::Error| fail(TakeoverFailure::Io(e));
    let conn = seqpacket().map_err(why)?;
    let addr = SockAddr::unix(path).map_err(why)?;
    loop {
        match conn.connect(&addr) {
            Ok(()) => break,
            // Interrupted while waiting for room in the listener's backlog: not connected.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(why(e)),
        }
    }
    check_peer(&conn, access).map_err(|e| fail(TakeoverFailure::Untrusted(e)))?;
    conn.set_read_timeout(Some(STEP_WAIT)).map_err(why)?;
    conn.set_write_timeout(Some(STEP_WAIT)).map_err(why)?;
    send_text(&conn, HELLO).map_err(why)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut out = Received {
        rules: Vec::new(),
        admin: None,
        conn,
        path: path.to_path_buf(),
    };
    loop {
        let (text, fds) = recv_text(&out.conn, &mut buf).map_err(why)?;
        if let Some(err) = text.strip_prefix("ERR ") {
            return Err(fail(TakeoverFailure::Refused(err.to_string())));
        }
        if let Some(n) = text.strip_prefix("END ") {
            let got = out.rules.len() + usize::from(out.admin.is_some());
            if n.trim().parse::<usize>().ok() != Some(got) {
                return Err(fail(TakeoverFailure::Count {
                    announced: n.trim().to_string(),
                    received: got,
                }));
            }
            return Ok(out);
        }
        let Some(lines) = text.strip_prefix("SOCKETS\n") else {
            return Err(fail(TakeoverFailure::Unexpected(
                text.chars().take(64).collect(),
            )));
        };
        let lines: Vec<&str> = lines.lines().collect();
        if lines.len() != fds.len() {
            return Err(fail(TakeoverFailure::Described {
                described: lines.len(),
                received: fds.len(),
            }));
        }
        for (line, fd) in lines.into_iter().zip(fds) {
            let sock = SockRef::from(&fd);
            if !sock.is_listener().unwrap_or(false) {
                return Err(fail(TakeoverFailure::NotAListener(line.to_string())));
            }
            let mut parts = line.splitn(3, ' ');
            let (kind, name) = (parts.next(), parts.next());
            let l = TcpListener::from(fd);
            match (kind, name) {
                (Some("rule"), Some(name)) => out.rules.push((name.to_string(), l)),
                (Some("admin"), _) => out.admin = Some(l),
                _ => {
                    return Err(fail(TakeoverFailure::BadLine(line.to_string())));
                }
            }
        }
    }
}

impl Received {
    /// The addresses received, for the log.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.rules
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// Tells the old process this one serves; it then stops accepting, drains and exits.
    ///
    /// # Errors
    /// The old process did not confirm (it may have exited already: this one serves anyway).
    pub fn ready(self) -> Result<String, TakeoverError> {
        let why = |e: io::Error| TakeoverError {
            path: self.path.clone(),
            why: TakeoverFailure::Io(e),
        };
        send_text(&self.conn, "READY").map_err(why)?;
        let mut buf = vec![0u8; 256];
        let (text, _) = recv_text(&self.conn, &mut buf).map_err(why)?;
        Ok(text)
    }

    /// Splits off the sockets (keeping the conversation for [`Received::ready`]).
    pub fn take(&mut self) -> (Vec<(String, TcpListener)>, Option<TcpListener>) {
        (std::mem::take(&mut self.rules), self.admin.take())
    }
}

#[cfg(test)]
mod takeover_error_tests {
    use super::*;

    /// A fake old process at `path` that answers the hello with `answer` (and any
    /// descriptors), for `receive` to read.
    fn answering(path: &Path, answer: &'static str) -> std::thread::JoinHandle<()> {
        let listener = seqpacket().unwrap();
        listener.bind(&SockAddr::unix(path).unwrap()).unwrap();
        listener.listen(1).unwrap();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; MAX_MESSAGE];
            let (hello, _) = recv_text(&conn, &mut buf).unwrap();
            assert_eq!(hello, HELLO);
            send_text(&conn, answer).unwrap();
            let _ = recv_text(&conn, &mut buf);
        })
    }

    /// Each way a takeover conversation fails is its own variant, and the line printed
    /// still starts with the flag and the path.
    #[test]
    fn takeover_failures_are_named_by_cause() {
        let dir = std::env::temp_dir().join(format!("ringfwd-tko-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let access = Access::new(None);

        let e = receive(&dir.join("nobody-here.sock"), access)
            .err()
            .unwrap();
        assert!(
            matches!(&e.why, TakeoverFailure::Io(io) if io.kind() == io::ErrorKind::NotFound),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("--takeover {}/nobody-here.sock: ", dir.display())),
            "{e}"
        );

        let path = dir.join("refuses.sock");
        let old = answering(&path, "ERR busy");
        let e = receive(&path, access).err().unwrap();
        assert!(
            matches!(&e.why, TakeoverFailure::Refused(m) if m == "busy"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "--takeover {}: the running process refused: busy",
                path.display()
            )
        );
        old.join().unwrap();

        let path = dir.join("lies.sock");
        let old = answering(&path, "SOCKETS\nrule web 127.0.0.1:1\n");
        let e = receive(&path, access).err().unwrap();
        assert!(
            matches!(
                e.why,
                TakeoverFailure::Described {
                    described: 1,
                    received: 0
                }
            ),
            "{e:?}"
        );
        old.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
