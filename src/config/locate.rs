//! Maps between byte offsets in the TOML text and dotted key paths, so that every configuration
//! error can name both the key and the line an operator has to fix.

use toml::de::{DeTable, DeValue};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(&'static str),
    Index(usize),
}

/// Renders a path the way an operator reads it: `site[0].tls.source`.
pub fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// Finds the lines of key paths in one text, which it parses once (on the first question) and
/// whose line starts it indexes once: a file with many problems costs one parse, not one per
/// problem.
pub struct Locator<'a> {
    text: &'a str,
    parsed: std::cell::OnceCell<Option<(toml::Spanned<DeTable<'a>>, Vec<usize>)>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Locator<'a> {
        Locator { text, parsed: std::cell::OnceCell::new() }
    }

    /// The line where `path` is written, or where its nearest written parent is (a missing key
    /// is reported at the table that should hold it).
    pub fn line_of_path(&self, path: &[Seg]) -> Option<usize> {
        let (root, newlines) = self
            .parsed
            .get_or_init(|| {
                let root = DeTable::parse(self.text).ok()?;
                let newlines = self.text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i).collect();
                Some((root, newlines))
            })
            .as_ref()?;
        let offset = offset_of_path(root, path)?;
        Some(newlines.partition_point(|&n| n < offset) + 1)
    }
}

/// The byte offset where `path` (or its nearest written parent) is written.
fn offset_of_path(root: &toml::Spanned<DeTable<'_>>, path: &[Seg]) -> Option<usize> {
    let mut table = Some(root.get_ref());
    let mut array: Option<&[toml::Spanned<DeValue>]> = None;
    let mut best = None;
    for seg in path {
        let found = match seg {
            Seg::Key(name) => table
                .and_then(|t| t.iter().find(|(k, _)| k.get_ref().as_ref() == *name).map(|(k, v)| (k.span().start, v))),
            Seg::Index(i) => array.and_then(|a| a.get(*i)).map(|v| (v.span().start, v)),
        };
        let Some((offset, value)) = found else { break };
        best = Some(offset);
        table = match value.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        };
        array = match value.get_ref() {
            DeValue::Array(a) => Some(a.as_ref()),
            _ => None,
        };
    }
    best
}

/// The dotted path of the innermost key whose key or value covers `offset`.
pub fn path_at(text: &str, offset: usize) -> Option<String> {
    let (path, _) = locate_offset(text, offset)?;
    (!path.is_empty()).then_some(path)
}

/// How many lines above a syntax error [`path_near`] looks for the key it belongs to (a value
/// that spans lines, such as an unclosed array, starts above the error).
const LINES_UP: usize = 20;

/// The key path of a syntax error at `offset`, where the text cannot be parsed as a whole:
/// the key written on the error's line or on the nearest line above that begins a value
/// (an array left open), or the table of the header it sits under. Found with the TOML
/// parser itself: the text up to that line, plus the line's key with a placeholder value, is
/// parsed and the key located in it. `None` when the broken line is a table header.
pub fn path_near(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let mut start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    for _ in 0..LINES_UP {
        let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text[start..end].trim();
        let prefix = &text[..start];
        if !line.is_empty() && !line.starts_with('#') {
            if let Some(path) = path_of_line(prefix, line) {
                return Some(path);
            }
            // The line is broken in itself though the text above reads: no key to name.
            if line.starts_with('[') && DeTable::parse(prefix).is_ok() {
                return None;
            }
        }
        if start == 0 {
            return None;
        }
        start = text[..start - 1].rfind('\n').map_or(0, |i| i + 1);
    }
    None
}

/// The path of the header or key that `line` starts, read after `prefix` (the text above it).
fn path_of_line(prefix: &str, line: &str) -> Option<String> {
    if line.starts_with('[') {
        let header = &line[..line.rfind(']')? + 1];
        let doc = format!("{prefix}{header}\n");
        // The last character of the header's last key.
        let at = prefix.len() + header.trim_end_matches(']').trim_end().len() - 1;
        return path_at(&doc, at);
    }
    let key = line.split_once('=').map_or(line, |(k, _)| k).trim_end();
    if key.is_empty() {
        return None;
    }
    let at = |doc: &str| path_at(doc, prefix.len() + key.len() - 1);
    if let Some(path) = at(&format!("{prefix}{key} = 0\n")) {
        return Some(path);
    }
    // A key written twice: read a renamed copy, then give it its own name back.
    const MARK: &str = "__oauth_relay_again";
    let bare = key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
    let doc = format!("{prefix}{key}{MARK} = 0\n");
    let path = path_at(&doc, prefix.len() + key.len() - 1).filter(|_| bare)?;
    Some(path.replace(MARK, ""))
}

/// The byte range `key = value` of the innermost key covering `offset`, when that key is a
/// plain entry (not an array element): what can be blanked out to read past a bad key.
pub fn entry_at(text: &str, offset: usize) -> Option<std::ops::Range<usize>> {
    locate_offset(text, offset)?.1
}

fn locate_offset(text: &str, offset: usize) -> Option<(String, Option<std::ops::Range<usize>>)> {
    let root = DeTable::parse(text).ok()?;
    let mut walk = Walk { offset, path: String::new(), entry: None };
    walk.table(root.get_ref());
    Some((walk.path, walk.entry))
}

/// The descent towards `offset`: the path so far and the innermost `key = value` range.
struct Walk {
    offset: usize,
    path: String,
    entry: Option<std::ops::Range<usize>>,
}

impl Walk {
    fn table(&mut self, table: &DeTable) {
        let offset = self.offset;
        for (key, value) in table {
            let covers = key.span().contains(&offset) || value.span().contains(&offset);
            // Array-of-tables and dotted headers give keys whose spans sit apart from their
            // values, so also descend into containers whose children cover the offset.
            if covers || contains_deep(value, offset) {
                if !self.path.is_empty() {
                    self.path.push('.');
                }
                self.path.push_str(key.get_ref());
                let (k, v) = (key.span(), value.span());
                self.entry = (v.end > k.start).then_some(k.start..v.end);
                self.value(value);
                return;
            }
        }
    }

    fn value(&mut self, value: &toml::Spanned<DeValue>) {
        match value.get_ref() {
            DeValue::Table(t) => self.table(t),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if item.span().contains(&self.offset) || contains_deep(item, self.offset) {
                        self.path.push_str(&format!("[{i}]"));
                        self.entry = None;
                        self.value(item);
                        return;
                    }
                }
            }
            _ => {}
        }
    }
}

fn contains_deep(value: &toml::Spanned<DeValue>, offset: usize) -> bool {
    match value.get_ref() {
        DeValue::Table(t) => {
            t.iter().any(|(k, v)| k.span().contains(&offset) || v.span().contains(&offset) || contains_deep(v, offset))
        }
        DeValue::Array(items) => items.iter().any(|v| v.span().contains(&offset) || contains_deep(v, offset)),
        _ => false,
    }
}
