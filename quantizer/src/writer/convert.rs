//! Streaming conversion of an upstream gpt-oss checkpoint into an MLX checkpoint.
//!
//! Every output tensor's dtype and shape is known from the allocation before any weight is read,
//! so shard headers are written first and tensor data is then produced a chunk of rows at a time
//! (rows in parallel) and written in place. Peak memory is one chunk per tensor, not the model.
//! Everything goes to a hidden sibling folder (see `staging`) that is renamed into place only when
//! complete; each shard is synced, hashed and journaled as it finishes so `--resume` can keep it,
//! and the source's files are re-stamped after every parameter so a change is never converted.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::bf16;
use mixq_loader::{Checkpoint, SourceLayout};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::kernels::affine::packed_row_bytes;
use crate::kernels::mxfp4::encode_row;
use crate::kernels::gptq::HessianFactor;
use crate::kernels::importance::{CalibrationUse, Importance, ParamHessians};
use crate::kernels::method::InputStats;
use crate::writer::card::{base_model_of, has_chat_template, license_of_card, model_card, CardInput};
use crate::error::{io, ConvertError};
use crate::writer::provenance::Provenance;
use crate::writer::hash::{sha256_file, sha256_hex};
use crate::writer::manifest::{write_manifest, MANIFEST_FILE};
use crate::recipe::plan::{source_size, Allocation, Assigned, PlanSummary};
use mixq_loader::TensorSpec;
use crate::recipe::language::{QuantFormat, Recipe};
use crate::writer::rows::RowSource;
use crate::kernels::method::QuantMethod;
use crate::writer::source_watch::SourceWatch;
use crate::writer::staging::{free_bytes, output_name, ShardRecord, Staging};
use crate::sizes::human_bytes;

/// mlx-lm's shard limit: 5 GiB.
pub const MAX_SHARD_BYTES: u64 = 5 << 30;
/// Output bytes produced per chunk of rows.
const CHUNK_BYTES: usize = 8 << 20;


/// Progress events of a conversion; every method has a silent default.
pub trait Progress: Sync {
    /// Conversion starts: source bytes to read and tensors to write.
    fn begin(&self, _source_bytes: u64, _tensors: usize) {}
    /// Some source bytes were consumed.
    fn advance(&self, _source_bytes: u64) {}
    /// A parameter's tensors are written.
    fn tensor_done(&self, _name: &str) {}
    /// A new phase (hashing, finishing).
    fn phase(&self, _what: &str) {}
    /// Something worth a line (what --resume kept); `--quiet` hides it.
    fn notice(&self, _what: &str) {}
    /// Something the user must read (a dead recipe rule, no tokenizer, stale output removed,
    /// --resume that cannot resume, shards kept after a failure); shown even with `--quiet`.
    fn warning(&self, _what: &str) {}
}

/// A progress sink that reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Knobs of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Replace a non-empty output folder.
    pub force: bool,
    /// Largest shard, in bytes.
    pub max_shard_bytes: u64,
    /// How the source is named in the model card and manifest (repo id or folder).
    pub source_label: String,
    /// How affine groups get their scale and bias, where the recipe's rule does not say; `None`:
    /// `gptq` when the calibration statistics hold Hessians, else `mse`.
    pub quantizer: Option<QuantMethod>,
    /// Calibration statistics (`mixq calibrate`) weighting the `mse` search and, with Hessians,
    /// driving `gptq`.
    pub calibration: Option<PathBuf>,
    /// Keep the verified finished shards of an interrupted conversion to the same output.
    pub resume: bool,
    /// Refuse to start when the output's filesystem has less free space than the output needs.
    pub check_space: bool,
    /// The card's `base_model` (a hub repo id); `None`: the source when it is a repo id.
    pub base_model: Option<String>,
    /// The card's `license`; `None`: the source card's, if any.
    pub license: Option<String>,
    /// Report a hub download of the source on stderr.
    pub show_downloads: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            force: false,
            max_shard_bytes: MAX_SHARD_BYTES,
            source_label: String::new(),
            quantizer: None,
            calibration: None,
            resume: false,
            check_space: true,
            base_model: None,
            show_downloads: false,
            license: None,
        }
    }
}

