//! The GPU backend against the CPU runtime: logits on generated checkpoints of several shapes in
//! every stored form (upstream MXFP4 and each shipped recipe), greedy generation on the trained
//! model, tensors split across bindings, and the CLI's `--backend` switch.
//!
//! These tests need a GPU adapter; lavapipe (Mesa's Vulkan on the CPU) is enough. Where none
//! exists they fail, naming what to install; `MIXQ_GPU_TESTS=skip` skips them, except under CI.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::dense::{write_dense, Float};
use common::{kl_per_position, mixq, recast_floats, synth, text};
use mixq_loader::Checkpoint;
use mixq_runtime::gpu::{GpuContext, GpuModel, GpuOptions, GpuSampling};
use mixq_runtime::Model;

const TRAINED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt-oss-shakespeare");
const RECIPES: [&str; 3] = ["gpt-oss-120b-3.6bit", "mixed_3_6", "mxfp4-experts"];

/// The GPU, or `None` when skipping was asked for outside CI; otherwise a loud failure.
fn gpu(max_binding: Option<u64>) -> Option<Arc<GpuContext>> {
    match GpuContext::new(&GpuOptions { allow_software: true, max_binding }) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            let skip = std::env::var("MIXQ_GPU_TESTS").is_ok_and(|v| v == "skip");
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
            if skip && !ci {
                eprintln!("skipping a GPU test (MIXQ_GPU_TESTS=skip): {e}");
                return None;
            }
            panic!(
                "the GPU tests need a GPU adapter and found none: {e}\n\
                 On Debian/Ubuntu install mesa-vulkan-drivers and libvulkan1 (lavapipe runs Vulkan on the CPU); \
                 .ci/run does this. Outside CI, MIXQ_GPU_TESTS=skip skips these tests."
            )
        }
    }
}

fn convert(src: &Path, recipe: &str, out: &Path) -> PathBuf {
    let r = mixq_quantizer::Recipe::load(recipe).expect("built-in recipe");
    let opts = mixq_quantizer::ConvertOptions { force: true, max_shard_bytes: 1 << 30, source_label: "test".into(), ..Default::default() };
    mixq_quantizer::convert(src, &r, out, &opts, &mixq_quantizer::NoProgress).expect("conversion succeeds");
    out.to_path_buf()
}

/// Deterministic token ids in the vocabulary.
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// Mean KL(cpu || gpu) per position and the positions whose argmax differs although the CPU's top
/// two logits are more than 1e-3 apart.
fn compare(cpu: &[f32], gpu: &[f32], vocab: usize) -> (f64, Vec<usize>) {
    assert_eq!(cpu.len(), gpu.len());
    let kls = kl_per_position(cpu, gpu, vocab);
    let mut bad = Vec::new();
    for (pos, ((c, g), k)) in cpu.chunks_exact(vocab).zip(gpu.chunks_exact(vocab)).zip(&kls).enumerate() {
        assert!(g.iter().all(|v| v.is_finite()), "position {pos}: non-finite GPU logits");
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| c[b].total_cmp(&c[a]));
        let gap = c[order[0]] - c[order[1]];
        let g_top = mixq_runtime::sample::argmax(g) as usize;
        if std::env::var("MIXQ_DEBUG_KL").is_ok() && *k > 1e-7 {
            eprintln!("pos {pos}: kl {k:.3e} maxdiff {}", c.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max));
        }
        if gap > 1e-3 && g_top != order[0] {
            bad.push(pos);
        }
    }
    (kls.iter().sum::<f64>() / kls.len().max(1) as f64, bad)
}

/// Logits of `ids` on both backends; the GPU runs them as a prefill of `split` tokens followed by
/// one-token decode steps, so both paths are covered.
fn both(dir: &Path, ctx: &Arc<GpuContext>, ids: &[u32], split: usize) -> (Vec<f32>, Vec<f32>, usize) {
    let ckpt = Checkpoint::open(dir).expect("checkpoint opens");
    let cpu = Model::load(&ckpt).expect("CPU model loads");
    let vocab = cpu.config.vocab_size;
    let want = cpu.forward(ids, &mut cpu.new_cache(), true).expect("CPU forward");
    let gpu = GpuModel::upload(&cpu, ctx.clone(), &|_| {}).expect("GPU model uploads");
    let mut s = gpu.session(ids.len()).expect("GPU session");
    let mut got = s.forward(&ids[..split], true).expect("GPU prefill");
    for &t in &ids[split..] {
        got.extend(s.forward(&[t], true).expect("GPU decode step"));
    }
    (want, got, vocab)
}

