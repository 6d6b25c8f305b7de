//! Faults during `mixq convert`, end to end: SIGKILL at each crash point and at arbitrary moments,
//! `--resume`, a full disk (a small tmpfs in a private mount namespace), a source that changes
//! under the conversion, and two conversions racing for one output.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{entries, mixq, synth, text};

const RECIPE: &str = "gpt-oss-120b-3.6bit";
/// Small shards, so a conversion has many to finish, journal and resume.
const SHARD_BYTES: &str = "200000";

fn convert_args<'a>(src: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["convert", "--source", src, "--recipe", RECIPE, "--out", out, "--max-shard-bytes", SHARD_BYTES, "--threads", "1"];
    a.extend_from_slice(extra);
    a
}

fn convert(src: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    mixq(&convert_args(src.to_str().unwrap(), out.to_str().unwrap(), extra), env)
}

fn spawn_convert(src: &Path, out: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mixq"))
        .args(convert_args(src.to_str().unwrap(), out.to_str().unwrap(), extra))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mixq starts")
}

/// Every file of two output folders, byte for byte (the folders have the same name, so the card
/// and manifest must match too).
fn assert_same_output(a: &Path, b: &Path) {
    assert_eq!(entries(a), entries(b), "{} and {} hold different files", a.display(), b.display());
    for name in entries(a) {
        let (x, y) = (std::fs::read(a.join(&name)).unwrap(), std::fs::read(b.join(&name)).unwrap());
        assert!(x == y, "{name} differs between {} and {}", a.display(), b.display());
    }
}

fn verify_ok(dir: &Path) {
    let o = mixq(&["verify", dir.to_str().unwrap()], &[]);
    assert!(o.status.success(), "verify {}: {:?}", dir.display(), text(&o));
}

/// Nothing at `out`, and nothing visible beside it: only the hidden lock and partial folder.
fn assert_no_model(out: &Path) {
    assert!(!out.exists(), "{} exists after a failed conversion", out.display());
    let visible: Vec<String> = entries(out.parent().unwrap()).into_iter().filter(|n| !n.starts_with('.')).collect();
    assert!(visible.is_empty(), "a failed conversion left {visible:?} beside {}", out.display());
}

/// A source, and the reference conversion at `ref/o`, made without faults.
struct Case {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    src: PathBuf,
    reference: PathBuf,
}

fn case(bigger: bool) -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let src = synth(&root.join("src"), "small", |s| {
        if bigger {
            // About 100 MB: a conversion on one thread lasts long enough to interfere with.
            (s.hidden, s.intermediate, s.experts, s.layers, s.shards) = (1024, 1024, 16, 4, 3);
        }
    });
    let reference = root.join("ref/o");
    std::fs::create_dir_all(reference.parent().unwrap()).unwrap();
    let o = convert(&src, &reference, &["--quiet"], &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    Case { _tmp: tmp, root, src, reference }
}

fn run_dir(c: &Case, name: &str) -> PathBuf {
    let d = c.root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d.join("o")
}

#[test]
fn sigkill_at_every_crash_point_leaves_no_model_and_the_rerun_cleans_up() {
    let c = case(false);
    for point in ["headers", "chunk:7", "shard:2", "manifest", "rename"] {
        let out = run_dir(&c, &format!("kill-{}", point.replace(':', "-")));
        let o = convert(&c.src, &out, &["--quiet"], &[("MIXQ_FAULT", point)]);
        assert_eq!(o.status.signal(), Some(libc::SIGKILL), "{point}: {:?}", text(&o));
        assert_no_model(&out);
        let partial = out.with_file_name(".o.mixq-partial");
        assert!(partial.is_dir(), "{point}: the partial folder stays after SIGKILL");

        let o = convert(&c.src, &out, &["--quiet"], &[]);
        let (_, err) = text(&o);
        assert!(o.status.success(), "{point}: rerun failed: {err}");
        assert!(err.contains("removed") && err.contains(".o.mixq-partial") && err.contains("interrupted"), "{point}: {err}");
        assert!(!partial.exists(), "{point}: stale partial folder left");
        assert_eq!(entries(out.parent().unwrap()), ["o"], "{point}: no lock file or partial folder is left");
        assert_same_output(&out, &c.reference);
        verify_ok(&out);
    }
}

