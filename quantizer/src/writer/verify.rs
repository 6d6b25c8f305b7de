//! `mixq verify`: an MLX checkpoint against its manifest, its index and its config.

use std::collections::BTreeMap;
use std::path::Path;

use mixq_loader::file_name::not_a_file_name;
use mixq_loader::mlx_layout::param_format;
use mixq_loader::{Checkpoint, LoaderError, TensorSpec};
use serde_json::Value;

use crate::writer::hash::sha256_file;
use crate::writer::manifest::MANIFEST_FILE;

/// The tokenizer file a usable model folder holds.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
use mixq_loader::schema::mlx_params;

/// The outcome of a verification: what was checked and every mismatch found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Files whose hash was checked.
    pub files_checked: usize,
    /// Tensors whose dtype and shape were checked.
    pub tensors_checked: usize,
    /// Human-readable mismatches; empty means the checkpoint is sound.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Whether nothing was wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The tensors an MLX gpt-oss checkpoint must hold, given its config, its quantization map and
/// (for modules the map does not name) its `.scales` tensors, as mlx-lm reads them.
pub fn expected_mlx_tensors(ckpt: &Checkpoint) -> Result<Vec<TensorSpec>, LoaderError> {
    let mut out = Vec::new();
    for param in mlx_params(ckpt.config()) {
        let format = param_format(ckpt, &param)?;
        out.extend(format.outputs(&param.module, param.leaf, &param.shape));
    }
    Ok(out)
}

/// Checks every file against the manifest, the index against the shards, and the tensors against
/// what the config implies.
pub fn verify(dir: &Path) -> VerifyReport {
    let mut r = VerifyReport::default();
    if dir.is_dir() && !dir.join(MANIFEST_FILE).exists() {
        // Anything else (an upstream folder, another converter's output) would list every file
        // and tensor as a problem.
        r.problems.push(format!(
            "{}: not a mixq output (no {MANIFEST_FILE}); verify checks what mixq convert wrote; `mixq inspect` describes any checkpoint",
            dir.display()
        ));
        if let Err(e) = Checkpoint::open(dir) {
            r.problems.push(e.to_string());
        }
        return r;
    }
    check_manifest(dir, &mut r);
    if dir.is_dir() && !dir.join(TOKENIZER_FILE).is_file() {
        r.problems.push(format!("{TOKENIZER_FILE}: missing; mlx-lm cannot tokenize text for this model (copy the source's tokenizer files in, then refresh the manifest by converting again)"));
    }
    let ckpt = match Checkpoint::open(dir) {
        Ok(c) => c,
        Err(e) => {
            r.problems.push(e.to_string());
            return r;
        }
    };
    for shard in ckpt.shards() {
        if shard.metadata().get("format").map(String::as_str) != Some("mlx") {
            r.problems.push(format!("{}: metadata format is not \"mlx\"", shard.path().display()));
        }
    }
    if let Some(index) = ckpt.index() {
        let total = index.pointer("/metadata/total_size").and_then(Value::as_u64);
        if total != Some(ckpt.tensor_bytes()) {
            r.problems.push(format!(
                "{}: metadata.total_size is {total:?} but the shards hold {} bytes of tensors",
                mixq_loader::INDEX_FILE,
                ckpt.tensor_bytes()
            ));
        }
    }
    let expected = match expected_mlx_tensors(&ckpt) {
        Ok(e) => e,
        Err(e) => {
            r.problems.push(e.to_string());
            return r;
        }
    };
    for t in &expected {
        r.tensors_checked += 1;
        match ckpt.tensor(&t.name) {
            Err(_) => r.problems.push(format!("tensor {}: missing (the config implies {} {:?})", t.name, t.dtype, t.shape)),
            Ok(got) => {
                if got.info.dtype != t.dtype || got.info.shape != t.shape {
                    r.problems.push(format!(
                        "tensor {}: config implies {} {:?}, found {} {:?}",
                        t.name, t.dtype, t.shape, got.info.dtype, got.info.shape
                    ));
                }
            }
        }
    }
    let names: std::collections::HashSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    for name in ckpt.names() {
        if !names.contains(name) {
            r.problems.push(format!("tensor {name}: not implied by the config"));
        }
    }
    r
}

/// Why a manifest entry's `name` is not a plain file name (the manifest lists the files of one
/// flat folder), if it is not.
fn not_a_plain_file_name(name: &str) -> Option<&'static str> {
    if let Some(why) = not_a_file_name(name) {
        Some(why)
    } else if name == "." || name == ".." {
        Some("it names a folder")
    } else {
        None
    }
}

fn check_manifest(dir: &Path, r: &mut VerifyReport) {
    let path = dir.join(MANIFEST_FILE);
    let manifest: Value = match std::fs::read_to_string(&path).map(|t| serde_json::from_str(&t)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return r.problems.push(format!("{}: not valid JSON: {e}", path.display())),
        Err(e) => return r.problems.push(format!("{}: {e}", path.display())),
    };
    let Some(files) = manifest.get("files").and_then(Value::as_array) else {
        return r.problems.push(format!("{}: no `files` list", path.display()));
    };
    let mut listed = BTreeMap::new();
    for f in files {
        let (Some(name), Some(size), Some(sha)) =
            (f.get("name").and_then(Value::as_str), f.get("size").and_then(Value::as_u64), f.get("sha256").and_then(Value::as_str))
        else {
            r.problems.push(format!("{}: malformed entry {f}", path.display()));
            continue;
        };
        if let Some(why) = not_a_plain_file_name(name) {
            // The name is joined to the checkpoint folder and hashed: it must stay inside it.
            r.problems.push(format!("{}: entry {name:?} is not a plain file name in the checkpoint folder ({why})", path.display()));
            continue;
        }
        listed.insert(name.to_string(), ());
        let file = dir.join(name);
        match sha256_file(&file) {
            Err(e) => r.problems.push(format!("{name}: listed in the manifest but unreadable: {e}")),
            Ok((got_sha, got_size)) => {
                r.files_checked += 1;
                if got_size != size {
                    r.problems.push(format!("{name}: size {got_size} bytes, manifest says {size}"));
                } else if got_sha != sha {
                    r.problems.push(format!("{name}: sha256 {got_sha}, manifest says {sha}"));
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut extra: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != MANIFEST_FILE && !listed.contains_key(n))
            .collect();
        extra.sort();
        for n in extra {
            r.problems.push(format!("{n}: present but not in the manifest"));
        }
    }
}
