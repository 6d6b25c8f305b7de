//! `mixq plan` reproduces the published figures of gpt-oss-120b from its config alone.

mod common;

use common::{mixq, text};
use serde_json::Value;

fn plan_json(source: &str, recipe: &str) -> Value {
    let out = mixq(&["plan", "--source", source, "--recipe", recipe, "--json"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_str(&stdout).expect("plan --json prints JSON")
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}/config.json", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn gpt_oss_120b_at_3_6_bits_is_3_557_bpw_and_48_gib() {
    let p = plan_json(&fixture("gpt-oss-120b"), "gpt-oss-120b-3.6bit");
    let total = &p["total"];
    assert_eq!(format!("{:.3}", total["bits_per_weight"].as_f64().unwrap()), "3.557");
    assert_eq!(total["gib"].as_f64().unwrap().floor(), 48.0, "the published card's \"48 GB\" is GiB");
    assert_eq!(total["bytes"].as_u64(), Some(51_949_344_384));
    assert_eq!(total["parameters"].as_u64(), Some(116_829_154_368));
    // The MXFP4 source is about 65 GB.
    let src = &p["source_checkpoint"];
    assert_eq!(src["gb"].as_f64().unwrap().round(), 65.0);
    let rows = p["rows"].as_array().unwrap();
    let bits: Vec<&str> = rows.iter().map(|r| r["bits"].as_str().unwrap()).collect();
    assert_eq!(bits, ["bf16", "6", "4", "3"]);
    assert_eq!(rows[2]["covers"].as_str().unwrap(), "q_proj, k_proj (layers 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28)");
    assert!(rows[3]["covers"].as_str().unwrap().starts_with("experts_gate, experts_up, experts_down (all layers)"));
}

#[test]
fn the_same_recipe_serves_20b_and_the_tiny_model() {
    let p = plan_json(&fixture("gpt-oss-20b"), "gpt-oss-120b-3.6bit");
    let four_bit = p["rows"].as_array().unwrap().iter().find(|r| r["bits"] == "4").unwrap();
    assert_eq!(four_bit["covers"], "q_proj, k_proj (layers 4, 6, 8, 10, 12, 14, 16, 18)");
    let tiny = format!("{}/models/tiny-gpt-oss-shakespeare", env!("CARGO_MANIFEST_DIR"));
    for recipe in ["gpt-oss-120b-3.6bit", "mixed_3_6", "mxfp4-experts"] {
        let p = plan_json(&tiny, recipe);
        assert!(p["total"]["bits_per_weight"].as_f64().unwrap() > 3.0, "{recipe}");
    }
    let p = plan_json(&tiny, "gpt-oss-120b-3.6bit");
    let four_bit = p["rows"].as_array().unwrap().iter().find(|r| r["bits"] == "4").unwrap();
    assert_eq!(four_bit["covers"], "q_proj, k_proj (layers 2, 4)");
}

#[test]
fn mxfp4_source_size_is_reported_in_the_table() {
    let out = mixq(&["plan", "--source", &fixture("gpt-oss-120b"), "--recipe", "gpt-oss-120b-3.6bit"], &[]);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("48.38 GiB, 3.557 bits per weight"), "{stdout}");
    assert!(stdout.contains("65.25 GB"), "{stdout}");
}

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");

