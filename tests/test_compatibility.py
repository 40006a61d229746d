"""Files written by vlzoo 0.1 (commit dfea772, before the family registry) still load
and compute the same outputs. ``tests/fixtures/v0_1/make_fixtures.py`` wrote them; it
is kept to show how, and is not to be rerun (its point is that the files are old)."""

from pathlib import Path

import pytest
import torch

import vlzoo

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1"
TEXTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


@pytest.mark.parametrize("family", ["clip", "albef", "blip", "blip2"])
def test_v0_1_checkpoint_loads_with_the_same_outputs(family, expected):
    model = vlzoo.load(FIXTURES / f"{family}.ckpt")
    assert model.family == family
    torch.testing.assert_close(model.encode_image(expected["pixels"]), expected[f"{family}.image"])
    torch.testing.assert_close(model.encode_text(TEXTS), expected[f"{family}.text"])


@pytest.mark.parametrize("family", ["clip", "blip"])
def test_v0_1_export_loads_with_the_same_outputs(family, expected):
    model = vlzoo.load(FIXTURES / f"{family}-export")
    assert model.family == family
    torch.testing.assert_close(model.encode_image(expected["pixels"]), expected[f"{family}.image"])
    torch.testing.assert_close(model.encode_text(TEXTS), expected[f"{family}.text"])