fn assert_agree(label: &str, cpu: &[f32], gpu: &[f32], vocab: usize) -> f64 {
    let (kl, bad) = compare(cpu, gpu, vocab);
    eprintln!("{label}: mean KL {kl:.3e}, argmax mismatches {bad:?}");
    if std::env::var("MIXQ_DEBUG_KL").is_ok() {
        return kl;
    }
    assert!(kl < 1e-5, "{label}: mean KL {kl:e} between CPU and GPU logits");
    assert!(bad.is_empty(), "{label}: argmax differs at positions {bad:?}");
    kl
}

/// Every shape in every stored form, 150 tokens (past the sliding windows and the 64-token
/// prefill chunks), prefill of 140 then 10 decode steps.
fn agreement_for(preset: &str) {
    let Some(ctx) = gpu(None) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("upstream"), preset, |_| {});
    let mut forms = vec![("upstream".to_string(), src.clone())];
    for r in RECIPES {
        forms.push((r.to_string(), convert(&src, r, &tmp.path().join(r))));
    }
    for (name, dir) in forms {
        let vocab = Checkpoint::open(&dir).unwrap().config().vocab_size;
        let ids = tokens(150, vocab, 7);
        let (want, got, vocab) = both(&dir, &ctx, &ids, 140);
        assert_agree(&format!("{preset} {name}"), &want, &got, vocab);
    }
}

#[test]
fn gpu_matches_cpu_on_the_tiny_shape() {
    agreement_for("tiny");
}

#[test]
fn gpu_matches_cpu_on_the_small_shape() {
    agreement_for("small");
}

#[test]
fn gpu_matches_cpu_on_the_wide_shape() {
    agreement_for("wide");
}

#[test]
fn gpu_matches_cpu_on_the_trained_model() {
    let Some(ctx) = gpu(None) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(Path::new(TRAINED).join("../shakespeare-dev.txt")).unwrap();
    let codec = mixq_runtime::TextCodec::load(Path::new(TRAINED)).unwrap();
    let ids: Vec<u32> = codec.encode(&text[..4000]).unwrap().into_iter().take(200).collect();
    for (name, dir) in [("upstream".to_string(), PathBuf::from(TRAINED))]
        .into_iter()
        .chain(RECIPES.iter().map(|r| (r.to_string(), convert(Path::new(TRAINED), r, &tmp.path().join(r)))))
    {
        let (want, got, vocab) = both(&dir, &ctx, &ids, 190);
        assert_agree(&format!("trained {name}"), &want, &got, vocab);
    }
}

/// Tensors larger than the largest binding are split by rows; the results do not change.
#[test]
fn split_tensors_give_the_same_logits() {
    let Some(ctx) = gpu(Some(32 << 10)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("upstream"), "small", |_| {});
    let q = convert(&src, "gpt-oss-120b-3.6bit", &tmp.path().join("q"));
    for dir in [src, q] {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cpu = Model::load(&ckpt).unwrap();
        let gpu = GpuModel::upload(&cpu, ctx.clone(), &|_| {}).unwrap();
        assert!(gpu.max_parts() > 1, "a 16 KiB part limit should split the large tensors");
        let ids = tokens(70, cpu.config.vocab_size, 3);
        let want = cpu.forward(&ids, &mut cpu.new_cache(), true).unwrap();
        let got = gpu.session(70).unwrap().forward(&ids, true).unwrap();
        assert_agree(&format!("split {}", dir.display()), &want, &got, cpu.config.vocab_size);
    }
}

