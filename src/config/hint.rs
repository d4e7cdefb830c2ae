//! Hints added to TOML structure errors, so the message says what to write instead.
//!
//! serde and toml report *what* did not fit ("unknown field `wrokers`, expected one of …",
//! "invalid type: map, expected a sequence") but not the likely slip behind it: a misspelt
//! key, or `[rule]` written for `[[rule]]`. These functions look at the message and the line
//! it points at and name the fix, the way the command line's "did you mean" already does.

/// The hint for a TOML structure error `msg` reported on the line `line_text`, if one fits.
pub fn for_error(msg: &str, line_text: &str) -> Option<String> {
    if msg.starts_with("unknown field") {
        return did_you_mean(msg);
    }
    table_brackets(msg, line_text)
}

/// `did you mean `KEY`?` when exactly one of the expected keys is close to the unknown one
/// (at most one edit for short names, two for longer ones; a swap of two letters is one).
fn did_you_mean(msg: &str) -> Option<String> {
    // "unknown field `x`, expected one of `a`, `b`" / "expected `a` or `b`" / "expected `a`"
    let mut names = msg.split('`').skip(1).step_by(2);
    let unknown = names.next()?;
    let budget = if unknown.chars().count() <= 4 { 1 } else { 2 };
    let mut best: Option<(usize, &str)> = None;
    let mut tied = false;
    for candidate in names {
        let d = distance(unknown, candidate);
        match best {
            _ if d > budget => {}
            Some((b, _)) if d > b => {}
            Some((b, _)) if d == b => tied = true,
            _ => {
                best = Some((d, candidate));
                tied = false;
            }
        }
    }
    match best {
        Some((_, key)) if !tied => Some(format!("did you mean `{key}`?")),
        _ => None,
    }
}

/// A table written with the wrong number of brackets: `[rule]` for the list of tables
/// `[[rule]]`, or `[[uring]]` for the single table `[uring]`.
fn table_brackets(msg: &str, line_text: &str) -> Option<String> {
    let header = line_text.trim();
    let header = header.split('#').next().unwrap_or(header).trim_end();
    if !msg.starts_with("invalid type:") {
        return None;
    }
    if let Some(name) = header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
        let name = name.trim();
        return Some(format!(
            "`[[{name}]]` makes a list of tables, but `{name}` is a single table: write `[{name}]` (single brackets), once"
        ));
    }
    let name = header.strip_prefix('[')?.strip_suffix(']')?.trim();
    msg.contains("expected a sequence").then(|| {
        format!(
            "`[{name}]` is a single table, but `{name}` is a list of tables: write `[[{name}]]` (double brackets), once per entry"
        )
    })
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// adjacent characters each cost one.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_key_is_suggested_and_a_far_or_ambiguous_one_is_not() {
        let top = "unknown field `wrokers`, expected one of `workers`, `engine`, `mode`";
        assert_eq!(
            for_error(top, "wrokers = 2").as_deref(),
            Some("did you mean `workers`?")
        );
        let m = "unknown field `idel`, expected one of `interval`, `idle`, `count`";
        assert_eq!(for_error(m, "").as_deref(), Some("did you mean `idle`?"));
        let m = "unknown field `ringentries`, expected `ring_entries` or `buffers`";
        assert_eq!(
            for_error(m, "").as_deref(),
            Some("did you mean `ring_entries`?")
        );
        let m = "unknown field `colour`, expected one of `workers`, `engine`";
        assert_eq!(for_error(m, ""), None);
        // Two keys equally close: no guess.
        let m = "unknown field `ab`, expected `ax` or `ay`";
        assert_eq!(for_error(m, ""), None);
    }

    #[test]
    fn wrong_brackets_are_named() {
        let hint = for_error("invalid type: map, expected a sequence", "[rule]").unwrap();
        assert!(hint.contains("write `[[rule]]`"), "{hint}");
        let hint = for_error(
            "invalid type: map, expected a sequence",
            " [rule.route] # x",
        )
        .unwrap();
        assert!(hint.contains("write `[[rule.route]]`"), "{hint}");
        let hint = for_error("invalid type: map, expected u32", "[[uring]]").unwrap();
        assert!(hint.contains("write `[uring]`"), "{hint}");
        assert_eq!(
            for_error("invalid type: integer `5`, expected a sequence", "rule = 5"),
            None
        );
    }

    #[test]
    fn distance_counts_a_swap_as_one_edit() {
        assert_eq!(distance("wrokers", "workers"), 1);
        assert_eq!(distance("ringentries", "ring_entries"), 1);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
    }
}
