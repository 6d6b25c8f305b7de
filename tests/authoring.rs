//! Recipe authoring end to end: sensitivity on the bundled model, a searched recipe against the
//! hand-written one on held-out text, determinism, a too-small target, the 120b shape.

mod common;

use std::path::Path;

use common::{mixq, text};
use serde_json::Value;

const TRAINED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");
const CONFIG_120B: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt-oss-120b/config.json");

fn run(args: &[&str]) -> String {
    let o = mixq(args, &[]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "mixq {args:?} failed:\n{stderr}");
    stdout
}

fn run_json(args: &[&str]) -> Value {
    let out = run(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}


fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn searched_recipe_beats_the_hand_written_one_on_held_out_text() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (search_text, held_out) = common::dev_text_halves(dir, "search.txt", "held-out.txt");
    let stats = dir.join("stats.safetensors");
    run(&["calibrate", "--model", TRAINED, "--text", s(&search_text), "--max-tokens", "8192", "--out", s(&stats), "--quiet"]);
    let sens = dir.join("sens.json");
    let v = run_json(&[
        "sensitivity", "--model", TRAINED, "--text", s(&search_text), "--calibration", s(&stats), "--tokens", "2048",
        "--bits", "3,4,5,6,8", "--group-sizes", "64,128", "--out", s(&sens), "--json",
    ]);
    assert_eq!(v["units"], 50, "8 classes x 6 layers + embed_tokens + lm_head");
    assert_eq!(v["cost"], "kl");
    assert!(v["rank_correlation"].is_number());
    // The cheap path: no text measured, the model's own 1,024 tokens probe it.
    let cheap = dir.join("cheap.json");
    let v = run_json(&[
        "sensitivity", "--model", TRAINED, "--calibration", s(&stats), "--bits", "3,4,5,6,8", "--group-sizes", "64,128", "--out",
        s(&cheap), "--json",
    ]);
    assert_eq!(v["cost"], "estimate");

    // The hand-written recipe's conversion's size on disk.
    let plan = run_json(&["plan", "--source", TRAINED, "--recipe", "gpt-oss-120b-3.6bit", "--json"]);
    let hand_bytes = plan["on_disk"]["bytes"].as_u64().expect("plan bytes on disk");
    let search = |sens: &Path, name: &str, extra: &[&str]| {
        let recipe = dir.join(name);
        let mut args = vec!["recipe", "search", "--sensitivity", s(sens), "--source", TRAINED, "--target-size"];
        let target = hand_bytes.to_string();
        args.extend([target.as_str(), "--out", s(&recipe), "--json"]);
        args.extend_from_slice(extra);
        let found = run_json(&args);
        assert!(found["on_disk"]["bytes"].as_u64().unwrap() <= hand_bytes);
        let planned = run_json(&["plan", "--source", TRAINED, "--recipe", s(&recipe), "--json"]);
        assert_eq!(planned["total"]["bytes"], found["bytes"], "mixq plan agrees with the search");
        assert_eq!(planned["on_disk"], found["on_disk"], "mixq plan agrees with the search");
        (recipe.clone(), std::fs::read_to_string(&recipe).unwrap())
    };
    let (measured, measured_yaml) = search(&sens, "searched.yaml", &[]);
    let (affine, affine_yaml) = search(&sens, "affine.yaml", &["--affine-only"]);
    let (estimated, _) = search(&cheap, "cheap.yaml", &[]);
    // Upstream experts kept in mxfp4 pass through exactly at 4.25 bits per weight, which the
    // search prefers to any affine setting of their size.
    assert!(measured_yaml.contains("action: mxfp4"), "{measured_yaml}");
    assert!(!affine_yaml.contains("mxfp4"), "{affine_yaml}");

    let kl = |recipe: &str, name: &str| {
        let out = dir.join(name);
        run(&["convert", "--source", TRAINED, "--recipe", recipe, "--out", s(&out), "--calibration", s(&stats), "--quiet"]);
        let v = run_json(&[
            "validate", "--model", s(&out), "--reference", TRAINED, "--text", s(&held_out), "--ctx", "512", "--max-tokens", "8192",
            "--quiet", "--json",
        ]);
        v["reference"]["kl_mean"].as_f64().unwrap()
    };
    let hand = kl("gpt-oss-120b-3.6bit", "hand");
    let [searched, affine_only, cheap] = [(&measured, "searched"), (&affine, "affine"), (&estimated, "cheap")].map(|(r, n)| kl(s(r), n) / hand);
    eprintln!("held-out KL / hand-written {hand:.5}: searched {searched:.3}x, affine only {affine_only:.3}x, cheap path {cheap:.3}x");
    // Measured here: 0.711x, 0.838x and 0.714x (README: 0.70x, 0.80x and 0.70x on 16,384 tokens with
    // KL measured on 8,192); the targets are 0.75x measured and 0.85x from the cheap path.
    assert!(searched <= 0.75, "searched {searched}x the hand-written recipe's KL");
    assert!(cheap <= 0.85, "cheap path {cheap}x the hand-written recipe's KL");
    assert!(affine_only < 0.95, "affine only {affine_only}x the hand-written recipe's KL");
}

