//! Uploading a model folder to the hub through its HTTP commit API, as huggingface_hub's
//! `upload_folder` does: create the repo (and branch), ask `preupload` which files go through
//! LFS, upload those the LFS batch API asks for (single PUT or multipart), then one commit that
//! adds every file. A re-run uploads only the LFS objects the hub does not hold yet.

#![allow(clippy::result_large_err, reason = "the closures and retries pass on ureq's own `Result<Response, ureq::Error>` as ureq returns it, one request at a time")]

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Anything that stops an upload.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The hub answered with an error status.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        /// The request's URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What it means and what to do.
        message: String,
    },
    /// The hub could not be reached.
    #[error("{url}: {message}; check HF_ENDPOINT and the network")]
    Transport {
        /// The request's URL.
        url: String,
        /// The transport error.
        message: String,
    },
    /// The hub answered something this client does not understand.
    #[error("{url}: unexpected answer: {message}")]
    Protocol {
        /// The request's URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// A local file could not be read.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// Offline mode forbids the network.
    #[error("HF_HUB_OFFLINE is set: publishing needs the network")]
    Offline,
}

/// One file to upload: its name in the folder (and the repo), size and sha256.
#[derive(Debug, Clone)]
pub struct UploadFile {
    /// Name in the folder and path in the repo.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Hex sha256.
    pub sha256: String,
}

/// Where and how to upload.
#[derive(Debug, Clone)]
pub struct UploadTarget {
    /// `owner/name`.
    pub repo: String,
    /// Create the repo private.
    pub private: bool,
    /// The branch to commit to.
    pub revision: String,
    /// The commit's summary line.
    pub message: String,
}

/// What an upload did.
#[derive(Debug, Clone, Default)]
pub struct UploadReport {
    /// Files in the commit.
    pub files: usize,
    /// LFS files sent.
    pub lfs_sent: usize,
    /// LFS files the hub already held (not sent again).
    pub lfs_skipped: usize,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// The commit's URL, when the hub gives one.
    pub commit_url: Option<String>,
}

/// Progress of one file's bytes: (file, bytes sent, file size).
pub type UploadProgress<'a> = dyn Fn(&str, u64, u64) + 'a;

/// An HTTP client for one hub endpoint and token.
struct Hub<'a> {
    endpoint: &'a str,
    token: Option<&'a str>,
    agent: ureq::Agent,
    repo: &'a str,
}

/// Percent-encodes a path segment (a branch name may hold `/`).
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// What an error status means for a publish.
fn status_message(status: u16, repo: &str, body: &str) -> String {
    let said = body.trim().chars().take(300).collect::<String>();
    let hint = match status {
        401 => "the hub did not accept the token: set HF_TOKEN to a token with write access".to_string(),
        403 => format!("the token may not write to {repo} (a read-only token, or a repo owned by someone else)"),
        404 => format!("{repo} or the revision does not exist on this hub"),
        409 => "conflict: the revision moved while uploading, or the repo exists with another type; run publish again".to_string(),
        _ => "the hub refused the request".to_string(),
    };
    if said.is_empty() { hint } else { format!("{hint} (the hub said: {said})") }
}

impl Hub<'_> {
    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let r = self.agent.request(method, url);
        match self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    /// Sends `send` and reads a JSON answer (`null` for an empty body); `ok_statuses` beyond
    /// 2xx count as success too (409 for a repo that exists).
    fn call(&self, url: &str, ok_statuses: &[u16], send: impl FnOnce() -> Result<ureq::Response, ureq::Error>) -> Result<Value, UploadError> {
        match send() {
            Ok(resp) => read_json(url, resp),
            Err(ureq::Error::Status(code, _)) if ok_statuses.contains(&code) => Ok(Value::Null),
            Err(ureq::Error::Status(status, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                Err(UploadError::Status { url: url.to_string(), status, message: status_message(status, self.repo, &body) })
            }
            Err(ureq::Error::Transport(t)) => {
                let message = format!("{}{}", t.kind(), t.message().map(|m| format!(": {m}")).unwrap_or_default());
                Err(UploadError::Transport { url: url.to_string(), message })
            }
        }
    }

    fn post_json(&self, url: &str, body: &Value, ok_statuses: &[u16]) -> Result<Value, UploadError> {
        self.call(url, ok_statuses, || self.request("POST", url).send_json(body.clone()))
    }
}

