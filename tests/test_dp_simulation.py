"""DP-SGD in a simulated federation: it still learns, and no hospital's budget is ever exceeded,
including when the federation is started again on the same ledgers."""

import csv
import json

import pytest

from simulations.config import load_config
from conftest import simulate_here as simulate  # the round loop without Ray's start
from simulations.runner import SimulationFailed


def _rows(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def test_dp_run_on_synthetic_default_learns_at_epsilon_8(tmp_path):
    cfg = load_config(None, {"privacy.enabled": True, "privacy.target_epsilon": 8.0, "server.output_dir": str(tmp_path)})
    run_dir = simulate(cfg)
    rows = _rows(run_dir)
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["test_auc"]) >= 0.6, final
    last = [r for r in rows if r["round"] == final["round"] and r["site"] != "global"]
    assert len(last) == 6 and all(r["status"] == "ok" for r in last)
    for r in last:  # the planned run lands at the target, never above it
        assert 7.9 <= float(r["epsilon"]) <= 8.0, r
    assert (run_dir / "epsilon.png").exists() and "## Privacy" in (run_dir / "report.md").read_text()


def test_budget_is_never_exceeded_even_after_restart(tmp_path):
    ledgers = tmp_path / "ledgers"
    overrides = {
        "sites": 3, "server.rounds": 3, "privacy.enabled": True, "privacy.target_epsilon": 4.0,
        "privacy.ledger_dir": str(ledgers), "site_privacy.hanoi.budget_epsilon": 3.0,
    }
    first = simulate(load_config(None, {**overrides, "server.output_dir": str(tmp_path / "a")}))
    rows = _rows(first)
    hanoi = [r for r in rows if r["site"] == "hanoi"]
    assert [r["status"] for r in hanoi][0] == "ok" and "refused:privacy-budget" in [r["status"] for r in hanoi]
    assert all(r["status"] == "ok" for r in rows if r["site"] in ("nanning", "bangkok"))
    spent = {p.stem: json.loads(p.read_text()) for p in ledgers.glob("*.json")}
    assert spent["hanoi"]["entries"][-1]["epsilon_after"] <= 3.0
    assert all(s["entries"][-1]["epsilon_after"] <= 4.0 for s in spent.values())
    hanoi_entries = len(spent["hanoi"]["entries"])

    # Restart on the same ledgers: every hospital is at (or near) its cap, so none trains; the run
    # goes through its rounds with each refusal on record, then says that nothing was trained and
    # writes no model (the initial model is not a result)
    with pytest.raises(SimulationFailed, match=r"nothing was trained: .*9 x refused:privacy-budget"):
        simulate(load_config(None, {**overrides, "server.output_dir": str(tmp_path / "b")}))
    second = next((tmp_path / "b").iterdir())
    assert not (second / "model.safetensors").exists() and not (second / "model_best.safetensors").exists()
    rows = [r for r in _rows(second) if r["site"] != "global" and r["round"] != "0"]
    assert rows and all(r["status"] == "refused:privacy-budget" for r in rows)
    again = {p.stem: json.loads(p.read_text()) for p in ledgers.glob("*.json")}
    assert len(again["hanoi"]["entries"]) == hanoi_entries
    assert all(a["entries"] == spent[k]["entries"] for k, a in again.items())
