"""Bad input to the dashboard, on the suite's real (tiny) run: latent indices out of range or not numbers,
huge and overflowing steering coefficients, empty prompts and texts, prompts and texts longer than the
model's context (the tiny Llama has 256 positions), odd characters. Each is a message in the page, never a
Streamlit exception; pages are driven through Streamlit's AppTest, the model and SAE loaded for real.
(tests/test_dashboard.py covers the same pages on SmolLM2 with ordinary input.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dashboard_runs import assert_clean, fill_steering_form, open_page, texts
from streamlit.testing.v1 import AppTest

TOPK = "topk-128-k8"
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 120  # ~1,200 tokens: over 256 positions and 512


@pytest.fixture(scope="module")
def runs_root(reference, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dashboard-input") / "runs"
    shutil.copytree(reference["analyzed"], root / "tiny" / "train", ignore=shutil.ignore_patterns("checkpoints"))
    return root


@pytest.fixture
def page(runs_root, monkeypatch):
    monkeypatch.setenv("SAELAB_RUNS", str(runs_root))

    return open_page


@pytest.mark.parametrize("feature", ["-5", "128", str(10**30), "1e3", "12.5", "", "nan", "0x1F", "😀"])
def test_a_bad_latent_in_the_url_is_a_message(page, feature):
    at = page("feature", run="tiny/train", sae=TOPK, feature=feature)
    errors = texts(at.error)
    assert "[0, 128)" in errors, (feature, errors)


def test_live_text_empty_long_and_odd_is_shown_or_explained(page):
    at = page("feature", run="tiny/train", sae=TOPK, feature=3)
    for text, expect in [
        ("", "Type some text first"),
        ("  \n\t ", "Type some text first"),
        (LONG_TEXT, "the text was cut to its first 256 tokens"),  # the model's context, not 512
        # (a lone surrogate cannot reach the page: a browser's text box cannot send one)
        ("null\x00byte, emoji 😀👩‍👩‍👧, 日本語, \u202eright-to-left\u202c, \ufeff", "latent 3 fires on"),
    ]:
        at.text_area(key="live_text").set_value(text)
        at.button[-1].click().run()
        assert_clean(at)
        assert expect in texts(at.info) + texts(at.caption), (text[:40], texts(at.caption), texts(at.error))


def test_feature_browser_odd_searches_and_a_huge_index(page):
    at = page("features", run="tiny/train", sae=TOPK)
    for token in ["", "\x00", "' OR 1=1 --", "%", "_", "😀", "a" * 5000]:
        at.text_input(key="token").set_value(token).run()
        assert_clean(at)
    at.text_area(key="search_text_value").set_value(LONG_TEXT)
    at.button[-1].click().run()
    assert_clean(at)
    at.number_input(key="index").set_value(10**9).run()
    at.button(key="open_index").click().run()
    assert_clean(at)
    assert "latent 1000000000 is not in" in texts(at.error)


def steer(at: AppTest, prompt: str, rows: list[tuple[int, str, float]], max_new: int = 2) -> AppTest:
    return fill_steering_form(at, prompt, rows, max_new=max_new)


@pytest.mark.parametrize("coefficient", [1e30, -1e30, 1e300, -1e300])
def test_huge_and_overflowing_steering_coefficients_are_run_or_explained(page, coefficient):
    at = steer(page("steering", run="tiny/train", sae=TOPK), "def main():", [(3, "add", coefficient)])
    shown = texts(at.warning) + texts(at.error)
    assert "far beyond any activation" in shown or "too large" in shown, shown


def test_steering_empty_long_and_out_of_range_input(page):
    at = page("steering", run="tiny/train", sae=TOPK, feature=-3)
    assert at.number_input(key="steer_latent_0").value == 0
    steer(at, "", [(3, "add", 1.0)])
    assert "Type a prompt first" in texts(at.info)
    steer(at, LONG_TEXT, [(3, "clamp", 2.0)])
    assert "The prompt was cut to its first" in texts(at.warning) and at.dataframe
    steer(at, "def main():", [(10**6, "ablate", 0.0)])
    assert "latent 1000000 does not exist" in texts(at.error)
    steer(at, "null\x00 😀 \u202e", [(3, "clamp", 1e30)])
    assert not texts(at.error) or "too large" in texts(at.error)