/// One module's weight swapped for a replacement on the GPU (only that tensor uploaded) gives the
/// CPU's logits with the same swap, whole and split into parts; the model it was swapped from
/// still gives the original logits afterwards.
#[test]
fn a_swapped_weight_gives_the_cpus_logits_and_leaves_the_model_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("upstream"), "small", |_| {});
    let ckpt = Checkpoint::open(&src).unwrap();
    let cpu = Model::load(&ckpt).unwrap();
    let c = cpu.config.clone();
    let (h, i, e) = (c.hidden_size, c.intermediate_size, c.num_local_experts);
    let ids = tokens(70, c.vocab_size, 11);
    let want = cpu.forward(&ids, &mut cpu.new_cache(), true).unwrap();
    // Upstream gate and up rows are interleaved views of one stored tensor: the swap of gate_proj
    // must leave up_proj reading the original.
    let swaps = [
        ("lm_head", c.vocab_size, h),
        ("model.layers.0.self_attn.q_proj", c.num_attention_heads * c.head_dim, h),
        ("model.layers.1.mlp.router", e, h),
        ("model.layers.0.mlp.experts.gate_proj", e * i, h),
        ("model.layers.1.mlp.experts.down_proj", e * h, i),
    ];
    for max_binding in [None, Some(32 << 10)] {
        let Some(ctx) = gpu(max_binding) else { return };
        let gpu_model = GpuModel::upload(&cpu, ctx.clone(), &|_| {}).unwrap();
        for (n, (module, rows, cols)) in swaps.iter().enumerate() {
            let values: Vec<u8> = (0..rows * cols)
                .flat_map(|k| half::bf16::from_f32((((k * 7 + n * 13) % 101) as f32 / 101.0 - 0.5) * 0.05).to_le_bytes())
                .collect();
            let codes = mixq_runtime::matrix::Codes::Dense { data: &values, dtype: mixq_loader::FloatDtype::BF16 };
            let cpu_swapped = cpu.with_weight(module, codes).unwrap();
            let cpu_logits = cpu_swapped.forward(&ids, &mut cpu_swapped.new_cache(), true).unwrap();
            let swapped = gpu_model.with_weight(module, codes).unwrap();
            let gpu_logits = swapped.session(70).unwrap().forward(&ids, true).unwrap();
            assert_agree(&format!("{module} swapped, binding {max_binding:?}"), &cpu_logits, &gpu_logits, c.vocab_size);
            let (kl, _) = compare(&want, &cpu_logits, c.vocab_size);
            assert!(kl > 1e-4, "{module}: the replacement should change the logits (KL {kl:e})");
        }
        let after = gpu_model.session(70).unwrap().forward(&ids, true).unwrap();
        assert_agree(&format!("the original after the swaps, binding {max_binding:?}"), &want, &after, c.vocab_size);
        let short = vec![0u8; 64];
        let codes = mixq_runtime::matrix::Codes::Dense { data: &short, dtype: mixq_loader::FloatDtype::BF16 };
        let err = gpu_model.with_weight("lm_head", codes).expect_err("a replacement of the wrong size is refused").to_string();
        assert!(err.contains("lm_head") && err.contains("bytes"), "{err}");
        assert!(gpu_model.with_weight("model.layers.9.mlp.router", codes).is_err(), "a layer the model lacks is refused");
    }
}

/// `sensitivity --backend gpu` measures each unit's KL on the GPU: the same figures as the CPU's.
#[test]
fn cli_sensitivity_agrees_across_backends() {
    if gpu(None).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let text_file = Path::new(TRAINED).join("../shakespeare-dev.txt");
    let measure = |backend: &str| {
        let out = tmp.path().join(format!("{backend}.json"));
        let started = std::time::Instant::now();
        let o = mixq(
            &[
                "sensitivity", "--model", TRAINED, "--text", text_file.to_str().unwrap(), "--tokens", "16", "--ctx", "16",
                "--bits", "3", "--group-sizes", "64", "--measure", "3,64", "--probe-tokens", "0", "--backend", backend, "--out", out.to_str().unwrap(), "--json",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o).1);
        eprintln!("sensitivity on {backend}: {:.1}s", started.elapsed().as_secs_f64());
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(out).unwrap()).unwrap()
    };
    let (c, g) = (measure("cpu"), measure("gpu"));
    let units = |v: &serde_json::Value| v["units"].as_array().unwrap().clone();
    let (cu, gu) = (units(&c), units(&g));
    assert_eq!(cu.len(), gu.len());
    assert!(!cu.is_empty());
    for (a, b) in cu.iter().zip(&gu) {
        assert_eq!(a["module"], b["module"]);
        let (x, y) = (a["measured_kl"].as_f64().expect("a measured KL"), b["measured_kl"].as_f64().expect("a measured KL"));
        // Each KL compares two forward passes on one backend; the backends' logits differ by a
        // mean KL under 1e-5 (assert_agree), so their KLs by about as much.
        assert!((x - y).abs() <= 1e-5 + 1e-3 * x.abs(), "{}: cpu {x:e} vs gpu {y:e}", a["module"]);
    }
}

