//! Refinement of a searched allocation by measuring whole candidate models: the search adds up
//! costs measured one unit at a time, which cannot see how the units' errors interact; a few
//! rounds of local moves evaluated on the joint model can.
//!
//! Each round measures the joint KL of the current allocation with one unit moved: the `m` units
//! whose upgrade saves the most predicted cost per byte, and the `m` whose downgrade loses the
//! least. That gives each move's measured marginal value. The best upgrade is then paid for with
//! the downgrades of least measured loss per byte until the allocation fits the budget again, and
//! the combined move is kept only if its measured joint KL is lower. A round that keeps nothing
//! moves on to the next candidates in the predicted order.

use std::collections::HashMap;
use std::path::Path;

use mixq_loader::schema::Param;
use mixq_loader::{Checkpoint, QuantFormat};
use mixq_quantizer::authoring::recipe_search::{Allotment, Choice, Problem};
use mixq_quantizer::authoring::sensitivity_file::units;
use mixq_quantizer::kernels::importance::CalibrationUse;
use mixq_quantizer::kernels::param_error::QuantizedUnit;
use mixq_quantizer::QuantMethod;
use mixq_runtime::Model;
use rayon::prelude::*;

use crate::corpus::Corpus;
use crate::sensitivity::{mean_kl, unit_codes, UnitQuantizer};
use crate::ValidateError;

/// Bounds and inputs of a refinement.
#[derive(Debug, Clone)]
pub struct RefineOptions {
    /// Rounds of local moves at most.
    pub rounds: usize,
    /// Tokens of the text each candidate is measured on.
    pub tokens: usize,
    /// Window length.
    pub ctx: usize,
    /// Upgrade and downgrade candidates measured per round.
    pub candidates: usize,
}

/// What a refinement measured.
#[derive(Debug, Clone)]
pub struct Refined {
    /// The allocation it ends with.
    pub allot: Allotment,
    /// Measured joint KL of the searched allocation it started from.
    pub start_kl: f64,
    /// Measured joint KL of the allocation it ends with.
    pub kl: f64,
    /// Rounds run.
    pub rounds: usize,
    /// Rounds allowed.
    pub max_rounds: usize,
    /// Moves kept.
    pub moves: usize,
    /// Candidate models measured.
    pub evaluations: usize,
    /// Tokens each was measured on.
    pub tokens: usize,
}

impl Refined {
    /// One line for the recipe's header.
    pub fn describe(&self) -> String {
        format!(
            "measured joint KL {:.6} (searched allocation: {:.6}) on {} tokens, {} of {} rounds, {} moves kept, {} models measured",
            self.kl, self.start_kl, self.tokens, self.rounds, self.max_rounds, self.moves, self.evaluations
        )
    }
}

/// The source model with the units of an allocation quantized, measured on fixed windows.
struct JointModel<'c> {
    model: Model<'c>,
    params: &'c [Param],
    quantizers: Vec<UnitQuantizer<'c>>,
    cache: HashMap<(usize, QuantFormat), QuantizedUnit>,
    windows: Vec<Vec<u32>>,
    reference: Vec<Vec<f32>>,
    evaluations: usize,
}

impl<'c> JointModel<'c> {
    /// Mean KL of the source with every unit of `problem` at `choices`.
    fn kl(&mut self, problem: &Problem<'_>, choices: &[Choice]) -> Result<f64, ValidateError> {
        let settings: Vec<(usize, QuantFormat)> =
            choices.iter().enumerate().filter_map(|(u, c)| c.map(|i| (u, problem.unit(u).settings[i].format()))).collect();
        let missing: Vec<(usize, QuantFormat)> = settings.iter().filter(|k| !self.cache.contains_key(k)).copied().collect();
        for key @ (u, format) in missing {
            let q = self.quantizers[self.index_of(problem, u)?].quantize(format)?;
            self.cache.insert(key, q);
        }
        let mut joint = self.model.clone();
        for key @ (u, _) in &settings {
            joint = joint.with_weight(&problem.unit(*u).module, unit_codes(&self.cache[key]))?;
        }
        self.evaluations += 1;
        let windows: Vec<&[u32]> = self.windows.iter().map(Vec::as_slice).collect();
        mean_kl(&mixq_runtime::Engine::Cpu(joint), &windows, &self.reference, self.model.config.vocab_size)
    }

