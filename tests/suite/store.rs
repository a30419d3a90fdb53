//! The certificate store is private to the relay's user, as ssh keeps `~/.ssh`: a store folder
//! or file another local user owns or can write stops the start with its path; what others can
//! merely read is tightened; planted symlinks and temp files never receive a secret.

use std::os::unix::fs::{PermissionsExt, chown, symlink};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use oauth_relay::{Config, Listeners};

/// The uid of `nobody`, the second local user of these tests (they run as root).
const NOBODY: u32 = 65534;

fn self_signed_config(storage: &Path) -> Arc<Config> {
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{}\"\n\n[[site]]\nname = \"local\"\n\
         hostnames = [\"self.example.test\"]\n\n[site.tls]\nsource = \"self-signed\"\n",
        storage.display()
    );
    Arc::new(Config::parse("test.toml", &toml).expect("config"))
}

/// Starts the relay on `storage` and returns why it refused to start.
async fn refused(storage: &Path) -> String {
    let config = self_signed_config(storage);
    let listeners = Listeners::bind(&config).await.expect("bind");
    let run = oauth_relay::run(config, listeners, std::future::pending());
    let result = tokio::time::timeout(Duration::from_secs(10), run).await.expect("run returns at once");
    result.expect_err("the store is refused").to_string()
}

/// Starts the relay on `storage`, waits until it made or loaded its certificate, stops it.
async fn starts(storage: &Path) {
    let config = self_signed_config(storage);
    let listeners = Listeners::bind(&config).await.expect("bind");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(oauth_relay::run(config, listeners, async move {
        let _ = rx.await;
    }));
    let cert = storage.join("self-signed/local.crt");
    for _ in 0..250 {
        if cert.is_file() || run.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tx.send(());
    let result = tokio::time::timeout(Duration::from_secs(10), run).await.expect("stops").expect("task");
    result.expect("the store is accepted");
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

#[tokio::test]
async fn a_store_folder_another_user_owns_or_can_write_is_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let storage = root.path().join("store");
    std::fs::create_dir(&storage).unwrap();

    chown(&storage, Some(NOBODY), Some(NOBODY)).unwrap();
    let text = refused(&storage).await;
    let want = format!(
        "{}: refusing to use the certificate store: owned by uid {NOBODY}, not by the relay's user (uid 0)",
        storage.display()
    );
    assert!(text.contains(&want), "{text}");
    chown(&storage, Some(0), Some(0)).unwrap();

    set_mode(&storage, 0o777);
    let text = refused(&storage).await;
    let want =
        format!("{}: refusing to use the certificate store: writable by other users (mode 0777)", storage.display());
    assert!(text.contains(&want), "{text}");
    set_mode(&storage, 0o700);

    // A folder inside, pre-created by someone else so they could read the key written into it.
    let inner = storage.join("self-signed");
    std::fs::create_dir(&inner).unwrap();
    set_mode(&inner, 0o777);
    let text = refused(&storage).await;
    assert!(
        text.contains(&format!("{}: refusing to use the certificate store: writable by other users", inner.display())),
        "{text}"
    );
    assert!(!inner.join("local.key").exists(), "no key written into it");
    set_mode(&inner, 0o700);

    // A file planted by another user where the relay would keep its key.
    std::fs::write(inner.join("local.key"), b"planted").unwrap();
    chown(inner.join("local.key"), Some(NOBODY), Some(NOBODY)).unwrap();
    let text = refused(&storage).await;
    assert!(
        text.contains(&format!(
            "{}: refusing to use the certificate store: owned by uid {NOBODY}",
            inner.join("local.key").display()
        )),
        "{text}"
    );
    assert_eq!(std::fs::read(inner.join("local.key")).unwrap(), b"planted", "nothing removed or rewritten");
}

#[tokio::test]
async fn a_key_others_can_read_is_tightened_and_kept() {
    oauth_relay::crypto::provider();
    let root = tempfile::tempdir().unwrap();
    let storage = root.path().join("store");
    starts(&storage).await;
    let dir = storage.join("self-signed");
    let (cert, key) = (dir.join("local.crt"), dir.join("local.key"));
    let key_pem = std::fs::read(&key).unwrap();
    // As a careless `cp` or an old release might have left them.
    set_mode(&storage, 0o755);
    set_mode(&dir, 0o755);
    set_mode(&key, 0o644);
    set_mode(&cert, 0o644);
    starts(&storage).await;
    assert_eq!((mode(&storage), mode(&dir), mode(&key), mode(&cert)), (0o700, 0o700, 0o600, 0o600));
    assert_eq!(std::fs::read(&key).unwrap(), key_pem, "the same key, tightened, not replaced");
}

#[tokio::test]
async fn planted_symlinks_and_temp_files_never_receive_the_key() {
    oauth_relay::crypto::provider();
    let root = tempfile::tempdir().unwrap();
    let storage = root.path().join("store");
    let dir = storage.join("self-signed");
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&storage, 0o700);
    set_mode(&dir, 0o700);
    // Where the attacker wants the key to land: a file they can read.
    let loot = root.path().join("loot");
    std::fs::write(&loot, b"").unwrap();

    // A symlink in place of the key file itself is refused (the store never makes one).
    symlink(&loot, dir.join("local.key")).unwrap();
    let text = refused(&storage).await;
    assert!(
        text.contains(&format!(
            "{}: refusing to use the certificate store: not a regular file",
            dir.join("local.key").display()
        )),
        "{text}"
    );
    std::fs::remove_file(dir.join("local.key")).unwrap();

    // Nor does a symlink at a temp name an older release would have used: refused at start,
    // never opened. (Writes go through exclusively created, randomly named temp files, and a
    // rename replaces a link instead of following it: see `fsutil`.)
    let pid = std::process::id();
    symlink(&loot, dir.join(format!(".local.key.tmp-{pid}-0"))).unwrap();
    let text = refused(&storage).await;
    assert!(text.contains("not a regular file"), "{text}");
    assert_eq!(std::fs::read(&loot).unwrap(), b"", "nothing written through a planted link");
    assert!(!dir.join("local.key").exists());
}
