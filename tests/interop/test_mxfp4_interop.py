"""mixq's MXFP4 encoder (the recipe action `mxfp4` on a transformers dense source) against mlx's
own: every expert's `weight` and `scales` are byte-identical to `mx.quantize(w, group_size=32,
bits=4, mode="mxfp4")` of the same dense values in the source's float type, on random data with
edge cases (zeros, -0, E2M1 ties, scales at and just past a power of two, the type's largest and
smallest magnitudes) and on a dense copy of the bundled model, which mlx-lm then loads and runs
exactly as mlx's own conversion of that copy (test_convert_interop.check_against_mlx)."""

import json
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from conftest import TRAINED, mixq, mixq_bin
from test_convert_interop import check_against_mlx

# E2M1 values by code, for decoding the upstream blocks independently of mixq and mlx.
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
DTYPES = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}
# Dense stems of the expert tensors, and the MLX modules that read them (gate: even columns).
MODULES = [("gate_up_proj", "gate_proj", 0, 2), ("gate_up_proj", "up_proj", 1, 2), ("down_proj", "down_proj", 0, 1)]


def decode_blocks(blocks, scales):
    """[E, R, C/32, 16] codes with [E, R, C/32] E8M0 scales as float32 [E, R, C]."""
    b = np.array(blocks)
    codes = np.stack([b & 15, b >> 4], -1).reshape(*b.shape[:2], -1)
    return E2M1[codes] * np.repeat(np.exp2(np.array(scales).astype(np.float32) - 127), 32, -1)


