//! The module graph stays acyclic: no two top-level modules of `src/` use each other, even
//! through others, and neither do the modules inside one (`upstream/balance.rs` and
//! `upstream/pool.rs` once did). The vocabulary module uses nothing of the crate, `config`
//! only the vocabulary and `privdrop`, and `metrics` re-exports none of the vocabulary.
//!
//! The graph is read from the source text: every `crate::…` path (grouped `use crate::{a,
//! b::c}` included), every `super::…` path, resolved against the file's own module path.
//! It is the graph of the library as built: comments, doc links and strings are skipped, and
//! so are test modules (`#[cfg(test)] mod … { }` and `tests.rs` files), which may reach for
//! any module to build a fixture. docs/ARCHITECTURE.md
//! ("Module graph") draws the same graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path → the module paths it names (each as its list of identifiers).
type Refs = Vec<(Vec<String>, Vec<Vec<String>>)>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` → `[a, b]`; `src/a/mod.rs` → `[a]`; `src/lib.rs` → `[]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !["mod", "lib", "main"].contains(&stem) {
        parts.push(stem.to_string());
    }
    parts
}

/// The text without comments (line comments, doc comments, block comments) and without the
/// contents of string literals, so that neither a doc link nor a message is read as a path.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // A raw string's hashes do not matter here: its contents are dropped either way
            // up to the next unescaped quote, which is enough for the paths this looks for.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '{' (lifetimes have no closing quote).
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// `code` (already [`code_only`]) without its `#[cfg(test)] mod NAME { … }` blocks.
fn without_test_modules(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let inline_mod = trimmed.starts_with("mod ")
            && trimmed
                .find(['{', ';'])
                .is_some_and(|i| trimmed.as_bytes()[i] == b'{');
        if !inline_mod {
            rest = after;
            continue;
        }
        let open = after.find('{').unwrap();
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path a `use` tree starting at `text` names: `a::b`, `{a, b::{c, d}}`, `*`.
fn paths_of_tree(text: &str) -> Vec<Vec<String>> {
    let text = text.trim_start();
    if let Some(rest) = text.strip_prefix('{') {
        // Split the group at its top-level commas.
        let mut depth = 0;
        let mut items = Vec::new();
        let mut start = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    items.push(&rest[start..i]);
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&rest[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return items.into_iter().flat_map(paths_of_tree).collect();
    }
    let ident: String = text.chars().take_while(|&c| is_ident(c)).collect();
    if ident.is_empty() {
        return vec![Vec::new()];
    }
    let rest = &text[ident.len()..];
    match rest.strip_prefix("::") {
        Some(rest) => paths_of_tree(rest)
            .into_iter()
            .map(|mut p| {
                p.insert(0, ident.clone());
                p
            })
            .collect(),
        None => vec![vec![ident]],
    }
}

/// The absolute module paths `code` (of the module at `here`) names.
fn references(code: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let chars: Vec<(usize, char)> = code.char_indices().collect();
    for (k, &(i, _)) in chars.iter().enumerate() {
        let before = k.checked_sub(1).map(|j| chars[j].1);
        if before.is_some_and(|c| is_ident(c) || c == ':' || c == '$') {
            continue;
        }
        let rest = &code[i..];
        let (base, tail): (Vec<String>, &str) = if let Some(t) = rest.strip_prefix("crate::") {
            (Vec::new(), t)
        } else if rest.starts_with("super::") {
            let mut base = here.to_vec();
            let mut t = rest;
            while let Some(after) = t.strip_prefix("super::") {
                base.pop();
                t = after;
            }
            (base, t)
        } else {
            continue;
        };
        for p in paths_of_tree(tail) {
            let mut full = base.clone();
            full.extend(p.into_iter().filter(|s| s != "self"));
            found.push(full);
        }
    }
    found
}

fn read_refs(src: &Path) -> Refs {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    files
        .iter()
        .map(|f| (module_path(src, f), f))
        .filter(|(here, _)| !here.iter().any(|m| m == "tests"))
        .map(|(here, f)| {
            let code = without_test_modules(&code_only(&std::fs::read_to_string(f).unwrap()));
            let refs = references(&code, &here);
            (here, refs)
        })
        .collect()
}

/// The modules directly inside `parent` (its files and folders under `src/`).
fn children(src: &Path, parent: &[String]) -> BTreeSet<String> {
    let dir = parent.iter().fold(src.to_path_buf(), |d, p| d.join(p));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeSet::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            if p.is_dir() {
                Some(name)
            } else {
                let stem = name.strip_suffix(".rs")?;
                (!["mod", "lib", "main", "tests"].contains(&stem)).then(|| stem.to_string())
            }
        })
        .collect()
}

