//! `mixq publish` and `convert --upload-repo` against a local server in the hub's HTTP API layout
//! (`HF_ENDPOINT`): repo creation, preupload, the LFS batch API with upload and verify actions,
//! and the ndjson commit; a re-run sends no LFS object again; 401, 403 and a folder that does not
//! verify are clear errors.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{entries, mixq, synth, text};
use serde_json::{json, Value};

const TOKEN: &str = "hf_write";
const READ_ONLY: &str = "hf_read";

/// What the stand-in hub holds: LFS objects by oid, committed files by repo, and requests seen.
#[derive(Default)]
struct State {
    repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    lfs: BTreeMap<String, Vec<u8>>,
    parts: BTreeMap<String, Vec<u8>>,
    requests: Vec<String>,
    /// Part numbers whose first PUT (per object) the storage answers with a 500.
    flaky_parts: Vec<u64>,
    failed: std::collections::BTreeSet<String>,
}

/// Objects larger than this go up in parts of `PART` bytes.
const MULTIPART_ABOVE: u64 = 40_000;
const PART: u64 = 16_384;

struct Hub {
    url: String,
    state: Arc<Mutex<State>>,
}

impl Hub {
    fn start() -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (s, u) = (state.clone(), url.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, u) = (s.clone(), u.clone());
                std::thread::spawn(move || {
                    let _ = answer(stream, &s, &u);
                });
            }
        });
        Hub { url, state }
    }
}

struct Request {
    method: String,
    path: String,
    token: Option<String>,
    body: Vec<u8>,
}

