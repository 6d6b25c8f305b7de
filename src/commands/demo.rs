//! `mixq demo`: the whole pipeline on the bundled model.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use mixq_loader::Checkpoint;
use mixq_quantizer::writer::jobs::plan_source;
use mixq_quantizer::{ConvertOptions, Recipe};
use mixq_validate::validate_job::ValidateRequest;
use serde_json::Value;

use super::run::{generate_text, RunArgs, Source};
use crate::backend::BackendArgs;
use crate::progress;
use crate::report::{self, print_json};

/// Arguments of `mixq demo`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq demo --out /tmp/demo\n\nA flag's default is shown as [default: ...] or in its help.")]
#[command(mut_arg("json", |a| a.help("Print one JSON object with every step's result instead of the narration")))]
pub struct DemoArgs {
    /// Where to write the converted model.
    #[arg(long, default_value = "target/demo/tiny-gpt-oss-shakespeare-3.6bit")]
    out: PathBuf,
    /// Recipe to use.
    #[arg(long, default_value = "gpt-oss-120b-3.6bit")]
    recipe: String,
    /// The model to convert (default: the bundled one).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    json: crate::args::Json,
}

/// Runs `mixq demo`.
pub fn run(a: DemoArgs) -> Result<ExitCode> {
    let model = a.model.unwrap_or_else(bundled_model);
    Demo { model: &model, out: &a.out, json: a.json.json }.run(&a.recipe)?;
    Ok(ExitCode::SUCCESS)
}

/// The bundled tiny model.
fn bundled_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join("tiny-gpt-oss-shakespeare")
}

/// One demo run: the model, where it goes, and whether to narrate.
struct Demo<'a> {
    model: &'a Path,
    out: &'a Path,
    json: bool,
}

