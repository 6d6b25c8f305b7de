//! `mixq-manifest.json`: the recipe used and the sha256 and size of every file written.

use std::collections::BTreeMap;
use std::path::Path;

use mixq_loader::SourceLayout;
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
    source_layout: SourceLayout,
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
            Ok(file_entry(n, size, &sha))
        })
        .collect::<Result<_, ConvertError>>()?;
    let manifest = manifest_value(source, source_layout, recipe, summary, provenance, files);
    let path = dir.join(MANIFEST_FILE);
    std::fs::write(&path, manifest_text(&manifest)).map_err(io(&path))
}

/// One file's entry in the manifest's `files` list.
pub(crate) fn file_entry(name: &str, size: u64, sha256: &str) -> Value {
    json!({"name": name, "size": size, "sha256": sha256})
}

/// The manifest of a conversion whose files are `files` (entries of [`file_entry`], sorted by name).
pub(crate) fn manifest_value(
    source: &str,
    source_layout: SourceLayout,
    recipe: &Recipe,
    summary: &PlanSummary,
    provenance: &Provenance,
    files: Vec<Value>,
) -> Value {
    json!({
        "format": "mixq-manifest/1",
        "mixq_version": env!("CARGO_PKG_VERSION"),
        "source": source,
        "source_layout": source_layout.describe(),
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
    })
}

/// The manifest as written: pretty JSON and a final newline.
pub(crate) fn manifest_text(manifest: &Value) -> String {
    let mut text = serde_json::to_string_pretty(manifest).expect("JSON values always serialize");
    text.push('\n');
    text
}

/// Writes `bytes` to `path` through a hidden file beside it and a rename, so a reader sees the
/// old content or the new, never a part.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), ConvertError> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.mixq-tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// After `file` in a mixq output was rewritten (a model card given a validation section): when
/// its folder holds a manifest, records the file's new size and sha256 there (adding the entry
/// if the manifest lacks it), replacing the manifest atomically. Returns the manifest's path, or
/// `None` when the folder holds none.
pub fn refresh_entry(file: &Path) -> Result<Option<std::path::PathBuf>, ConvertError> {
    let path = mixq_loader::file_name::folder_of(file).join(MANIFEST_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let bad = |why: &str| ConvertError::Manifest { path: path.clone(), message: why.to_string() };
    let mut manifest: Value = serde_json::from_str(&text).map_err(|e| bad(&format!("not valid JSON ({e})")))?;
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| bad("the file has no name"))?;
    let (sha, size) = sha256_file(file).map_err(io(file))?;
    let files = manifest.get_mut("files").and_then(Value::as_array_mut).ok_or_else(|| bad("no `files` list"))?;
    let entry = file_entry(&name, size, &sha);
    match files.iter_mut().find(|f| f.get("name").and_then(Value::as_str) == Some(name.as_str())) {
        Some(f) => *f = entry,
        None => {
            files.push(entry);
            files.sort_by(|a, b| a.get("name").and_then(Value::as_str).cmp(&b.get("name").and_then(Value::as_str)));
        }
    }
    replace_file(&path, manifest_text(&manifest).as_bytes())?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_file_gets_its_entry_refreshed_or_added() {
        let tmp = tempfile::tempdir().unwrap();
        let card = tmp.path().join("README.md");
        std::fs::write(&card, "old").unwrap();
        let m = json!({"format": "mixq-manifest/1", "files": [{"name": "README.md", "size": 3, "sha256": "x"}, {"name": "z", "size": 0, "sha256": "y"}]});
        std::fs::write(tmp.path().join(MANIFEST_FILE), manifest_text(&m)).unwrap();
        std::fs::write(&card, "new card").unwrap();
        assert!(refresh_entry(&card).unwrap().is_some());
        let other = tmp.path().join("VALIDATION.md");
        std::fs::write(&other, "v").unwrap();
        refresh_entry(&other).unwrap();
        let got: Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join(MANIFEST_FILE)).unwrap()).unwrap();
        let names: Vec<&str> = got["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["README.md", "VALIDATION.md", "z"]);
        assert_eq!(got["files"][0]["size"], 8);
        assert_eq!(got["files"][0]["sha256"].as_str().unwrap(), sha256_hex(b"new card"));
        assert!(!tmp.path().join(".mixq-manifest.json.mixq-tmp").exists());
        let elsewhere = tempfile::tempdir().unwrap();
        let lone = elsewhere.path().join("card.md");
        std::fs::write(&lone, "x").unwrap();
        assert!(refresh_entry(&lone).unwrap().is_none(), "no manifest, nothing to refresh");
    }
}
