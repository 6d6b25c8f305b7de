//! Fine-tunes in transformers' dense layout (issue 19): a dense copy of the bundled upstream model,
//! written here with its MXFP4 experts decoded (every E2M1 x 2^e value is exact in bf16 and f32),
//! converts to the same tensors, byte for byte, as the upstream original, and every job that reads
//! a model (run, logits, calibrate, validate, plan) gives on it what it gives on the original.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::dense::{write_dense, Float, E2M1, MODEL};
use common::{mixq, text};
use safetensors::SafeTensors;
use serde_json::Value;

/// The quantizer flags of the byte-identity checks against mx.quantize.
const MINMAX: &[&str] = &["--quantizer", "minmax"];

const DEV_TEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare-dev.txt");

/// Runs the CLI with `--json` and parses what it prints, failing with its stderr.
fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let r = mixq(&all, &[]);
    let (out, err) = text(&r);
    assert!(r.status.success(), "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Converts `src` with `recipe` and the quantizer flags (`--quantizer Q`, `--calibration STATS`).
fn convert(src: &Path, recipe: &str, out: &Path, quantizer: &[&str]) {
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["convert", "--source", s, "--recipe", recipe, "--out", o, "--quiet"];
    args.extend_from_slice(quantizer);
    let r = mixq(&args, &[]);
    assert!(r.status.success(), "convert {s}: {}", text(&r).1);
}

/// Every tensor of a converted checkpoint: name to (dtype, shape, bytes).
fn tensors_of(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, t) in st.tensors() {
                out.insert(name, (format!("{:?}", t.dtype()), t.shape().to_vec(), t.data().to_vec()));
            }
        }
    }
    out
}

/// Converts the upstream model and a dense copy of it, and checks the tensors are identical.
fn assert_same_conversion(float: Float, sharded: bool, recipe: &str, quantizer: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dense = write_dense(&tmp.path().join("dense"), float, sharded, |_| {});
    let (a, b) = (tmp.path().join("from-upstream"), tmp.path().join("from-dense"));
    convert(Path::new(MODEL), recipe, &a, quantizer);
    convert(&dense, recipe, &b, quantizer);
    let (ta, tb) = (tensors_of(&a), tensors_of(&b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, x) in &ta {
        assert!(x == &tb[name], "{recipe} {quantizer:?}: tensor {name} differs between the upstream and the dense conversion");
    }
    assert!(ta.len() > 100, "the model has all its tensors");
    // The card and the manifest name the layout each was converted from.
    let layout = |dir: &Path| {
        let m: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("mixq-manifest.json")).unwrap()).unwrap();
        let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
        let named = m["source_layout"].as_str().unwrap().to_string();
        assert!(card.contains(&format!("(source: {named})")), "{card}");
        named
    };
    assert_eq!(layout(&a), "MXFP4 experts, BF16 rest");
    assert_eq!(layout(&b), format!("transformers dense {}", float.name()));
}

#[test]
fn bf16_dense_copy_converts_like_the_upstream_model_minmax() {
    assert_same_conversion(Float::Bf16, true, "gpt-oss-120b-3.6bit", MINMAX);
}

#[test]
fn f32_dense_copy_converts_like_the_upstream_model_minmax() {
    assert_same_conversion(Float::F32, false, "gpt-oss-120b-3.6bit", MINMAX);
}

#[test]
fn dense_copy_converts_like_the_upstream_model_mse() {
    assert_same_conversion(Float::Bf16, false, "mixed_3_6", &["--quantizer", "mse"]);
}

#[test]
fn dense_copy_converts_like_the_upstream_model_gptq() {
    // One statistics file serves both: the dense copy has the upstream model's fingerprint.
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.safetensors");
    let args = ["calibrate", "--model", MODEL, "--text", DEV_TEXT, "--max-tokens", "512", "--ctx", "128", "--hessian", "--out", s(&stats), "--quiet"];
    let r = mixq(&args, &[]);
    assert!(r.status.success(), "{}", text(&r).1);
    assert_same_conversion(Float::Bf16, false, "mixed_3_6", &["--quantizer", "gptq", "--calibration", s(&stats)]);
}