impl Demo<'_> {
    /// Prints narration unless the result is JSON.
    fn say(&self, text: &str) {
        if !self.json {
            print!("{text}");
        }
    }

    /// Runs plan, calibrate, convert, inspect, verify, generate and validate.
    fn run(&self, recipe_name: &str) -> Result<()> {
        let source = self.model.display().to_string();
        let plan = plan_source(&source, recipe_name, false).with_context(|| format!("planning the bundled model {source}"))?;
        let recipe = &plan.recipe;
        self.say(&format!("== 1. plan ==\n{}", report::plan_text(&source, &plan)));
        // Calibration reads the second half of the held-out text; validation scores the first half.
        let text = self.model.parent().map(|p| p.join("shakespeare-dev.txt")).filter(|p| p.is_file());
        let calibration = match &text {
            Some(text) => Some(self.calibrate(text, &source)?),
            None => None,
        };
        let (convert, quantizer) = self.convert(recipe, calibration.clone())?;
        let name = self.out.display().to_string();
        let inspection = mixq_quantizer::writer::inspect::inspect(&Checkpoint::open(self.out)?)?;
        self.say(&format!("\n== 4. inspect ==\n{}", report::inspect_text(&name, &inspection)));
        let verified = mixq_quantizer::writer::verify::verify(self.out);
        self.say(&format!("\n== 5. verify ==\n{}", report::verify_text(&name, &verified)));
        if !verified.ok() {
            bail!("the converted model failed verification");
        }
        let generated = self.generate()?;
        let validation = self.validate(text.as_deref())?;
        if self.json {
            print_json(&serde_json::json!({
                "validate": validation,
                "plan": report::plan_json(&source, &plan),
                "calibration": calibration,
                "convert": {"out": convert.out, "seconds": convert.seconds, "shards": convert.shards, "quantizer": quantizer},
                "inspect": report::inspect_json(&name, &inspection),
                "verify": report::verify_json(&name, &verified),
                "generate": generated,
            }));
        }
        Ok(())
    }

    /// Step 2: calibrates on the second half of `text`; returns the statistics file.
    fn calibrate(&self, text: &Path, source: &str) -> Result<PathBuf> {
        self.say("\n== 2. calibrate on the second half of the held-out text ==\n");
        let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
        let mut cut = body.len() / 2;
        while !body.is_char_boundary(cut) {
            cut += 1;
        }
        let parent = mixq_loader::file_name::folder_of(self.out);
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let calib_text = parent.join("calibration.txt");
        std::fs::write(&calib_text, &body[cut..]).with_context(|| format!("writing {}", calib_text.display()))?;
        let progress = progress::CountProgress::new("calibrate", "tokens", self.json);
        let opts = mixq_validate::CalibrateOptions { ctx: 512, max_tokens: Some(8192), hessians: mixq_validate::calibrate::HessianScope::PerExpert, show_downloads: false };
        let run = mixq_validate::calibrate(self.model, &mixq_validate::validate_job::load_on_cpu, source, &calib_text, opts, &|d, t| progress.update(d, t));
        progress.finish();
        let run = run?;
        let stats = parent.join("calibration.safetensors");
        run.stats.write(&stats)?;
        self.say(&format!(
            "wrote {} from {} tokens in {:.2}s ({:.0} tokens/s)\n",
            stats.display(),
            run.stats.tokens,
            run.seconds,
            run.tokens_per_second()
        ));
        Ok(stats)
    }

    /// Step 3: converts with the default quantizer: gptq with the statistics' Hessians when there
    /// are statistics, else mse.
    fn convert(&self, recipe: &Recipe, calibration: Option<PathBuf>) -> Result<(Converted, &'static str)> {
        self.say(if calibration.is_some() { "\n== 3. convert (quantizer gptq, calibrated with Hessians) ==\n" } else { "\n== 3. convert (quantizer mse) ==\n" });
        let progress = progress::StderrProgress::new(self.json, false);
        let opts = ConvertOptions { force: true, source_label: "tiny-gpt-oss-shakespeare".into(), calibration, ..Default::default() };
        let start = std::time::Instant::now();
        let rep = mixq_quantizer::convert(self.model, recipe, self.out, &opts, &progress);
        progress.finish();
        let rep = rep?;
        let seconds = start.elapsed().as_secs_f64();
        self.say(&format!("wrote {} in {seconds:.2}s\n", rep.out.display()));
        Ok((Converted { out: rep.out, shards: rep.shards, seconds }, rep.quantizer.as_str()))
    }

    /// Step 6: generates from "ROMEO:" with the converted model.
    fn generate(&self) -> Result<Value> {
        self.say("\n== 6. generate with the converted model ==\n");
        let run = RunArgs {
            source: Source::Checkpoint(self.out),
            prompt: Some("ROMEO:"),
            prompt_tokens: None,
            chat: false,
            max_tokens: 48,
            sampler: mixq_runtime::SamplerConfig::default(),
            ignore_eos: false,
            backend: auto_backend(),
            stream: false,
            quiet: false,
        };
        let g = crate::args::Threads { threads: None }.pool()?.install(|| generate_text(&run))?;
        self.say(&format!(
            "{}{}\n==========\nBackend: {}\nPrompt: {} tokens, {:.1} tokens/s\nGeneration: {} tokens, {:.1} tokens/s\n",
            g["prompt"].as_str().unwrap_or_default(),
            g["text"].as_str().unwrap_or_default(),
            g["device"].as_str().unwrap_or_default(),
            g["prompt_tokens"],
            g["prefill_tokens_per_second"].as_f64().unwrap_or(0.0),
            g["generated_tokens"],
            g["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
        ));
        Ok(g)
    }

    /// Step 7: validates against the source on the first half of `text`, adding to the card.
    fn validate(&self, text: Option<&Path>) -> Result<Value> {
        self.say("\n== 7. validate against the source (first half of the held-out text) ==\n");
        let Some(text) = text else {
            self.say("(no held-out text beside the model; skipped)\n");
            return Ok(Value::Null);
        };
        let card = self.out.join("README.md");
        let request = ValidateRequest {
            model: self.out,
            text,
            reference: Some(self.model),
            reference_logits: None,
            save_reference: None,
            ctx: 256,
            stride: 256,
            max_tokens: Some(4096),
            top_k: 32,
            gates: mixq_validate::Gates::default(),
            card: Some(&card),
            bench: false,
        };
        let validation = super::validate::measure(&request, &auto_backend(), self.json, false)?;
        validation.save(&request)?;
        let v = validation.summary;
        self.say(&format!("{}(first 4096 tokens of {}, windows of 256; added to the model card)\n", v.to_text(), text.display()));
        Ok(v.to_json())
    }
}

/// What step 3 wrote.
struct Converted {
    out: PathBuf,
    shards: Vec<String>,
    seconds: f64,
}

/// The backend the demo runs on: auto, default context.
fn auto_backend() -> BackendArgs {
    BackendArgs { backend: mixq_runtime::Backend::Auto, max_context: None, verbose: false }
}
