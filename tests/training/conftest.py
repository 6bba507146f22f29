"""Fixtures of the `pie finetune` tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import colour_folder


@pytest.fixture
def data(tmp_path) -> Path:
    """8 solid-colour 32 px images, one prompt per colour (``helpers.colour_folder``)."""
    return colour_folder(tmp_path / "data")
