//! `mixq validate`: perplexity, KL against a reference, gates, saved references, model cards.

mod common;

use common::{mixq, text};
use serde_json::Value;

const TRAINED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");
const TEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare-dev.txt");

fn validate(args: &[&str]) -> (Option<i32>, Value, String) {
    let mut all = vec!["validate", "--text", TEXT, "--ctx", "128", "--json"];
    all.extend_from_slice(args);
    let o = mixq(&all, &[]);
    let (stdout, stderr) = text(&o);
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (o.status.code(), v, stderr)
}

fn convert(recipe: &str, out: &std::path::Path) {
    let o = mixq(&["convert", "--source", TRAINED, "--recipe", recipe, "--out", out.to_str().unwrap(), "--quiet"], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
}

#[test]
fn a_model_against_itself_has_zero_kl_and_full_agreement() {
    let (code, v, e) = validate(&["--model", TRAINED, "--reference", TRAINED, "--max-tokens", "600"]);
    assert_eq!(code, Some(0), "{e}");
    let r = &v["reference"];
    assert_eq!(r["kl_mean"].as_f64(), Some(0.0));
    assert_eq!(r["kl_max"].as_f64(), Some(0.0));
    assert_eq!(r["top1"].as_f64(), Some(1.0));
    assert_eq!(r["ppl_ratio"].as_f64(), Some(1.0));
    assert_eq!(v["ppl"], r["ppl"]);
    assert_eq!(v["tokens"], 600 - 5, "windows of 128 leave the first token of each unscored");
}

#[test]
fn kl_orders_the_recipes() {
    let tmp = tempfile::tempdir().unwrap();
    let uniform = tmp.path().join("uniform-3bit.yaml");
    std::fs::write(
        &uniform,
        "name: uniform-3bit\nrules:\n  - class: [norm, bias, sinks]\n    action: keep\n  - class: [embed_tokens, lm_head, attention, router, experts]\n    action: {affine: {bits: 3, group_size: 64}}\n",
    )
    .unwrap();
    let mut kl = Vec::new();
    for recipe in [uniform.to_str().unwrap(), "gpt-oss-120b-3.6bit", "mxfp4-experts"] {
        let out = tmp.path().join(recipe.replace('/', "_"));
        convert(recipe, &out);
        let (code, v, e) = validate(&["--model", out.to_str().unwrap(), "--reference", TRAINED, "--max-tokens", "2048"]);
        assert_eq!(code, Some(0), "{e}");
        kl.push(v["reference"]["kl_mean"].as_f64().unwrap());
    }
    assert!(kl[0] > kl[1] && kl[1] > kl[2], "uniform 3-bit > 3.6-bit > mxfp4-experts expected, got {kl:?}");
    assert!(kl[2] > 0.0);
}

#[test]
fn gates_fail_with_the_measured_value() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    convert("mixed_3_6", &out);
    let m = out.to_str().unwrap();
    let (code, v, e) =
        validate(&["--model", m, "--reference", TRAINED, "--max-tokens", "400", "--max-kl", "0.000001", "--min-top1", "0.5"]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("gate failed: --max-kl 0.000001: mean KL is"), "{e}");
    assert!(!e.contains("--min-top1"), "the passing gate is not reported: {e}");
    assert_eq!(v["gates_failed"].as_array().unwrap().len(), 1);
    let (code, _, e) = validate(&["--model", m, "--reference", TRAINED, "--max-tokens", "400", "--max-ppl-ratio", "2", "--min-top1", "0.5"]);
    assert_eq!(code, Some(0), "{e}");
    let (code, _, e) = validate(&["--model", m, "--max-tokens", "400", "--max-kl", "1"]);
    assert_eq!(code, Some(1));
    assert!(e.contains("gates need a reference"), "{e}");
}

