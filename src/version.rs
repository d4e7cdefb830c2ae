//! `ringfwd --version`: the build (version, commit, profile, target) and what this host's
//! kernel offers the engines, found now — the first thing to ask for in a bug report, like
//! `haproxy -vv`. `-V` stays one line.

use std::fmt::Write as _;

use crate::engine::uring::{self, HostEvidence};

/// The git commit the binary was built from, or `unknown` (see `build.rs`).
pub const COMMIT: &str = env!("RINGFWD_COMMIT");
/// Cargo's build profile: `debug` or `release`.
pub const PROFILE: &str = env!("RINGFWD_PROFILE");
/// The target triple.
pub const TARGET: &str = env!("RINGFWD_TARGET");

/// The long version text, without the leading `ringfwd ` clap adds. Probes io_uring (sets up
/// and closes one small ring).
pub fn long() -> String {
    render(&HostEvidence::current(), &uring::features())
}

/// [`long`] for a given host (tests give any).
pub fn render(host: &HostEvidence, uring: &Result<uring::Features, uring::Unavailable>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(s, "commit:   {COMMIT}");
    let _ = writeln!(s, "profile:  {PROFILE}");
    let _ = writeln!(s, "target:   {TARGET}");
    let _ = writeln!(
        s,
        "kernel:   Linux {}",
        host.release.as_deref().unwrap_or("unknown")
    );
    let sysctl = host
        .sysctl
        .map_or_else(|| "absent".to_string(), |v| v.to_string());
    let _ = writeln!(s, "kernel.io_uring_disabled: {sysctl}");
    let seccomp = match host.seccomp_mode {
        Some(0) => "none",
        Some(1) => "strict",
        Some(2) => "filter",
        _ => "unknown",
    };
    let _ = writeln!(s, "seccomp:  {seccomp}");
    match uring {
        Ok(f) => {
            let _ = writeln!(
                s,
                "io_uring: available (task running: {}; splice: {})",
                f.taskrun,
                if f.splice { "yes" } else { "no" }
            );
            let paths = if f.splice {
                "data paths copy, splice, auto"
            } else {
                "data path copy: no splice op"
            };
            let _ = write!(
                s,
                "engines:  uring ({paths}), tokio, std; engine = \"auto\" runs uring"
            );
        }
        Err(why) => {
            let _ = writeln!(s, "io_uring: unavailable: {why}");
            let _ = write!(
                s,
                "engines:  tokio, std; engine = \"auto\" runs tokio (uring cannot start here)"
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_version_names_build_kernel_and_io_uring() {
        let host = HostEvidence {
            sysctl: Some(0),
            kallsyms: true,
            release: Some("6.8.0-45-generic".into()),
            seccomp_mode: Some(2),
        };
        let ok = render(
            &host,
            &Ok(uring::Features {
                taskrun: "single_issuer+defer_taskrun",
                splice: true,
            }),
        );
        for want in [
            "commit:   ",
            "profile:  ",
            "kernel:   Linux 6.8.0-45-generic",
            "kernel.io_uring_disabled: 0",
            "seccomp:  filter",
            "io_uring: available (task running: single_issuer+defer_taskrun; splice: yes)",
            "engine = \"auto\" runs uring",
        ] {
            assert!(ok.contains(want), "{want:?} missing:\n{ok}");
        }
        assert!(ok.starts_with(env!("CARGO_PKG_VERSION")), "{ok}");
        let off = render(&host, &Err(uring::Unavailable::Other("denied".into())));
        assert!(off.contains("io_uring: unavailable: denied"), "{off}");
        assert!(off.contains("engine = \"auto\" runs tokio"), "{off}");
    }

    #[test]
    fn the_commit_and_profile_are_recorded() {
        assert!(!COMMIT.is_empty());
        assert!(["debug", "release"].contains(&PROFILE), "{PROFILE}");
    }
}
