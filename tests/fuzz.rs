//! Fuzzing (proptest) of every parser that reads files from anywhere: safetensors headers and
//! offsets, config.json, recipe YAML, calibration statistics, sensitivity files, the tokenizer and
//! the chat template. Inputs are a fixed corpus of seeds (valid files and known-hostile edge cases,
//! made by code below) mutated (bytes overwritten, inserted, truncated), plus arbitrary bytes. The
//! properties: each parser returns Ok or a clear Err and never panics, and no single allocation
//! while parsing exceeds a bound set by the input's own length (a header's claimed sizes must not
//! be trusted). cargo-fuzz needs a nightly toolchain, which this project's machines cannot fetch,
//! hence proptest.
//!
//! Further targets reach the model: mutated MLX and upstream configs, manifests, hub index files
//! and saved reference logits are swapped into tiny checkpoints (made once) and go through the
//! entry points `verify`, `inspect`, `run`/`logits` and `validate` use.
//!
//! `MIXQ_FUZZ_SECONDS=N` is the budget of [`BUDGETED_TARGETS`] targets (CI: 60, sized when there
//! were 8): the binary's total of `BUDGETED_TARGETS * N` seconds is split evenly over all
//! [`TARGETS`], each running batches of fresh deterministic seeds for its share. Otherwise each
//! runs one batch of `PROPTEST_CASES` (default 512). Each target prints its case count. A failure
//! prints the shrunk input: add it to `regression_inputs_stay_fixed` below.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;
use std::path::Path;
use std::time::{Duration, Instant};

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use mixq_loader::{Calibration, Checkpoint, Dtype, GptOssConfig, ShardFile};
use serde_json::{json, Value};
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};

const TRAINED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");

/// The system allocator, recording the largest single allocation made on each thread.
struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the thread-local is
// const-initialised, so recording into it never allocates.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `parse` and fails if any single allocation in it exceeded 1 MiB + 64 × `input_len`.
fn bounded_alloc<T>(input_len: usize, parse: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    bounded_alloc_plus(0, input_len, parse)
}

/// [`bounded_alloc`] with a fixed `allowance` on top, for targets whose work (hashing a shard
/// through a 4 MiB buffer, running a tiny model) allocates what the model needs, not the input.
fn bounded_alloc_plus<T>(allowance: usize, input_len: usize, parse: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    LARGEST.with(|m| m.set(0));
    let out = parse();
    let largest = LARGEST.with(|m| m.get());
    let bound = (1 << 20) + 64 * input_len + allowance;
    if largest > bound {
        return Err(TestCaseError::fail(format!("an allocation of {largest} bytes for a {input_len}-byte input (bound {bound})")));
    }
    Ok(out)
}

/// How many targets `MIXQ_FUZZ_SECONDS` was sized for (CI: 60 s each, about 240 s on 2 threads).
const BUDGETED_TARGETS: u64 = 8;
/// The fuzz targets in this file, which share `BUDGETED_TARGETS * MIXQ_FUZZ_SECONDS` evenly.
const TARGETS: u32 = 13;

/// Runs one fuzz target: a batch of `PROPTEST_CASES`, or batches until its share of
/// `MIXQ_FUZZ_SECONDS` passes.
fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let seconds: Option<Duration> = std::env::var("MIXQ_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(|s| Duration::from_secs(s * BUDGETED_TARGETS) / TARGETS);
    let cases = if seconds.is_some() { 256 } else { std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512) };
    let start = Instant::now();
    let mut total = 0u64;
    for batch in 0u64.. {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&batch.to_le_bytes());
        for (i, b) in name.bytes().enumerate() {
            seed[8 + i % 24] ^= b;
        }
        let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("fuzz target {name} failed in batch {batch}: {e}");
        }
        total += u64::from(cases);
        if seconds.is_none_or(|s| start.elapsed() >= s) {
            break;
        }
    }
    eprintln!("fuzz {name}: {total} cases in {:.1} s, no failure", start.elapsed().as_secs_f64());
}