/// The GPU's calibration sums of every kind, per-expert Hessians included, are the CPU
/// observer's to f32 rounding, over windows longer than a prefill chunk (tiny shape: 4 experts).
#[test]
fn gpu_calibration_sums_match_the_cpu_observer() {
    let Some(ctx) = gpu(None) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(&tmp.path().join("upstream"), "tiny", |_| {});
    let ckpt = Checkpoint::open(&src).unwrap();
    let cpu = Model::load(&ckpt).unwrap();
    let ids = tokens(170, cpu.config.vocab_size, 4);
    let gpu_engine = mixq_runtime::Engine::from_gpu(GpuModel::upload(&cpu, ctx, &|_| {}).unwrap());
    let scope = mixq_validate::calibrate::HessianScope::PerExpert;
    let (want, windows) = mixq_validate::calibrate::calibrate_tokens(&mixq_runtime::Engine::Cpu(cpu), &ids, 100, scope, &|_, _| {}).unwrap();
    let (got, gpu_windows) = mixq_validate::calibrate::calibrate_tokens(&gpu_engine, &ids, 100, scope, &|_, _| {}).unwrap();
    assert_eq!((windows, gpu_windows), (2, 2));
    assert_eq!(want.tensors.keys().collect::<Vec<_>>(), got.tensors.keys().collect::<Vec<_>>());
    assert_eq!(want.hessians.keys().collect::<Vec<_>>(), got.hessians.keys().collect::<Vec<_>>());
    assert!(want.hessians.keys().any(|k| k.ends_with("expert_hessian")));
    let data = |e: &mixq_loader::calibration::HessianEntry| match e {
        mixq_loader::calibration::HessianEntry::Loaded(t) => t.data.clone(),
        other => panic!("a measured Hessian is in memory, not {other:?}"),
    };
    let pairs = want.tensors.iter().map(|(k, t)| (k.clone(), t.data.clone(), got.tensors[k].data.clone()));
    let pairs = pairs.chain(want.hessians.iter().map(|(k, h)| (k.clone(), data(h), data(&got.hessians[k]))));
    for (name, a, b) in pairs {
        assert_sums_close(&name, &a, &b);
    }
}

/// Calibration sums of the two backends: f32 sums added in another order, so each entry within
/// 1e-4 of the largest of its tensor.
fn assert_sums_close(what: &str, cpu: &[f32], gpu: &[f32]) {
    assert_eq!(cpu.len(), gpu.len(), "{what}");
    let scale = cpu.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = cpu.iter().zip(gpu).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4 * scale + 1e-7, "{what}: differs by {worst:e} (largest value {scale:e})");
}

