//! Whether io_uring can run here, and if not, why: the probe of the kernel's ring and
//! opcodes, the host evidence (sysctl, kallsyms, seccomp) behind a refusal, and
//! [`Unavailable`], the fallback reason by cause, whose `Display` says what to do about it.

use std::fmt;

use io_uring::opcode;
use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};

/// Why io_uring cannot be used here, by cause; `Display` says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// A seccomp filter answers for the io_uring calls (`ENOSYS` on a kernel that has
    /// io_uring, or `EPERM` while the sysctl allows it); `why` names the evidence and the fix.
    Seccomp { errno: i32, why: String },
    /// `kernel.io_uring_disabled` is 1 (restricted to a group) or 2 (off).
    Disabled { sysctl: u8 },
    /// The kernel has no io_uring (`ENOSYS`, and nothing says it was built with it).
    NotInKernel,
    /// The rings do not fit under `RLIMIT_MEMLOCK` (`ENOMEM`); `limit` as the message shows it.
    Memlock { limit: String },
    /// No file descriptor left for a ring (`EMFILE`/`ENFILE`).
    Descriptors { limit: String },
    /// `io_uring_setup` refused the ring for another reason.
    SetupRefused { errno: Option<i32>, text: String },
    /// The kernel cannot say which opcodes it has (older than 5.6).
    NoProbe { text: String },
    /// Opcodes, or a ring feature such as `EXT_ARG` waits, the engine needs and this kernel
    /// lacks.
    OpcodeMissing { missing: Vec<&'static str> },
    /// Some workers could not set up their ring: how many, the first of them, and its cause.
    Workers {
        failed: usize,
        of: usize,
        first: usize,
        cause: Box<Unavailable>,
    },
    /// A failure reported as text (a worker thread that could not start, a worker's error
    /// without an errno).
    Other(String),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Seccomp { why, .. } => f.write_str(why),
            Self::Disabled { sysctl: 2 } => f.write_str(
                "io_uring is disabled by sysctl kernel.io_uring_disabled=2; enable it with `sysctl kernel.io_uring_disabled=0`",
            ),
            Self::Disabled { sysctl } => write!(
                f,
                "io_uring is restricted by sysctl kernel.io_uring_disabled={sysctl} to the group in kernel.io_uring_group; run ringfwd in that group or set `sysctl kernel.io_uring_disabled=0`"
            ),
            Self::NotInKernel => f.write_str(
                "io_uring_setup is not implemented by this kernel (built without CONFIG_IO_URING, or older than 5.1); use a kernel with io_uring",
            ),
            Self::Memlock { limit } => write!(
                f,
                "io_uring_setup failed with ENOMEM: the locked-memory limit (RLIMIT_MEMLOCK, {limit}) is too low for the rings; raise it (ulimit -l, LimitMEMLOCK= in a systemd unit, or CAP_IPC_LOCK), or lower workers / [uring] ring_entries"
            ),
            Self::Descriptors { limit } => write!(
                f,
                "io_uring_setup failed: out of file descriptors (RLIMIT_NOFILE {limit}); raise it (ulimit -n, LimitNOFILE= in a systemd unit) or lower workers"
            ),
            Self::SetupRefused { text, .. } => write!(f, "io_uring_setup failed: {text}"),
            Self::NoProbe { text } => write!(
                f,
                "cannot probe io_uring opcodes (kernel older than 5.6?): {text}"
            ),
            Self::OpcodeMissing { missing } => write!(
                f,
                "this kernel's io_uring lacks {}; ringfwd needs Linux 6.0 or newer",
                missing.join(", ")
            ),
            Self::Workers {
                failed: 1,
                of,
                first,
                cause,
            } => write!(f, "worker {first} of {of} could not set up: {cause}"),
            Self::Workers {
                failed, of, cause, ..
            } => write!(f, "{failed} of {of} workers could not set up: {cause}"),
            Self::Other(text) => f.write_str(text),
        }
    }
}

/// What the host says about io_uring besides the failed call, for naming the right cause.
///
/// `ENOSYS` from `io_uring_setup` means either a kernel built without io_uring or a seccomp
/// filter answering for it (podman's default profile does exactly that); the two need
/// opposite fixes, so the kernel's own evidence decides which one the message names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostEvidence {
    /// `kernel.io_uring_disabled`: `None` when the sysctl does not exist (before 6.6, or no
    /// io_uring at all).
    pub sysctl: Option<u8>,
    /// `/proc/kallsyms` lists the `io_uring_setup` system call.
    pub kallsyms: bool,
    /// The kernel release (`uname -r`), e.g. `6.8.0-45-generic`.
    pub release: Option<String>,
    /// `Seccomp:` of `/proc/self/status`: 0 none, 1 strict, 2 filter.
    pub seccomp_mode: Option<u8>,
}

