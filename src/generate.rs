//! `ringfwd generate`: the man pages and shell completions, made from the command-line
//! definition itself ([`crate::cli::Cli`]) so they can never describe flags the binary does
//! not have. Hidden from `--help`: it is for packaging (`deploy/gen-assets.sh` runs it before
//! `cargo deb`), not for operators.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::{Cli, GenerateArgs, What};

/// Why generating failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot write into {dir}: {source}")]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write to stdout: {0}")]
    Stdout(#[source] std::io::Error),
}

fn write_error(dir: &Path) -> impl Fn(std::io::Error) -> GenerateError + '_ {
    move |source| GenerateError::Write {
        dir: dir.to_path_buf(),
        source,
    }
}

/// Writes what `args` asks for; returns the files written (none for stdout).
///
/// # Errors
/// The directory cannot be created or written.
pub fn run(args: &GenerateArgs) -> Result<Vec<PathBuf>, GenerateError> {
    let cmd = Cli::command();
    match &args.what {
        What::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(dir).map_err(write_error(dir))?;
            clap_mangen::generate_to(cmd, dir).map_err(write_error(dir))?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(write_error(dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "1"))
                .collect();
            files.sort();
            Ok(files)
        }
        What::Man { dir: None } => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .and_then(|()| out.flush())
                .map_err(GenerateError::Stdout)?;
            Ok(Vec::new())
        }
        What::Completions {
            shell,
            dir: Some(dir),
        } => {
            std::fs::create_dir_all(dir).map_err(write_error(dir))?;
            let mut cmd = cmd;
            let path = clap_complete::generate_to(*shell, &mut cmd, "ringfwd", dir)
                .map_err(write_error(dir))?;
            Ok(vec![path])
        }
        What::Completions { shell, dir: None } => {
            let mut cmd = cmd;
            let mut out = std::io::stdout().lock();
            clap_complete::generate(*shell, &mut cmd, "ringfwd", &mut out);
            out.flush().map_err(GenerateError::Stdout)?;
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringfwd-gen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn man_pages_cover_every_visible_command_and_its_flags() {
        let dir = scratch("man");
        let files = run(&GenerateArgs {
            what: What::Man {
                dir: Some(dir.clone()),
            },
        })
        .unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "ringfwd.1",
            "ringfwd-run.1",
            "ringfwd-check.1",
            "ringfwd-stats.1",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("generate")),
            "the hidden command has no page: {names:?}"
        );
        let run_page = std::fs::read_to_string(dir.join("ringfwd-run.1")).unwrap();
        for flag in ["workers", "idle\\-timeout", "takeover", "/reload"] {
            assert!(run_page.contains(flag), "ringfwd-run.1 lacks {flag}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completions_are_written_under_each_shells_name() {
        let dir = scratch("completions");
        for (shell, file) in [
            (Shell::Bash, "ringfwd.bash"),
            (Shell::Zsh, "_ringfwd"),
            (Shell::Fish, "ringfwd.fish"),
        ] {
            let files = run(&GenerateArgs {
                what: What::Completions {
                    shell,
                    dir: Some(dir.clone()),
                },
            })
            .unwrap();
            assert_eq!(files, [dir.join(file)]);
            let text = std::fs::read_to_string(&files[0]).unwrap();
            assert!(text.contains("idle-timeout"), "{file} lacks run's flags");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
