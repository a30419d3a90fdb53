//! The certificate store folder (`server.storage`): it exists or can be created, `serve` will
//! accept it (owners and modes judged as ssh judges `~/.ssh`, by the same code, changing
//! nothing), and this user can write in it.
//!
//! Nothing is left behind: a missing folder is not created (the relay makes it, mode 0700, at
//! start); creatability is proven with a temporary folder beside it, writability with a
//! temporary file inside it, both removed at once.

use std::fs;
use std::io;
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
        Ok(_) => vec![private(dir), writable(dir)],
        // Not a directory: some ancestor is a file, which `creatable` names.
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => vec![creatable(dir)],
        Err(e) => vec![Finding::error(
            CHECK,
            format!("{shown}: cannot be inspected: {e}"),
            format!("make {shown} reachable by the user the relay runs as"),
        )],
    }
}

/// What `serve` will say of the store at start: refused (another user owns or can write a
/// path: someone could plant or swap a key), or private, possibly after narrowing paths
/// others can read now.
pub fn private(dir: &Path) -> Finding {
    let shown = dir.display();
    match crate::storage::audit(dir) {
        Ok(opened) if opened.is_empty() => Finding::ok(CHECK, format!("{shown} is private")),
        Ok(opened) => {
            let (path, mode) = &opened[0];
            let more = if opened.len() > 1 { format!(" and {} more", opened.len() - 1) } else { String::new() };
            Finding::warning(
                CHECK,
                format!("{} (mode {mode:04o}){more} can be read by other users", path.display()),
                "the relay makes them private (0700 folders, 0600 files) when it starts; or chmod them now",
            )
        }
        Err(e) => Finding::error(
            CHECK,
            format!("serve would refuse the store: {e}"),
            "fix the owner or mode of that path as the message says",
        ),
    }
}

/// Creates and removes a temporary file in `dir`, as the store does for every write.
pub fn writable(dir: &Path) -> Finding {
    // A random name, created exclusively (as the store writes): nothing planted is followed.
    match tempfile::Builder::new().prefix(".doctor-probe-").tempfile_in(dir) {
        Ok(probe) => {
            drop(probe);
            Finding::ok(CHECK, format!("{} is writable", dir.display()))
        }
        Err(e) => Finding::error(
            CHECK,
            format!("{} is not writable by this user: {e}", dir.display()),
            format!("chown the folder to the relay's user and chmod 0700 {}", dir.display()),
        ),
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