impl HostEvidence {
    /// This host and process, read from `/proc` (cheap; only called after a failure or for
    /// `--version`).
    pub fn current() -> Self {
        Self {
            sysctl: io_uring_disabled_sysctl(),
            kallsyms: kallsyms_has_io_uring(),
            release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|r| r.trim().to_string()),
            seccomp_mode: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Seccomp:"))
                        .and_then(|v| v.trim().parse().ok())
                }),
        }
    }

    /// Why this kernel is known to have io_uring, if it is: the sysctl exists only where
    /// io_uring is built in, and kallsyms names its system call.
    fn kernel_has_io_uring(&self) -> Option<String> {
        if let Some(v) = self.sysctl {
            return Some(format!("the sysctl kernel.io_uring_disabled exists, = {v}"));
        }
        if self.kallsyms {
            return Some("/proc/kallsyms lists io_uring_setup".into());
        }
        None
    }

    /// Linux 5.1 or newer: io_uring is in the kernel unless it was configured out (rare:
    /// `CONFIG_IO_URING` is on by default), so a filter is the likely cause.
    fn release_has_io_uring(&self) -> bool {
        let Some(r) = &self.release else { return false };
        let mut nums = r
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
        (major, minor) >= (5, 1)
    }

    fn seccomp_note(&self) -> &'static str {
        if self.seccomp_mode == Some(2) {
            " (this process runs under a seccomp filter: Seccomp 2 in /proc/self/status)"
        } else {
            ""
        }
    }
}

fn io_uring_disabled_sysctl() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `/proc/kallsyms` names the io_uring_setup system call (any architecture's
/// wrapper: `__x64_sys_io_uring_setup`, `__arm64_sys_io_uring_setup`, `sys_io_uring_setup`).
/// Names are listed even where addresses are hidden (`kptr_restrict`).
fn kallsyms_has_io_uring() -> bool {
    use std::io::BufRead;
    let Ok(f) = std::fs::File::open("/proc/kallsyms") else {
        return false;
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.ends_with("sys_io_uring_setup"))
}

/// How to let io_uring through a container runtime's seccomp profile, for each runtime.
pub const SECCOMP_FIX: &str = "allow io_uring_setup, io_uring_enter and io_uring_register in the seccomp profile: \
Docker: docker run --security-opt seccomp=/usr/share/ringfwd/seccomp/seccomp-io_uring.json (deploy/docker/seccomp-io_uring.json in the source); \
podman: podman run --security-opt seccomp=<that file>; \
containerd/Kubernetes: securityContext.seccompProfile {type: Localhost, localhostProfile: ringfwd/seccomp-io_uring.json} with the file in the kubelet's seccomp directory (nerdctl: --security-opt seccomp=<that file>)";

fn explain_setup_error(e: &std::io::Error) -> Unavailable {
    explain_with(e.raw_os_error(), &e.to_string(), &HostEvidence::current())
}

/// [`explain_setup_error`] for an errno and the host's evidence (separate so tests can give
/// any host).
fn explain_with(errno: Option<i32>, text: &str, host: &HostEvidence) -> Unavailable {
    let seccomp = host.seccomp_note();
    let blocked = |errno: i32, why: String| Unavailable::Seccomp { errno, why };
    match errno {
        Some(libc::ENOSYS) => match host.kernel_has_io_uring() {
            Some(evidence) => blocked(
                libc::ENOSYS,
                format!(
                    "io_uring_setup answered ENOSYS although this kernel has io_uring ({evidence}): a seccomp filter is blocking the io_uring calls{seccomp}, as podman's default profile and Docker's (25+) do; {SECCOMP_FIX}"
                ),
            ),
            None if host.release_has_io_uring() => blocked(
                libc::ENOSYS,
                format!(
                    "io_uring_setup answered ENOSYS on Linux {}, which has io_uring unless built without CONFIG_IO_URING: most likely a seccomp filter is blocking the io_uring calls{seccomp}, as podman's default profile and Docker's (25+) do; {SECCOMP_FIX}",
                    host.release.as_deref().unwrap_or("?")
                ),
            ),
            None => Unavailable::NotInKernel,
        },
        Some(libc::EPERM) if matches!(host.sysctl, Some(1 | 2)) => Unavailable::Disabled {
            sysctl: host.sysctl.unwrap_or(2),
        },
        Some(libc::EPERM) => blocked(
            libc::EPERM,
            format!(
                "io_uring_setup was denied (EPERM) with kernel.io_uring_disabled {}: a seccomp filter is blocking the io_uring calls{seccomp}, as Docker's (25+), containerd's and podman's default profiles do; {SECCOMP_FIX}",
                host.sysctl.map_or("unset".into(), |v| format!("= {v}"))
            ),
        ),
        Some(libc::ENOMEM) => Unavailable::Memlock {
            limit: limit_text(Resource::RLIMIT_MEMLOCK, "KiB", 10),
        },
        Some(libc::EMFILE | libc::ENFILE) => Unavailable::Descriptors {
            limit: limit_text(Resource::RLIMIT_NOFILE, "", 0),
        },
        _ => Unavailable::SetupRefused {
            errno,
            text: text.to_string(),
        },
    }
}

/// Opcodes the copy path cannot do without.
const REQUIRED: [(u8, &str); 8] = [
    (opcode::AcceptMulti::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
];

/// Checks that a ring with every opcode the engine needs can be set up on this host.
///
/// # Errors
/// [`Unavailable`] saying why and how to enable io_uring.
pub fn probe() -> Result<(), Unavailable> {
    features().map(drop)
}

/// What [`probe`] found where io_uring works: for `ringfwd --version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// The task-running mode a worker's ring gets ([`ring::build`]).
    pub taskrun: &'static str,
    /// The kernel has `IORING_OP_SPLICE` (the splice data path).
    pub splice: bool,
}

/// Sets up a small ring and checks every opcode and feature the engine needs.
///
/// # Errors
/// [`Unavailable`] saying why and how to enable io_uring.
pub fn features() -> Result<Features, Unavailable> {
    let (ring, taskrun) = super::ring::build(8).map_err(|e| explain_setup_error(&e))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| Unavailable::NoProbe {
            text: e.to_string(),
        })?;
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(Unavailable::OpcodeMissing { missing });
    }
    if !ring.params().is_feature_ext_arg() {
        return Err(Unavailable::OpcodeMissing {
            missing: vec!["EXT_ARG waits"],
        });
    }
    Ok(Features {
        taskrun,
        splice: probe.is_supported(opcode::Splice::CODE),
    })
}

