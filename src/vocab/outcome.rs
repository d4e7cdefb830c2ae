//! The vocabulary of a session's life shared by every engine and by the metrics: which way
//! bytes flow, how they moved, why a connection was turned away, why an upstream connect
//! failed and why a session ended — and the one place where an errno becomes one of those.
//!
//! Engines report raw results (`-errno` from a completion, an `io::Error` from a blocking or
//! async call); they never decide on their own whether an error is a reset, a timeout or a
//! refusal, so the three engines cannot drift apart again.

use std::io;

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    ClientToUpstream = 0,
    UpstreamToClient = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::ClientToUpstream, Direction::UpstreamToClient];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientToUpstream => "client_to_upstream",
            Self::UpstreamToClient => "upstream_to_client",
        }
    }

    pub fn reverse(self) -> Self {
        match self {
            Self::ClientToUpstream => Self::UpstreamToClient,
            Self::UpstreamToClient => Self::ClientToUpstream,
        }
    }
}

/// How bytes were moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    Copy = 0,
    Splice = 1,
}

impl PathKind {
    pub const ALL: [PathKind; 2] = [PathKind::Copy, PathKind::Splice];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Splice => "splice",
        }
    }
}

/// Why an accepted connection was turned away before any byte was relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The rule already holds its `max_connections` live connections.
    MaxConnections = 0,
    /// The forwarder is shutting down.
    Shutdown = 1,
    /// No file descriptor (or socket memory) for the upstream socket.
    FdExhausted = 2,
    /// The client's address is denied by the rule's `allow`/`deny`.
    Acl = 3,
    /// The client's address already holds `max_connections_per_ip` connections.
    PerIpLimit = 4,
    /// The client's address opens connections faster than `max_new_connections_per_ip`.
    RateLimit = 5,
    /// `accept_proxy`: the connection does not come from a `proxy_trusted` source.
    UntrustedProxy = 6,
    /// `accept_proxy`: the PROXY header is malformed or too long, or the client closed first.
    BadProxyHeader = 7,
    /// `accept_proxy`: the PROXY header did not arrive within `proxy_header_timeout`; on a
    /// rule with routes, nor did the ClientHello.
    ProxyHeaderTimeout = 8,
    /// A rule with routes and no upstream of its own: no route matched the ClientHello's
    /// server name (or it had none, or the bytes were not TLS).
    NoRoute = 9,
}

impl RejectReason {
    pub const COUNT: usize = 10;
    pub const ALL: [RejectReason; Self::COUNT] = [
        Self::MaxConnections,
        Self::Shutdown,
        Self::FdExhausted,
        Self::Acl,
        Self::PerIpLimit,
        Self::RateLimit,
        Self::UntrustedProxy,
        Self::BadProxyHeader,
        Self::ProxyHeaderTimeout,
        Self::NoRoute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::Shutdown => "shutdown",
            Self::FdExhausted => "fd_exhausted",
            Self::Acl => "acl",
            Self::PerIpLimit => "per_ip_limit",
            Self::RateLimit => "rate_limit",
            Self::UntrustedProxy => "untrusted_proxy",
            Self::BadProxyHeader => "bad_proxy_header",
            Self::ProxyHeaderTimeout => "proxy_header_timeout",
            Self::NoRoute => "no_route",
        }
    }
}

/// Why an upstream connect failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectError {
    Refused = 0,
    Timeout = 1,
    Unreachable = 2,
    Other = 3,
}

impl ConnectError {
    pub const ALL: [ConnectError; 4] =
        [Self::Refused, Self::Timeout, Self::Unreachable, Self::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Other => "other",
        }
    }

    /// Classifies a failed connect by its (positive) errno. `ECANCELED` is what io_uring
    /// gives a connect whose linked timeout fired.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ECONNREFUSED => Self::Refused,
            libc::ETIMEDOUT | libc::ECANCELED => Self::Timeout,
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EHOSTDOWN => {
                Self::Unreachable
            }
            _ => Self::Other,
        }
    }

    /// Classifies a failed connect reported as an `io::Error`.
    pub fn classify(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => Self::from_errno(errno),
            None if e.kind() == io::ErrorKind::TimedOut => Self::Timeout,
            None if e.kind() == io::ErrorKind::ConnectionRefused => Self::Refused,
            None => Self::Other,
        }
    }
}

