"""mixq reading checkpoints that mlx-lm itself wrote, judged by how mlx-lm 0.32.2 loads them.

mlx-lm's writers record only part of the quantization in config.json: `mlx_lm.convert -q` writes
a top-level default plus entries for what its predicate returned a dict for (gpt-oss: the 8-bit
router, with no "mode"), and `mlx_lm.gptq` writes the top-level setting plus entries for its
fallback layers only; every other quantized module is known to mlx-lm by its `.scales` tensor and
shapes alone (mlx_lm.utils.infer_quant_config). The models:

- convert-q: `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=64)` of the upstream folder.
  mlx-lm loads the upstream MXFP4 experts as already quantized, so convert leaves them MXFP4 and,
  the config already holding a `quantization` (mxfp4), writes a top-level mxfp4 default with an
  entry for every module it quantized; the experts have no entry.
- convert-q-bf16: the same, from mlx-lm's own dequantized (`convert(dequantize=True)`) copy: the
  truly uniform model, top-level affine 4-bit gs64 plus the six router entries; the 18 expert
  switch layers and the rest have no entry.
- gptq-f32: `mlx_lm.quant.gptq.gptq_quantize` (what `python -m mlx_lm.quant.gptq` runs) on the
  dequantized copy cast to float32 (mlx's CPU GatherMM is float32 only), 4-bit gs64 with a 6-bit
  fallback, saved with mlx_lm.utils.save exactly as its main() does: float32 scales and params.
- gptq-bf16: the same GPTQ output with every float tensor cast to bf16 before saving, which is
  what the same run on a bf16 model with a GPU writes (gptq restores each layer's dtype).
- convert-q-f16: `mlx_lm.convert(quantize=True, dtype="float16")` of the dequantized copy: float16
  scales, biases, norms and sinks.
- dense-f32: `mlx_lm.convert(dtype="float32")` of the dequantized copy, not quantized: every
  weight a float32 matrix (runnable forms only; it has nothing quantized to inspect).
- wrong-default: convert-q-bf16 with a top-level default (8-bit gs32) that no module uses;
  mlx-lm still loads it identically, inferring each module from its tensors.

Every model is checked three ways: `mixq inspect --json` counts exactly the modules mlx-lm
quantizes, by setting, with mlx-lm's bytes, parameters and bits per weight; `mixq logits` on the
CPU matches mlx-lm's float32 reference (weights dequantized in f32) of that same model; and
`mixq validate` gives mlx-lm's float32 perplexity. The float32 and float16 forms also run on the
GPU backend (where an adapter exists) with the same logits.
"""

import json
import math
import os
import shutil
import struct
import subprocess

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import compute_bits_per_weight, get_total_parameters

from conftest import TRAINED, mixq, mixq_bin
from mlx_reference import float32_model
from test_runtime_interop import assert_agrees
from test_validate_interop import mlx_perplexity

TEXT = TRAINED.parent / "shakespeare-dev.txt"
N_TOKENS = 150
VALIDATE_TOKENS = 256

FORMS = ["convert-q", "convert-q-bf16", "gptq-f32", "gptq-bf16", "convert-q-f16", "wrong-default"]
RUNNABLE = FORMS + ["dense-f32"]
# Forms whose floats are not bf16: the GPU widens or reads them as f32.
WIDE_FLOATS = ["gptq-f32", "convert-q-f16", "dense-f32"]


# ---------------------------------------------------------------------------------------------
# Building the models with mlx-lm's own writers


def _set_quantization(dst, edit):
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization"] = edit(cfg["quantization"])
    cfg["quantization_config"] = cfg["quantization"]
    cfg_path.write_text(json.dumps(cfg, indent=4))


def _gptq(src, dst, cast_bf16):
    """mlx_lm.quant.gptq's main() on `src` with local calibration text (its own load_data
    downloads a file): 4 samples of 128 tokens, bits 4 gs64, fallback 6-bit gs64."""
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load, save

    mx.random.seed(123)
    model, tokenizer, config = load(str(src), return_config=True)
    # mlx's CPU GatherMM (the experts) supports float32 only.
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())]))
    ids = tokenizer.encode(TEXT.read_text())
    n, length = 4, 128
    data = mx.array(ids[: n * length]).reshape(n, length)
    model, config["quantization"] = gptq_quantize(model, data, 4, 64, 6, 64)
    if cast_bf16:
        model.update(
            tree_unflatten(
                [(k, v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v)
                 for k, v in tree_flatten(model.parameters())]
            )
        )
    save(str(dst), str(src), model, tokenizer, config)


