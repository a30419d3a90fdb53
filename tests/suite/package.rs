//! The Debian package as an operator gets it: built by `scripts/deb` from the binary this test
//! run uses (no release build), its files are deploy/'s files at the paths the unit names,
//! lintian finds no error in it, and `dpkg --root` installs it into an empty root, where the
//! user and the private store exist, nothing is enabled, the packaged binary accepts the
//! packaged config, and a purge takes the store away again.
//!
//! scripts/test installs cargo-deb, lintian and dpkg; without cargo-deb these tests say so and
//! pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_oauth-relay");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd` to completion within `bound`; panics with what it printed when it overran.
fn run(cmd: &mut Command, bound: Duration) -> Output {
    let what = format!("{cmd:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| std::fs::read(p).expect("read output");
    Output { status, stdout: read(&out), stderr: read(&err) }
}

fn ok(cmd: &mut Command, bound: Duration) -> String {
    let what = format!("{cmd:?}");
    let o = run(cmd, bound);
    assert!(o.status.success(), "{what}: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).expect("utf-8 output")
}

/// The package built once for this test run, or `None` (and a line saying why) without cargo-deb.
fn package() -> Option<&'static Path> {
    static DEB: OnceLock<Option<PathBuf>> = OnceLock::new();
    DEB.get_or_init(|| {
        if run(Command::new("cargo").args(["deb", "--version"]), Duration::from_secs(30)).status.code() != Some(0) {
            eprintln!("skipped: cargo-deb is not installed (scripts/test installs it)");
            return None;
        }
        // The binary is <target>/debug/oauth-relay; the package goes beside its target folder.
        let target = Path::new(BIN).parent().and_then(Path::parent).expect("target dir");
        let out = target.join("debian-test");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).expect("create output dir");
        ok(
            Command::new(repo().join("scripts/deb"))
                .args(["--no-build", "--profile", "dev", "--fast", "--output"])
                .arg(&out)
                .env("CARGO_TARGET_DIR", target)
                .current_dir(repo()),
            Duration::from_secs(300),
        );
        let deb = std::fs::read_dir(&out)
            .expect("read output dir")
            .map(|e| e.expect("entry").path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"));
        Some(deb.expect("scripts/deb wrote a .deb"))
    })
    .as_deref()
}

/// The package's files as `dpkg-deb -c` lists them: (mode string, owner, path without `./`).
fn contents(deb: &Path) -> Vec<(String, String, String)> {
    ok(Command::new("dpkg-deb").arg("-c").arg(deb), Duration::from_secs(60))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string(), f[5].trim_start_matches("./").trim_end_matches('/').to_string())
        })
        .collect()
}

