"""mlx-lm's conversion of an upstream gpt-oss checkpoint, timed, for `cargo bench --bench convert`.

Usage: mlx_convert.py SOURCE OUT [RECIPE]

Builds the reference model with tests/interop/mlx_reference.py (load, dequantize the MXFP4
experts, `nn.quantize` with the recipe's allocation) and writes it with `mlx_lm.utils.save_model`.
The last line printed is `MIXQ_BENCH_JSON {...}` with the phase times in seconds; the bench reads it.
mlx evaluates lazily, so most of the dequantize/quantize work is done inside `save`.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))


def main(argv):
    if len(argv) not in (3, 4):
        sys.exit(f"usage: {argv[0]} SOURCE OUT [RECIPE]")
    src, out = argv[1], argv[2]
    recipe = argv[3] if len(argv) == 4 else "gpt-oss-120b-3.6bit"

    t0 = time.perf_counter()
    import mlx.core as mx
    from mlx_lm.utils import save_model
    from mlx_reference import reference_model

    t1 = time.perf_counter()
    model, qmap = reference_model(src, recipe)
    t2 = time.perf_counter()
    save_model(out, model)
    t3 = time.perf_counter()

    figures = {
        "import": t1 - t0,
        "build": t2 - t1,
        "save": t3 - t2,
        "quantized_modules": len(qmap),
    }
    peak = getattr(mx, "get_peak_memory", None)
    if peak is not None:
        figures["mlx_peak_memory"] = peak()
    print("MIXQ_BENCH_JSON " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main(sys.argv)
