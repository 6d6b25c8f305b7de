//! The model card (README.md) written beside a converted checkpoint: hub front matter (never a
//! local path as `base_model`), a title and description from the model and the recipe, the size
//! against the source, the bit table, how to use it (with the chat template where the model has
//! one) and the command that reproduces it.

use std::path::Path;

use crate::kernels::method::QuantMethod;
use crate::recipe::language::Recipe;
use crate::recipe::plan::{PlanSummary, SourceSize};
use crate::sizes::{gb, gib};
use crate::writer::provenance::Provenance;

/// What the card says about one conversion.
pub struct CardInput<'a> {
    /// The output folder's name.
    pub name: &'a str,
    /// The hub repo the model derives from (`base_model`), when known.
    pub base_model: Option<&'a str>,
    /// The licence id (`license`), when known.
    pub license: Option<&'a str>,
    /// The source as given to `convert --source`.
    pub source_label: &'a str,
    /// The recipe.
    pub recipe: &'a Recipe,
    /// The conversion's sizes.
    pub summary: &'a PlanSummary,
    /// The source's layout, bytes and parameters.
    pub source_size: SourceSize,
    /// Quantizers and calibration.
    pub provenance: &'a Provenance,
    /// Whether the model ships a chat template.
    pub chat_template: bool,
}

/// The `base_model` for a source: `explicit` when given, else the source itself when it is a hub
/// repo id (not an existing local path). A local path is never a base model.
pub fn base_model_of(explicit: Option<&str>, source_label: &str) -> Option<String> {
    explicit.map(str::to_string).or_else(|| {
        (mixq_loader::source::looks_like_repo_id(source_label) && !Path::new(source_label).exists()).then(|| source_label.to_string())
    })
}

/// The `license` in the front matter of the model card in `dir`, if it names one.
pub fn license_of_card(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(mixq_loader::source::SOURCE_CARD)).ok()?;
    let front = text.strip_prefix("---\n")?.split("\n---").next()?;
    front.lines().find_map(|l| l.strip_prefix("license:")).map(|v| v.trim().trim_matches('"').to_string()).filter(|v| !v.is_empty())
}

/// Whether a model folder carries a chat template (its own file or in tokenizer_config.json).
pub fn has_chat_template(dir: &Path) -> bool {
    dir.join("chat_template.jinja").is_file()
        || std::fs::read_to_string(dir.join("tokenizer_config.json")).is_ok_and(|t| t.contains("\"chat_template\""))
}

fn front_matter(c: &CardInput<'_>) -> String {
    let mut f = String::from("---\nlibrary_name: mlx\n");
    if let Some(l) = c.license {
        f.push_str(&format!("license: {l}\n"));
    }
    if let Some(b) = c.base_model {
        f.push_str(&format!("base_model: {b}\nbase_model_relation: quantized\n"));
    }
    f.push_str("tags:\n- mlx\n- gpt_oss\n- mixq\n- quantized\npipeline_tag: text-generation\n---\n\n");
    f
}

/// The model's short name: the base model's, else the source folder's.
fn model_name<'a>(c: &'a CardInput<'a>) -> &'a str {
    let from = c.base_model.unwrap_or(c.source_label);
    from.trim_end_matches('/').rsplit('/').next().filter(|s| !s.is_empty()).unwrap_or(c.name)
}

fn bit_table(s: &PlanSummary) -> String {
    let mut table = String::from("| bits | group size | parameters | % | bytes | covers |\n|---|---|---|---|---|---|\n");
    for r in &s.rows {
        table.push_str(&format!(
            "| {} | {} | {} | {:.2}% | {} | {} |\n",
            r.bits_label(),
            r.group_label(),
            r.params,
            100.0 * r.params as f64 / s.params as f64,
            r.bytes,
            r.covers(s.num_layers)
        ));
    }
    table
}

fn usage(c: &CardInput<'_>) -> String {
    let load = format!("model, tokenizer = load(\"{}\")\n", c.name);
    let python = if c.chat_template {
        format!(
            "from mlx_lm import load, generate\n\n{load}messages = [{{\"role\": \"user\", \"content\": \"Hello\"}}]\n\
             prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)\n\
             print(generate(model, tokenizer, prompt=prompt, verbose=True))\n"
        )
    } else {
        format!("from mlx_lm import load, generate\n\n{load}print(generate(model, tokenizer, prompt=\"hello\", verbose=True))\n")
    };
    let chat = if c.chat_template { " --chat" } else { "" };
    format!(
        "## Use with mlx\n\n```bash\npip install mlx-lm\n```\n\n```python\n{python}```\n\nOr with mixq:\n\n\
         ```bash\nmixq run --model {}{chat} --prompt \"Hello\"\n```\n",
        c.name
    )
}

