"""What an operator reads while a run goes: the live round table chooses its columns by the
terminal's width and never cuts a word; piped into a log it prints every column and every
warning whole; bytes are in human units."""

from __future__ import annotations

import io

import pytest
from rich.cells import cell_len
from rich.console import Console

from aseanfl.progress import RichProgress
from common.i18n import set_language

ROWS = [
    {"site": "kuala-lumpur-hospital", "status": "validation-lost", "epsilon": 3.2512, "train_loss": 0.512,
     "val_loss": 0.61, "val_auc": 0.8123, "num_train": 560, "bytes_from_site": 10_275_341},
    {"site": "bangkok", "status": "refused:privacy-budget", "epsilon": 7.99, "num_train": 0, "bytes_from_site": 0},
    {"site": "global", "status": "1 trained, 1 refused", "epsilon": 7.99, "train_loss": 0.5, "val_loss": 0.6,
     "val_auc": 0.81, "test_auc": 0.85, "num_train": 560, "bytes_from_site": 10_275_341},
]
WARNING = ("site-x holds 12 images: too little to learn from; simulate fewer sites or use more data, or the round "
           "will leave it out")
HEADERS = ["site", "status", "epsilon", "train loss", "val loss", "val AUC", "test AUC", "examples", "bytes out"]


def _shown(width: int, terminal: bool, lang: str = "en", rows: list[dict] | None = None) -> str:
    set_language(lang)
    try:
        out = io.StringIO()
        progress = RichProgress(Console(file=out, width=width, force_terminal=terminal, color_system=None))
        progress.task = progress.bar.add_task("rounds", total=3)
        progress.round_finished(1, 3, rows or ROWS)
        progress.problem(WARNING)
        return out.getvalue()
    finally:
        set_language("en")


def test_at_80_columns_the_table_keeps_whole_columns_that_fit_and_names_the_rest():
    text = _shown(80, terminal=True)
    assert "kuala-lumpur-hospital" in text and "trained, validation lost" in text  # the input reached the table
    table = text.split("warning:")[0]
    assert all(cell_len(line.rstrip()) <= 80 for line in table.splitlines())
    assert "…" not in text
    header = table.splitlines()[1]
    for kept in ("site", "status", "epsilon", "val AUC"):  # the most needed, by priority
        assert kept in header
    assert "refused (privacy budget)" in table
    assert "not shown at this width: train loss, val loss, test AUC, examples, bytes out" in " ".join(table.split())
    assert "10 MB" in _shown(100, terminal=True)  # bytes in human units where the column fits
    assert "10275341" not in _shown(200, terminal=True)
    assert f"warning: {WARNING}" in text  # the sentence whole, for the terminal to wrap


def test_piped_into_a_log_every_column_and_sentence_is_whole():
    text = _shown(80, terminal=False)
    header = text.splitlines()[1]
    assert all(h in header for h in HEADERS) and "…" not in text
    assert "not shown" not in text
    assert f"warning: {WARNING}\n" in text  # one line


@pytest.mark.parametrize("lang", ["th", "km", "my", "zh_Hans"])
def test_other_scripts_fit_the_width_by_their_cells(lang):
    text = _shown(80, terminal=True, lang=lang)
    table = text.split("\n\n")[0] if "\n\n" in text else text
    lines = [line for line in table.splitlines() if "site-x" not in line]
    assert "kuala-lumpur-hospital" in text and "…" not in text
    assert all(cell_len(line.rstrip()) <= 80 for line in lines), [cell_len(x.rstrip()) for x in lines]


def test_a_wide_terminal_shows_every_column():
    text = _shown(200, terminal=True)
    assert all(h in text.splitlines()[1] for h in HEADERS) and "not shown" not in text


def test_a_personalized_run_shows_each_hospitals_own_score_beside_the_global_models():
    """Ditto/APFL rows carry the hospital's personalized score: a column of its own, after the
    global model's validation score; runs without it show no such column."""
    rows = [{**r, "pers_val_auc": 0.9312, "pers_val_accuracy": 0.9} if r.get("val_auc") else r for r in ROWS]
    text = _shown(200, terminal=False, rows=rows)
    header = text.splitlines()[1]
    assert header.index("val AUC") < header.index("personal AUC") < header.index("test AUC"), header
    assert "0.931" in text
    assert "personal" not in _shown(200, terminal=False)
