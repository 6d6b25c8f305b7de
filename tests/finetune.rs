//! Fine-tunes in transformers' dense layout (issue 19): a dense copy of the bundled upstream model,
//! written here with its MXFP4 experts decoded (every E2M1 x 2^e value is exact in bf16 and f32),
//! converts to the same tensors, byte for byte, as the upstream original.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{mixq, text, RawShard};
use safetensors::{tensor::TensorView, Dtype as StDtype, SafeTensors};
use serde_json::Value;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");

/// A tensor as the fixture writes it: dtype, shape, little-endian bytes.
type Tensor = (StDtype, Vec<usize>, Vec<u8>);

/// The float type of the dense copy.
#[derive(Clone, Copy, Debug)]
enum Float {
    Bf16,
    F32,
}

impl Float {
    fn encode(self, v: f32) -> Vec<u8> {
        match self {
            Float::Bf16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            Float::F32 => v.to_le_bytes().to_vec(),
        }
    }

    fn dtype(self) -> StDtype {
        match self {
            Float::Bf16 => StDtype::BF16,
            Float::F32 => StDtype::F32,
        }
    }
}

/// FP4 E2M1 values by code, decoded here independently of the loader.
const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

fn shape_of(header: &serde_json::Map<String, Value>, name: &str) -> Vec<usize> {
    header[name]["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

/// Decodes `[E, R, C/32, 16]` blocks with `[E, R, C/32]` scales into transformers' transposed
/// dense tensor `[E, C, R]` (element `[e, c, r]` is upstream row `r`, column `c` of expert `e`).
fn dense_experts(blocks: &[u8], scales: &[u8], shape: &[usize], float: Float) -> Tensor {
    let (e, r, c) = (shape[0], shape[1], shape[2] * 32);
    let mut vals = vec![0f32; e * c * r];
    for x in 0..e {
        for row in 0..r {
            for col in 0..c {
                let byte = blocks[((x * r + row) * c + col) / 2];
                let code = if col % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let scale = 2f32.powi(i32::from(scales[(x * r + row) * (c / 32) + col / 32]) - 127);
                vals[(x * c + col) * r + row] = E2M1[usize::from(code)] * scale;
            }
        }
    }
    (float.dtype(), vec![e, c, r], vals.iter().flat_map(|&v| float.encode(v)).collect())
}

/// Every tensor of the bundled model in transformers' dense layout, grouped by source shard.
fn dense_tensors(float: Float) -> Vec<BTreeMap<String, Tensor>> {
    let mut shards = Vec::new();
    for file in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let raw = RawShard::read(&Path::new(MODEL).join(file));
        let mut out = BTreeMap::new();
        for name in raw.header.keys().filter(|k| *k != "__metadata__") {
            let bytes = &raw.data[raw.range(name)];
            if let Some(stem) = name.strip_suffix("_blocks") {
                let scales = &raw.data[raw.range(&format!("{stem}_scales"))];
                out.insert(stem.to_string(), dense_experts(bytes, scales, &shape_of(&raw.header, name), float));
            } else if !name.ends_with("_scales") {
                assert_eq!(raw.header[name]["dtype"], "BF16", "{name}");
                let vals = bytes.chunks_exact(2).flat_map(|b| float.encode(f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)));
                out.insert(name.clone(), (float.dtype(), shape_of(&raw.header, name), vals.collect()));
            }
        }
        shards.push(out);
    }
    shards
}

/// Writes the dense copy: the side files (config.json without `quantization_config`, as
/// `save_pretrained` writes it after dequantizing), and the tensors in one file or two shards.
fn write_dense(dir: &Path, float: Float, sharded: bool, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
        std::fs::copy(Path::new(MODEL).join(f), dir.join(f)).unwrap();
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(Path::new(MODEL).join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut shards = dense_tensors(float);
    if !sharded {
        let all = shards.drain(..).flatten().collect();
        shards.push(all);
    }
    edit(shards.first_mut().unwrap());
    let mut weight_map = serde_json::Map::new();
    for (i, tensors) in shards.iter().enumerate() {
        let file = if sharded { format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len()) } else { "model.safetensors".into() };
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        weight_map.extend(tensors.keys().map(|n| (n.clone(), Value::String(file.clone()))));
    }
    if sharded {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    dir.to_path_buf()
}

fn convert(src: &Path, recipe: &str, out: &Path, quantizer: &str) {
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let r = mixq(&["convert", "--source", s, "--recipe", recipe, "--out", o, "--quantizer", quantizer, "--quiet"], &[]);
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
fn assert_same_conversion(float: Float, sharded: bool, recipe: &str, quantizer: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dense = write_dense(&tmp.path().join("dense"), float, sharded, |_| {});
    let (a, b) = (tmp.path().join("from-upstream"), tmp.path().join("from-dense"));
    convert(Path::new(MODEL), recipe, &a, quantizer);
    convert(&dense, recipe, &b, quantizer);
    let (ta, tb) = (tensors_of(&a), tensors_of(&b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, x) in &ta {
        assert!(x == &tb[name], "{recipe} {quantizer}: tensor {name} differs between the upstream and the dense conversion");
    }
    assert!(ta.len() > 100, "the model has all its tensors");
}

#[test]
fn bf16_dense_copy_converts_like_the_upstream_model_minmax() {
    assert_same_conversion(Float::Bf16, true, "gpt-oss-120b-3.6bit", "minmax");
}

#[test]
fn f32_dense_copy_converts_like_the_upstream_model_minmax() {
    assert_same_conversion(Float::F32, false, "gpt-oss-120b-3.6bit", "minmax");
}

#[test]
fn dense_copy_converts_like_the_upstream_model_mse() {
    assert_same_conversion(Float::Bf16, false, "mixed_3_6", "mse");
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
    convert(Path::new(MODEL), "mxfp4-experts", &a, "minmax");
    convert(&dense, "mxfp4-experts", &b, "minmax");
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
