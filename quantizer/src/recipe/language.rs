//! YAML sensitivity recipes: ordered rules mapping tensor classes and layers to an action.

use std::path::Path;

use mixq_loader::LayerType;
use serde::Deserialize;

use crate::kernels::affine::{AFFINE_BITS, AFFINE_GROUP_SIZES};
use mixq_loader::schema::{Param, TensorClass};
use crate::kernels::method::QuantMethod;

/// Recipes shipped inside the binary, by name.
pub const BUILTIN_RECIPES: &[(&str, &str)] = &[
    ("gpt-oss-120b-3.6bit", include_str!("../../../recipes/gpt-oss-120b-3.6bit.yaml")),
    ("mixed_3_6", include_str!("../../../recipes/mixed_3_6.yaml")),
    ("mxfp4-experts", include_str!("../../../recipes/mxfp4-experts.yaml")),
];

/// A recipe that cannot be read or does not fit a model.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// Neither a built-in name nor a readable file.
    #[error("recipe {0}: not a built-in recipe ({list}) nor a readable file: {1}", list = builtin_names())]
    NotFound(String, std::io::Error),
    /// Malformed YAML or a key/value of the wrong kind.
    #[error("{origin}{}: {message}", at_line(*line))]
    Invalid {
        /// File or built-in name.
        origin: String,
        /// 1-based line.
        line: usize,
        /// What was expected.
        message: String,
    },
    /// The recipe does not fit a tensor of the model.
    #[error("{origin}{}: {message}", at_line(*line))]
    Tensor {
        /// File or built-in name.
        origin: String,
        /// 1-based line of the rule (0 when no rule matched).
        line: usize,
        /// What was expected, naming the tensor.
        message: String,
    },
}

/// An empty recipe has no line to point at: say what a recipe holds.
fn refuse_empty(text: &str, origin: &str) -> Result<(), RecipeError> {
    if text.trim().is_empty() {
        let message = "the recipe is empty; expected YAML with `name` and a list of `rules` (see recipes/ or `mixq recipes`)".into();
        return Err(RecipeError::Invalid { origin: origin.into(), line: 0, message });
    }
    Ok(())
}

/// `:LINE` for a known line, nothing for 0 (no line: an empty file, a missing key).
fn at_line(line: usize) -> String {
    if line == 0 { String::new() } else { format!(":{line}") }
}

fn builtin_names() -> String {
    BUILTIN_RECIPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// What a rule does with the tensors it matches: the storage format it gives them.
pub use mixq_loader::QuantFormat;

/// A count of layers: absolute, or a fraction of the model's layer count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// A fixed number of layers.
    Count(usize),
    /// `num / den` of the layers, rounded down.
    Fraction(usize, usize),
}

impl Amount {
    fn of(self, n_layers: usize) -> usize {
        match self {
            Amount::Count(c) => c.min(n_layers),
            Amount::Fraction(num, den) => n_layers * num / den,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        if let Some((a, b)) = s.split_once('/') {
            let (num, den): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            (den > 0 && num <= den).then_some(Amount::Fraction(num, den))
        } else {
            s.trim().parse().ok().map(Amount::Count)
        }
    }
}

/// Which layers a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSelector {
    /// Every layer.
    All,
    /// Layers `a..=b`.
    Range(usize, usize),
    /// Layers `0 .. floor(n*amount)`.
    First(Amount),
    /// The complement of `first (1 - amount)`: layers `floor(n*(1-amount)) .. n`.
    Last(Amount),
    /// Layers `i >= start` with `(i - start) % step == offset`, `start = floor(n*from)`.
    Every {
        /// Period.
        step: usize,
        /// Phase within the period.
        offset: usize,
        /// Where counting starts.
        from: Amount,
    },
}

