"""mixq's affine quantization against mx.quantize, byte for byte, on adversarial matrices
(constant, all-zero, all-negative groups, exact ties, symmetric ranges, tiny and huge values,
ranges below mlx's epsilon) for every supported bits and group size."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import mixq, read_shard, write_shard

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]
TARGETS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"]


def bf16_exact(x):
    """Rounds float32 values to bf16 (keeping the top 16 bits) so they are exact in both."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def adversarial(rows, cols, seed):
    rng = np.random.default_rng(seed)
    m = np.zeros((rows, cols), dtype=np.float32)
    for r in range(rows):
        kind = r % 12
        g = np.arange(cols)
        if kind == 0:
            row = np.zeros(cols)
        elif kind == 1:
            row = np.full(cols, rng.choice([-1, 1]) * 10.0 ** rng.uniform(-3, 1))
        elif kind == 2:
            row = -np.abs(rng.standard_normal(cols)) - 0.01
        elif kind == 3:
            row = np.abs(rng.standard_normal(cols)) * 0.05
        elif kind == 4:
            # Exact ties for every width: half-integers on [0, 2^b - 1] with both ends present.
            b = [2, 3, 4, 5, 6][(r // 12) % 5]
            n = 2**b - 1
            row = rng.integers(0, 2 * n + 1, cols) / 2.0
            row[::32] = 0.0
            row[1::32] = n
        elif kind == 5:
            a = rng.uniform(0.01, 1)
            row = rng.uniform(-a, a, cols)
            row[::16] = a
            row[1::16] = -a
        elif kind == 6:
            row = rng.standard_normal(cols) * 1e-30
        elif kind == 7:
            row = rng.standard_normal(cols) * 1e30
        elif kind == 8:
            row = np.where(g % 2 == 0, 1.0, 1.0078125)
        elif kind == 9:
            row = rng.standard_t(2, cols) * 0.02
        elif kind == 10:
            # Groups of 32 of alternating kinds inside one row.
            row = np.concatenate([np.zeros(32), np.full(32, -3.0), rng.standard_normal(cols - 64)])[:cols]
        else:
            row = np.where(g % 32 == 5, -8.0, rng.standard_normal(cols) * 0.01)
        m[r] = row
    return bf16_exact(m)


@pytest.fixture(scope="module")
def adversarial_source(workdir):
    src = workdir / "adversarial-src"
    mixq("synth", "--preset", "tiny", "--hidden", 128, "--intermediate", 128, "--out", src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    written = {}
    for i, name in enumerate(TARGETS):
        shard = src / index["weight_map"][name]
        header, data = read_shard(shard)
        start, end = header[name]["data_offsets"]
        rows, cols = header[name]["shape"]
        m = adversarial(rows, cols, seed=i)
        data[start:end] = (m.view(np.uint32) >> 16).astype("<u2").tobytes()
        write_shard(shard, header, data)
        written[name] = m
    return src, written


def adversarial_recipe(workdir, bits, group_size):
    """A recipe quantizing the adversarial targets (embeddings, attention, lm_head) alone."""
    recipe = workdir / f"recipe-{bits}-{group_size}.yaml"
    recipe.write_text(
        "name: adversarial\nrules:\n"
        "  - class: [norm, bias, sinks, router]\n    action: keep\n"
        "  - class: experts\n    action: mxfp4\n"
        f"  - class: [embed_tokens, lm_head, attention]\n    action: {{affine: {{bits: {bits}, group_size: {group_size}}}}}\n"
    )
    return recipe


def convert_adversarial(workdir, src, bits, group_size, quantizer):
    """Converts the adversarial source at one bits x group size with `quantizer`; returns every
    tensor of the output by name."""
    recipe = adversarial_recipe(workdir, bits, group_size)
    out = workdir / f"adversarial-{quantizer}-{bits}-{group_size}"
    mixq("convert", "--source", src, "--recipe", recipe, "--out", out, "--force", "--quiet", "--quantizer", quantizer)
    tensors = {}
    for f in out.glob("model*.safetensors"):
        tensors.update(mx.load(str(f)))
    return tensors


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_affine_matches_mx_quantize(workdir, adversarial_source, bits, group_size):
    src, written = adversarial_source
    ours = convert_adversarial(workdir, src, bits, group_size, "minmax")
    for name, m in written.items():
        module = name[: -len(".weight")]
        w = mx.array(m).astype(mx.bfloat16)
        wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        for suffix, want in (("weight", wq), ("scales", scales), ("biases", biases)):
            got = ours[f"{module}.{suffix}"]
            assert got.dtype == want.dtype and got.shape == want.shape, (name, suffix)
            a = np.array(got.view(mx.uint8))
            b = np.array(want.view(mx.uint8))
            if not np.array_equal(a, b):
                bad = np.argwhere(a.reshape(got.shape[0], -1) != b.reshape(got.shape[0], -1))[:5]
                pytest.fail(f"{module}.{suffix} ({bits}-bit gs{group_size}) differs at {bad.tolist()}")
