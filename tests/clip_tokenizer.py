"""The real CLIP tokenizer (49,408 tokens, SD 1.x's) for tests, built offline, and a tiny model that uses it.

The demo model's tokenizer has a few hundred tokens learnt locally (``pie_cli/demo/vocab.py``); the
real one is byte-level BPE over 48,894 merges learnt by OpenAI. Its merges ship, MIT-licensed, inside
the open-clip-torch wheel as ``open_clip/bpe_simple_vocab_16e6.txt.gz`` (one header line, then one
merge ``"a b"`` per line: CLIP uses the first 49152 - 256 - 2 of them). The vocabulary follows from
them the way CLIP defines it: the 256 byte symbols, the same with the end-of-word marker ``</w>``,
one entry per merge (its two halves joined), then ``<|startoftext|>`` and ``<|endoftext|>``.

open-clip-torch is a test-only dependency installed with ``--no-deps``
(``requirements/dev-nodeps.txt``): it is never imported (its ``__init__`` pulls torchvision and timm),
only its data file is read. Without it the tests that need it skip, saying how to install it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from pie_cli.demo.tiny import write_tokenizer_configs
from pie_cli.demo.vocab import BOS, EOS, EOW, byte_alphabet

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49_408
MERGES = 49_152 - 256 - 2  # how many of the file's merges CLIP uses: 48,894
MAX_LENGTH = 77  # SD 1.x's text encoder reads 77 positions: BOS, 75 tokens, EOS
INSTALL = "pip install --no-deps -r requirements/dev-nodeps.txt"
HIDDEN = 32  # the tiny UNet's cross-attention width

# A findings-plus-impression chest X-ray report (written for these tests): 93 CLIP tokens, BOS/EOS included.
REPORT = (
    "FINDINGS: There is a moderate to large left pleural effusion with associated compressive atelectasis "
    "of the left lower lobe. The right lung is clear. No pneumothorax. The cardiomediastinal silhouette is "
    "partially obscured but appears within normal limits. IMPRESSION: Moderate to large left pleural "
    "effusion, increased compared with the prior radiograph of 2 days earlier; left basilar atelectasis. "
    "Recommend clinical correlation."
)
REPORT_TOKENS = 93
SHORT = "large left pleural effusion"

_built: dict[str, Path] = {}


def truncation_warning(option: str, tokens: int) -> str:
    """What `pie simulate` warns about a text of ``tokens`` tokens (simulate.run.check_against_model)."""
    return f"{option} is {tokens} tokens; the text encoder reads only the first {MAX_LENGTH}, the rest is ignored."


def vocab_file() -> Path | None:
    """open_clip's BPE file, found without importing open_clip; None when it is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / VOCAB_FILE
        if candidate.is_file():
            return candidate
    return None


def require_vocab_file() -> Path:
    """The BPE file, or skip the test naming what is missing."""
    path = vocab_file()
    if path is None:
        pytest.skip(f"the real CLIP vocabulary comes from open-clip-torch, not installed: {INSTALL}")
    return path


def clip_vocab(path: Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of CLIP's tokenizer from the BPE file: 49,408 tokens, 48,894 merges."""
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + MERGES]
    # CLIP's byte order: the printable bytes, then the others (mapped to U+0100 and up), i.e. by code point.
    symbols = sorted(byte_alphabet().values(), key=ord)
    tokens = symbols + [s + EOW for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) == VOCAB_SIZE, "the BPE file is not CLIP's"
    return vocab, merges


def write_clip_tokenizer(directory: Path, max_length: int = MAX_LENGTH) -> Path:
    """A tokenizer folder laid out like SD 1.x's (vocab.json, merges.txt and the two configs)."""
    vocab, merges = clip_vocab(require_vocab_file())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    write_tokenizer_configs(directory, max_length)
    return directory


def clip_tokenizer(directory: Path):
    """The real CLIP tokenizer, loaded by transformers from a folder ``write_clip_tokenizer`` wrote."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(directory)


def clip_model(tmp_path_factory, tiny_model: Path) -> Path:
    """The tiny SD model with the real tokenizer and a tiny 49,408-token text encoder (built once).

    The UNet, VAE and scheduler are the session's tiny model's; the text encoder has SD 1.x's
    vocabulary and 77 positions at the tiny model's width, randomly initialised (seeded).
    """
    key = str(tiny_model)
    if key in _built:
        return _built[key]
    require_vocab_file()
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("models") / "tiny-sd-clip"
    shutil.copytree(tiny_model, root, ignore=shutil.ignore_patterns("tokenizer", "text_encoder"))
    write_clip_tokenizer(root / "tokenizer")
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=HIDDEN,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH,
                projection_dim=HIDDEN,
                hidden_act="quick_gelu",
                bos_token_id=vocab[BOS],
                eos_token_id=vocab[EOS],
                pad_token_id=vocab[EOS],
            )
        )
    encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    _built[key] = root
    return root
