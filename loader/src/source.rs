//! Resolving a `--source` argument: a local folder, a bare config.json, or a hub repo id.

use std::path::{Path, PathBuf};

use crate::checkpoint::INDEX_FILE;
use crate::file_name::not_a_file_name;
use crate::error::{LoaderError, Result};

/// The source's model card: downloaded with a hub source for its `license`, not copied.
pub const SOURCE_CARD: &str = "README.md";

/// Files copied alongside the weights when present (tokenizer, chat template, generation config).
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

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
    /// Report download progress on stderr.
    pub progress: bool,
    /// The hub's base URL (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// Access token for private or gated repos and for uploads: `HF_TOKEN`, else the one
    /// `huggingface-cli login` stored.
    pub token: Option<String>,
}

/// A non-empty environment variable.
fn env_var(key: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(key).filter(|v| !v.is_empty())
}

/// huggingface_hub's home folder: `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else
/// `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    if let Some(p) = env_var("HF_HOME") {
        return PathBuf::from(p);
    }
    let cache = env_var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let home = env_var("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache")
    });
    cache.join("huggingface")
}

/// The token `huggingface-cli login` stored (`HF_TOKEN_PATH`, else `HF_HOME/token`), if any.
fn stored_token() -> Option<String> {
    let path = env_var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home().join("token"));
    let token = std::fs::read_to_string(path).ok()?;
    Some(token.trim().to_string()).filter(|t| !t.is_empty())
}

impl HubSettings {
    /// Reads `HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN` and the
    /// stored token as huggingface_hub does.
    pub fn from_env() -> Self {
        let cache_dir = env_var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home().join("hub"));
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| v.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
            .or_else(stored_token);
        HubSettings { cache_dir, offline, progress: true, endpoint, token }
    }

    /// Settings for a given cache folder with the public hub, no progress output.
    pub fn with_cache(cache_dir: PathBuf, offline: bool) -> Self {
        HubSettings { cache_dir, offline, progress: false, endpoint: DEFAULT_ENDPOINT.to_string(), token: None }
    }
}

/// Resolves a source with settings from the environment; `show_downloads` reports hub
/// downloads on stderr.
pub fn resolve_source(source: &str, need: Need, show_downloads: bool) -> Result<ResolvedSource> {
    resolve_source_with(source, need, &HubSettings { progress: show_downloads, ..HubSettings::from_env() })
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

/// Why `name` is not a plain file name (a shard name in an index must be one), if it is not.
fn not_a_plain_file_name(name: &str) -> Option<&'static str> {
    if let Some(why) = not_a_file_name(name) {
        Some(why)
    } else if name.starts_with('.') {
        Some("it starts with a dot")
    } else if name.contains(':') {
        Some("it contains a colon")
    } else {
        None
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| LoaderError::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| LoaderError::Index { path: index.to_path_buf(), message: format!("not valid JSON: {e}") })?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LoaderError::Index {
        path: index.to_path_buf(),
        message: "missing object `weight_map`".into(),
    })?;
    let mut names = Vec::with_capacity(map.len());
    for (tensor, value) in map {
        let bad = |message: String| LoaderError::Index { path: index.to_path_buf(), message };
        let name = value.as_str().ok_or_else(|| bad(format!("weight_map[{tensor}] is {value}, not a shard file name")))?;
        if let Some(why) = not_a_plain_file_name(name) {
            // The name is joined to the cache folder and downloaded to: it must stay inside it.
            return Err(bad(format!("weight_map[{tensor}] names {name:?}, which is not a plain shard file name ({why})")));
        }
        names.push(name.to_string());
    }
    names.sort();
    names.dedup();
    Ok(names)
}

fn download(repo_id: &str, need: Need, hub: &HubSettings) -> Result<ResolvedSource> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo};
    let err = |message: String| LoaderError::Source { source_name: repo_id.into(), message };
    let mut builder = ApiBuilder::new().with_cache_dir(hub.cache_dir.clone()).with_endpoint(hub.endpoint.clone()).with_progress(false);
    if let Some(token) = &hub.token {
        builder = builder.with_token(Some(token.clone()));
    }
    let api = builder.build().map_err(|e| err(format!("cannot start the hub client: {e}")))?;
    let repo = api.model(repo_id.to_string());
    let cache = Cache::new(hub.cache_dir.clone()).repo(Repo::model(repo_id.to_string()));
    // Cached files are used as they are; the rest are downloaded into the cache, where hf-hub
    // keeps a `.part` file that the next run resumes with a range request.
    let fetch = |file: &str| -> std::result::Result<PathBuf, hf_hub::api::sync::ApiError> {
        if let Some(path) = cache.get(file) {
            return Ok(path);
        }
        repo.download_with_progress(file, DownloadLines::new(repo_id, hub.progress))
    };
    let config = fetch("config.json").map_err(|e| err(download_error(hub, repo_id, "config.json", &e)))?;
    if need == Need::Config {
        return Ok(ResolvedSource::ConfigFile(config));
    }
    let snapshot = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let shards = match fetch(INDEX_FILE) {
        Ok(index) => shard_names(&index)?,
        Err(e) if http_status(&e) == Some(404) => vec!["model.safetensors".to_string()],
        Err(e) => return Err(err(download_error(hub, repo_id, INDEX_FILE, &e))),
    };
    for shard in &shards {
        fetch(shard).map_err(|e| err(download_error(hub, repo_id, shard, &e)))?;
    }
    // The card is fetched for what it says (its license), never copied into an output.
    for side in SIDE_FILES.iter().chain([&SOURCE_CARD]) {
        // Side files are optional: a repo without a chat template is still a model.
        match fetch(side) {
            Ok(_) => {}
            Err(e) if http_status(&e) == Some(404) => {}
            Err(e) => return Err(err(download_error(hub, repo_id, side, &e))),
        }
    }
    Ok(ResolvedSource::Folder(snapshot))
}