/// How a session ended, for the access log and the close itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both directions reached end of stream.
    Eof,
    /// One side reset (or vanished); the other is reset too.
    Reset,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// The client sent bytes and the upstream answered none within `first_byte_timeout`
    /// (counted against the member as a passive failure).
    FirstByteTimeout,
    /// Every upstream connect attempt failed; the last one failed this way.
    Upstream(ConnectError),
    /// No file descriptor for the upstream socket.
    FdExhausted,
    /// Turned away after it was accepted (an ACL or limit on the address a PROXY header
    /// gave, a bad or late header).
    Rejected(RejectReason),
    /// The forwarder shut down (grace period over, or a second signal) before the session
    /// ended: the transfer was cut.
    Shutdown,
    /// Another I/O error.
    Error,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eof => "eof",
            Self::Reset => "reset",
            Self::IdleTimeout => "idle_timeout",
            Self::FirstByteTimeout => "first_byte_timeout",
            Self::Upstream(ConnectError::Refused) => "refused",
            Self::Upstream(ConnectError::Timeout) => "connect_timeout",
            Self::Upstream(ConnectError::Unreachable) => "unreachable",
            Self::Upstream(ConnectError::Other) => "connect_error",
            Self::FdExhausted => "fd_exhausted",
            Self::Rejected(why) => why.as_str(),
            Self::Shutdown => "shutdown",
            Self::Error => "error",
        }
    }

    /// Whether both sockets are closed with RST (`SO_LINGER` 0) rather than FIN: every end
    /// that is not a clean one, so that a cut transfer never reads as a complete one.
    pub fn resets(self) -> bool {
        match self {
            Self::Eof | Self::IdleTimeout => false,
            Self::Reset
            | Self::FirstByteTimeout
            | Self::Upstream(_)
            | Self::FdExhausted
            | Self::Rejected(_)
            | Self::Shutdown
            | Self::Error => true,
        }
    }

    /// How a relay ended after a read or write failed with this (positive) errno: the peer
    /// reset or vanished (its host unreachable, its retransmissions timed out) → `Reset`,
    /// anything else → `Error`.
    pub fn from_io_errno(errno: i32) -> Self {
        match errno {
            libc::ECONNRESET
            | libc::EPIPE
            | libc::ECONNABORTED
            | libc::ETIMEDOUT
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH => Self::Reset,
            _ => Self::Error,
        }
    }

    /// [`CloseReason::from_io_errno`] for an `io::Error` (a write of zero bytes means the peer
    /// is gone, as a reset does).
    pub fn from_io_error(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => Self::from_io_errno(errno),
            None => match e.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::WriteZero => Self::Reset,
                _ => Self::Error,
            },
        }
    }
}

/// Whether a relay must end as [`CloseReason::FirstByteTimeout`]: `first_byte_timeout` is
/// set, the upstream has sent nothing yet, and the client's first bytes reached it at least
/// that long ago (`since_first_sent`). The clock starts when the client speaks, not at the
/// connect: on a protocol where the client speaks first, a client that connects and stays
/// silent must not make a healthy member look dead (with `max_fails = 1` it would take it
/// out); a server-speaks-first member that never answers is what an active `expect` check
/// is for. Every engine asks this one function.
pub fn first_byte_overdue(
    timeout: Option<std::time::Duration>,
    since_first_sent: Option<std::time::Duration>,
    upstream_spoke: bool,
) -> bool {
    match (timeout, since_first_sent) {
        (Some(t), Some(since)) => !upstream_spoke && since >= t,
        _ => false,
    }
}

