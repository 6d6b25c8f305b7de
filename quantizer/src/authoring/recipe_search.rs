//! `mixq recipe search`: the bit allocation that minimises the summed predicted cost of all units
//! under a size budget, written as a readable YAML recipe, and the size/cost frontier.
//!
//! Each unit picks one setting (an affine bits × group size, mxfp4 for experts, or bf16 at cost 0). For a multiplier
//! λ every unit independently takes the setting minimising `cost + λ·bytes` (the Lagrangian
//! relaxation of the knapsack); λ is bisected to the smallest value whose total fits the budget,
//! and what the budget still allows is spent greedily on the upgrades with the most cost saved
//! per byte. Ties break by unit order, so the search is deterministic.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use mixq_loader::GptOssConfig;

use mixq_loader::schema::{mlx_params, TensorClass};
use crate::recipe::plan::{compress_ranges, Allocation};
use crate::recipe::language::Recipe;
use crate::authoring::sensitivity_file::{Sensitivity, UnitCost};
use crate::writer::on_disk::COUNTED_FILES;

/// Knobs of a search.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Smallest affine bit width allowed.
    pub min_bits: u32,
    /// Classes kept in bf16 (norm, bias and sinks always are).
    pub keep: Vec<TensorClass>,
    /// Affine settings only: no expert is kept in mxfp4.
    pub affine_only: bool,
}

/// One unit's choice: a setting index into its `settings`, or `None` for bf16.
pub type Choice = Option<usize>;

/// A searched allocation.
#[derive(Debug, Clone)]
pub struct Allotment {
    /// Per unit of the sensitivity file, its choice.
    pub choices: Vec<Choice>,
    /// Total bytes (units and fixed tensors).
    pub bytes: u64,
    /// Summed predicted cost.
    pub cost: f64,
}

/// A search that cannot meet its target.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The target is below the smallest allocation the options allow.
    #[error("target {target} bytes is below the smallest possible size, {minimum} bytes ({bpw:.3} bits per weight) with --min-bits {min_bits}")]
    TooSmall {
        /// The target.
        target: u64,
        /// The smallest size.
        minimum: u64,
        /// Its bits per weight.
        bpw: f64,
        /// The option.
        min_bits: u32,
    },
    /// The sensitivity file does not describe this model.
    #[error("the sensitivity file does not fit this model: {0}")]
    Mismatch(String),
}

/// The search problem: units with their allowed choices and the bytes no choice changes.
pub struct Problem<'s> {
    units: Vec<&'s UnitCost>,
    allowed: Vec<Vec<Choice>>,
    fixed_bytes: u64,
    min_bits: u32,
    /// Parameters as mlx-lm counts them.
    pub params: u64,
}

impl<'s> Problem<'s> {
    /// Sets up the search of `sens` over `config`.
    pub fn new(sens: &'s Sensitivity, config: &GptOssConfig, opts: &SearchOptions) -> Result<Self, SearchError> {
        let params = mlx_params(config);
        let mut fixed_bytes = 0u64;
        let mut counted = 0u64;
        let mut units = Vec::new();
        let mut allowed = Vec::new();
        for p in &params {
            if p.class != TensorClass::Sinks {
                counted += p.numel() as u64;
            }
            if !p.is_quantizable() {
                fixed_bytes += 2 * p.numel() as u64;
                continue;
            }
            let u = sens
                .units
                .iter()
                .find(|u| u.module == p.module)
                .ok_or_else(|| SearchError::Mismatch(format!("no unit for {}", p.module)))?;
            if u.params != p.numel() as u64 {
                return Err(SearchError::Mismatch(format!("{} has {} parameters here, {} in the file", p.module, p.numel(), u.params)));
            }
            let choices: Vec<Choice> = if opts.keep.contains(&p.class) {
                vec![None]
            } else {
                std::iter::once(None)
                    .chain(
                        (0..u.settings.len())
                            .filter(|&i| u.settings[i].bits >= opts.min_bits && (!opts.affine_only || u.settings[i].mode.is_affine()))
                            .map(Some),
                    )
                    .collect()
            };
            units.push(u);
            allowed.push(choices);
        }
        Ok(Problem { units, allowed, fixed_bytes, min_bits: opts.min_bits, params: counted })
    }

    /// Bytes of unit `u` at choice `c`.
    pub fn bytes(&self, u: usize, c: Choice) -> u64 {
        match c {
            None => self.units[u].bf16_bytes,
            Some(i) => self.units[u].settings[i].bytes,
        }
    }

