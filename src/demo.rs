//! `mixq demo`: the whole pipeline on the bundled model.

use std::path::Path;

use anyhow::{bail, Context, Result};
use mixq_loader::Checkpoint;
use mixq_quantizer::recipe::plan::source_size;
use mixq_quantizer::{Allocation, ConvertOptions, Recipe};

use crate::backend::BackendArgs;
use crate::generate::{generate_text, RunArgs, Source};
use crate::validate::{validate, ValidateArgs};
use crate::{print_json, progress, report};

/// Runs plan, calibrate, convert, inspect, verify, generate and validate on `model`, writing to `out`.
pub fn demo(model: &Path, recipe_name: &str, out: &Path, json: bool) -> Result<()> {
    let recipe = Recipe::load(recipe_name)?;
    let source = model.display().to_string();
    let say = |text: &str| {
        if !json {
            print!("{text}");
        }
    };
    let ckpt = Checkpoint::open(model).with_context(|| format!("opening the bundled model {source}"))?;
    let summary = Allocation::resolve(ckpt.config(), &recipe)?.summary();
    let src_size = source_size(ckpt.config());
    say(&format!("== 1. plan ==\n{}", report::plan_text(&source, &recipe, &summary, src_size)));
    drop(ckpt);

    // Calibration reads the second half of the held-out text; validation scores the first half.
    let text = model.parent().map(|p| p.join("shakespeare-dev.txt")).filter(|p| p.is_file());
    let calibration = match &text {
        Some(text) => {
            say("\n== 2. calibrate on the second half of the held-out text ==\n");
            let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
            let mut cut = body.len() / 2;
            while !body.is_char_boundary(cut) {
                cut += 1;
            }
            let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            let calib_text = parent.join("calibration.txt");
            std::fs::write(&calib_text, &body[cut..]).with_context(|| format!("writing {}", calib_text.display()))?;
            let progress = progress::CountProgress::new("calibrate", "tokens", json);
            let opts = mixq_validate::CalibrateOptions { ctx: 512, max_tokens: Some(8192) };
            let run = mixq_validate::calibrate(model, &source, &calib_text, opts, &|d, t| progress.update(d, t));
            progress.finish();
            let run = run?;
            let stats = parent.join("calibration.safetensors");
            run.stats.write(&stats)?;
            say(&format!(
                "wrote {} from {} tokens in {:.2}s ({:.0} tokens/s)\n",
                stats.display(),
                run.stats.tokens,
                run.seconds,
                run.stats.tokens as f64 / run.seconds.max(1e-9)
            ));
            Some(stats)
        }
        None => None,
    };

    say("\n== 3. convert (quantizer mse, calibrated) ==\n");
    let progress = progress::StderrProgress::new(json);
    let opts = ConvertOptions {
        force: true,
        source_label: "tiny-gpt-oss-shakespeare".into(),
        calibration: calibration.clone(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let rep = mixq_quantizer::convert(model, &recipe, out, &opts, &progress);
    progress.finish();
    let rep = rep?;
    let secs = start.elapsed().as_secs_f64();
    say(&format!("wrote {} in {secs:.2}s\n", rep.out.display()));

    let name = out.display().to_string();
    let inspection = mixq_quantizer::writer::inspect::inspect(&Checkpoint::open(out)?)?;
    say(&format!("\n== 4. inspect ==\n{}", report::inspect_text(&name, &inspection)));
    let verified = mixq_quantizer::writer::verify::verify(out);
    say(&format!("\n== 5. verify ==\n{}", report::verify_text(&name, &verified)));
    if !verified.ok() {
        bail!("the converted model failed verification");
    }
    say("\n== 6. generate with the converted model ==\n");
    let sampler = mixq_runtime::SamplerConfig::default();
    let backend = BackendArgs { backend: mixq_runtime::Backend::Auto, max_context: None };
    let run = RunArgs {
        source: Source::Checkpoint(out),
        prompt: Some("ROMEO:"),
        prompt_tokens: None,
        chat: false,
        max_tokens: 48,
        sampler,
        ignore_eos: false,
        backend: backend.clone(),
        stream: false,
    };
    let generated = generate_text(&run).map(|g| {
        say(&format!(
            "{}{}\n==========\nBackend: {}\nPrompt: {} tokens, {:.1} tokens/s\nGeneration: {} tokens, {:.1} tokens/s\n",
            g["prompt"].as_str().unwrap_or_default(),
            g["text"].as_str().unwrap_or_default(),
            g["device"].as_str().unwrap_or_default(),
            g["prompt_tokens"],
            g["prefill_tokens_per_second"].as_f64().unwrap_or(0.0),
            g["generated_tokens"],
            g["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
        ));
        g
    })?;
    say("\n== 7. validate against the source (first half of the held-out text) ==\n");
    let validation = match text {
        Some(text) => {
            let args = ValidateArgs {
                model: out,
                text: &text,
                reference: Some(model),
                reference_logits: None,
                save_reference: None,
                ctx: 256,
                stride: 256,
                max_tokens: Some(4096),
                top_k: 32,
                gates: mixq_validate::Gates::default(),
                card: Some(&out.join("README.md")),
                backend: backend.clone(),
                quiet: json,
            };
            let (v, _) = validate(&args)?;
            say(&format!("{}(first 4096 tokens of {}, windows of 256; added to the model card)\n", v.to_text(), text.display()));
            v.to_json()
        }
        None => {
            say("(no held-out text beside the model; skipped)\n");
            serde_json::Value::Null
        }
    };
    if json {
        print_json(&serde_json::json!({
            "validate": validation,
            "plan": report::plan_json(&source, &recipe, &summary, src_size),
            "calibration": calibration,
            "convert": {"out": rep.out, "seconds": secs, "shards": rep.shards, "quantizer": opts.quantizer.as_str()},
            "inspect": report::inspect_json(&name, &inspection),
            "verify": report::verify_json(&name, &verified),
            "generate": generated,
        }));
    }
    Ok(())
}
