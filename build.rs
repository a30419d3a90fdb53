//! Puts the commit the binary is built from into `--version` (`OAUTH_RELAY_VERSION`), so an
//! operator can tell which build runs. The commit comes from `OAUTH_RELAY_COMMIT` when set
//! (a build from a source tarball or a container context without `.git`), else from
//! `git rev-parse`; with neither, the version is the crate's alone.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=OAUTH_RELAY_COMMIT");
    let commit = std::env::var("OAUTH_RELAY_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs. Only files
        // that exist: cargo reruns a script on every build while a listed path is missing.
        for args in [["rev-parse", "--git-path", "HEAD"], ["rev-parse", "--git-path", "packed-refs"]] {
            watch(git(&args));
        }
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch(git(&["rev-parse", "--git-path", &branch]));
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    let version = env!("CARGO_PKG_VERSION");
    let full = match commit {
        Some(c) => format!("{version} (commit {c})"),
        None => version.to_string(),
    };
    println!("cargo:rustc-env=OAUTH_RELAY_VERSION={full}");
}

fn watch(path: Option<String>) {
    if let Some(p) = path.map(PathBuf::from).filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
