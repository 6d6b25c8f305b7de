//! Saved reference logits: per scored token, the target, the reference's top-k logits and its
//! log-sum-exp, so a large reference model need not run again.

use std::io::{Read, Write};
use std::path::Path;

use serde_json::{json, Value};

use crate::ValidateError;

const MAGIC: &[u8; 8] = b"MIXQREF1";

/// The reference's view of one scored token.
#[derive(Debug, Clone, PartialEq)]
pub struct RefToken {
    /// The target token id.
    pub target: u32,
    /// log p_ref(target).
    pub target_logprob: f32,
    /// log-sum-exp of the reference logits.
    pub lse: f32,
    /// Ids of the k largest reference logits, largest first.
    pub top_ids: Vec<u32>,
    /// Those logits.
    pub top_logits: Vec<f32>,
}

impl RefToken {
    /// Summarises a full row of reference logits.
    pub fn from_logits(logits: &[f32], target: u32, k: usize) -> Self {
        let lse = log_sum_exp(logits);
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        idx.truncate(k);
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        RefToken {
            target,
            target_logprob: logits[target as usize] - lse,
            lse,
            top_logits: idx.iter().map(|&i| logits[i as usize]).collect(),
            top_ids: idx,
        }
    }
}

/// log Σ exp(x), computed stably in f64.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
    (m as f64 + s.ln()) as f32
}

/// What a saved reference was computed on, checked before it is reused.
#[derive(Debug, Clone, PartialEq)]
pub struct RefHeader {
    /// The reference model's folder as given.
    pub model: String,
    /// sha256 of the scored token stream's ids.
    pub tokens_sha256: String,
    /// Window length.
    pub ctx: usize,
    /// Window stride.
    pub stride: usize,
    /// Logits kept per token.
    pub top_k: usize,
    /// The reference's vocabulary size (absent in files from mixq before 0.1.1).
    pub vocab: Option<usize>,
}

/// Bytes of one token's record with `top_k` logits kept.
pub fn record_bytes(top_k: usize) -> u64 {
    12 + 8 * top_k as u64
}

/// Bytes of a saved reference of `count` tokens with `top_k` logits each (an upper bound on the
/// header: the model's path is at most `model_len` bytes).
pub fn file_bytes(count: usize, top_k: usize, model_len: usize) -> u64 {
    let header = 12 + 256 + model_len as u64;
    header + count as u64 * record_bytes(top_k)
}

/// Writes a saved reference.
pub fn write(path: &Path, header: &RefHeader, tokens: &[RefToken]) -> Result<(), ValidateError> {
    let io = |e| ValidateError::Io(path.to_path_buf(), e);
    let mut meta = json!({
        "model": header.model, "tokens_sha256": header.tokens_sha256, "ctx": header.ctx,
        "stride": header.stride, "top_k": header.top_k, "count": tokens.len(),
    });
    if let Some(v) = header.vocab {
        meta["vocab"] = json!(v);
    }
    let meta = meta.to_string();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(MAGIC).map_err(io)?;
    f.write_all(&(meta.len() as u32).to_le_bytes()).map_err(io)?;
    f.write_all(meta.as_bytes()).map_err(io)?;
    for t in tokens {
        f.write_all(&t.target.to_le_bytes()).map_err(io)?;
        f.write_all(&t.target_logprob.to_le_bytes()).map_err(io)?;
        f.write_all(&t.lse.to_le_bytes()).map_err(io)?;
        for k in 0..header.top_k {
            f.write_all(&t.top_ids.get(k).copied().unwrap_or(u32::MAX).to_le_bytes()).map_err(io)?;
            f.write_all(&t.top_logits.get(k).copied().unwrap_or(f32::NEG_INFINITY).to_le_bytes()).map_err(io)?;
        }
    }
    f.flush().map_err(io)
}

