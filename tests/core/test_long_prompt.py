"""`--long-prompt chunk`: a report longer than CLIP's 77 tokens reaches the model whole.

On the real CLIP tokenizer (tests/clip_tokenizer.py): ``truncate`` (the default) is today's
encoding; ``chunk`` encodes 75-token windows, each wrapped in BOS/EOS and padded to 77, and
concatenates them, with every text of the run (negative prompt, each scheduled prompt) padded to
the same number of windows. A text that fits one window is encoded exactly as before, so chunk
changes nothing, bit for bit, unless some text is longer than 77 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.clip_tokenizer import MAX_LENGTH, REPORT, REPORT_TOKENS, SHORT, clip_model, truncation_warning
from tests.helpers import frames_of, manifest, simulate_argv

# The report with a different ending (96 tokens): the same first 77 tokens, another tail.
OTHER_TAIL = REPORT.replace("Recommend clinical correlation.", "No change in the right lung.")
LONGEST = f"{REPORT} {REPORT}"  # 2 * 91 + 2 = 184 tokens: 3 windows of 75


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model):
    return clip_model(tmp_path_factory, tiny_model)


@pytest.fixture(scope="module")
def components(model):
    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load
    from pie_cli.core.registry import resolve

    return load(resolve(str(model)), choose_placement("cpu", "fp32"))


def argv(inputs, out, model, *extra, prompt=REPORT, steps=1):
    """The phantom chest with its left-lung mask, 64 px, 4 inference steps."""
    return simulate_argv(
        inputs["image"], out, *extra, model=model, mask=inputs["mask"], prompt=prompt, steps=steps, seed=3
    )


def run(cli, inputs, out, model, *extra, prompt=REPORT, steps=1):
    result = cli(*argv(inputs, out, model, *extra, prompt=prompt, steps=steps))
    assert result.exit_code == 0, result.output
    return result


def test_chunk_encodes_a_short_prompt_exactly_as_truncate(components):
    from pie_cli.core.progression import encode_text

    texts = ["", SHORT, " ".join(["a"] * 75)]  # the last fills the 77-token window exactly
    truncated = encode_text(components, texts)
    assert truncated.shape == (3, MAX_LENGTH, 32)
    assert torch.equal(encode_text(components, texts, "chunk"), truncated)


def test_chunk_reads_the_tokens_after_77_and_pads_every_text_to_one_length(components):
    from pie_cli.core.progression import encode_text

    texts = ["", SHORT, REPORT, OTHER_TAIL]
    truncated = encode_text(components, texts, "truncate")
    assert torch.equal(truncated[2], truncated[3])  # the tails are cut off: one conditioning
    chunked = encode_text(components, texts, "chunk")
    assert chunked.shape == (4, 2 * MAX_LENGTH, 32)  # 91 content tokens: 2 windows, for every text
    assert not torch.allclose(chunked[2], chunked[3])  # ... read by chunk
    # Window 1 is the tokenizer's own 77 tokens; an empty window is the empty text's encoding.
    torch.testing.assert_close(chunked[:, :MAX_LENGTH], truncated)
    torch.testing.assert_close(chunked[:2, MAX_LENGTH:], truncated[:1].expand(2, -1, -1))
    assert encode_text(components, [*texts, LONGEST], "chunk").shape == (5, 3 * MAX_LENGTH, 32)


def test_chunk_changes_no_frame_of_a_short_prompt(cli, model, inputs, tmp_path):
    run(cli, inputs, tmp_path / "truncate", model, prompt=SHORT, steps=2)
    run(cli, inputs, tmp_path / "chunk", model, "--long-prompt", "chunk", prompt=SHORT, steps=2)
    a, b = frames_of(tmp_path / "truncate"), frames_of(tmp_path / "chunk")
    assert len(a) == len(b) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert manifest(tmp_path / "truncate")["parameters"]["long_prompt"] == "truncate"
    assert manifest(tmp_path / "chunk")["parameters"]["long_prompt"] == "chunk"


def test_chunk_conditions_a_long_report_on_all_of_it_and_does_not_warn(cli, model, inputs, tmp_path):
    cut = run(cli, inputs, tmp_path / "truncate", model)
    cut_other = run(cli, inputs, tmp_path / "truncate-other", model, prompt=OTHER_TAIL)
    whole = run(cli, inputs, tmp_path / "chunk", model, "--long-prompt", "chunk")
    run(cli, inputs, tmp_path / "chunk-other", model, "--long-prompt", "chunk", prompt=OTHER_TAIL)
    assert (
        truncation_warning("--prompt", REPORT_TOKENS) in cut.stderr
        and truncation_warning("--prompt", 96) in cut_other.stderr
    )
    assert "the text encoder reads only" not in whole.stderr
    assert (
        f"--prompt is {REPORT_TOKENS} tokens; --long-prompt chunk reads all of it, in 2 windows."
        in whole.stderr
    )

    def last(name):
        return frames_of(tmp_path / name)[-1]

    assert np.array_equal(last("truncate"), last("truncate-other"))  # the tail never reached the model
    assert not np.array_equal(last("chunk"), last("truncate"))
    assert not np.array_equal(last("chunk"), last("chunk-other"))  # with chunk, it does


def test_a_schedule_of_short_and_long_prompts_runs_chunked(cli, model, inputs, tmp_path):
    schedule = tmp_path / "reports.txt"
    schedule.write_text(f"{SHORT}\n{REPORT}\n{LONGEST}\n")
    result = run(
        cli, inputs, tmp_path / "run", model, "--prompt-schedule", schedule, "--long-prompt", "chunk", steps=3
    )
    assert "the text encoder reads only" not in result.stderr
    assert "in 3 windows." in result.stderr and "in 2 windows." in result.stderr
    m = manifest(tmp_path / "run")
    assert m["status"] == "complete" and m["parameters"]["prompts"] == [SHORT, REPORT, LONGEST]
    assert len(frames_of(tmp_path / "run")) == 4


def test_a_recorded_chunk_resumes_chunked(cli, model, inputs, tmp_path, monkeypatch):
    from pie_cli.runs.writer import RunWriter

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(cli, inputs, whole, model, "--long-prompt", "chunk", steps=3)
    original = RunWriter.write_frame

    def write_frame(self, n, *a, **k):
        original(self, n, *a, **k)
        if n == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RunWriter, "write_frame", write_frame)
        stopped = cli(*argv(inputs, cut, model, "--long-prompt", "chunk", steps=3))
    assert stopped.exit_code == 130, stopped.output
    assert manifest(cut)["parameters"]["long_prompt"] == "chunk"
    refused = cli("simulate", "--resume", "--out", cut, "--long-prompt", "truncate")
    assert refused.exit_code == 2 and "--long-prompt differs from the run" in refused.stderr
    # Restored from the manifest: truncate (the default) would give other frames (test above).
    result = cli("simulate", "--resume", "--out", cut)
    assert result.exit_code == 0, result.output
    assert "the text encoder reads only" not in result.stderr
    a, b = frames_of(whole), frames_of(cut)
    assert len(a) == len(b) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_unknown_mode_is_refused_by_name(cli, tiny_model, inputs, tmp_path):
    result = cli(*simulate_argv(inputs["image"], tmp_path / "run", "--long-prompt", "zip", model=tiny_model))
    assert result.exit_code == 2
    assert result.stderr == "Error: --long-prompt must be one of truncate, chunk, got 'zip'.\n"
    assert not (tmp_path / "run").exists()
