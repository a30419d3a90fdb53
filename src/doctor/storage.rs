//! The certificate store folder (`server.storage`): it exists or can be created, other users
//! cannot read it, and this user can write in it.
//!
//! Nothing is left behind: a missing folder is not created (the relay makes it, mode 0700, at
//! start); creatability is proven with a temporary folder beside it, writability with a
//! temporary file inside it, both removed at once.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::Finding;

const CHECK: &str = "storage";

/// All storage findings for `dir`: existence (or creatability), then mode and writability.
pub fn check(dir: &Path) -> Vec<Finding> {
    let shown = dir.display();
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => vec![Finding::error(
            CHECK,
            format!("{shown} exists but is not a folder"),
            "set `server.storage` to a folder path",
        )],
        Ok(m) => vec![mode(dir, m.permissions().mode()), writable(dir)],
        // Not a directory: some ancestor is a file, which `creatable` names.
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => vec![creatable(dir)],
        Err(e) => vec![Finding::error(
            CHECK,
            format!("{shown}: cannot be inspected: {e}"),
            format!("make {shown} reachable by the user the relay runs as"),
        )],
    }
}

/// Other users must not list or read the store (keys are 0600, but names and certificates
/// would show).
pub fn mode(dir: &Path, mode: u32) -> Finding {
    let shown = dir.display();
    if mode & 0o007 == 0 {
        Finding::ok(CHECK, format!("{shown} is private (mode {:04o})", mode & 0o7777))
    } else {
        Finding::warning(
            CHECK,
            format!("{shown} is open to other users (mode {:04o})", mode & 0o7777),
            format!("chmod 0700 {shown}"),
        )
    }
}

/// Creates and removes a temporary file in `dir`, as the store does for every write.
pub fn writable(dir: &Path) -> Finding {
    let probe = dir.join(format!(".doctor-probe-{}", std::process::id()));
    let result = fs::OpenOptions::new().write(true).create_new(true).open(&probe).and_then(|_| fs::remove_file(&probe));
    match result {
        Ok(()) => Finding::ok(CHECK, format!("{} is writable", dir.display())),
        Err(e) => {
            let _ = fs::remove_file(&probe);
            Finding::error(
                CHECK,
                format!("{} is not writable by this user: {e}", dir.display()),
                format!("chown the folder to the relay's user and chmod 0700 {}", dir.display()),
            )
        }
    }
}

/// A missing `dir` can be made when its nearest existing ancestor is a folder this user can
/// create in; proven by making and removing a temporary folder there.
pub fn creatable(dir: &Path) -> Finding {
    let shown = dir.display();
    let cannot = |why: String| {
        Finding::error(
            CHECK,
            format!("{shown} does not exist and cannot be created: {why}"),
            format!("create it for the relay's user: `install -d -m 0700 -o USER {shown}`, or change `server.storage`"),
        )
    };
    let Some(ancestor) = dir.ancestors().skip(1).find(|a| a.as_os_str().is_empty() || a.exists()) else {
        return cannot("no existing parent".into());
    };
    let ancestor = if ancestor.as_os_str().is_empty() { Path::new(".") } else { ancestor };
    if !ancestor.is_dir() {
        return cannot(format!("{} is not a folder", ancestor.display()));
    }
    let probe = ancestor.join(format!(".doctor-probe-{}", std::process::id()));
    match fs::create_dir(&probe).and_then(|()| fs::remove_dir(&probe)) {
        Ok(()) => Finding::ok(CHECK, format!("{shown} does not exist yet; the relay will create it (mode 0700)")),
        Err(e) => {
            let _ = fs::remove_dir(&probe);
            cannot(format!("{}: {e}", ancestor.display()))
        }
    }
}