/// Converts `source` by `recipe` into `out` (min-max: the quantizer does not change a size).
fn convert(source: &str, recipe: &str, out: &std::path::Path) {
    let o = mixq(&["convert", "--source", source, "--recipe", recipe, "--quantizer", "minmax", "--out", out.to_str().unwrap(), "--quiet"], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
}

/// The safetensors header bytes (8-byte length and the JSON) of a shard on disk.
fn header_bytes(path: &std::path::Path) -> u64 {
    use std::io::Read;
    let mut len = [0u8; 8];
    std::fs::File::open(path).unwrap().read_exact(&mut len).unwrap();
    8 + u64::from_le_bytes(len)
}

/// Checks plan's on-disk figures against the files of a real conversion: shards, headers, index,
/// config and copied files exactly, the card and the manifest within their bounds, every file
/// counted.
fn assert_on_disk_matches(d: &Value, out: &std::path::Path, what: &str) {
    let files = common::file_sizes(out);
    let shards: Vec<&String> = files.keys().filter(|n| n.ends_with(".safetensors")).collect();
    assert_eq!(shards.len() as u64, d["shard_count"].as_u64().unwrap(), "{what}");
    assert_eq!(shards.iter().map(|n| files[*n]).sum::<u64>(), d["shards"].as_u64().unwrap(), "{what}: shards");
    assert_eq!(shards.iter().map(|n| header_bytes(&out.join(n))).sum::<u64>(), d["headers"].as_u64().unwrap(), "{what}: headers");
    assert_eq!(files["model.safetensors.index.json"], d["index"].as_u64().unwrap(), "{what}: index");
    assert_eq!(files["config.json"], d["config"].as_u64().unwrap(), "{what}: config.json");
    let copied = d["copied"].as_object().unwrap();
    assert!(copied.contains_key("tokenizer.json"), "{what}: {copied:?}");
    for (name, size) in copied {
        assert_eq!(files.get(name).copied(), size.as_u64(), "{what}: {name}");
    }
    let card = files["README.md"];
    let manifest = files["mixq-manifest.json"];
    assert!(card <= d["card_at_most"].as_u64().unwrap(), "{what}: card {card} over {}", d["card_at_most"]);
    assert!(manifest <= d["manifest_at_most"].as_u64().unwrap(), "{what}: manifest {manifest} over {}", d["manifest_at_most"]);
    // Every file is counted: nothing else is on disk.
    assert_eq!(files.len(), shards.len() + 2 + copied.len() + 2, "{what}: uncounted files in {files:?}");
    let total: u64 = files.values().sum();
    let bound = d["bytes"].as_u64().unwrap();
    assert!(total <= bound, "{what}: {total} bytes on disk, plan says at most {bound}");
    let slack = bound - total;
    assert_eq!(slack, d["card_at_most"].as_u64().unwrap() - card + d["manifest_at_most"].as_u64().unwrap() - manifest, "{what}");
    eprintln!("{what}: on disk {total}, plan {bound} (card {card} <= {}, manifest {manifest} <= {})", d["card_at_most"], d["manifest_at_most"]);
}

#[test]
fn the_on_disk_figure_bounds_the_files_convert_writes() {
    let tmp = tempfile::tempdir().unwrap();
    for recipe in ["gpt-oss-120b-3.6bit", "mixed_3_6", "mxfp4-experts"] {
        let p = plan_json(TINY, recipe);
        let d = &p["on_disk"];
        assert_eq!(d["copied_known"], true);
        let out = tmp.path().join(recipe);
        convert(TINY, recipe, &out);
        assert_on_disk_matches(d, &out, recipe);
        let tensors = p["total"]["bytes"].as_u64().unwrap();
        assert_eq!(d["shards"].as_u64().unwrap() - d["headers"].as_u64().unwrap(), tensors, "{recipe}: shards are tensors and headers");
    }
    // From the config alone, the files beside it are those of the folder: the same figures, save
    // the card and manifest, which name the source as given.
    let config_only = plan_json(&format!("{TINY}/config.json"), "mixed_3_6");
    let folder = plan_json(TINY, "mixed_3_6");
    assert_eq!(config_only["on_disk"]["copied_known"], false);
    for field in ["shards", "headers", "index", "config", "copied"] {
        assert_eq!(config_only["on_disk"][field], folder["on_disk"][field], "{field}");
    }
    // The text names the total and each kind of file.
    let out = mixq(&["plan", "--source", TINY, "--recipe", "mixed_3_6"], &[]);
    let (stdout, _) = text(&out);
    let total = mixq_quantizer::sizes::thousands(folder["on_disk"]["bytes"].as_u64().unwrap() as usize);
    assert!(stdout.contains(&format!("on disk: {total} bytes")) && stdout.contains("incl. headers") && stdout.contains("manifest <="), "{stdout}");
}
