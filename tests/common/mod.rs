//! Helpers shared by the end-to-end tests: running the CLI, making checkpoints, editing shards.

#![allow(dead_code)]

pub mod dense;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Runs the mixq binary with arguments and extra environment.
pub fn mixq(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixq"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the mixq binary runs")
}

/// Stdout and stderr of a run as text.
pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Writes a synthetic checkpoint of a preset shape, optionally overriding some dimensions.
pub fn synth(dir: &Path, preset: &str, edit: impl FnOnce(&mut mixq_synth::Shape)) -> PathBuf {
    let mut shape = mixq_synth::Shape::preset(preset).expect("known preset");
    edit(&mut shape);
    mixq_synth::write_checkpoint(dir, &shape).expect("synthetic checkpoint written");
    dir.to_path_buf()
}

/// A safetensors file split into its header and data section, for surgical edits.
pub struct RawShard {
    /// The parsed header.
    pub header: serde_json::Map<String, Value>,
    /// The data section.
    pub data: Vec<u8>,
}

impl RawShard {
    /// Reads a shard.
    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("shard readable");
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header = serde_json::from_slice::<Value>(&bytes[8..8 + n]).expect("valid header");
        RawShard { header: header.as_object().expect("object").clone(), data: bytes[8 + n..].to_vec() }
    }

    /// Writes it back (the header re-serialized, data unchanged).
    pub fn write(&self, path: &Path) {
        let header = serde_json::to_vec(&Value::Object(self.header.clone())).expect("serializes");
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.data);
        std::fs::write(path, out).expect("shard writable");
    }

    /// Byte range of a tensor in the data section.
    pub fn range(&self, name: &str) -> std::ops::Range<usize> {
        let o = self.header[name]["data_offsets"].as_array().expect("offsets");
        o[0].as_u64().expect("int") as usize..o[1].as_u64().expect("int") as usize
    }
}

/// The shard file holding a tensor, from the index.
pub fn shard_of(dir: &Path, tensor: &str) -> PathBuf {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("index")).expect("json");
    dir.join(index["weight_map"][tensor].as_str().expect("tensor in index"))
}

/// Names of the entries of a folder, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The size of every entry of a folder (all of them plain files), by name: what a model takes on disk.
pub fn file_sizes(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    std::fs::read_dir(dir)
        .expect("a folder")
        .map(|e| {
            let e = e.expect("an entry");
            let meta = e.metadata().expect("its metadata");
            assert!(meta.is_file(), "{} is not a plain file", e.path().display());
            (e.file_name().to_string_lossy().into_owned(), meta.len())
        })
        .collect()
}

/// The bundled dev text cut in two halves at a character boundary, written into `dir` as
/// (`first`, `second`).
pub fn dev_text_halves(dir: &Path, first: &str, second: &str) -> (PathBuf, PathBuf) {
    let t = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare-dev.txt")).expect("dev text");
    let mut cut = t.len() / 2;
    while !t.is_char_boundary(cut) {
        cut += 1;
    }
    let (a, b) = (dir.join(first), dir.join(second));
    std::fs::write(&a, &t[..cut]).expect("writable");
    std::fs::write(&b, &t[cut..]).expect("writable");
    (a, b)
}

/// Copies the checkpoint folder `src` to `dst` with every BF16 tensor (unquantized weights,
/// scales, biases, norms, sinks) stored as `dtype` (`"F32"` or `"F16"`), the other tensors and
/// files as they are (`"BF16"`: a plain copy): the forms mlx-lm writes with float32 or float16
/// parameters.
pub fn recast_floats(src: &Path, dst: &Path, dtype: &str) -> PathBuf {
    std::fs::create_dir_all(dst).expect("writable");
    for name in entries(src) {
        let from = src.join(&name);
        if !name.ends_with(".safetensors") {
            if from.is_file() {
                std::fs::copy(&from, dst.join(&name)).expect("copyable");
            }
            continue;
        }
        let raw = RawShard::read(&from);
        let mut out = RawShard { header: serde_json::Map::new(), data: Vec::new() };
        let mut names: Vec<&String> = raw.header.keys().filter(|k| *k != "__metadata__").collect();
        names.sort_by_key(|k| raw.range(k).start);
        for k in names {
            let mut entry = raw.header[k].clone();
            let bytes = &raw.data[raw.range(k)];
            let bytes = if entry["dtype"] == "BF16" && dtype != "BF16" {
                entry["dtype"] = Value::from(dtype);
                let values = bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32());
                match dtype {
                    "F32" => values.flat_map(f32::to_le_bytes).collect(),
                    "F16" => values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
                    other => panic!("recast_floats: {other} is not F32 or F16"),
                }
            } else {
                bytes.to_vec()
            };
            entry["data_offsets"] = serde_json::json!([out.data.len(), out.data.len() + bytes.len()]);
            out.data.extend_from_slice(&bytes);
            out.header.insert(k.clone(), entry);
        }
        if let Some(m) = raw.header.get("__metadata__") {
            out.header.insert("__metadata__".into(), m.clone());
        }
        out.write(&dst.join(&name));
    }
    dst.to_path_buf()
}

/// The float32 values of a version-1 .npy file's bytes.
pub fn npy_f32(bytes: &[u8]) -> Vec<f32> {
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// KL(softmax(p) || softmax(q)) of each position's logits (`vocab` per position).
pub fn kl_per_position(p: &[f32], q: &[f32], vocab: usize) -> Vec<f64> {
    assert_eq!(p.len(), q.len());
    let lse = |r: &[f32]| {
        let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
    };
    p.chunks_exact(vocab)
        .zip(q.chunks_exact(vocab))
        .map(|(a, b)| {
            let (la, lb) = (lse(a), lse(b));
            a.iter().zip(b).map(|(&x, &y)| (x as f64 - la).exp() * ((x as f64 - la) - (y as f64 - lb))).sum()
        })
        .collect()
}

/// Mean of [`kl_per_position`].
pub fn mean_kl(p: &[f32], q: &[f32], vocab: usize) -> f64 {
    let kl = kl_per_position(p, q, vocab);
    kl.iter().sum::<f64>() / kl.len().max(1) as f64
}
