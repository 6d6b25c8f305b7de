//! Calibration statistics: per-input-channel mean of x² for every linear input a recipe can
//! quantize, and optionally the inputs' second-moment matrices (Hessians), recorded by
//! `mixq calibrate` and read by `mixq convert --calibration`.
//!
//! Stored as safetensors (all F32): `{module}.input_sq_mean` is `[in]` for a dense linear and
//! `[experts, in]` for an expert projection (each expert's mean over the tokens routed to it), and
//! `model.layers.N.mlp.experts.token_count` is `[experts]`. With Hessians (`mixq calibrate
//! --hessian`), `{site}.hessian` is the mean of x xᵀ over the rows at an input site (see
//! [`InputSite::name`]), its upper triangle packed row by row into `[n (n + 1) / 2]` (none for the
//! experts' down input, whose space is each expert's own); `{site}.expert_hessian` is `[experts,
//! n (n + 1) / 2]`, one per expert over the tokens routed to it (`--expert-hessians`). Hessians are read
//! from the file when asked for, one at a time, so a converter holds one. The metadata names the
//! format, the model (architecture and weights fingerprints), the text's sha256 and the token
//! count.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::config::GptOssConfig;
use crate::dtype::{Dtype, FloatDtype};
use crate::error::{LoaderError, Result};
use crate::schema::InputSite;
use crate::shard::{encode_header, ShardFile};

/// Value of the `format` metadata key of a file without Hessians.
pub const CALIBRATION_FORMAT: &str = "mixq-calibration/1";
/// Value of the `format` metadata key of a file with Hessians.
pub const CALIBRATION_FORMAT_HESSIAN: &str = "mixq-calibration/2";
/// Tensor-name suffix of a module's per-channel mean of x².
pub const INPUT_SQ_MEAN: &str = "input_sq_mean";
/// Tensor-name suffix of a layer's per-expert routed-token count.
pub const TOKEN_COUNT: &str = "token_count";
/// Tensor-name suffix of an input site's Hessian (all its rows).
pub const HESSIAN: &str = "hessian";
/// Tensor-name suffix of an input site's per-expert Hessians.
pub const EXPERT_HESSIAN: &str = "expert_hessian";

/// Elements of the packed upper triangle of an `n x n` symmetric matrix.
pub fn packed_len(n: usize) -> usize {
    n * (n + 1) / 2
}

/// Where a Hessian is: in memory (just measured) or in the statistics file (read on demand).
#[derive(Debug, Clone, PartialEq)]
pub enum HessianEntry {
    /// Measured in this process.
    Loaded(StatTensor),
    /// In the file the statistics were read from, with this shape.
    InFile(Vec<usize>),
}

/// Config fields that define the architecture; their canonical JSON is hashed.
const ARCHITECTURE_KEYS: &[&str] = &[
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_local_experts",
    "num_experts_per_tok",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "sliding_window",
    "layer_types",
    "rope_theta",
    "rope_scaling",
    "swiglu_limit",
    "rms_norm_eps",
];

/// Which model a statistics file belongs to, stable across its conversions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFingerprint {
    /// sha256 of the architecture fields of config.json (canonical JSON).
    pub config_sha256: String,
    /// sha256 of every RMSNorm weight as BF16 (how the upstream checkpoint and every conversion
    /// store them; other float types are rounded to BF16 first).
    pub weights_sha256: String,
}

impl ModelFingerprint {
    /// The fingerprint of an open checkpoint (upstream or converted).
    pub fn of(ckpt: &Checkpoint) -> Result<Self> {
        let c = ckpt.config();
        let config_sha256 = Self::architecture_sha256(c);
        let mut h = Sha256::new();
        let mut names = vec!["model.norm.weight".to_string()];
        for l in 0..c.num_hidden_layers {
            names.push(format!("model.layers.{l}.input_layernorm.weight"));
            names.push(format!("model.layers.{l}.post_attention_layernorm.weight"));
        }
        let mut values = vec![0f32; c.hidden_size];
        for name in names {
            let t = ckpt.tensor(&name)?;
            let dtype = t.expect_float(&[c.hidden_size])?;
            if dtype == FloatDtype::BF16 {
                h.update(t.data);
            } else {
                // F16/F32 checkpoints (as mlx-lm may write them) hash their values rounded to
                // BF16, so a model's F32 copy has the fingerprint of its BF16 original.
                crate::decode::floats_to_f32(dtype, t.data, &mut values);
                h.update(values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect::<Vec<u8>>());
            }
        }
        Ok(ModelFingerprint { config_sha256, weights_sha256: format!("{:x}", h.finalize()) })
    }
}

