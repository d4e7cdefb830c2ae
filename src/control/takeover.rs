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

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
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

/// Listens on `path` (replacing whatever file is there: a stale socket, or the one of the
/// process this one took over from) and serves takeover requests on a thread of its own.
///
/// # Errors
/// The socket cannot be created or bound.
pub fn serve(path: &Path, events: mpsc::Sender<Event>) -> io::Result<()> {
    let listener = seqpacket()?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    listener.bind(&SockAddr::unix(path)?)?;
    listener.listen(4)?;
    let path = path.to_path_buf();
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
                match handle(&conn, &events) {
                    Ok(true) => {
                        // Handed over: the new process owns the path now (it binds it once
                        // serving); this one no longer answers on it.
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

/// Asks the process listening on `path` for its listening sockets.
///
/// # Errors
/// No process answers there, or it sent something other than the protocol.
pub fn receive(path: &Path) -> Result<Received, String> {
    let why = |e: io::Error| format!("--takeover {}: {e}", path.display());
    let conn = seqpacket().map_err(why)?;
    conn.connect(&SockAddr::unix(path).map_err(why)?)
        .map_err(why)?;
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
            return Err(format!(
                "--takeover {}: the running process refused: {err}",
                path.display()
            ));
        }
        if let Some(n) = text.strip_prefix("END ") {
            let got = out.rules.len() + usize::from(out.admin.is_some());
            if n.trim().parse::<usize>().ok() != Some(got) {
                return Err(format!(
                    "--takeover {}: announced {} sockets, received {got}",
                    path.display(),
                    n.trim()
                ));
            }
            return Ok(out);
        }
        let Some(lines) = text.strip_prefix("SOCKETS\n") else {
            return Err(format!(
                "--takeover {}: unexpected message {:?}",
                path.display(),
                text.chars().take(64).collect::<String>()
            ));
        };
        let lines: Vec<&str> = lines.lines().collect();
        if lines.len() != fds.len() {
            return Err(format!(
                "--takeover {}: {} sockets described, {} received",
                path.display(),
                lines.len(),
                fds.len()
            ));
        }
        for (line, fd) in lines.into_iter().zip(fds) {
            let sock = SockRef::from(&fd);
            if !sock.is_listener().unwrap_or(false) {
                return Err(format!(
                    "--takeover {}: {line:?} is not a listening socket",
                    path.display()
                ));
            }
            let mut parts = line.splitn(3, ' ');
            let (kind, name) = (parts.next(), parts.next());
            let l = TcpListener::from(fd);
            match (kind, name) {
                (Some("rule"), Some(name)) => out.rules.push((name.to_string(), l)),
                (Some("admin"), _) => out.admin = Some(l),
                _ => {
                    return Err(format!(
                        "--takeover {}: cannot read {line:?}",
                        path.display()
                    ));
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
    pub fn ready(self) -> Result<String, String> {
        let why = |e: io::Error| format!("--takeover {}: {e}", self.path.display());
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