/// What a finished conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The output folder.
    pub out: PathBuf,
    /// Sizes and bits per weight.
    pub summary: PlanSummary,
    /// Shard file names.
    pub shards: Vec<String>,
    /// Bytes of source tensor data read.
    pub source_bytes: u64,
    /// Shards kept from an interrupted conversion (`--resume`).
    pub kept_shards: usize,
    /// The default quantizer the conversion used (the option, or the one chosen for it).
    pub quantizer: QuantMethod,
}

/// The quantizer of modules whose rule names none: the option, else `gptq` when the statistics
/// hold Hessians, else `mse`.
pub fn default_quantizer(chosen: Option<QuantMethod>, calibration: Option<&CalibrationUse>) -> QuantMethod {
    chosen.unwrap_or(if calibration.is_some_and(|c| c.stats.has_hessians()) { QuantMethod::Gptq } else { QuantMethod::Mse })
}

/// Refuses, before any work, a `gptq` module without Hessians to feed its errors through.
fn check_quantizers(alloc: &Allocation, default: QuantMethod, calibration: Option<&CalibrationUse>) -> Result<(), ConvertError> {
    let has_hessians = calibration.is_some_and(|c| c.stats.has_hessians());
    let needing = alloc
        .assigned
        .iter()
        .find(|a| matches!(a.action, QuantFormat::Affine { .. }) && a.quantizer.unwrap_or(default).needs_hessians());
    match (needing, has_hessians) {
        (Some(a), false) => Err(ConvertError::NeedsHessians {
            module: a.param.module.clone(),
            calibration: calibration.map(|c| c.path.clone()),
        }),
        _ => Ok(()),
    }
}

/// Checks that `out` may be written and is not the source: absent, an empty folder, or (with
/// `force`) a folder holding a mixq output. A regular file, and with `force` a folder of other
/// things, is refused with what it holds.
pub fn check_out_dir(out: &Path, source: &Path, force: bool) -> Result<(), ConvertError> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(ConvertError::OutIsFile(out.to_path_buf()));
    }
    let canon_out = out.canonicalize().map_err(io(out))?;
    let canon_src = source.canonicalize().map_err(io(source))?;
    if canon_src.starts_with(&canon_out) {
        return Err(ConvertError::OutIsSource(out.to_path_buf()));
    }
    let mut names: Vec<String> =
        std::fs::read_dir(out).map_err(io(out))?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if names.is_empty() {
        return Ok(());
    }
    if !force {
        return Err(ConvertError::OutExists(out.to_path_buf()));
    }
    if out.join(MANIFEST_FILE).is_file() {
        return Ok(());
    }
    names.sort();
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = if names.len() > shown.len() { format!(", ... ({} more)", names.len() - shown.len()) } else { String::new() };
    let what = format!("{} entr{} and no mixq-manifest.json ({}{more})", names.len(), if names.len() == 1 { "y" } else { "ies" }, shown.join(", "));
    Err(ConvertError::OutNotOurs { path: out.to_path_buf(), what })
}

