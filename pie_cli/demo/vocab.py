"""A CLIP-style byte-level BPE vocabulary learnt locally from a small medical word list.

Real CLIP tokenizers ship a 49k-entry vocabulary downloaded from the Hub; tests and the
offline demo cannot download anything, so we build a small vocabulary of the same
format (``vocab.json`` + ``merges.txt``, ``</w>`` end-of-word markers, the two CLIP
special tokens) that ``transformers.CLIPTokenizer`` loads like the real one.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"

CORPUS = """
a chest x-ray image of a patient with no acute cardiopulmonary abnormality
small moderate large left right bilateral pleural effusion cardiomegaly enlarged heart
pneumonia consolidation opacity atelectasis edema pneumothorax lung lesion nodule mass
fracture support devices no finding normal fundus photograph diabetic retinopathy mild
severe proliferative dermoscopy skin lesion melanoma nevus basal cell carcinoma keratosis
the of and in with without increasing worsening progression of disease lower lobe upper
"""


def byte_alphabet() -> dict[int, str]:
    """Map every byte to a printable unicode character (the GPT-2/CLIP convention)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_merges(words: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by name)."""
    alphabet = byte_alphabet()
    counts = Counter(words)
    seqs = {}
    for word in counts:
        symbols = [alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] += EOW
        seqs[word] = symbols
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in seqs.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for word, symbols in seqs.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            seqs[word] = out
    return merges


def write_clip_vocab(directory: Path, max_merges: int = 400) -> int:
    """Write vocab.json and merges.txt into ``directory``; return the vocabulary size."""
    alphabet = list(byte_alphabet().values())
    words = [w for w in CORPUS.lower().split() if w]
    merges = learn_merges(words, max_merges)
    tokens = alphabet + [c + EOW for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)
