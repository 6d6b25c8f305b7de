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

/// One measured row of the card's "Speed and memory" table.
pub struct BenchRow {
    /// What was measured, starting with the command (`` `mixq run` decode ``).
    pub measured: String,
    /// The backend and device.
    pub device: String,
    /// Tokens processed.
    pub tokens: usize,
    /// Tokens per second.
    pub tokens_per_second: f64,
    /// Weight bytes read per second, where the measurement streams the weights once per token.
    pub weight_bytes_per_second: Option<f64>,
    /// Peak resident memory of the process, when known.
    pub peak_rss: Option<u64>,
    /// GPU memory held (0 on the CPU).
    pub gpu_memory: u64,
}

/// The first line of the "Speed and memory" section.
const BENCH_HEADING: &str = "## Speed and memory";

/// The table's header and rule.
const BENCH_TABLE_HEAD: &str =
    "| measured | backend | tokens | tokens/s | weights read | peak memory | GPU memory |\n|---|---|---|---|---|---|---|\n";

impl BenchRow {
    /// The row's markdown line.
    fn line(&self) -> String {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
        format!(
            "| {} | {} | {} | {:.1} | {} | {} | {} |",
            self.measured,
            self.device,
            self.tokens,
            self.tokens_per_second,
            self.weight_bytes_per_second.map(|b| format!("{:.2} GB/s", b / 1e9)).unwrap_or_else(|| "-".into()),
            self.peak_rss.map(mib).unwrap_or_else(|| "unknown".into()),
            if self.gpu_memory > 0 { mib(self.gpu_memory) } else { "-".into() }
        )
    }
}

/// Markdown of the "Speed and memory" section of `card_text` with `rows` measured by `command`
/// (`run`, `validate`): they replace that command's earlier rows; other commands' rows stay.
pub fn bench_section(card_text: &str, command: &str, rows: &[BenchRow]) -> String {
    let own = format!("| `mixq {command}`");
    let kept: Vec<&str> = card_text
        .split_once(&format!("{BENCH_HEADING}\n"))
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(""))
        .unwrap_or("")
        .lines()
        .filter(|l| l.starts_with("| `mixq ") && !l.starts_with(&own))
        .collect();
    let mut md = format!(
        "{BENCH_HEADING}\n\nMeasured by mixq {} with `--bench` (`mixq run` streams the weights once per generated token; `mixq validate` scores windows of text).\n\n{BENCH_TABLE_HEAD}",
        crate::VERSION
    );
    for line in kept.into_iter().map(str::to_string).chain(rows.iter().map(BenchRow::line)) {
        md.push_str(&line);
        md.push('\n');
    }
    md
}

/// Puts `rows` measured by `command` into the card's "Speed and memory" table (see
/// [`bench_section`]) and refreshes the card's manifest entry; returns the manifest's path, if any.
pub fn write_bench_rows(card: &Path, command: &str, rows: &[BenchRow]) -> Result<Option<std::path::PathBuf>, ValidateError> {
    write_card_section(card, &bench_section(&read_card(card)?, command, rows))
}

/// A card's text; empty when there is no card yet.
fn read_card(path: &Path) -> Result<String, ValidateError> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        r => r.map_err(|e| ValidateError::Io(path.to_path_buf(), e)),
    }
}

/// Adds the section to a model card (a new file when there is none), replacing an earlier
/// section of the same heading (its first line) up to the next second-level heading; the card
/// is replaced atomically.
pub fn update_card(path: &Path, section_md: &str) -> Result<(), ValidateError> {
    let text = read_card(path)?;
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

    fn row(measured: &str, tps: f64) -> BenchRow {
        BenchRow { measured: measured.into(), device: "cpu".into(), tokens: 8, tokens_per_second: tps, weight_bytes_per_second: None, peak_rss: Some(1 << 20), gpu_memory: 0 }
    }

    #[test]
    fn bench_rows_of_one_command_replace_only_their_own() {
        let run = bench_section("# m\n", "run", &[row("`mixq run` prefill", 1.0), row("`mixq run` decode", 2.0)]);
        let card = format!("# m\n\n{run}\n## Use\n\nx\n");
        let both = bench_section(&card, "validate", &[row("`mixq validate` (windows of 64)", 3.0)]);
        assert!(both.contains("| `mixq run` prefill | cpu | 8 | 1.0 |") && both.contains("| `mixq run` decode | cpu | 8 | 2.0 |"), "{both}");
        assert!(both.contains("| `mixq validate` (windows of 64) | cpu | 8 | 3.0 | - | 1.0 MiB | - |"), "{both}");
        assert!(!both.contains("## Use"), "the section ends at the next heading: {both}");
        let card = format!("# m\n\n{both}");
        let again = bench_section(&card, "run", &[row("`mixq run` decode", 5.0)]);
        assert_eq!(again.matches("| `mixq run`").count(), 1, "the earlier run rows are replaced: {again}");
        assert!(again.contains("| `mixq run` decode | cpu | 8 | 5.0 |") && again.contains("`mixq validate` (windows of 64)"), "{again}");
    }
}