#[test]
fn inspect_names_the_dense_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = write_dense(&tmp.path().join("dense"), Float::F32, false, |_| {});
    let r = mixq(&["inspect", dense.to_str().unwrap()], &[]);
    let (out, err) = text(&r);
    assert!(r.status.success(), "{err}");
    assert!(out.contains("transformers dense") && out.contains("F32"), "{out}");
}

#[test]
fn mislabelled_dense_shape_is_named_with_the_expected_shape() {
    let tmp = tempfile::tempdir().unwrap();
    // gate_up saved untransposed, [E, 2I, H]: the layout's shape check must name it.
    let name = "model.layers.0.mlp.experts.gate_up_proj";
    let dense = write_dense(&tmp.path().join("dense"), Float::Bf16, false, |t| {
        let (_, shape, _) = t.get_mut(name).unwrap();
        shape.swap(1, 2);
    });
    let (s, o) = (dense.to_str().unwrap(), tmp.path().join("out"));
    let r = mixq(&["convert", "--source", s, "--recipe", "gpt-oss-120b-3.6bit", "--out", o.to_str().unwrap(), "--quiet"], &[]);
    let err = text(&r).1;
    assert!(!r.status.success());
    assert!(err.contains(name) && err.contains("expected shape [16, 256, 512], found [16, 512, 256]"), "{err}");
}

/// What `mxfp4-experts` of a dense copy keeps of the upstream original's MXFP4 experts.
#[derive(Debug, Default, PartialEq)]
struct BlockCounts {
    blocks: usize,
    /// Blocks whose codes or scale differ from the original's.
    differing: usize,
    /// Of those, blocks whose largest value is below 4 x their scale: mlx picks a smaller scale.
    rescaled: usize,
    /// Of those, blocks holding a -0 code (8), which mlx writes as code 0.
    negative_zero: usize,
}

/// The E2M1 code of each element of one block (16 bytes, low nibble first).
fn block_codes(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    bytes.iter().flat_map(|b| [b & 0x0f, b >> 4])
}

/// Compares the experts of the two conversions block by block. The dense copy holds the
/// original's exact values, and mx.quantize's scale is the smallest power of two at least
/// max|w|/6, so every value must dequantize identically; a block's bytes must equal the
/// original's exactly when the original is what that rule gives: its largest code magnitude 4 or
/// 6 (the scale is then already the smallest that holds it), no -0 code, or all zero at scale 2^0.
fn compare_mxfp4_experts(original: &[u8], original_scales: &[u8], dense: &[u8], dense_scales: &[u8], counts: &mut BlockCounts) {
    assert_eq!((original.len(), original_scales.len()), (dense.len(), dense_scales.len()));
    for (k, (a, b)) in original.chunks_exact(16).zip(dense.chunks_exact(16)).enumerate() {
        let (sa, sb) = (original_scales[k], dense_scales[k]);
        let value = |code: u8, s: u8| E2M1[usize::from(code)] * 2f32.powi(i32::from(s) - 127);
        for (ca, cb) in block_codes(a).zip(block_codes(b)) {
            assert_eq!(value(ca, sa), value(cb, sb), "block {k}: a value changed");
        }
        let max = block_codes(a).map(|c| c & 7).max().unwrap_or(0);
        let has_negative_zero = block_codes(a).any(|c| c == 8);
        let canonical = !has_negative_zero && (max >= 6 || (max == 0 && sa == 127));
        let same = a == b && sa == sb;
        assert_eq!(same, canonical, "block {k}: original scale {sa} codes {a:?}, from dense scale {sb} codes {b:?}");
        counts.blocks += 1;
        if !same {
            counts.differing += 1;
            counts.rescaled += usize::from(max != 0 && max < 6);
            counts.negative_zero += usize::from(has_negative_zero);
        }
    }
}

