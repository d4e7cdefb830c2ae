//! Build script: records what `ringfwd --version` reports about the build itself.
//!
//! - `RINGFWD_COMMIT`: the git commit the binary was built from — the environment variable of
//!   that name if set (a build from a tarball or a container context without `.git`), else
//!   `git rev-parse`, else `unknown`. Reruns only when HEAD or the branch it names moves, so
//!   a documentation edit does not rebuild the crate.
//! - `RINGFWD_PROFILE`: cargo's profile (`debug` or `release`).
//! - `RINGFWD_TARGET`: the target triple.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RINGFWD_COMMIT");
    let commit = match std::env::var("RINGFWD_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            // HEAD of this worktree, and the ref file it points at (in the common dir).
            if let Some(git_dir) = git(&["rev-parse", "--git-dir"]) {
                let git_dir = PathBuf::from(git_dir);
                println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
                if let (Some(common), Some(head_ref)) = (
                    git(&["rev-parse", "--git-common-dir"]),
                    git(&["symbolic-ref", "-q", "HEAD"]),
                ) {
                    let common = PathBuf::from(common);
                    println!("cargo:rerun-if-changed={}", common.join(head_ref).display());
                    println!(
                        "cargo:rerun-if-changed={}",
                        common.join("packed-refs").display()
                    );
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=RINGFWD_COMMIT={commit}");
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=RINGFWD_PROFILE={profile}");
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=RINGFWD_TARGET={target}");
}