/// `calibrate --backend gpu` accumulates the statistics on the device: every per-channel mean,
/// token count and shared Hessian is the CPU's to f32 rounding (the sums are
/// added in another order), and gptq converts from the file.
#[test]
fn cli_calibrate_agrees_across_backends_and_gptq_converts_from_it() {
    if gpu(None).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let text_file = Path::new(TRAINED).join("../shakespeare-dev.txt");
    let calibrate = |backend: &str| {
        let out = tmp.path().join(format!("{backend}.safetensors"));
        let o = mixq(
            &[
                "calibrate", "--model", TRAINED, "--text", text_file.to_str().unwrap(), "--max-tokens", "200", "--ctx", "100",
                "--hessian", "--backend", backend, "--out", out.to_str().unwrap(), "--json",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o).1);
        let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
        eprintln!("calibrate on {backend}: {:.0} tokens/s", v["tokens_per_second"].as_f64().unwrap());
        (out.clone(), mixq_loader::Calibration::read(&out).unwrap())
    };
    let ((_, c), (gpu_file, g)) = (calibrate("cpu"), calibrate("gpu"));
    assert_eq!(c.tokens, g.tokens);
    assert_eq!(c.tensors.keys().collect::<Vec<_>>(), g.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &c.tensors {
        let u = &g.tensors[name];
        assert_eq!(t.shape, u.shape, "{name}");
        if name.ends_with("token_count") {
            assert_eq!(t.data, u.data, "{name}: the same tokens reach each expert");
        } else {
            assert_sums_close(name, &t.data, &u.data);
        }
    }
    let config = Checkpoint::open(Path::new(TRAINED)).unwrap().config().clone();
    let mut hessians = 0;
    for site in mixq_loader::InputSite::all(&config) {
        for (a, b) in [(c.site_hessian(site).unwrap(), g.site_hessian(site).unwrap()), (c.expert_hessians(site).unwrap(), g.expert_hessians(site).unwrap())] {
            assert_eq!(a.is_some(), b.is_some(), "{site:?}");
            if let (Some(a), Some(b)) = (a, b) {
                assert_eq!(a.shape, b.shape, "{site:?}");
                assert_sums_close(&format!("{} Hessian", site.name()), &a.data, &b.data);
                hessians += 1;
            }
        }
    }
    assert_eq!(hessians, c.hessians.len());
    assert!(hessians > 0);
    let out = tmp.path().join("gptq");
    let o = mixq(
        &[
            "convert", "--source", TRAINED, "--recipe", "gpt-oss-120b-3.6bit", "--calibration", gpu_file.to_str().unwrap(),
            "--quantizer", "gptq", "--out", out.to_str().unwrap(), "--quiet",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let ids = tokens(40, config.vocab_size, 9);
    let ckpt = Checkpoint::open(&out).unwrap();
    let logits = Model::load(&ckpt).unwrap().forward(&ids, &mut Model::load(&ckpt).unwrap().new_cache(), true).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
}

/// Checkpoints whose floats (dense weights, scales, biases, vectors) are F32 or F16, as mlx-lm
/// writes them, give the CPU's logits on the GPU, whole (F32) and split into parts (F16).
#[test]
fn float32_and_float16_checkpoints_agree_across_backends() {
    let tmp = tempfile::tempdir().unwrap();
    let q = convert(Path::new(TRAINED), "gpt-oss-120b-3.6bit", &tmp.path().join("q"));
    let ids = tokens(80, 2048, 5);
    for (dtype, max_binding) in [("F32", None), ("F16", Some(32 << 10))] {
        let Some(ctx) = gpu(max_binding) else { return };
        let dir = recast_floats(&q, &tmp.path().join(dtype), dtype);
        let (want, got, vocab) = both(&dir, &ctx, &ids, 72);
        assert_agree(&format!("{dtype} floats, binding {max_binding:?}"), &want, &got, vocab);
    }
}

/// transformers' dense layout (a fine-tune's) on the GPU: the BF16 copy whole and the F16 copy split
/// into parts (its expert columns gathered into rows as they are sent, F16 widened) give the CPU's
/// logits, and the BF16 copy the upstream MXFP4 model's own on the GPU.
#[test]
fn dense_sources_agree_across_backends() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = tokens(80, 2048, 11);
    let Some(whole) = gpu(None) else { return };
    let (_, upstream_gpu, _) = both(Path::new(TRAINED), &whole, &ids, 72);
    for (float, max_binding) in [(Float::Bf16, None), (Float::F16, Some(1 << 20))] {
        let Some(ctx) = gpu(max_binding) else { return };
        let dir = write_dense(&tmp.path().join(float.name()), float, true, |_| {});
        let (want, got, vocab) = both(&dir, &ctx, &ids, 72);
        assert_agree(&format!("dense {float:?}, binding {max_binding:?}"), &want, &got, vocab);
        if let Float::Bf16 = float {
            assert_agree("dense BF16 vs upstream on the GPU", &upstream_gpu, &got, vocab);
        }
    }
}

/// Greedy generation of 48 tokens is the same on both backends, the GPU sampling on the device.
#[test]
fn greedy_generation_is_identical_on_both_backends() {
    let Some(ctx) = gpu(None) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let q = convert(Path::new(TRAINED), "gpt-oss-120b-3.6bit", &tmp.path().join("q"));
    let codec = mixq_runtime::TextCodec::load(Path::new(TRAINED)).unwrap();
    for dir in [PathBuf::from(TRAINED), q] {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cpu = Model::load(&ckpt).unwrap();
        let gpu = GpuModel::upload(&cpu, ctx.clone(), &|_| {}).unwrap();
        for prompt in ["ROMEO:\nBut soft, what light", "KING HENRY:\nOnce more unto the breach", "First Citizen:\n"] {
            let ids = codec.encode(prompt).unwrap();
            let mut sampler = mixq_runtime::Sampler::new(Default::default());
            let (want, _) = mixq_runtime::generate(&cpu, &ids, 48, &mut sampler, &[], |_| {}).unwrap();
            let mut s = gpu.session(ids.len() + 48).unwrap();
            let mut got = vec![s.next_token(&ids, GpuSampling::default()).unwrap()];
            while got.len() < 48 {
                let last = *got.last().unwrap();
                got.push(s.next_token(&[last], GpuSampling::default()).unwrap());
            }
            assert_eq!(got, want, "{}: {prompt:?}", dir.display());
        }
    }
}

/// Temperature sampling on the GPU is seeded: the same seed repeats, another seed differs, and a
/// sharp distribution is followed.
#[test]
fn gpu_sampling_is_seeded() {
    let Some(ctx) = gpu(None) else { return };
    let ckpt = Checkpoint::open(Path::new(TRAINED)).unwrap();
    let cpu = Model::load(&ckpt).unwrap();
    let gpu = GpuModel::upload(&cpu, ctx, &|_| {}).unwrap();
    let run = |seed: u64, temperature: f32| -> Vec<u32> {
        let mut s = gpu.session(64).unwrap();
        let sampling = GpuSampling { temperature, seed };
        let mut out = vec![s.next_token(&[10, 20, 30], sampling).unwrap()];
        while out.len() < 32 {
            let last = *out.last().unwrap();
            out.push(s.next_token(&[last], sampling).unwrap());
        }
        out
    };
    assert_eq!(run(1, 1.0), run(1, 1.0));
    assert_ne!(run(1, 1.0), run(2, 1.0));
    assert_eq!(run(5, 1e-4), run(9, 0.0), "a tiny temperature is greedy");
}

#[test]
fn cli_backend_gpu_generates_what_the_cpu_generates() {
    if gpu(None).is_none() {
        return;
    }
    let run = |backend: &str| {
        let o = mixq(&["run", "--model", TRAINED, "--prompt", "ROMEO:", "--max-tokens", "24", "--backend", backend, "--json"], &[]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{backend}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v["tokens"].clone(), v)
    };
    let (cpu, _) = run("cpu");
    let (gpu, v) = run("gpu");
    assert_eq!(cpu, gpu);
    assert_eq!(v["backend"], "gpu");
    assert!(v["gpu_memory_bytes"].as_u64().unwrap() > 0);
}

/// Without any Vulkan driver, `--backend gpu` is a clear error and `auto` notes its fallback
/// (Linux only: the variables hide Vulkan drivers, not Metal or DX12).
#[cfg(target_os = "linux")]
#[test]
fn no_adapter_is_a_clear_error_and_auto_falls_back() {
    let no_driver = [("VK_ICD_FILENAMES", "/nonexistent/icd.json"), ("VK_DRIVER_FILES", "/nonexistent/icd.json")];
    let o = mixq(&["run", "--model", TRAINED, "--prompt", "ROMEO:", "--max-tokens", "4", "--backend", "gpu"], &no_driver);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains("no GPU adapter found") && err.contains("libvulkan1"), "{err}");
    let o = mixq(&["run", "--model", TRAINED, "--prompt", "ROMEO:", "--max-tokens", "4", "--backend", "auto", "--json"], &no_driver);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("note: running on the CPU"), "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["backend"], "cpu");
}

/// The drivers' probing messages stay off a successful command's stderr unless `--verbose` asks
/// for them. Mesa's Vulkan WSI prints `XDG_RUNTIME_DIR is invalid or not set` on every probe
/// when `WAYLAND_DISPLAY` is set and `XDG_RUNTIME_DIR` is not (as under `sudo` or in a container):
/// the test makes that environment, and checks first that it does make the noise.
#[cfg(target_os = "linux")]
#[test]
fn driver_probing_is_silent_unless_verbose() {
    if gpu(None).is_none() {
        return;
    }
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mixq"))
            .args(args)
            .env("WAYLAND_DISPLAY", "wayland-mixq-test")
            .env_remove("XDG_RUNTIME_DIR")
            .output()
            .expect("mixq runs");
        let (_, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {err}");
        err
    };
    const NOISE: &str = "XDG_RUNTIME_DIR";
    let loud = run(&["adapters", "--verbose"]);
    assert!(loud.contains(NOISE), "this environment no longer makes the drivers print while probing: {loud}");
    let loud = run(&["run", "--model", TRAINED, "--prompt", "ROMEO:", "--max-tokens", "2", "--backend", "gpu", "--json", "--verbose"]);
    assert!(loud.contains(NOISE), "{loud}");
    let config = Path::new(TRAINED).join("config.json");
    let text_file = Path::new(TRAINED).parent().unwrap().join("shakespeare-dev.txt");
    let quiet_runs: [&[&str]; 5] = [
        &["adapters"],
        &["run", "--model", TRAINED, "--prompt", "ROMEO:", "--max-tokens", "2", "--backend", "gpu", "--json"],
        &["run", "--model", TRAINED, "--prompt", "ROMEO:", "--max-tokens", "2", "--backend", "auto", "--json", "--quiet"],
        &["run", "--synthetic-config", config.to_str().unwrap(), "--recipe", "mixed_3_6", "--prompt-tokens", "4", "--max-tokens", "2", "--backend", "gpu", "--json"],
        &["validate", "--model", TRAINED, "--text", text_file.to_str().unwrap(), "--max-tokens", "64", "--ctx", "32", "--backend", "gpu", "--quiet"],
    ];
    for args in quiet_runs {
        let err = run(args);
        assert!(!err.contains(NOISE), "{args:?}: {err}");
    }
}

/// `validate` and `logits` give the same figures on both backends.
#[test]
fn cli_validate_and_logits_agree_across_backends() {
    if gpu(None).is_none() {
        return;
    }
    let text_file = Path::new(TRAINED).join("../shakespeare-dev.txt");
    let validate = |backend: &str| {
        let o = mixq(
            &[
                "validate",
                "--model",
                TRAINED,
                "--text",
                text_file.to_str().unwrap(),
                "--ctx",
                "64",
                "--max-tokens",
                "129",
                "--backend",
                backend,
                "--json",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o).1);
        serde_json::from_str::<serde_json::Value>(&text(&o).0).unwrap()
    };
    let (c, g) = (validate("cpu"), validate("gpu"));
    let ppl = |v: &serde_json::Value| v["ppl"].as_f64().unwrap();
    assert!((ppl(&c) / ppl(&g) - 1.0).abs() < 1e-5, "{c} vs {g}");
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, "[5, 17, 99, 3, 250, 41]").unwrap();
    let vocab = Checkpoint::open(Path::new(TRAINED)).unwrap().config().vocab_size;
    let logits = |backend: &str| {
        let out = tmp.path().join(format!("{backend}.npy"));
        let o = mixq(
            &["logits", "--model", TRAINED, "--tokens", ids.to_str().unwrap(), "--out", out.to_str().unwrap(), "--backend", backend],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o).1);
        let raw = std::fs::read(out).unwrap();
        raw[raw.len() - 6 * vocab * 4..].to_vec()
    };
    let (lc, lg) = (logits("cpu"), logits("gpu"));
    assert_eq!(lc.len(), lg.len());
    let f = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
    assert_agree("cli logits", &f(&lc), &f(&lg), vocab);
}