/// A resource limit's soft value for a message, `unlimited` or in `unit` (`value >> shift`).
fn limit_text(resource: Resource, unit: &str, shift: u32) -> String {
    match getrlimit(resource) {
        Ok((soft, _)) if soft == RLIM_INFINITY => "unlimited".into(),
        Ok((soft, _)) if unit.is_empty() => soft.to_string(),
        Ok((soft, _)) => format!("{} {unit}", soft >> shift),
        Err(_) => "unknown".into(),
    }
}

/// One explanation for every worker that failed: the first failure, explained (what to
/// raise), and how many workers failed.
pub(super) fn explain_failures(n: usize, failures: &[(usize, String, Option<i32>)]) -> Unavailable {
    let (id, text, errno) = failures
        .iter()
        .min_by_key(|(id, ..)| *id)
        .expect("at least one failure");
    let cause = match errno {
        Some(e) => explain_setup_error(&std::io::Error::from_raw_os_error(*e)),
        None => Unavailable::Other(text.clone()),
    };
    Unavailable::Workers {
        failed: failures.len(),
        of: n,
        first: *id,
        cause: Box::new(cause),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(sysctl: Option<u8>, kallsyms: bool, release: &str) -> HostEvidence {
        HostEvidence {
            sysctl,
            kallsyms,
            release: Some(release.into()),
            seccomp_mode: Some(2),
        }
    }

    fn why(errno: i32, host: &HostEvidence) -> String {
        explain_with(Some(errno), "os error", host).to_string()
    }

    /// The fallback reason is a cause the caller can match, not only a sentence: seccomp,
    /// the sysctl, memlock, a refused set-up, a missing opcode, and which workers failed.
    #[test]
    fn unavailable_names_its_cause() {
        let e = |errno, h: &HostEvidence| explain_with(Some(errno), "os error", h);
        assert!(matches!(
            e(libc::ENOSYS, &host(Some(0), false, "6.8.0")),
            Unavailable::Seccomp {
                errno: libc::ENOSYS,
                ..
            }
        ));
        assert!(matches!(
            e(libc::EPERM, &host(None, false, "6.1.0")),
            Unavailable::Seccomp {
                errno: libc::EPERM,
                ..
            }
        ));
        assert!(matches!(
            e(libc::EPERM, &host(Some(2), false, "6.8.0")),
            Unavailable::Disabled { sysctl: 2 }
        ));
        assert!(matches!(
            e(libc::ENOSYS, &host(None, false, "4.19.0")),
            Unavailable::NotInKernel
        ));
        assert!(matches!(
            e(libc::ENOMEM, &host(Some(0), false, "6.8.0")),
            Unavailable::Memlock { .. }
        ));
        let refused = e(libc::EINVAL, &host(Some(0), false, "6.8.0"));
        assert!(
            matches!(
                refused,
                Unavailable::SetupRefused {
                    errno: Some(libc::EINVAL),
                    ..
                }
            ),
            "{refused:?}"
        );
        assert_eq!(refused.to_string(), "io_uring_setup failed: os error");
        let missing = Unavailable::OpcodeMissing {
            missing: vec!["SEND", "RECV"],
        };
        assert_eq!(
            missing.to_string(),
            "this kernel's io_uring lacks SEND, RECV; ringfwd needs Linux 6.0 or newer"
        );
        let w = explain_failures(
            4,
            &[(2, "x".into(), Some(libc::ENOMEM)), (1, "y".into(), None)],
        );
        assert!(
            matches!(&w, Unavailable::Workers { failed: 2, of: 4, first: 1, cause }
                if matches!(**cause, Unavailable::Other(ref t) if t == "y")),
            "{w:?}"
        );
        assert_eq!(w.to_string(), "2 of 4 workers could not set up: y");
        let one = explain_failures(4, &[(3, "x".into(), Some(libc::ENOMEM))]);
        assert!(
            one.to_string()
                .starts_with("worker 3 of 4 could not set up: io_uring_setup failed with ENOMEM"),
            "{one}"
        );
    }

    /// Every runtime's fix is named, with the shipped profile.
    fn assert_names_the_seccomp_fix(w: &str) {
        for needle in [
            "seccomp filter is blocking",
            "docker run --security-opt seccomp=/usr/share/ringfwd/seccomp/seccomp-io_uring.json",
            "podman run --security-opt seccomp=",
            "containerd/Kubernetes",
            "localhostProfile: ringfwd/seccomp-io_uring.json",
            "Seccomp 2",
        ] {
            assert!(w.contains(needle), "lacks {needle:?}: {w}");
        }
        assert!(!w.contains("CONFIG_IO_URING"), "blames the kernel: {w}");
    }

    #[test]
    fn enosys_on_a_kernel_with_io_uring_names_seccomp() {
        // podman's default profile: ENOSYS, on a kernel whose sysctl proves io_uring exists.
        let w = why(libc::ENOSYS, &host(Some(0), false, "6.8.0"));
        assert_names_the_seccomp_fix(&w);
        assert!(
            w.contains("(the sysctl kernel.io_uring_disabled exists, = 0)"),
            "{w}"
        );
        // Before 6.6 there is no sysctl: kallsyms is the evidence.
        let w = why(libc::ENOSYS, &host(None, true, "5.15.0"));
        assert_names_the_seccomp_fix(&w);
        assert!(w.contains("/proc/kallsyms lists io_uring_setup"), "{w}");
        // Only the version: seccomp is the likely cause, the kernel option the other one.
        let w = why(libc::ENOSYS, &host(None, false, "5.10.0-28-amd64"));
        assert!(w.contains("Linux 5.10.0-28-amd64") && w.contains("most likely a seccomp"));
        assert!(w.contains("podman run --security-opt seccomp="), "{w}");
        // A kernel too old for io_uring: the kernel is the cause.
        let w = why(libc::ENOSYS, &host(None, false, "4.19.0"));
        assert!(
            w.contains("CONFIG_IO_URING") && !w.contains("seccomp"),
            "{w}"
        );
    }

    #[test]
    fn eperm_without_the_sysctl_names_seccomp_and_each_runtimes_fix() {
        let w = why(libc::EPERM, &host(Some(0), true, "6.8.0"));
        assert_names_the_seccomp_fix(&w);
        assert!(
            w.contains("EPERM") && w.contains("kernel.io_uring_disabled = 0"),
            "{w}"
        );
        let w = why(libc::EPERM, &host(None, true, "5.15.0"));
        assert!(w.contains("kernel.io_uring_disabled unset"), "{w}");
        // The sysctl, when set, is the cause (EPERM cannot tell it from a filter).
        let w = why(libc::EPERM, &host(Some(2), true, "6.8.0"));
        assert!(
            w.contains("kernel.io_uring_disabled=2") && !w.contains("seccomp"),
            "{w}"
        );
    }

    #[test]
    fn this_hosts_evidence_is_read() {
        let h = HostEvidence::current();
        assert!(h.release.is_some());
        assert!(
            h.seccomp_mode.is_some(),
            "/proc/self/status has a Seccomp line"
        );
    }
}
