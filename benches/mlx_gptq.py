"""mlx-lm's own GPTQ on a gpt-oss checkpoint, as `python -m mlx_lm.quant.gptq` runs it, with
local calibration text: for `scripts/compare-mlx-gptq`.

Usage: mlx_gptq.py UPSTREAM TEXT OUT NUM_SAMPLES SEQUENCE_LENGTH
mlx-lm cannot run GPTQ on MXFP4 experts, so UPSTREAM is first dequantized with
`mlx_lm.convert(dequantize=True)`; the model is cast to float32 (mlx's CPU GatherMM, the
experts, supports float32 only) and `gptq_quantize(model, data, 4, 64, 6, 64)` runs on the first
NUM_SAMPLES x SEQUENCE_LENGTH tokens of TEXT (its CLI's allocation: every Linear and
SwitchLinear 4-bit g64 by GPTQ, the embedding 6-bit g64 by min-max). Every float tensor is cast
to bf16 before saving (what the same run on a bf16 model with a GPU writes), so mixq's runtime
can score it. Prints `MIXQ_BENCH_JSON {...}` with the GPTQ wall time and bits per weight.
"""

import json
import sys
import tempfile
import time

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.quant.gptq import gptq_quantize
from mlx_lm.utils import compute_bits_per_weight, load, save


def main(upstream, text, out, num_samples, seq_len):
    mx.random.seed(123)
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = f"{tmp}/bf16"
        mlx_lm.convert(hf_path=upstream, mlx_path=bf16, dequantize=True)
        model, tokenizer, config = load(bf16, return_config=True)
        model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())]))
        ids = tokenizer.encode(open(text).read())
        data = mx.array(ids[: num_samples * seq_len]).reshape(num_samples, seq_len)
        t0 = time.perf_counter()
        model, config["quantization"] = gptq_quantize(model, data, 4, 64, 6, 64)
        mx.eval(model.parameters())
        secs = time.perf_counter() - t0
        model.update(
            tree_unflatten(
                [(k, v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in tree_flatten(model.parameters())]
            )
        )
        bpw = compute_bits_per_weight(model)
        save(out, bf16, model, tokenizer, config)
    print("MIXQ_BENCH_JSON " + json.dumps({"seconds": secs, "bits_per_weight": bpw, "tokens": int(data.size)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
