//! Resolving a `--source` argument: a local folder, a bare config.json, or a hub repo id.

use std::path::{Path, PathBuf};

use crate::checkpoint::INDEX_FILE;
use crate::error::{LoaderError, Result};

/// Files copied alongside the weights when present (tokenizer, chat template, generation config).
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// What a command needs from a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// config.json alone (planning).
    Config,
    /// Config, index, shards and side files (conversion).
    Everything,
}

/// A source resolved to local files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedSource {
    /// A checkpoint folder.
    Folder(PathBuf),
    /// Only a config.json file (enough for planning).
    ConfigFile(PathBuf),
}

impl ResolvedSource {
    /// The config.json path.
    pub fn config_path(&self) -> PathBuf {
        match self {
            ResolvedSource::Folder(dir) => dir.join("config.json"),
            ResolvedSource::ConfigFile(p) => p.clone(),
        }
    }
}

/// Where the hub cache lives and whether the network may be used.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The hub cache folder (the one holding `models--owner--name`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubSettings {
    /// Reads `HF_HUB_CACHE`, `HF_HOME` and `HF_HUB_OFFLINE` as huggingface_hub does.
    pub fn from_env() -> Self {
        let cache_dir = if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
            PathBuf::from(p)
        } else if let Some(p) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
            PathBuf::from(p).join("hub")
        } else {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache").join("huggingface").join("hub")
        };
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        HubSettings { cache_dir, offline, progress: true }
    }
}

/// Resolves a source with settings from the environment.
pub fn resolve_source(source: &str, need: Need) -> Result<ResolvedSource> {
    resolve_source_with(source, need, &HubSettings::from_env())
}

/// Whether a string has the shape of a hub repo id (`owner/name`).
pub fn looks_like_repo_id(source: &str) -> bool {
    let mut parts = source.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    ok(owner) && ok(name)
}

/// Resolves a source: an existing path is used as it is; otherwise an `owner/name` id is looked
/// up in the hub cache and, unless offline, downloaded.
pub fn resolve_source_with(source: &str, need: Need, hub: &HubSettings) -> Result<ResolvedSource> {
    let path = Path::new(source);
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(LoaderError::Source {
                source_name: source.into(),
                message: "folder has no config.json".into(),
            });
        }
        return Ok(ResolvedSource::Folder(path.to_path_buf()));
    }
    if path.is_file() {
        if need == Need::Everything {
            return Err(LoaderError::Source {
                source_name: source.into(),
                message: "a bare config file is enough to plan, but converting needs the checkpoint folder".into(),
            });
        }
        return Ok(ResolvedSource::ConfigFile(path.to_path_buf()));
    }
    if !looks_like_repo_id(source) {
        return Err(LoaderError::Source {
            source_name: source.into(),
            message: "no such file or folder, and not a hub repo id (owner/name)".into(),
        });
    }
    resolve_hub(source, need, hub)
}

fn resolve_hub(repo_id: &str, need: Need, hub: &HubSettings) -> Result<ResolvedSource> {
    use hf_hub::{Cache, Repo};
    let cache = Cache::new(hub.cache_dir.clone()).repo(Repo::model(repo_id.to_string()));
    let err = |message: String| LoaderError::Source { source_name: repo_id.into(), message };

    // Everything already cached resolves with no network at all.
    let cached_config = cache.get("config.json");
    if let Some(config) = &cached_config {
        let snapshot = config.parent().map(Path::to_path_buf).unwrap_or_default();
        match need {
            Need::Config => return Ok(ResolvedSource::ConfigFile(config.clone())),
            Need::Everything => {
                if let Some(missing) = missing_weight_files(&snapshot)? {
                    if hub.offline {
                        return Err(err(format!(
                            "offline (HF_HUB_OFFLINE) and {missing} is not in the hub cache at {}",
                            hub.cache_dir.display()
                        )));
                    }
                } else {
                    return Ok(ResolvedSource::Folder(snapshot));
                }
            }
        }
    } else if hub.offline {
        return Err(err(format!(
            "offline (HF_HUB_OFFLINE) and config.json is not in the hub cache at {}",
            hub.cache_dir.display()
        )));
    }
    download(repo_id, need, hub)
}