#[test]
fn deb_holds_the_binary_unit_config_man_pages_and_completions() {
    let Some(deb) = package() else { return };
    let files = contents(deb);
    let mode = |path: &str| {
        files.iter().find(|(_, _, p)| p == path).map(|(m, o, _)| format!("{m} {o}")).unwrap_or_else(|| {
            panic!(
                "{path} is not in the package:\n{}",
                files.iter().map(|f| f.2.as_str()).collect::<Vec<_>>().join("\n")
            )
        })
    };
    assert_eq!(mode("usr/bin/oauth-relay"), "-rwxr-xr-x 0/0");
    for path in [
        "usr/lib/systemd/system/oauth-relay.service",
        "usr/lib/sysusers.d/oauth-relay.conf",
        "usr/lib/tmpfiles.d/oauth-relay.conf",
        "etc/oauth-relay/config.toml",
        "usr/share/man/man1/oauth-relay.1.gz",
        "usr/share/bash-completion/completions/oauth-relay",
        "usr/share/zsh/vendor-completions/_oauth-relay",
        "usr/share/fish/vendor_completions.d/oauth-relay.fish",
        "usr/share/doc/oauth-relay/changelog.Debian.gz",
        "usr/share/doc/oauth-relay/copyright",
    ] {
        assert_eq!(mode(path), "-rw-r--r-- 0/0", "{path}");
    }
    // A man page for every subcommand an operator types (the generators' hidden ones have none).
    for sub in ["serve", "check", "doctor", "reload", "cert", "cert-status", "cert-renew", "store", "store-copy"] {
        mode(&format!("usr/share/man/man1/oauth-relay-{sub}.1.gz"));
    }
    assert!(!files.iter().any(|(_, _, p)| p.contains("completions.1") || p.ends_with("-man.1.gz")));

    // The files are deploy/'s, byte for byte: what the deploy tests check is what is installed.
    let root = tempfile::tempdir().expect("tempdir");
    ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()), Duration::from_secs(60));
    for (installed, source) in [
        ("usr/lib/systemd/system/oauth-relay.service", "deploy/systemd/oauth-relay.service"),
        ("usr/lib/sysusers.d/oauth-relay.conf", "deploy/systemd/oauth-relay.sysusers"),
        ("usr/lib/tmpfiles.d/oauth-relay.conf", "deploy/systemd/oauth-relay.tmpfile"),
        ("etc/oauth-relay/config.toml", "deploy/systemd/config.toml"),
    ] {
        let a = std::fs::read(root.path().join(installed)).expect("read installed file");
        assert!(a == std::fs::read(repo().join(source)).expect("read source"), "{installed} differs from {source}");
    }
    // The unit starts the binary where the package puts it, on the config where the package puts it.
    let unit = std::fs::read_to_string(root.path().join("usr/lib/systemd/system/oauth-relay.service")).expect("unit");
    assert!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=/usr/bin/oauth-relay serve --config /etc/oauth-relay/config.toml ")),
        "{unit}"
    );

    // The packaged binary accepts the packaged config.
    let bin = root.path().join("usr/bin/oauth-relay");
    let config = root.path().join("etc/oauth-relay/config.toml");
    let out = ok(Command::new(&bin).arg("check").arg("--config").arg(&config), Duration::from_secs(30));
    assert!(out.contains("https://aurinko.example.com/v1/auth/callback"), "{out}");
    let version = ok(Command::new(&bin).arg("--version"), Duration::from_secs(30));
    assert!(version.starts_with(&format!("oauth-relay {} ", env!("CARGO_PKG_VERSION"))), "{version}");

    // Completions know the subcommands; the man page is roff for `oauth-relay`.
    for file in [
        "usr/share/bash-completion/completions/oauth-relay",
        "usr/share/zsh/vendor-completions/_oauth-relay",
        "usr/share/fish/vendor_completions.d/oauth-relay.fish",
    ] {
        let text = std::fs::read_to_string(root.path().join(file)).expect("completion file");
        for sub in ["serve", "check", "doctor", "reload", "cert"] {
            assert!(text.contains(sub), "{file} does not complete `{sub}`");
        }
    }
    let page =
        ok(Command::new("zcat").arg(root.path().join("usr/share/man/man1/oauth-relay.1.gz")), Duration::from_secs(30));
    assert!(page.starts_with(".ie \\n(.g .ds Aq") && page.contains(".TH oauth-relay 1"), "{page}");
}

