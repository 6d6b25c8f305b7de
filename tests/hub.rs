//! `--source owner/name` against a local server in the hub's layout (`HF_ENDPOINT`): download with
//! progress into a cold cache, an interrupted download resumed by a range request, a missing repo
//! named with its URL and HTTP 404, and offline mode.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::{synth, text};

/// One request the server saw: path and Range header.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
}

/// A hub stand-in serving one repo's files at `/{repo}/resolve/main/{file}`, as huggingface.co
/// does for hf-hub: `etag` and `x-repo-commit` headers, ranges answered with 206 and
/// `Content-Range`, 404 for anything else.
struct Hub {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct Served {
    repo: String,
    files: BTreeMap<String, Vec<u8>>,
    /// Cut the first full download of this file after this many bytes.
    cut: Mutex<Option<(String, usize)>>,
}

impl Hub {
    fn start(repo: &str, dir: &Path, cut: Option<(&str, usize)>) -> Hub {
        let files = common::entries(dir).into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap())).collect();
        let served = Arc::new(Served { repo: repo.to_string(), files, cut: Mutex::new(cut.map(|(f, n)| (f.to_string(), n))) });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (served, log) = (served.clone(), log.clone());
                std::thread::spawn(move || {
                    let _ = answer(stream, &served, &log);
                });
            }
        });
        Hub { url, seen }
    }

    fn ranges_of(&self, file: &str) -> Vec<Option<String>> {
        self.seen.lock().unwrap().iter().filter(|s| s.path.ends_with(&format!("/{file}"))).map(|s| s.range.clone()).collect()
    }
}

fn answer(stream: TcpStream, served: &Served, log: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(Seen { path: path.clone(), range: range.clone() });
    let mut out = stream;
    let prefix = format!("/{}/resolve/main/", served.repo);
    let Some(body) = path.strip_prefix(&prefix).and_then(|f| served.files.get(f)) else {
        let msg = b"Entry not found";
        write!(out, "HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", msg.len())?;
        return out.write_all(msg);
    };
    let file = &path[prefix.len()..];
    let total = body.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = if b.is_empty() { total - 1 } else { b.parse().unwrap_or(total - 1) };
            (a, b.min(total - 1))
        }
        None => (0, total - 1),
    };
    let etag = format!("\"{:x}\"", <sha2::Sha256 as sha2::Digest>::digest(body));
    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
    write!(
        out,
        "HTTP/1.1 {status}\r\netag: {etag}\r\nx-repo-commit: 0123456789abcdef0123456789abcdef01234567\r\n\
         Content-Range: bytes {start}-{end}/{total}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        end + 1 - start
    )?;
    let mut chunk = &body[start..=end];
    // A full-body request (not hf-hub's 0-0 probe) of the file to cut stops part-way, once.
    if end > start {
        let mut cut = served.cut.lock().unwrap();
        if let Some((name, n)) = cut.as_ref() {
            if name == file {
                chunk = &chunk[..*n];
                *cut = None;
            }
        }
    }
    out.write_all(chunk)?;
    out.flush()
}

fn mixq_hub(args: &[&str], cache: &Path, hub: &str, offline: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixq"));
    cmd.args(args).env("HF_HUB_CACHE", cache).env("HF_ENDPOINT", hub).env_remove("HF_TOKEN").env_remove("HF_HOME");
    for k in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(k);
    }
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    } else {
        cmd.env_remove("HF_HUB_OFFLINE");
    }
    cmd.output().expect("mixq runs")
}

#[test]
fn download_resume_404_and_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("upstream"), "small", |_| {});
    // The repo's card: fetched for its license, which the converted card then names.
    std::fs::write(src.join("README.md"), "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# oss-small\n").unwrap();
    let shard = "model-00001-of-00002.safetensors";
    let shard_len = std::fs::metadata(src.join(shard)).unwrap().len() as usize;
    let cut_at = shard_len / 3;
    let hub = Hub::start("acme/oss-small", &src, Some((shard, cut_at)));
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("converted");
    let convert = |out: &Path, offline: bool, url: &str| {
        mixq_hub(&["convert", "--source", "acme/oss-small", "--recipe", "gpt-oss-120b-3.6bit", "--out", out.to_str().unwrap()], &cache, url, offline)
    };

    // The first run's shard download is cut: a clear error, and the partial bytes stay cached.
    let o = convert(&out, false, &hub.url);
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains(&format!("downloading {shard} was interrupted")) && err.contains("rerun to resume"), "{err}");
    assert!(err.contains("download acme/oss-small/config.json: started"), "progress is reported: {err}");
    assert!(!out.exists());

    // The rerun resumes with a range request from where the cut left off, and converts.
    let o = convert(&out, false, &hub.url);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let ranges = hub.ranges_of(shard);
    assert!(
        ranges.iter().any(|r| r.as_deref() == Some(&format!("bytes={cut_at}-"))),
        "the resumed download asks for bytes {cut_at}- : {ranges:?}"
    );
    assert!(err.contains(&format!("download acme/oss-small/{shard}: done")), "{err}");
    let snapshot = cache.join("models--acme--oss-small/snapshots/0123456789abcdef0123456789abcdef01234567");
    for f in common::entries(&src) {
        assert_eq!(std::fs::read(snapshot.join(&f)).unwrap(), std::fs::read(src.join(&f)).unwrap(), "{f} differs after download");
    }
    let v = common::mixq(&["verify", out.to_str().unwrap()], &[]);
    assert!(v.status.success(), "{:?}", text(&v));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("\nlicense: apache-2.0\n") && card.contains("base_model: acme/oss-small\n"), "{card}");

    // --quiet: no download lines (a cold cache downloads config.json again).
    let o = mixq_hub(&["plan", "--source", "acme/oss-small", "--recipe", "mixed_3_6", "--quiet"], &tmp.path().join("quiet"), &hub.url, false);
    let (stdout, err) = text(&o);
    assert!(o.status.success() && stdout.contains("bits per weight") && err.is_empty(), "{stdout}{err}");

    // A repo the hub does not have: named, with the URL and the status.
    let o = mixq_hub(&["plan", "--source", "acme/missing", "--recipe", "mixed_3_6"], &cache, &hub.url, false);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("acme/missing") && err.contains(&format!("{}/acme/missing/resolve/main/config.json", hub.url)) && err.contains("HTTP 404"),
        "{err}"
    );

    // Offline with the cache warm: no server needed (the endpoint points nowhere).
    let dead = "http://127.0.0.1:9";
    let again = tmp.path().join("converted-offline");
    let o = convert(&again, true, dead);
    assert!(o.status.success(), "{:?}", text(&o));
    // Offline with a cold cache: refused, naming offline mode and the cache, without a request.
    let before = hub.seen.lock().unwrap().len();
    let o = mixq_hub(&["plan", "--source", "acme/oss-small", "--recipe", "mixed_3_6"], &tmp.path().join("cold"), &hub.url, true);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("offline (HF_HUB_OFFLINE)") && err.contains("not in the hub cache"), "{err}");
    assert_eq!(hub.seen.lock().unwrap().len(), before, "offline mode made a request");
    // Online with the hub unreachable: says so and points at offline mode.
    let o = mixq_hub(&["plan", "--source", "acme/other", "--recipe", "mixed_3_6"], &cache, dead, false);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("cannot reach http://127.0.0.1:9") && err.contains("HF_HUB_OFFLINE=1"), "{err}");
}