fn reproduce(c: &CardInput<'_>) -> String {
    let builtin = c.recipe.origin == format!("recipes/{}.yaml", c.recipe.name);
    let recipe = if builtin { c.recipe.name.clone() } else { format!("{}.yaml", c.recipe.name) };
    let quantizer = c.provenance.default;
    let mut cmd = format!("mixq convert --source {} --recipe {recipe} --quantizer {quantizer}", c.base_model.unwrap_or(c.source_label));
    let mut notes = Vec::new();
    if !builtin {
        notes.push(format!("`{recipe}` is the recipe text recorded in `mixq-manifest.json` (`recipe.text`)"));
    }
    if let Some(cal) = &c.provenance.calibration {
        let hessian = if quantizer == QuantMethod::Gptq { " --hessian" } else { "" };
        cmd.push_str(" --calibration stats.safetensors");
        notes.push(format!(
            "`stats.safetensors` is `mixq calibrate{hessian} --ctx {}` over {} tokens of a text with sha256 `{}` (statistics sha256 `{}`)",
            cal.ctx, cal.tokens, cal.text_sha256, cal.file_sha256
        ));
    }
    let notes = if notes.is_empty() { String::new() } else { format!("\n{}.\n", notes.join("; ")) };
    format!("## Reproduce\n\nWith mixq {}:\n\n```bash\n{cmd} --out {}\n```\n{notes}", env!("CARGO_PKG_VERSION"), c.name)
}

/// A Hugging Face model card: front matter for the hub, title and description, size against the
/// source, the bit table, usage and the reproduce command.
pub fn model_card(c: &CardInput<'_>) -> String {
    let s = c.summary;
    let SourceSize { layout, bytes: src_bytes, params: src_params } = c.source_size;
    let from = match c.base_model {
        Some(b) => format!("[{b}](https://huggingface.co/{b})"),
        None => format!("`{}`", model_name(c)),
    };
    format!(
        "{front}# {model} MLX, {bpw:.2} bits per weight\n\n\
         {from} quantized to MLX by mixq {version} with the recipe `{recipe_name}`: {description}\n\n\
         **{src_gb:.2} GB → {gb:.2} GB** ({gib:.2} GiB), {src_bpw:.3} → {bpw:.3} bits per weight \
         (source: {layout}).\n\n\
         ## Quantization\n\n{table}\n\
         **{bpw:.3} bits per weight**, {bytes} bytes ({gib:.2} GiB, {gb:.2} GB) over {params} parameters \
         (counted as mlx-lm counts them).\n\n{method}\n\n{usage}\n{reproduce}",
        front = front_matter(c),
        model = model_name(c),
        version = env!("CARGO_PKG_VERSION"),
        recipe_name = c.recipe.name,
        description = c.recipe.description,
        layout = layout.describe(),
        src_gb = gb(src_bytes),
        src_bpw = mixq_loader::bits_per_weight(src_bytes, src_params),
        bpw = s.bits_per_weight(),
        bytes = s.bytes,
        gib = gib(s.bytes),
        gb = gb(s.bytes),
        params = s.params,
        table = bit_table(s),
        method = c.provenance.card_text(),
        usage = usage(c),
        reproduce = reproduce(c),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_model_is_a_repo_id_never_a_path() {
        assert_eq!(base_model_of(None, "openai/gpt-oss-120b").as_deref(), Some("openai/gpt-oss-120b"));
        assert_eq!(base_model_of(None, "/data/models/gpt-oss"), None);
        assert_eq!(base_model_of(Some("me/tuned"), "/data/x").as_deref(), Some("me/tuned"));
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("README.md"), "---\nlicense: apache-2.0\ntags:\n- x\n---\n# m\n").unwrap();
        assert_eq!(license_of_card(tmp.path()).as_deref(), Some("apache-2.0"));
        std::fs::write(tmp.path().join("README.md"), "# no front matter\nlicense: mit\n").unwrap();
        assert_eq!(license_of_card(tmp.path()), None);
    }
}
