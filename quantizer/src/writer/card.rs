//! The model card (README.md) written beside a converted checkpoint.

use crate::sizes::{gb, gib};
use crate::recipe::plan::PlanSummary;
use crate::writer::provenance::Provenance;
use crate::recipe::language::Recipe;

/// A Hugging Face model card: front matter for the hub, the bit table, and how to load it.
pub fn model_card(name: &str, base_model: &str, recipe: &Recipe, s: &PlanSummary, provenance: &Provenance) -> String {
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
    format!(
        "---\nlibrary_name: mlx\nbase_model: {base_model}\ntags:\n- mlx\n- gpt_oss\n- mixq\n- quantized\npipeline_tag: text-generation\n---\n\n\
# {name}\n\n\
This model was converted to MLX format from `{base_model}` by mixq {version} with the recipe \
`{recipe_name}`: {description}\n\n\
## Quantization\n\n{table}\n\
**{bpw:.3} bits per weight**, {bytes} bytes ({gib:.2} GiB, {gb:.2} GB) over {params} parameters \
(counted as mlx-lm counts them).\n\n{method}\n\n\
## Use with mlx\n\n```bash\npip install mlx-lm\n```\n\n```python\nfrom mlx_lm import load, generate\n\n\
model, tokenizer = load(\"{name}\")\nprint(generate(model, tokenizer, prompt=\"hello\", verbose=True))\n```\n",
        version = env!("CARGO_PKG_VERSION"),
        recipe_name = recipe.name,
        description = recipe.description,
        bpw = s.bits_per_weight(),
        bytes = s.bytes,
        gib = gib(s.bytes),
        gb = gb(s.bytes),
        params = s.params,
        method = provenance.card_text(),
    )
}