impl LayerSelector {
    /// Parses `all`, `7`, `0-5`, `first 1/6`, `last 6`, `every 3 offset 2 from 1/8`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!(
                "layer selector \"{s}\" is not one of: all, N, A-B, first N, first P/Q, last N, last P/Q, every K [offset R] [from N|P/Q]"
            )
        };
        if s == "all" {
            return Ok(LayerSelector::All);
        }
        let words: Vec<&str> = s.split_whitespace().collect();
        match words.as_slice() {
            ["first", a] => Amount::parse(a).map(LayerSelector::First).ok_or_else(bad),
            ["last", a] => Amount::parse(a).map(LayerSelector::Last).ok_or_else(bad),
            ["every", rest @ ..] => {
                let step: usize = rest.first().and_then(|k| k.parse().ok()).filter(|&k| k > 0).ok_or_else(bad)?;
                let (mut offset, mut from) = (0, Amount::Count(0));
                let mut it = rest[1..].chunks(2);
                for pair in &mut it {
                    match pair {
                        ["offset", r] => offset = r.parse().ok().filter(|&r| r < step).ok_or_else(bad)?,
                        ["from", a] => from = Amount::parse(a).ok_or_else(bad)?,
                        _ => return Err(bad()),
                    }
                }
                Ok(LayerSelector::Every { step, offset, from })
            }
            [single] => {
                if let Some((a, b)) = single.split_once('-') {
                    let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                    if a > b {
                        return Err(format!("layer range \"{s}\" ends before it starts"));
                    }
                    Ok(LayerSelector::Range(a, b))
                } else {
                    let a: usize = single.parse().map_err(|_| bad())?;
                    Ok(LayerSelector::Range(a, a))
                }
            }
            _ => Err(bad()),
        }
    }

    /// Whether layer `i` of `n` is selected.
    pub fn contains(&self, i: usize, n: usize) -> bool {
        match *self {
            LayerSelector::All => true,
            LayerSelector::Range(a, b) => (a..=b).contains(&i),
            LayerSelector::First(a) => i < a.of(n),
            LayerSelector::Last(a) => {
                let start = match a {
                    Amount::Count(c) => n.saturating_sub(c),
                    Amount::Fraction(num, den) => n * (den - num) / den,
                };
                i >= start
            }
            LayerSelector::Every { step, offset, from } => {
                let start = from.of(n);
                i >= start && (i - start) % step == offset
            }
        }
    }
}

/// One ordered rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// 1-based YAML line where the rule starts.
    pub line: usize,
    /// Classes it selects.
    pub classes: Vec<TensorClass>,
    /// Layers it selects (`None`: any tensor, in a layer or not).
    pub layers: Option<Vec<LayerSelector>>,
    /// Attention type it selects.
    pub layer_type: Option<LayerType>,
    /// What it does.
    pub action: QuantFormat,
    /// The quantizer its affine action asks for (`None`: the conversion's default).
    pub quantizer: Option<QuantMethod>,
}

impl Rule {
    /// Whether the rule selects a parameter of a model with `n_layers` layers.
    pub fn matches(&self, p: &Param, n_layers: usize) -> bool {
        if !self.classes.contains(&p.class) {
            return false;
        }
        if let Some(sel) = &self.layers {
            match p.layer {
                Some(l) if sel.iter().any(|s| s.contains(l, n_layers)) => {}
                _ => return false,
            }
        }
        match self.layer_type {
            Some(t) => p.layer_type == Some(t),
            None => true,
        }
    }
}