#[test]
fn deb_maintainer_scripts_create_the_user_and_start_nothing() {
    let Some(deb) = package() else { return };
    let control = tempfile::tempdir().expect("tempdir");
    ok(Command::new("dpkg-deb").arg("-e").arg(deb).arg(control.path()), Duration::from_secs(60));
    let read = |f: &str| std::fs::read_to_string(control.path().join(f)).unwrap_or_default();
    assert_eq!(read("conffiles"), "/etc/oauth-relay/config.toml\n");
    let postinst = read("postinst");
    assert!(postinst.contains("systemd-sysusers ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} oauth-relay.conf"), "{postinst}");
    assert!(postinst.contains("systemctl --system daemon-reload"), "{postinst}");
    // Never enabled or started on install; an upgrade restarts only a relay that was running.
    assert!(!postinst.contains("deb-systemd-invoke start") && !postinst.contains("deb-systemd-invoke restart"));
    // `enable` only where the unit was enabled before (was-enabled), never on a first install.
    assert!(postinst.contains("if deb-systemd-helper --quiet was-enabled oauth-relay.service; then"), "{postinst}");
    assert!(postinst.contains("deb-systemd-invoke try-restart oauth-relay.service"), "{postinst}");
    let depends = read("control").lines().find_map(|l| l.strip_prefix("Depends: ").map(String::from));
    let needs = ["systemd | systemd-standalone-sysusers", "systemd | systemd-standalone-tmpfiles"];
    assert!(depends.as_deref().is_some_and(|d| needs.iter().all(|n| d.contains(n))), "{depends:?}");
}

#[test]
fn deb_has_no_lintian_errors() {
    let Some(deb) = package() else { return };
    if run(Command::new("lintian").arg("--version"), Duration::from_secs(30)).status.code() != Some(0) {
        eprintln!("skipped: lintian is not installed (scripts/test installs it)");
        return;
    }
    let o = run(Command::new("lintian").args(["--fail-on", "error"]).arg(deb), Duration::from_secs(300));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !report.lines().any(|l| l.starts_with("E: ")), "lintian:\n{report}");
}

/// The uid a user has in the `passwd` file of `root`.
fn uid_in(root: &Path, user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user)).then(|| f[2].parse().ok()).flatten()
    })
}

#[test]
fn deb_installs_into_an_empty_root_and_purges_its_store() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(deb) = package() else { return };
    if !nix_root() {
        eprintln!("skipped: installing into a root with dpkg --root needs root (CI runs as root)");
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let admin = root.path().join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("info")).expect("dpkg admin dir");
    std::fs::create_dir_all(admin.join("updates")).expect("dpkg updates dir");
    std::fs::write(admin.join("status"), "").expect("dpkg status");
    // Maintainer scripts run outside a chroot with DPKG_ROOT set, as on an image build; the
    // empty root has no libc6 or systemd package, which the package depends on.
    let dpkg = |args: &[&str]| {
        ok(
            Command::new("dpkg")
                .arg(format!("--root={}", root.path().display()))
                .args(["--force-script-chrootless", "--force-depends", "--log=/dev/null"])
                .args(args),
            Duration::from_secs(120),
        )
    };
    dpkg(&["-i", deb.to_str().expect("utf-8 path")]);

    let uid = uid_in(root.path(), "oauth-relay").expect("postinst created the oauth-relay user");
    let store = std::fs::metadata(root.path().join("var/lib/oauth-relay")).expect("the store exists");
    assert!(store.is_dir());
    assert_eq!(store.permissions().mode() & 0o7777, 0o700, "the store is private");
    assert_eq!((store.uid(), store.gid()), (uid, uid), "the store belongs to oauth-relay");
    // Not enabled: no unit symlink anywhere under etc/systemd.
    assert!(!root.path().join("etc/systemd/system/multi-user.target.wants/oauth-relay.service").exists());

    let bin = root.path().join("usr/bin/oauth-relay");
    let config = root.path().join("etc/oauth-relay/config.toml");
    ok(Command::new(&bin).arg("check").arg("--config").arg(&config), Duration::from_secs(30));

    // Remove keeps the config and the store; purge takes both.
    dpkg(&["--remove", "oauth-relay"]);
    assert!(!bin.exists() && config.exists() && root.path().join("var/lib/oauth-relay").exists());
    dpkg(&["--purge", "oauth-relay"]);
    assert!(!config.exists() && !root.path().join("var/lib/oauth-relay").exists());
}

/// Whether this process runs as root (the `id -u` of the test run).
fn nix_root() -> bool {
    run(Command::new("id").arg("-u"), Duration::from_secs(10)).stdout == b"0\n"
}