    /// The parameter index of the problem's unit `u`.
    fn index_of(&self, problem: &Problem<'_>, u: usize) -> Result<usize, ValidateError> {
        let module = &problem.unit(u).module;
        self.params
            .iter()
            .position(|p| &p.module == module)
            .ok_or_else(|| ValidateError::Input(format!("{module}: not a unit of this model")))
    }
}

/// A one-unit move: the unit, its new choice, and the bytes it adds (negative: frees).
#[derive(Debug, Clone, Copy)]
struct Move {
    unit: usize,
    to: Choice,
    bytes: i64,
}

/// For every unit, its best predicted upgrade (most cost saved per byte added), best first, and
/// its best predicted downgrade (least cost added per byte freed), best first.
fn moves(problem: &Problem<'_>, choices: &[Choice]) -> (Vec<Move>, Vec<Move>) {
    let mut ups: Vec<(f64, Move)> = Vec::new();
    let mut downs: Vec<(f64, Move)> = Vec::new();
    for (u, &current) in choices.iter().enumerate() {
        let (b0, c0) = (problem.bytes(u, current) as i64, problem.cost(u, current));
        let mut up: Option<(f64, Move)> = None;
        let mut down: Option<(f64, Move)> = None;
        for &to in problem.allowed(u) {
            let (b1, c1) = (problem.bytes(u, to) as i64, problem.cost(u, to));
            let m = Move { unit: u, to, bytes: b1 - b0 };
            if b1 > b0 && c1 < c0 {
                let saved = (c0 - c1) / (b1 - b0) as f64;
                if up.is_none_or(|(v, _)| saved > v) {
                    up = Some((saved, m));
                }
            } else if b1 < b0 {
                let lost = (c1 - c0) / (b0 - b1) as f64;
                if down.is_none_or(|(v, _)| lost < v) {
                    down = Some((lost, m));
                }
            }
        }
        ups.extend(up);
        downs.extend(down);
    }
    ups.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.unit.cmp(&b.1.unit)));
    downs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.unit.cmp(&b.1.unit)));
    (ups.into_iter().map(|x| x.1).collect(), downs.into_iter().map(|x| x.1).collect())
}

