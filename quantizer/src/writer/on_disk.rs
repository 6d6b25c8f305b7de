//! The bytes a conversion puts on disk, from the plan alone (no weight is read): every file
//! `convert` writes, rendered or laid out by the writer's own code.
//!
//! Counted: the shards with their safetensors headers (laid out with the default 5 GiB shard
//! limit), `model.safetensors.index.json`, `config.json`, the files copied from the source
//! (tokenizer files, chat template, generation_config.json: their sizes in the source folder), the
//! model card `README.md` and `mixq-manifest.json`. All are exact except the card and the
//! manifest, which depend on what only `convert` knows (the output folder's name, the quantizer,
//! the calibration): they are bounded by rendering them with the longest values those can take
//! (a 255-byte folder name, every quantizer, a calibration record with 20-digit counts, 64-digit
//! hashes). The bound assumes `convert` is given `--source` and `--recipe` spelled as here and no
//! `--base-model`, `--license` or `--max-shard-bytes`; `mixq validate --card` later adds a section
//! to the card that is not counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mixq_loader::source::{resolve_source, Need, ResolvedSource, SIDE_FILES};
use mixq_loader::{Checkpoint, GptOssConfig, LoaderError, SourceLayout};

use crate::kernels::method::QuantMethod;
use crate::recipe::language::{QuantFormat, Recipe};
use crate::recipe::plan::{source_size, Allocation};
use crate::writer::card::{base_model_of, has_chat_template, license_of_card, model_card, CardInput};
use crate::writer::convert::{json_text, mlx_config, ShardLayout, MAX_SHARD_BYTES};
use crate::writer::manifest::{file_entry, manifest_text, manifest_value};
use crate::writer::provenance::{CalibrationRecord, Provenance};

/// The longest output folder name a filesystem allows (NAME_MAX on Linux and macOS).
pub const LONGEST_OUTPUT_NAME: usize = 255;

/// Which files on disk a size target counts, for messages and recipe comments.
pub const COUNTED_FILES: &str =
    "shards with headers, index, config.json, copied tokenizer files, model card and manifest";

/// A source as `convert` would be given it: what the output's files depend on beyond the recipe.
#[derive(Debug, Clone)]
pub struct SourceFiles {
    /// The source as named on the command line (the card and the manifest record it).
    pub label: String,
    /// The folder holding its config.json (and, for a checkpoint, the files convert copies).
    pub dir: PathBuf,
    /// Whether the source is a checkpoint folder; `false`: a bare config.json, beside which the
    /// files convert copies may be missing (those are then not counted).
    pub checkpoint: bool,
    /// Where and in what type its weights are (from a folder's tensor headers, else its config).
    pub layout: SourceLayout,
}

impl SourceFiles {
    /// Resolves `source` (folder, repo id or config.json) far enough to plan it, reading no weight.
    pub fn resolve(source: &str, show_downloads: bool) -> Result<(GptOssConfig, SourceFiles), LoaderError> {
        let resolved = resolve_source(source, Need::Config, show_downloads)?;
        let config_path = resolved.config_path();
        let config = GptOssConfig::from_file(&config_path)?;
        let dir = mixq_loader::file_name::folder_of(&config_path).to_path_buf();
        let layout = match &resolved {
            ResolvedSource::Folder(d) if has_weights(d) => Checkpoint::open(d)?.format().source_layout(),
            _ => None,
        };
        let checkpoint = matches!(resolved, ResolvedSource::Folder(_));
        let layout = layout.unwrap_or_else(|| SourceLayout::of_config(&config));
        Ok((config, SourceFiles { label: source.to_string(), dir, checkpoint, layout }))
    }
}

/// Whether a folder holds safetensors weights (an index or a single file), not only a config.
fn has_weights(dir: &Path) -> bool {
    dir.join(mixq_loader::INDEX_FILE).is_file() || dir.join("model.safetensors").is_file()
}