#[test]
fn resume_keeps_verified_shards_writes_the_rest_and_is_byte_identical() {
    let c = case(false);
    let out = run_dir(&c, "resume");
    let o = convert(&c.src, &out, &["--quiet"], &[("MIXQ_FAULT", "shard:4")]);
    assert_eq!(o.status.signal(), Some(libc::SIGKILL));
    let partial = out.with_file_name(".o.mixq-partial");
    let first = partial.join("model-00001-of-00010.safetensors");
    let kept_at = std::fs::metadata(&first).expect("first shard finished").modified().unwrap();

    // Another recipe or a touched source is refused, naming what differs; the partial stays.
    let o = mixq(
        &["convert", "--source", c.src.to_str().unwrap(), "--recipe", "mixed_3_6", "--out", out.to_str().unwrap(), "--max-shard-bytes", SHARD_BYTES, "--resume"],
        &[],
    );
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("cannot resume") && err.contains("different recipe"), "{err}");
    assert!(partial.is_dir());

    // Damage one kept shard: it is re-hashed, found wrong and written again.
    let damaged = partial.join("model-00003-of-00010.safetensors");
    let mut bytes = std::fs::read(&damaged).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x40;
    std::fs::write(&damaged, bytes).unwrap();

    let o = convert(&c.src, &out, &["--resume", "--json"], &[]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming: kept 3 of 10 shard(s)") && err.contains("model-00003-of-00010.safetensors"), "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["kept_shards"], 3);
    assert_eq!(std::fs::metadata(out.join("model-00001-of-00010.safetensors")).unwrap().modified().unwrap(), kept_at, "a kept shard was rewritten");
    assert_same_output(&out, &c.reference);
    verify_ok(&out);

    // A touched source cannot be resumed from.
    let out = run_dir(&c, "touched");
    let o = convert(&c.src, &out, &["--quiet"], &[("MIXQ_FAULT", "shard:2")]);
    assert_eq!(o.status.signal(), Some(libc::SIGKILL));
    let config = c.src.join("config.json");
    let f = std::fs::File::options().append(true).open(&config).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    let o = convert(&c.src, &out, &["--resume"], &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("different source"), "{err}");
    // Without --resume it starts over.
    let o = convert(&c.src, &out, &["--quiet"], &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    verify_ok(&out);
}

/// Polls until `cond` or a minute passes.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigkill_from_outside_at_arbitrary_moments_then_resume() {
    let c = case(true);
    let out = run_dir(&c, "outside");
    let partial = out.with_file_name(".o.mixq-partial");
    // Kill after the partial folder appears plus a growing delay, resuming each time.
    let mut kills = 0;
    for (i, delay_ms) in [0u64, 1, 3, 10, 60, 150, 400, 700].into_iter().enumerate() {
        let extra: &[&str] = if i == 0 { &["--quiet"] } else { &["--quiet", "--resume"] };
        let mut child = spawn_convert(&c.src, &out, extra);
        wait_for("the partial folder", || partial.is_dir() || out.is_dir());
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            break;
        }
        kills += 1;
        assert_no_model(&out);
    }
    assert!(kills >= 2, "the conversion finished before it could be killed twice");
    let o = convert(&c.src, &out, &["--resume", "--quiet"], &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_same_output(&out, &c.reference);
    verify_ok(&out);
}

#[test]
fn two_converts_to_one_output_one_wins_the_other_says_why() {
    let c = case(true);
    let out = run_dir(&c, "race");
    let mut first = spawn_convert(&c.src, &out, &["--quiet"]);
    wait_for("the lock", || out.with_file_name(".o.mixq-lock").exists() || out.exists());
    let o = convert(&c.src, &out, &["--quiet"], &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success(), "the second convert must not run");
    assert!(
        err.contains("another mixq convert") && err.contains(&format!("process {}", first.id())),
        "the refusal names the holder: {err}"
    );
    assert!(first.wait().unwrap().success());
    assert_same_output(&out, &c.reference);
    // Once the first is done the output exists, and a third is refused as usual (no --force).
    let o = convert(&c.src, &out, &["--quiet"], &[]);
    assert!(text(&o).1.contains("pass --force"), "{:?}", text(&o));
}