/// A parsed, statically validated recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Where it came from (built-in name or file path), for error messages.
    pub origin: String,
    /// The YAML text, recorded in the manifest.
    pub text: String,
    /// Ordered rules.
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: String,
    #[serde(default)]
    description: String,
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LayerItem {
    Index(usize),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LayerList {
    One(LayerItem),
    Many(Vec<LayerItem>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    class: OneOrMany,
    #[serde(default)]
    layers: Option<LayerList>,
    #[serde(default)]
    layer_type: Option<String>,
    action: serde_yaml::Value,
}

/// Reads `keep`, `mxfp4` or `{affine: {bits: B, group_size: G[, quantizer: minmax|mse]}}`.
fn parse_action(v: &serde_yaml::Value) -> Result<(QuantFormat, Option<QuantMethod>), String> {
    use serde_yaml::Value as Y;
    let expected = "expected `keep`, `mxfp4` or `{affine: {bits: B, group_size: G}}`";
    match v {
        Y::String(s) if s == "keep" => Ok((QuantFormat::Bf16, None)),
        Y::String(s) if s == "mxfp4" => Ok((QuantFormat::Mxfp4, None)),
        Y::Mapping(m) if m.len() == 1 => {
            let (k, inner) = m.iter().next().expect("one entry");
            if k.as_str() != Some("affine") {
                return Err(format!("unknown action {}; {expected}", yaml_brief(k)));
            }
            let inner = inner.as_mapping().ok_or_else(|| format!("affine takes a mapping; {expected}"))?;
            for key in inner.keys() {
                if !matches!(key.as_str(), Some("bits" | "group_size" | "quantizer")) {
                    return Err(format!("unknown key {} in affine; expected bits, group_size and optionally quantizer", yaml_brief(key)));
                }
            }
            let quantizer = match inner.get("quantizer") {
                None => None,
                Some(q) => {
                    let names: Vec<&str> = QuantMethod::ALL.iter().map(|m| m.as_str()).collect();
                    let bad = || format!("quantizer {} is not one of {}", yaml_brief(q), names.join(", "));
                    Some(q.as_str().and_then(QuantMethod::parse).ok_or_else(bad)?)
                }
            };
            let get = |key: &str| {
                inner
                    .get(key)
                    .and_then(Y::as_u64)
                    .map(|n| n as u32)
                    .ok_or_else(|| format!("affine needs an integer `{key}`"))
            };
            Ok((QuantFormat::Affine { bits: get("bits")?, group_size: get("group_size")? }, quantizer))
        }
        other => Err(format!("action {} is not valid; {expected}", yaml_brief(other))),
    }
}

/// A YAML value as the recipe's author wrote it (`"afine"`, `3`, `{a: 1}`), for messages.
fn yaml_brief(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => format!("{s:?}"),
        other => serde_yaml::to_string(other).map(|t| t.trim().replace('\n', " ")).unwrap_or_else(|_| "?".into()),
    }
}

impl Recipe {
    /// Loads a built-in recipe by name, or a YAML file by path.
    pub fn load(name_or_path: &str) -> Result<Self, RecipeError> {
        if let Some((name, text)) = BUILTIN_RECIPES.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(text, &format!("recipes/{name}.yaml"));
        }
        let path = Path::new(name_or_path);
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::NotFound(name_or_path.into(), e))?;
        Self::parse(&text, name_or_path)
    }

    /// Parses and statically validates recipe text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, RecipeError> {
        let invalid = |line: usize, message: String| RecipeError::Invalid { origin: origin.into(), line, message };
        refuse_empty(text, origin)?;
        let raw: RawRecipe = serde_yaml::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(0);
            invalid(line, e.to_string())
        })?;
        let lines = rule_lines(text);
        if raw.rules.is_empty() {
            return Err(invalid(1, "`rules` is empty; a recipe needs at least one rule".into()));
        }
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (k, r) in raw.rules.into_iter().enumerate() {
            let line = lines.get(k).copied().unwrap_or(0);
            let mut classes = Vec::new();
            for name in r.class.into_vec() {
                let group = TensorClass::parse_group(&name).ok_or_else(|| {
                    let known: Vec<&str> = TensorClass::ALL.iter().map(|c| c.as_str()).collect();
                    invalid(line, format!("unknown class \"{name}\"; expected one of {}, experts, attention", known.join(", ")))
                })?;
                classes.extend(group);
            }
            let layers = match r.layers {
                None => None,
                Some(list) => {
                    let items = match list {
                        LayerList::One(i) => vec![i],
                        LayerList::Many(v) => v,
                    };
                    let mut sels = Vec::new();
                    for item in items {
                        sels.push(match item {
                            LayerItem::Index(i) => LayerSelector::Range(i, i),
                            LayerItem::Text(s) => LayerSelector::parse(&s).map_err(|m| invalid(line, m))?,
                        });
                    }
                    Some(sels)
                }
            };
            let layer_type = match r.layer_type {
                None => None,
                Some(t) => Some(LayerType::parse(&t).ok_or_else(|| {
                    invalid(line, format!("layer_type \"{t}\" must be sliding_attention or full_attention"))
                })?),
            };
            let (action, quantizer) = parse_action(&r.action).map_err(|m| invalid(line, m))?;
            let action = match action {
                QuantFormat::Bf16 => QuantFormat::Bf16,
                QuantFormat::Mxfp4 => QuantFormat::Mxfp4,
                QuantFormat::Affine { bits, group_size } => {
                    if !AFFINE_BITS.contains(&bits) {
                        return Err(invalid(line, format!("bits {bits} is not supported; expected one of {AFFINE_BITS:?}")));
                    }
                    if !AFFINE_GROUP_SIZES.contains(&group_size) {
                        return Err(invalid(
                            line,
                            format!("group_size {group_size} is not supported; expected one of {AFFINE_GROUP_SIZES:?}"),
                        ));
                    }
                    QuantFormat::Affine { bits, group_size }
                }
            };
            if action != QuantFormat::Bf16 {
                if let Some(c) = classes.iter().find(|c| !c.is_quantizable()) {
                    return Err(invalid(line, format!("class {} cannot be quantized; its only action is keep", c.as_str())));
                }
            }
            if action == QuantFormat::Mxfp4 {
                if let Some(c) = classes.iter().find(|c| !c.is_expert()) {
                    return Err(invalid(
                        line,
                        format!("mxfp4 keeps experts as MLX MXFP4 (upstream blocks passed through, dense ones encoded); class {} is not an expert projection", c.as_str()),
                    ));
                }
            }
            rules.push(Rule { line, classes, layers, layer_type, action, quantizer });
        }
        Ok(Recipe { name: raw.name, description: raw.description, origin: origin.into(), text: text.into(), rules })
    }

    /// The first rule matching a parameter.
    pub fn rule_for(&self, p: &Param, n_layers: usize) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(p, n_layers))
    }
}