/// Refines `start` within `target` bytes by measuring joint KL on `text` of the source `dir`;
/// `progress(round, rounds)`.
#[allow(clippy::too_many_arguments)]
pub fn refine(
    problem: &Problem<'_>,
    start: Allotment,
    target: u64,
    dir: &Path,
    text: &Path,
    calibration: Option<&Path>,
    quantizer: QuantMethod,
    opts: &RefineOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Refined, ValidateError> {
    let ckpt = Checkpoint::open(dir)?;
    let calib = calibration.map(|p| CalibrationUse::open(p, &ckpt)).transpose()?;
    let model = Model::load(&ckpt)?;
    let params = units(ckpt.config());
    let quantizers = params.iter().map(|p| UnitQuantizer::new(&ckpt, p, calib.as_ref(), quantizer)).collect::<Result<Vec<_>, _>>()?;
    let corpus = Corpus::read(dir, text, Some(opts.tokens))?;
    let windows: Vec<Vec<u32>> = corpus.tokens.chunks(opts.ctx.max(2)).filter(|w| w.len() >= 2).map(<[u32]>::to_vec).collect();
    if windows.is_empty() {
        return Err(ValidateError::Input(format!("{}: fewer than 2 tokens to measure the refinement on", text.display())));
    }
    let reference = windows.par_iter().map(|w| model.forward(w, &mut model.new_cache(), true)).collect::<Result<_, _>>()?;
    let tokens = windows.iter().map(Vec::len).sum();
    let mut joint = JointModel { model, params: &params, quantizers, cache: HashMap::new(), windows, reference, evaluations: 0 };

    let mut choices = start.choices.clone();
    let start_kl = joint.kl(problem, &choices)?;
    let (mut kl, mut moves_kept, mut rounds) = (start_kl, 0, 0);
    let bytes_of = |c: &[Choice]| problem.total(c).bytes as i64;
    // Where in the predicted order this round's candidates start: after a round that kept
    // nothing, the next candidates are measured.
    let mut offset = 0;
    for round in 0..opts.rounds {
        let (ups, downs) = moves(problem, &choices);
        if offset >= ups.len() && offset >= downs.len() {
            break;
        }
        rounds = round + 1;
        // Measured marginal value of each candidate: KL change per byte.
        let mut measured_ups = Vec::new();
        for m in ups.iter().skip(offset).take(opts.candidates) {
            let mut c = choices.clone();
            c[m.unit] = m.to;
            measured_ups.push(((kl - joint.kl(problem, &c)?) / m.bytes as f64, *m));
        }
        let mut measured_downs = Vec::new();
        for m in downs.iter().skip(offset).take(opts.candidates) {
            let mut c = choices.clone();
            c[m.unit] = m.to;
            measured_downs.push(((joint.kl(problem, &c)? - kl) / (-m.bytes) as f64, *m));
        }
        measured_ups.sort_by(|a, b| b.0.total_cmp(&a.0));
        measured_downs.sort_by(|a, b| a.0.total_cmp(&b.0));
        // The best upgrade that measured a saving, paid for by the cheapest measured downgrades
        // of other units; kept if the combination measures better.
        let mut improved = false;
        for &(saving, up) in measured_ups.iter().filter(|(s, _)| *s > 0.0) {
            let mut c = choices.clone();
            c[up.unit] = up.to;
            let mut expected = saving * up.bytes as f64;
            for &(loss, down) in &measured_downs {
                if bytes_of(&c) <= target as i64 {
                    break;
                }
                if down.unit != up.unit {
                    c[down.unit] = down.to;
                    expected -= loss * (-down.bytes) as f64;
                }
            }
            if bytes_of(&c) > target as i64 || expected <= 0.0 {
                continue;
            }
            let k = joint.kl(problem, &c)?;
            if k < kl {
                (choices, kl) = (c, k);
                moves_kept += 1;
                improved = true;
                break;
            }
        }
        progress(rounds, opts.rounds);
        offset = if improved { 0 } else { offset + opts.candidates };
    }
    Ok(Refined { allot: problem.total(&choices), start_kl, kl, rounds, max_rounds: opts.rounds, moves: moves_kept, evaluations: joint.evaluations, tokens })
}

/// What `recipe search --refine-rounds` is asked for.
pub struct RefineRequest<'a> {
    /// The model (folder or repo id): refinement runs it, so its weights are needed.
    pub source: &'a str,
    /// Text the candidates are measured on.
    pub text: &'a Path,
    /// Calibration statistics the recipe will be converted with.
    pub calibration: Option<&'a Path>,
    /// Bounds.
    pub opts: RefineOptions,
    /// Report hub downloads on stderr.
    pub show_downloads: bool,
}

/// Resolves the source's weights and refines `start` (searched from `sens`) within `target` bytes.
pub fn refine_search(
    r: &RefineRequest<'_>,
    sens: &mixq_quantizer::authoring::sensitivity_file::Sensitivity,
    problem: &Problem<'_>,
    start: Allotment,
    target: u64,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Refined, ValidateError> {
    use mixq_loader::source::{resolve_source, Need, ResolvedSource};
    let quantizer = QuantMethod::parse(&sens.quantizer)
        .ok_or_else(|| ValidateError::Input(format!("the sensitivity file's quantizer \"{}\" is unknown", sens.quantizer)))?;
    match resolve_source(r.source, Need::Everything, r.show_downloads)? {
        ResolvedSource::Folder(dir) => refine(problem, start, target, &dir, r.text, r.calibration, quantizer, &r.opts, progress),
        ResolvedSource::ConfigFile(p) => Err(ValidateError::Input(format!(
            "--refine-rounds measures candidate models, so --source must have weights: {} is a config.json alone",
            p.display()
        ))),
    }
}