/// Reads a saved reference.
pub fn read(path: &Path) -> Result<(RefHeader, Vec<RefToken>), ValidateError> {
    let bad = |m: String| ValidateError::Reference(format!("{}: {m}", path.display()));
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| ValidateError::Io(path.to_path_buf(), e))?;
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(bad("not a mixq reference-logits file".into()));
    }
    let n = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let meta: Value = bytes
        .get(12..12 + n)
        .and_then(|m| serde_json::from_slice(m).ok())
        .ok_or_else(|| bad("header is truncated or not JSON".into()))?;
    let field = |k: &str| meta.get(k).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| bad(format!("header lacks `{k}`")));
    let header = RefHeader {
        model: meta.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
        tokens_sha256: meta.get("tokens_sha256").and_then(Value::as_str).unwrap_or_default().to_string(),
        ctx: field("ctx")?,
        stride: field("stride")?,
        top_k: field("top_k")?,
        vocab: meta.get("vocab").and_then(Value::as_u64).map(|v| v as usize),
    };
    let count = field("count")?;
    let body = &bytes[12 + n..];
    // `top_k` and `count` come from the file: check them against its length before trusting them.
    let rec = header.top_k.checked_mul(8).and_then(|b| b.checked_add(12)).ok_or_else(|| {
        bad(format!("header says `top_k` is {}, too large for a record size ({} bytes of records follow)", header.top_k, body.len()))
    })?;
    match count.checked_mul(rec) {
        Some(want) if want == body.len() => {}
        _ => {
            return Err(bad(format!(
                "header says {count} records of {rec} bytes (`count` {count}, `top_k` {}), but the file holds {} bytes of records (truncated?)",
                header.top_k,
                body.len()
            )))
        }
    }
    let f32_at = |b: &[u8], i: usize| f32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let tokens = body
        .chunks_exact(rec)
        .map(|r| {
            let mut top_ids = Vec::with_capacity(header.top_k);
            let mut top_logits = Vec::with_capacity(header.top_k);
            for k in 0..header.top_k {
                let id = u32_at(r, 12 + 8 * k);
                if id != u32::MAX {
                    top_ids.push(id);
                    top_logits.push(f32_at(r, 16 + 8 * k));
                }
            }
            RefToken { target: u32_at(r, 0), target_logprob: f32_at(r, 4), lse: f32_at(r, 8), top_ids, top_logits }
        })
        .collect();
    Ok((header, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.3).sin() * 4.0).collect();
        let t = RefToken::from_logits(&logits, 7, 5);
        assert_eq!(t.top_ids.len(), 5);
        assert!(t.top_logits.windows(2).all(|w| w[0] >= w[1]));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.bin");
        let h = RefHeader { model: "m".into(), tokens_sha256: "x".into(), ctx: 8, stride: 8, top_k: 5, vocab: Some(50) };
        write(&p, &h, &[t.clone(), t.clone()]).unwrap();
        let (h2, ts) = read(&p).unwrap();
        assert_eq!(h2, h);
        assert_eq!(ts, vec![t.clone(), t]);
        std::fs::write(&p, b"MIXQREF1garbage").unwrap();
        assert!(read(&p).is_err());
    }

    /// A file with a hand-made header and `body` bytes of records.
    fn with_header(p: &Path, meta: Value, body: usize) {
        let meta = meta.to_string();
        let mut bytes = MAGIC.to_vec();
        bytes.extend((meta.len() as u32).to_le_bytes());
        bytes.extend(meta.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, body));
        std::fs::write(p, bytes).unwrap();
    }

    #[test]
    fn claimed_sizes_are_checked_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.bin");
        let meta = |top_k: u64, count: u64| json!({"model": "m", "tokens_sha256": "x", "ctx": 8, "stride": 8, "top_k": top_k, "count": count});
        // top_k * 8 overflows usize.
        with_header(&p, meta(u64::MAX / 4, 1), 28);
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("r.bin") && e.contains("`top_k` is 4611686018427387903, too large") && e.contains("28 bytes of records"), "{e}");
        // A huge top_k that the file cannot hold.
        with_header(&p, meta(1 << 40, 1), 28);
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("1 records of 8796093022220 bytes (`count` 1, `top_k` 1099511627776), but the file holds 28 bytes"), "{e}");
        // count * record overflows.
        with_header(&p, meta(2, u64::MAX / 2), 28);
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("r.bin") && e.contains("header says 9223372036854775807 records of 28 bytes") && e.contains("holds 28 bytes"), "{e}");
        // Too few bytes for the claimed count.
        with_header(&p, meta(2, 3), 56);
        assert!(read(&p).unwrap_err().to_string().contains("3 records of 28 bytes (`count` 3, `top_k` 2), but the file holds 56 bytes"));
        with_header(&p, meta(2, 2), 56);
        assert_eq!(read(&p).unwrap().1.len(), 2);
    }
}