/// The bytes of a conversion's files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDisk {
    /// The shards' total size, headers included.
    pub shards: u64,
    /// Of that, the safetensors headers (length prefix, JSON, padding).
    pub headers: u64,
    /// The shard count.
    pub shard_count: usize,
    /// model.safetensors.index.json.
    pub index: u64,
    /// config.json.
    pub config: u64,
    /// The files copied from the source, by name (those found in the source folder).
    pub copied: BTreeMap<String, u64>,
    /// Whether the copied files are known (a checkpoint folder) or only those found beside a bare
    /// config.json.
    pub copied_known: bool,
    /// README.md, the model card: an upper bound.
    pub card: u64,
    /// mixq-manifest.json: an upper bound.
    pub manifest: u64,
}

impl OnDisk {
    /// All counted files together.
    pub fn total(&self) -> u64 {
        self.shards + self.index + self.config + self.copied_bytes() + self.card + self.manifest
    }

    /// Bytes of the files copied from the source.
    pub fn copied_bytes(&self) -> u64 {
        self.copied.values().sum()
    }

    /// Bytes beside the tensor data: headers, index, config, copied files, card, manifest.
    pub fn overhead(&self, tensor_bytes: u64) -> u64 {
        self.total() - tensor_bytes
    }
}

/// The files of converting `source` by `recipe` (resolved as `alloc`), sized without reading a
/// weight: exact for shards, index, config.json and copied files, an upper bound for the card and
/// the manifest (see the module's documentation).
pub fn on_disk(config: &GptOssConfig, alloc: &Allocation, recipe: &Recipe, source: &SourceFiles) -> OnDisk {
    let layout = ShardLayout::new(alloc, MAX_SHARD_BYTES);
    let summary = alloc.summary();
    let len = |text: String| text.len() as u64;
    let index = len(json_text(&layout.index_json(&summary)));
    let config_bytes = len(json_text(&mlx_config(config, &source.dir, alloc)));
    let copied: BTreeMap<String, u64> = SIDE_FILES
        .iter()
        .filter_map(|f| std::fs::metadata(source.dir.join(f)).ok().filter(|m| m.is_file()).map(|m| (f.to_string(), m.len())))
        .collect();
    let affine = alloc.assigned.iter().filter(|a| matches!(a.action, QuantFormat::Affine { .. })).count();
    let name = "n".repeat(LONGEST_OUTPUT_NAME);
    let base_model = base_model_of(None, &source.label);
    let license = license_of_card(&source.dir);
    // Every default quantizer, with every quantizer used and a calibration of the longest figures.
    let provenances = QuantMethod::ALL.map(|default| Provenance {
        default,
        modules: QuantMethod::ALL.iter().map(|&m| (m, affine)).collect(),
        calibration: Some(CalibrationRecord { file_sha256: "f".repeat(64), text_sha256: "f".repeat(64), tokens: u64::MAX, ctx: usize::MAX }),
    });
    let card_of = |p: &Provenance| {
        len(model_card(&CardInput {
            name: &name,
            base_model: base_model.as_deref(),
            license: license.as_deref(),
            source_label: &source.label,
            recipe,
            summary: &summary,
            source_size: source_size(config, source.layout),
            provenance: p,
            chat_template: has_chat_template(&source.dir),
        }))
    };
    let card = provenances.iter().map(card_of).max().unwrap_or(0);
    let mut files: Vec<(String, u64)> = layout.names.iter().cloned().zip(layout.sizes.iter().copied()).collect();
    files.push((mixq_loader::INDEX_FILE.to_string(), index));
    files.push(("config.json".to_string(), config_bytes));
    files.extend(copied.iter().map(|(n, &s)| (n.clone(), s)));
    files.push(("README.md".to_string(), card));
    files.sort();
    let entries: Vec<serde_json::Value> = files.iter().map(|(n, s)| file_entry(n, *s, &"0".repeat(64))).collect();
    let manifest = provenances
        .iter()
        .map(|p| len(manifest_text(&manifest_value(&source.label, source.layout, recipe, &summary, p, entries.clone()))))
        .max()
        .unwrap_or(0);
    OnDisk {
        shards: layout.sizes.iter().sum(),
        headers: layout.headers.iter().map(|h| h.len() as u64).sum(),
        shard_count: layout.names.len(),
        index,
        config: config_bytes,
        copied,
        copied_known: source.checkpoint,
        card,
        manifest,
    }
}
