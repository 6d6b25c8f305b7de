"""mlx's own conversion of an upstream gpt-oss checkpoint, as the reference mixq is judged by.

The upstream checkpoint is loaded with mlx-lm (experts arrive as MXFP4), every quantized layer is
dequantized back to bf16 (MXFP4 values are exact in bf16), and `nn.quantize` is applied with a
predicate written here, independently of mixq's recipe engine, for each shipped recipe.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model, load


def _layer(path):
    parts = path.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def predicate_36bit(n_layers, layer_types):
    """gpt-oss-120b-3.6bit: bf16 router; 6-bit embed/lm_head/v/o and edge or full-attention q/k;
    4-bit other q/k; 3-bit experts; group size 64."""
    edge = n_layers // 6

    def pred(path, module):
        if not hasattr(module, "to_quantized") or path.endswith("router"):
            return False
        l = _layer(path)
        six = {"group_size": 64, "bits": 6, "mode": "affine"}
        if path in ("model.embed_tokens", "lm_head") or path.endswith(("v_proj", "o_proj")):
            return six
        if path.endswith(("q_proj", "k_proj")):
            if l < edge or l >= n_layers - edge or layer_types[l] == "full_attention":
                return six
            return {"group_size": 64, "bits": 4, "mode": "affine"}
        if ".experts." in path:
            return {"group_size": 64, "bits": 3, "mode": "affine"}
        raise AssertionError(f"unexpected module {path}")

    return pred


def predicate_mixed_3_6(n_layers, layer_types):
    """mlx-lm's own mixed_3_6 predicate, taken from mlx_lm.convert."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    def pred_factory(model):
        inner = mixed_quant_predicate_builder("mixed_3_6", model, 64)

        def pred(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            return inner(path, module)

        return pred

    return pred_factory


def predicate_mxfp4_experts(n_layers, layer_types):
    """mxfp4-experts: experts stay as loaded (MXFP4); router bf16; 6-bit the rest."""

    def pred(path, module):
        if not hasattr(module, "to_quantized") or path.endswith("router"):
            return False
        if ".experts." in path:
            return False
        return {"group_size": 64, "bits": 6, "mode": "affine"}

    return pred


# A searched recipe's shape (MIXED_MXFP4_RECIPE): some layers' experts kept in MXFP4, the rest
# 3-bit gs128; router bf16; 6-bit gs64 the rest.
MIXED_MXFP4_RECIPE = """name: mixed-mxfp4
description: Some layers' experts kept in MXFP4, the others affine, as recipe search writes them.
rules:
  - class: [norm, router, bias, sinks]
    action: keep
  - class: experts_gate
    layers: ["0", "2-3"]
    action: mxfp4
  - class: experts_down
    layers: ["1"]
    action: mxfp4
  - class: experts
    action: {affine: {bits: 3, group_size: 128}}
  - class: [embed_tokens, lm_head, attention]
    action: {affine: {bits: 6, group_size: 64}}
"""


def keeps_mxfp4_mixed(path):
    """Whether MIXED_MXFP4_RECIPE keeps the expert module at `path` in MXFP4."""
    l = _layer(path)
    return (path.endswith("gate_proj") and l in (0, 2, 3)) or (path.endswith("down_proj") and l == 1)


def predicate_mxfp4_mixed(n_layers, layer_types):
    """MIXED_MXFP4_RECIPE's affine modules (the kept experts stay as loaded)."""

    def pred(path, module):
        if not hasattr(module, "to_quantized") or path.endswith("router"):
            return False
        if ".experts." in path:
            assert not keeps_mxfp4_mixed(path), path
            return {"group_size": 128, "bits": 3, "mode": "affine"}
        return {"group_size": 64, "bits": 6, "mode": "affine"}

    return pred


PREDICATES = {
    "gpt-oss-120b-3.6bit": predicate_36bit,
    "mixed_3_6": predicate_mixed_3_6,
    "mxfp4-experts": predicate_mxfp4_experts,
    "mixed-mxfp4": predicate_mxfp4_mixed,
}

# Recipes that keep some experts as loaded (MXFP4): which.
KEEPS_MXFP4 = {"mxfp4-experts": lambda path: True, "mixed-mxfp4": keeps_mxfp4_mixed}


def reference_model(src, recipe):
    """mlx's conversion of `src` under `recipe`: (model, {path: params} quantization map)."""
    model, _ = load(str(src), lazy=False)
    n = len(model.layers)
    layer_types = model.model.layer_types
    if recipe in KEEPS_MXFP4:
        # The experts the recipe does not keep are dequantized (exact in bf16), the rest stay.
        keep = KEEPS_MXFP4[recipe]
        dequantized = dict(dequantize_model(load(str(src), lazy=False)[0]).named_modules())
        swaps = [
            (path, dequantized[path])
            for path, m in model.named_modules()
            if getattr(m, "mode", None) == "mxfp4" and not keep(path)
        ]
        if swaps:
            model.update_modules(tree_unflatten(swaps))
    else:
        model = dequantize_model(model)
    # The model dtype is bf16: the dequantized experts (exact values) are cast to it.
    params = [
        (k, v.astype(mx.bfloat16) if v.dtype in (mx.float16, mx.float32) else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    factory = PREDICATES[recipe](n, layer_types)
    pred = factory(model) if recipe == "mixed_3_6" else factory
    qmap = {}

    def recording(path, module):
        r = pred(path, module)
        if r:
            qmap[path] = r
        return r

    nn.quantize(model, group_size=64, bits=4, class_predicate=recording)
    # Layers that stayed as loaded (MXFP4 experts) are quantized too; record their mode.
    for path, module in model.named_modules():
        if getattr(module, "mode", None) == "mxfp4":
            qmap[path] = {"group_size": module.group_size, "bits": module.bits, "mode": "mxfp4"}
    return model, qmap


def float32_model(path):
    """mlx-lm's model of a checkpoint with every weight dequantized in float32 (scale*q + bias
    with f32 scales and biases; mlx-lm's own dequantize_model rounds to bf16) and float32
    activations: the reference for the maths, free of mlx's bf16 CPU quantized matmul."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    model, tokenizer = load(str(path))
    replaced = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            continue
        if m.mode == "affine":
            w = mx.dequantize(
                m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), m.group_size, m.bits, mode="affine"
            )
        else:
            w = mx.dequantize(m.weight, m.scales, None, m.group_size, m.bits, mode=m.mode, dtype=mx.float32)
        has_bias = "bias" in m
        if isinstance(m, nn.QuantizedLinear):
            new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        elif isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(w.shape[0], w.shape[1])
        else:
            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias=has_bias)
        new.weight = w
        if has_bias:
            new.bias = m.bias
        replaced.append((name, new))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())]))
    return model, tokenizer
