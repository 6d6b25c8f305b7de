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