def write_dense_copy(src, dst, dtype, experts=None):
    """transformers' dense layout of the upstream checkpoint `src` in `dtype`: the MXFP4 experts
    decoded and transposed to [E, C, R]; `experts(stem, w)` may replace them (w as [E, R, C])."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for f in sorted(src.glob("model*.safetensors")):
        tensors.update(mx.load(str(f)))
    out = {}
    for name, v in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            stem = name[: -len("_blocks")]
            w = decode_blocks(v, tensors[stem + "_scales"])
            if experts is not None:
                w = experts(stem, w)
            out[stem] = mx.array(np.ascontiguousarray(w.transpose(0, 2, 1))).astype(dtype)
        else:
            out[name] = v.astype(dtype)
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata={"format": "pt"})
    return dst


def mlx_experts(dense_dir, n_layers):
    """mx.quantize(mode="mxfp4") of every expert module of a dense checkpoint, by MLX name."""
    dense = mx.load(str(dense_dir / "model.safetensors"))
    out = {}
    for layer in range(n_layers):
        for stem, module, start, step in MODULES:
            w = dense[f"model.layers.{layer}.mlp.experts.{stem}"][..., start::step].transpose(0, 2, 1)
            q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
            out[f"model.layers.{layer}.mlp.experts.{module}.weight"] = q
            out[f"model.layers.{layer}.mlp.experts.{module}.scales"] = s
    return out


def assert_experts_match(out_dir, want):
    got = mx.load(str(out_dir / "model.safetensors")) if (out_dir / "model.safetensors").exists() else {}
    for f in out_dir.glob("model-*.safetensors"):
        got.update(mx.load(str(f)))
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        a, b = np.array(g).view(np.uint8), np.array(w).view(np.uint8)
        assert np.array_equal(a, b), f"{name}: {int((a != b).sum())} bytes differ from mx.quantize"


def edge_blocks(dtype):
    """Blocks of 32 values whose encoding has a rule to get right, exact in `dtype`."""
    grid = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0.5, -0.0], np.float32)
    tiny = {"bf16": 2.0**-133, "f16": 2.0**-24, "f32": 2.0**-149}[dtype]
    big = {"bf16": 2.0**120, "f16": 2.0**14, "f32": 2.0**120}[dtype]
    small = {"bf16": 2.0**-120, "f16": 2.0**-20, "f32": 2.0**-120}[dtype]
    blocks = [np.zeros(32), np.full(32, -0.0), np.full(32, tiny), np.full(32, -tiny)]
    for k in [0.0, -7.0, 9.0]:
        for top in [6.0, 4.0, 3.0, 7.0, 5.0, 8.0, 1.0, 0.5]:
            b = np.zeros(32, np.float32)
            b[: len(grid)] = grid * (top / 6.0)
            b[0] = top
            blocks.append(b * 2.0**k)
            blocks.append(-b * 2.0**k)
    blocks += [np.linspace(-1, 1, 32) * big, np.linspace(-1, 1, 32) * small, np.linspace(-6, 6, 32) * small]
    if dtype == "f16":
        # d = 7 * 2^-24 / 6 rounds to 2^-24 in float16: scale 2^-24 (in float32 it would be 2^-23).
        blocks.append(np.full(32, 7 * 2.0**-24))
    return [np.asarray(b, np.float32) for b in blocks]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_random_and_edge_experts_match_mx_quantize(workdir, dtype):
    src = workdir / "mxfp4-src-tiny"
    if not src.exists():
        mixq("synth", "--preset", "tiny", "--out", src)
    rng = np.random.default_rng(19)
    edges = edge_blocks(dtype)
    spread = {"bf16": 60, "f16": 8, "f32": 60}[dtype]

    def experts(stem, w):
        e, r, c = w.shape
        blocks = rng.standard_normal((e, r, c // 32, 32)) * np.exp2(rng.uniform(-spread, spread, (e, r, c // 32, 1)))
        flat = blocks.reshape(-1, 32)
        for i, b in enumerate(edges):
            flat[i * 7 % len(flat)] = b
        # Round to the type first, so the file holds exactly these values.
        return np.array(mx.array(blocks.reshape(e, r, c).astype(np.float32)).astype(DTYPES[dtype]).astype(mx.float32))

    dense = write_dense_copy(src, workdir / f"mxfp4-dense-{dtype}", DTYPES[dtype], experts)
    out = workdir / f"mxfp4-out-{dtype}"
    mixq("convert", "--source", dense, "--recipe", "mxfp4-experts", "--out", out, "--force", "--quiet", "--quantizer", "minmax")
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert_experts_match(out, mlx_experts(dense, n_layers))


def test_groups_mlx_cannot_encode_are_refused(workdir):
    """mlx wraps the scale byte of a group whose max/6 is below 2^-127 (garbage: 1e-39 gets byte
    251, 2^124); mixq refuses such a source, naming the tensor."""
    w = mx.array(np.full((1, 32), 1e-39, np.float32))
    _, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
    assert int(np.array(s)[0, 0]) == 251, "mlx's wrapped scale byte"
    src = workdir / "mxfp4-src-tiny"
    if not src.exists():
        mixq("synth", "--preset", "tiny", "--out", src)

    def experts(stem, w):
        w = w.copy()
        w[0, 3, :32] = 1e-39  # gate_up row 3 is up_proj's row 1
        return w

    dense = write_dense_copy(src, workdir / "mxfp4-dense-underflow", mx.float32, experts)
    out = workdir / "mxfp4-out-underflow"
    r = subprocess.run([mixq_bin(), "convert", "--source", dense, "--recipe", "mxfp4-experts", "--out", out, "--quiet"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "model.layers.0.mlp.experts.up_proj.weight: output row 1: the group at element 0" in r.stderr, r.stderr
    assert "below 6 * 2^-127" in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_dense_copy_of_the_trained_model_matches_mlx(workdir, dtype):
    """The bundled model's dense copy converts to exactly mlx's encoding of its dense experts
    (with every other tensor as mlx converts the upstream model), loads in mlx-lm and gives mlx's
    logits; against the upstream MXFP4 blocks, every value is kept and the blocks that differ
    are counted (mlx's scale is the smallest power of two holding max|w|/6)."""
    dense = write_dense_copy(TRAINED, workdir / f"trained-dense-{dtype}", DTYPES[dtype])
    out = workdir / f"trained-dense-{dtype}-mxfp4"
    mixq("convert", "--source", dense, "--recipe", "mxfp4-experts", "--out", out, "--force", "--quiet", "--quantizer", "minmax")
    n_layers = json.loads((TRAINED / "config.json").read_text())["num_hidden_layers"]
    want = mlx_experts(dense, n_layers)
    assert_experts_match(out, want)

    upstream = {}
    for f in sorted(TRAINED.glob("model*.safetensors")):
        upstream.update(mx.load(str(f)))
    differing = total = 0
    for layer in range(n_layers):
        for stem, module, start, step in MODULES:
            up = f"model.layers.{layer}.mlp.experts.{stem}"
            rows = slice(start, None, step)
            ob, os_ = np.array(upstream[up + "_blocks"])[:, rows], np.array(upstream[up + "_scales"])[:, rows]
            name = f"model.layers.{layer}.mlp.experts.{module}"
            nb = np.array(want[name + ".weight"]).view(np.uint8).reshape(ob.shape)
            ns = np.array(want[name + ".scales"])
            assert np.array_equal(decode_blocks(ob, os_), decode_blocks(nb, ns)), f"{name}: a value changed"
            same = (ob == nb).all(-1) & (os_ == ns)
            differing += int((~same).sum())
            total += same.size
    print(f"{dtype}: {differing} of {total} expert blocks differ in bytes from the upstream original")

    # The whole conversion is mlx's: the upstream reference with mx.quantize's dense experts.
    check_against_mlx(TRAINED, out, "mxfp4-experts", edit_reference=lambda ref: ref.update(tree_unflatten(list(want.items()))))