fn read_request(stream: &TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
    let (mut len, mut token) = (0usize, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("authorization") {
                token = v.trim().strip_prefix("Bearer ").map(str::to_string);
            }
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(Request { method, path, token, body })
}

fn reply(mut out: TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(out, "HTTP/1.1 {status}\r\netag: \"e-{}\"\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len(), body.len())?;
    out.flush()
}

fn answer(stream: TcpStream, state: &Mutex<State>, url: &str) -> std::io::Result<()> {
    let r = read_request(&stream)?;
    state.lock().unwrap().requests.push(format!("{} {}", r.method, r.path));
    // Storage URLs are presigned: no token. The API wants a token that may write.
    if !r.path.starts_with("/lfs-") {
        match r.token.as_deref() {
            Some(TOKEN) => {}
            Some(READ_ONLY) => return reply(stream, "403 Forbidden", r#"{"error":"You don't have the rights to create a model under this namespace"}"#),
            _ => return reply(stream, "401 Unauthorized", r#"{"error":"Invalid credentials in Authorization header"}"#),
        }
    }
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let mut st = state.lock().unwrap();
    let part = r.path.strip_prefix("/lfs-part/").and_then(|p| p.rsplit('/').next()).and_then(|n| n.parse::<u64>().ok());
    if part.is_some_and(|n| st.flaky_parts.contains(&n)) && st.failed.insert(r.path.clone()) {
        drop(st);
        return reply(stream, "500 Internal Server Error", r#"{"error":"storage hiccup"}"#);
    }
    let (status, out) = route(&r, &body, &mut st, url);
    drop(st);
    reply(stream, status, &out)
}

fn route(r: &Request, body: &Value, st: &mut State, url: &str) -> (&'static str, String) {
    let p = r.path.as_str();
    if p == "/api/repos/create" {
        let repo = format!("{}/{}", body["organization"].as_str().unwrap_or(""), body["name"].as_str().unwrap_or(""));
        if st.repos.contains_key(&repo) {
            return ("409 Conflict", r#"{"error":"You already created this model repo"}"#.into());
        }
        st.repos.insert(repo.clone(), BTreeMap::new());
        return ("200 OK", json!({"url": format!("{url}/{repo}")}).to_string());
    }
    if p.contains("/preupload/") {
        let files: Vec<Value> = body["files"].as_array().unwrap().iter().map(|f| {
            let path = f["path"].as_str().unwrap();
            json!({"path": path, "uploadMode": if path.ends_with(".safetensors") { "lfs" } else { "regular" }, "shouldIgnore": false})
        }).collect();
        return ("200 OK", json!({"files": files}).to_string());
    }
    if p.ends_with(".git/info/lfs/objects/batch") {
        let objects: Vec<Value> = body["objects"].as_array().unwrap().iter().map(|o| {
            let oid = o["oid"].as_str().unwrap();
            let size = o["size"].as_u64().unwrap();
            if st.lfs.contains_key(oid) {
                json!({"oid": oid, "size": size})
            } else if size > MULTIPART_ABOVE {
                // Multipart: numbered part URLs and a chunk size in the header, completion at href.
                let mut header = json!({"chunk_size": PART.to_string()});
                for n in 1..=size.div_ceil(PART) {
                    header[format!("{n:05}")] = json!(format!("{url}/lfs-part/{oid}/{n}"));
                }
                json!({"oid": oid, "size": size, "actions": {"upload": {"href": format!("{url}/lfs-complete/{oid}"), "header": header}}})
            } else {
                json!({"oid": oid, "size": o["size"], "actions": {
                    "upload": {"href": format!("{url}/lfs-upload/{oid}"), "header": {"x-amz-test": "1"}},
                    "verify": {"href": format!("{url}/lfs-verify"), "header": {"Authorization": format!("Bearer {TOKEN}")}}}})
            }
        }).collect();
        return ("200 OK", json!({"transfer": "basic", "objects": objects}).to_string());
    }
    if let Some(rest) = p.strip_prefix("/lfs-part/") {
        st.parts.insert(rest.to_string(), r.body.clone());
        return ("200 OK", String::new());
    }
    if let Some(oid) = p.strip_prefix("/lfs-complete/") {
        let mut whole = Vec::new();
        for part in body["parts"].as_array().unwrap() {
            let n = part["partNumber"].as_u64().unwrap();
            assert!(part["etag"].as_str().unwrap().starts_with("\"e-"), "the part's etag is sent back");
            whole.extend(st.parts.remove(&format!("{oid}/{n}")).unwrap());
        }
        st.lfs.insert(oid.to_string(), whole);
        return ("200 OK", "{}".into());
    }
    if let Some(oid) = p.strip_prefix("/lfs-upload/") {
        st.lfs.insert(oid.to_string(), r.body.clone());
        return ("200 OK", String::new());
    }
    if p == "/lfs-verify" {
        return if st.lfs.contains_key(body["oid"].as_str().unwrap_or("")) { ("200 OK", "{}".into()) } else { ("404 Not Found", "{}".into()) };
    }
    if p.starts_with("/api/models/") && p.contains("/branch/") {
        return ("200 OK", "{}".into());
    }
    if let Some((repo, _)) = p.strip_prefix("/api/models/").and_then(|rest| rest.split_once("/commit/")) {
        let mut files = BTreeMap::new();
        for line in String::from_utf8_lossy(&r.body).lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let value = &v["value"];
            match v["key"].as_str().unwrap() {
                "file" => files.insert(value["path"].as_str().unwrap().to_string(), base64_decode(value["content"].as_str().unwrap())),
                "lfsFile" => match st.lfs.get(value["oid"].as_str().unwrap()) {
                    Some(b) => files.insert(value["path"].as_str().unwrap().to_string(), b.clone()),
                    None => return ("400 Bad Request", r#"{"error":"LFS object missing"}"#.into()),
                },
                _ => None,
            };
        }
        st.repos.entry(repo.to_string()).or_default().extend(files);
        return ("200 OK", json!({"commitUrl": format!("{url}/{repo}/commit/abc"), "commitOid": "abc"}).to_string());
    }
    ("404 Not Found", "{}".into())
}

fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let vals: Vec<u32> = s.bytes().filter(|&b| b != b'=').map(|b| A.iter().position(|&a| a == b).unwrap() as u32).collect();
    let mut out = Vec::new();
    for c in vals.chunks(4) {
        let n = c.iter().enumerate().fold(0u32, |n, (i, &v)| n | v << (18 - 6 * i));
        out.extend(n.to_be_bytes()[1..c.len()].iter());
    }
    out
}

fn converted(dir: &Path) -> std::path::PathBuf {
    let src = synth(&dir.join("src"), "tiny", |_| {});
    let out = dir.join("tiny-mlx");
    let o = mixq(&["convert", "--source", src.to_str().unwrap(), "--recipe", "mixed_3_6", "--out", out.to_str().unwrap(), "--quiet", "--max-shard-bytes", "65536"], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    out
}

#[test]
fn publish_uploads_every_file_and_a_rerun_sends_no_large_file_again() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted(tmp.path());
    let hub = Hub::start();
    let env = [("HF_ENDPOINT", hub.url.as_str()), ("HF_TOKEN", TOKEN)];
    let o = mixq(&["publish", out.to_str().unwrap(), "--repo", "me/tiny-mlx", "--json"], &env);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let shards = entries(&out).iter().filter(|n| n.ends_with(".safetensors")).count();
    assert!(shards > 1, "several shards");
    assert_eq!((v["lfs_sent"].as_u64(), v["lfs_skipped"].as_u64()), (Some(shards as u64), Some(0)), "{v}");
    let st = hub.state.lock().unwrap();
    let repo = &st.repos["me/tiny-mlx"];
    assert_eq!(repo.keys().cloned().collect::<Vec<_>>(), entries(&out), "every file, the manifest included");
    for (name, bytes) in repo {
        assert_eq!(bytes, &std::fs::read(out.join(name)).unwrap(), "{name}");
    }
    assert!(st.requests.iter().any(|r| r.starts_with("PUT /lfs-part/")) && st.requests.iter().any(|r| r.starts_with("PUT /lfs-upload/")), "both transfers: {:?}", st.requests);
    drop(st);
    // Again: the repo exists (409 is fine) and the hub holds every LFS object already.
    let o = mixq(&["publish", out.to_str().unwrap(), "--repo", "me/tiny-mlx", "--json"], &env);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!((v["lfs_sent"].as_u64(), v["lfs_skipped"].as_u64()), (Some(0), Some(shards as u64)), "{v}");
}

#[test]
fn bad_tokens_and_unverified_folders_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted(tmp.path());
    let hub = Hub::start();
    let no_login = tmp.path().join("no-login");
    let o = mixq(
        &["publish", out.to_str().unwrap(), "--repo", "me/m"],
        &[("HF_ENDPOINT", hub.url.as_str()), ("HF_TOKEN", ""), ("HF_HOME", no_login.to_str().unwrap()), ("HF_TOKEN_PATH", "")],
    );
    let e = text(&o).1;
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("/api/repos/create: HTTP 401: the hub did not accept the token: set HF_TOKEN"), "{e}");
    let o = mixq(&["publish", out.to_str().unwrap(), "--repo", "someone/m"], &[("HF_ENDPOINT", hub.url.as_str()), ("HF_TOKEN", READ_ONLY)]);
    let e = text(&o).1;
    assert!(e.contains("HTTP 403: the token may not write to someone/m"), "{e}");
    // A folder that does not verify is not uploaded at all.
    std::fs::write(out.join("README.md"), "edited after conversion").unwrap();
    let before = hub.state.lock().unwrap().requests.len();
    let o = mixq(&["publish", out.to_str().unwrap(), "--repo", "me/m"], &[("HF_ENDPOINT", hub.url.as_str()), ("HF_TOKEN", TOKEN)]);
    let e = text(&o).1;
    assert!(e.contains("mixq verify found 1 problem(s), so nothing was uploaded: README.md: size"), "{e}");
    assert_eq!(hub.state.lock().unwrap().requests.len(), before, "no request was made");
    let o = mixq(&["publish", out.to_str().unwrap(), "--repo", "not a repo"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("expected a hub repo id"), "{}", text(&o).1);
}

#[test]
fn convert_upload_repo_converts_then_publishes_on_a_branch() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("src"), "tiny", |_| {});
    let out = tmp.path().join("m");
    let hub = Hub::start();
    let env = [("HF_ENDPOINT", hub.url.as_str()), ("HF_TOKEN", TOKEN)];
    let o = mixq(
        &["convert", "--source", src.to_str().unwrap(), "--recipe", "mxfp4-experts", "--out", out.to_str().unwrap(), "--quiet",
          "--upload-repo", "me/up", "--revision", "v1/test", "--private"],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(text(&o).0.contains("uploaded to me/up (v1/test)"), "{}", text(&o).0);
    let st = hub.state.lock().unwrap();
    assert_eq!(st.repos["me/up"].len(), entries(&out).len());
    assert!(st.requests.iter().any(|r| r == "POST /api/models/me/up/branch/v1%2Ftest"), "{:?}", st.requests);
    assert!(st.requests.iter().any(|r| r == "POST /api/models/me/up/commit/v1%2Ftest"), "{:?}", st.requests);
}

#[test]
fn a_failed_part_is_sent_again_and_the_stored_login_token_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted(tmp.path());
    let hub = Hub::start();
    hub.state.lock().unwrap().flaky_parts = vec![2];
    // No HF_TOKEN: the token `huggingface-cli login` stored in HF_HOME is used.
    let home = tmp.path().join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), format!("{TOKEN}\n")).unwrap();
    let env = [("HF_ENDPOINT", hub.url.as_str()), ("HF_TOKEN", ""), ("HF_HOME", home.to_str().unwrap()), ("HF_TOKEN_PATH", "")];
    let o = mixq(&["publish", out.to_str().unwrap(), "--repo", "me/flaky", "--json"], &env);
    assert!(o.status.success(), "{}", text(&o).1);
    let st = hub.state.lock().unwrap();
    for (name, bytes) in &st.repos["me/flaky"] {
        assert_eq!(bytes, &std::fs::read(out.join(name)).unwrap(), "{name}");
    }
    // Each multipart object: part 2 failed once and was sent again; no other part was resent.
    let puts = |suffix: &str| st.requests.iter().filter(|r| r.starts_with("PUT /lfs-part/") && r.ends_with(suffix)).count();
    let objects = puts("/1");
    assert!(objects > 0, "some object went up in parts: {:?}", st.requests);
    assert_eq!(puts("/2"), 2 * objects, "{:?}", st.requests);
    assert_eq!(st.failed.len(), objects);
    drop(st);
    // HF_TOKEN_PATH names the stored token's file instead.
    let elsewhere = tmp.path().join("token-file");
    std::fs::write(&elsewhere, TOKEN).unwrap();
    let env = [("HF_ENDPOINT", hub.url.as_str()), ("HF_TOKEN", ""), ("HF_HOME", tmp.path().to_str().unwrap()), ("HF_TOKEN_PATH", elsewhere.to_str().unwrap())];
    let o = mixq(&["publish", out.to_str().unwrap(), "--repo", "me/flaky", "--json"], &env);
    assert!(o.status.success(), "{}", text(&o).1);
}