/// Converts the upstream checkpoint in `source` to an MLX checkpoint in `out` following `recipe`.
pub fn convert(
    source: &Path,
    recipe: &Recipe,
    out: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let ckpt = Checkpoint::open(source)?;
    let format = ckpt.format();
    let Some(source_layout) = format.source_layout() else {
        return Err(ConvertError::NotUpstream { path: source.to_path_buf(), found: format.describe() });
    };
    mixq_loader::layout::validate_source(&ckpt, source_layout)?;
    let alloc = Allocation::resolve(ckpt.config(), recipe)?;
    for w in alloc.unused_rules(recipe) {
        progress.warning(&w.to_string());
    }
    if !source.join(crate::writer::verify::TOKENIZER_FILE).is_file() {
        progress.warning(&format!(
            "{}: no tokenizer.json; the output will have none, so it cannot encode text (mlx-lm load, mixq run) and mixq verify will report it",
            source.display()
        ));
    }
    let calibration = opts.calibration.as_deref().map(|p| CalibrationUse::open(p, &ckpt)).transpose()?;
    let quantizer = default_quantizer(opts.quantizer, calibration.as_ref());
    check_quantizers(&alloc, quantizer, calibration.as_ref())?;
    check_out_dir(out, source, opts.force)?;
    let watch = SourceWatch::of(&ckpt)?;
    let layout = ShardLayout::new(&alloc, opts.max_shard_bytes);
    let inputs = conversion_inputs(&watch, recipe, quantizer, calibration.as_ref(), &layout);
    let (mut staging, found) = Staging::open(out, inputs, opts.resume)?;
    // Again under the lock: a conversion that held it may have finished `out` in the meantime.
    check_out_dir(out, source, opts.force)?;
    for (path, bytes) in &found.removed {
        progress.warning(&format!("removed {}: {} left by an interrupted conversion", path.display(), human_bytes(*bytes)));
    }
    if let Some(why) = &found.unverified {
        progress.warning(&format!("nothing to resume: {why}; writing every shard"));
    }
    if opts.resume {
        let kept: u64 = found.kept.values().map(|r| r.size).sum();
        progress.notice(&format!(
            "resuming: kept {} of {} shard(s), {}, verified against their recorded sha256{}",
            found.kept.len(),
            layout.names.len(),
            human_bytes(kept),
            if found.discarded.is_empty() { String::new() } else { format!("; writing again {} that no longer matched", found.discarded.join(", ")) }
        ));
    }
    let side_bytes: u64 = mixq_loader::source::SIDE_FILES.iter().filter_map(|f| std::fs::metadata(source.join(f)).ok()).map(|m| m.len()).sum();
    let total_needed = layout.sizes.iter().sum::<u64>() + side_bytes + METADATA_BYTES;
    let to_write = total_needed - staging.shards().values().map(|r| r.size).sum::<u64>();
    if opts.check_space {
        let available = free_bytes(staging.dir()).map_err(io(staging.dir()))?;
        if available < to_write {
            return Err(ConvertError::NoSpace { path: out.to_path_buf(), needed: to_write, available });
        }
    }
    let job = Job { ckpt: &ckpt, source_layout, alloc: &alloc, recipe, quantizer, calibration: calibration.as_ref(), layout: &layout, watch: &watch, opts, out };
    let written = job.write(&mut staging, progress).map_err(|e| match e {
        ConvertError::Io { path, error } if out_of_space(&error) => ConvertError::DiskFull { path, needed: total_needed, error },
        e => e,
    });
    if written.is_err() && !staging.shards().is_empty() {
        progress.warning(&format!(
            "kept {} finished shard(s) in {}; rerun with --resume to write only the rest",
            staging.shards().len(),
            staging.dir().display()
        ));
    }
    let (summary, source_bytes) = written?;
    staging.finish(out)?;
    Ok(ConvertReport { out: out.to_path_buf(), summary, shards: layout.names.clone(), source_bytes, kept_shards: found.kept.len(), quantizer })
}

/// Slack for config.json, the index, the card and the manifest in the free-space check.
const METADATA_BYTES: u64 = 1 << 20;

/// Whether an I/O error means the disk (or a quota or file-size limit) is full.
fn out_of_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), StorageFull | FileTooLarge | QuotaExceeded)
}

