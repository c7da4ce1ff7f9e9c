"""The Data Docs page of a failed prep renders in a browser (headless Chromium) and shows the
failed expectations with their rules' row conditions; the screenshot goes to test-artifacts/
(docs/gx_data_docs.png is one). Data Docs link Bootstrap/jQuery from CDNs: offline the page is
unstyled but complete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtdmd.data import prepare
from tests.registry.browser import Chromium

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT_DIR = ROOT / "test-artifacts" / "data"
GV = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}


@pytest.mark.slow
def test_data_docs_page_of_a_failed_prep_in_chromium(tmp_path, capsys):
    src = tmp_path / "src" / "mini_geneval"
    src.mkdir(parents=True)
    bad = [GV, dict(GV, prompt="a photo of a unicorn", include=[{"class": "unicorn", "count": 1}]),
           dict(GV, prompt="two dogs", include=[{"class": "dog", "count": 2.0}])]
    (src / "test_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "prepared"
    assert prepare.main(["--source", str(tmp_path / "src"), "--out", str(out)]) == 2
    assert "data docs:" in capsys.readouterr().err
    index = out.parent / "prepared.gx" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    page = next(index.parent.glob("validations/rtdmd_prompts/**/*.html"))
    with Chromium(tmp_path / "chromium", width=1400, height=1800) as browser:
        # (the index page fills its tables with bootstrap-table from a CDN, so offline only the
        # validation page, which is static HTML, shows its content)
        browser.navigate(page.as_uri())
        browser.wait_for("document.body && document.body.innerText.includes('Unsuccessful Expectations')", timeout=120)
        text = browser.text()
        shot = browser.screenshot(ARTIFACT_DIR / "gx_data_docs.png")
    assert "Expectation Suite: rtdmd_prompts" in text and "Status: Failed" in text
    assert "frame == geneval_entries" in text and "unicorn" in text  # geneval.class_in_coco80
    assert "frame == geneval" in text and "json schema" in text.lower()  # geneval.include_well_formed (2.0)
    assert shot.stat().st_size > 20_000
