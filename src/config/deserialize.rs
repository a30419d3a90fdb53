//! TOML text to the raw serde structs, reporting every unknown key and mistyped value rather
//! than only the first: each offending `key = value` is blanked out (byte offsets and lines
//! kept) and the text read again.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::raw::RawConfig;
use super::{Problem, locate};

/// The most type and unknown-key errors reported from one file before giving up.
const MAX_PROBLEMS: usize = 32;

/// The raw config (read past every blanked key) and the problems found on the way; `None`
/// when the text could not be read at all. Stops at an error that cannot be blanked (a syntax
/// error, a missing key) after the first, so a blanked key never shows up again as a
/// misleading "missing field".
pub(super) fn raw(file: &str, text: &str) -> (Option<RawConfig>, Vec<Problem>) {
    let mut text = text.to_string();
    let mut problems: Vec<Problem> = Vec::new();
    while problems.len() < MAX_PROBLEMS {
        let e = match toml::from_str::<RawConfig>(&text) {
            Ok(raw) => return (Some(raw), problems),
            Err(e) => e,
        };
        let offset = e.span().map(|s| s.start);
        let entry = offset.and_then(|o| locate::entry_at(&text, o));
        if !problems.is_empty() && entry.is_none() {
            break;
        }
        let problem = Problem {
            file: file.to_string(),
            line: offset.map(|o| locate::line_of(&text, o)),
            key: offset
                .and_then(|o| locate::path_at(&text, o).or_else(|| locate::path_near(&text, o)))
                .unwrap_or_else(|| "(file)".into()),
            message: operator_words(e.message().trim()),
        };
        if problems.last() == Some(&problem) {
            break;
        }
        problems.push(problem);
        let Some(range) = entry else { break };
        let range = with_table_body(&text, range);
        blank(&mut text, range);
    }
    (None, problems)
}

/// A key in a `[table]` header stands for the header and the table's keys up to the next
/// header: blanking only the name would leave its keys to be read as keys of the table above.
fn with_table_body(text: &str, mut range: Range<usize>) -> Range<usize> {
    let line_start = text[..range.start].rfind('\n').map_or(0, |i| i + 1);
    if !text[line_start..range.start].trim_start().starts_with('[') {
        return range;
    }
    range.start = line_start;
    let mut end = text[line_start..].find('\n').map_or(text.len(), |i| line_start + i + 1);
    for l in text[end..].split_inclusive('\n') {
        if l.trim_start().starts_with('[') {
            break;
        }
        end += l.len();
    }
    range.end = range.end.max(end);
    range
}

/// Replaces `range` with spaces of the same byte length, keeping line breaks, so every later
/// offset and line number stays true.
fn blank(text: &mut String, range: Range<usize>) {
    let blanked: String = text[range.clone()]
        .chars()
        .flat_map(|c| std::iter::repeat_n(if c == '\n' { '\n' } else { ' ' }, c.len_utf8()))
        .collect();
    text.replace_range(range, &blanked);
}

/// serde's message with the Rust type names put the way the file says them.
fn operator_words(message: &str) -> String {
    match message.split_once("expected struct Raw") {
        Some((head, _)) => format!("{head}expected a table"),
        None => message.to_string(),
    }
}

/// A problem for every string value with a control character in it (an escape such as
/// `\u001b` written in the file): no name, path or address needs one, and each would reach
/// terminals, logs and the CA as written.
pub(super) fn control_characters(file: &str, text: &str) -> Vec<Problem> {
    let Ok(root) = DeTable::parse(text) else { return Vec::new() };
    let mut found = Vec::new();
    for (key, value) in root.get_ref() {
        strings(key.get_ref(), value, &mut found);
    }
    found
        .into_iter()
        .map(|(key, offset, c)| Problem {
            file: file.to_string(),
            line: Some(locate::line_of(text, offset)),
            key,
            message: format!("control characters are not allowed (found {:?})", c),
        })
        .collect()
}

/// The path, offset and first control character of every string under `value` that has one.
fn strings(path: &str, value: &toml::Spanned<DeValue<'_>>, out: &mut Vec<(String, usize, char)>) {
    match value.get_ref() {
        DeValue::String(s) => {
            if let Some(c) = s.chars().find(|c| c.is_control()) {
                out.push((path.to_string(), value.span().start, c));
            }
        }
        DeValue::Table(t) => {
            for (k, v) in t {
                strings(&format!("{path}.{}", k.get_ref()), v, out);
            }
        }
        DeValue::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                strings(&format!("{path}[{i}]"), v, out);
            }
        }
        _ => {}
    }
}