    /// Predicted cost of unit `u` at choice `c`.
    pub fn cost(&self, u: usize, c: Choice) -> f64 {
        c.map_or(0.0, |i| self.units[u].settings[i].cost)
    }

    /// The allotment of `choices`, with its total bytes and predicted cost.
    pub fn total(&self, choices: &[Choice]) -> Allotment {
        let bytes = self.fixed_bytes + choices.iter().enumerate().map(|(u, &c)| self.bytes(u, c)).sum::<u64>();
        let cost = choices.iter().enumerate().map(|(u, &c)| self.cost(u, c)).sum();
        Allotment { choices: choices.to_vec(), bytes, cost }
    }

    /// The size with every unit in bf16: the most any allocation can take.
    pub fn bf16_bytes(&self) -> u64 {
        self.fixed_bytes + self.units.iter().map(|u| u.bf16_bytes).sum::<u64>()
    }

    /// Every unit at its smallest allowed setting.
    pub fn smallest(&self) -> Allotment {
        let choices: Vec<Choice> = (0..self.units.len())
            .map(|u| *self.allowed[u].iter().min_by_key(|&&c| (self.bytes(u, c), c.map_or(usize::MAX, |i| i))).expect("a choice"))
            .collect();
        self.total(&choices)
    }

    fn lagrangian(&self, lambda: f64) -> Vec<Choice> {
        (0..self.units.len())
            .map(|u| {
                let mut best = self.allowed[u][0];
                let mut best_v = f64::INFINITY;
                for &c in &self.allowed[u] {
                    let v = self.cost(u, c) + lambda * self.bytes(u, c) as f64;
                    if v < best_v {
                        (best, best_v) = (c, v);
                    }
                }
                best
            })
            .collect()
    }

    /// The least-cost allocation within `target` bytes.
    pub fn solve(&self, target: u64) -> Result<Allotment, SearchError> {
        let smallest = self.smallest();
        if smallest.bytes > target {
            return Err(SearchError::TooSmall {
                target,
                minimum: smallest.bytes,
                bpw: 8.0 * smallest.bytes as f64 / self.params as f64,
                min_bits: self.min_bits,
            });
        }
        // Bisect λ (in log space) to the smallest multiplier whose allocation fits.
        let (mut lo, mut hi) = (1e-30f64, 1e30f64);
        let at_hi = self.lagrangian(hi);
        let mut fit = if self.total(&at_hi).bytes <= target { at_hi } else { smallest.choices.clone() };
        for _ in 0..200 {
            let mid = (lo.ln() * 0.5 + hi.ln() * 0.5).exp();
            let c = self.lagrangian(mid);
            if self.total(&c).bytes <= target {
                hi = mid;
                fit = c;
            } else {
                lo = mid;
            }
        }
        // Spend what is left on the upgrades that save the most cost per byte.
        let mut choices = fit;
        let mut bytes = self.total(&choices).bytes;
        loop {
            let mut best: Option<(f64, usize, Choice)> = None;
            for (u, &current) in choices.iter().enumerate() {
                let (b0, c0) = (self.bytes(u, current), self.cost(u, current));
                for &c in &self.allowed[u] {
                    let (b1, c1) = (self.bytes(u, c), self.cost(u, c));
                    if c1 < c0 && bytes - b0 + b1 <= target {
                        let ratio = (c0 - c1) / (b1.saturating_sub(b0).max(1)) as f64;
                        if best.is_none_or(|(r, _, _)| ratio > r) {
                            best = Some((ratio, u, c));
                        }
                    }
                }
            }
            let Some((_, u, c)) = best else { break };
            bytes = bytes - self.bytes(u, choices[u]) + self.bytes(u, c);
            choices[u] = c;
        }
        Ok(self.total(&choices))
    }

    /// The unit of index `u`.
    pub fn unit(&self, u: usize) -> &UnitCost {
        self.units[u]
    }

    /// Number of units.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether there are no units.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// The choices unit `u` may take.
    pub fn allowed(&self, u: usize) -> &[Choice] {
        &self.allowed[u]
    }
}

/// How a recipe was searched, for its header.
pub struct RecipeHeader<'a> {
    /// The recipe's name.
    pub name: &'a str,
    /// The sensitivity file, as named on the command line.
    pub sensitivity_path: &'a str,
    /// The target, as given.
    pub target: &'a str,
    /// The converted model's bytes on disk (at most), as `mixq plan` counts them.
    pub on_disk: u64,
    /// What refinement with measured joint KL found, if it ran (one comment line).
    pub refined: Option<&'a str>,
}

