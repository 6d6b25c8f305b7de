//! What the commands print on a successful run: with `--quiet`, nothing on stderr but warnings
//! and errors (no progress, notes or summaries), for every command that takes it; `verify
//! --quiet` prints nothing when the model verifies and its problems when it does not.

mod common;

use common::{mixq, text};

const TRAINED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");
const TEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare-dev.txt");

/// Runs mixq, expects success, returns (stdout, stderr).
fn ok(args: &[&str]) -> (String, String) {
    let o = mixq(args, &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{args:?}: {err}");
    (out, err)
}

#[test]
fn quiet_leaves_stderr_empty_on_success_for_every_command_that_takes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let (m, stats, sens) = (out.to_str().unwrap(), tmp.path().join("stats.safetensors"), tmp.path().join("sens.json"));
    let (stats, sens) = (stats.to_str().unwrap(), sens.to_str().unwrap());
    let card = format!("{m}/README.md");
    let runs: Vec<Vec<&str>> = vec![
        vec!["plan", "--source", TRAINED, "--recipe", "mixed_3_6"],
        vec!["calibrate", "--model", TRAINED, "--text", TEXT, "--max-tokens", "256", "--ctx", "128", "--out", stats],
        vec!["convert", "--source", TRAINED, "--recipe", "mixed_3_6", "--out", m, "--calibration", stats],
        vec!["sensitivity", "--model", TRAINED, "--out", sens],
        vec!["validate", "--model", m, "--reference", TRAINED, "--text", TEXT, "--max-tokens", "200", "--ctx", "64", "--card", &card],
        vec!["run", "--model", m, "--prompt", "ROMEO:", "--max-tokens", "4", "--bench"],
    ];
    for mut args in runs {
        // Each command runs without --quiet first (convert is seen to say something, so the
        // test can fail), then, its output removed, with --quiet: nothing on stderr.
        let (_, chatty) = ok(&args);
        if let Some(i) = args.iter().position(|a| *a == "--out") {
            let written = std::path::Path::new(args[i + 1]);
            if written.is_dir() { std::fs::remove_dir_all(written) } else { std::fs::remove_file(written) }.unwrap();
        }
        if args[0] == "convert" {
            assert!(chatty.contains("convert: "), "convert says what it does without --quiet: {chatty}");
        }
        args.push("--quiet");
        let (_, err) = ok(&args);
        assert!(err.is_empty(), "{args:?} printed on stderr with --quiet:\n{err}\n(without --quiet:\n{chatty})");
    }
    // The model still verifies after validate --card and run --bench: verify --quiet says nothing.
    let (stdout, err) = ok(&["verify", m, "--quiet"]);
    assert!(stdout.is_empty() && err.is_empty(), "{stdout}{err}");
    let (stdout, _) = ok(&["verify", m]);
    assert!(stdout.contains("OK"), "{stdout}");
    // A model that does not verify: --quiet still names the problem.
    std::fs::write(out.join("README.md"), "edited").unwrap();
    let o = mixq(&["verify", m, "--quiet"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).0.contains("README.md: size"), "{}", text(&o).0);
}