/// Mutations of one of `seeds`: (position, byte) overwrites, an insertion and a truncation.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(seeds).prop_flat_map(|seed| {
        let n = seed.len().max(1);
        (
            Just(seed),
            prop::collection::vec((0..n, any::<u8>()), 0..8),
            prop::option::of((0..n, prop::collection::vec(any::<u8>(), 1..16))),
            0..=n,
        )
    })
    .prop_map(|(mut v, writes, insert, keep)| {
        for (i, b) in writes {
            if i < v.len() {
                v[i] = b;
            }
        }
        if let Some((at, bytes)) = insert {
            let at = at.min(v.len());
            v.splice(at..at, bytes);
        }
        if keep < v.len() && keep % 3 == 0 {
            v.truncate(keep);
        }
        v
    })
}

/// A valid shard with two small tensors.
fn shard_seed() -> Vec<u8> {
    let (mut bytes, _) = mixq_loader::shard::encode_header(
        &[("format", "pt")],
        &[("a.weight", Dtype::BF16, &[2, 4][..]), ("b.scales", Dtype::U8, &[3][..])],
    );
    bytes.extend((0..19u8).collect::<Vec<_>>());
    bytes
}

/// A raw safetensors file from a header length and header text.
fn raw_shard(claimed_len: u64, header: &str, data: usize) -> Vec<u8> {
    let mut v = claimed_len.to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data));
    v
}

