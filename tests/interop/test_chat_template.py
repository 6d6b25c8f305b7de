"""`mixq run --chat` renders the chat template exactly as Hugging Face transformers does, giving
the harmony prompt format for gpt-oss."""

import json
import shutil

from transformers import AutoTokenizer

from conftest import ROOT, mixq


def test_chat_prompt_matches_transformers(workdir):
    model = workdir / "chat-model"
    if not model.exists():
        mixq("synth", "--preset", "tiny", "--out", model)
    shutil.copy(ROOT / "tests" / "fixtures" / "harmony" / "chat_template.jinja", model / "chat_template.jinja")
    prompt = "  Who is the Prince of Denmark?  "
    got = json.loads(mixq("run", "--model", model, "--prompt", prompt, "--chat", "--max-tokens", 1, "--json"))
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|start|>system<|message|>You are ChatGPT")
    assert rendered.endswith(f"<|start|>user<|message|>{prompt}<|end|><|start|>assistant")
    assert got["prompt_ids"] == tokenizer.encode(rendered), "mixq's rendering differs from transformers'"