/// The units one written rule covers: (layers, whether the class lives in layers, bytes, cost).
type RuleGroup = (Vec<usize>, bool, u64, f64);

/// The YAML recipe of an allotment: kept classes first, then one rule per class and setting with
/// its layers as ranges, each with a comment giving its predicted cost and bytes.
pub fn write_recipe(problem: &Problem<'_>, sens: &Sensitivity, a: &Allotment, h: &RecipeHeader<'_>, keep: &[TensorClass]) -> String {
    let mut out = String::new();
    let bpw = 8.0 * a.bytes as f64 / problem.params as f64;
    let _ = writeln!(out, "# Searched by mixq recipe search from {} (cost: {}; model: {}).", h.sensitivity_path, sens.cost_kind, sens.model);
    let _ = writeln!(out, "# Target: {}. Planned: {} bytes of tensors, {bpw:.3} bits per weight; predicted summed cost {:.6}.", h.target, a.bytes, a.cost);
    let _ = writeln!(out, "# On disk: at most {} bytes, counting the {COUNTED_FILES} (a --target-size counts the same).", h.on_disk);
    if let Some(refined) = h.refined {
        let _ = writeln!(out, "# Refined: {refined}.");
    }
    let _ = writeln!(out, "# Costs were measured with --quantizer {}; convert with the same quantizer.", sens.quantizer);
    let _ = writeln!(out, "name: {}", h.name);
    let _ = writeln!(out, "description: >-\n  Searched for {}: the allocation with the least predicted cost (KL) under the size budget.", h.target);
    let _ = writeln!(out, "rules:");
    let mut always = vec!["norm", "bias", "sinks"];
    always.extend(keep.iter().filter(|c| c.is_quantizable()).map(|c| c.as_str()));
    let _ = writeln!(out, "  - class: [{}]\n    action: keep", always.join(", "));
    // (class order, -bits, group size, mxfp4) → the rule's layers, bytes and cost.
    let mut groups: BTreeMap<(usize, i64, u32, bool), RuleGroup> = BTreeMap::new();
    for (u, &c) in a.choices.iter().enumerate() {
        let unit = problem.unit(u);
        let class = TensorClass::parse_group(&unit.class).and_then(|v| v.first().copied()).expect("checked class");
        if keep.contains(&class) {
            continue;
        }
        let order = TensorClass::ALL.iter().position(|&k| k == class).unwrap_or(0);
        let (bits, gs, mxfp4) = c.map_or((16, 0, false), |i| {
            let s = &unit.settings[i];
            (s.bits, s.group_size, !s.mode.is_affine())
        });
        let e = groups.entry((order, -(bits as i64), gs, mxfp4)).or_insert_with(|| (Vec::new(), unit.layer.is_some(), 0, 0.0));
        if let Some(l) = unit.layer {
            e.0.push(l);
        }
        e.2 += problem.bytes(u, c);
        e.3 += problem.cost(u, c);
    }
    for ((order, neg_bits, gs, mxfp4), (mut layers, in_layers, bytes, cost)) in groups {
        let class = TensorClass::ALL[order].as_str();
        let bits = -neg_bits;
        layers.sort_unstable();
        let what = match (bits, mxfp4) {
            (_, true) => "mxfp4".to_string(),
            (16, _) => "bf16".to_string(),
            _ => format!("{bits}-bit gs{gs}"),
        };
        let range = if in_layers { format!(" layers {}", compress_ranges(&layers)) } else { String::new() };
        let _ = writeln!(out, "  # {class}{range}: {what}, {bytes} bytes, predicted cost {cost:.6}");
        let _ = writeln!(out, "  - class: {class}");
        if in_layers {
            let items: Vec<String> = compress_ranges(&layers).split(", ").map(|r| format!("\"{r}\"")).collect();
            let _ = writeln!(out, "    layers: [{}]", items.join(", "));
        }
        if mxfp4 {
            let _ = writeln!(out, "    action: mxfp4");
        } else if bits == 16 {
            let _ = writeln!(out, "    action: keep");
        } else {
            let _ = writeln!(out, "    action: {{affine: {{bits: {bits}, group_size: {gs}}}}}");
        }
    }
    out
}

