//! `mixq run` and `mixq logits` end to end, and their errors on bad input.

mod common;

use common::{mixq, recast_floats, synth, text};
use serde_json::Value;

const TRAINED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");

fn run_json(model: &str, extra: &[&str]) -> Value {
    let mut args = vec!["run", "--model", model, "--json"];
    args.extend_from_slice(extra);
    let o = mixq(&args, &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    serde_json::from_str(&text(&o).0).unwrap()
}

#[test]
fn greedy_is_deterministic_and_seeded_sampling_repeats() {
    let a = run_json(TRAINED, &["--prompt", "ROMEO:", "--max-tokens", "20"]);
    let b = run_json(TRAINED, &["--prompt", "ROMEO:", "--max-tokens", "20"]);
    assert_eq!(a["tokens"], b["tokens"]);
    assert_eq!(a["generated_tokens"], 20);
    assert!(a["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(a["kv_cache_bytes"].as_u64().unwrap() > 0);
    let s1 = run_json(TRAINED, &["--prompt", "ROMEO:", "--max-tokens", "20", "--temp", "0.9", "--top-p", "0.95", "--seed", "5"]);
    let s2 = run_json(TRAINED, &["--prompt", "ROMEO:", "--max-tokens", "20", "--temp", "0.9", "--top-p", "0.95", "--seed", "5"]);
    let s3 = run_json(TRAINED, &["--prompt", "ROMEO:", "--max-tokens", "20", "--temp", "0.9", "--top-p", "0.95", "--seed", "6"]);
    assert_eq!(s1["tokens"], s2["tokens"]);
    assert_ne!(s1["tokens"], s3["tokens"]);
}

#[test]
fn streaming_output_ends_with_figures() {
    let o = mixq(&["run", "--model", TRAINED, "--prompt", "KING.", "--max-tokens", "10"], &[]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.starts_with("KING."), "{stdout}");
    for needle in ["Prompt: ", "tokens/s", "Generation: 10 tokens", "KV cache: ", "peak memory: "] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
}

#[test]
fn logits_are_written_as_npy() {
    let tmp = tempfile::tempdir().unwrap();
    let toks = tmp.path().join("t.json");
    std::fs::write(&toks, "[1, 2, 3, 4]").unwrap();
    let out = tmp.path().join("l.npy");
    let o = mixq(&["logits", "--model", TRAINED, "--tokens", toks.to_str().unwrap(), "--out", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes.starts_with(b"\x93NUMPY"));
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'shape': (4, 2048)"), "{header}");
    assert_eq!(bytes.len(), 10 + header_len + 4 * 2048 * 4);
}

#[test]
fn token_past_the_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let toks = tmp.path().join("t.json");
    std::fs::write(&toks, "[1, 2, 5000]").unwrap();
    let out = tmp.path().join("l.npy");
    let o = mixq(&["logits", "--model", TRAINED, "--tokens", toks.to_str().unwrap(), "--out", out.to_str().unwrap()], &[]);
    let e = text(&o).1;
    assert!(!o.status.success() && !e.contains("panicked"), "{e}");
    assert!(e.contains("token id 5000 at position 2 is outside the vocabulary of 2048 tokens"), "{e}");
    assert!(!out.exists());
    std::fs::write(&toks, "[1, -2]").unwrap();
    let e = text(&mixq(&["logits", "--model", TRAINED, "--tokens", toks.to_str().unwrap(), "--out", out.to_str().unwrap()], &[])).1;
    assert!(e.contains("expected a JSON list of non-negative token ids"), "{e}");
}

#[test]
fn prompt_longer_than_the_context() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("m"), "tiny", |_| {});
    let cfg_path = src.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 16.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = mixq(&["run", "--model", src.to_str().unwrap(), "--prompt", "a long prompt of many bytes", "--max-tokens", "4"], &[]);
    let e = text(&o).1;
    assert!(!o.status.success() && e.contains("exceed the model's context of 16 tokens"), "{e}");
}

#[test]
fn missing_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("m"), "tiny", |_| {});
    std::fs::remove_file(src.join("tokenizer.json")).unwrap();
    let o = mixq(&["run", "--model", src.to_str().unwrap(), "--prompt", "hi"], &[]);
    let e = text(&o).1;
    assert!(!o.status.success() && e.contains("tokenizer.json: missing; the model has no tokenizer"), "{e}");
}

#[test]
fn config_and_tensors_that_disagree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), "tiny", |_| {});
    let out = tmp.path().join("out");
    assert!(mixq(&["convert", "--source", src.to_str().unwrap(), "--recipe", "mixed_3_6", "--out", out.to_str().unwrap(), "--quiet"], &[])
        .status
        .success());
    let cfg_path = out.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization"]["model.layers.1.self_attn.v_proj"]["bits"] = 4.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = mixq(&["run", "--model", out.to_str().unwrap(), "--prompt", "hi"], &[]);
    let e = text(&o).1;
    assert!(!o.status.success() && !e.contains("panicked"), "{e}");
    assert!(e.contains("model.layers.1.self_attn.v_proj.weight") && e.contains("config and tensors disagree"), "{e}");
}