fn read_json(url: &str, resp: ureq::Response) -> Result<Value, UploadError> {
    let text = resp.into_string().map_err(|e| UploadError::Transport { url: url.to_string(), message: e.to_string() })?;
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| UploadError::Protocol { url: url.to_string(), message: format!("not JSON ({e})") })
}

/// A file's reader that reports its progress.
struct Counted<'p, R> {
    inner: R,
    done: u64,
    total: u64,
    name: &'p str,
    progress: &'p UploadProgress<'p>,
}

/// Uploads the `files` of `dir` to `target.repo` on `endpoint` with `token`, creating the repo
/// (and branch) when missing; `progress(file, sent, size)` as bytes go out.
pub fn upload_folder(
    dir: &Path,
    files: &[UploadFile],
    target: &UploadTarget,
    endpoint: &str,
    token: Option<&str>,
    progress: &UploadProgress<'_>,
) -> Result<UploadReport, UploadError> {
    let hub = Hub { endpoint: endpoint.trim_end_matches('/'), token, agent: ureq::AgentBuilder::new().build(), repo: &target.repo };
    create_repo(&hub, target)?;
    let modes = preupload(&hub, dir, files, &target.revision)?;
    let lfs: Vec<&UploadFile> = files.iter().zip(&modes).filter(|(_, lfs)| **lfs).map(|(f, _)| f).collect();
    let mut report = UploadReport { files: files.len(), ..Default::default() };
    upload_lfs(&hub, dir, &lfs, &target.revision, progress, &mut report)?;
    report.commit_url = commit(&hub, dir, files, &modes, target)?;
    Ok(report)
}

fn create_repo(hub: &Hub<'_>, target: &UploadTarget) -> Result<(), UploadError> {
    let (owner, name) = target.repo.split_once('/').unwrap_or(("", &target.repo));
    let url = format!("{}/api/repos/create", hub.endpoint);
    let body = json!({"name": name, "organization": owner, "private": target.private, "type": "model"});
    // 409: the repo exists already, which is what a second publish expects.
    hub.post_json(&url, &body, &[409])?;
    if target.revision != "main" {
        let url = format!("{}/api/models/{}/branch/{}", hub.endpoint, target.repo, encode_segment(&target.revision));
        hub.post_json(&url, &json!({}), &[409])?;
    }
    Ok(())
}

/// Whether each file goes through LFS, as the hub's preupload endpoint decides.
fn preupload(hub: &Hub<'_>, dir: &Path, files: &[UploadFile], revision: &str) -> Result<Vec<bool>, UploadError> {
    let mut entries = Vec::with_capacity(files.len());
    for f in files {
        let path = dir.join(&f.name);
        let mut sample = Vec::with_capacity(512);
        std::fs::File::open(&path).and_then(|h| h.take(512).read_to_end(&mut sample)).map_err(|e| UploadError::Io(path.clone(), e))?;
        entries.push(json!({"path": f.name, "size": f.size, "sample": base64_encode(&sample)}));
    }
    let url = format!("{}/api/models/{}/preupload/{}", hub.endpoint, hub.repo, encode_segment(revision));
    let answer = hub.post_json(&url, &json!({ "files": entries }), &[])?;
    let listed = answer.get("files").and_then(Value::as_array).cloned().unwrap_or_default();
    files
        .iter()
        .map(|f| {
            let entry = listed.iter().find(|e| e.get("path").and_then(Value::as_str) == Some(f.name.as_str()));
            match entry.and_then(|e| e.get("uploadMode")).and_then(Value::as_str) {
                Some("lfs") => Ok(true),
                Some("regular") => Ok(false),
                _ => Err(UploadError::Protocol { url: url.clone(), message: format!("no uploadMode for {}", f.name) }),
            }
        })
        .collect()
}

