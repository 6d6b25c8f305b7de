"""`mixq validate`'s perplexity equals the one computed from mlx-lm's float32 logits (weights
dequantized in f32) over the same sliding windows, on the trained model and its held-out text."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import TRAINED, mixq
from mlx_reference import float32_model

TEXT = TRAINED.parent / "shakespeare-dev.txt"


def mlx_perplexity(model, tokens, ctx, stride):
    """The usual sliding-window perplexity: each window scores the targets no earlier window
    scored, and never its own first token."""
    nll, count, prev_end, begin = 0.0, 0, 0, 0
    while begin < len(tokens):
        end = min(begin + ctx, len(tokens))
        window = tokens[begin:end]
        logits = np.array(model(mx.array([window]))[0].astype(mx.float32)).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        for t in range(max(prev_end, begin + 1), end):
            nll -= logp[t - 1 - begin, tokens[t]]
            count += 1
        prev_end = end
        if end == len(tokens):
            break
        begin += stride
    return float(np.exp(nll / count)), count


@pytest.mark.parametrize("form", ["upstream", "gpt-oss-120b-3.6bit"])
@pytest.mark.parametrize("ctx,stride", [(256, 256), (256, 96)])
def test_perplexity_matches_mlx(workdir, form, ctx, stride):
    model_dir = TRAINED
    if form != "upstream":
        model_dir = workdir / f"val-{form}"
        if not model_dir.exists():
            mixq("convert", "--source", TRAINED, "--recipe", form, "--out", model_dir, "--quiet", "--quantizer", "minmax")
    model, tokenizer = float32_model(model_dir)
    tokens = tokenizer.encode(TEXT.read_text())[:1024]
    want, count = mlx_perplexity(model, tokens, ctx, stride)
    got = json.loads(mixq("validate", "--model", model_dir, "--text", TEXT, "--ctx", ctx, "--stride", stride,
                          "--max-tokens", 1024, "--json"))
    assert got["tokens"] == count
    assert abs(got["ppl"] / want - 1) < 1e-3, f"mixq {got['ppl']} vs mlx {want}"