impl ModelFingerprint {
    /// sha256 of the architecture fields of a config (canonical JSON).
    pub fn architecture_sha256(c: &GptOssConfig) -> String {
        let arch: BTreeMap<&str, &serde_json::Value> =
            ARCHITECTURE_KEYS.iter().filter_map(|k| c.raw.get(*k).map(|v| (*k, v))).collect();
        format!("{:x}", Sha256::digest(serde_json::to_vec(&arch).expect("JSON values always serialize")))
    }
}

/// One statistics tensor: shape and f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct StatTensor {
    /// `[in]`, `[experts, in]` or `[experts]`.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// The contents of a calibration statistics file.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// The model the statistics were measured on.
    pub model: ModelFingerprint,
    /// How the model was named when calibrating (folder or repo id).
    pub model_label: String,
    /// sha256 of the calibration text file.
    pub text_sha256: String,
    /// Tokens the model was run over.
    pub tokens: u64,
    /// Window length used.
    pub ctx: usize,
    /// Per-channel statistics and token counts by name.
    pub tensors: BTreeMap<String, StatTensor>,
    /// Hessians by name (`{site}.hessian`, `{site}.expert_hessian`).
    pub hessians: BTreeMap<String, HessianEntry>,
    /// The file the statistics were read from, where `InFile` Hessians are.
    pub file: Option<std::path::PathBuf>,
}

impl Calibration {
    /// The per-channel mean of x² at `module`'s input, if recorded.
    pub fn input_sq_mean(&self, module: &str) -> Option<&StatTensor> {
        self.tensors.get(&format!("{module}.{INPUT_SQ_MEAN}"))
    }

    /// Tokens routed to each expert of layer `layer`, if recorded.
    pub fn expert_tokens(&self, layer: usize) -> Option<&[f32]> {
        self.tensors.get(&format!("model.layers.{layer}.mlp.experts.{TOKEN_COUNT}")).map(|t| t.data.as_slice())
    }

    /// Whether the file holds any Hessian.
    pub fn has_hessians(&self) -> bool {
        !self.hessians.is_empty()
    }

    /// The Hessian of every row at `site` (packed upper triangle, `[n (n + 1) / 2]`), if recorded;
    /// read from the file and checked (finite, non-negative diagonal) when it is not in memory.
    pub fn site_hessian(&self, site: InputSite) -> Result<Option<StatTensor>> {
        self.hessian(&format!("{}.{HESSIAN}", site.name()))
    }

    /// The per-expert Hessians at `site` (`[experts, n (n + 1) / 2]`), if recorded.
    pub fn expert_hessians(&self, site: InputSite) -> Result<Option<StatTensor>> {
        self.hessian(&format!("{}.{EXPERT_HESSIAN}", site.name()))
    }

    fn hessian(&self, name: &str) -> Result<Option<StatTensor>> {
        let Some(entry) = self.hessians.get(name) else { return Ok(None) };
        let t = match entry {
            HessianEntry::Loaded(t) => return Ok(Some(t.clone())),
            HessianEntry::InFile(_) => {
                let path = self.file.as_deref().ok_or_else(|| LoaderError::tensor(name, "is listed but no statistics file is open"))?;
                let shard = ShardFile::open(path)?;
                let info = shard.tensors().get(name).ok_or_else(|| LoaderError::tensor(name, "is no longer in the statistics file"))?;
                let t = StatTensor { shape: info.shape.clone(), data: f32_values(shard.bytes(info)) };
                shard.release(shard.bytes(info));
                check_hessian(path, name, &t)?;
                t
            }
        };
        Ok(Some(t))
    }

    /// Refuses statistics measured on another model, naming both fingerprints.
    pub fn check_model(&self, path: &Path, model: &ModelFingerprint) -> Result<()> {
        let bad = |what: &str, file: &str, here: &str| LoaderError::Shard {
            path: path.to_path_buf(),
            message: format!(
                "calibration statistics are for another model: {what} {file} in the file, {here} for this model; run mixq calibrate on this model"
            ),
        };
        if self.model.config_sha256 != model.config_sha256 {
            return Err(bad("architecture sha256", &self.model.config_sha256, &model.config_sha256));
        }
        if self.model.weights_sha256 != model.weights_sha256 {
            return Err(bad("weights sha256", &self.model.weights_sha256, &model.weights_sha256));
        }
        Ok(())
    }