/// Everything that decides the bytes of the shards, as `--resume` compares it.
fn conversion_inputs(
    watch: &SourceWatch,
    recipe: &Recipe,
    quantizer: QuantMethod,
    calibration: Option<&CalibrationUse>,
    layout: &ShardLayout,
) -> BTreeMap<String, String> {
    let mut shape = String::new();
    for ((name, size), header) in layout.names.iter().zip(&layout.sizes).zip(&layout.headers) {
        shape.push_str(&format!("{name}\t{size}\t{}\n", sha256_hex(header)));
    }
    [
        ("mixq version", env!("CARGO_PKG_VERSION").to_string()),
        ("source", watch.digest()),
        ("recipe", sha256_hex(recipe.text.as_bytes())),
        ("quantizer", quantizer.as_str().to_string()),
        ("calibration", calibration.map(|c| c.file_sha256.clone()).unwrap_or_else(|| "none".into())),
        ("shard layout", sha256_hex(shape.as_bytes())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// One conversion's fixed inputs.
struct Job<'a> {
    ckpt: &'a Checkpoint,
    /// Where the source's weights are and in what type (for the card and the manifest).
    source_layout: SourceLayout,
    alloc: &'a Allocation,
    recipe: &'a Recipe,
    quantizer: QuantMethod,
    calibration: Option<&'a CalibrationUse>,
    layout: &'a ShardLayout,
    watch: &'a SourceWatch,
    opts: &'a ConvertOptions,
    out: &'a Path,
}

impl Job<'_> {
    /// Writes every file of the output into the staging folder, skipping parameters whose shards
    /// were kept, and journals each shard as it finishes. Returns the plan's summary and the
    /// source bytes the conversion covers.
    fn write(&self, staging: &mut Staging, progress: &dyn Progress) -> Result<(PlanSummary, u64), ConvertError> {
        let (alloc, layout, dir) = (self.alloc, self.layout, staging.dir().to_path_buf());
        let sources: Vec<RowSource<'_>> = alloc.assigned.iter().map(|a| RowSource::for_param(self.ckpt, &a.param)).collect::<Result<_, _>>()?;
        let source_bytes: Vec<u64> = alloc.assigned.iter().zip(&sources).map(|(a, s)| ((a.param.numel() / s.cols()) * s.source_bytes_per_row()) as u64).collect();
        progress.begin(source_bytes.iter().sum(), alloc.assigned.len());
        let files = layout.open_files(&dir, staging.shards())?;
        crate::writer::fault::point("headers");
        let mut unfinished = 0;
        for (i, ((a, src), places)) in alloc.assigned.iter().zip(&sources).zip(&layout.placements).enumerate() {
            let kept = places.iter().all(|&(s, _)| staging.shards().contains_key(&layout.names[s]));
            if kept {
                progress.advance(source_bytes[i]);
            } else {
                let method = a.quantizer.unwrap_or(self.quantizer);
                let (importance, hessians) = match (self.calibration, method, a.action) {
                    (Some(c), QuantMethod::Mse, QuantFormat::Affine { .. }) => (c.importance(&a.param)?, None),
                    (Some(c), QuantMethod::Gptq, QuantFormat::Affine { .. }) => (c.importance(&a.param)?, c.hessians(&a.param)?),
                    _ => (None, None),
                };
                let job = ParamJob { method, importance: importance.as_ref(), hessians: hessians.as_ref(), ckpt: self.ckpt };
                write_param(a, src, &job, places, &files, &layout.names, &dir, progress)?;
            }
            for slice in src.slices() {
                self.ckpt.release(slice);
            }
            self.watch.check()?;
            progress.tensor_done(&a.param.name());
            // Shards are filled in order: every shard before the next parameter's first is done.
            let done_below = layout.placements.get(i + 1).map(|p| p[0].0).unwrap_or(layout.names.len());
            while unfinished < done_below {
                let name = &layout.names[unfinished];
                if !staging.shards().contains_key(name) {
                    let path = dir.join(name);
                    progress.phase(&format!("hashing {name}"));
                    files[unfinished].sync_all().map_err(io(&path))?;
                    let (sha256, size) = sha256_file(&path).map_err(io(&path))?;
                    staging.record(name, ShardRecord { size, sha256 })?;
                    crate::writer::fault::point("shard");
                }
                unfinished += 1;
            }
        }
        drop(files);

        let summary = alloc.summary();
        let source = self.ckpt.dir();
        write_json(&dir.join(mixq_loader::INDEX_FILE), &layout.index_json(&summary))?;
        write_json(&dir.join("config.json"), &mlx_config(self.ckpt.config(), source, alloc))?;
        for side in mixq_loader::source::SIDE_FILES {
            let from = source.join(side);
            if from.is_file() {
                std::fs::copy(&from, dir.join(side)).map_err(io(&from))?;
            }
        }
        let name = output_name(self.out);
        let label = if self.opts.source_label.is_empty() { source.display().to_string() } else { self.opts.source_label.clone() };
        let provenance = Provenance::of(alloc, self.quantizer, self.calibration);
        let base_model = base_model_of(self.opts.base_model.as_deref(), &label);
        let license = self.opts.license.clone().or_else(|| license_of_card(source));
        let card = model_card(&CardInput {
            name: &name,
            base_model: base_model.as_deref(),
            license: license.as_deref(),
            source_label: &label,
            recipe: self.recipe,
            summary: &summary,
            source_size: source_size(self.ckpt.config(), self.source_layout),
            provenance: &provenance,
            chat_template: has_chat_template(source),
        });
        std::fs::write(dir.join("README.md"), card).map_err(io(&dir))?;
        progress.phase("hashing");
        crate::writer::fault::point("manifest");
        write_manifest(&dir, staging.shards(), &label, self.source_layout, self.recipe, &summary, &provenance)?;
        self.watch.check()?;
        Ok((summary, source_bytes.iter().sum()))
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), ConvertError> {
    std::fs::write(path, json_text(value)).map_err(io(path))
}

/// A JSON file's text as the writer writes it: pretty, with a final newline.
pub(crate) fn json_text(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values always serialize");
    text.push('\n');
    text
}

/// Where each output tensor goes: shard and absolute file offset.
pub(crate) struct ShardLayout {
    /// Shard file names.
    pub(crate) names: Vec<String>,
    /// Each shard's safetensors header: length prefix, JSON and padding.
    pub(crate) headers: Vec<Vec<u8>>,
    /// Each shard's size in bytes, header included.
    pub(crate) sizes: Vec<u64>,
    /// Per assigned parameter, per output tensor: (shard, absolute offset).
    placements: Vec<Vec<(usize, u64)>>,
    weight_map: Vec<(String, usize)>,
}

impl ShardLayout {
    /// The shards of `alloc`'s tensors, none larger than `max_shard_bytes` of tensor data.
    pub(crate) fn new(alloc: &Allocation, max_shard_bytes: u64) -> Self {
        // Group tensors into shards as mlx-lm does: a new shard when the next tensor would overflow.
        let mut shard_of: Vec<Vec<usize>> = Vec::new();
        let mut shard_tensors: Vec<Vec<TensorSpec>> = Vec::new();
        let mut current = 0u64;
        for a in &alloc.assigned {
            let mut ids = Vec::new();
            for t in a.outputs() {
                let n = t.nbytes() as u64;
                if shard_tensors.is_empty() || current + n > max_shard_bytes {
                    shard_tensors.push(Vec::new());
                    current = 0;
                }
                current += n;
                ids.push(shard_tensors.len() - 1);
                shard_tensors.last_mut().expect("a shard was just pushed").push(t);
            }
            shard_of.push(ids);
        }
        let count = shard_tensors.len();
        let names: Vec<String> = (0..count)
            .map(|i| if count == 1 { "model.safetensors".into() } else { format!("model-{:05}-of-{count:05}.safetensors", i + 1) })
            .collect();
        let mut headers = Vec::new();
        let mut sizes = Vec::new();
        let mut offsets: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let mut weight_map = Vec::new();
        for (s, tensors) in shard_tensors.iter().enumerate() {
            let entries: Vec<(&str, mixq_loader::Dtype, &[usize])> =
                tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice())).collect();
            let (bytes, rel) = mixq_loader::shard::encode_header(&[("format", "mlx")], &entries);
            let data_start = bytes.len() as u64;
            for (t, off) in tensors.iter().zip(rel) {
                offsets.insert(t.name.clone(), data_start + off as u64);
                weight_map.push((t.name.clone(), s));
            }
            sizes.push(data_start + tensors.iter().map(|t| t.nbytes() as u64).sum::<u64>());
            headers.push(bytes);
        }
        let placements = alloc
            .assigned
            .iter()
            .zip(&shard_of)
            .map(|(a, ids)| a.outputs().iter().zip(ids).map(|(t, &s)| (s, offsets[&t.name])).collect())
            .collect();
        weight_map.sort();
        ShardLayout { names, headers, sizes, placements, weight_map }
    }

    /// Opens every shard for writing: kept ones as they are, the rest created with their header.
    fn open_files(&self, dir: &Path, kept: &BTreeMap<String, ShardRecord>) -> Result<Vec<File>, ConvertError> {
        let mut files = Vec::new();
        for ((name, header), &size) in self.names.iter().zip(&self.headers).zip(&self.sizes) {
            let path = dir.join(name);
            if kept.contains_key(name) {
                files.push(std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(io(&path))?);
                continue;
            }
            let f = File::create(&path).map_err(io(&path))?;
            f.set_len(size).map_err(io(&path))?;
            f.write_all_at(header, 0).map_err(io(&path))?;
            files.push(f);
        }
        Ok(files)
    }

    /// `model.safetensors.index.json`: totals and the sorted weight map.
    pub(crate) fn index_json(&self, summary: &PlanSummary) -> Value {
        let weight_map: Map<String, Value> =
            self.weight_map.iter().map(|(n, s)| (n.clone(), Value::String(self.names[*s].clone()))).collect();
        json!({
            "metadata": {"total_size": summary.bytes, "total_parameters": summary.params},
            "weight_map": weight_map,
        })
    }
}

