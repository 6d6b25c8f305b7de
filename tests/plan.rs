//! `mixq plan` reproduces the published figures of gpt-oss-120b from its config alone.

mod common;

use common::{mixq, text};
use serde_json::Value;

fn plan_json(source: &str, recipe: &str) -> Value {
    let out = mixq(&["plan", "--source", source, "--recipe", recipe, "--json"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_str(&stdout).expect("plan --json prints JSON")
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}/config.json", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn gpt_oss_120b_at_3_6_bits_is_3_557_bpw_and_48_gib() {
    let p = plan_json(&fixture("gpt-oss-120b"), "gpt-oss-120b-3.6bit");
    let total = &p["total"];
    assert_eq!(format!("{:.3}", total["bits_per_weight"].as_f64().unwrap()), "3.557");
    assert_eq!(total["gib"].as_f64().unwrap().floor(), 48.0, "the published card's \"48 GB\" is GiB");
    assert_eq!(total["bytes"].as_u64(), Some(51_949_344_384));
    assert_eq!(total["parameters"].as_u64(), Some(116_829_154_368));
    // The MXFP4 source is about 65 GB.
    let src = &p["source_checkpoint"];
    assert_eq!(src["gb"].as_f64().unwrap().round(), 65.0);
    let rows = p["rows"].as_array().unwrap();
    let bits: Vec<&str> = rows.iter().map(|r| r["bits"].as_str().unwrap()).collect();
    assert_eq!(bits, ["bf16", "6", "4", "3"]);
    assert_eq!(rows[2]["covers"].as_str().unwrap(), "q_proj, k_proj (layers 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28)");
    assert!(rows[3]["covers"].as_str().unwrap().starts_with("experts_gate, experts_up, experts_down (all layers)"));
}

#[test]
fn the_same_recipe_serves_20b_and_the_tiny_model() {
    let p = plan_json(&fixture("gpt-oss-20b"), "gpt-oss-120b-3.6bit");
    let four_bit = p["rows"].as_array().unwrap().iter().find(|r| r["bits"] == "4").unwrap();
    assert_eq!(four_bit["covers"], "q_proj, k_proj (layers 4, 6, 8, 10, 12, 14, 16, 18)");
    let tiny = format!("{}/models/tiny-gpt-oss-shakespeare", env!("CARGO_MANIFEST_DIR"));
    for recipe in ["gpt-oss-120b-3.6bit", "mixed_3_6", "mxfp4-experts"] {
        let p = plan_json(&tiny, recipe);
        assert!(p["total"]["bits_per_weight"].as_f64().unwrap() > 3.0, "{recipe}");
    }
    let p = plan_json(&tiny, "gpt-oss-120b-3.6bit");
    let four_bit = p["rows"].as_array().unwrap().iter().find(|r| r["bits"] == "4").unwrap();
    assert_eq!(four_bit["covers"], "q_proj, k_proj (layers 2, 4)");
}

#[test]
fn mxfp4_source_size_is_reported_in_the_table() {
    let out = mixq(&["plan", "--source", &fixture("gpt-oss-120b"), "--recipe", "gpt-oss-120b-3.6bit"], &[]);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("48.38 GiB, 3.557 bits per weight"), "{stdout}");
    assert!(stdout.contains("65.25 GB"), "{stdout}");
}