/// The HTTP status of a failed hub request, if the server answered.
fn http_status(e: &hf_hub::api::sync::ApiError) -> Option<u16> {
    match e {
        hf_hub::api::sync::ApiError::RequestError(r) => match r.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            ureq::Error::Transport(_) => None,
        },
        _ => None,
    }
}

/// What went wrong fetching `file`, and what to do about it.
fn download_error(hub: &HubSettings, repo_id: &str, file: &str, e: &hf_hub::api::sync::ApiError) -> String {
    use hf_hub::api::sync::ApiError;
    let url = format!("{}/{repo_id}/resolve/main/{file}", hub.endpoint);
    match (http_status(e), e) {
        (Some(404), _) => format!("{file} not found at {url} (HTTP 404): check the repo id, or set HF_TOKEN for a private or gated repo"),
        (Some(code @ (401 | 403)), _) => format!("{url}: access denied (HTTP {code}); set HF_TOKEN to a token that can read {repo_id}"),
        (Some(code), _) => format!("{url}: the hub answered HTTP {code}; try again later"),
        (None, ApiError::RequestError(r)) => {
            format!("cannot reach {} for {file} ({r}); check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the cache", hub.endpoint)
        }
        (None, ApiError::IoError(io)) => format!(
            "downloading {file} was interrupted ({io}); rerun to resume it: the partial download is kept in {}",
            hub.cache_dir.display()
        ),
        (None, other) => format!("downloading {file} from {url}: {other}"),
    }
}

/// Download progress as lines on stderr: one at the start, one every 2 s, one at the end.
struct DownloadLines {
    repo: String,
    on: bool,
    file: String,
    size: usize,
    done: usize,
    start: std::time::Instant,
    last: std::time::Instant,
}

impl DownloadLines {
    fn new(repo: &str, on: bool) -> Self {
        let now = std::time::Instant::now();
        DownloadLines { repo: repo.to_string(), on, file: String::new(), size: 0, done: 0, start: now, last: now }
    }

    fn line(&self, what: &str) {
        if self.on {
            let mib = |b: usize| b as f64 / 1048576.0;
            let rate = mib(self.done) / self.start.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "download {}/{}: {what} {:.1}/{:.1} MiB ({:.0}%), {rate:.1} MiB/s",
                self.repo,
                self.file,
                mib(self.done),
                mib(self.size),
                100.0 * self.done as f64 / self.size.max(1) as f64
            );
        }
    }
}

impl hf_hub::api::Progress for DownloadLines {
    fn init(&mut self, size: usize, filename: &str) {
        // hf-hub calls init again after a resumed request: keep the first start.
        if self.file != filename {
            self.file = filename.to_string();
            self.size = size;
            self.done = 0;
            self.start = std::time::Instant::now();
            self.line("started");
        }
    }

    fn update(&mut self, size: usize) {
        self.done += size;
        if self.last.elapsed().as_secs_f64() >= 2.0 {
            self.last = std::time::Instant::now();
            self.line("at");
        }
    }

    fn finish(&mut self) {
        self.line("done");
    }
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
        let hub = HubSettings::with_cache(tmp.path().to_path_buf(), true);
        let got = resolve_source_with("openai/gpt-oss-test", Need::Everything, &hub).unwrap();
        assert_eq!(got, ResolvedSource::Folder(snap.clone()));
        let got = resolve_source_with("openai/gpt-oss-test", Need::Config, &hub).unwrap();
        assert_eq!(got, ResolvedSource::ConfigFile(snap.join("config.json")));
    }

    #[test]
    fn offline_names_the_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        lay_out_cache(tmp.path(), false);
        let hub = HubSettings::with_cache(tmp.path().to_path_buf(), true);
        let e = resolve_source_with("openai/gpt-oss-test", Need::Everything, &hub).unwrap_err();
        assert!(e.to_string().contains("model-00001-of-00001.safetensors"), "{e}");
        let e = resolve_source_with("openai/other", Need::Config, &hub).unwrap_err();
        assert!(e.to_string().contains("config.json is not in the hub cache"), "{e}");
    }

    #[test]
    fn index_names_that_leave_the_snapshot_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = lay_out_cache(tmp.path(), true);
        let hub = HubSettings::with_cache(tmp.path().to_path_buf(), true);
        // A file the hostile name would reach, so that only the name check can refuse it.
        std::fs::write(snap.parent().unwrap().join("outside.safetensors"), b"x").unwrap();
        for (name, why) in [
            ("../outside.safetensors", "it contains a path separator"),
            ("/etc/passwd", "it contains a path separator"),
            ("..", "it starts with a dot"),
            ("sub\\x.safetensors", "it contains a path separator"),
            ("a\u{0}b", "it contains a NUL byte"),
            ("", "it is empty"),
            ("C:x", "it contains a colon"),
        ] {
            let index = serde_json::json!({"weight_map": {"a": "model-00001-of-00001.safetensors", "b": name}});
            std::fs::write(snap.join(INDEX_FILE), index.to_string()).unwrap();
            let e = resolve_source_with("openai/gpt-oss-test", Need::Everything, &hub).unwrap_err().to_string();
            assert!(e.contains(INDEX_FILE) && e.contains("weight_map[b] names") && e.contains(why), "{name:?}: {e}");
        }
        std::fs::write(snap.join(INDEX_FILE), r#"{"weight_map": {"a": 7}}"#).unwrap();
        let e = resolve_source_with("openai/gpt-oss-test", Need::Everything, &hub).unwrap_err().to_string();
        assert!(e.contains("weight_map[a] is 7, not a shard file name"), "{e}");
    }
}