#[test]
fn saved_reference_logits_are_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    convert("gpt-oss-120b-3.6bit", &out);
    let saved = tmp.path().join("ref.bin");
    let (code, _, e) = validate(&["--model", TRAINED, "--max-tokens", "500", "--save-reference", saved.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{e}");
    let (_, exact, _) = validate(&["--model", out.to_str().unwrap(), "--reference", TRAINED, "--max-tokens", "500"]);
    let (code, approx, e) =
        validate(&["--model", out.to_str().unwrap(), "--reference-logits", saved.to_str().unwrap(), "--max-tokens", "500"]);
    assert_eq!(code, Some(0), "{e}");
    let (a, b) = (&exact["reference"], &approx["reference"]);
    assert_eq!(b["kl_method"], "top-k");
    assert!((a["ppl"].as_f64().unwrap() - b["ppl"].as_f64().unwrap()).abs() < 1e-3, "{a} {b}");
    assert_eq!(a["top1"], b["top1"]);
    let (ka, kb) = (a["kl_mean"].as_f64().unwrap(), b["kl_mean"].as_f64().unwrap());
    assert!(kb <= ka * 1.001 && kb > ka * 0.8, "top-32 KL {kb} vs exact {ka}");
    // The same file against other windows is refused, naming it.
    let (code, _, e) =
        validate(&["--model", out.to_str().unwrap(), "--reference-logits", saved.to_str().unwrap(), "--max-tokens", "400"]);
    assert_eq!(code, Some(1));
    assert!(e.contains("ref.bin: saved for other text: its 496 scored tokens came from another --text, --max-tokens or tokenizer"), "{e}");
    let (code, _, e) = validate(&[
        "--model", out.to_str().unwrap(), "--reference-logits", saved.to_str().unwrap(), "--max-tokens", "500", "--stride", "64",
    ]);
    assert_eq!(code, Some(1));
    assert!(e.contains("ref.bin: saved with windows of 128 tokens advancing by 128, but this run has --ctx 128 --stride 64"), "{e}");
}

#[test]
fn save_reference_caps_top_k_at_the_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let saved = tmp.path().join("r.bin");
    let (code, v, e) = validate(&["--model", TRAINED, "--max-tokens", "300", "--top-k", "999999", "--save-reference", saved.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{e}");
    let (header, tokens) = mixq_validate::reference::read(&saved).unwrap();
    assert_eq!((header.top_k, header.vocab), (2048, Some(2048)));
    assert_eq!(tokens.len() as u64, v["tokens"].as_u64().unwrap());
    let size = std::fs::metadata(&saved).unwrap().len();
    assert!(size <= mixq_validate::reference::file_bytes(tokens.len(), 2048, TRAINED.len()), "{size}");
}

#[test]
fn paths_gates_and_flags_are_checked_before_any_token_is_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let nodir = tmp.path().join("nodir/card.md");
    // --json prints the figures after scoring: no JSON means nothing was scored.
    for (args, want) in [
        (vec!["--card", nodir.to_str().unwrap()], "nodir/card.md: --card's folder"),
        (vec!["--save-reference", tmp.path().to_str().unwrap()], ": --save-reference names a folder; expected a file path"),
        (vec!["--max-kl", "0.02"], "gates need a reference (--reference or --reference-logits)"),
        (vec!["--reference", TRAINED, "--min-top1", "92"], "--min-top1 92: expected a fraction from 0 to 1 (0.9 = 90%)"),
        (vec!["--reference", TRAINED, "--max-kl", "-1"], "--max-kl -1: expected a mean KL of 0 or more"),
        (vec!["--top-k", "0", "--save-reference", "/tmp/never.bin"], "--top-k 0: expected at least 1"),
    ] {
        let mut all = vec!["--model", TRAINED, "--max-tokens", "300"];
        all.extend(args);
        let (code, v, e) = validate(&all);
        assert_eq!(code, Some(1), "{e}");
        assert!(e.contains(want), "want {want:?}: {e}");
        assert_eq!(v, Value::Null, "nothing was evaluated");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    assert!(!nodir.parent().unwrap().exists());
}

#[test]
fn passing_gates_say_so_and_the_figures_come_before_failing_ones() {
    let o = mixq(
        &["validate", "--model", TRAINED, "--reference", TRAINED, "--text", TEXT, "--ctx", "64", "--max-tokens", "200", "--min-top1", "0.99", "--max-kl", "0.001", "--threads", "1"],
        &[],
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("KL mean"), "{stdout}");
    assert!(stderr.contains("gates passed: --max-kl 0.001: mean KL is 0.000000; --min-top1 0.99: top-1 agreement is 1.00000"), "{stderr}");
    let o = mixq(
        &["validate", "--model", TRAINED, "--reference", TRAINED, "--text", TEXT, "--ctx", "64", "--max-tokens", "200", "--max-ppl-ratio", "0.5", "--quiet"],
        &[],
    );
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout.contains("PPL ratio"), "the figures are printed although a gate fails: {stdout}");
    assert_eq!(stderr.trim(), "gate failed: --max-ppl-ratio 0.5: PPL ratio is 1.00000");
}

#[test]
fn card_gets_a_validation_section() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    convert("mxfp4-experts", &out);
    let card = out.join("README.md");
    for _ in 0..2 {
        let (code, _, e) =
            validate(&["--model", out.to_str().unwrap(), "--reference", TRAINED, "--max-tokens", "300", "--card", card.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{e}");
    }
    let md = std::fs::read_to_string(&card).unwrap();
    assert_eq!(md.matches("## Validation").count(), 1, "{md}");
    assert!(md.contains("shakespeare-dev.txt") && md.contains("| KL mean |") && md.contains("mixq "), "{md}");
    assert!(md.contains("## Use with mlx"), "the rest of the card is kept");
    // The manifest's entry follows the card, so the finished model still verifies.
    let o = mixq(&["verify", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o).0);
}

#[test]
fn human_table_and_bad_arguments() {
    let o = mixq(&["validate", "--model", TRAINED, "--text", TEXT, "--ctx", "64", "--max-tokens", "200", "--quiet"], &[]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("perplexity") && stdout.contains("±"), "{stdout}");
    let o = mixq(&["validate", "--model", TRAINED, "--text", TEXT, "--ctx", "64", "--stride", "100"], &[]);
    assert!(text(&o).1.contains("--stride between 1 and --ctx"), "{}", text(&o).1);
}

#[test]
fn run_and_validate_bench_fill_one_speed_table_in_the_card_and_the_model_still_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    convert("mxfp4-experts", &out);
    let dir = out.to_str().unwrap();
    for _ in 0..2 {
        let o = mixq(&["run", "--model", dir, "--prompt", "ROMEO:", "--max-tokens", "8", "--backend", "cpu", "--bench", "--quiet"], &[]);
        assert!(o.status.success(), "{}", text(&o).1);
        let (code, v, e) = validate(&["--model", dir, "--reference", TRAINED, "--max-tokens", "300", "--backend", "cpu", "--bench"]);
        assert_eq!(code, Some(0), "{e}");
        assert!(v["tokens"].as_u64().unwrap() > 0, "{v}");
    }
    let md = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert_eq!(md.matches("## Speed and memory").count(), 1, "{md}");
    assert!(md.contains("| measured | backend | tokens | tokens/s | weights read | peak memory | GPU memory |"), "{md}");
    // One row per measurement, the latest of each: prefill, decode and validate.
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| `mixq ")).collect();
    assert_eq!(rows.len(), 3, "{md}");
    assert!(rows[0].starts_with("| `mixq run` prefill | cpu") || rows[0].starts_with("| `mixq validate`"), "{md}");
    let decode = rows.iter().find(|r| r.starts_with("| `mixq run` decode | cpu")).expect("a decode row");
    assert!(decode.contains(" | 8 | ") && decode.contains(" GB/s | ") && decode.contains(" MiB |"), "{decode}");
    let scored = rows.iter().find(|r| r.starts_with("| `mixq validate` (windows of 128, with the reference model's time) | cpu")).expect("a validate row");
    assert!(scored.contains(" | - | ") && scored.contains(" MiB |"), "{scored}");
    let o = mixq(&["verify", dir], &[]);
    assert!(o.status.success(), "{}", text(&o).0);
}