/// `mxfp4-experts` of a dense copy against the upstream original's: every tensor but the expert
/// weights is byte-identical, and the experts are re-encoded as mx.quantize(mode="mxfp4") encodes
/// the dense values (byte for byte: tests/interop/test_mxfp4_interop.py), which keeps every value
/// and the original's bytes where they are what mlx would pick (see [`compare_mxfp4_experts`]).
fn assert_mxfp4_experts_from_dense(float: Float, sharded: bool) -> BlockCounts {
    let tmp = tempfile::tempdir().unwrap();
    let dense = write_dense(&tmp.path().join("dense"), float, sharded, |_| {});
    let (a, b) = (tmp.path().join("from-upstream"), tmp.path().join("from-dense"));
    convert(Path::new(MODEL), "mxfp4-experts", &a, MINMAX);
    convert(&dense, "mxfp4-experts", &b, MINMAX);
    let (ta, tb) = (tensors_of(&a), tensors_of(&b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let mut counts = BlockCounts::default();
    for (name, x) in &ta {
        let Some(module) = name.strip_suffix(".weight").filter(|m| m.contains(".mlp.experts.")) else {
            if !(name.contains(".mlp.experts.") && name.ends_with(".scales")) {
                assert!(x == &tb[name], "tensor {name} differs between the upstream and the dense conversion");
            }
            continue;
        };
        let scales = format!("{module}.scales");
        let (wa, sa, wb, sb) = (&x.2, &ta[&scales].2, &tb[name].2, &tb[&scales].2);
        assert_eq!((&x.0, &x.1), (&tb[name].0, &tb[name].1), "{name}: dtype and shape");
        assert_eq!((&ta[&scales].0, &ta[&scales].1), (&tb[&scales].0, &tb[&scales].1), "{scales}: dtype and shape");
        compare_mxfp4_experts(wa, sa, wb, sb, &mut counts);
    }
    // 6 layers of 16 experts: gate and up 256 rows each, down 256 rows, 256 / 32 blocks a row.
    assert_eq!(counts.blocks, 6 * 16 * (256 + 256 + 256) * (256 / 32), "every expert block of the model was compared");
    eprintln!("{float:?}: {counts:?}");
    counts
}

#[test]
fn mxfp4_experts_from_a_bf16_dense_copy_keeps_every_value() {
    assert_mxfp4_experts_from_dense(Float::Bf16, true);
}

#[test]
fn mxfp4_experts_from_an_f32_dense_copy_is_the_bf16_result() {
    let (bf16, f32) = (assert_mxfp4_experts_from_dense(Float::Bf16, false), assert_mxfp4_experts_from_dense(Float::F32, false));
    assert_eq!(bf16, f32);
}

/// Greedy tokens, seeded sampled tokens and the float32 logits (the .npy file's bytes) of a model.
fn outputs(model: &Path, ids: &Path, out: &Path) -> (Value, Value, Vec<u8>) {
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--model", s(model), "--prompt", "ROMEO:\nBut soft", "--max-tokens", "32", "--ignore-eos"];
        args.extend_from_slice(extra);
        json(&args)["tokens"].clone()
    };
    let greedy = run(&[]);
    let sampled = run(&["--temp", "0.9", "--top-p", "0.95", "--seed", "5"]);
    let r = mixq(&["logits", "--model", s(model), "--tokens", s(ids), "--out", s(out)], &[]);
    assert!(r.status.success(), "{}", text(&r).1);
    (greedy, sampled, std::fs::read(out).unwrap())
}

/// 150 token ids: past the sliding window and the 64-token prefill chunks.
fn token_file(dir: &Path) -> std::path::PathBuf {
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 7919 + 13) % 2048).collect();
    let path = dir.join("ids.json");
    std::fs::write(&path, serde_json::to_string(&ids).unwrap()).unwrap();
    path
}

/// `run` (greedy and seeded sampling) and `logits` on the BF16 (sharded) and F32 dense copies give
/// the upstream model's tokens and bit-identical logits: every weight decodes to the same f32.
#[test]
fn dense_copies_run_like_the_upstream_model() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = token_file(tmp.path());
    let (greedy, sampled, logits) = outputs(Path::new(MODEL), &ids, &tmp.path().join("upstream.npy"));
    assert_eq!(greedy.as_array().unwrap().len(), 32);
    for (float, sharded) in [(Float::Bf16, true), (Float::F32, false)] {
        let dense = write_dense(&tmp.path().join(float.name()), float, sharded, |_| {});
        let (g, sm, l) = outputs(&dense, &ids, &tmp.path().join(format!("{}.npy", float.name())));
        assert_eq!(g, greedy, "{float:?}: greedy tokens");
        assert_eq!(sm, sampled, "{float:?}: seeded sampled tokens");
        assert_eq!(l.len(), logits.len());
        assert!(l == logits, "{float:?}: logits are not bit-identical to the upstream model's");
    }
}