/// Shard seeds: a valid one and hostile ones (huge claimed header length, huge shapes whose
/// product overflows, offsets past the end, reversed offsets, an unknown dtype).
fn shard_seeds() -> Vec<Vec<u8>> {
    let h = |s: &str| raw_shard(s.len() as u64, s, 16);
    vec![
        shard_seed(),
        raw_shard(u64::MAX, "{}", 0),
        raw_shard(1 << 40, r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1),
        h(r#"{"a":{"dtype":"BF16","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#),
        h(r#"{"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,16]}}"#),
        h(r#"{"a":{"dtype":"U8","shape":[1000000000000],"data_offsets":[0,1000000000000]}}"#),
        h(r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[16,8]}}"#),
        h(r#"{"a":{"dtype":"Q9","shape":[16],"data_offsets":[0,16]}}"#),
        h(r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}"#),
    ]
}

fn trained_file(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(TRAINED).join(name)).expect("bundled model file")
}

fn with_file<T>(bytes: &[u8], f: impl FnOnce(&Path) -> T) -> T {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("input");
    std::fs::write(&p, bytes).expect("writable");
    f(&p)
}

fn trained_config() -> GptOssConfig {
    GptOssConfig::from_file(&Path::new(TRAINED).join("config.json")).expect("config")
}

#[test]
fn safetensors_headers() {
    fuzz("safetensors_headers", mutated(shard_seeds()), |bytes| {
        let shard = bounded_alloc(bytes.len(), || with_file(&bytes, ShardFile::open))?;
        if let Ok(shard) = shard {
            // Every accepted tensor lies inside the file.
            for info in shard.tensors().values() {
                prop_assert!(shard.bytes(info).len() == info.end - info.begin);
            }
        }
        Ok(())
    });
}

#[test]
fn safetensors_arbitrary_bytes() {
    fuzz("safetensors_arbitrary_bytes", prop::collection::vec(any::<u8>(), 0..256), |bytes| {
        bounded_alloc(bytes.len(), || with_file(&bytes, |p| ShardFile::open(p).is_ok()))?;
        Ok(())
    });
}

#[test]
fn config_json() {
    let seeds = vec![
        trained_file("config.json"),
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt-oss-120b/config.json")).expect("fixture"),
        br#"{"num_hidden_layers":18446744073709551615,"hidden_size":0,"layer_types":[]}"#.to_vec(),
    ];
    fuzz("config_json", mutated(seeds), |bytes| {
        let text = String::from_utf8_lossy(&bytes);
        bounded_alloc(bytes.len(), || GptOssConfig::from_json_str(&text, Path::new("config.json")).is_ok())?;
        Ok(())
    });
}

#[test]
fn recipes() {
    let seeds = vec![
        include_bytes!("../recipes/gpt-oss-120b-3.6bit.yaml").to_vec(),
        include_bytes!("../recipes/mixed_3_6.yaml").to_vec(),
        b"name: x\nrules:\n  - match: {layers: 0-4294967295}\n    action: {affine: {bits: 3, group_size: 64}}\n".to_vec(),
    ];
    let config = trained_config();
    fuzz("recipes", mutated(seeds), |bytes| {
        let text = String::from_utf8_lossy(&bytes);
        bounded_alloc(bytes.len(), || {
            if let Ok(r) = mixq_quantizer::Recipe::parse(&text, "fuzz.yaml") {
                let _ = mixq_quantizer::Allocation::resolve(&config, &r).map(|a| a.summary());
            }
        })?;
        Ok(())
    });
}

#[test]
fn calibration_files() {
    fuzz("calibration_files", mutated(vec![calibration_seed()]), |bytes| {
        bounded_alloc(bytes.len(), || {
            with_file(&bytes, |p| {
                if let Ok(c) = Calibration::read(p) {
                    let _ = c.site_hessian(mixq_loader::InputSite::Final);
                }
            })
        })?;
        Ok(())
    });
}

#[test]
fn sensitivity_files() {
    let config = trained_config();
    fuzz("sensitivity_files", mutated(vec![sensitivity_seed()]), |bytes| {
        with_file(&bytes, |p| {
            if let Ok(s) = mixq_quantizer::authoring::sensitivity_file::Sensitivity::read(p) {
                let opts = mixq_quantizer::authoring::recipe_search::SearchOptions { min_bits: 3, keep: vec![], affine_only: false };
                if let Ok(problem) = mixq_quantizer::authoring::recipe_search::Problem::new(&s, &config, &opts) {
                    let _ = problem.solve(1 << 24);
                }
            }
        });
        Ok(())
    });
}

#[test]
fn tokenizer_inputs() {
    let codec = mixq_runtime::TextCodec::load(Path::new(TRAINED)).expect("tokenizer");
    fuzz("tokenizer_inputs", (".{0,64}", prop::collection::vec(any::<u8>(), 0..64)), |(text, raw)| {
        let _ = codec.encode(&String::from_utf8_lossy(&raw));
        if let Ok(ids) = codec.encode(&text) {
            let _ = codec.decode(&ids);
        }
        Ok(())
    });
}

#[test]
fn chat_templates() {
    let seeds = vec![include_bytes!("fixtures/harmony/chat_template.jinja").to_vec(), b"{% for m in messages %}{{ m.content }}{% endfor %}".to_vec()];
    fuzz("chat_templates", (mutated(seeds), ".{0,32}"), |(template, user)| {
        let t = String::from_utf8_lossy(&template);
        let _ = mixq_runtime::text::render_template(&t, &[("user", user.as_str())], "", "<|endoftext|>");
        Ok(())
    });
}

/// Values that JSON field edits put in: edge counts, overflowing and fractional numbers, other kinds.
fn interesting_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(-1),
        json!(31),
        json!(32),
        json!(33),
        json!(48),
        json!(63),
        json!(64),
        json!(100000),
        json!(1u64 << 24),
        json!(1u64 << 40),
        json!(1_000_000_000_000u64),
        json!(u64::MAX),
        json!(0.5),
        json!(1e-30),
        json!(1e300),
        json!(-1e300),
        json!("x"),
        json!(null),
        json!(true),
        json!(false),
        json!([]),
        json!({}),
        json!(["sliding_attention"]),
        json!({"group_size": 0, "bits": 4, "mode": "affine"}),
        json!({"group_size": 32, "bits": 4, "mode": "mxfp4"}),
        json!("../../etc/passwd"),
        json!("/etc/hostname"),
        json!("a\u{0}b"),
    ]
}

/// JSON pointers of every node under the root of `v`.
fn json_pointers(v: &Value, at: String, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, c)| (k.replace('~', "~0").replace('/', "~1"), c)).collect(),
        Value::Array(a) => a.iter().enumerate().map(|(i, c)| (i.to_string(), c)).collect(),
        _ => return,
    };
    for (k, c) in children {
        let p = format!("{at}/{k}");
        out.push(p.clone());
        json_pointers(c, p, out);
    }
}

