"""mlx-lm's prefill and decode speed on the CPU, for `cargo bench --bench runtime`.

Usage: mlx_generate.py MODEL PROMPT_TOKENS DECODE_TOKENS
Loads MODEL with mlx_lm.load (the default quantized path), prefills PROMPT_TOKENS fixed token ids
through a prompt cache, then decodes DECODE_TOKENS greedily one at a time. Prints
`MIXQ_BENCH_JSON {...}` with the token rates.
"""

import json
import sys
import time

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache


def main(model_dir, n_prompt, n_decode):
    model, _ = load(model_dir)
    vocab = model.args.vocab_size
    prompt = mx.array([np.random.default_rng(0).integers(1, vocab, n_prompt).tolist()])
    # Warm-up on a short input so one-time costs are not timed.
    mx.eval(model(prompt[:, :8], cache=make_prompt_cache(model)))
    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache)[:, -1]
    token = mx.argmax(logits, axis=-1)
    mx.eval(token)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        logits = model(token[:, None], cache=cache)[:, -1]
        token = mx.argmax(logits, axis=-1)
        mx.eval(token)
    t2 = time.perf_counter()
    print("MIXQ_BENCH_JSON " + json.dumps({"prefill_tps": n_prompt / (t1 - t0), "decode_tps": n_decode / (t2 - t1)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
