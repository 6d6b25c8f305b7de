//! End-to-end conversion: output layout, verify/inspect, --force, and the hub cache.

mod common;

use std::path::Path;

use common::{entries, mixq, synth, text, RawShard};
use serde_json::Value;

fn convert(src: &Path, recipe: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["convert", "--source", src.to_str().unwrap(), "--recipe", recipe, "--out", out.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    mixq(&args, &[])
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn converted_checkpoint_has_the_mlx_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), "small", |_| {});
    let out = tmp.path().join("out");
    let o = convert(&src, "gpt-oss-120b-3.6bit", &out, &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(
        entries(&out),
        [
            "README.md", "config.json", "generation_config.json", "mixq-manifest.json", "model.safetensors",
            "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"
        ]
    );
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["quantization"], cfg["quantization_config"]);
    assert_eq!(cfg["quantization"]["bits"], 3, "the default is the setting covering most parameters");
    assert_eq!(cfg["quantization"]["model.layers.0.mlp.experts.gate_proj"], serde_json::json!({"group_size": 64, "bits": 3, "mode": "affine"}));
    assert_eq!(cfg["quantization"]["model.layers.1.self_attn.q_proj"]["bits"], 6, "full-attention layer");
    assert_eq!(cfg["quantization"]["model.layers.2.self_attn.q_proj"]["bits"], 4, "middle sliding layer");
    assert!(cfg["quantization"].get("model.layers.0.mlp.router").is_none(), "kept modules have no entry");
    assert_eq!(cfg["eos_token_id"], serde_json::json!([0]), "eos ids come from generation_config.json");
    let shard = RawShard::read(&out.join("model.safetensors"));
    assert_eq!(shard.header["__metadata__"]["format"], "mlx");
    assert_eq!(shard.header["model.layers.0.mlp.experts.gate_proj.weight"]["shape"], serde_json::json!([8, 128, 192 * 3 / 32]));
    assert_eq!(shard.header["model.layers.0.mlp.experts.up_proj.bias"]["shape"], serde_json::json!([8, 128]));
    assert!(!shard.header.contains_key("model.layers.0.mlp.router.scales"));
    // Every byte is accounted for by a tensor: the safetensors crate accepts the file as it is.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let index = read_json(&out.join("model.safetensors.index.json"));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), st.len());
    let names: Vec<&String> = index["weight_map"].as_object().unwrap().keys().collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "weight_map is sorted");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: mlx\n"), "{card}");
    assert!(!card.contains("base_model:"), "a local folder is never a base model: {card}");
    assert!(card.contains("pipeline_tag: text-generation") && card.contains("bits per weight"), "{card}");
    assert!(card.contains("\n# src MLX, "), "titled by the model, not the output folder: {card}");
    assert!(card.contains(" GB → ") && card.contains(" bits per weight (source: MXFP4 experts, BF16 rest)"), "{card}");
    assert!(card.contains(&format!("## Reproduce\n\nWith mixq {}:", env!("CARGO_PKG_VERSION"))), "{card}");
    assert!(card.contains(&format!("mixq convert --source {} --recipe gpt-oss-120b-3.6bit --quantizer mse --out out", src.display())), "{card}");
    let manifest = read_json(&out.join("mixq-manifest.json"));
    assert_eq!(manifest["recipe"]["name"], "gpt-oss-120b-3.6bit");
    assert_eq!(manifest["files"].as_array().unwrap().len(), 8);

    let o = mixq(&["verify", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o).0);
    let o = mixq(&["inspect", out.to_str().unwrap(), "--json"], &[]);
    let i: Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!(i["format"], "MLX quantized");
    assert_eq!(i["quantization"]["affine 3-bit gs64"], 12);
}

#[test]
fn shards_split_at_the_size_limit_and_index_totals_match() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), "wide", |_| {});
    let out = tmp.path().join("out");
    let o = convert(&src, "mxfp4-experts", &out, &["--max-shard-bytes", "1000000"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let shards: Vec<String> = entries(&out).into_iter().filter(|n| n.ends_with(".safetensors")).collect();
    assert!(shards.len() > 2, "{shards:?}");
    assert_eq!(shards[0], format!("model-00001-of-{:05}.safetensors", shards.len()));
    let mut total = 0;
    for s in &shards {
        let raw = RawShard::read(&out.join(s));
        assert!(raw.data.len() <= 1_000_000 || raw.header.len() == 2, "{s} exceeds the limit with several tensors");
        total += raw.data.len();
    }
    let index = read_json(&out.join("model.safetensors.index.json"));
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    assert!(index["metadata"]["total_parameters"].as_u64().unwrap() > 0);
    let o = mixq(&["verify", out.to_str().unwrap(), "--json"], &[]);
    let v: Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn verify_names_every_kind_of_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), "tiny", |_| {});
    let out = tmp.path().join("out");
    assert!(convert(&src, "mixed_3_6", &out, &[]).status.success());

    // A flipped byte in the shard: the manifest hash no longer matches.
    let shard = out.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&shard, &bytes).unwrap();
    let o = mixq(&["verify", out.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).0.contains("model.safetensors: sha256"), "{}", text(&o).0);

    // A config that no longer matches the tensors.
    let cfg_path = out.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["quantization"]["model.layers.0.self_attn.o_proj"]["bits"] = 4.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = mixq(&["verify", out.to_str().unwrap()], &[]);
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout.contains("config.json: size"), "{stdout}");
    assert!(stdout.contains("tensor model.layers.0.self_attn.o_proj.weight: config implies U32 [64, 16], found U32 [64, 12]"), "{stdout}");

    // A stray file.
    std::fs::write(out.join("extra.bin"), b"x").unwrap();
    let (stdout, _) = text(&mixq(&["verify", out.to_str().unwrap()], &[]));
    assert!(stdout.contains("extra.bin: present but not in the manifest"), "{stdout}");
}