/// Every statistics tensor and metadata entry of a calibration file except the model's label.
fn statistics(path: &Path) -> (BTreeMap<String, String>, BTreeMap<String, Vec<u8>>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: BTreeMap<String, String> = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    assert!(meta.remove("model").is_some(), "the file names its model");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    (meta, st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect())
}

/// `calibrate` on a dense copy writes the upstream model's statistics, bit for bit, under the same
/// fingerprint (the norms are the same values; an F32 copy's are hashed as BF16).
#[test]
fn calibrating_a_dense_copy_gives_the_upstream_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let calibrate = |model: &Path, out: &Path| {
        json(&["calibrate", "--model", s(model), "--text", DEV_TEXT, "--max-tokens", "300", "--ctx", "128", "--out", s(out)]);
        statistics(out)
    };
    let (meta, tensors) = calibrate(Path::new(MODEL), &tmp.path().join("upstream.safetensors"));
    assert!(meta.contains_key("weights_sha256") && tensors.len() > 20, "{meta:?}");
    for float in [Float::Bf16, Float::F32] {
        let dense = write_dense(&tmp.path().join(float.name()), float, false, |_| {});
        let (m, t) = calibrate(&dense, &tmp.path().join(format!("{}.safetensors", float.name())));
        assert_eq!(m, meta, "{float:?}: metadata (fingerprints, text, tokens)");
        assert_eq!(t.keys().collect::<Vec<_>>(), tensors.keys().collect::<Vec<_>>());
        for (name, v) in &t {
            assert!(v == &tensors[name], "{float:?}: statistics {name} differ");
        }
    }
}

/// `validate --reference DENSE_COPY` of a conversion gives the figures it gives with the upstream
/// model as reference, and `validate` of the dense copy itself its perplexity.
#[test]
fn a_dense_copy_is_the_same_reference_for_validate() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    convert(Path::new(MODEL), "gpt-oss-120b-3.6bit", &q, MINMAX);
    let dense = write_dense(&tmp.path().join("dense"), Float::Bf16, true, |_| {});
    let validate = |model: &Path, reference: Option<&Path>| {
        let mut args = vec!["validate", "--model", s(model), "--text", DEV_TEXT, "--ctx", "64", "--max-tokens", "257", "--quiet"];
        if let Some(r) = reference {
            args.extend(["--reference", s(r)]);
        }
        json(&args)
    };
    let want = validate(&q, Some(Path::new(MODEL)));
    assert!(want["reference"]["kl_mean"].as_f64().unwrap() > 0.0, "{want}");
    assert_eq!(validate(&q, Some(&dense)), want);
    assert_eq!(validate(&dense, None), validate(Path::new(MODEL), None));
}

/// `plan` sizes a dense source as it is on disk (every tensor in its float type, experts dense),
/// from a folder's headers and from its config.json alone (`torch_dtype`), and names its layout.
#[test]
fn plan_prints_the_dense_source_size() {
    let tmp = tempfile::tempdir().unwrap();
    let source = |src: &Path| json(&["plan", "--source", s(src), "--recipe", "gpt-oss-120b-3.6bit"])["source_checkpoint"].clone();
    let upstream = source(Path::new(MODEL));
    assert_eq!(upstream["bytes"].as_u64(), Some(mixq_loader::Checkpoint::open(Path::new(MODEL)).unwrap().tensor_bytes()));
    assert_eq!(upstream["layout"], "MXFP4 experts, BF16 rest");
    for float in [Float::Bf16, Float::F32] {
        let dense = write_dense(&tmp.path().join(float.name()), float, false, |_| {});
        let bytes = mixq_loader::Checkpoint::open(&dense).unwrap().tensor_bytes();
        for src in [dense.clone(), dense.join("config.json")] {
            let p = source(&src);
            assert_eq!(p["bytes"].as_u64(), Some(bytes), "{}", src.display());
            assert_eq!(p["layout"], format!("transformers dense {}", float.name()));
            assert_eq!(p["parameters"], upstream["parameters"]);
        }
        let r = mixq(&["plan", "--source", s(&dense), "--recipe", "gpt-oss-120b-3.6bit"], &[]);
        let table = text(&r).0;
        let line = format!("source (transformers dense {}): {} bytes", float.name(), mixq_quantizer::sizes::thousands(bytes as usize));
        assert!(table.contains(&line), "{line}\n{table}");
    }
}