@pytest.fixture(scope="session")
def mlx_lm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx-lm-written")
    bf16 = root / "bf16"
    mlx_lm.convert(hf_path=str(TRAINED), mlx_path=str(bf16), dequantize=True)
    models = {}
    models["convert-q"] = root / "convert-q"
    mlx_lm.convert(hf_path=str(TRAINED), mlx_path=str(models["convert-q"]), quantize=True, q_bits=4, q_group_size=64)
    models["convert-q-bf16"] = root / "convert-q-bf16"
    mlx_lm.convert(hf_path=str(bf16), mlx_path=str(models["convert-q-bf16"]), quantize=True, q_bits=4, q_group_size=64)
    models["gptq-f32"] = root / "gptq-f32"
    _gptq(bf16, models["gptq-f32"], cast_bf16=False)
    models["gptq-bf16"] = root / "gptq-bf16"
    _gptq(bf16, models["gptq-bf16"], cast_bf16=True)
    models["convert-q-f16"] = root / "convert-q-f16"
    mlx_lm.convert(hf_path=str(bf16), mlx_path=str(models["convert-q-f16"]), quantize=True, q_bits=4, q_group_size=64,
                   dtype="float16")
    models["dense-f32"] = root / "dense-f32"
    mlx_lm.convert(hf_path=str(bf16), mlx_path=str(models["dense-f32"]), dtype="float32")
    models["wrong-default"] = root / "wrong-default"
    shutil.copytree(models["convert-q-bf16"], models["wrong-default"])
    _set_quantization(models["wrong-default"], lambda q: {**q, "group_size": 32, "bits": 8, "mode": "affine"})
    return models


@pytest.fixture(scope="session")
def tokens():
    _, tokenizer = mlx_lm.load(str(TRAINED))
    return tokenizer.encode(TEXT.read_text())


# ---------------------------------------------------------------------------------------------
# What mlx-lm has in each model


def _headers(model_dir):
    """{tensor name: (dtype, shape, nbytes)} over every shard of the checkpoint."""
    out = {}
    for shard in sorted(model_dir.glob("model*.safetensors")):
        with open(shard, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                out[k] = (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0])
    return out


def _label(module):
    if module.mode == "affine":
        return f"affine {module.bits}-bit gs{module.group_size}"
    return module.mode


def _mlx_quantized(model):
    """{module path: mixq's label of its setting} for every module mlx-lm loaded as quantized."""
    return {name: _label(m) for name, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "scales")}


def test_the_models_are_what_mlx_lm_writes(mlx_lm_models):
    """Pins the config.json shapes this file is about, so a change in mlx-lm's writers shows."""
    q = {f: json.loads((mlx_lm_models[f] / "config.json").read_text())["quantization"] for f in FORMS}
    assert "quantization" not in json.loads((mlx_lm_models["dense-f32"] / "config.json").read_text())
    entries = {f: {k for k, v in qq.items() if isinstance(v, dict)} for f, qq in q.items()}
    routers = {f"model.layers.{i}.mlp.router" for i in range(6)}
    assert (q["convert-q"]["mode"], q["convert-q"]["bits"], q["convert-q"]["group_size"]) == ("mxfp4", 4, 32)
    assert len(entries["convert-q"]) == 32 and not any(".experts." in k for k in entries["convert-q"])
    assert q["convert-q"]["model.layers.0.mlp.router"] == {"group_size": 64, "bits": 8}
    assert {k: v for k, v in q["convert-q-bf16"].items() if not isinstance(v, dict)} == {
        "group_size": 64, "bits": 4, "mode": "affine"}
    assert entries["convert-q-bf16"] == routers
    assert q["gptq-f32"] == {"bits": 4, "group_size": 64, "model.embed_tokens": {"bits": 6, "group_size": 64}}
    assert q["gptq-bf16"] == q["gptq-f32"]
    dtypes = {f: {v[0] for k, v in _headers(d).items() if k.endswith(".scales")} for f, d in mlx_lm_models.items()}
    assert dtypes["gptq-f32"] == {"F32"} and dtypes["gptq-bf16"] == {"BF16"}
    assert dtypes["convert-q"] == {"BF16", "U8"}
    assert dtypes["convert-q-f16"] == {"F16"} and dtypes["dense-f32"] == set()
    floats = {f: {v[0] for k, v in _headers(d).items() if v[0] not in ("U32", "U8")} for f, d in mlx_lm_models.items()}
    assert floats["gptq-f32"] == floats["dense-f32"] == {"F32"} and floats["convert-q-f16"] == {"F16"}


