"""Derive the CLIP tokenizer files of pie's built-in SD 1.x configs from the open-clip-torch wheel.

pie ships a weights-free SD 1.x config folder (``pie_cli/core/configs/sd-v1/``) so that a
single-file checkpoint (``pie simulate --model model.safetensors``) loads offline without
``--model-config``. Its ``tokenizer/vocab.json`` and ``tokenizer/merges.txt`` are CLIP's byte-level
BPE (ViT-L/14, the text encoder of every SD 1.x model), which OpenAI published under the MIT
license and open_clip redistributes as ``open_clip/bpe_simple_vocab_16e6.txt.gz``. This script
turns that file into the two files transformers' ``CLIPTokenizer`` reads, checks them against
the token ids every CLIP implementation gives, and writes them with the license notices.

    python recipes/sd-v1-configs/build_tokenizer.py [WHEEL]

``WHEEL`` is ``open_clip_torch-*.whl``; without it, ``pip download --no-deps open-clip-torch``
fetches it into a temporary folder. The output is deterministic: re-running it changes nothing.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "pie_cli" / "core" / "configs" / "sd-v1" / "tokenizer"
BPE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
WHEEL_VERSION = "3.3.0"
MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 (with and without </w>), these merges, 2 specials
START, END = "<|startoftext|>", "<|endoftext|>"
# "a photo of a cat": the ids every CLIP tokenizer gives (openai/CLIP, open_clip, transformers).
CHECK = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])

OPENAI_NOTICE = """\
The BPE vocabulary and merges in this folder are derived from CLIP's bpe_simple_vocab_16e6.txt.gz,
published by OpenAI in https://github.com/openai/CLIP under the MIT License (Copyright (c) 2021 OpenAI),
as redistributed by open_clip (open-clip-torch {version}, MIT License, notice below). Derived by
recipes/sd-v1-configs/build_tokenizer.py: the same tokens and ids, written as vocab.json + merges.txt.

--- openai/CLIP ---
MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

--- open_clip ---
"""


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in vocabulary order.

    Bytes that are printable Latin-1 stand for themselves; the others (controls, space, ...) are
    moved to code points from 256 on, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]


def derive(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """(vocab: token -> id, merges as "a b" lines) from the text of bpe_simple_vocab_16e6.txt."""
    merges = bpe_text.split("\n")[1 : MERGES + 1]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START, END]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(tokens) != 49408:
        raise SystemExit(f"unexpected vocabulary: {len(tokens)} tokens, {len(vocab)} distinct (want 49408)")
    return vocab, merges


def find_wheel(argv: list[str], scratch: Path) -> Path:
    if argv:
        return Path(argv[0])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-d",
            str(scratch),
            f"open-clip-torch=={WHEEL_VERSION}",
        ],
        check=True,
    )
    return next(scratch.glob("open_clip_torch-*.whl"))


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        wheel = find_wheel(argv, Path(scratch))
        with zipfile.ZipFile(wheel) as zf:
            bpe = gzip.decompress(zf.read(BPE)).decode("utf-8")
            license_name = next(n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
            open_clip_license = zf.read(license_name).decode("utf-8")
            version = wheel.name.split("-")[1]
    vocab, merges = derive(bpe)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (OUT / "LICENSE").write_text(OPENAI_NOTICE.format(version=version) + open_clip_license, encoding="utf-8")

    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(OUT)(CHECK[0]).input_ids
    if ids != CHECK[1]:
        raise SystemExit(f"{CHECK[0]!r} gives {ids}, not CLIP's {CHECK[1]}")
    print(f"wrote {OUT} ({len(vocab)} tokens, {len(merges)} merges) from {wheel.name}; {CHECK[0]!r} -> {ids}")


if __name__ == "__main__":
    main(sys.argv[1:])
