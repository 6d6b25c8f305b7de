//! `mixq-manifest.json`: the recipe used and the sha256 and size of every file written.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{io, ConvertError};
use crate::writer::hash::{sha256_file, sha256_hex};
use crate::recipe::plan::PlanSummary;
use crate::writer::provenance::Provenance;
use crate::recipe::language::Recipe;
use crate::writer::staging::{ShardRecord, JOURNAL_FILE};

/// File name of the manifest.
pub const MANIFEST_FILE: &str = "mixq-manifest.json";

/// Hashes every file in `dir` (in parallel; `known` ones are taken as recorded) and writes the
/// manifest.
pub fn write_manifest(
    dir: &Path,
    known: &BTreeMap<String, ShardRecord>,
    source: &str,
    recipe: &Recipe,
    summary: &PlanSummary,
    provenance: &Provenance,
) -> Result<(), ConvertError> {
    use rayon::prelude::*;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST_FILE && n != JOURNAL_FILE)
        .collect();
    names.sort();
    let files: Vec<Value> = names
        .par_iter()
        .map(|n| {
            let p = dir.join(n);
            let (sha, size) = match known.get(n) {
                Some(r) => (r.sha256.clone(), r.size),
                None => sha256_file(&p).map_err(io(&p))?,
            };
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
