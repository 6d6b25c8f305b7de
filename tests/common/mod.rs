//! Helpers shared by the end-to-end tests: running the CLI, making checkpoints, editing shards.

#![allow(dead_code)]

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
