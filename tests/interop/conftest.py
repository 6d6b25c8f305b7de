"""Shared fixtures of the mlx interop tests: the mixq binary and checkpoint helpers."""

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINED = ROOT / "models" / "tiny-gpt-oss-shakespeare"


def mixq_bin():
    return os.environ.get("MIXQ_BIN", str(ROOT / "target" / "release" / "mixq"))


def mixq(*args):
    """Runs mixq, failing the test with its stderr if it fails."""
    r = subprocess.run([mixq_bin(), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"mixq {' '.join(map(str, args))} failed:\n{r.stderr}"
    return r.stdout


def calibrate(workdir, name, *flags):
    """Statistics of the bundled model over 4,096 tokens of the second half of its dev text."""
    text = (TRAINED.parent / "shakespeare-dev.txt").read_text()
    part = workdir / "calibration.txt"
    part.write_text(text[len(text) // 2 :])
    stats = workdir / name
    mixq("calibrate", "--model", TRAINED, "--text", part, "--max-tokens", 4096, "--out", stats, "--force", "--quiet", *flags)
    return stats


def read_shard(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), bytearray(raw[8 + n :])


def write_shard(path, header, data):
    h = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + bytes(data))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("interop")