#[test]
fn a_source_truncated_or_changed_mid_conversion_is_never_converted() {
    let c = case(true);
    let out = run_dir(&c, "changed");
    let shards: Vec<PathBuf> =
        entries(&c.src).into_iter().filter(|n| n.ends_with(".safetensors")).map(|n| c.src.join(n)).collect();
    let last = shards.last().unwrap().clone();
    let saved = std::fs::read(&last).unwrap();
    let child = spawn_convert(&c.src, &out, &[]);
    wait_for("the partial folder", || out.with_file_name(".o.mixq-partial").is_dir());
    let f = std::fs::File::options().write(true).open(&last).unwrap();
    f.set_len(saved.len() as u64 / 2).unwrap();
    drop(f);
    let o = child.wait_with_output().unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success(), "a truncated source was converted: {err}");
    // Either the stamp check between tensors or the SIGBUS of a read past the new end catches it.
    assert!(
        (err.contains("the source changed while converting") && err.contains("its size went from"))
            || err.contains("truncated or replaced while mixq was reading it"),
        "{err}"
    );
    assert_no_model(&out);
    std::fs::write(&last, &saved).unwrap();
}

/// Runs `script` as root of a private mount namespace (so it may mount a tmpfs), or None where
/// unprivileged namespaces are not allowed.
fn in_mount_namespace(script: &str, env: &[(&str, &str)]) -> Option<Output> {
    let probe = Command::new("unshare").args(["-rm", "true"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        assert!(std::env::var_os("CI").is_none(), "CI must be able to run `unshare -rm` for the disk-full tests");
        eprintln!("skipping: `unshare -rm` is not permitted here");
        return None;
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["-rm", "sh", "-c", script]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Some(cmd.output().expect("unshare runs"))
}

#[test]
fn a_full_disk_is_refused_up_front_or_reported_mid_write_and_resume_finishes_after_space_is_freed() {
    let c = case(false);
    let mnt = c.root.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let bin = env!("CARGO_BIN_EXE_mixq");
    // 1 MiB cannot hold the 1.7 MB model: refused before writing, naming the output and bytes.
    // With the check skipped, the write fails with ENOSPC part-way; the finished shards stay, and
    // once the tmpfs is grown, --resume completes it.
    let script = r#"
set -u
mount -t tmpfs -o size=1m none "$MNT" || exit 90
conv() { "$BIN" convert --source "$SRC" --recipe gpt-oss-120b-3.6bit --out "$MNT/o" --max-shard-bytes 200000 --threads 1 "$@"; }
conv --quiet; echo "preflight_rc=$?"
ls -A "$MNT" | sed 's/^/after_preflight: /'
conv --quiet --no-space-check; echo "midwrite_rc=$?"
ls -A "$MNT" | sed 's/^/after_midwrite: /'
mount -o remount,size=8m "$MNT" || exit 91
conv --resume; echo "resume_rc=$?"
cp -r "$MNT/o" "$KEEP"
"#;
    let keep = c.root.join("kept/o");
    std::fs::create_dir_all(keep.parent().unwrap()).unwrap();
    let env = [
        ("MNT", mnt.to_str().unwrap()),
        ("BIN", bin),
        ("SRC", c.src.to_str().unwrap()),
        ("KEEP", keep.to_str().unwrap()),
    ];
    let Some(o) = in_mount_namespace(script, &env) else { return };
    let (stdout, err) = text(&o);
    let all = format!("{stdout}\n{err}");
    assert!(o.status.success(), "{all}");
    assert!(stdout.contains("preflight_rc=1"), "{all}");
    assert!(
        err.contains(&format!("{}/o: not enough free space: the conversion needs", mnt.display())) && err.contains("bytes ("),
        "{all}"
    );
    assert!(!stdout.contains("after_preflight:"), "the refused conversion left files: {all}");
    assert!(stdout.contains("midwrite_rc=1"), "{all}");
    assert!(err.contains("out of space while writing") && err.contains("No space left on device") && err.contains("in all"), "{all}");
    assert!(stdout.contains("after_midwrite: .o.mixq-partial") && !stdout.contains("after_midwrite: o\n"), "{all}");
    assert!(err.contains("rerun with --resume"), "{all}");
    assert!(stdout.contains("resume_rc=0") && err.contains("resuming: kept"), "{all}");
    assert_same_output(&keep, &c.reference);
    verify_ok(&keep);
}
