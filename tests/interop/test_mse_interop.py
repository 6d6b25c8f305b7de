"""The `mse` quantizer judged by mlx: on adversarial matrices no group's error is above the error of
`mx.quantize`'s own result, for every bits and group size; mse conversions (with and without
calibration) load in mlx-lm as they are, and mlx's float32 logits on them match mixq's runtime."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from conftest import TRAINED, calibrate, mixq
from test_quantize_interop import BITS, GROUPS, adversarial_source, convert_adversarial  # noqa: F401 (fixture)
from test_runtime_interop import N_TOKENS, assert_agrees, mixq_logits, reference_logits


def codes_of(wq, bits, group_size):
    """The integer codes of a packed weight (unit scale, zero bias: exact in any arithmetic)."""
    rows, groups = wq.shape[0], wq.shape[1] * 32 // bits // group_size
    ones = mx.ones((rows, groups), dtype=mx.float32)
    zeros = mx.zeros((rows, groups), dtype=mx.float32)
    return np.array(mx.dequantize(wq, ones, zeros, group_size, bits, mode="affine")).astype(np.float32)


def group_errors(w, wq, scales, biases, bits, group_size):
    """Squared error per group, dequantizing as `scale*q + bias` in float32 (numpy: no fused
    multiply-add), summed in float64."""
    q = codes_of(wq, bits, group_size)
    s = np.repeat(np.array(scales.astype(mx.float32)), group_size, axis=1)
    b = np.repeat(np.array(biases.astype(mx.float32)), group_size, axis=1)
    back = s * q + b
    d = back.astype(np.float64) - w.astype(np.float64)
    return (d * d).reshape(w.shape[0], -1, group_size).sum(-1)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_mse_is_never_worse_than_mx_quantize_for_any_group(workdir, adversarial_source, bits, group_size):  # noqa: F811
    src, written = adversarial_source
    ours = convert_adversarial(workdir, src, bits, group_size, "mse")
    better = 0
    for name, m in written.items():
        module = name[: -len(".weight")]
        theirs = mx.quantize(mx.array(m).astype(mx.bfloat16), group_size=group_size, bits=bits)
        e_mlx = group_errors(m, *theirs, bits, group_size)
        e_ours = group_errors(m, ours[f"{module}.weight"], ours[f"{module}.scales"], ours[f"{module}.biases"], bits, group_size)
        worse = np.argwhere(e_ours > e_mlx)
        assert worse.size == 0, f"{module} ({bits}-bit gs{group_size}): groups {worse[:5].tolist()} worse than mx.quantize"
        better += int((e_ours < e_mlx).sum())
    assert better > 0, "the search improves some groups"


@pytest.fixture(scope="module")
def calibration(workdir):
    return calibrate(workdir, "stats.safetensors")


def mse_conversion(workdir, src, name, recipe, stats=None):
    out = workdir / f"mse-{name}-{recipe}-{'cal' if stats else 'plain'}"
    if not out.exists():
        extra = ["--calibration", stats] if stats else []
        mixq("convert", "--source", src, "--recipe", recipe, "--out", out, "--quiet", "--quantizer", "mse", *extra)
    return out


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("recipe", ["gpt-oss-120b-3.6bit", "mixed_3_6"])
def test_mse_logits_match_mlx_float32(workdir, calibration, recipe, calibrated):
    out = mse_conversion(workdir, TRAINED, "trained", recipe, calibration if calibrated else None)
    text = (TRAINED.parent / "shakespeare-dev.txt").read_text()[:2000]
    _, tokenizer = mlx_lm.load(str(TRAINED))
    tokens = tokenizer.encode(text)[:N_TOKENS]
    assert_agrees(reference_logits(out, tokens), mixq_logits(workdir, out, tokens))
    manifest = json.loads((out / "mixq-manifest.json").read_text())
    assert manifest["quantizer"]["default"] == "mse"
    assert (manifest["quantizer"]["calibration"] is not None) == calibrated


def test_mse_synthetic_shape_matches_mlx_float32(workdir):
    src = workdir / "mse-src-wide"
    if not src.exists():
        mixq("synth", "--preset", "wide", "--out", src)
    out = mse_conversion(workdir, src, "wide", "gpt-oss-120b-3.6bit")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tokens = np.random.default_rng(11).integers(0, vocab, N_TOKENS).tolist()
    assert_agrees(reference_logits(out, tokens), mixq_logits(workdir, out, tokens))


def test_mlx_default_path_runs_a_calibrated_mse_conversion(workdir, calibration):
    out = mse_conversion(workdir, TRAINED, "trained", "gpt-oss-120b-3.6bit", calibration)
    model, tokenizer = mlx_lm.load(str(out))
    text = mlx_lm.generate(model, tokenizer, prompt="ROMEO:", max_tokens=12)
    assert isinstance(text, str) and len(text) > 0
