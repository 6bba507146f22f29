"""The real CLIP tokenizer (SD 1.x's 49,408 tokens, built from open-clip-torch's BPE file) through `pie simulate`.

The tiny model's tokenizer is learnt locally and splits text unlike CLIP; here prompts are counted
by the real byte-level BPE, so the 77-token limit is checked where real reports cross it: the
warning names the option and CLIP's own count, for a single prompt, one prompt of a schedule and
the negative prompt, and a prompt of exactly 77 tokens is read whole, without one.
"""

from __future__ import annotations

import pytest

from tests.clip_tokenizer import (
    MAX_LENGTH,
    REPORT,
    REPORT_TOKENS,
    SHORT,
    VOCAB_SIZE,
    clip_model,
    clip_tokenizer,
    truncation_warning,
    write_clip_tokenizer,
)
from tests.helpers import manifest, simulate_argv


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return clip_tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "tokenizer"))


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model):
    return clip_model(tmp_path_factory, tiny_model)


def test_the_tokenizer_is_clips_own(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.model_max_length == MAX_LENGTH
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    ids = tokenizer("Large left pleural effusion.").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "large</w>",
        "left</w>",
        "ple",
        "ural</w>",
        "ef",
        "fusion</w>",
        ".</w>",
        "<|endoftext|>",
    ]
    assert len(tokenizer(REPORT, truncation=False).input_ids) == REPORT_TOKENS


def test_the_model_reads_77_positions_of_clips_vocabulary(model):
    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load
    from pie_cli.core.registry import resolve

    components = load(resolve(str(model)), choose_placement("cpu", "fp32"))
    assert len(components.tokenizer) == VOCAB_SIZE == components.text_encoder.config.vocab_size
    assert components.text_encoder.config.max_position_embeddings == MAX_LENGTH


def test_a_long_report_is_warned_about_with_clips_count(cli, model, inputs, tmp_path):
    result = cli(
        *simulate_argv(inputs["image"], tmp_path / "run", model=model, mask=inputs["mask"], prompt=REPORT)
    )
    assert result.exit_code == 0, result.output
    assert truncation_warning("--prompt", REPORT_TOKENS) in result.stderr
    assert result.stderr.count("tokens; the text encoder reads only") == 1
    assert manifest(tmp_path / "run")["parameters"]["prompt"] == REPORT  # recorded whole, read truncated


def test_77_tokens_are_read_whole_and_78_are_not(cli, model, inputs, tmp_path):
    """'a' is one CLIP token: 75 of them plus BOS and EOS fill the window exactly."""
    fits = cli(*simulate_argv(inputs["image"], tmp_path / "fits", model=model, prompt=" ".join(["a"] * 75)))
    assert fits.exit_code == 0, fits.output
    assert "tokens; the text encoder" not in fits.stderr
    over = cli(*simulate_argv(inputs["image"], tmp_path / "over", model=model, prompt=" ".join(["a"] * 76)))
    assert over.exit_code == 0, over.output
    assert truncation_warning("--prompt", 78) in over.stderr


def test_one_long_prompt_of_a_schedule_and_the_negative_prompt_are_each_warned_about(
    cli, model, inputs, tmp_path
):
    schedule = tmp_path / "reports.txt"
    schedule.write_text(f"1: {SHORT}\n2: {REPORT}\n3: {SHORT}, worse\n")
    negative = "blurry, noisy, low contrast, " * 12  # 12 x 7 words and commas: 86 tokens
    argv = simulate_argv(
        inputs["image"],
        tmp_path / "run",
        "--prompt-schedule",
        schedule,
        "--negative-prompt",
        negative,
        model=model,
        prompt=None,
        steps=3,
    )
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    assert (
        truncation_warning("--prompt", REPORT_TOKENS) in result.stderr
    )  # the report, not the two short prompts
    assert truncation_warning("--negative-prompt", 86) in result.stderr
    assert result.stderr.count("tokens; the text encoder reads only") == 2
    assert manifest(tmp_path / "run")["parameters"]["prompts"] == [SHORT, REPORT, f"{SHORT}, worse"]
