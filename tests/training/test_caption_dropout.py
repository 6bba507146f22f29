"""`pie finetune --caption-dropout P` (issue 16, item 2): the empty prompt instead of the report with
probability P per example and epoch, from a seeded stream, so classifier-free guidance's unconditional
branch (which PIE uses at every step) learns the domain too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from pie_cli.training.dataset import PairDataset
from tests.helpers import colour_folder, finetune_argv


def dataset(tiny_model, p: float, seed: int = 3, n: int = 400) -> PairDataset:
    from transformers import CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(tiny_model, subfolder="tokenizer", local_files_only=True)
    records = [SimpleNamespace(prompt=f"a red square {i % 7}") for i in range(n)]
    ds = PairDataset(None, records, tokenizer, 32, True, False, seed, caption_dropout=p)
    ds.with_pixels = False
    return ds


def empties(ds: PairDataset) -> list[bool]:
    return [torch.equal(ds[i]["input_ids"], ds.empty_ids) for i in range(len(ds))]


def test_the_rate_is_p_the_draw_is_seeded_and_changes_with_the_epoch(tiny_model):
    ds = dataset(tiny_model, 0.25)
    first = empties(ds)
    assert 0.2 < sum(first) / len(first) < 0.3  # 400 draws: within 2.3 standard deviations of 0.25
    assert empties(dataset(tiny_model, 0.25)) == first  # the same seed, the same examples
    assert empties(dataset(tiny_model, 0.25, seed=4)) != first
    ds.epoch = 1
    second = empties(ds)
    assert second != first and 0.2 < sum(second) / len(second) < 0.3
    assert not torch.equal(ds.empty_ids, ds.input_ids[0])  # the empty prompt is not the report


@pytest.mark.parametrize(("p", "expected"), [(0.0, False), (1.0, True)])
def test_never_and_always(tiny_model, p, expected):
    assert set(empties(dataset(tiny_model, p, n=50))) == {expected}


def test_finetune_records_it_and_refuses_a_non_probability(cli, tiny_model, tmp_path):
    data = colour_folder(tmp_path / "data", n=4)
    out = tmp_path / "ft"
    result = cli(*finetune_argv(data, tiny_model, out, "--caption-dropout", "0.5", max_steps=1))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "training_config.yaml").read_text())["caption_dropout"] == 0.5
    refused = cli(*finetune_argv(data, tiny_model, tmp_path / "bad", "--caption-dropout", "1.5", max_steps=1))
    assert refused.exit_code == 2
    assert "--caption-dropout must be a probability in [0, 1], got 1.5." in refused.stderr