fn upload_lfs(
    hub: &Hub<'_>,
    dir: &Path,
    lfs: &[&UploadFile],
    revision: &str,
    progress: &UploadProgress<'_>,
    report: &mut UploadReport,
) -> Result<(), UploadError> {
    if lfs.is_empty() {
        return Ok(());
    }
    let url = format!("{}/{}.git/info/lfs/objects/batch", hub.endpoint, hub.repo);
    let objects: Vec<Value> = lfs.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect();
    let body = json!({"operation": "upload", "transfers": ["basic", "multipart"], "objects": objects, "hash_algo": "sha256", "ref": {"name": revision}});
    let answer = hub.call(&url, &[], || {
        hub.request("POST", &url)
            .set("Accept", "application/vnd.git-lfs+json")
            .set("Content-Type", "application/vnd.git-lfs+json")
            .send_string(&body.to_string())
    })?;
    let objects = answer.get("objects").and_then(Value::as_array).cloned().unwrap_or_default();
    for f in lfs {
        let obj = objects.iter().find(|o| o.get("oid").and_then(Value::as_str) == Some(f.sha256.as_str()));
        let Some(obj) = obj else {
            return Err(UploadError::Protocol { url, message: format!("no answer for {} ({})", f.name, f.sha256) });
        };
        if let Some(e) = obj.get("error") {
            return Err(UploadError::Protocol { url, message: format!("{}: {e}", f.name) });
        }
        match obj.get("actions").and_then(|a| a.get("upload")) {
            None => report.lfs_skipped += 1,
            Some(upload) => {
                send_object(hub, &dir.join(&f.name), f, upload, progress)?;
                if let Some(verify) = obj.get("actions").and_then(|a| a.get("verify")) {
                    let href = href_of(verify, &url)?;
                    let req = with_headers(hub.request("POST", &href), verify);
                    hub.call(&href, &[], || req.send_json(json!({"oid": f.sha256, "size": f.size})))?;
                }
                report.lfs_sent += 1;
                report.bytes_sent += f.size;
            }
        }
    }
    Ok(())
}

fn href_of(action: &Value, url: &str) -> Result<String, UploadError> {
    action
        .get("href")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| UploadError::Protocol { url: url.to_string(), message: "an LFS action without href".into() })
}

fn with_headers(mut req: ureq::Request, action: &Value) -> ureq::Request {
    if let Some(h) = action.get("header").and_then(Value::as_object) {
        for (k, v) in h {
            if let (Some(v), false) = (v.as_str(), k == "chunk_size" || k.bytes().all(|b| b.is_ascii_digit())) {
                req = req.set(k, v);
            }
        }
    }
    req
}

/// Attempts at one storage PUT (a whole object or one part) before the upload fails.
const STORAGE_ATTEMPTS: u32 = 4;

/// Whether a failed storage PUT is worth another attempt: the connection failed or the
/// storage answered 5xx or 429 (a presigned URL's 4xx will not change).
fn transient(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Status(code, _) => *code >= 500 || *code == 429,
        ureq::Error::Transport(_) => true,
    }
}

/// Runs `attempt` until it succeeds, fails for good, or has failed `STORAGE_ATTEMPTS` times,
/// waiting 0.5 s, 1 s, 2 s between attempts.
fn with_retries(mut attempt: impl FnMut() -> Result<ureq::Response, ureq::Error>) -> Result<ureq::Response, ureq::Error> {
    let mut n = 0;
    loop {
        match attempt() {
            Err(e) if transient(&e) && n + 1 < STORAGE_ATTEMPTS => {
                std::thread::sleep(std::time::Duration::from_millis(500 << n));
                n += 1;
            }
            r => return r,
        }
    }
}

