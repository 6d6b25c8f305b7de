//! Bad input gets one clear error naming the file, tensor or YAML line, and leaves no output.

mod common;

use std::path::{Path, PathBuf};

use common::{entries, mixq, shard_of, synth, text, RawShard};
use serde_json::json;

struct Case {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    out: PathBuf,
}

fn case(preset: &str) -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), preset, |_| {});
    let out = tmp.path().join("out");
    Case { _tmp: tmp, src, out }
}

/// Converts, expects failure, returns stderr; checks that nothing was left behind.
fn fails(c: &Case, recipe: &str) -> String {
    let o = mixq(
        &["convert", "--source", c.src.to_str().unwrap(), "--recipe", recipe, "--out", c.out.to_str().unwrap(), "--quiet"],
        &[],
    );
    let (_, stderr) = text(&o);
    assert!(!o.status.success(), "conversion should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    assert!(!c.out.exists(), "no output folder is left behind");
    let parent = c.out.parent().unwrap();
    assert!(entries(parent).iter().all(|n| !n.contains("mixq-partial")), "no partial folder: {:?}", entries(parent));
    stderr
}

fn edit_shard(src: &Path, tensor: &str, f: impl FnOnce(&mut RawShard)) -> PathBuf {
    let path = shard_of(src, tensor);
    let mut s = RawShard::read(&path);
    f(&mut s);
    s.write(&path);
    path
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn truncated_shard() {
    let c = case("tiny");
    let path = shard_of(&c.src, Q);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains(path.file_name().unwrap().to_str().unwrap()) && e.contains("truncated"), "{e}");
}

#[test]
fn header_length_past_end_of_file() {
    let c = case("tiny");
    let path = shard_of(&c.src, Q);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains("header length 1099511627776 runs past the end"), "{e}");
}

#[test]
fn overlapping_offsets() {
    let c = case("tiny");
    edit_shard(&c.src, Q, |s| {
        let r = s.range(Q);
        let other = s.header.keys().find(|k| *k != Q && *k != "__metadata__" && s.range(k).start > r.start).unwrap().clone();
        let len = s.range(&other).len();
        s.header[&other]["data_offsets"] = json!([r.start + 2, r.start + 2 + len]);
    });
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn dtype_that_does_not_fit_the_role() {
    let c = case("tiny");
    edit_shard(&c.src, Q, |s| s.header[Q]["dtype"] = json!("F16"));
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains(Q) && e.contains("expected dtype BF16 for its role, found F16"), "{e}");
}

#[test]
fn shape_that_does_not_fit_the_byte_length() {
    let c = case("tiny");
    edit_shard(&c.src, Q, |s| s.header[Q]["shape"] = json!([128, 65]));
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains(Q) && e.contains("needs 16640 bytes but data_offsets"), "{e}");
}

#[test]
fn shape_that_does_not_fit_the_config() {
    let c = case("tiny");
    edit_shard(&c.src, Q, |s| s.header[Q]["shape"] = json!([64, 128]));
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains(Q) && e.contains("expected shape [128, 64], found [64, 128]"), "{e}");
}

#[test]
fn missing_tensor() {
    let c = case("tiny");
    let path = edit_shard(&c.src, Q, |s| {
        s.header.remove(Q);
    });
    let index_path = c.src.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"].as_object_mut().unwrap().remove(Q);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let _ = path;
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains(&format!("tensor {Q}: missing")), "{e}");
}

#[test]
fn index_naming_a_missing_shard() {
    let c = case("tiny");
    let index_path = c.src.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"][Q] = json!("model-00009-of-00009.safetensors");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains("model.safetensors.index.json") && e.contains("names shard model-00009-of-00009.safetensors, which does not exist"), "{e}");
}

#[test]
fn index_disagreeing_with_the_shards() {
    let c = case("tiny");
    let index_path = c.src.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let wrong = if index["weight_map"][Q] == "model-00001-of-00002.safetensors" { "model-00002-of-00002.safetensors" } else { "model-00001-of-00002.safetensors" };
    index["weight_map"][Q] = json!(wrong);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains(&format!("tensor {Q} is listed in {wrong} but lies in")), "{e}");
}

#[test]
fn nan_in_a_weight() {
    let c = case("tiny");
    edit_shard(&c.src, Q, |s| {
        let r = s.range(Q);
        // Row 3, column 17 of a [128, 64] bf16 matrix.
        let at = r.start + (3 * 64 + 17) * 2;
        s.data[at..at + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    });
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains(&format!("tensor {Q}: non-finite value NaN at row 3, column 17")), "{e}");
}

