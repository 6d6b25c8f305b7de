"""mixq's conversions against mlx's own: mlx_lm.load opens them strictly, every tensor is
byte-identical to mlx's conversion of the same source with the same allocation, and the logits
of the two models are identical."""

import glob
import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import TRAINED, mixq
from mlx_reference import MIXED_MXFP4_RECIPE, reference_model

RECIPES = ["gpt-oss-120b-3.6bit", "mixed_3_6", "mxfp4-experts"]
SHAPES = ["tiny", "small", "wide"]


def as_bytes(a):
    return np.array(a.view(mx.uint8)) if a.dtype != mx.uint8 else np.array(a)


def check_against_mlx(src, out, recipe, edit_reference=None):
    """`out` against mlx's conversion of `src` under `recipe` (after `edit_reference(model)`, for
    tensors mlx computes from another source): same tensors, map, and logits in mlx-lm."""
    ref, ref_map = reference_model(src, recipe)
    if edit_reference is not None:
        edit_reference(ref)
    ours = {}
    for f in glob.glob(str(out / "model*.safetensors")):
        ours.update(mx.load(f))
    theirs = dict(tree_flatten(ref.parameters()))
    assert sorted(ours) == sorted(theirs)
    for name, want in theirs.items():
        got = ours[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert np.array_equal(as_bytes(got), as_bytes(want)), f"{name} differs from mlx's conversion"

    config = json.loads((out / "config.json").read_text())
    qmap = {k: v for k, v in config["quantization"].items() if isinstance(v, dict)}
    assert qmap == ref_map, "the quantization map names exactly the modules mlx quantized"

    model, tokenizer = mlx_lm.load(str(out))  # strict by default
    tokens = mx.array([[1, 5, 9, 2, 7, 3, 11, 4, 6, 8, 10, 12]])
    a, b = model(tokens), ref(tokens)
    mx.eval(a, b)
    assert np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))), "logits differ"
    text = tokenizer.decode([1, 2, 3])
    assert isinstance(text, str)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_generated_checkpoints_match_mlx(workdir, shape, recipe):
    src = workdir / f"src-{shape}"
    if not src.exists():
        mixq("synth", "--preset", shape, "--out", src)
    out = workdir / f"out-{shape}-{recipe}"
    mixq("convert", "--source", src, "--recipe", recipe, "--out", out, "--force", "--quiet", "--quantizer", "minmax")
    check_against_mlx(src, out, recipe)


@pytest.mark.parametrize("recipe", RECIPES)
def test_trained_model_matches_mlx(workdir, recipe):
    out = workdir / f"trained-{recipe}"
    mixq("convert", "--source", TRAINED, "--recipe", recipe, "--out", out, "--force", "--quiet", "--quantizer", "minmax")
    check_against_mlx(TRAINED, out, recipe)
    mixq("verify", out)


def test_searched_mix_of_mxfp4_and_affine_experts_matches_mlx(workdir):
    """A recipe as `recipe search` writes it when some layers' experts stay MXFP4: mlx-lm loads
    the mixed map, and every tensor and the logits equal mlx's own conversion."""
    recipe = workdir / "mixed-mxfp4.yaml"
    recipe.write_text(MIXED_MXFP4_RECIPE)
    out = workdir / "trained-mixed-mxfp4"
    mixq("convert", "--source", TRAINED, "--recipe", recipe, "--out", out, "--force", "--quiet", "--quantizer", "minmax")
    config = json.loads((out / "config.json").read_text())
    modes = {k: v.get("mode") for k, v in config["quantization"].items() if isinstance(v, dict) and ".experts." in k}
    assert sorted(k for k, m in modes.items() if m == "mxfp4") == [
        "model.layers.0.mlp.experts.gate_proj",
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.2.mlp.experts.gate_proj",
        "model.layers.3.mlp.experts.gate_proj",
    ]
    check_against_mlx(TRAINED, out, "mixed-mxfp4")
