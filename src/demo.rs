//! `mixq demo`: the whole pipeline on the bundled model.

use std::path::Path;

use anyhow::{bail, Context, Result};
use mixq_loader::Checkpoint;
use mixq_quantizer::plan::source_size;
use mixq_quantizer::{Allocation, ConvertOptions, Recipe};

use crate::backend::BackendArgs;
use crate::generate::{generate_text, RunArgs, Source};
use crate::validate::{validate, ValidateArgs};
use crate::{print_json, progress, report};

/// Runs plan, convert, inspect, verify, generate and validate on `model`, writing to `out`.
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

    say("\n== 2. convert ==\n");
    let progress = progress::StderrProgress::new(json);
    let opts = ConvertOptions { force: true, source_label: "tiny-gpt-oss-shakespeare".into(), ..Default::default() };
    let start = std::time::Instant::now();
    let rep = mixq_quantizer::convert(model, &recipe, out, &opts, &progress);
    progress.finish();
    let rep = rep?;
    let secs = start.elapsed().as_secs_f64();
    say(&format!("wrote {} in {secs:.2}s\n", rep.out.display()));

    let name = out.display().to_string();
    let inspection = mixq_quantizer::inspect::inspect(&Checkpoint::open(out)?);
    say(&format!("\n== 3. inspect ==\n{}", report::inspect_text(&name, &inspection)));
    let verified = mixq_quantizer::verify::verify(out);
    say(&format!("\n== 4. verify ==\n{}", report::verify_text(&name, &verified)));
    if !verified.ok() {
        bail!("the converted model failed verification");
    }
    say("\n== 5. generate with the converted model ==\n");
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
    say("\n== 6. validate against the source ==\n");
    let text = model.parent().map(|p| p.join("shakespeare-dev.txt")).filter(|p| p.is_file());
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
            "convert": {"out": rep.out, "seconds": secs, "shards": rep.shards},
            "inspect": report::inspect_json(&name, &inspection),
            "verify": report::verify_json(&name, &verified),
            "generate": generated,
        }));
    }
    Ok(())
}
