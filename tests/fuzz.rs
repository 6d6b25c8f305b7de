//! Property-based fuzzing (proptest) of every parser that reads files from anywhere: safetensors
//! headers and offsets, config.json, recipe YAML, calibration statistics, sensitivity files, the
//! tokenizer and the chat template. Inputs are valid seeds mutated (bytes flipped, inserted,
//! truncated) and arbitrary bytes; the property is that each parser returns (Ok or a clear Err)
//! and never panics. cargo-fuzz needs a nightly toolchain, which this project's machines cannot
//! fetch, hence proptest. `PROPTEST_CASES` sets the cases per target (default here: 512).

use std::path::Path;

use mixq_loader::{Calibration, Dtype, GptOssConfig, ShardFile};
use proptest::prelude::*;

const TRAINED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");

/// Mutations of a seed: (position, byte) overwrites, an insertion and a truncation.
fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = seed.len().max(1);
    (prop::collection::vec((0..n, any::<u8>()), 0..8), prop::option::of((0..n, prop::collection::vec(any::<u8>(), 1..16))), 0..=n).prop_map(
        move |(writes, insert, keep)| {
            let mut v = seed.clone();
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
        },
    )
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

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
}

fn with_file<T>(bytes: &[u8], f: impl FnOnce(&Path) -> T) -> T {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("input");
    std::fs::write(&p, bytes).expect("writable");
    f(&p)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_headers_never_panic(bytes in mutated(shard_seed())) {
        with_file(&bytes, |p| {
            if let Ok(shard) = ShardFile::open(p) {
                // Every accepted tensor lies inside the file.
                for info in shard.tensors().values() {
                    prop_assert!(shard.bytes(info).len() == info.end - info.begin);
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn arbitrary_bytes_are_not_safetensors(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        with_file(&bytes, |p| { let _ = ShardFile::open(p); });
    }

    #[test]
    fn config_json_never_panics(bytes in mutated(std::fs::read(Path::new(TRAINED).join("config.json")).expect("config"))) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = GptOssConfig::from_json_str(&text, Path::new("config.json"));
    }

    #[test]
    fn recipes_never_panic(bytes in mutated(include_bytes!("../recipes/gpt-oss-120b-3.6bit.yaml").to_vec())) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(r) = mixq_quantizer::Recipe::parse(&text, "fuzz.yaml") {
            let config = GptOssConfig::from_file(&Path::new(TRAINED).join("config.json")).expect("config");
            let _ = mixq_quantizer::Allocation::resolve(&config, &r).map(|a| a.summary());
        }
    }

    #[test]
    fn calibration_files_never_panic(bytes in mutated(calibration_seed())) {
        with_file(&bytes, |p| { let _ = Calibration::read(p); });
    }

    #[test]
    fn sensitivity_files_never_panic(bytes in mutated(sensitivity_seed())) {
        with_file(&bytes, |p| {
            if let Ok(s) = mixq_quantizer::sensitivity::Sensitivity::read(p) {
                let config = GptOssConfig::from_file(&Path::new(TRAINED).join("config.json")).expect("config");
                let opts = mixq_quantizer::recipe_search::SearchOptions { min_bits: 3, keep: vec![] };
                if let Ok(problem) = mixq_quantizer::recipe_search::Problem::new(&s, &config, &opts) {
                    let _ = problem.solve(1 << 24);
                }
            }
        });
    }

    #[test]
    fn tokenizer_inputs_never_panic(text in ".{0,64}", raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let codec = mixq_runtime::TextCodec::load(Path::new(TRAINED)).expect("tokenizer");
        let _ = codec.encode(&text);
        let _ = codec.encode(&String::from_utf8_lossy(&raw));
        if let Ok(ids) = codec.encode(&text) {
            let _ = codec.decode(&ids);
        }
    }

    #[test]
    fn chat_templates_never_panic(template in mutated(include_bytes!("fixtures/harmony/chat_template.jinja").to_vec()), user in ".{0,32}") {
        let t = String::from_utf8_lossy(&template);
        let _ = mixq_runtime::text::render_template(&t, &[("user", user.as_str())], "", "<|endoftext|>");
    }
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
