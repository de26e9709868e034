//! The library never changes what a call returns: the same C program (pipes, files, bad fds,
//! a refused connect, every socket call family, errno across tracked calls) prints the same
//! lines with and without the library, with and without a table; musl and static programs
//! run unharmed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{apps_dir, have, library, TableFile};

/// Compiles tests/apps/harmless.c with `compiler` and `flags` into `dir`.
fn build(dir: &Path, compiler: &str, flags: &[&str], name: &str) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new(compiler)
        .args(flags)
        .arg("-O1")
        .arg("-o")
        .arg(&out)
        .arg(apps_dir().join("harmless.c"))
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "{compiler} {flags:?} failed");
    out
}

/// Runs `prog` with `LD_PRELOAD` (if given) and `TRACECAR_CAUSAL_TABLE`.
fn run(prog: &Path, preload: Option<&str>, table: &Path, scratch: &Path) -> Output {
    let mut c = Command::new(prog);
    c.arg(scratch.join("file"))
        .env("TRACECAR_CAUSAL_TABLE", table);
    match preload {
        Some(p) => c.env("LD_PRELOAD", p),
        None => c.env_remove("LD_PRELOAD"),
    };
    c.output().expect("run the program")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The program's output without the library, checked to be complete.
fn baseline(prog: &Path, table: &Path, scratch: &Path) -> String {
    let o = run(prog, None, table, scratch);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.ends_with("done\n"), "{out}");
    assert!(out.contains("connect closed port = -1 errno=111"), "{out}");
    assert!(
        out.contains("errno kept across a tracked read: 4321 1"),
        "{out}"
    );
    out
}

/// `dir/<platform>/libtracecar_preload.so` links for the platforms glibc may name, and the
/// `LD_PRELOAD` value that only glibc expands (`$PLATFORM`); musl leaves it as it is, finds
/// no such file and ignores it.
fn platform_preload(dir: &Path) -> String {
    for platform in ["x86_64", "haswell", "xeon_phi", "aarch64"] {
        let d = dir.join(platform);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(library(), d.join("libtracecar_preload.so")).unwrap();
    }
    format!("{}/$PLATFORM/libtracecar_preload.so", dir.display())
}

#[test]
fn glibc_program_sees_identical_results_with_and_without_the_library() {
    let scratch = tempfile::tempdir().unwrap();
    let prog = build(scratch.path(), "cc", &[], "harmless");
    let table = TableFile::new();
    let lib = library().display().to_string();
    let want = baseline(&prog, &table.path(), scratch.path());
    assert_eq!(table.table.entries().count(), 0);

    let missing = scratch.path().join("no-table");
    let o = run(&prog, Some(&lib), &missing, scratch.path());
    assert!(o.status.success());
    assert_eq!(stdout(&o), want, "library, no table");
    assert!(o.stderr.is_empty(), "nothing printed: {:?}", o.stderr);

    let o = run(&prog, Some(&lib), &table.path(), scratch.path());
    assert!(o.status.success());
    assert_eq!(stdout(&o), want, "library and table");
    assert!(o.stderr.is_empty(), "nothing printed: {:?}", o.stderr);
    // It was active: the program's loopback connections were published (with no known cause:
    // the connecting thread had read no inbound connection).
    let published: Vec<_> = table.table.entries().collect();
    assert!(published.len() >= 2, "{published:?}");
    assert!(published.iter().all(|(_, cause, _, _)| *cause == 0));

    // Fortified builds call __read_chk and friends instead.
    let fortified = build(
        scratch.path(),
        "cc",
        &["-D_FORTIFY_SOURCE=2"],
        "harmless-fortified",
    );
    let o = run(&fortified, Some(&lib), &table.path(), scratch.path());
    assert_eq!(stdout(&o), want, "fortified, library and table");

    let via_platform = platform_preload(scratch.path());
    let before = table.table.entries().map(|e| e.3).sum::<u32>();
    let o = run(&prog, Some(&via_platform), &table.path(), scratch.path());
    assert_eq!(stdout(&o), want, "LD_PRELOAD through $PLATFORM");
    let after = table.table.entries().map(|e| e.3).sum::<u32>();
    assert!(
        after > before,
        "glibc expanded $PLATFORM and loaded the library"
    );
}

#[test]
fn musl_program_is_unharmed() {
    if !have("musl-gcc") {
        eprintln!("SKIPPED: no musl-gcc (apt-get install musl-tools)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let prog = build(scratch.path(), "musl-gcc", &[], "harmless-musl");
    let table = TableFile::new();
    let want = baseline(&prog, &table.path(), scratch.path());

    // The form the injector sets: musl does not expand $PLATFORM, so it finds no file and
    // ignores the entry; the program runs exactly as without it.
    let via_platform = platform_preload(scratch.path());
    let o = run(&prog, Some(&via_platform), &table.path(), scratch.path());
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), want);
    assert!(
        o.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(table.table.entries().count(), 0);

    // A plain path is not harmless: musl's loader tries to load the glibc library, cannot
    // satisfy its dependencies (libgcc_s.so.1, ld-linux-x86-64.so.2, the unwinder's
    // symbols) and ends the program with status 127 before main. Recorded, not required.
    let lib = library().display().to_string();
    let o = run(&prog, Some(&lib), &table.path(), scratch.path());
    eprintln!(
        "musl with a plain LD_PRELOAD path: {:?}, stdout {} bytes, stderr: {}",
        o.status.code(),
        o.stdout.len(),
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .next()
            .unwrap_or("")
    );
}

#[test]
fn static_program_is_unharmed() {
    let scratch = tempfile::tempdir().unwrap();
    let built = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(scratch.path().join("harmless-static"))
        .arg(apps_dir().join("harmless.c"))
        .status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: no static libc to link with");
        return;
    }
    let prog = scratch.path().join("harmless-static");
    let table = TableFile::new();
    let want = baseline(&prog, &table.path(), scratch.path());
    let lib = library().display().to_string();
    for preload in [lib, platform_preload(scratch.path())] {
        let o = run(&prog, Some(&preload), &table.path(), scratch.path());
        assert!(o.status.success());
        assert_eq!(stdout(&o), want);
        assert!(o.stderr.is_empty());
    }
    assert_eq!(
        table.table.entries().count(),
        0,
        "a static program ignores LD_PRELOAD"
    );
}