    /// Writes the file (to a temporary sibling, renamed into place when complete).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tokens = self.tokens.to_string();
        let ctx = self.ctx.to_string();
        let hessians: Vec<(&String, StatTensor)> = self
            .hessians
            .keys()
            .map(|n| Ok((n, self.hessian(n)?.ok_or_else(|| LoaderError::tensor(n, "vanished"))?)))
            .collect::<Result<_>>()?;
        let meta = [
            ("format", if hessians.is_empty() { CALIBRATION_FORMAT } else { CALIBRATION_FORMAT_HESSIAN }),
            ("config_sha256", self.model.config_sha256.as_str()),
            ("weights_sha256", self.model.weights_sha256.as_str()),
            ("model", self.model_label.as_str()),
            ("text_sha256", self.text_sha256.as_str()),
            ("tokens", tokens.as_str()),
            ("ctx", ctx.as_str()),
        ];
        let all: Vec<(&String, &StatTensor)> = self.tensors.iter().chain(hessians.iter().map(|(n, t)| (*n, t))).collect();
        let entries: Vec<(&str, Dtype, &[usize])> = all.iter().map(|(n, t)| (n.as_str(), Dtype::F32, t.shape.as_slice())).collect();
        let (header, _) = encode_header(&meta, &entries);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "stats".into());
        let tmp = path.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            out.write_all(&header)?;
            for (_, t) in &all {
                for v in &t.data {
                    out.write_all(&v.to_le_bytes())?;
                }
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(LoaderError::io(&tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            LoaderError::io(path, e)
        })
    }

    /// Reads and validates a statistics file: format, metadata, F32 tensors of known kinds,
    /// finite non-negative values.
    pub fn read(path: &Path) -> Result<Self> {
        let shard = ShardFile::open(path)?;
        let bad = |message: String| LoaderError::Shard { path: path.to_path_buf(), message };
        let meta = shard.metadata();
        let get = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("metadata `{k}` is missing; not a mixq calibration file")));
        let format = get("format")?;
        if format != CALIBRATION_FORMAT && format != CALIBRATION_FORMAT_HESSIAN {
            return Err(bad(format!(
                "format is \"{format}\", expected \"{CALIBRATION_FORMAT}\" or \"{CALIBRATION_FORMAT_HESSIAN}\": not a mixq calibration file (mixq calibrate writes them)"
            )));
        }
        let number = |k: &str| -> Result<u64> {
            let v = get(k)?;
            v.parse().map_err(|_| bad(format!("metadata `{k}` is \"{v}\", expected a non-negative integer")))
        };
        let mut tensors = BTreeMap::new();
        let mut hessians = BTreeMap::new();
        for (name, info) in shard.tensors() {
            if info.dtype != Dtype::F32 {
                return Err(bad(format!("tensor {name}: dtype {}, expected F32", info.dtype)));
            }
            let hessian_rank = if name.ends_with(&format!(".{HESSIAN}")) {
                Some(1)
            } else if name.ends_with(&format!(".{EXPERT_HESSIAN}")) {
                Some(2)
            } else {
                None
            };
            if let Some(rank) = hessian_rank {
                if info.shape.len() != rank {
                    return Err(bad(format!("tensor {name}: shape {:?} has the wrong rank (expected {rank})", info.shape)));
                }
                hessians.insert(name.clone(), HessianEntry::InFile(info.shape.clone()));
                continue;
            }
            let rank_ok = if name.ends_with(&format!(".{INPUT_SQ_MEAN}")) {
                matches!(info.shape.len(), 1 | 2)
            } else if name.ends_with(&format!(".{TOKEN_COUNT}")) {
                info.shape.len() == 1
            } else {
                return Err(bad(format!(
                    "tensor {name}: not a statistics tensor (*.{INPUT_SQ_MEAN}, *.{TOKEN_COUNT}, *.{HESSIAN} or *.{EXPERT_HESSIAN})"
                )));
            };
            if !rank_ok {
                return Err(bad(format!("tensor {name}: shape {:?} has the wrong rank", info.shape)));
            }
            let data = f32_values(shard.bytes(info));
            if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
                return Err(bad(format!("tensor {name}: element {i} is {v}; statistics are finite and non-negative")));
            }
            tensors.insert(name.clone(), StatTensor { shape: info.shape.clone(), data });
        }
        Ok(Calibration {
            model: ModelFingerprint { config_sha256: get("config_sha256")?, weights_sha256: get("weights_sha256")? },
            model_label: meta.get("model").cloned().unwrap_or_default(),
            text_sha256: get("text_sha256")?,
            tokens: number("tokens")?,
            ctx: number("ctx")? as usize,
            tensors,
            hessians,
            file: Some(path.to_path_buf()),
        })
    }
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Checks a Hessian read from `path`: every element finite, every diagonal element non-negative.
fn check_hessian(path: &Path, name: &str, t: &StatTensor) -> Result<()> {
    let bad = |message: String| LoaderError::Shard { path: path.to_path_buf(), message: format!("tensor {name}: {message}") };
    let packed = *t.shape.last().unwrap_or(&0);
    let n = ((((8 * packed + 1) as f64).sqrt() as usize).saturating_sub(1)) / 2;
    if packed_len(n) != packed {
        return Err(bad(format!("{packed} elements is not the packed upper triangle of a square matrix")));
    }
    if let Some((i, v)) = t.data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(bad(format!("element {i} is {v}; a Hessian is finite")));
    }
    for (m, h) in t.data.chunks_exact(packed.max(1)).enumerate() {
        let mut k = 0;
        for i in 0..n {
            if h[k] < 0.0 {
                return Err(bad(format!("matrix {m}: diagonal element {i} is {}; a Hessian's diagonal is non-negative", h[k])));
            }
            k += n - i;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Calibration {
        let mut tensors = BTreeMap::new();
        tensors.insert("lm_head.input_sq_mean".into(), StatTensor { shape: vec![4], data: vec![1.0, 0.5, 0.0, 2.0] });
        tensors.insert(
            "model.layers.0.mlp.experts.token_count".into(),
            StatTensor { shape: vec![2], data: vec![3.0, 0.0] },
        );
        Calibration {
            model: ModelFingerprint { config_sha256: "a".into(), weights_sha256: "b".into() },
            model_label: "m".into(),
            text_sha256: "c".into(),
            tokens: 12,
            ctx: 8,
            tensors,
            hessians: BTreeMap::new(),
            file: None,
        }
    }

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        let c = sample();
        c.write(&p).unwrap();
        let back = Calibration::read(&p).unwrap();
        assert_eq!(back, Calibration { file: Some(p.clone()), ..c.clone() });
        assert_eq!(c.expert_tokens(0), Some(&[3.0, 0.0][..]));
        assert_eq!(c.input_sq_mean("lm_head").unwrap().data[3], 2.0);
    }

    #[test]
    fn hessians_round_trip_read_on_demand_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        let mut c = sample();
        // [[4, 1], [1, 9]] packed: 4, 1, 9.
        let h = StatTensor { shape: vec![3], data: vec![4.0, 1.0, 9.0] };
        c.hessians.insert(format!("{}.{HESSIAN}", InputSite::Final.name()), HessianEntry::Loaded(h.clone()));
        c.write(&p).unwrap();
        let back = Calibration::read(&p).unwrap();
        assert!(back.has_hessians());
        assert_eq!(back.hessians.values().next(), Some(&HessianEntry::InFile(vec![3])));
        assert_eq!(back.site_hessian(InputSite::Final).unwrap(), Some(h));
        assert_eq!(back.site_hessian(InputSite::Mlp(0)).unwrap(), None);
        // A negative diagonal element is refused when the Hessian is read, naming it.
        let bad = StatTensor { shape: vec![3], data: vec![4.0, 1.0, -9.0] };
        c.hessians.insert(format!("{}.{HESSIAN}", InputSite::Final.name()), HessianEntry::Loaded(bad));
        c.write(&p).unwrap();
        let e = Calibration::read(&p).unwrap().site_hessian(InputSite::Final).unwrap_err().to_string();
        assert!(e.contains("lm_head.input.hessian") && e.contains("diagonal element 1"), "{e}");
        // A length that is no packed triangle.
        let odd = StatTensor { shape: vec![4], data: vec![1.0; 4] };
        c.hessians.insert(format!("{}.{HESSIAN}", InputSite::Final.name()), HessianEntry::Loaded(odd));
        c.write(&p).unwrap();
        let e = Calibration::read(&p).unwrap().site_hessian(InputSite::Final).unwrap_err().to_string();
        assert!(e.contains("not the packed upper triangle"), "{e}");
    }

    #[test]
    fn rejects_negative_values_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        let mut c = sample();
        c.tensors.get_mut("lm_head.input_sq_mean").unwrap().data[1] = -1.0;
        c.write(&p).unwrap();
        let e = Calibration::read(&p).unwrap_err().to_string();
        assert!(e.contains("lm_head.input_sq_mean") && e.contains("element 1"), "{e}");
        let (bytes, _) = encode_header(&[("format", "mlx")], &[]);
        std::fs::write(&p, bytes).unwrap();
        let e = Calibration::read(&p).unwrap_err().to_string();
        assert!(e.contains("format is \"mlx\""), "{e}");
    }

    #[test]
    fn another_model_is_refused() {
        let c = sample();
        let other = ModelFingerprint { config_sha256: "a".into(), weights_sha256: "x".into() };
        let e = c.check_model(Path::new("s"), &other).unwrap_err().to_string();
        assert!(e.contains("another model") && e.contains("weights"), "{e}");
        assert!(c.check_model(Path::new("s"), &c.model).is_ok());
    }
}
