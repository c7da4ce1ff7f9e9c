"""OCR reward: pure logic + the real rapidocr model on PIL-rendered text."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rtdmd.rewards import RewardInputError, get_scorer
from rtdmd.rewards.ocr import OCRScorer, extract_target, levenshtein, ocr_reward

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def render(text: str, size=(448, 96)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    if text:
        font = ImageFont.truetype(FONT, 36) if os.path.exists(FONT) else ImageFont.load_default(size=36)
        ImageDraw.Draw(im).text((16, 24), text, fill="black", font=font)
    return im


def test_target_extraction_and_quirks():
    assert extract_target('A neon sign that says "Open Late" at night') == "Open Late"
    assert extract_target('a "b" and "c"') == "b"
    assert extract_target('only one " quote here') == " quote here"  # split('"')[1], as the reference
    with pytest.raises(RewardInputError, match="double quotes"):
        extract_target("no quotes at all")
    with pytest.raises(RewardInputError, match="empty after removing spaces"):
        ocr_reward("anything", "   ")


def test_reward_formula():
    assert ocr_reward("HELLO World", "hello world") == 1.0           # spaces removed, lower-cased
    assert ocr_reward("xxhelloworldyy", "Hello World") == 1.0        # substring rule
    assert ocr_reward("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_reward("", "hello") == 0.0
    assert ocr_reward("a completely different long text", "abc") == 0.0  # distance capped at len(target)
    assert levenshtein("kitten", "sitting") == 3


class StubEngine:
    def __init__(self, lines):
        self.lines = lines

    def read(self, image):
        if isinstance(self.lines, Exception):
            raise self.lines
        return self.lines


def test_scorer_glue_with_stub_engine():
    x = torch.rand(2, 3, 8, 8)
    s = OCRScorer(StubEngine([("Hel", 0.9), ("lo", 0.8), ("junk", 0.0)]))
    out = s(x, ['say "hello"', 'say "help"'])
    assert out.tolist() == pytest.approx([1.0, 0.5])  # "hello" vs "help": distance 2 of 4
    with pytest.raises(RewardInputError, match="double quotes"):
        s(x, ['say "hello"', "no quote"])
    bad = OCRScorer(StubEngine(RuntimeError("engine crashed")))
    with pytest.warns(UserWarning, match="engine failed"):
        assert bad(x, ['"a"', '"b"']).tolist() == [0.0, 0.0]


@pytest.fixture(scope="module")
def rapid():
    return get_scorer("ocr")  # default backend: rapidocr with the weights shipped in the wheel


def test_real_rapidocr_on_rendered_text(rapid):
    assert rapid.backend == "rapidocr"
    imgs = [render("Forever Yours"), render("Forever Yours"), render(""), render("Forever Yours")]
    prompts = ['A card that says "Forever Yours"', 'A card that says "Spring Collection"',
               'A card that says "Forever Yours"', 'A card that says "Forever Yourz"']
    out = rapid(imgs, prompts)
    assert out[0] == pytest.approx(1.0)      # exact text
    assert out[1] < 0.6                      # wrong text
    assert out[2] == 0.0                     # blank image
    assert out[3] == pytest.approx(1 - 1 / 12)  # one wrong letter of 12 (spaces removed)
    # float tensor input goes through the same 8-bit path
    t = torch.from_numpy(np.stack([np.asarray(imgs[0])])).permute(0, 3, 1, 2).float() / 255
    assert rapid(t, prompts[:1]).item() == pytest.approx(1.0)


def test_tesseract_backend_reads_rendered_text():
    # `make setup` installs tesseract (scripts/system_deps.sh); only a hand-made env may lack it.
    import shutil

    if shutil.which("tesseract") is None and not os.environ.get("CI"):
        pytest.skip("tesseract binary not installed (run `make system-deps`)")
    s = get_scorer("ocr", backend="tesseract")
    assert s([render("Step Goal")], ['"Step Goal"']).item() == pytest.approx(1.0)
    assert s([render("Step Goal")], ['"Stop Gate"']).item() < 1.0


def test_paddleocr_backend_missing_names_extra():
    pytest.importorskip("rapidocr")
    if importlib.util.find_spec("paddleocr") is not None:
        pytest.skip("paddleocr installed")
    with pytest.raises(ImportError, match=r"rtdmd\[paddleocr\]"):
        get_scorer("ocr", backend="paddleocr")