/// How one parameter's affine groups are chosen, and the checkpoint its rows come from.
struct ParamJob<'a> {
    method: QuantMethod,
    importance: Option<&'a Importance>,
    /// Only for `gptq`: the Hessians its errors are fed through.
    hessians: Option<&'a ParamHessians>,
    ckpt: &'a Checkpoint,
}

/// Produces and writes every output tensor of one parameter, a chunk of rows at a time.
#[allow(clippy::too_many_arguments)]
fn write_param(
    a: &Assigned,
    src: &RowSource<'_>,
    job: &ParamJob<'_>,
    places: &[(usize, u64)],
    files: &[File],
    names: &[String],
    dir: &Path,
    progress: &dyn Progress,
) -> Result<(), ConvertError> {
    let cols = src.cols();
    let rows = a.param.numel() / cols;
    let outs = a.outputs();
    let row_bytes: Vec<usize> = outs.iter().map(|t| t.nbytes() / rows).collect();
    let chunk_rows = (CHUNK_BYTES / (row_bytes.iter().sum::<usize>() + cols * 4).max(1)).max(1);
    let put = |k: usize, first_row: usize, bytes: &[u8]| -> Result<(), ConvertError> {
        let (s, off) = places[k];
        let at = off + (first_row * row_bytes[k]) as u64;
        files[s].write_all_at(bytes, at).map_err(io(&dir.join(&names[s])))
    };
    // Chunk buffers are allocated once per parameter and reused, so fresh pages are not
    // faulted in for every chunk.
    let mut bytes_a = vec![0u8; chunk_rows.min(rows) * row_bytes[0]];
    let mut bytes_b = vec![0u8; if row_bytes.len() > 1 { chunk_rows.min(rows) * row_bytes[1] } else { 0 }];
    let groups_per_row = match a.action {
        QuantFormat::Affine { group_size, .. } => cols / group_size as usize,
        _ => 0,
    };
    let mut scales = vec![bf16::ZERO; chunk_rows.min(rows) * groups_per_row];
    let mut biases = scales.clone();
    let mut rows_f32 = Vec::new();
    let mut factors = FactorCache::default();
    let mut first = 0;
    while first < rows {
        let n = chunk_rows.min(rows - first);
        match a.action {
            QuantFormat::Bf16 => {
                let buf = &mut bytes_a[..n * row_bytes[0]];
                src.rows_bf16(first, &mut rows_f32, buf);
                put(0, first, buf)?;
            }
            QuantFormat::Affine { bits, group_size } => {
                let gpr = groups_per_row;
                let packed = &mut bytes_a[..n * packed_row_bytes(cols, bits)];
                let (s, b) = (&mut scales[..n * gpr], &mut biases[..n * gpr]);
                quantize_rows(a, src, job, first, (bits, group_size as usize), &mut rows_f32, &mut factors, packed, s, b)?;
                put(0, first, packed)?;
                put(1, first, bytemuck::cast_slice(s))?;
                put(2, first, bytemuck::cast_slice(b))?;
            }
            QuantFormat::Mxfp4 => {
                let (bb, sb) = (row_bytes[0], row_bytes[1]);
                let (blocks, block_scales) = (&mut bytes_a[..n * bb], &mut bytes_b[..n * sb]);
                match src.float_dtype() {
                    // Upstream MXFP4 rows are copied unchanged.
                    None => {
                        for i in 0..n {
                            let (b, s) = src
                                .row_mxfp4(first + i)
                                .ok_or_else(|| ConvertError::NotUpstream { path: dir.to_path_buf(), found: "not MXFP4 for this tensor" })?;
                            blocks[i * bb..(i + 1) * bb].copy_from_slice(b);
                            block_scales[i * sb..(i + 1) * sb].copy_from_slice(s);
                        }
                    }
                    // Dense rows are encoded as mx.quantize(mode="mxfp4") encodes the tensor's type.
                    Some(precision) => {
                        rows_f32.resize(n * cols, 0.0);
                        src.rows_f32(first, &mut rows_f32[..]);
                        blocks
                            .par_chunks_mut(bb)
                            .zip(block_scales.par_chunks_mut(sb))
                            .zip(rows_f32.par_chunks(cols))
                            .enumerate()
                            .try_for_each(|(i, ((b, s), row))| encode_row(row, precision, b, s).map_err(|error| (i, error)))
                            .map_err(|(i, error)| ConvertError::Mxfp4 { tensor: a.param.name(), row: first + i, error })?;
                    }
                }
                put(0, first, blocks)?;
                put(1, first, block_scales)?;
            }
        }
        // Resident source pages stay bounded by a chunk, even for a 1 GiB embedding.
        for slice in src.row_slices(first, n) {
            job.ckpt.release(slice);
        }
        progress.advance((n * src.source_bytes_per_row()) as u64);
        crate::writer::fault::point("chunk");
        first += n;
    }
    Ok(())
}