/// An F16 dense copy: every expert value (E2M1 x 2^e, e in -9..-4 here) is exact in F16, but 321
/// small BF16 values elsewhere fall below F16's normal range and lose bits. Its conversion's expert
/// tensors are the upstream conversion's byte for byte, and it runs (directly and converted) with
/// the upstream model's greedy tokens and logits within a small KL.
#[test]
fn f16_dense_copy_converts_and_runs() {
    let values = common::dense::dense_values();
    let inexact = |experts: bool| -> usize {
        values
            .iter()
            .flatten()
            .filter(|(n, _)| n.ends_with("_proj") == experts)
            .map(|(_, (_, v))| v.iter().filter(|&&x| Float::F16.round(x) != x).count())
            .sum()
    };
    assert_eq!(inexact(true), 0, "expert values are exact in F16");
    let rounded = inexact(false);
    eprintln!("F16 copy: {rounded} non-expert values not exact in F16");
    assert!(rounded > 0 && rounded < 1000, "{rounded}");

    let tmp = tempfile::tempdir().unwrap();
    let dense = write_dense(&tmp.path().join("f16"), Float::F16, false, |_| {});
    let (a, b) = (tmp.path().join("from-upstream"), tmp.path().join("from-f16"));
    convert(Path::new(MODEL), "gpt-oss-120b-3.6bit", &a, MINMAX);
    convert(&dense, "gpt-oss-120b-3.6bit", &b, MINMAX);
    let (ta, tb) = (tensors_of(&a), tensors_of(&b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let differing: Vec<&String> = ta.keys().filter(|n| ta[*n] != tb[*n]).collect();
    eprintln!("F16 copy: {} of {} converted tensors differ: {differing:?}", differing.len(), ta.len());
    assert!(differing.iter().all(|n| !n.contains(".mlp.experts.") || n.ends_with(".bias")), "{differing:?}");

    let ids = token_file(tmp.path());
    let (greedy, _, logits) = outputs(Path::new(MODEL), &ids, &tmp.path().join("upstream.npy"));
    let (q_greedy, _, q_logits) = outputs(&a, &ids, &tmp.path().join("q.npy"));
    for (model, want_greedy, want_logits) in [(&dense, &greedy, &logits), (&b, &q_greedy, &q_logits)] {
        let (g, _, l) = outputs(model, &ids, &tmp.path().join("f16.npy"));
        assert_eq!(&g, want_greedy, "{}: greedy tokens", model.display());
        let kl = common::mean_kl(&common::npy_f32(want_logits), &common::npy_f32(&l), 2048);
        eprintln!("{}: mean KL to the upstream's {kl:.3e}", model.display());
        assert!(kl > 0.0 && kl < 1e-4, "{}: mean KL {kl:e}", model.display());
    }
}

/// `sensitivity` with measured KL on a dense copy gives the upstream model's costs, unit by unit.
#[test]
fn sensitivity_of_a_dense_copy_is_the_upstream_models() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = write_dense(&tmp.path().join("dense"), Float::Bf16, false, |_| {});
    let measure = |model: &Path, out: &Path| {
        let args = ["sensitivity", "--model", s(model), "--text", DEV_TEXT, "--tokens", "128", "--bits", "3,5", "--group-sizes", "64", "--out", s(out), "--quiet"];
        let r = mixq(&args, &[]);
        assert!(r.status.success(), "{}", text(&r).1);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
        for k in ["seconds", "model"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    let want = measure(Path::new(MODEL), &tmp.path().join("upstream.json"));
    assert_eq!(want["cost_kind"], "kl", "{want}");
    assert_eq!(measure(&dense, &tmp.path().join("dense.json")), want);
}

/// On a dense source the mxfp4 setting of an expert unit is a real encoding: where the values are
/// MXFP4's (the dense copy) it costs nothing, and where they are not (layer 0's down_proj scaled by
/// 1.1) its proxy is the relative squared error of what `convert --recipe mxfp4-experts` writes
/// (mx.quantize's encoding, byte for byte: tests/interop/test_mxfp4_interop.py), decoded here.
#[test]
fn sensitivity_prices_mxfp4_on_a_dense_source_by_its_encoding_error() {
    let tmp = tempfile::tempdir().unwrap();
    const DOWN: &str = "model.layers.0.mlp.experts.down_proj";
    let dense = write_dense(&tmp.path().join("dense"), Float::F32, false, |t| {
        let (_, _, bytes) = t.get_mut(DOWN).expect("layer 0's dense down_proj");
        for b in bytes.chunks_exact_mut(4) {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * 1.1;
            b.copy_from_slice(&v.to_le_bytes());
        }
    });
    let sens = tmp.path().join("sens.json");
    let args = ["sensitivity", "--model", s(&dense), "--bits", "3", "--group-sizes", "64", "--probe-tokens", "0", "--out", s(&sens), "--quiet"];
    let r = mixq(&args, &[]);
    assert!(r.status.success(), "{}", text(&r).1);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&sens).unwrap()).unwrap();
    let mxfp4_proxy = |module: &str| -> f64 {
        let unit = v["units"].as_array().unwrap().iter().find(|u| u["module"] == module).unwrap_or_else(|| panic!("{module}"));
        let m: Vec<&Value> = unit["settings"].as_array().unwrap().iter().filter(|x| x["mode"] == "mxfp4").collect();
        assert_eq!(m.len(), 1, "{unit}");
        assert_eq!((&m[0]["bits"], &m[0]["group_size"]), (&Value::from(4), &Value::from(32)));
        m[0]["proxy"].as_f64().unwrap()
    };
    assert_eq!(mxfp4_proxy("model.layers.1.mlp.experts.down_proj"), 0.0, "values that are MXFP4's are kept exactly");
    assert!(v["units"].as_array().unwrap().iter().filter(|u| u["class"] == "q_proj").all(|u| u["settings"].as_array().unwrap().iter().all(|x| x.get("mode").is_none())));

    // The reference: the encoded blocks that convert writes, decoded against the dense values.
    let out = tmp.path().join("mxfp4");
    convert(&dense, "mxfp4-experts", &out, MINMAX);
    let t = tensors_of(&out);
    let (blocks, scales) = (&t[&format!("{DOWN}.weight")].2, &t[&format!("{DOWN}.scales")].2);
    let d = write_dense(&tmp.path().join("values"), Float::F32, false, |_| {});
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let raw = st.tensor(DOWN).unwrap();
    let (e, c, r) = (raw.shape()[0], raw.shape()[1], raw.shape()[2]);
    let dense_at = |i: usize| 1.1 * f32::from_le_bytes(raw.data()[4 * i..4 * i + 4].try_into().unwrap());
    let (mut err, mut sig) = (0f64, 0f64);
    for (k, code) in block_codes(blocks).enumerate() {
        // MLX order [E, R, C]: element (x, row, col) is dense [x, col, row].
        let (x, row, col) = (k / (r * c), (k / c) % r, k % c);
        let q = E2M1[usize::from(code)] * 2f32.powi(i32::from(scales[k / 32]) - 127);
        let w = dense_at((x * c + col) * r + row);
        err += f64::from(q - w).powi(2);
        sig += f64::from(w).powi(2);
    }
    assert_eq!(block_codes(blocks).count(), e * r * c);
    let (got, want) = (mxfp4_proxy(DOWN), err / sig);
    eprintln!("mxfp4 proxy of the scaled down_proj: {got:.6e} (decoded conversion: {want:.6e})");
    assert!(want > 0.0 && (got - want).abs() <= 1e-9 * want.max(1e-30) + 1e-6 * want, "{got} vs {want}");
}