/// Mutations of JSON seeds: up to three fields set to an interesting value or removed (which
/// reaches past the parser), or the bytes mutated as in [`mutated`].
fn json_mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let values = interesting_values();
    let parsed: Vec<Value> = seeds.iter().filter_map(|s| serde_json::from_slice(s).ok()).collect();
    let edits = (prop::sample::select(parsed), prop::collection::vec((any::<usize>(), 0..values.len(), any::<bool>()), 1..4)).prop_map(
        move |(mut v, edits)| {
            for (at, value, remove) in edits {
                let mut pointers = Vec::new();
                json_pointers(&v, String::new(), &mut pointers);
                let Some(p) = pointers.get(at % pointers.len().max(1)) else { break };
                let (parent, key) = p.rsplit_once('/').unwrap_or(("", p));
                match (remove, v.pointer_mut(parent)) {
                    (true, Some(Value::Object(m))) => {
                        m.remove(&key.replace("~1", "/").replace("~0", "~"));
                    }
                    _ => {
                        if let Some(slot) = v.pointer_mut(p) {
                            *slot = values[value].clone();
                        }
                    }
                }
            }
            serde_json::to_vec(&v).expect("serializes")
        },
    );
    prop_oneof![3 => edits, 1 => mutated(seeds)]
}

/// Tiny checkpoints made once per run and shared by the targets that swap one file into them.
struct Fixtures {
    /// A tiny synthetic upstream checkpoint.
    upstream: PathBuf,
    /// Its conversion with `mixed_3_6` (affine and mxfp4 entries in the quantization map).
    converted: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-fixtures");
        let _ = std::fs::remove_dir_all(&root);
        let upstream = root.join("upstream");
        let shape = mixq_synth::Shape::preset("tiny").expect("preset");
        mixq_synth::write_checkpoint(&upstream, &shape).expect("synthetic checkpoint");
        let converted = root.join("converted");
        let recipe = mixq_quantizer::Recipe::load("mixed_3_6").expect("built-in recipe");
        mixq_quantizer::convert(&upstream, &recipe, &converted, &mixq_quantizer::ConvertOptions::default(), &mixq_quantizer::NoProgress)
            .expect("tiny conversion");
        Fixtures { upstream, converted }
    })
}

/// A working folder holding links to every file of `model` but `own`, which the target writes.
fn work_copy(model: &Path, own: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(model).expect("fixture folder").flatten() {
        let name = entry.file_name();
        if name != own {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(&name)).expect("symlink");
        }
    }
    dir
}

/// Room for the 4 MiB hashing buffer, a tiny model's vectors and its logits.
const MODEL_ALLOWANCE: usize = 16 << 20;