#[test]
fn unwritable_out() {
    let c = case("tiny");
    let blocker = c.src.parent().unwrap().join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let out = blocker.join("model");
    let o = mixq(&["convert", "--source", c.src.to_str().unwrap(), "--recipe", "mixed_3_6", "--out", out.to_str().unwrap()], &[]);
    let (_, e) = text(&o);
    assert!(!o.status.success());
    assert!(e.contains("a-file") && !e.contains("panicked"), "{e}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"not a folder");
}

fn recipe_file(c: &Case, yaml: &str) -> String {
    let p = c.src.parent().unwrap().join("recipe.yaml");
    std::fs::write(&p, yaml).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn recipe_with_an_unknown_key() {
    let c = case("tiny");
    let r = recipe_file(&c, "name: r\nrules:\n  - class: experts\n    action: mxfp4\n  - class: attention\n    bitz: 4\n    action: keep\n");
    let e = fails(&c, &r);
    assert!(e.contains("recipe.yaml:") && e.contains("unknown field `bitz`"), "{e}");
}

#[test]
fn recipe_with_unsupported_bits_or_group_size() {
    let c = case("tiny");
    let r = recipe_file(&c, "name: r\nrules:\n  - class: experts\n    action: {affine: {bits: 7, group_size: 64}}\n");
    let e = fails(&c, &r);
    assert!(e.contains("recipe.yaml:3: bits 7 is not supported"), "{e}");
    let r = recipe_file(&c, "name: r\nrules:\n  - class: experts\n    action: mxfp4\n  - class: [embed_tokens, lm_head, attention, router]\n    action: {affine: {bits: 4, group_size: 16}}\n");
    let e = fails(&c, &r);
    assert!(e.contains("recipe.yaml:5: group_size 16 is not supported"), "{e}");
}

#[test]
fn recipe_group_size_that_does_not_divide_the_input_dimension() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), "tiny", |s| s.hidden = 96);
    let c = Case { src, out: tmp.path().join("out"), _tmp: tmp };
    let r = recipe_file(&c, "name: r\nrules:\n  - class: experts\n    action: mxfp4\n  - class: [embed_tokens, lm_head, attention, router]\n    action: {affine: {bits: 4, group_size: 64}}\n");
    let e = fails(&c, &r);
    assert!(e.contains("recipe.yaml:5:") && e.contains("model.embed_tokens.weight (96) to be divisible by 64"), "{e}");
    // The same holds for gpt-oss-120b's real width with group size 128.
    let fixture = format!("{}/tests/fixtures/gpt-oss-120b/config.json", env!("CARGO_MANIFEST_DIR"));
    let r = recipe_file(&c, "name: r\nrules:\n  - class: experts\n    action: {affine: {bits: 3, group_size: 128}}\n  - class: [embed_tokens, lm_head, attention, router]\n    action: keep\n");
    let o = mixq(&["plan", "--source", &fixture, "--recipe", &r], &[]);
    assert!(text(&o).1.contains("recipe.yaml:3:") && text(&o).1.contains("(2880) to be divisible by 128"), "{}", text(&o).1);
}

#[test]
fn recipe_that_leaves_a_tensor_unmatched() {
    let c = case("tiny");
    let r = recipe_file(&c, "name: r\nrules:\n  - class: attention\n    action: keep\n");
    let e = fails(&c, &r);
    assert!(e.contains("tensor model.embed_tokens.weight (class embed_tokens) is matched by no rule"), "{e}");
}

#[test]
fn unknown_recipe_and_bad_layer_selector() {
    let c = case("tiny");
    let e = fails(&c, "no-such-recipe");
    assert!(e.contains("not a built-in recipe (gpt-oss-120b-3.6bit, mixed_3_6, mxfp4-experts)"), "{e}");
    let r = recipe_file(&c, "name: r\nrules:\n  - class: experts\n    layers: [first half]\n    action: mxfp4\n");
    let e = fails(&c, &r);
    assert!(e.contains("recipe.yaml:3: layer selector \"first half\""), "{e}");
}

#[test]
fn bad_config_names_the_field() {
    let c = case("tiny");
    let cfg_path = c.src.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("num_key_value_heads");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = fails(&c, "mixed_3_6");
    assert!(e.contains("config.json: field `num_key_value_heads` is missing"), "{e}");
}