/// A model of a config's shape with synthetic weights made in GPU memory runs and reports its
/// weight bandwidth (the speed script times the 120b shape this way).
#[test]
fn synthetic_models_run_on_the_gpu() {
    if gpu(None).is_none() {
        return;
    }
    let config = Path::new(TRAINED).join("config.json");
    let synthetic = |extra: &[&str]| {
        let mut args = vec!["run", "--synthetic-config", config.to_str().unwrap(), "--recipe", "gpt-oss-120b-3.6bit"];
        args.extend_from_slice(extra);
        mixq(&args, &[])
    };
    let o = synthetic(&["--prompt-tokens", "70", "--max-tokens", "5", "--ignore-eos", "--backend", "gpu", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["generated_tokens"], 5);
    assert!(v["weight_bytes_per_token"].as_u64().unwrap() > 0 && v["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    let o = synthetic(&["--prompt-tokens", "4", "--backend", "cpu"]);
    assert!(text(&o).1.contains("needs --backend gpu"), "{}", text(&o).1);
}

/// `mixq adapters` lists what the GPU backend can pick from.
#[test]
fn adapters_are_listed() {
    if gpu(None).is_none() {
        return;
    }
    let o = mixq(&["adapters", "--json"], &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
    let list = v.as_array().unwrap();
    assert!(!list.is_empty() && list.iter().all(|a| a["name"].is_string() && a["software"].is_boolean()), "{v}");
}
