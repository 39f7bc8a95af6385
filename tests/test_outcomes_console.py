"""The console's model page shows "performance on labelled decisions" in a real headless
Chromium, over the console test's journal (written by the writers' own code) with outcomes
recorded for part of its decisions."""

from __future__ import annotations

import datetime as dt

import pytest

from serve_journal.outcomes.performance import performance
from serve_journal.outcomes.record import record_outcomes
from tests.test_console import _image_loaded, _shot, _sign_in, browser, console, world

__all__ = ["browser", "console", "world"]  # fixtures of tests/test_console.py, used here

pytestmark = pytest.mark.slow


def test_model_page_charts_performance_on_labelled_decisions(console, browser):
    from selenium.webdriver.common.by import By

    url, world = console["url"], console["world"]
    table = world["table"]
    ok = [i for i, o in enumerate(table["outcome"].to_pylist()) if o == "ok"]
    labelled = ok[::3]
    rows = [{"request_id": table["request_id"][i].as_py(),
             "label": table["score"][i].as_py() >= 0.5,  # a label the threshold (0.7) gets wrong sometimes
             "outcome_time": table["ts"][i].as_py() + dt.timedelta(days=14)} for i in labelled]
    report = record_outcomes(world["journal_uri"], rows, source="chargebacks",
                             now=table["ts"][0].as_py() + dt.timedelta(days=40))
    assert report.accepted == len(labelled) and report.rejected == 0

    perf = performance(world["storage"], since=table["ts"][0].as_py(),
                       until=table["ts"][-1].as_py() + dt.timedelta(minutes=1), model="fraud")
    (v3,) = perf.models
    assert v3.labelled.kept == len(labelled)
    assert 0 < v3.unlabelled_share < 1 and v3.rates["fpr"] == 0.0 and 0 < v3.rates["tpr"] < 1

    _sign_in(browser, url, "ana")
    browser.get(f"{url}/models/fraud")
    assert _image_loaded(browser, "chart-performance")
    captions = [c.text for c in browser.find_elements(By.TAG_NAME, "figcaption")]
    assert "Performance on labelled decisions" in captions
    _shot(browser, "08-model-performance")
