//! `mixq recipes`: the built-in recipes.

use std::process::ExitCode;

use anyhow::Result;
use mixq_quantizer::Recipe;

use crate::args::Json;
use crate::report::print_json;

/// Arguments of `mixq recipes`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  mixq recipes\n\nA flag's default is shown as [default: ...] or in its help.")]
pub struct RecipesArgs {
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq recipes`.
pub fn run(a: RecipesArgs) -> Result<ExitCode> {
    let all: Vec<Recipe> = mixq_quantizer::BUILTIN_RECIPES.iter().map(|(n, _)| Recipe::load(n)).collect::<Result<_, _>>()?;
    if a.json.json {
        print_json(&serde_json::json!(all
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "description": r.description, "rules": r.rules.len()}))
            .collect::<Vec<_>>()));
    } else {
        for r in all {
            println!("{}\n    {}\n", r.name, r.description);
        }
    }
    Ok(ExitCode::SUCCESS)
}
