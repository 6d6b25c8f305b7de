//! One memory-mapped safetensors file with a validated header.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::{LoaderError, Result};

/// Largest header mixq accepts (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Where one tensor lies in a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub begin: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A safetensors file, memory-mapped, whose header has been checked against its size.
#[derive(Debug)]
pub struct ShardFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl ShardFile {
    /// Opens and validates a safetensors file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| LoaderError::io(path, e))?;
        let len = file.metadata().map_err(|e| LoaderError::io(path, e))?.len();
        let bad = |message: String| LoaderError::Shard { path: path.to_path_buf(), message };
        if len < 8 {
            return Err(bad(format!("file is {len} bytes, too short for a safetensors header (truncated?)")));
        }
        // SAFETY: the map is read-only; mixq never writes to a file it has mapped,
        // and checkpoints are not expected to change while being read.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoaderError::io(path, e))?;
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&mmap[..8]);
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > len {
            return Err(bad(format!(
                "header length {header_len} runs past the end of the {len}-byte file (truncated or not safetensors)"
            )));
        }
        let data_start = 8 + header_len as usize;
        let header: Value = serde_json::from_slice(&mmap[8..data_start])
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let Value::Object(entries) = header else {
            return Err(bad("header is not a JSON object".into()));
        };
        let data_len = mmap.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                // `null` is no metadata, as the safetensors crate reads it (mx.save_safetensors
                // writes it when given none).
                let m = match entry {
                    Value::Object(m) => m,
                    Value::Null => continue,
                    _ => return Err(bad("__metadata__ must be an object of strings (or null)".into())),
                };
                for (k, v) in m {
                    let s = v.as_str().ok_or_else(|| bad(format!("__metadata__.{k} must be a string")))?;
                    metadata.insert(k, s.to_string());
                }
                continue;
            }
            let info = parse_entry(&entry).map_err(|m| bad(format!("tensor {name}: {m}")))?;
            if info.end > data_len {
                return Err(bad(format!(
                    "tensor {name}: data ends at byte {} but the data section holds only {data_len} bytes (truncated?)",
                    info.end
                )));
            }
            tensors.insert(name, info);
        }
        let mut spans: Vec<(&String, &TensorInfo)> = tensors.iter().filter(|(_, t)| t.end > t.begin).collect();
        spans.sort_by_key(|(_, t)| (t.begin, t.end));
        for pair in spans.windows(2) {
            let ((a, ta), (b, tb)) = (pair[0], pair[1]);
            if tb.begin < ta.end {
                return Err(bad(format!(
                    "tensors {a} (bytes {}..{}) and {b} (bytes {}..{}) overlap",
                    ta.begin, ta.end, tb.begin, tb.end
                )));
            }
        }
        Ok(ShardFile { path: path.to_path_buf(), mmap, data_start, tensors, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The header's `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Raw bytes of a tensor described by this shard's header.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_start + info.begin..self.data_start + info.end]
    }

    /// Drops this process's resident pages for a slice of the map once it has been consumed, so
    /// streaming through a large checkpoint keeps resident memory bounded. The data stays in the
    /// page cache and later reads fault it back in unchanged. Slices outside this map are ignored.
    pub fn release(&self, slice: &[u8]) {
        let base = self.mmap.as_ptr() as usize;
        let start = slice.as_ptr() as usize;
        if start < base || start + slice.len() > base + self.mmap.len() {
            return;
        }
        let page = 4096;
        let from = (start - base).div_ceil(page) * page;
        let to = (start - base + slice.len()) / page * page;
        if to > from {
            // SAFETY: the mapping is a read-only shared map of a file that mixq never writes, so
            // MADV_DONTNEED only drops page-table entries; any later read of the range refaults the
            // identical file contents. Only whole pages inside the slice are advised.
            #[cfg(unix)]
            let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from) };
        }
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }
}

/// Encodes a safetensors header for tensors laid out back to back in the given order: the 8-byte
/// length prefix and the JSON, padded with spaces to a multiple of 8. Returns it with each tensor's
/// offset within the data section.
pub fn encode_header(metadata: &[(&str, &str)], tensors: &[(&str, Dtype, &[usize])]) -> (Vec<u8>, Vec<usize>) {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, Value> =
            metadata.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut pos = 0usize;
    for (name, dtype, shape) in tensors {
        let n = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.as_str(), "shape": shape, "data_offsets": [pos, pos + n]}),
        );
        offsets.push(pos);
        pos += n;
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).expect("JSON values always serialize");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    (out, offsets)
}

fn parse_entry(entry: &Value) -> std::result::Result<TensorInfo, String> {
    let obj = entry.as_object().ok_or("entry is not an object")?;
    let dtype_name = obj.get("dtype").and_then(Value::as_str).ok_or("missing string `dtype`")?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| format!("unknown dtype \"{dtype_name}\""))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("missing list `shape`")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(|| format!("shape entry {d} is not a non-negative integer")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let offsets = obj.get("data_offsets").and_then(Value::as_array).ok_or("missing `data_offsets`")?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => (
            b.as_u64().ok_or("data_offsets must be integers")? as usize,
            e.as_u64().ok_or("data_offsets must be integers")? as usize,
        ),
        _ => return Err("data_offsets must hold two integers".into()),
    };
    if end < begin {
        return Err(format!("data_offsets [{begin}, {end}] end before they begin"));
    }
    let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or("shape overflows")?;
    let expected = numel.checked_mul(dtype.size()).ok_or("shape overflows")?;
    if end - begin != expected {
        return Err(format!(
            "shape {shape:?} of {dtype} needs {expected} bytes but data_offsets [{begin}, {end}] span {}",
            end - begin
        ));
    }
    Ok(TensorInfo { dtype, shape, begin, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-tensor safetensors file whose header's `__metadata__` is `meta` (JSON text).
    fn file_with_metadata(dir: &Path, meta: &str) -> std::path::PathBuf {
        let header = format!(r#"{{"__metadata__":{meta},"w":{{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[7, 9]);
        let path = dir.join("m.safetensors");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn null_metadata_is_no_metadata_and_other_kinds_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let shard = ShardFile::open(&file_with_metadata(dir.path(), "null")).expect("null metadata is accepted");
        assert!(shard.metadata().is_empty());
        let shard = ShardFile::open(&file_with_metadata(dir.path(), r#"{"format":"mlx"}"#)).unwrap();
        assert_eq!(shard.metadata().get("format").map(String::as_str), Some("mlx"));
        let e = ShardFile::open(&file_with_metadata(dir.path(), "5")).expect_err("a number is refused").to_string();
        assert!(e.contains("m.safetensors") && e.contains("__metadata__ must be an object of strings (or null)"), "{e}");
    }
}