#[test]
fn search_is_deterministic_and_refuses_impossible_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sens = dir.join("sens.json");
    // Proxy-only sensitivity (no text): fast, and enough to exercise the search.
    run(&["sensitivity", "--model", TRAINED, "--bits", "3,4,6", "--group-sizes", "64", "--out", s(&sens), "--quiet"]);
    let search = |out: &Path, target: &str| {
        mixq(&["recipe", "search", "--sensitivity", s(&sens), "--source", TRAINED, "--target-bpw", target, "--name", "searched", "--out", s(out), "--force"], &[])
    };
    let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
    assert!(search(&a, "4.2").status.success());
    assert!(search(&b, "4.2").status.success());
    assert_eq!(std::fs::read_to_string(&a).unwrap(), std::fs::read_to_string(&b).unwrap());
    let yaml = std::fs::read_to_string(&a).unwrap();
    assert!(yaml.starts_with("# Searched by mixq recipe search from") && yaml.contains("predicted cost"), "{yaml}");

    let o = search(&dir.join("c.yaml"), "1.5");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("below the smallest possible size") && err.contains("bits per weight") && err.contains("--min-bits 3"), "{err}");
    assert!(!dir.join("c.yaml").exists());

    // An existing recipe is not overwritten without --force.
    let o = mixq(&["recipe", "search", "--sensitivity", s(&sens), "--source", TRAINED, "--target-bpw", "4.2", "--out", s(&a)], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("--force"));

    // A sensitivity file of another architecture.
    let o = mixq(&["recipe", "search", "--sensitivity", s(&sens), "--source", CONFIG_120B, "--target-size", "48GiB", "--out", s(&dir.join("d.yaml"))], &[]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("another architecture"), "{err}");
}