/// The graph among the children of `parent`: an edge `a → b` when code in `a` names `b`.
fn graph(src: &Path, refs: &Refs, parent: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let kids = children(src, parent);
    let depth = parent.len();
    let mut g: BTreeMap<String, BTreeSet<String>> =
        kids.iter().map(|k| (k.clone(), BTreeSet::new())).collect();
    for (here, targets) in refs {
        if here.len() <= depth || here[..depth] != *parent || !kids.contains(&here[depth]) {
            continue;
        }
        for t in targets {
            if t.len() > depth
                && t[..depth] == *parent
                && kids.contains(&t[depth])
                && t[depth] != here[depth]
            {
                g.get_mut(&here[depth]).unwrap().insert(t[depth].clone());
            }
        }
    }
    g
}

/// A cycle of `g`, if it has one (as the list of its modules, the first repeated last).
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_cycle_among_top_level_modules() {
    let src = src();
    let refs = read_refs(&src);
    let top = graph(&src, &refs, &[]);
    assert!(top.len() > 10, "read too few modules: {top:?}");
    if let Some(cycle) = find_cycle(&top) {
        panic!(
            "import cycle among the top-level modules: {}\nthe graph: {top:#?}",
            cycle.join(" → ")
        );
    }
}

#[test]
fn no_cycle_inside_a_module() {
    let src = src();
    let refs = read_refs(&src);
    let mut dirs: Vec<Vec<String>> = Vec::new();
    let mut stack = vec![Vec::<String>::new()];
    while let Some(d) = stack.pop() {
        for kid in children(&src, &d) {
            let mut p = d.clone();
            p.push(kid);
            if p.iter().fold(src.clone(), |acc, s| acc.join(s)).is_dir() {
                stack.push(p.clone());
                dirs.push(p);
            }
        }
    }
    assert!(dirs.iter().any(|d| d == &["upstream"]), "{dirs:?}");
    let cycles: Vec<String> = dirs
        .iter()
        .filter_map(|d| {
            let g = graph(&src, &refs, d);
            find_cycle(&g).map(|c| format!("inside {}: {}", d.join("/"), c.join(" → ")))
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_vocabulary_is_a_leaf_and_config_sits_on_it() {
    let src = src();
    let refs = read_refs(&src);
    let top = graph(&src, &refs, &[]);
    assert_eq!(
        top["vocab"],
        BTreeSet::new(),
        "vocab must use nothing of the crate"
    );
    let allowed: BTreeSet<String> = ["vocab", "privdrop"].map(String::from).into();
    assert!(
        top["config"].is_subset(&allowed),
        "config may use only {allowed:?}, uses {:?}",
        top["config"]
    );
    assert!(top["privdrop"].is_empty(), "{:?}", top["privdrop"]);
}

#[test]
fn metrics_reexports_no_vocabulary() {
    let mut files = Vec::new();
    rust_files(&src().join("metrics"), &mut files);
    for f in files {
        let code = code_only(&std::fs::read_to_string(&f).unwrap());
        for line in code.lines() {
            let line = line.trim();
            assert!(
                !(line.starts_with("pub use") && line.contains("vocab")),
                "{}: {line}: import the vocabulary from crate::vocab instead",
                f.display()
            );
        }
    }
}

/// The reader itself: grouped and nested `use` trees, `super` chains, comments and strings.
#[test]
fn the_reader_finds_paths_and_skips_comments() {
    let here: Vec<String> = ["engine", "uring", "ops"].map(String::from).into();
    let code = code_only(
        "use crate::{config::{Config, Rule}, metrics};\n\
         // use crate::session::Runtime;\n\
         /// [`crate::net`]\n\
         let s = \"crate::tools\";\n\
         use super::super::Listeners;\n\
         let x = crate::vocab::Direction::ALL;\n\
         #[cfg(test)]\n\
         mod tests { use crate::tools::echo; fn f() { if true { } } }\n\
         #[cfg(test)]\n\
         use crate::cli::Cli;\n",
    );
    let code = without_test_modules(&code);
    let refs = references(&code, &here);
    let tops: BTreeSet<&str> = refs
        .iter()
        .filter_map(|r| r.first().map(String::as_str))
        .collect();
    assert_eq!(
        tops,
        ["cli", "config", "engine", "metrics", "vocab"].into(),
        "{refs:?}"
    );
    assert!(refs.contains(&["engine", "Listeners"].map(String::from).to_vec()));
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "a"]);
}
