//! The "Validation" section of a model card.

use std::path::Path;

use crate::stats::Summary;
use crate::ValidateError;

/// What was measured and on what, for the card.
pub struct CardContext<'a> {
    /// The text file's name.
    pub text_name: &'a str,
    /// sha256 of the text file.
    pub text_sha256: &'a str,
    /// Window length and stride.
    pub ctx: usize,
    /// Stride.
    pub stride: usize,
    /// The reference, as given.
    pub reference: Option<&'a str>,
}

/// Markdown of the validation section.
pub fn section(s: &Summary, ctx: &CardContext<'_>) -> String {
    let mut md = format!(
        "## Validation\n\nMeasured by mixq {} on `{}` (sha256 `{}`), {} scored tokens, windows of {} tokens advancing by {}.\n\n| metric | value |\n|---|---|\n| perplexity | {:.4} ± {:.4} |\n",
        crate::VERSION, ctx.text_name, ctx.text_sha256, s.tokens, ctx.ctx, ctx.stride, s.ppl, s.ppl_se
    );
    if let Some(c) = &s.comparison {
        md.push_str(&format!(
            "| reference | `{}` |\n| reference perplexity | {:.4} ± {:.4} |\n| PPL ratio | {:.5} ± {:.5} |\n| KL mean | {:.6} ± {:.6} |\n| KL median / p99 / max | {:.6} / {:.6} / {:.6} |\n| same top token | {:.2}% |\n| Δp(correct) mean / RMS | {:+.5} / {:.5} |\n",
            ctx.reference.unwrap_or("-"), c.ref_ppl, c.ref_ppl_se, c.ppl_ratio, c.ppl_ratio_se, c.kl_mean, c.kl_se,
            c.kl_median, c.kl_p99, c.kl_max, 100.0 * c.top1, c.dp_mean, c.dp_rms
        ));
    }
    md
}

/// Adds a section to a model card and refreshes the card's entry in its folder's
/// `mixq-manifest.json` (so `mixq verify` still passes); returns the manifest's path, if any.
pub fn write_card_section(card: &Path, section_md: &str) -> Result<Option<std::path::PathBuf>, ValidateError> {
    update_card(card, section_md)?;
    Ok(mixq_quantizer::writer::manifest::refresh_entry(card)?)
}

/// One `mixq run --bench` measurement for the card.
pub struct BenchRow {
    /// The backend and device.
    pub device: String,
    /// Prompt tokens and prefill tokens per second.
    pub prefill: (usize, f64),
    /// Generated tokens and decode tokens per second.
    pub decode: (usize, f64),
    /// Weight bytes read per second while decoding.
    pub weight_bytes_per_second: f64,
    /// Peak resident memory of the process, when known.
    pub peak_rss: Option<u64>,
    /// GPU memory held (0 on the CPU).
    pub gpu_memory: u64,
}

/// Markdown of the "Speed and memory" section.
pub fn bench_section(r: &BenchRow) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    format!(
        "## Speed and memory\n\nMeasured by `mixq run --bench` (mixq {}).\n\n| backend | prompt tokens | prefill tok/s | generated tokens | decode tok/s | weights read | peak memory | GPU memory |\n|---|---|---|---|---|---|---|---|\n| {} | {} | {:.1} | {} | {:.1} | {:.2} GB/s | {} | {} |\n",
        crate::VERSION,
        r.device,
        r.prefill.0,
        r.prefill.1,
        r.decode.0,
        r.decode.1,
        r.weight_bytes_per_second / 1e9,
        r.peak_rss.map(mib).unwrap_or_else(|| "unknown".into()),
        if r.gpu_memory > 0 { mib(r.gpu_memory) } else { "-".into() }
    )
}

/// Adds the section to a model card (a new file when there is none), replacing an earlier
/// section of the same heading (its first line) up to the next second-level heading; the card
/// is replaced atomically.
pub fn update_card(path: &Path, section_md: &str) -> Result<(), ValidateError> {
    let text = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        r => r.map_err(|e| ValidateError::Io(path.to_path_buf(), e))?,
    };
    let heading = format!("\n{}\n", section_md.lines().next().unwrap_or("## Validation"));
    let out = match text.find(&heading) {
        Some(start) => {
            let after = &text[start + 1..];
            let end = after[3..].find("\n## ").map(|i| start + 1 + 3 + i + 1).unwrap_or(text.len());
            format!("{}\n{}{}", &text[..start], section_md, if end < text.len() { format!("\n{}", &text[end..]) } else { String::new() })
        }
        None if text.trim().is_empty() => section_md.to_string(),
        None => format!("{}\n\n{}", text.trim_end(), section_md),
    };
    mixq_quantizer::writer::manifest::replace_file(path, out.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_is_added_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("README.md");
        std::fs::write(&p, "# m\n\nintro\n\n## Use with mlx\n\ncode\n").unwrap();
        update_card(&p, "## Validation\n\nfirst\n").unwrap();
        update_card(&p, "## Validation\n\nsecond\n").unwrap();
        let t = std::fs::read_to_string(&p).unwrap();
        assert_eq!(t.matches("## Validation").count(), 1, "{t}");
        assert!(t.contains("second") && !t.contains("first") && t.contains("## Use with mlx"), "{t}");
        std::fs::write(&p, "# m\n\n## Validation\n\nold\n\n## Use\n\nx\n").unwrap();
        update_card(&p, "## Validation\n\nnew\n").unwrap();
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains("new") && !t.contains("old") && t.contains("## Use\n\nx"), "{t}");
        // Another heading is its own section, replaced the same way.
        update_card(&p, "## Speed and memory\n\nfast\n").unwrap();
        update_card(&p, "## Speed and memory\n\nfaster\n").unwrap();
        let t = std::fs::read_to_string(&p).unwrap();
        assert_eq!(t.matches("## Speed and memory").count(), 1, "{t}");
        assert!(t.contains("faster") && t.contains("## Validation\n\nnew"), "{t}");
    }
}