#[test]
fn the_120b_shape_is_searched_from_a_synthetic_sensitivity_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sens = dir.join("sens-120b.json");
    let v = run_json(&["sensitivity", "--synthetic-config", CONFIG_120B, "--bits", "3,4,5,6,8", "--out", s(&sens), "--json"]);
    assert_eq!(v["units"], 36 * 8 + 2);
    // What the real cheap run would cost, from rates measured in this run.
    let real = &v["real_run"];
    for key in ["quantize_seconds", "model_flops", "model_seconds", "flops_per_second"] {
        assert!(real[key].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()), "{key}: {real}");
    }
    assert_eq!(real["probe_tokens"], 1024);
    assert!(real["peak_bytes"].as_u64().unwrap() > 1 << 30, "{real}");
    let recipe = dir.join("gpt-oss-120b-searched.yaml");
    let found = run_json(&[
        "recipe", "search", "--sensitivity", s(&sens), "--source", CONFIG_120B, "--target-size", "48GiB", "--out", s(&recipe),
        "--frontier", "--json",
    ]);
    let bytes = found["on_disk"]["bytes"].as_u64().unwrap();
    assert!(bytes <= 48 << 30 && bytes > 47 << 30, "{bytes}");
    let tensors = found["bytes"].as_u64().unwrap();
    assert!(tensors < bytes, "{tensors} bytes of tensors, {bytes} on disk");
    // 120b's shards are many, so their headers are counted: 5 GiB each at most.
    assert!(found["on_disk"]["shard_count"].as_u64().unwrap() >= 10, "{}", found["on_disk"]);
    assert_eq!(found["on_disk"]["copied_known"], false, "a bare config");
    let yaml = std::fs::read_to_string(&recipe).unwrap();
    assert!(yaml.contains(&format!("# On disk: at most {bytes} bytes, counting the shards with headers")), "{yaml}");
    let rows = found["frontier"].as_array().unwrap();
    assert_eq!(rows.len(), 9);
    let costs: Vec<f64> = rows.iter().filter_map(|r| r["predicted_cost"].as_f64()).collect();
    assert!(costs.len() >= 5 && costs.windows(2).all(|w| w[1] <= w[0]), "more bytes never cost more: {costs:?}");
    let svg = std::fs::read_to_string(dir.join("gpt-oss-120b-searched.frontier.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    let plan = run_json(&["plan", "--source", CONFIG_120B, "--recipe", s(&recipe), "--json"]);
    assert_eq!(plan["total"]["bytes"].as_u64(), Some(tensors));
    assert_eq!(plan["on_disk"], found["on_disk"], "plan prints the search's figure on disk");
}

#[test]
fn a_size_target_bounds_the_converted_files_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sens = dir.join("sens.json");
    run(&["sensitivity", "--model", TRAINED, "--bits", "3,4,6,8", "--group-sizes", "64,128", "--out", s(&sens), "--quiet"]);
    // The hand-written recipe's size on disk as plan gives it, as the target.
    let plan = run_json(&["plan", "--source", TRAINED, "--recipe", "gpt-oss-120b-3.6bit", "--json"]);
    let target = plan["on_disk"]["bytes"].as_u64().unwrap();
    let recipe = dir.join("searched.yaml");
    let found = run_json(&[
        "recipe", "search", "--sensitivity", s(&sens), "--source", TRAINED, "--target-size", &target.to_string(), "--out", s(&recipe),
        "--json",
    ]);
    let out = dir.join("searched");
    run(&["convert", "--source", TRAINED, "--recipe", s(&recipe), "--quantizer", "minmax", "--out", s(&out), "--quiet"]);
    let on_disk: u64 = common::file_sizes(&out).values().sum();
    let planned = found["on_disk"]["bytes"].as_u64().unwrap();
    eprintln!("target {target}, planned on disk {planned}, on disk {on_disk}, tensors {}", found["bytes"]);
    assert!(on_disk <= planned && planned <= target, "target {target}, planned {planned}, on disk {on_disk}");
    // The budget is used: within the bytes of one small upgrade of the target.
    assert!(target - on_disk < 64 << 10, "target {target}, on disk {on_disk}");
}

