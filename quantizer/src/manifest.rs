//! `mixq-manifest.json`: the recipe used and the sha256 and size of every file written.

use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::ConvertError;
use crate::plan::PlanSummary;
use crate::provenance::Provenance;
use crate::recipe::Recipe;

/// File name of the manifest.
pub const MANIFEST_FILE: &str = "mixq-manifest.json";

/// Streams a file through sha256, returning (hex digest, size).
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("{:x}", hasher.finalize()), size))
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Hashes every file in `dir` (in parallel) and writes the manifest.
pub fn write_manifest(
    dir: &Path,
    source: &str,
    recipe: &Recipe,
    summary: &PlanSummary,
    provenance: &Provenance,
) -> Result<(), ConvertError> {
    use rayon::prelude::*;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ConvertError::Io { path: p, source }
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST_FILE)
        .collect();
    names.sort();
    let files: Vec<Value> = names
        .par_iter()
        .map(|n| {
            let p = dir.join(n);
            let (sha, size) = sha256_file(&p).map_err(io(&p))?;
            Ok(json!({"name": n, "size": size, "sha256": sha}))
        })
        .collect::<Result<_, ConvertError>>()?;
    let manifest = json!({
        "format": "mixq-manifest/1",
        "mixq_version": env!("CARGO_PKG_VERSION"),
        "source": source,
        "recipe": {
            "name": recipe.name,
            "origin": recipe.origin,
            "sha256": sha256_hex(recipe.text.as_bytes()),
            "text": recipe.text,
        },
        "quantizer": provenance.to_json(),
        "total_bytes": summary.bytes,
        "total_parameters": summary.params,
        "bits_per_weight": summary.bits_per_weight(),
        "files": files,
    });
    let path = dir.join(MANIFEST_FILE);
    let mut text = serde_json::to_string_pretty(&manifest).expect("JSON values always serialize");
    text.push('\n');
    std::fs::write(&path, text).map_err(io(&path))
}
