"""mlx-lm's perplexity of a model on a text over the same windows as `mixq validate`, timed, for
`cargo bench --bench validate`.

Usage: mlx_perplexity.py MODEL TEXT CTX MAX_TOKENS
Loads MODEL with mlx_lm.load (its default path), tokenizes TEXT with the model's tokenizer, and
scores non-overlapping windows of CTX tokens (the first token of each unscored), batching 8
windows per forward pass as mlx-lm's own perplexity script batches rows.
Prints `MIXQ_BENCH_JSON {...}` with the perplexity and scored tokens per second.
"""

import json
import sys
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load


def main(model_dir, text_path, ctx, max_tokens):
    model, tokenizer = load(model_dir)
    tokens = tokenizer.encode(open(text_path).read())[:max_tokens]
    n_windows = len(tokens) // ctx
    rows = mx.array(tokens[: n_windows * ctx]).reshape(n_windows, ctx)
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for i in range(0, n_windows, 8):
        batch = rows[i : i + 8]
        logits = model(batch[:, :-1]).astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, batch[:, 1:], reduction="sum")
        mx.eval(losses)
        total += losses.item()
        count += batch.shape[0] * (ctx - 1)
    secs = time.perf_counter() - t0
    print("MIXQ_BENCH_JSON " + json.dumps({"ppl": float(mx.exp(mx.array(total / count)).item()), "tokens": count, "tokens_per_second": count / secs}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