/// Quantizes the output rows of `src` from `first` on (as many as `packed` holds) into packed
/// codes, scales and biases: the rows are read in parallel, then each run of rows that shares its
/// input statistics (the whole matrix, or one expert) is handed to the quantizer whole.
#[allow(clippy::too_many_arguments)]
fn quantize_rows(
    a: &Assigned,
    src: &RowSource<'_>,
    job: &ParamJob<'_>,
    first: usize,
    (bits, group_size): (u32, usize),
    rows_f32: &mut Vec<f32>,
    factors: &mut FactorCache,
    packed: &mut [u8],
    scales: &mut [bf16],
    biases: &mut [bf16],
) -> Result<(), ConvertError> {
    let cols = src.cols();
    let (rb, gpr) = (packed_row_bytes(cols, bits), cols / group_size);
    let n = packed.len() / rb;
    rows_f32.resize(n * cols, 0.0);
    src.rows_f32(first, rows_f32);
    let all_rows = a.param.numel() / cols;
    let mut r = 0;
    while r < n {
        let row = first + r;
        // A run ends where its Hessian or its importance (one per expert) changes.
        let hessian_end = job.hessians.map_or(all_rows, |h| h.run_end(row, all_rows));
        let importance_end = job.importance.map_or(all_rows, |imp| imp.block_end(row, all_rows));
        let end = hessian_end.min(importance_end).min(first + n);
        let factor = job.hessians.and_then(|h| h.matrix_of_row(row).and_then(|m| factors.get(h, m)));
        let inputs = match (&factor, job.importance.and_then(|m| m.row(row))) {
            (Some(f), _) => InputStats::Hessian(f),
            (None, Some(imp)) => InputStats::Importance(imp),
            (None, None) => InputStats::None,
        };
        let (lo, hi) = (r, end - first);
        job.method
            .quantize_rows(
                &mut rows_f32[lo * cols..hi * cols],
                cols,
                inputs,
                (bits, group_size),
                &mut packed[lo * rb..hi * rb],
                &mut scales[lo * gpr..hi * gpr],
                &mut biases[lo * gpr..hi * gpr],
            )
            .map_err(|(i, e)| ConvertError::NonFinite { tensor: a.param.name(), row: first + lo + i, col: e.index, value: e.value })?;
        r = hi;
    }
    Ok(())
}