#[test]
fn the_cheap_estimate_ranks_units_like_their_kl_measured_on_unseen_text() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_, held_out) = common::dev_text_halves(dir, "search.txt", "held-out.txt");
    // Each unit's KL measured on held-out text at 3-bit gs64 (and 5-bit, which the estimate's
    // noise runs also use), against the estimate from 1,024 tokens the model wrote itself.
    let sens = dir.join("sens.json");
    let v = run_json(&[
        "sensitivity", "--model", TRAINED, "--text", s(&held_out), "--tokens", "1024", "--bits", "3,5", "--group-sizes", "64",
        "--measure", "3,64,5,64", "--probe-tokens", "1024", "--out", s(&sens), "--json",
    ]);
    let (rank, proxy) = (v["rank_correlation"].as_f64().unwrap(), v["proxy_rank_correlation"].as_f64().unwrap());
    eprintln!("Spearman with the measured KL: cheap estimate {rank:.3}, weight-error proxy {proxy:.3}");
    // Measured: 0.923 here (0.94 against 2,048 held-out tokens, 0.98 against 8,192 search-text
    // tokens); the previous estimate, entry error times the site's noise response alone, 0.750;
    // the weight-error proxy 0.119. The issue asks for 0.7; 0.85 keeps what measuring each unit's
    // own KL on the probe gained.
    assert!(rank >= 0.85, "the estimate ranks units with Spearman {rank} against their measured KL");
    assert_eq!(v["probe_tokens"], 1024);
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&sens).unwrap()).unwrap();
    for u in file["units"].as_array().unwrap() {
        for setting in u["settings"].as_array().unwrap() {
            let e = setting["estimate"].as_f64().unwrap_or(-1.0);
            if setting["mode"] == "mxfp4" {
                // Upstream experts kept in mxfp4 pass through: nothing changes, nothing is lost.
                assert_eq!((e, setting["proxy"].as_f64(), setting["cost"].as_f64()), (0.0, Some(0.0), Some(0.0)), "{}", u["module"]);
            } else {
                assert!(e > 0.0 && e.is_finite(), "{}: estimate {e}", u["module"]);
            }
        }
    }

    // Without a text the estimate is the cost.
    let v = run_json(&[
        "sensitivity", "--model", TRAINED, "--bits", "3,5", "--group-sizes", "64", "--probe-tokens", "256", "--out",
        s(&dir.join("cheap.json")), "--json",
    ]);
    assert_eq!(v["cost"], "estimate");
    assert!(v["rank_correlation"].is_null());
}

#[test]
fn refinement_measures_whole_candidate_models_and_keeps_only_what_helps() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (search_text, _) = common::dev_text_halves(dir, "search.txt", "held-out.txt");
    let sens = dir.join("sens.json");
    run(&["sensitivity", "--model", TRAINED, "--bits", "3,4,6", "--group-sizes", "64", "--probe-tokens", "256", "--out", s(&sens), "--quiet"]);
    let recipe = dir.join("refined.yaml");
    let found = run_json(&[
        "recipe", "search", "--sensitivity", s(&sens), "--source", TRAINED, "--target-bpw", "4.0", "--out", s(&recipe),
        "--refine-rounds", "2", "--refine-text", s(&search_text), "--refine-tokens", "512", "--json",
    ]);
    let line = found["refined"].as_str().expect("a refinement line").to_string();
    // "measured joint KL X (searched allocation: Y) on N tokens, ..."
    let number_after = |key: &str| -> f64 {
        let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
        rest.trim_start().split([' ', ')']).next().unwrap().parse().unwrap()
    };
    let (kl, start) = (number_after("measured joint KL"), number_after("searched allocation:"));
    assert!(kl > 0.0 && kl <= start, "{line}");
    assert!(line.contains("on 512 tokens"), "{line}");
    let yaml = std::fs::read_to_string(&recipe).unwrap();
    assert!(yaml.contains("# Refined: measured joint KL"), "{yaml}");
    let plan = run_json(&["plan", "--source", TRAINED, "--recipe", s(&recipe), "--json"]);
    let planned = plan["total"]["bytes"].as_u64().or_else(|| plan["bytes"].as_u64()).unwrap();
    assert_eq!(planned, found["bytes"].as_u64().unwrap());
    assert!(found["bytes"].as_u64().unwrap() <= found["target_bytes"].as_u64().unwrap());

    // The measured figure is the converted model's: validate on the same tokens agrees.
    let out = dir.join("refined");
    run(&["convert", "--source", TRAINED, "--recipe", s(&recipe), "--out", s(&out), "--quiet"]);
    let v = run_json(&[
        "validate", "--model", s(&out), "--reference", TRAINED, "--text", s(&search_text), "--ctx", "512", "--max-tokens", "512",
        "--quiet", "--json",
    ]);
    let validated = v["reference"]["kl_mean"].as_f64().unwrap();
    assert!((validated - kl).abs() <= 0.05 * kl, "refinement measured {kl}, validate {validated}");

    // Refinement needs a text to measure on.
    let o = mixq(&["recipe", "search", "--sensitivity", s(&sens), "--source", TRAINED, "--target-bpw", "4.0", "--out", s(&dir.join("x.yaml")), "--refine-rounds", "1"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("--refine-text"), "{}", text(&o).1);
}