/// What `run`/`logits` and `validate` do with a checkpoint: load it on the CPU and run a few
/// tokens (no generation loop). Counts in `ran` the cases whose logits came out.
fn load_and_run(dir: &Path, ran: &AtomicUsize) {
    let Ok(ckpt) = Checkpoint::open(dir) else { return };
    let opts = mixq_runtime::gpu::GpuOptions::default();
    if let Ok((engine, _)) = mixq_runtime::Engine::load(&ckpt, mixq_runtime::Backend::Cpu, &opts, &|_, _| {}) {
        if engine.logits(&[0, 1, 2]).is_ok() {
            ran.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn converted_configs() {
    let f = fixtures();
    let seeds = vec![std::fs::read(f.converted.join("config.json")).expect("converted config")];
    let work = work_copy(&f.converted, "config.json");
    let ran = AtomicUsize::new(0);
    fuzz("converted_configs", json_mutated(seeds), |bytes| {
        std::fs::write(work.path().join("config.json"), &bytes).expect("writable");
        bounded_alloc_plus(MODEL_ALLOWANCE, bytes.len(), || {
            let _ = mixq_quantizer::writer::verify::verify(work.path());
            if let Ok(ckpt) = Checkpoint::open(work.path()) {
                let _ = mixq_quantizer::writer::inspect::inspect(&ckpt);
            }
            load_and_run(work.path(), &ran);
        })?;
        Ok(())
    });
    eprintln!("fuzz converted_configs: {} cases ran the model", ran.load(Ordering::Relaxed));
}

#[test]
fn upstream_configs() {
    let f = fixtures();
    let seeds = vec![std::fs::read(f.upstream.join("config.json")).expect("synthetic config"), trained_file("config.json")];
    let work = work_copy(&f.upstream, "config.json");
    let ran = AtomicUsize::new(0);
    fuzz("upstream_configs", json_mutated(seeds), |bytes| {
        std::fs::write(work.path().join("config.json"), &bytes).expect("writable");
        bounded_alloc_plus(MODEL_ALLOWANCE, bytes.len(), || {
            if let Ok(ckpt) = Checkpoint::open(work.path()) {
                let _ = mixq_loader::layout::validate_upstream(&ckpt);
                let _ = mixq_quantizer::writer::inspect::inspect(&ckpt);
                if let Ok(r) = mixq_quantizer::recipe::language::Recipe::load("mixed_3_6") {
                    let _ = mixq_quantizer::Allocation::resolve(ckpt.config(), &r).map(|a| a.summary());
                }
            }
            load_and_run(work.path(), &ran);
        })?;
        Ok(())
    });
    eprintln!("fuzz upstream_configs: {} cases ran the model", ran.load(Ordering::Relaxed));
}

#[test]
fn manifests() {
    let f = fixtures();
    let manifest = mixq_quantizer::writer::manifest::MANIFEST_FILE;
    let real = std::fs::read(f.converted.join(manifest)).expect("manifest");
    let hostile = br#"{"format":"mixq-manifest/1","files":[{"name":"../../../../etc/hostname","size":1,"sha256":"00"},{"name":"/etc/hostname","size":18446744073709551615,"sha256":"x"},{"name":"","size":0,"sha256":""},{"name":"..","size":0,"sha256":""}]}"#;
    let seeds = vec![real, hostile.to_vec()];
    let work = work_copy(&f.converted, manifest);
    fuzz("manifests", json_mutated(seeds), |bytes| {
        std::fs::write(work.path().join(manifest), &bytes).expect("writable");
        bounded_alloc_plus(MODEL_ALLOWANCE, bytes.len(), || mixq_quantizer::writer::verify::verify(work.path()).ok())?;
        Ok(())
    });
}

#[test]
fn hub_index_files() {
    use mixq_loader::source::{resolve_source_with, HubSettings, Need};
    let f = fixtures();
    let cache = tempfile::tempdir().expect("temp dir");
    let repo = cache.path().join("models--fuzz--tiny");
    std::fs::create_dir_all(repo.join("refs")).expect("cache folder");
    std::fs::write(repo.join("refs/main"), "0123abcd").expect("writable");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).expect("cache folder");
    for entry in std::fs::read_dir(&f.upstream).expect("fixture folder").flatten() {
        if entry.file_name() != mixq_loader::INDEX_FILE {
            std::os::unix::fs::symlink(entry.path(), snapshot.join(entry.file_name())).expect("symlink");
        }
    }
    let hub = HubSettings::with_cache(cache.path().to_path_buf(), true);
    let hostile = br#"{"metadata":{"total_size":18446744073709551615},"weight_map":{"a":"../../../../etc/hostname","b":"/etc/hostname","c":"..","d":7,"e":"x\u0000y"}}"#;
    let seeds = vec![std::fs::read(f.upstream.join(mixq_loader::INDEX_FILE)).expect("index"), hostile.to_vec()];
    fuzz("hub_index_files", json_mutated(seeds), |bytes| {
        std::fs::write(snapshot.join(mixq_loader::INDEX_FILE), &bytes).expect("writable");
        bounded_alloc(bytes.len(), || {
            let resolved = resolve_source_with("fuzz/tiny", Need::Everything, &hub);
            if let Ok(mixq_loader::ResolvedSource::Folder(dir)) = &resolved {
                prop_assert!(dir.starts_with(cache.path()), "resolved outside the cache: {dir:?}");
            }
            let _ = Checkpoint::open(&snapshot);
            Ok(())
        })??;
        Ok(())
    });
}

#[test]
fn reference_logits_files() {
    use mixq_validate::reference::{self, RefHeader};
    use mixq_validate::{EvalOptions, Reference};
    let f = fixtures();
    let ckpt = Checkpoint::open(&f.upstream).expect("fixture");
    let opts = mixq_runtime::gpu::GpuOptions::default();
    let (engine, _) = mixq_runtime::Engine::load(&ckpt, mixq_runtime::Backend::Cpu, &opts, &|_, _| {}).expect("tiny model");
    let tokens: Vec<u32> = (0..24u32).map(|i| i * 37 % 300).collect();
    let eval = EvalOptions { ctx: 8, stride: 4, top_k: 6 };
    let scored = mixq_validate::score(&engine, &tokens, &Reference::None, eval, &|_, _| {}).expect("scores");
    let dir = tempfile::tempdir().expect("temp dir");
    let header = RefHeader { model: "tiny".into(), tokens_sha256: mixq_validate::tokens_sha256(&tokens), ctx: 8, stride: 4, top_k: 6, vocab: None };
    let seed_path = dir.path().join("seed.ref");
    reference::write(&seed_path, &header, &scored.summaries).expect("writable");
    let seed = std::fs::read(&seed_path).expect("readable");
    // Hostile headers: top_k and count whose products overflow, or far beyond the file.
    let with_meta = |meta: &str| {
        let mut v = b"MIXQREF1".to_vec();
        v.extend((meta.len() as u32).to_le_bytes());
        v.extend(meta.as_bytes());
        v.extend(&[0u8; 56]);
        v
    };
    let seeds = vec![
        seed,
        with_meta(r#"{"model":"m","tokens_sha256":"x","ctx":8,"stride":4,"top_k":4611686018427387903,"count":1}"#),
        with_meta(r#"{"model":"m","tokens_sha256":"x","ctx":8,"stride":4,"top_k":2,"count":9223372036854775807}"#),
        with_meta(r#"{"model":"m","tokens_sha256":"x","ctx":8,"stride":4,"top_k":1099511627776,"count":0}"#),
    ];
    fuzz("reference_logits_files", mutated(seeds), |bytes| {
        bounded_alloc_plus(MODEL_ALLOWANCE, bytes.len(), || {
            with_file(&bytes, |p| {
                if let Ok((_, saved)) = reference::read(p) {
                    let _ = mixq_validate::score(&engine, &tokens, &Reference::Saved(&saved), eval, &|_, _| {});
                }
            })
        })?;
        Ok(())
    });
}

/// Inputs that once failed (issue 15's configs; no fuzz target has failed so far) and the hostile
/// seeds, checked on every run.
#[test]
fn regression_inputs_stay_fixed() {
    let seeds = shard_seeds();
    let (valid, hostile) = (&seeds[seeds.len() - 1], &seeds[1..seeds.len() - 1]);
    for (i, seed) in hostile.iter().enumerate() {
        let r = bounded_alloc(seed.len(), || with_file(seed, |p| ShardFile::open(p).map(|_| ()).map_err(|e| e.to_string())));
        match r {
            Ok(Err(message)) => assert!(message.contains("input"), "hostile seed {i}: the error names the file: {message}"),
            other => panic!("hostile shard seed {i} was not refused within the allocation bound: {other:?}"),
        }
    }
    assert!(with_file(valid, |p| ShardFile::open(p).is_ok()), "a shard with __metadata__ opens");
    // Issue 15's configs: a group size of 0 (verify divided by it) and 10^12 layers without
    // layer_types (every command tried to allocate them) are refused by field, within the bound.
    let f = fixtures();
    let work = work_copy(&f.converted, "config.json");
    let base: Value = serde_json::from_slice(&std::fs::read(f.converted.join("config.json")).expect("config")).expect("JSON");
    let module = base["quantization"].as_object().and_then(|q| q.keys().find(|k| q[*k].is_object())).expect("a module entry").clone();
    type Edit<'e> = (&'e str, &'e dyn Fn(&mut Value));
    let edits: [Edit<'_>; 2] = [
        ("`quantization`: `", &|v| v["quantization"][&module]["group_size"] = json!(0)),
        ("`num_hidden_layers` is 1000000000000", &|v| {
            v["num_hidden_layers"] = json!(1_000_000_000_000u64);
            v.as_object_mut().expect("object").remove("layer_types");
        }),
    ];
    for (want, edit) in edits {
        let mut v = base.clone();
        edit(&mut v);
        let bytes = serde_json::to_vec(&v).expect("serializes");
        std::fs::write(work.path().join("config.json"), &bytes).expect("writable");
        let r = bounded_alloc_plus(MODEL_ALLOWANCE, bytes.len(), || mixq_quantizer::writer::verify::verify(work.path())).expect("within the bound");
        assert!(r.problems.iter().any(|p| p.contains("config.json") && p.contains(want)), "{want}: {:?}", r.problems);
        let ran = AtomicUsize::new(0);
        bounded_alloc_plus(MODEL_ALLOWANCE, bytes.len(), || load_and_run(work.path(), &ran)).expect("within the bound");
        assert_eq!(ran.load(Ordering::Relaxed), 0);
    }
}

/// A small valid calibration file.
fn calibration_seed() -> Vec<u8> {
    use mixq_loader::calibration::HessianEntry;
    use mixq_loader::{ModelFingerprint, StatTensor};
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert("lm_head.input_sq_mean".to_string(), StatTensor { shape: vec![4], data: vec![1.0, 0.5, 0.25, 2.0] });
    tensors.insert("model.layers.0.mlp.experts.token_count".to_string(), StatTensor { shape: vec![2], data: vec![3.0, 0.0] });
    let c = Calibration {
        model: ModelFingerprint { config_sha256: "a".into(), weights_sha256: "b".into() },
        model_label: "m".into(),
        text_sha256: "c".into(),
        tokens: 12,
        ctx: 8,
        tensors,
        hessians: [("lm_head.input.hessian".to_string(), HessianEntry::Loaded(StatTensor { shape: vec![3], data: vec![4.0, 1.0, 9.0] }))].into(),
        file: None,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("s.safetensors");
    c.write(&p).expect("writable");
    std::fs::read(&p).expect("readable")
}

/// A small valid sensitivity file (two units, two settings).
fn sensitivity_seed() -> Vec<u8> {
    br#"{"format":"mixq-sensitivity/1","model":"m","config_sha256":"x","text_sha256":null,"tokens":0,
"calibration_sha256":null,"quantizer":"mse","reference_setting":[3,64],"second_setting":null,"cost_kind":"proxy",
"rank_correlation":null,"seconds":0.0,"units":[
{"class":"q_proj","layer":0,"module":"model.layers.0.self_attn.q_proj","params":65536,"bf16_bytes":131072,"measured_kl":null,"second_kl":null,"exponent":null,
 "settings":[{"bits":3,"group_size":64,"bytes":28672,"proxy":0.1,"cost":0.1},{"bits":4,"group_size":64,"bytes":36864,"proxy":0.02,"cost":0.02}]},
{"class":"lm_head","layer":null,"module":"lm_head","params":524288,"bf16_bytes":1048576,"measured_kl":null,"second_kl":null,"exponent":null,
 "settings":[{"bits":3,"group_size":64,"bytes":229376,"proxy":0.1,"cost":0.1}]}]}"#
        .to_vec()
}

/// The allocation property can fail: a parser that trusted a claimed size would be caught.
#[test]
fn the_allocation_bound_is_enforced() {
    let claimed = 64 << 20;
    let r = bounded_alloc(16, || vec![0u8; claimed].len());
    assert!(r.is_err(), "a 64 MiB allocation for a 16-byte input passed the bound");
    assert!(bounded_alloc(16, || vec![0u8; 1024].len()).is_ok());
}
