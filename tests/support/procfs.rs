//! What the kernel says about the forwarder process: its open file descriptors, its memory,
//! and the state of the TCP sockets it owns — the evidence for "no leak" and "memory stays
//! flat" that the forwarder's own metrics could not give honestly.

use std::collections::HashSet;

/// Number of open file descriptors of `pid` (entries of `/proc/PID/fd`).
///
/// # Panics
/// `/proc/PID/fd` cannot be read (the process is gone).
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

/// Inode numbers of the sockets `pid` holds (`socket:[INODE]` links in `/proc/PID/fd`).
pub fn socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        let target = std::fs::read_link(e.ok()?.path()).ok()?;
        let t = target.to_str()?;
        t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// One TCP socket as `/proc/net/tcp{,6}` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEntry {
    pub inode: u64,
    /// State name (`ESTABLISHED`, `CLOSE_WAIT`, …).
    pub state: &'static str,
    /// `local -> remote`, in the kernel's hex notation.
    pub endpoints: String,
}

/// Names of the kernel's TCP states, indexed by their code in `/proc/net/tcp`.
const TCP_STATES: [&str; 13] = [
    "?",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// The TCP sockets (IPv4 and IPv6) that `pid` holds open, read through `pid`'s own
/// `/proc/PID/net`, so that it also works for a process in another network namespace.
pub fn tcp_sockets(pid: i32) -> Vec<TcpEntry> {
    let owned = socket_inodes(pid);
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let (Some(local), Some(remote), Some(state), Some(inode)) =
                (cols.get(1), cols.get(2), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let Ok(inode) = inode.parse::<u64>() else {
                continue;
            };
            if owned.contains(&inode) {
                let code = usize::from_str_radix(state, 16).unwrap_or(0);
                out.push(TcpEntry {
                    inode,
                    state: TCP_STATES.get(code).copied().unwrap_or("?"),
                    endpoints: format!("{local} -> {remote}"),
                });
            }
        }
    }
    out
}

/// The TCP sockets of `pid` in CLOSE_WAIT: the peer closed, `pid` never did.
pub fn close_wait_sockets(pid: i32) -> Vec<TcpEntry> {
    tcp_sockets(pid)
        .into_iter()
        .filter(|e| e.state == "CLOSE_WAIT")
        .collect()
}

/// Every open fd of `pid` with what it points to, and the TCP state for sockets; for
/// failure messages.
pub fn describe_fds(pid: i32) -> Vec<String> {
    let tcp = tcp_sockets(pid);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            let tcp = tcp
                .iter()
                .find(|t| target == format!("socket:[{}]", t.inode))
                .map(|t| format!(" {} {}", t.state, t.endpoints))
                .unwrap_or_default();
            Some(format!(
                "{} -> {target}{tcp}",
                e.file_name().to_string_lossy()
            ))
        })
        .collect();
    out.sort();
    out
}

/// A `kB` field of `/proc/PID/status` (e.g. `VmRSS`, `VmHWM`), in bytes.
///
/// # Panics
/// The field is missing (the process is gone).
pub fn status_bytes(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident memory of `pid` now, in bytes.
pub fn rss(pid: i32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// Peak resident memory of `pid` over its life, in bytes.
pub fn peak_rss(pid: i32) -> u64 {
    status_bytes(pid, "VmHWM")
}

/// CPU time (user + system) `pid` has used so far, in clock ticks (`CLK_TCK`, 100 per second
/// on Linux).
///
/// # Panics
/// The process is gone.
pub fn cpu_ticks(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name's closing parenthesis: state is the 1st, utime the 12th.
    let rest = &text[text.rfind(')').expect("stat has a (comm)") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Sets the open-files limit (soft and hard) of another process with util-linux's `prlimit`.
///
/// # Panics
/// `prlimit` is missing or refuses: the caller's scenario cannot be run as written.
pub fn set_nofile_limit(pid: i32, limit: usize) {
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run prlimit (util-linux) to limit the relay's fds: {e}")
        });
    assert!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
