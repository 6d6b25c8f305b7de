"""The `gptq` quantizer judged by mlx: its conversions are plain MLX affine (mlx-lm loads them as
they are, with no custom code), and mlx's float32 logits on them match mixq's runtime."""

import json

import mlx_lm
import pytest

from conftest import TRAINED, calibrate, mixq
from test_runtime_interop import N_TOKENS, assert_agrees, mixq_logits, reference_logits


@pytest.fixture(scope="module")
def hessian_stats(workdir):
    return calibrate(workdir, "hessians.safetensors", "--expert-hessians")


@pytest.mark.parametrize("recipe", ["gpt-oss-120b-3.6bit", "mixed_3_6"])
def test_gptq_logits_match_mlx_float32(workdir, hessian_stats, recipe):
    out = workdir / f"gptq-{recipe}"
    # No --quantizer: statistics with Hessians make gptq the default.
    mixq("convert", "--source", TRAINED, "--recipe", recipe, "--out", out, "--quiet", "--calibration", hessian_stats)
    manifest = json.loads((out / "mixq-manifest.json").read_text())
    assert manifest["quantizer"]["default"] == "gptq"
    assert manifest["quantizer"]["affine_modules"]["gptq"] > 0
    text = (TRAINED.parent / "shakespeare-dev.txt").read_text()[:2000]
    _, tokenizer = mlx_lm.load(str(TRAINED))
    tokens = tokenizer.encode(text)[:N_TOKENS]
    assert_agrees(reference_logits(out, tokens), mixq_logits(workdir, out, tokens))