/// Checks a written recipe against the plan: it parses, covers the model, and its planned tensor
/// bytes are the allotment's. Returns the parsed recipe and its allocation.
pub fn check_recipe(text: &str, origin: &str, config: &GptOssConfig, a: &Allotment) -> Result<(Recipe, Allocation), String> {
    let recipe = Recipe::parse(text, origin).map_err(|e| format!("the written recipe does not parse: {e}"))?;
    let alloc = Allocation::resolve(config, &recipe).map_err(|e| format!("the written recipe does not fit the model: {e}"))?;
    let bytes = alloc.summary().bytes as u64;
    if bytes != a.bytes {
        return Err(format!("the plan gives {bytes} bytes, the search {}", a.bytes));
    }
    Ok((recipe, alloc))
}

/// Predicted (bytes, bits per weight, cost) at each target bits per weight.
pub fn frontier(problem: &Problem<'_>, bpws: &[f64]) -> Vec<(f64, Option<Allotment>)> {
    bpws.iter()
        .map(|&bpw| {
            let target = (bpw * problem.params as f64 / 8.0) as u64;
            (bpw, problem.solve(target).ok())
        })
        .collect()
}

/// An SVG plot of the frontier: predicted summed KL (log scale) against bits per weight.
pub fn frontier_svg(points: &[(f64, f64)], title: &str) -> String {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let pts: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1 > 0.0 && p.1.is_finite()).collect();
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1.log10()), b.max(p.1.log10())));
    let sx = |x: f64| m + (x - x0) / (x1 - x0).max(1e-9) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y.log10() - y0) / (y1 - y0).max(1e-9) * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n\
<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">bits per weight</text>\n\
<text x=\"15\" y=\"{}\" transform=\"rotate(-90 15 {})\" text-anchor=\"middle\">predicted cost (log scale)</text>\n",
        w / 2.0, xml_escape(title), h - m, w - m, h - m, h - m, w / 2.0, h - 15.0, h / 2.0, h / 2.0
    );
    for p in &pts {
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.2}</text>", sx(p.0), h - m + 16.0, p.0);
    }
    for &y in &[y0, y1] {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.1e}</text>", m - 4.0, sy(10f64.powf(y)) + 4.0, 10f64.powf(y));
    }
    let path: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
    let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>", path.join(" "));
    for p in &pts {
        let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#1f77b4\"/>", sx(p.0), sy(p.1));
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Parses a size: `48GiB`, `51.9GB`, `900MiB`, `1.5e9` or a plain byte count; units are
/// case-insensitive (`48gb` = `48GB`), and a count without a unit is a whole number of bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let units: [(&str, f64); 7] =
        [("gib", (1u64 << 30) as f64), ("mib", (1u64 << 20) as f64), ("kib", 1024.0), ("gb", 1e9), ("mb", 1e6), ("kb", 1e3), ("b", 1.0)];
    let (num, mult) = units.iter().find_map(|(u, m)| lower.strip_suffix(u).map(|n| (n.trim(), *m))).unwrap_or((lower.as_str(), 1.0));
    let v: f64 = num.parse().ok()?;
    let bytes = v * mult;
    (bytes.is_finite() && bytes >= 1.0 && (mult > 1.0 || bytes.fract() == 0.0)).then(|| bytes.round() as u64)
}

