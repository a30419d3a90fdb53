//! Release builds hand the linker scripts/symbol-order.txt, the functions a running relay
//! executes, so that they sit next to each other instead of scattered through the binary; the
//! profile-optimised build (scripts/build-pgo, `-Cprofile-use`) inlines differently and gets
//! scripts/symbol-order-pgo.txt, made from such a build. The
//! kernel maps code in 64 KiB chunks around each page that runs, so scattered code is resident
//! code: this keeps an idle relay's RSS near what it actually runs (docs/performance.md).
//!
//! Only where the linker is known to read such a file: rustc's own lld, the default for
//! x86_64-unknown-linux-gnu since Rust 1.90, and no linker chosen by the user. Elsewhere the
//! build is the same, only laid out in the compiler's order.

use std::env;
use std::path::Path;
use std::process::Command;

const ORDER_FILE: &str = "scripts/symbol-order.txt";
const PGO_ORDER_FILE: &str = "scripts/symbol-order-pgo.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-changed={PGO_ORDER_FILE}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    if env::var("PROFILE").as_deref() != Ok("release") || !linker_is_rust_lld() {
        return;
    }
    let pgo = env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|f| f.contains("profile-use"));
    let file = if pgo { PGO_ORDER_FILE } else { ORDER_FILE };
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join(file);
    if glibc_has_relr() {
        // Relative relocations packed (DT_RELR): 3 KiB for ld.so to read at start instead of
        // the 330 KiB of .rela.dyn every position-independent Rust binary otherwise carries.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if order.is_file() {
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", order.display());
        // Names the build no longer has (a changed dependency) are skipped, not errors.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// rustc links x86_64-unknown-linux-gnu with its bundled lld from 1.90 on, unless told to use
/// another linker (by environment or by flags, which cargo passes on here).
fn linker_is_rust_lld() -> bool {
    if env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
        || env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
        || env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|f| f.contains("link"))
    {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let minor = version.split_whitespace().nth(1).and_then(|v| v.split('.').nth(1)).and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}

/// glibc reads packed relocations from 2.36 on, and the binary then needs it: only when the
/// glibc it is built against (the one on this machine) has them too.
fn glibc_has_relr() -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    // "glibc 2.36"
    let version = String::from_utf8_lossy(&out.stdout);
    let mut parts = version.trim().trim_start_matches("glibc ").split('.');
    let major = parts.next().and_then(|m| m.parse::<u32>().ok());
    let minor = parts.next().and_then(|m| m.parse::<u32>().ok());
    matches!((major, minor), (Some(2), Some(m)) if m >= 36) || major.is_some_and(|m| m > 2)
}
