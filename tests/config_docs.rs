//! docs/CONFIG.md shows what `ringfwd` prints for each mistake; this test keeps it true.
//!
//! Every ```` ```console ```` block of CONFIG.md is a session, replayed here against the
//! binary:
//!
//! - `$ cat ringfwd.toml` is followed by the whole file, which is written to a fresh directory;
//! - `$ ringfwd ARGS` (optionally ending in ` >/dev/null`) is run in that directory, and the
//!   lines after it are exactly its stderr; a line ending in `…` only has to start with the
//!   text before the `…` (for words that come from the resolver, which vary by host);
//! - the exit status must be 1 for `ringfwd: error:` (flag mistakes included), else 0;
//!   stdout must be empty unless it was sent to /dev/null.
//!
//! A new user meets these messages first; a table that drifted from them (as the old one had)
//! sends them looking for words that `check` never prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One command of a session, with the file it runs against.
#[derive(Debug)]
struct Example {
    /// Line in CONFIG.md of the command, for failure messages.
    line: usize,
    file: Option<String>,
    args: Vec<String>,
    stdout_discarded: bool,
    expected: Vec<String>,
}

fn examples(doc: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut in_console = false;
    let mut file: Option<String> = None;
    // What the lines being read belong to: a file, or the output of the last command.
    enum Reading {
        Nothing,
        File(String),
        Output,
    }
    let mut reading = Reading::Nothing;
    let flush = |reading: &mut Reading, file: &mut Option<String>| {
        if let Reading::File(text) = std::mem::replace(reading, Reading::Nothing) {
            *file = Some(text);
        }
    };
    for (i, line) in doc.lines().enumerate() {
        if !in_console {
            in_console = line.trim_end() == "```console";
            continue;
        }
        if line.starts_with("```") {
            flush(&mut reading, &mut file);
            in_console = false;
            file = None;
            continue;
        }
        if let Some(cmd) = line.strip_prefix("$ ") {
            flush(&mut reading, &mut file);
            if cmd == "cat ringfwd.toml" {
                reading = Reading::File(String::new());
                continue;
            }
            let (cmd, stdout_discarded) = match cmd.strip_suffix(" >/dev/null") {
                Some(c) => (c, true),
                None => (cmd, false),
            };
            let mut words = cmd.split_whitespace().map(str::to_string);
            assert_eq!(
                words.next().as_deref(),
                Some("ringfwd"),
                "CONFIG.md:{}: a console block runs only `cat ringfwd.toml` and `ringfwd …`",
                i + 1
            );
            out.push(Example {
                line: i + 1,
                // A file shown before this command belongs to it alone.
                file: file.take(),
                args: words.collect(),
                stdout_discarded,
                expected: Vec::new(),
            });
            reading = Reading::Output;
            continue;
        }
        match &mut reading {
            Reading::File(text) => {
                text.push_str(line);
                text.push('\n');
            }
            Reading::Output => out
                .last_mut()
                .expect("output follows a command")
                .expected
                .push(line.to_string()),
            Reading::Nothing => panic!("CONFIG.md:{}: text before any command: {line}", i + 1),
        }
    }
    for e in &mut out {
        while e.expected.last().is_some_and(|l| l.trim().is_empty()) {
            e.expected.pop();
        }
    }
    out
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary in `dir`, killing it if it has not finished within a bound (a `run` that
/// should have failed must not hang the test).
fn run_in(dir: &Path, args: &[String]) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringfwd"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringfwd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn matches(expected: &[String], actual: &str) -> bool {
    let actual: Vec<&str> = actual.trim_end().lines().map(str::trim_end).collect();
    actual.len() == expected.len()
        && expected
            .iter()
            .zip(&actual)
            .all(|(e, a)| match e.strip_suffix('…') {
                Some(prefix) => a.starts_with(prefix),
                None => e.trim_end() == *a,
            })
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_documented_message_is_what_ringfwd_prints() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md");
    let doc = std::fs::read_to_string(&doc_path).expect("read docs/CONFIG.md");
    let examples = examples(&doc);
    assert!(
        examples.len() >= 40,
        "only {} examples found in CONFIG.md: is the console-block format still the one this test reads?",
        examples.len()
    );
    let root =
        TempDir(std::env::temp_dir().join(format!("ringfwd-config-docs-{}", std::process::id())));
    let mut failures = Vec::new();
    for (n, ex) in examples.iter().enumerate() {
        let dir = root.0.join(n.to_string());
        std::fs::create_dir_all(&dir).expect("temp dir");
        if let Some(text) = &ex.file {
            std::fs::write(dir.join("ringfwd.toml"), text).expect("write example");
        }
        let got = run_in(&dir, &ex.args);
        let first = ex.expected.first().map_or("", String::as_str);
        let want_code = i32::from(first.starts_with("ringfwd: error:"));
        let mut wrong = Vec::new();
        if !matches(&ex.expected, &got.stderr) {
            wrong.push(format!(
                "documented:\n{}\nprinted:\n{}",
                ex.expected.join("\n"),
                got.stderr.trim_end()
            ));
        }
        if got.code != Some(want_code) {
            wrong.push(format!(
                "exit status {:?}, documented {want_code}",
                got.code
            ));
        }
        if !ex.stdout_discarded && !got.stdout.is_empty() {
            wrong.push(format!("unexpected stdout:\n{}", got.stdout));
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "CONFIG.md:{}: ringfwd {}\n{}",
                ex.line,
                ex.args.join(" "),
                wrong.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} documented examples are wrong:\n\n{}",
        failures.len(),
        examples.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_session_reader_reads_files_commands_and_output() {
    let doc = "text\n```console\n$ cat ringfwd.toml\na = 1\n\nb = 2\n$ ringfwd check --config ringfwd.toml >/dev/null\nout 1\n\nout 2\n\n$ ringfwd run --x\n```\n";
    let ex = examples(doc);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].file.as_deref(), Some("a = 1\n\nb = 2\n"));
    assert_eq!(ex[0].args, ["check", "--config", "ringfwd.toml"]);
    assert!(ex[0].stdout_discarded);
    assert_eq!(ex[0].expected, ["out 1", "", "out 2"]);
    assert_eq!(
        ex[1].file, None,
        "a file belongs to the one command after it"
    );
    assert!(ex[1].expected.is_empty());
    assert!(matches(&["a: b…".to_string()], "a: b c d\n"));
    assert!(!matches(&["a: b".to_string()], "a: b c d\n"));
}
