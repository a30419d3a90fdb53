//! The module map at the top of `src/lib.rs` is the real import graph: every module imports
//! only modules the map lists before it, so the graph has no cycles and a newcomer can read the
//! crate from its leaves up.

use std::collections::BTreeSet;
use std::path::Path;

/// The modules in the order `src/lib.rs`'s map names them (`[`name`]` links, first mention).
fn map_order(lib: &str) -> Vec<String> {
    let mut order = Vec::new();
    for line in lib.lines().take_while(|l| l.starts_with("//!")) {
        for part in line.split("[`").skip(1) {
            let name = part.split('`').next().unwrap_or_default();
            let is_module = name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            if is_module && !name.is_empty() && !order.iter().any(|m| m == name) {
                order.push(name.to_string());
            }
        }
    }
    order
}

/// Every `.rs` file of a module: `src/{name}.rs` and everything under `src/{name}/`.
fn sources(src: &Path, module: &str) -> Vec<std::path::PathBuf> {
    let file = src.join(format!("{module}.rs"));
    let mut out: Vec<std::path::PathBuf> = file.is_file().then_some(file).into_iter().collect();
    let mut dirs: Vec<std::path::PathBuf> = Some(src.join(module)).filter(|d| d.is_dir()).into_iter().collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

/// The crate's own top-level modules a source file names (`crate::x`, `crate::{x, y}`),
/// comments left out.
fn imports(text: &str, modules: &[String]) -> BTreeSet<String> {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    let mut found = BTreeSet::new();
    for part in code.split("crate::").skip(1) {
        let names = match part.strip_prefix('{') {
            Some(group) => group.split('}').next().unwrap_or_default().to_string(),
            None => part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect(),
        };
        for name in names.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if modules.iter().any(|m| m == name) {
                found.insert(name.to_string());
            }
        }
    }
    found
}

#[test]
fn every_module_imports_only_modules_the_map_lists_before_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read src/lib.rs");
    let declared: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    // The map also links items (`run`); only the declared modules count.
    let order: Vec<String> = map_order(&lib).into_iter().filter(|m| declared.contains(m)).collect();
    let unmapped: Vec<&String> = declared.iter().filter(|m| !order.contains(m)).collect();
    assert!(unmapped.is_empty(), "modules missing from src/lib.rs's map: {unmapped:?}");
    let mut wrong = Vec::new();
    for (i, module) in order.iter().enumerate() {
        for file in sources(&src, module) {
            let text = std::fs::read_to_string(&file).expect("read a source file");
            for dep in imports(&text, &declared) {
                let listed_before = order[..i].contains(&dep);
                if dep != *module && !listed_before {
                    wrong.push(format!("{} ({module}) imports {dep}", file.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the map's order:\n{}", wrong.join("\n"));
}