#[test]
fn existing_output_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), "tiny", |_| {});
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let o = convert(&src, "gpt-oss-120b-3.6bit", &out, &[]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("not empty; pass --force"), "{}", text(&o).1);
    assert_eq!(entries(&out), ["keep.txt"], "nothing was touched");
    // --force replaces a mixq output only: a folder of other things is named and kept.
    let o = convert(&src, "gpt-oss-120b-3.6bit", &out, &["--force"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--force replaces only an empty folder or a mixq output"), "{}", text(&o).1);
    assert!(text(&o).1.contains("holds 1 entry and no mixq-manifest.json (keep.txt), which it would delete"), "{}", text(&o).1);
    assert_eq!(entries(&out), ["keep.txt"], "nothing was touched");
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    assert!(convert(&src, "gpt-oss-120b-3.6bit", &out, &[]).status.success());
    let o = convert(&src, "mixed_3_6", &out, &["--force"]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(mixq(&["verify", out.to_str().unwrap()], &[]).status.success());
    // A regular file is never an output folder, with or without --force.
    let file = tmp.path().join("some-file");
    std::fs::write(&file, b"data").unwrap();
    let o = convert(&src, "gpt-oss-120b-3.6bit", &file, &["--force"]);
    assert!(text(&o).1.contains("some-file: --out is a regular file"), "{}", text(&o).1);
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    // An empty folder is fine without --force; the source itself never is.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(convert(&src, "gpt-oss-120b-3.6bit", &empty, &[]).status.success());
    let o = convert(&src, "gpt-oss-120b-3.6bit", &src, &["--force"]);
    assert!(text(&o).1.contains("is the source checkpoint"), "{}", text(&o).1);
    assert!(src.join("config.json").exists());
}

#[test]
fn hub_repo_id_resolves_from_the_offline_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let repo = cache.join("models--openai--gpt-oss-tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "c0ffee").unwrap();
    synth(&repo.join("snapshots/c0ffee"), "tiny", |_| {});
    let out = tmp.path().join("out");
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let o = mixq(
        &["convert", "--source", "openai/gpt-oss-tiny", "--recipe", "mxfp4-experts", "--out", out.to_str().unwrap(), "--quiet"],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("base_model: openai/gpt-oss-tiny\nbase_model_relation: quantized\n"), "{card}");
    assert!(card.contains("# gpt-oss-tiny MLX, ") && card.contains("mixq convert --source openai/gpt-oss-tiny --recipe mxfp4-experts"), "{card}");
    // --base-model and --license name what the card cannot know from a local folder.
    let snapshot = repo.join("snapshots/c0ffee");
    std::fs::write(snapshot.join("chat_template.jinja"), "{{ messages }}").unwrap();
    let local = tmp.path().join("local");
    let o = mixq(
        &["convert", "--source", snapshot.to_str().unwrap(), "--recipe", "mxfp4-experts", "--out", local.to_str().unwrap(), "--quiet",
          "--base-model", "openai/gpt-oss-tiny", "--license", "apache-2.0"],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let card = std::fs::read_to_string(local.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: mlx\nlicense: apache-2.0\nbase_model: openai/gpt-oss-tiny\nbase_model_relation: quantized\n"), "{card}");
    assert!(card.contains("tokenizer.apply_chat_template(messages, add_generation_prompt=True)") && card.contains("--chat --prompt"), "{card}");
    let o = mixq(&["convert", "--source", snapshot.to_str().unwrap(), "--recipe", "mxfp4-experts", "--out", "/tmp/never", "--base-model", "/data/models/x"], &env);
    assert!(text(&o).1.contains("--base-model") && text(&o).1.contains("expected a hub repo id"), "{}", text(&o).1);
    let o = mixq(&["plan", "--source", "openai/gpt-oss-tiny", "--recipe", "mixed_3_6"], &env);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = mixq(&["plan", "--source", "openai/not-cached", "--recipe", "mixed_3_6"], &env);
    assert!(text(&o).1.contains("offline (HF_HUB_OFFLINE) and config.json is not in the hub cache"), "{}", text(&o).1);
}

#[test]
fn progress_is_plain_lines_when_stderr_is_not_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), "tiny", |_| {});
    let out = tmp.path().join("out");
    let o = mixq(&["convert", "--source", src.to_str().unwrap(), "--recipe", "mixed_3_6", "--out", out.to_str().unwrap()], &[]);
    let (stdout, stderr) = text(&o);
    assert!(stderr.lines().any(|l| l.starts_with("convert: ") && l.contains("MiB/s") && l.contains("tensors")), "{stderr}");
    assert!(!stderr.contains('\r') && !stderr.contains('\x1b'), "no terminal control codes: {stderr:?}");
    assert!(stdout.contains("bits per weight"), "{stdout}");
}

#[test]
fn demo_runs_on_the_bundled_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = mixq(&["demo", "--out", out.to_str().unwrap()], &[]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    for step in ["== 1. plan ==", "== 2. calibrate", "== 3. convert (quantizer gptq, calibrated with Hessians) ==", "== 4. inspect ==", "== 5. verify ==", ": OK (", "== 6. generate with the converted model ==", "Generation: 48 tokens", "== 7. validate against the source", "KL mean"] {
        assert!(stdout.contains(step), "{step} missing: {stdout}");
    }
}