/// PUTs one LFS object: whole, or in the parts the hub's multipart answer names. Each PUT is
/// retried on a transient failure, so a dropped connection costs one part, not the object.
fn send_object(hub: &Hub<'_>, path: &Path, f: &UploadFile, upload: &Value, progress: &UploadProgress<'_>) -> Result<(), UploadError> {
    let href = href_of(upload, path.to_string_lossy().as_ref())?;
    let header = upload.get("header").and_then(Value::as_object).cloned().unwrap_or_default();
    let chunk = header.get("chunk_size").and_then(|v| v.as_str().and_then(|s| s.parse::<u64>().ok()).or(v.as_u64()));
    let io = |e| UploadError::Io(path.to_path_buf(), e);
    let Some(chunk) = chunk.filter(|&c| c > 0) else {
        let file = std::fs::File::open(path).map_err(io)?;
        let sent = with_retries(|| {
            (&file).seek(std::io::SeekFrom::Start(0))?;
            let reader = Counted { inner: &file, done: 0, total: f.size, name: &f.name, progress };
            // A set length keeps ureq from chunking, which presigned storage URLs refuse.
            with_headers(hub.agent.request("PUT", &href), upload).set("Content-Length", &f.size.to_string()).send(reader)
        });
        return hub.call(&href, &[], || sent).map(|_| ());
    };
    let mut parts: Vec<(u64, String)> =
        header.iter().filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?.to_string()))).collect();
    parts.sort();
    let mut etags = Vec::with_capacity(parts.len());
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut sent = 0u64;
    for (number, part_url) in &parts {
        let mut buf = Vec::new();
        (&mut file).take(chunk).read_to_end(&mut buf).map_err(io)?;
        let etag = match with_retries(|| hub.agent.request("PUT", part_url).send_bytes(&buf)) {
            Ok(r) => r.header("etag").unwrap_or_default().to_string(),
            Err(e) => return hub.call(part_url, &[], || Err(e)).map(|_| ()),
        };
        sent += buf.len() as u64;
        progress(&f.name, sent, f.size);
        etags.push(json!({"partNumber": number, "etag": etag}));
    }
    let req = hub.request("POST", &href);
    hub.call(&href, &[], || req.send_json(json!({"oid": f.sha256, "parts": etags}))).map(|_| ())
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(self.name, self.done, self.total);
        Ok(n)
    }
}

/// The commit adding every file: small ones inline (base64), LFS ones by pointer.
fn commit(hub: &Hub<'_>, dir: &Path, files: &[UploadFile], lfs: &[bool], target: &UploadTarget) -> Result<Option<String>, UploadError> {
    let mut lines = vec![json!({"key": "header", "value": {"summary": target.message, "description": ""}}).to_string()];
    for (f, &is_lfs) in files.iter().zip(lfs) {
        let line = if is_lfs {
            json!({"key": "lfsFile", "value": {"path": f.name, "algo": "sha256", "oid": f.sha256, "size": f.size}})
        } else {
            let path = dir.join(&f.name);
            let bytes = std::fs::read(&path).map_err(|e| UploadError::Io(path.clone(), e))?;
            json!({"key": "file", "value": {"content": base64_encode(&bytes), "path": f.name, "encoding": "base64"}})
        };
        lines.push(line.to_string());
    }
    let url = format!("{}/api/models/{}/commit/{}", hub.endpoint, hub.repo, encode_segment(&target.revision));
    let body = lines.join("\n");
    let answer = hub.call(&url, &[], || hub.request("POST", &url).set("Content-Type", "application/x-ndjson").send_string(&body))?;
    Ok(answer.get("commitUrl").and_then(Value::as_str).map(str::to_string))
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_segments() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert!(status_message(401, "a/b", "").contains("HF_TOKEN"));
    }
}
