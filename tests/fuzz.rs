//! Fuzzing (proptest) of every parser that reads files from anywhere: safetensors headers and
//! offsets, config.json, recipe YAML, calibration statistics, sensitivity files, the tokenizer and
//! the chat template. Inputs are a fixed corpus of seeds (valid files and known-hostile edge cases,
//! made by code below) mutated (bytes overwritten, inserted, truncated), plus arbitrary bytes. The
//! properties: each parser returns Ok or a clear Err and never panics, and no single allocation
//! while parsing exceeds a bound set by the input's own length (a header's claimed sizes must not
//! be trusted). cargo-fuzz needs a nightly toolchain, which this project's machines cannot fetch,
//! hence proptest.
//!
//! `MIXQ_FUZZ_SECONDS=N` runs each target for N seconds (CI: 60) in batches of fresh deterministic
//! seeds; otherwise one batch of `PROPTEST_CASES` (default 512). Each target prints its case count.
//! A failure prints the shrunk input: add it to `regression_inputs_stay_fixed` below.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;
use std::path::Path;
use std::time::{Duration, Instant};

use mixq_loader::{Calibration, Dtype, GptOssConfig, ShardFile};
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
    LARGEST.with(|m| m.set(0));
    let out = parse();
    let largest = LARGEST.with(|m| m.get());
    let bound = (1 << 20) + 64 * input_len;
    if largest > bound {
        return Err(TestCaseError::fail(format!("an allocation of {largest} bytes for a {input_len}-byte input (bound {bound})")));
    }
    Ok(out)
}

/// Runs one fuzz target: a batch of `PROPTEST_CASES`, or batches until `MIXQ_FUZZ_SECONDS` pass.
fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let seconds: Option<u64> = std::env::var("MIXQ_FUZZ_SECONDS").ok().and_then(|v| v.parse().ok()).filter(|&s| s > 0);
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
        if seconds.is_none_or(|s| start.elapsed() >= Duration::from_secs(s)) {
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
        bounded_alloc(bytes.len(), || with_file(&bytes, |p| Calibration::read(p).is_ok()))?;
        Ok(())
    });
}

#[test]
fn sensitivity_files() {
    let config = trained_config();
    fuzz("sensitivity_files", mutated(vec![sensitivity_seed()]), |bytes| {
        with_file(&bytes, |p| {
            if let Ok(s) = mixq_quantizer::authoring::sensitivity_file::Sensitivity::read(p) {
                let opts = mixq_quantizer::authoring::recipe_search::SearchOptions { min_bits: 3, keep: vec![] };
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

/// Inputs that once failed a target (none so far) and the hostile seeds, checked on every run.
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
}

/// A small valid calibration file.
fn calibration_seed() -> Vec<u8> {
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