@pytest.mark.parametrize("form", FORMS)
def test_inspect_counts_what_mlx_lm_quantizes(mlx_lm_models, form):
    model_dir = mlx_lm_models[form]
    headers = _headers(model_dir)
    with_scales = {k[: -len(".scales")] for k in headers if k.endswith(".scales")}
    model, _ = mlx_lm.load(str(model_dir))
    mlx_q = _mlx_quantized(model)
    assert set(mlx_q) == with_scales, "mlx-lm quantizes exactly the modules that have .scales"
    want = {}
    for label in mlx_q.values():
        want[label] = want.get(label, 0) + 1

    got = json.loads(mixq("inspect", model_dir, "--json"))
    assert got["format"] == "MLX quantized"
    assert got["quantization"] == want, f"mixq {got['quantization']} vs mlx-lm {want} ({len(with_scales)} with .scales)"
    assert sum(got["quantization"].values()) == len(with_scales)
    assert got["tensors"] == len(headers)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]
    size = got["size"]
    assert size["bytes"] == sum(v[2] for v in headers.values()) == index["total_size"]
    assert sum(c["bytes"] for c in got["classes"]) == size["bytes"]
    assert size["parameters"] == get_total_parameters(model) == index["total_parameters"]
    # mlx-lm's compute_bits_per_weight also counts each layer's RoPE `_freqs` buffer (not in the
    # checkpoint: 6 x 32 f32 = 768 bytes here); mixq's is that of the checkpoint's weights.
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert weight_bytes == size["bytes"]
    assert math.isclose(size["bits_per_weight"], weight_bytes * 8 / get_total_parameters(model), rel_tol=1e-12)
    buffers = sum(v.nbytes for l in model.layers for k, v in l.self_attn.rope.items() if isinstance(v, mx.array))
    assert math.isclose(compute_bits_per_weight(model), (weight_bytes + buffers) * 8 / size["parameters"], rel_tol=1e-12)


def _mixq_logits(tmp_path, model_dir, toks):
    tok_file = tmp_path / "tokens.json"
    tok_file.write_text(json.dumps(toks))
    out = tmp_path / "logits.npy"
    mixq("logits", "--model", model_dir, "--tokens", tok_file, "--out", out, "--backend", "cpu")
    return np.load(out)


@pytest.mark.parametrize("form", RUNNABLE)
def test_logits_match_mlx_lm_float32(mlx_lm_models, tokens, tmp_path, form):
    model_dir = mlx_lm_models[form]
    toks = tokens[:N_TOKENS]
    model, _ = float32_model(model_dir)
    ref = np.array(model(mx.array([toks]))[0].astype(mx.float32))
    assert_agrees(ref, _mixq_logits(tmp_path, model_dir, toks))


@pytest.mark.parametrize("form", RUNNABLE)
def test_validate_gives_mlx_lm_perplexity(mlx_lm_models, tokens, form):
    model_dir = mlx_lm_models[form]
    got = json.loads(mixq("validate", "--model", model_dir, "--text", TEXT, "--max-tokens", VALIDATE_TOKENS,
                          "--backend", "cpu", "--json"))
    assert math.isfinite(got["ppl"]) and got["ppl"] > 1
    assert got["gates_failed"] == []
    model, _ = float32_model(model_dir)
    want, count = mlx_perplexity(model, tokens[:VALIDATE_TOKENS], 512, 512)  # mixq's default --ctx
    assert got["tokens"] == count
    assert abs(got["ppl"] / want - 1) < 1e-3, f"mixq {got['ppl']} vs mlx-lm {want}"


@pytest.mark.parametrize("form", WIDE_FLOATS)
def test_float32_and_float16_forms_run_on_the_gpu(mlx_lm_models, tokens, tmp_path, form):
    """The GPU backend reads f32 floats as they are and widens f16 ones: mlx-lm's float32
    reference again. Skipped where no GPU adapter exists, except under CI (lavapipe is there)."""
    model_dir = mlx_lm_models[form]
    toks = tokens[:N_TOKENS]
    tok_file = tmp_path / "tokens.json"
    tok_file.write_text(json.dumps(toks))
    out = tmp_path / "gpu.npy"
    r = subprocess.run([mixq_bin(), "logits", "--model", str(model_dir), "--tokens", str(tok_file), "--out", str(out),
                        "--backend", "gpu"], capture_output=True, text=True)
    if r.returncode != 0 and "adapter" in r.stderr and os.environ.get("CI", "") in ("", "false"):
        pytest.skip(f"no GPU adapter: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    model, _ = float32_model(model_dir)
    ref = np.array(model(mx.array([toks]))[0].astype(mx.float32))
    assert_agrees(ref, np.load(out))


def test_wrong_default_changes_nothing(mlx_lm_models, tmp_path, tokens):
    """mlx-lm infers every entry-less module from its tensors, so a top-level default no module
    uses changes neither its model nor mixq's."""
    toks = tokens[:N_TOKENS]
    a = _mixq_logits(tmp_path, mlx_lm_models["convert-q-bf16"], toks)
    b = _mixq_logits(tmp_path, mlx_lm_models["wrong-default"], toks)
    assert np.array_equal(a, b)


def test_no_top_level_default(mlx_lm_models):
    """Without the top-level group_size/bits (entries only), mlx-lm 0.32.2 refuses to load the
    model (KeyError 'group_size' in load_model's _quantize), so there is no reference for mixq."""
    src = mlx_lm_models["convert-q-bf16"]
    dst = src.parent / "no-default"
    if not dst.exists():
        shutil.copytree(src, dst)
        _set_quantization(dst, lambda q: {k: v for k, v in q.items() if isinstance(v, dict)})
    with pytest.raises(KeyError):
        mlx_lm.load(str(dst))
    pytest.skip("mlx-lm 0.32.2 does not load a quantization map without its top-level default")