/// The errno behind an `io::Error`, for the classifications above (a timeout the runtime
/// measured itself is `ETIMEDOUT`; anything without an errno is `EIO`).
pub fn errno_of(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(errno) => errno,
        None => match e.kind() {
            io::ErrorKind::TimedOut => libc::ETIMEDOUT,
            io::ErrorKind::ConnectionRefused => libc::ECONNREFUSED,
            io::ErrorKind::ConnectionReset => libc::ECONNRESET,
            _ => libc::EIO,
        },
    }
}

/// True when creating a socket failed for lack of descriptors or socket memory: the connection
/// is turned away as `fd_exhausted`, not blamed on the upstream.
pub fn is_fd_exhaustion(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_classification_for_every_engine() {
        // A dead peer's host or retransmission timeout ends a relay as a reset...
        for errno in [
            libc::ECONNRESET,
            libc::EPIPE,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
        ] {
            assert_eq!(CloseReason::from_io_errno(errno), CloseReason::Reset);
            assert_eq!(
                CloseReason::from_io_error(&io::Error::from_raw_os_error(errno)),
                CloseReason::Reset
            );
        }
        assert_eq!(CloseReason::from_io_errno(libc::EINVAL), CloseReason::Error);
        assert_eq!(
            CloseReason::from_io_error(&io::ErrorKind::WriteZero.into()),
            CloseReason::Reset
        );
        // ...while the same errno on a connect is a connect timeout / unreachable member.
        assert_eq!(
            ConnectError::from_errno(libc::ETIMEDOUT),
            ConnectError::Timeout
        );
        assert_eq!(
            ConnectError::from_errno(libc::ECANCELED),
            ConnectError::Timeout
        );
        assert_eq!(
            ConnectError::from_errno(libc::EHOSTUNREACH),
            ConnectError::Unreachable
        );
        assert_eq!(
            ConnectError::classify(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            ConnectError::Refused
        );
        assert_eq!(
            ConnectError::classify(&io::ErrorKind::TimedOut.into()),
            ConnectError::Timeout
        );
    }

    #[test]
    fn a_connect_timeout_is_not_called_refused() {
        assert_eq!(
            CloseReason::Upstream(ConnectError::Timeout).as_str(),
            "connect_timeout"
        );
        assert_eq!(
            CloseReason::Upstream(ConnectError::Refused).as_str(),
            "refused"
        );
    }

    #[test]
    fn only_clean_ends_close_with_fin() {
        assert!(!CloseReason::Eof.resets());
        assert!(!CloseReason::IdleTimeout.resets());
        for r in [
            CloseReason::Reset,
            CloseReason::Shutdown,
            CloseReason::Error,
            CloseReason::FdExhausted,
            CloseReason::Upstream(ConnectError::Refused),
        ] {
            assert!(r.resets(), "{r:?}");
        }
    }

    #[test]
    fn fd_exhaustion_errnos() {
        assert!(is_fd_exhaustion(libc::EMFILE));
        assert!(is_fd_exhaustion(libc::ENFILE));
        assert!(!is_fd_exhaustion(libc::ECONNREFUSED));
    }

    #[test]
    fn the_first_byte_clock_starts_when_the_client_speaks() {
        use std::time::Duration;
        let t = Some(Duration::from_secs(2));
        let s = |ms| Some(Duration::from_millis(ms));
        assert!(
            !first_byte_overdue(t, None, false),
            "a silent client starts no clock"
        );
        assert!(!first_byte_overdue(t, s(1_999), false));
        assert!(first_byte_overdue(t, s(2_000), false));
        assert!(!first_byte_overdue(t, s(9_000), true), "the upstream spoke");
        assert!(!first_byte_overdue(None, s(9_000), false), "off");
        assert_eq!(CloseReason::FirstByteTimeout.as_str(), "first_byte_timeout");
        assert!(CloseReason::FirstByteTimeout.resets());
    }
}
