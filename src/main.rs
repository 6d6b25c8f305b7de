//! mixq: turn gpt-oss checkpoints into mixed-precision MLX models and prove they are still good.

mod authoring;
mod backend;
mod demo;
mod generate;
mod progress;
mod report;
mod signals;
mod validate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mixq_loader::source::{resolve_source, Need, ResolvedSource};
use mixq_loader::{Checkpoint, GptOssConfig};
use mixq_quantizer::recipe::plan::source_size;
use mixq_quantizer::{Allocation, ConvertOptions, QuantMethod, Recipe};

#[derive(Parser)]
#[command(name = "mixq", version, about = "Mixed-precision MLX conversion of gpt-oss checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Size and bits per weight of a recipe applied to a model, from config.json alone.
    Plan {
        /// Checkpoint folder, hub repo id (owner/name) or a bare config.json.
        #[arg(long)]
        source: String,
        /// Recipe name (see `mixq recipes`) or path to a YAML file.
        #[arg(long)]
        recipe: String,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Convert an upstream gpt-oss checkpoint to an MLX checkpoint following a recipe.
    Convert {
        /// Checkpoint folder or hub repo id (owner/name).
        #[arg(long)]
        source: String,
        /// Recipe name or path to a YAML file.
        #[arg(long)]
        recipe: String,
        /// Output folder (must be absent or empty unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Replace a non-empty output folder.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Largest shard in bytes (default 5 GiB, as mlx-lm).
        #[arg(long, default_value_t = mixq_quantizer::writer::convert::MAX_SHARD_BYTES)]
        max_shard_bytes: u64,
        /// How affine groups get their scale and bias where the recipe does not say: `mse`
        /// searches for the least (calibration-weighted) error; `minmax` is byte-identical to
        /// `mx.quantize`.
        #[arg(long, default_value = "mse", value_parser = parse_quantizer)]
        quantizer: QuantMethod,
        /// Calibration statistics from `mixq calibrate` on this source, weighting the `mse` search.
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Continue an interrupted conversion to this --out: shards it finished are re-hashed
        /// against its journal and kept, only the rest are written.
        #[arg(long)]
        resume: bool,
        /// Skip the free-space check (for filesystems that misreport it, e.g. with compression).
        #[arg(long)]
        no_space_check: bool,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
        /// Print one JSON object when done.
        #[arg(long)]
        json: bool,
    },
    /// Run a model over calibration text and record the mean x² of every quantizable linear
    /// layer's input channels (per expert for experts), for `convert --calibration`.
    Calibrate {
        /// The source checkpoint (folder or hub repo id, as given to convert) or a conversion of it.
        #[arg(long)]
        model: String,
        /// A UTF-8 text file, tokenized with the model's tokenizer.
        #[arg(long)]
        text: PathBuf,
        /// Use at most this many tokens of the text.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// The statistics file to write (safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing statistics file.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
        /// Print one JSON object when done.
        #[arg(long)]
        json: bool,
    },
    /// For every unit a recipe can address (class x layer), the cost of quantizing it alone at
    /// each bits x group size, and its size: the input of `mixq recipe search`.
    Sensitivity {
        /// The upstream source checkpoint.
        #[arg(long, required_unless_present = "synthetic_config", conflicts_with = "synthetic_config")]
        model: Option<PathBuf>,
        /// A config.json alone: deterministic synthetic rows stand in for the weights (proxy costs).
        #[arg(long)]
        synthetic_config: Option<PathBuf>,
        /// Text to measure KL on (without it the costs are the weight-error proxy).
        #[arg(long, requires = "model")]
        text: Option<PathBuf>,
        /// Calibration statistics (`mixq calibrate`) weighting the proxy and the mse quantizer.
        #[arg(long, requires = "model")]
        calibration: Option<PathBuf>,
        /// Bit widths to measure.
        #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,8")]
        bits: Vec<u32>,
        /// Group sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
        group_sizes: Vec<u32>,
        /// Tokens of the text the KL is measured on.
        #[arg(long, default_value_t = 2048)]
        tokens: usize,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// The quantizer the settings are made with.
        #[arg(long, default_value = "mse", value_parser = parse_quantizer)]
        quantizer: QuantMethod,
        /// The settings (BITS,GROUP_SIZE[,BITS,GROUP_SIZE]) whose KL is measured for every unit:
        /// the first ranks the units, the second fixes how KL scales with the weight error.
        #[arg(long, value_delimiter = ',', default_value = "3,64,5,64")]
        measure: Vec<u32>,
        /// The sensitivity file to write (JSON).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Recipe authoring.
    Recipe {
        #[command(subcommand)]
        command: RecipeCommand,
    },
    /// What a checkpoint (upstream or MLX) holds: format, tensors by class, quantization, size, BPW.
    Inspect {
        /// Checkpoint folder.
        dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Check a converted checkpoint against its manifest, index and config; exit 1 on any mismatch.
    Verify {
        /// Converted checkpoint folder.
        dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Generate text with a model, streaming it; ends with prefill/decode tokens/s and peak memory.
    Run {
        /// Checkpoint folder (upstream or converted).
        #[arg(long, required_unless_present = "synthetic_config", conflicts_with = "synthetic_config")]
        model: Option<PathBuf>,
        /// The prompt.
        #[arg(long, required_unless_present = "prompt_tokens")]
        prompt: Option<String>,
        /// Use N deterministic pseudo-random token ids as the prompt (for timing).
        #[arg(long, conflicts_with = "prompt")]
        prompt_tokens: Option<usize>,
        /// Time a model of this config.json's shape with random weights made in GPU memory
        /// (no checkpoint file); needs --recipe.
        #[arg(long, requires = "recipe")]
        synthetic_config: Option<PathBuf>,
        /// Recipe that quantizes the synthetic model.
        #[arg(long, requires = "synthetic_config")]
        recipe: Option<String>,
        /// Keep generating past end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// Wrap the prompt in the model's chat template (harmony format for gpt-oss).
        #[arg(long)]
        chat: bool,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 100)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temp: f32,
        /// Nucleus sampling mass (1 keeps every token).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Keep only the k most likely tokens (0 keeps all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// RNG seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        backend: backend::BackendArgs,
        /// Print one JSON object (text, tokens, figures) instead of streaming.
        #[arg(long)]
        json: bool,
    },
    /// Float32 logits `[n_tokens, vocab]` of a JSON list of token ids, written as .npy.
    Logits {
        /// Checkpoint folder (upstream or converted).
        #[arg(long)]
        model: PathBuf,
        /// JSON file holding a list of token ids.
        #[arg(long)]
        tokens: PathBuf,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        backend: backend::BackendArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a model on a text; with a reference also KL, top-1 agreement and PPL ratio.
    /// Exits 1 when a gate fails.
    Validate {
        /// The model to measure (converted or upstream).
        #[arg(long)]
        model: PathBuf,
        /// A UTF-8 text file, tokenized with the model's tokenizer.
        #[arg(long)]
        text: PathBuf,
        /// Reference checkpoint (the source, or another conversion).
        #[arg(long, conflicts_with = "reference_logits")]
        reference: Option<PathBuf>,
        /// Saved reference logits (from --save-reference) instead of a reference model.
        #[arg(long)]
        reference_logits: Option<PathBuf>,
        /// Save the reference's top-k logits (the model's own without --reference) for reuse.
        #[arg(long)]
        save_reference: Option<PathBuf>,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Advance between windows (default: --ctx, non-overlapping).
        #[arg(long)]
        stride: Option<usize>,
        /// Evaluate only the first N tokens of the text.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Logits kept per token in a saved reference.
        #[arg(long, default_value_t = 32)]
        top_k: usize,
        /// Gate: largest acceptable mean KL.
        #[arg(long)]
        max_kl: Option<f64>,
        /// Gate: largest acceptable PPL(model)/PPL(reference).
        #[arg(long)]
        max_ppl_ratio: Option<f64>,
        /// Gate: smallest acceptable top-1 agreement, as a fraction (0.9 = 90%).
        #[arg(long)]
        min_top1: Option<f64>,
        /// Add (or replace) a "Validation" section in this model card.
        #[arg(long)]
        card: Option<PathBuf>,
        #[command(flatten)]
        backend: backend::BackendArgs,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the GPU adapters the GPU backend can use, best first (what `--backend auto` picks from).
    Adapters {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the built-in recipes.
    Recipes {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The pipeline on the bundled tiny model: plan, calibrate, convert, inspect, verify, generate, validate.
    Demo {
        /// Where to write the converted model.
        #[arg(long, default_value = "target/demo/tiny-gpt-oss-shakespeare-3.6bit")]
        out: PathBuf,
        /// Recipe to use.
        #[arg(long, default_value = "gpt-oss-120b-3.6bit")]
        recipe: String,
        /// The model to convert (default: the bundled one).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print one JSON object with every step's result instead of the narration.
        #[arg(long)]
        json: bool,
    },
    /// Write a deterministic synthetic upstream-layout checkpoint (for tests and benches).
    Synth {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Shape preset: tiny, small, wide, medium.
        #[arg(long, default_value = "tiny", conflicts_with = "config")]
        preset: String,
        /// Take the shape from a real model's config.json instead (full size: gpt-oss-20b's is
        /// about 13 GB).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the layer count.
        #[arg(long)]
        layers: Option<usize>,
        /// Override the model width.
        #[arg(long)]
        hidden: Option<usize>,
        /// Override the expert width.
        #[arg(long)]
        intermediate: Option<usize>,
        /// Override the expert count.
        #[arg(long)]
        experts: Option<usize>,
        /// Override the RNG seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Write `rope_scaling.truncate: false` in the config.
        #[arg(long)]
        no_truncate: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// The recipe with the least predicted KL under a size budget, from a sensitivity file.
    Search {
        /// The sensitivity file (`mixq sensitivity`).
        #[arg(long)]
        sensitivity: PathBuf,
        /// The model (folder, repo id or config.json) the recipe is for.
        #[arg(long)]
        source: String,
        /// Size budget in bits per weight.
        #[arg(long, conflicts_with = "target_size", required_unless_present = "target_size")]
        target_bpw: Option<f64>,
        /// Size budget: 48GiB, 51.9GB or a byte count.
        #[arg(long)]
        target_size: Option<String>,
        /// The recipe to write (YAML).
        #[arg(long)]
        out: PathBuf,
        /// Smallest affine bit width allowed.
        #[arg(long, default_value_t = 3)]
        min_bits: u32,
        /// Classes kept in bf16.
        #[arg(long, value_delimiter = ',', default_value = "norm,router,bias,sinks")]
        keep_bf16: Vec<String>,
        /// The recipe's name (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Also print the predicted size/KL frontier from 3 to 5 bits per weight and plot it as
        /// SVG next to the recipe.
        #[arg(long)]
        frontier: bool,
        /// Replace an existing recipe file.
        #[arg(long)]
        force: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    signals::install();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A pool of `threads` workers (default: one per core) for a job's rayon work.
fn worker_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(threads.unwrap_or(0)).build().context("starting worker threads")
}

/// Refuses to replace an existing output file without `--force`.
pub(crate) fn refuse_existing(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!("{}: exists; pass --force to replace it", out.display());
    }
    Ok(())
}

fn parse_quantizer(s: &str) -> Result<QuantMethod, String> {
    QuantMethod::parse(s).ok_or_else(|| format!("expected minmax or mse, not {s:?}"))
}

fn bundled_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join("tiny-gpt-oss-shakespeare")
}

pub(crate) fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON values always serialize"));
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plan { source, recipe, json } => {
            let recipe = Recipe::load(&recipe)?;
            let resolved = resolve_source(&source, Need::Config)?;
            let config = GptOssConfig::from_file(&resolved.config_path())?;
            let summary = Allocation::resolve(&config, &recipe)?.summary();
            let src = source_size(&config);
            if json {
                print_json(&report::plan_json(&source, &recipe, &summary, src));
            } else {
                print!("{}", report::plan_text(&source, &recipe, &summary, src));
            }
        }
        Command::Convert {
            source,
            recipe,
            out,
            force,
            threads,
            max_shard_bytes,
            quantizer,
            calibration,
            resume,
            no_space_check,
            quiet,
            json,
        } => {
            let recipe = Recipe::load(&recipe)?;
            let ResolvedSource::Folder(dir) = resolve_source(&source, Need::Everything)? else {
                bail!("{source}: converting needs a checkpoint folder, not a bare config file");
            };
            let opts = ConvertOptions {
                force,
                max_shard_bytes,
                source_label: source.clone(),
                quantizer,
                calibration,
                resume,
                check_space: !no_space_check,
            };
            let pool = worker_pool(threads)?;
            let progress = progress::StderrProgress::new(quiet || json);
            let start = std::time::Instant::now();
            let result = pool.install(|| mixq_quantizer::convert(&dir, &recipe, &out, &opts, &progress));
            progress.finish();
            let rep = result?;
            let secs = start.elapsed().as_secs_f64();
            let s = &rep.summary;
            if json {
                print_json(&serde_json::json!({
                    "out": rep.out, "recipe": recipe.name, "quantizer": quantizer.as_str(), "shards": rep.shards, "seconds": secs,
                    "kept_shards": rep.kept_shards,
                    "source_bytes": rep.source_bytes, "bytes": s.bytes, "parameters": s.params,
                    "bits_per_weight": s.bits_per_weight(),
                }));
            } else {
                println!(
                    "wrote {} ({} shard(s), {} bytes, {:.3} bits per weight) in {:.2}s ({:.1} MiB/s of source)",
                    rep.out.display(),
                    rep.shards.len(),
                    report::thousands(s.bytes),
                    s.bits_per_weight(),
                    secs,
                    rep.source_bytes as f64 / 1048576.0 / secs.max(1e-9)
                );
            }
        }
        Command::Calibrate { model, text, max_tokens, ctx, out, force, threads, quiet, json } => {
            refuse_existing(&out, force)?;
            let pool = worker_pool(threads)?;
            let progress = progress::CountProgress::new("calibrate", "tokens", quiet || json);
            let ResolvedSource::Folder(dir) = resolve_source(&model, Need::Everything)? else {
                bail!("{model}: calibrating needs a checkpoint folder, not a bare config file");
            };
            let opts = mixq_validate::CalibrateOptions { ctx, max_tokens };
            let label = model.clone();
            let run = pool.install(|| mixq_validate::calibrate(&dir, &label, &text, opts, &|d, t| progress.update(d, t)));
            progress.finish();
            let run = run?;
            run.stats.write(&out)?;
            let s = &run.stats;
            let reached: Vec<(usize, usize)> = (0..)
                .map_while(|l| s.expert_tokens(l))
                .map(|c| (c.iter().filter(|&&n| n > 0.0).count(), c.len()))
                .collect();
            let (hit, all) = reached.iter().fold((0, 0), |(a, b), (h, n)| (a + h, b + n));
            let rate = s.tokens as f64 / run.seconds.max(1e-9);
            if json {
                print_json(&serde_json::json!({
                    "out": out, "model": label, "text_sha256": s.text_sha256, "tokens": s.tokens, "ctx": s.ctx,
                    "windows": run.windows, "seconds": run.seconds, "tokens_per_second": rate,
                    "tensors": s.tensors.len(), "experts_reached": hit, "experts": all,
                    "config_sha256": s.model.config_sha256, "weights_sha256": s.model.weights_sha256,
                }));
            } else {
                println!(
                    "wrote {} ({} tensors) from {} tokens in {} windows of {} in {:.2}s ({rate:.0} tokens/s); {hit} of {all} experts reached",
                    out.display(),
                    s.tensors.len(),
                    s.tokens,
                    run.windows,
                    s.ctx,
                    run.seconds
                );
            }
        }
        Command::Sensitivity {
            model,
            synthetic_config,
            text,
            calibration,
            bits,
            group_sizes,
            tokens,
            ctx,
            quantizer,
            measure,
            out,
            force,
            threads,
            quiet,
            json,
        } => {
            let args = authoring::SensitivityArgs {
                model,
                synthetic_config,
                text,
                calibration,
                bits,
                group_sizes,
                tokens,
                ctx,
                quantizer,
                measure,
                out,
                force,
                quiet,
                json,
            };
            let pool = worker_pool(threads)?;
            pool.install(|| authoring::run_sensitivity(&args))?;
        }
        Command::Recipe {
            command:
                RecipeCommand::Search {
                    sensitivity,
                    source,
                    target_bpw,
                    target_size,
                    out,
                    min_bits,
                    keep_bf16,
                    name,
                    frontier,
                    force,
                    json,
                },
        } => authoring::run_search(&authoring::SearchArgs {
            sensitivity,
            source,
            target_bpw,
            target_size,
            out,
            min_bits,
            keep_bf16,
            name,
            frontier,
            force,
            json,
        })?,
        Command::Inspect { dir, json } => {
            let ckpt = Checkpoint::open(&dir)?;
            let i = mixq_quantizer::writer::inspect::inspect(&ckpt)?;
            let name = dir.display().to_string();
            if json {
                print_json(&report::inspect_json(&name, &i));
            } else {
                print!("{}", report::inspect_text(&name, &i));
            }
        }
        Command::Verify { dir, json } => {
            let r = mixq_quantizer::writer::verify::verify(&dir);
            let name = dir.display().to_string();
            if json {
                print_json(&report::verify_json(&name, &r));
            } else {
                print!("{}", report::verify_text(&name, &r));
            }
            if !r.ok() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Run {
            model,
            prompt,
            prompt_tokens,
            synthetic_config,
            recipe,
            ignore_eos,
            chat,
            max_tokens,
            temp,
            top_p,
            top_k,
            seed,
            backend,
            json,
        } => {
            let sampler = mixq_runtime::SamplerConfig { temperature: temp, top_p, top_k, seed };
            let source = match (&model, &synthetic_config, &recipe) {
                (Some(m), _, _) => generate::Source::Checkpoint(m),
                (None, Some(config), Some(recipe)) => generate::Source::Synthetic { config, recipe },
                _ => bail!("give --model DIR, or --synthetic-config CONFIG with --recipe R"),
            };
            let args = generate::RunArgs {
                source,
                prompt: prompt.as_deref(),
                prompt_tokens,
                chat,
                max_tokens,
                sampler,
                ignore_eos,
                backend,
                stream: !json,
            };
            let figures = generate::generate_text(&args)?;
            if json {
                print_json(&figures);
            }
        }
        Command::Logits { model, tokens, out, backend, json } => {
            let text = std::fs::read_to_string(&tokens).with_context(|| format!("reading {}", tokens.display()))?;
            let ids: Vec<u32> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON list of non-negative token ids", tokens.display()))?;
            let ckpt = Checkpoint::open(&model)?;
            let m = backend::load(&ckpt, &backend, json)?;
            let start = std::time::Instant::now();
            let logits = m.logits(&ids)?;
            let secs = start.elapsed().as_secs_f64();
            let vocab = m.config().vocab_size;
            std::fs::write(&out, mixq_runtime::npy::npy_f32(&[ids.len(), vocab], &logits))
                .with_context(|| format!("writing {}", out.display()))?;
            if json {
                print_json(&serde_json::json!({"out": out, "tokens": ids.len(), "vocab": vocab, "seconds": secs, "backend": m.backend()}));
            } else {
                println!("wrote {} ([{}, {vocab}] float32) in {secs:.2}s", out.display(), ids.len());
            }
        }
        Command::Validate {
            model,
            text,
            reference,
            reference_logits,
            save_reference,
            ctx,
            stride,
            max_tokens,
            top_k,
            max_kl,
            max_ppl_ratio,
            min_top1,
            card,
            backend,
            quiet,
            json,
        } => {
            let args = validate::ValidateArgs {
                model: &model,
                text: &text,
                reference: reference.as_deref(),
                reference_logits: reference_logits.as_deref(),
                save_reference: save_reference.as_deref(),
                ctx,
                stride: stride.unwrap_or(ctx),
                max_tokens,
                top_k,
                gates: mixq_validate::Gates { max_kl, max_ppl_ratio, min_top1 },
                card: card.as_deref(),
                backend,
                quiet: quiet || json,
            };
            let (summary, failed) = validate::validate(&args)?;
            if json {
                let mut v = summary.to_json();
                v["gates_failed"] = serde_json::json!(failed);
                print_json(&v);
            } else {
                print!("{}", summary.to_text());
            }
            if !failed.is_empty() {
                for f in &failed {
                    eprintln!("gate failed: {f}");
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Adapters { json } => {
            let all = mixq_runtime::gpu::adapters();
            if json {
                print_json(&serde_json::json!(all
                    .iter()
                    .map(|a| serde_json::json!({"name": a.name, "backend": a.backend, "driver": a.driver, "software": a.software}))
                    .collect::<Vec<_>>()));
            } else if all.is_empty() {
                println!("no GPU adapters (the GPU backend needs Vulkan, Metal or DX12)");
            } else {
                for a in all {
                    println!("{a}{}", if a.software { "  [software: used by --backend gpu, not by auto]" } else { "" });
                }
            }
        }
        Command::Recipes { json } => {
            let all: Vec<Recipe> = mixq_quantizer::BUILTIN_RECIPES.iter().map(|(n, _)| Recipe::load(n)).collect::<Result<_, _>>()?;
            if json {
                print_json(&serde_json::json!(all
                    .iter()
                    .map(|r| serde_json::json!({"name": r.name, "description": r.description, "rules": r.rules.len()}))
                    .collect::<Vec<_>>()));
            } else {
                for r in all {
                    println!("{}\n    {}\n", r.name, r.description);
                }
            }
        }
        Command::Demo { out, recipe, model, json } => demo::demo(&model.unwrap_or_else(bundled_model), &recipe, &out, json)?,
        Command::Synth { out, preset, config, layers, hidden, intermediate, experts, seed, no_truncate, json } => {
            let mut shape = match &config {
                Some(path) => mixq_synth::Shape::from_config(&GptOssConfig::from_file(path)?, 1),
                None => mixq_synth::Shape::preset(&preset)
                    .with_context(|| format!("unknown preset {preset}; expected tiny, small, wide or medium"))?,
            };
            shape.layers = layers.unwrap_or(shape.layers);
            shape.hidden = hidden.unwrap_or(shape.hidden);
            shape.intermediate = intermediate.unwrap_or(shape.intermediate);
            shape.experts = experts.unwrap_or(shape.experts);
            shape.seed = seed.unwrap_or(shape.seed);
            shape.truncate = shape.truncate && !no_truncate;
            mixq_synth::write_checkpoint(&out, &shape)?;
            if json {
                print_json(&serde_json::json!({"out": out, "preset": preset, "config": shape.config_json()}));
            } else {
                println!("wrote {}", out.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
