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

/// Adds the section to a model card (a new file when there is none), replacing an earlier
/// "## Validation" section up to the next second-level heading; the card is replaced atomically.
pub fn update_card(path: &Path, section_md: &str) -> Result<(), ValidateError> {
    let text = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        r => r.map_err(|e| ValidateError::Io(path.to_path_buf(), e))?,
    };
    let out = match text.find("\n## Validation\n") {
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
    }
}
