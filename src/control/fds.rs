//! Taking ownership of descriptors this process did not open: listening sockets passed by
//! systemd (`LISTEN_FDS`, socket activation) or received from an older ringfwd over the
//! control socket (`SCM_RIGHTS`). The one module of `control` that may use `unsafe`: turning
//! a raw descriptor number into an `OwnedFd` is an ownership claim the compiler cannot check.
#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use socket2::{SockRef, Type};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// Most descriptors one control message carries (the kernel's `SCM_MAX_FD` is 253).
pub const FDS_PER_MESSAGE: usize = 200;

static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// What `LISTEN_FDS` / `LISTEN_PID` passed: listening TCP sockets, each with the name
/// `LISTEN_FDNAMES` gave it (a `.socket` unit's `FileDescriptorName=`, the unit's own name
/// by default), and one line per thing that was wrong with them (for the log; nothing here
/// stops a run).
#[derive(Default)]
pub struct Activation {
    pub listeners: Vec<(Option<String>, TcpListener)>,
    pub warnings: Vec<String>,
}

/// The name of passed descriptor `index` in `LISTEN_FDNAMES` (colon-separated, one per
/// descriptor, in order); `None` when the variable or that entry is missing or empty.
pub fn fd_name(names: Option<&str>, index: usize) -> Option<String> {
    names?
        .split(':')
        .nth(index)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// Takes the sockets systemd passed (`LISTEN_PID` = this process, `LISTEN_FDS` = how many,
/// from fd 3 on, `LISTEN_FDNAMES` = their names). Only listening TCP sockets are taken;
/// anything else (a wrong `LISTEN_PID`, a closed descriptor, a UDP or unix socket) is left
/// alone with a warning, and the rules are then bound as usual. Runs once per process;
/// later calls return nothing.
pub fn from_systemd(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
) -> Activation {
    let mut out = Activation::default();
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        if listen_fds.is_some() {
            out.warnings
                .push("LISTEN_FDS is set without LISTEN_PID: ignored; binding every rule".into());
        }
        return out;
    };
    if LISTEN_FDS_TAKEN.swap(true, Ordering::AcqRel) {
        return out;
    }
    let me = std::process::id();
    match pid.trim().parse::<u32>() {
        Ok(p) if p == me => {}
        _ => {
            out.warnings.push(format!(
                "LISTEN_PID={pid:?} is not this process ({me}): the passed sockets are not for it; binding every rule"
            ));
            return out;
        }
    }
    let count = match fds.trim().parse::<RawFd>() {
        Ok(n) if (0..=4096).contains(&n) => n,
        _ => {
            out.warnings.push(format!(
                "LISTEN_FDS={fds:?} is not a count of descriptors; binding every rule"
            ));
            return out;
        }
    };
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        // Looked at through a borrow first: only a listening TCP socket is claimed.
        if nix::fcntl::fcntl(
            // SAFETY: `fd` is only borrowed for this call, which fails with EBADF if it is
            // not open; nothing is closed or kept.
            unsafe { BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .is_err()
        {
            out.warnings
                .push(format!("LISTEN_FDS: descriptor {fd} is not open; skipped"));
            continue;
        }
        // SAFETY: as above: an open descriptor, borrowed for the duration of the checks.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = SockRef::from(&borrowed);
        let tcp_listener = sock.r#type().is_ok_and(|t| t == Type::STREAM)
            && sock.is_listener().unwrap_or(false)
            && sock.local_addr().ok().and_then(|a| a.as_socket()).is_some();
        if !tcp_listener {
            out.warnings.push(format!(
                "LISTEN_FDS: descriptor {fd} is not a listening TCP socket; left alone"
            ));
            continue;
        }
        // SAFETY: systemd passed this descriptor to this very process (LISTEN_PID matched)
        // for it to own; the swap above makes this the only place that claims it, once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let index = usize::try_from(fd - LISTEN_FDS_START).unwrap_or(usize::MAX);
        out.listeners
            .push((fd_name(listen_fdnames, index), TcpListener::from(owned)));
    }
    out
}

/// Sends `data` with `fds` attached (one `SCM_RIGHTS` message; at most [`FDS_PER_MESSAGE`]).
///
/// An interrupted call (`EINTR`) is retried: a `SOCK_SEQPACKET` message is sent whole or not
/// at all, so nothing was sent yet.
///
/// # Errors
/// `sendmsg` failed.
pub fn send_with_fds(sock: &impl AsRawFd, data: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(data)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(fds)]
    };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receives one message into `buf`, with the descriptors attached to it (close-on-exec).
/// Returns the length read (0: the peer closed).
///
/// An interrupted call (`EINTR`) is retried: nothing was received. A blocking socket call with
/// a timeout (`SO_RCVTIMEO`, which the control conversation sets) is never restarted by the
/// kernel, whatever `SA_RESTART` says — and not only signals interrupt it: io_uring task work
/// queued on the thread (a ring being torn down, such as the engine's start-up probe) does
/// too. Taking that for a failure made `run --takeover` fail at random.
///
/// # Errors
/// `recvmsg` failed or timed out; a message whose descriptors were cut short (`MSG_CTRUNC`)
/// is an error (the descriptors that did arrive are closed).
pub fn recv_with_fds(
    sock: &impl AsRawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    loop {
        match recv_once(sock, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// One `recvmsg`: see [`recv_with_fds`].
fn recv_once(sock: &impl AsRawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed these descriptors in this process for this
                // message; nothing else knows their numbers, so each is owned exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::other(
            "control message truncated: descriptors were lost",
        ));
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::time::Duration;

    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    use socket2::{Domain, Socket};

    extern "C" fn ignore(_: libc::c_int) {}

    /// A signal that lands while a control socket with a read timeout waits for a message
    /// (`recvmsg` then fails with `EINTR`, even with `SA_RESTART`) is not an error: the
    /// message sent after it is received.
    #[test]
    fn an_interrupted_receive_is_retried() {
        // SAFETY: installs a handler that does nothing, for a signal nothing else here uses.
        unsafe {
            sigaction(
                Signal::SIGUSR2,
                &SigAction::new(
                    SigHandler::Handler(ignore),
                    SaFlags::SA_RESTART,
                    SigSet::empty(),
                ),
            )
        }
        .expect("sigaction");
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).expect("socketpair");
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            recv_with_fds(&b, &mut buf).map(|(n, _)| buf[..n].to_vec())
        });
        let thread = receiver.as_pthread_t();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: the thread is alive until it has received the message sent below.
            unsafe { libc::pthread_kill(thread, libc::SIGUSR2) };
        }
        send_with_fds(&a, b"after the signals", &[]).expect("send");
        let got = receiver.join().expect("receiver thread");
        assert_eq!(
            got.expect("the receive survives the signals"),
            b"after the signals"
        );
    }
}