/// The factored Hessian last used by a parameter's chunks, so a matrix whose rows span several
/// chunks (one expert of a large model) is factored once.
#[derive(Default)]
struct FactorCache {
    last: Option<(usize, Option<std::sync::Arc<HessianFactor>>)>,
}

impl FactorCache {
    fn get(&mut self, h: &ParamHessians, m: usize) -> Option<std::sync::Arc<HessianFactor>> {
        match &self.last {
            Some((k, f)) if *k == m => f.clone(),
            _ => {
                let f = h.factor(m).map(std::sync::Arc::new);
                self.last = Some((m, f.clone()));
                f
            }
        }
    }
}

/// The MLX config.json: the source config without its mxfp4 `quantization_config`, eos ids from
/// the generation_config.json in `source_dir`, and the quantization map (also copied as
/// `quantization_config`).
pub(crate) fn mlx_config(config: &mixq_loader::GptOssConfig, source_dir: &Path, alloc: &Allocation) -> Value {
    let mut cfg = quantized_config(config, alloc);
    if let Ok(text) = std::fs::read_to_string(source_dir.join("generation_config.json")) {
        if let Ok(gen) = serde_json::from_str::<Value>(&text) {
            if let Some(eos) = gen.get("eos_token_id").filter(|v| !v.is_null()) {
                cfg["eos_token_id"] = eos.clone();
            }
        }
    }
    cfg
}

/// The MLX config.json of `config` converted with `alloc`: the upstream fields, with the
/// per-module quantization map in place of the upstream quantization config.
pub fn quantized_config(config: &mixq_loader::GptOssConfig, alloc: &Allocation) -> Value {
    let mut cfg: std::collections::BTreeMap<String, Value> = config.raw.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    cfg.remove("quantization_config");
    cfg.remove("_name_or_path");
    if let Some(default) = alloc.default_spec() {
        let spec = |s: mixq_loader::QuantSpec| json!({"group_size": s.group_size, "bits": s.bits, "mode": s.mode.as_str()});
        let mut q = Map::new();
        q.insert("group_size".into(), json!(default.group_size));
        q.insert("bits".into(), json!(default.bits));
        q.insert("mode".into(), json!(default.mode.as_str()));
        for a in &alloc.assigned {
            if let Some(s) = a.quant_spec() {
                q.insert(a.param.module.clone(), spec(s));
            }
        }
        cfg.insert("quantization".into(), Value::Object(q.clone()));
        cfg.insert("quantization_config".into(), Value::Object(q));
    }
    Value::Object(cfg.into_iter().collect())
}