/// The first weight file the index names that is not present, if any.
fn missing_weight_files(snapshot: &Path) -> Result<Option<String>> {
    let index = snapshot.join(INDEX_FILE);
    if !index.is_file() {
        return Ok((!snapshot.join("model.safetensors").is_file()).then(|| INDEX_FILE.to_string()));
    }
    for shard in shard_names(&index)? {
        if !snapshot.join(&shard).is_file() {
            return Ok(Some(shard));
        }
    }
    Ok(None)
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| LoaderError::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| LoaderError::Index { path: index.to_path_buf(), message: format!("not valid JSON: {e}") })?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LoaderError::Index {
        path: index.to_path_buf(),
        message: "missing object `weight_map`".into(),
    })?;
    let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn download(repo_id: &str, need: Need, hub: &HubSettings) -> Result<ResolvedSource> {
    use hf_hub::api::sync::ApiBuilder;
    let err = |message: String| LoaderError::Source { source_name: repo_id.into(), message };
    let api = ApiBuilder::new()
        .with_cache_dir(hub.cache_dir.clone())
        .with_progress(hub.progress)
        .build()
        .map_err(|e| err(format!("cannot start the hub client: {e}")))?;
    let repo = api.model(repo_id.to_string());
    let config = repo.get("config.json").map_err(|e| err(format!("downloading config.json: {e}")))?;
    if need == Need::Config {
        return Ok(ResolvedSource::ConfigFile(config));
    }
    let snapshot = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let shards = match repo.get(INDEX_FILE) {
        Ok(index) => shard_names(&index)?,
        Err(_) => vec!["model.safetensors".to_string()],
    };
    for shard in &shards {
        repo.get(shard).map_err(|e| err(format!("downloading {shard}: {e}")))?;
    }
    for side in SIDE_FILES {
        // Side files are optional: a repo without a chat template is still a model.
        let _ = repo.get(side);
    }
    Ok(ResolvedSource::Folder(snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lay_out_cache(root: &Path, with_shard: bool) -> PathBuf {
        let repo = root.join("models--openai--gpt-oss-test");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join(INDEX_FILE), r#"{"weight_map": {"a": "model-00001-of-00001.safetensors"}}"#).unwrap();
        if with_shard {
            std::fs::write(snap.join("model-00001-of-00001.safetensors"), b"x").unwrap();
        }
        snap
    }

    #[test]
    fn repo_ids_are_recognised() {
        assert!(looks_like_repo_id("openai/gpt-oss-120b"));
        assert!(!looks_like_repo_id("gpt-oss-120b"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
    }

    #[test]
    fn cached_repo_resolves_offline() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = lay_out_cache(tmp.path(), true);
        let hub = HubSettings { cache_dir: tmp.path().to_path_buf(), offline: true, progress: false };
        let got = resolve_source_with("openai/gpt-oss-test", Need::Everything, &hub).unwrap();
        assert_eq!(got, ResolvedSource::Folder(snap.clone()));
        let got = resolve_source_with("openai/gpt-oss-test", Need::Config, &hub).unwrap();
        assert_eq!(got, ResolvedSource::ConfigFile(snap.join("config.json")));
    }

    #[test]
    fn offline_names_the_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        lay_out_cache(tmp.path(), false);
        let hub = HubSettings { cache_dir: tmp.path().to_path_buf(), offline: true, progress: false };
        let e = resolve_source_with("openai/gpt-oss-test", Need::Everything, &hub).unwrap_err();
        assert!(e.to_string().contains("model-00001-of-00001.safetensors"), "{e}");
        let e = resolve_source_with("openai/other", Need::Config, &hub).unwrap_err();
        assert!(e.to_string().contains("config.json is not in the hub cache"), "{e}");
    }
}