/// 1-based start lines of the items of the top-level `rules` sequence.
fn rule_lines(text: &str) -> Vec<usize> {
    use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::Marker;

    struct Walk {
        depth: usize,
        expect_rules_value: bool,
        in_rules: Option<usize>,
        key_turn: bool,
        lines: Vec<usize>,
    }
    impl MarkedEventReceiver for Walk {
        fn on_event(&mut self, ev: Event, mark: Marker) {
            match ev {
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    if let Some(d) = self.in_rules {
                        if self.depth == d + 1 {
                            self.lines.push(mark.line());
                        }
                    }
                    if self.expect_rules_value && matches!(ev, Event::SequenceStart(..)) {
                        self.in_rules = Some(self.depth);
                    }
                    self.expect_rules_value = false;
                    self.depth += 1;
                    self.key_turn = true;
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    self.depth -= 1;
                    if self.in_rules == Some(self.depth) {
                        self.in_rules = None;
                    }
                }
                Event::Scalar(ref v, ..) => {
                    if self.depth == 1 && self.in_rules.is_none() {
                        if self.key_turn {
                            self.expect_rules_value = v == "rules";
                        } else {
                            self.expect_rules_value = false;
                        }
                        self.key_turn = !self.key_turn;
                    } else if let Some(d) = self.in_rules {
                        if self.depth == d + 1 {
                            self.lines.push(mark.line());
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut walk = Walk { depth: 0, expect_rules_value: false, in_rules: None, key_turn: true, lines: Vec::new() };
    let mut parser = Parser::new_from_str(text);
    let _ = parser.load(&mut walk, false);
    walk.lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse() {
        for (name, _) in BUILTIN_RECIPES {
            let r = Recipe::load(name).unwrap();
            assert_eq!(r.name, *name);
            assert!(r.rules.iter().all(|r| r.line > 0));
        }
    }

    #[test]
    fn rule_lines_point_at_items() {
        let text = "name: x\nrules:\n  - class: norm\n    action: keep\n\n  - class: [q_proj]\n    action: {affine: {bits: 4, group_size: 64}}\n";
        assert_eq!(rule_lines(text), vec![3, 6]);
        let r = Recipe::parse(text, "t.yaml").unwrap();
        assert_eq!(r.rules[1].action, QuantFormat::Affine { bits: 4, group_size: 64 });
        assert_eq!(r.rules[1].quantizer, None);
    }

    #[test]
    fn rules_may_choose_the_quantizer() {
        let text = "name: x\nrules:\n  - class: q_proj\n    action: {affine: {bits: 3, group_size: 64, quantizer: minmax}}\n  - class: k_proj\n    action: {affine: {bits: 3, group_size: 64, quantizer: mse}}\n";
        let r = Recipe::parse(text, "t.yaml").unwrap();
        assert_eq!(r.rules[0].quantizer, Some(QuantMethod::MinMax));
        assert_eq!(r.rules[1].quantizer, Some(QuantMethod::Mse));
        let r = Recipe::parse("name: x\nrules:\n  - class: q_proj\n    action: {affine: {bits: 3, group_size: 64, quantizer: gptq}}\n", "t.yaml").unwrap();
        assert_eq!(r.rules[0].quantizer, Some(QuantMethod::Gptq));
        let e = err("name: x\nrules:\n  - class: q_proj\n    action: {affine: {bits: 3, group_size: 64, quantizer: awq}}\n");
        assert!(e.starts_with("r.yaml:3:") && e.contains("awq") && e.contains("minmax, mse, gptq"), "{e}");
    }

    #[test]
    fn selectors_follow_mlx_lm_arithmetic() {
        let first = LayerSelector::parse("first 1/6").unwrap();
        let last = LayerSelector::parse("last 1/6").unwrap();
        let sel = |s: &LayerSelector, n| (0..n).filter(|&i| s.contains(i, n)).collect::<Vec<_>>();
        assert_eq!(sel(&first, 36), (0..6).collect::<Vec<_>>());
        assert_eq!(sel(&last, 36), (30..36).collect::<Vec<_>>());
        assert_eq!(sel(&first, 24), (0..4).collect::<Vec<_>>());
        assert_eq!(sel(&last, 24), (20..24).collect::<Vec<_>>());
        assert_eq!(sel(&first, 6), vec![0]);
        assert_eq!(sel(&last, 6), vec![5]);
        // mlx-lm's use_more_bits: i < n//8 or i >= 7n//8 or (i - n//8) % 3 == 2
        for n in [6usize, 24, 36] {
            let sels = ["first 1/8", "last 1/8", "every 3 offset 2 from 1/8"].map(|s| LayerSelector::parse(s).unwrap());
            for i in 0..n {
                let mlx = i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2;
                assert_eq!(sels.iter().any(|s| s.contains(i, n)), mlx, "n {n} layer {i}");
            }
        }
        assert_eq!(sel(&LayerSelector::parse("2-4").unwrap(), 6), vec![2, 3, 4]);
        assert!(LayerSelector::parse("first third").is_err());
        assert!(LayerSelector::parse("5-2").is_err());
    }

    fn err(text: &str) -> String {
        Recipe::parse(text, "r.yaml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_line() {
        let e = err("name: x\nrules:\n  - class: norm\n    action: keep\n  - class: q_proj\n    action: {affine: {bits: 7, group_size: 64}}\n");
        assert!(e.starts_with("r.yaml:5:") && e.contains("bits 7"), "{e}");
        let e = err("name: x\nrules:\n  - class: q_proj\n    action: {affine: {bits: 4, group_size: 48}}\n");
        assert!(e.starts_with("r.yaml:3:") && e.contains("group_size 48"), "{e}");
        let e = err("name: x\nrules:\n  - class: q_proj\n    colour: red\n    action: keep\n");
        assert!(e.contains("r.yaml:") && e.contains("colour"), "{e}");
        let e = err("name: x\nrules:\n  - class: qq_proj\n    action: keep\n");
        assert!(e.starts_with("r.yaml:3:") && e.contains("unknown class"), "{e}");
        let e = err("name: x\nrules:\n  - class: norm\n    action: {affine: {bits: 4, group_size: 64}}\n");
        assert!(e.contains("cannot be quantized"), "{e}");
        let e = err("name: x\nrules:\n  - class: q_proj\n    action: mxfp4\n");
        assert!(e.contains("not an expert"), "{e}");
        let e = err("name: x\nrules:\n  - class: q_proj\n    layers: [first half]\n    action: keep\n");
        assert!(e.starts_with("r.yaml:3:") && e.contains("first half"), "{e}");
        let e = err("name: x\nrules:\n  - class: q_proj\n    action: {affine: {bits: 4}}\n");
        assert!(e.contains("group_size"), "{e}");
    }
}
