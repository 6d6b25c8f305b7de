"""mixq's runtime against mlx-lm on the float32 path: logits (KL and argmax) for generated
checkpoints of three shapes, upstream and converted with each recipe; greedy generation on the
trained model; the non-truncated YaRN variant; and mlx-lm's default path on each conversion."""

import json
import math

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from conftest import TRAINED, mixq
from mlx_reference import float32_model

RECIPES = ["gpt-oss-120b-3.6bit", "mixed_3_6", "mxfp4-experts"]
SHAPES = ["tiny", "small", "wide"]
N_TOKENS = 150  # crosses the sliding windows and mixq's 64-token prefill chunks


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mixq_logits(workdir, model_dir, tokens):
    tok_file = workdir / "tokens.json"
    tok_file.write_text(json.dumps(tokens))
    out = workdir / "logits.npy"
    mixq("logits", "--model", model_dir, "--tokens", tok_file, "--out", out)
    return np.load(out)


def assert_agrees(ref, ours):
    """Mean KL(mlx || mixq) < 1e-5 and the same argmax wherever mlx's top-2 differ by > 1e-3."""
    assert ref.shape == ours.shape
    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    assert kl.mean() < 1e-5, f"mean KL {kl.mean():.3g} (max {kl.max():.3g})"
    top2 = np.sort(ref, -1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 1e-3
    same = ref.argmax(-1) == ours.argmax(-1)
    assert same[decided].all(), f"argmax differs at positions {np.where(decided & ~same)[0].tolist()}"
    return kl.mean()


def reference_logits(model_dir, tokens):
    model, _ = float32_model(model_dir)
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def converted(workdir, src, name, recipe):
    out = workdir / f"rt-{name}-{recipe}"
    if not out.exists():
        mixq("convert", "--source", src, "--recipe", recipe, "--out", out, "--quiet", "--quantizer", "minmax")
    return out


@pytest.mark.parametrize("form", ["upstream"] + RECIPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_mlx_float32(workdir, shape, form):
    src = workdir / f"rt-src-{shape}"
    if not src.exists():
        mixq("synth", "--preset", shape, "--out", src)
    model_dir = src if form == "upstream" else converted(workdir, src, shape, form)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tokens = np.random.default_rng(7).integers(0, vocab, N_TOKENS).tolist()
    assert_agrees(reference_logits(model_dir, tokens), mixq_logits(workdir, model_dir, tokens))


@pytest.mark.parametrize("form", ["upstream"] + RECIPES)
def test_trained_model_logits_match(workdir, form):
    model_dir = TRAINED if form == "upstream" else converted(workdir, TRAINED, "trained", form)
    text = (TRAINED.parent / "shakespeare-dev.txt").read_text()[:2000]
    _, tokenizer = mlx_lm.load(str(TRAINED))
    tokens = tokenizer.encode(text)[:N_TOKENS]
    assert_agrees(reference_logits(model_dir, tokens), mixq_logits(workdir, model_dir, tokens))


PROMPTS = ["ROMEO:", "To be, or not to be, that is", "Enter the KING and QUEEN, with attendants.\n\nKING."]


@pytest.mark.parametrize("form", ["upstream", "gpt-oss-120b-3.6bit"])
def test_greedy_generation_is_identical(workdir, form):
    model_dir = TRAINED if form == "upstream" else converted(workdir, TRAINED, "trained", form)
    model, tokenizer = float32_model(model_dir)
    eos = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        want = []
        for _ in range(48):
            logits = model(mx.array([ids + want]))[0, -1]
            nxt = int(mx.argmax(logits).item())
            want.append(nxt)
            if nxt == eos:
                break
        got = json.loads(mixq("run", "--model", model_dir, "--prompt", prompt, "--max-tokens", 48, "--temp", 0, "--json"))
        assert got["tokens"] == want, f"{prompt!r}: mixq {got['text']!r} vs mlx {tokenizer.decode(want)!r}"


def published_yarn_inv_freq(dims, base, factor, beta_fast, beta_slow, original, truncate):
    """The YaRN formula as published (and as the reference implementation computes it)."""

    def correction_dim(rotations):
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(dims // 2):
        pos_freq = base ** (2 * i / dims)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolation = 1.0 - ramp
        out.append((1 / (factor * pos_freq)) * (1 - extrapolation) + (1 / pos_freq) * extrapolation)
    return np.array(out)


def test_untruncated_yarn_follows_the_published_formula(workdir):
    src = workdir / "rt-src-untruncated"
    if not src.exists():
        mixq("synth", "--preset", "small", "--no-truncate", "--out", src)
    cfg = json.loads((src / "config.json").read_text())
    rs = cfg["rope_scaling"]
    assert rs["truncate"] is False
    inv = published_yarn_inv_freq(cfg["head_dim"], cfg["rope_theta"], rs["factor"], rs["beta_fast"], rs["beta_slow"],
                                  rs["original_max_position_embeddings"], truncate=False)
    truncated = published_yarn_inv_freq(cfg["head_dim"], cfg["rope_theta"], rs["factor"], rs["beta_fast"],
                                        rs["beta_slow"], rs["original_max_position_embeddings"], truncate=True)
    assert np.abs(inv - truncated).max() > 1e-4, "the two variants must differ for this test to mean anything"
    model, _ = float32_model(src)
    # mlx-lm 0.32 always truncates; give its RoPE the published untruncated frequencies.
    for layer in model.layers:
        layer.self_attn.rope._freqs = mx.array((1.0 / inv).astype(np.float32))
    tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], N_TOKENS).tolist()
    ref = np.array(model(mx.array([tokens]))[0].astype(mx.float32))
    assert_agrees(ref, mixq_logits(workdir, src, tokens))


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlx_default_path_runs_each_conversion(workdir, recipe):
    out = converted(workdir, TRAINED, "trained", recipe)
    model, tokenizer = mlx_lm.load(str(out))
    text = mlx_lm.generate(model, tokenizer, prompt="ROMEO:", max_tokens=12)
    assert isinstance(text, str) and len(text) > 0