/// `mixq logits` of `tokens` on the CPU, as f32 values (the .npy's data after its header).
fn cpu_logits(model: &std::path::Path, tokens: &std::path::Path, out: &std::path::Path) -> Vec<f32> {
    let o = mixq(&["logits", "--model", model.to_str().unwrap(), "--tokens", tokens.to_str().unwrap(), "--out", out.to_str().unwrap(), "--backend", "cpu"], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    let bytes = std::fs::read(out).unwrap();
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn float32_and_float16_checkpoints_run_as_mlx_lm_writes_them() {
    // The hand recipe keeps the routers unquantized, so the copies hold F32/F16 dense matrices,
    // affine scales and biases, norms, biases and sinks.
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = tmp.path().join("bf16");
    let args = ["convert", "--source", TRAINED, "--recipe", "gpt-oss-120b-3.6bit", "--quantizer", "minmax", "--quiet", "--out"];
    assert!(mixq(&[&args[..], &[bf16.to_str().unwrap()]].concat(), &[]).status.success());
    let tokens = tmp.path().join("t.json");
    std::fs::write(&tokens, serde_json::to_string(&(0..80u32).map(|i| (i * 37 + 11) % 2048).collect::<Vec<_>>()).unwrap()).unwrap();
    let want = cpu_logits(&bf16, &tokens, &tmp.path().join("bf16.npy"));
    // Every BF16 value is exact in F32, so the F32 copy must give the very same logits.
    let f32_copy = recast_floats(&bf16, &tmp.path().join("f32"), "F32");
    assert_eq!(cpu_logits(&f32_copy, &tokens, &tmp.path().join("f32.npy")), want);
    // Calibration runs on it too, and its statistics (fingerprint included) are the original's.
    let text_file = tmp.path().join("text.txt");
    std::fs::write(&text_file, "ROMEO:\nBut soft, what light through yonder window breaks?\n".repeat(8)).unwrap();
    let stats = |model: &std::path::Path, out: &str| {
        let out = tmp.path().join(out);
        let args = ["calibrate", "--model", model.to_str().unwrap(), "--text", text_file.to_str().unwrap(), "--max-tokens", "128", "--quiet", "--out"];
        let o = mixq(&[&args[..], &[out.to_str().unwrap()]].concat(), &[]);
        assert!(o.status.success(), "{}", text(&o).1);
        let mut raw = common::RawShard::read(&out);
        // The model's folder name is recorded too; everything else must agree.
        raw.header["__metadata__"].as_object_mut().unwrap().remove("model");
        raw
    };
    let (a, b) = (stats(&bf16, "bf16.stats"), stats(&f32_copy, "f32.stats"));
    assert!(a.header == b.header && a.data == b.data, "the F32 copy's statistics differ");
    // F16 rounds values below its range, so only nearly the same.
    let f16_copy = recast_floats(&bf16, &tmp.path().join("f16"), "F16");
    let got = cpu_logits(&f16_copy, &tokens, &tmp.path().join("f16.npy"));
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 0.05 && worst > 0.0, "F16 copy: largest logit difference {worst}");
    // Scales and biases of two float types in one module are not what mlx writes: refused by name.
    let mixed = tmp.path().join("mixed");
    recast_floats(&bf16, &mixed, "BF16");
    let shard = mixed.join("model.safetensors");
    let mut raw = common::RawShard::read(&shard);
    let name = "model.layers.0.self_attn.q_proj.biases";
    raw.header.get_mut(name).unwrap()["dtype"] = "F16".into();
    raw.write(&shard);
    let o = mixq(&["logits", "--model", mixed.to_str().unwrap(), "--tokens", tokens.to_str().unwrap(), "--out", tmp.path().join("m.npy").to_str().unwrap(), "--backend", "cpu"], &[]);
    let e = text(&o).1;
    assert!(!o.status.success() && e.contains(name) && e.contains("F16") && e.contains("BF16"), "{e}");
}

#[test]
fn chat_without_a_template_is_a_clear_error() {
    let o = mixq(&["run", "--model", TRAINED, "--prompt", "hi", "--chat"], &[]);
    assert!(text(&o).1.contains("the model has no chat template"), "{}", text(&o).1);
}

#[test]
fn quiet_runs_print_nothing_on_stderr() {
    // Whatever the backend `auto` finds here (a GPU, or the CPU with its note), --quiet keeps
    // stderr empty, and the figures still come on stdout.
    let o = mixq(&["run", "--model", TRAINED, "--prompt", "ROMEO:", "--max-tokens", "4", "--quiet"], &[("XDG_RUNTIME_DIR", "/nonexistent")]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(stderr, "", "--quiet covers every line");
    assert!(stdout.contains("Generation: 4 tokens"), "{stdout}");
    let o = mixq(&["run", "--model", TRAINED, "--prompt", "ROMEO:", "--max-tokens", "4", "--backend", "cpu"], &[]);
    assert_eq!(text(&o).1, "", "an explicit CPU run has nothing to note");
}
