//! Files the relay reads and writes. Those it is told to read (the configuration, certificates,
//! keys) are read only when they are regular files of a bounded size, so a path that names a
//! FIFO or `/dev/zero` cannot block the relay or fill its memory. Those that hold secrets are
//! written atomically (exclusive temp file, fsync, rename, fsync of the folder) with mode 0600
//! in folders of mode 0700, so a crash never leaves a torn key or certificate and no other user
//! can read, plant or redirect them; [`secure_dir`] and [`secure_file`] judge what already
//! exists, as ssh does.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The largest configuration, certificate or key file the relay reads.
pub const MAX_READ: u64 = 1 << 20;

/// Reads `path` whole, when it is a regular file (or a link to one) of at most [`MAX_READ`]
/// bytes. Opened without blocking, so a FIFO is refused rather than waited on.
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > MAX_READ {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {MAX_READ} bytes")));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded again while reading: the file may grow after the check.
    file.take(MAX_READ + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_READ {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {MAX_READ} bytes")));
    }
    Ok(bytes)
}

/// Creates `dir` (and parents) with mode 0700 when missing. An existing folder is left as it
/// is: [`secure_dir`] judges it at start.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Replaces `path` with `bytes` atomically; the file has mode 0600.
///
/// The bytes go to a temp file that is created exclusively (`O_EXCL`, which never follows a
/// symlink) under a random name, fsync'd, then renamed over `path` (a rename replaces a
/// planted symlink instead of writing through it), and the folder is fsync'd. Another user who
/// can guess no name can neither pre-create the file nor redirect the write. The temp file is
/// removed when anything fails; nothing else is ever removed.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    private_dir(dir)?;
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fs::File::open(dir)?.sync_all()
}

/// Why a store folder or file is not safe to keep secrets in.
#[derive(Debug, thiserror::Error)]
pub enum Exposure {
    #[error(
        "owned by uid {owner}, not by the relay's user (uid {me}); another user could replace what it holds. \
         chown it to the relay's user"
    )]
    Owner { owner: u32, me: u32 },
    #[error(
        "writable by other users (mode {mode:04o}); one of them could plant or swap files. \
         Check what it holds, then chmod 0700 it"
    )]
    Writable { mode: u32 },
    #[error("not a {0}")]
    Kind(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What [`secure_dir`] or [`secure_file`] did to a path it accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    AlreadyPrivate,
    /// Readable by others before; now 0700 (folder) or 0600 (file). Holds the old mode.
    Tightened(u32),
}

/// Accepts a store folder as ssh's `StrictModes` does: owned by this user (or root) and
/// writable by no one else. A folder of this user that others can read or enter is made 0700.
/// A symlink to a folder is judged by its target.
pub fn secure_dir(dir: &Path) -> Result<Checked, Exposure> {
    secure(dir, true)
}

/// [`secure_dir`] for a file holding a secret: owned by this user (or root), writable by no one
/// else; one of this user's that others can read is made 0600. Not followed: a symlink is
/// refused, since the store never writes one.
pub fn secure_file(file: &Path) -> Result<Checked, Exposure> {
    secure(file, false)
}

/// What [`secure_dir`] (`dir`) or [`secure_file`] would do to `path`, changing nothing: the
/// verdict `doctor` reports ([`Checked::Tightened`] then holds the mode that would change).
pub fn inspect(path: &Path, dir: bool) -> Result<Checked, Exposure> {
    let meta = if dir { fs::metadata(path)? } else { fs::symlink_metadata(path)? };
    match (dir, meta.is_dir(), meta.is_file()) {
        (true, false, _) => return Err(Exposure::Kind("folder")),
        (false, _, false) => return Err(Exposure::Kind("regular file")),
        _ => {}
    }
    let me = rustix::process::geteuid().as_raw();
    let owner = meta.uid();
    if owner != me && owner != 0 {
        return Err(Exposure::Owner { owner, me });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Exposure::Writable { mode });
    }
    if mode & 0o077 == 0 || owner != me {
        return Ok(Checked::AlreadyPrivate);
    }
    Ok(Checked::Tightened(mode))
}

fn secure(path: &Path, dir: bool) -> Result<Checked, Exposure> {
    let verdict = inspect(path, dir)?;
    if let Checked::Tightened(_) = verdict {
        fs::set_permissions(path, fs::Permissions::from_mode(if dir { 0o700 } else { 0o600 }))?;
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_writers_of_one_file_in_one_process_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store-version");
        std::thread::scope(|s| {
            for t in 0..4 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..50 {
                        write_private(path, format!("{t}-{i}\n").as_bytes()).expect("every write succeeds");
                    }
                });
            }
        });
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temp files left behind");
    }

    #[test]
    fn a_write_replaces_a_planted_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"not yours").unwrap();
        let path = dir.path().join("status.json");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_private(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
    }

    #[test]
    fn folders_and_files_others_can_write_or_own_are_refused_readable_ones_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        let key = sub.join("key.pem");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(&key, b"k").unwrap();
        let set = |p: &Path, m: u32| std::fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;

        set(&sub, 0o755);
        set(&key, 0o644);
        assert_eq!(secure_dir(&sub).unwrap(), Checked::Tightened(0o755));
        assert_eq!(secure_file(&key).unwrap(), Checked::Tightened(0o644));
        assert_eq!((mode(&sub), mode(&key)), (0o700, 0o600));
        assert_eq!(secure_dir(&sub).unwrap(), Checked::AlreadyPrivate);

        set(&sub, 0o777);
        let e = secure_dir(&sub).unwrap_err().to_string();
        assert!(e.starts_with("writable by other users (mode 0777)"), "{e}");
        set(&sub, 0o700);

        let link = sub.join("link.pem");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        assert_eq!(secure_file(&link).unwrap_err().to_string(), "not a regular file");
        assert_eq!(secure_dir(&key).unwrap_err().to_string(), "not a folder");
    }
}