/// Parses a size as [`parse_size`] does, or says what `flag` expects.
pub fn parse_size_flag(flag: &str, s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| {
        format!("{flag} {s}: expected a size such as 48GiB, 51.9GB or 900MiB (units in any case) or a whole number of bytes")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authoring::sensitivity_file::{SettingCost, SettingMode, UnitCost, SENSITIVITY_FORMAT};

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("48GiB"), Some(48 << 30));
        assert_eq!(parse_size("51.9 GB"), Some(51_900_000_000));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("-3GB"), None);
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("48gb"), parse_size("48GB"));
        assert_eq!(parse_size("48gib"), Some(48 << 30));
        assert_eq!(parse_size("0.5"), None, "a byte count is whole");
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("0.5kb"), Some(500));
    }

    fn toy() -> (Sensitivity, GptOssConfig) {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-gpt-oss-shakespeare/config.json")).unwrap();
        let config = GptOssConfig::from_json_str(&text, std::path::Path::new("config.json")).unwrap();
        let units = crate::authoring::sensitivity_file::units(&config)
            .iter()
            .enumerate()
            .map(|(n, p)| {
                let settings = [(3u32, 64u32), (4, 64), (6, 64), (8, 64)]
                    .iter()
                    .map(|&(b, g)| SettingCost {
                        mode: Default::default(),
                        bits: b,
                        group_size: g,
                        bytes: crate::authoring::sensitivity_file::format_bytes(p, mixq_loader::QuantFormat::Affine { bits: b, group_size: g }),
                        proxy: 0.0,
                        cost: (1.0 + (n % 7) as f64) * 4f64.powi(-(b as i32)),
                        estimate: None,
                    })
                    .collect();
                UnitCost::new(p, settings)
            })
            .collect();
        let sens = Sensitivity {
            format: SENSITIVITY_FORMAT.into(),
            model: "toy".into(),
            config_sha256: String::new(),
            text_sha256: None,
            tokens: 0,
            calibration_sha256: None,
            quantizer: "mse".into(),
            reference_setting: (3, 64),
            second_setting: None,
            cost_kind: "proxy".into(),
            rank_correlation: None,
            proxy_rank_correlation: None,
            probe_tokens: 0,
            real_run: None,
            seconds: 0.0,
            units,
        };
        (sens, config)
    }

    #[test]
    fn search_fits_the_budget_is_deterministic_and_beats_uniform() {
        let (sens, config) = toy();
        let opts = SearchOptions { min_bits: 3, keep: vec![TensorClass::Router], affine_only: false };
        let problem = Problem::new(&sens, &config, &opts).unwrap();
        let smallest = problem.smallest();
        let target = smallest.bytes + (smallest.bytes / 5);
        let a = problem.solve(target).unwrap();
        assert!(a.bytes <= target && a.bytes > smallest.bytes);
        assert!(a.cost < smallest.cost);
        let b = problem.solve(target).unwrap();
        assert_eq!(a.choices, b.choices);
        let header = RecipeHeader { name: "searched", sensitivity_path: "toy.json", target: "test", on_disk: 0, refined: None };
        let text = write_recipe(&problem, &sens, &a, &header, &opts.keep);
        assert_eq!(check_recipe(&text, "searched.yaml", &config, &a).unwrap().1.summary().bytes as u64, a.bytes, "{text}");
        let e = problem.solve(smallest.bytes - 1).unwrap_err().to_string();
        assert!(e.contains(&smallest.bytes.to_string()) && e.contains("--min-bits 3"), "{e}");
    }

    #[test]
    fn experts_kept_in_mxfp4_are_written_as_mxfp4_rules_unless_affine_only() {
        let (mut sens, config) = toy();
        // An exact mxfp4 setting (upstream experts passed through) for every expert unit.
        for u in sens.units.iter_mut().filter(|u| u.class.starts_with("experts")) {
            let p = mlx_params(&config).into_iter().find(|p| p.module == u.module).unwrap();
            let bytes = crate::authoring::sensitivity_file::format_bytes(&p, mixq_loader::QuantFormat::Mxfp4);
            let mxfp4 = SettingCost { mode: SettingMode::Mxfp4, bits: 4, group_size: 32, bytes, proxy: 0.0, cost: 0.0, estimate: None };
            u.settings.push(mxfp4);
        }
        let search = |affine_only: bool| {
            let opts = SearchOptions { min_bits: 3, keep: vec![TensorClass::Router], affine_only };
            let problem = Problem::new(&sens, &config, &opts).unwrap();
            let smallest = problem.smallest();
            let a = problem.solve(smallest.bytes + smallest.bytes / 5).unwrap();
            let header = RecipeHeader { name: "searched", sensitivity_path: "toy.json", target: "test", on_disk: 0, refined: None };
            let text = write_recipe(&problem, &sens, &a, &header, &opts.keep);
            let (recipe, alloc) = check_recipe(&text, "searched.yaml", &config, &a).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(alloc.summary().bytes as u64, a.bytes);
            let in_mxfp4: Vec<String> = mlx_params(&config)
                .iter()
                .filter(|p| recipe.rule_for(p, config.num_hidden_layers).is_some_and(|r| r.action == mixq_loader::QuantFormat::Mxfp4))
                .map(|p| p.module.clone())
                .collect();
            let chosen: Vec<String> = (0..problem.len())
                .filter(|&u| a.choices[u].is_some_and(|i| problem.unit(u).settings[i].mode == SettingMode::Mxfp4))
                .map(|u| problem.unit(u).module.clone())
                .collect();
            assert_eq!(in_mxfp4, chosen, "{text}");
            (chosen, a.cost)
        };
        let (chosen, cost) = search(false);
        assert!(!chosen.is_empty(), "an exact setting at 4.25 bits is worth taking within this budget");
        let (none, affine_cost) = search(true);
        assert!(none.is_empty() && affine_cost > cost);
    }
}
