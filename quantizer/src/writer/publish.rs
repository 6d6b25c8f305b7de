//! `mixq publish`: a converted model verified against its manifest, then uploaded to the hub
//! (files, sizes and hashes from the manifest the verification just checked).

use std::path::{Path, PathBuf};

use mixq_loader::hub_upload::{upload_folder, UploadError, UploadFile, UploadProgress, UploadReport, UploadTarget};
use mixq_loader::source::HubSettings;
use serde_json::Value;

use crate::writer::hash::sha256_file;
use crate::writer::manifest::MANIFEST_FILE;
use crate::writer::verify::verify;

/// Anything that stops a publish.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The folder does not verify: nothing was uploaded.
    #[error("{dir}: mixq verify found {} problem(s), so nothing was uploaded: {}", problems.len(), problems.join("; "))]
    NotVerified {
        /// The model folder.
        dir: PathBuf,
        /// What verify found.
        problems: Vec<String>,
    },
    /// The manifest could not be read after verification.
    #[error("{0}: {1}")]
    Manifest(PathBuf, String),
    /// The upload failed.
    #[error(transparent)]
    Upload(#[from] UploadError),
}

/// The files a verified mixq output consists of: every manifest entry, then the manifest.
fn files_of(dir: &Path) -> Result<Vec<UploadFile>, PublishError> {
    let path = dir.join(MANIFEST_FILE);
    let bad = |m: String| PublishError::Manifest(path.clone(), m);
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let manifest: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut files = Vec::new();
    for f in manifest.get("files").and_then(Value::as_array).ok_or_else(|| bad("no `files` list".into()))? {
        let (Some(name), Some(size), Some(sha256)) =
            (f.get("name").and_then(Value::as_str), f.get("size").and_then(Value::as_u64), f.get("sha256").and_then(Value::as_str))
        else {
            return Err(bad(format!("malformed entry {f}")));
        };
        files.push(UploadFile { name: name.to_string(), size, sha256: sha256.to_string() });
    }
    let (sha256, size) = sha256_file(&path).map_err(|e| bad(e.to_string()))?;
    files.push(UploadFile { name: MANIFEST_FILE.to_string(), size, sha256 });
    Ok(files)
}

/// Verifies `dir` and uploads it to `target` on the hub of `hub` (`HF_ENDPOINT`, `HF_TOKEN`).
/// Returns the files uploaded (for a progress total) and what the upload did.
pub fn publish(dir: &Path, target: &UploadTarget, hub: &HubSettings, progress: &UploadProgress<'_>) -> Result<UploadReport, PublishError> {
    let report = verify(dir);
    if !report.ok() {
        return Err(PublishError::NotVerified { dir: dir.to_path_buf(), problems: report.problems });
    }
    if hub.offline {
        return Err(UploadError::Offline.into());
    }
    let files = files_of(dir)?;
    Ok(upload_folder(dir, &files, target, &hub.endpoint, hub.token.as_deref(), progress)?)
}

/// Bytes of the files `publish` would send at most (every file of the verified folder).
pub fn folder_bytes(dir: &Path) -> u64 {
    files_of(dir).map(|f| f.iter().map(|f| f.size).sum()).unwrap_or(0)
}
