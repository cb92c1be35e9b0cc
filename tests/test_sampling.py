"""Sampled rounds (strategy.fraction_train / fraction_evaluate) on real simulated federations:
the cohort is seeded and recorded per round, a hospital not sampled spends no privacy budget,
SecAgg+ follows the sampled cohort, and the outputs stay readable with hundreds of sites."""

import csv
import json
import math
from collections import defaultdict

import pytest
from rich.console import Console

from aseanfl.progress import RichProgress
from server.records.digest import digest
from server.records.report import write_report
from simulations.config import ConfigError, load_config
from conftest import simulate_here as simulate  # the round loop without Ray's start
from simulations.runner import prepare_run

SITES = 8


def _rows(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def _by_round(rows):
    out = defaultdict(dict)
    for r in rows:
        if r["site"] != "global" and r["round"] != "0":
            out[int(r["round"])][r["site"]] = r
    return out


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Two runs of the same DP federation, 8 hospitals, half asked to train and a quarter to
    validate each round."""
    tmp = tmp_path_factory.mktemp("sampled")
    overrides = {"sites": SITES, "server.rounds": 3, "train.local_epochs": 1, "data.synthetic.samples_per_site": 120,
                 "strategy.fraction_train": 0.5, "strategy.fraction_evaluate": 0.25, "privacy.enabled": True,
                 "privacy.target_epsilon": 8.0}
    runs = []
    for name in ("a", "b"):
        cfg = load_config(None, {**overrides, "server.output_dir": str(tmp / name),
                                 "privacy.ledger_dir": str(tmp / name / "ledgers")})
        runs.append(simulate(cfg))
    return runs


def test_each_round_asks_a_seeded_cohort_and_records_the_rest(sampled):
    first, second = sampled
    rounds = _by_round(_rows(first))
    cohorts = []
    for rnd, sites in rounds.items():
        assert len(sites) == SITES, (rnd, sorted(sites))  # every hospital has its row, asked or not
        trained = {s for s, r in sites.items() if r["train_loss"]}
        validated = {s for s, r in sites.items() if r["val_auc"] or r["val_loss"]}
        assert len(trained) == 4 and len(validated) == 2, (rnd, trained, validated)
        for site, r in sites.items():
            status = r["status"]
            if site in trained:
                assert status == "ok" and int(r["bytes_from_site"]) > 0
            elif site in validated:
                assert status == "eval-only" and int(r["bytes_to_site"]) > 0
            else:  # asked for nothing: nothing sent, nothing received, no metrics
                assert status == "not-sampled", r
                assert r["bytes_to_site"] == r["bytes_from_site"] == "0" and not r["epsilon"]
        cohorts.append(trained)
    assert len({frozenset(c) for c in cohorts}) > 1  # the cohort changes from round to round
    glob = [r for r in _rows(first) if r["site"] == "global" and r["round"] != "0"]
    assert all(r["status"].startswith("4 trained, 0 refused") for r in glob), [r["status"] for r in glob]
    # the same seed asks the same hospitals and gives the same numbers
    assert (first / "metrics.csv").read_text() == (second / "metrics.csv").read_text()
    report = (first / "report.md").read_text()
    assert "## Rounds" in report and "not-sampled" in report


def test_a_hospital_not_sampled_spends_nothing(sampled):
    run_dir = sampled[0]
    rounds = _by_round(_rows(run_dir))
    ledgers = {p.stem: json.loads(p.read_text()) for p in (run_dir.parent / "ledgers").glob("*.json")}
    for site in {s for sites in rounds.values() for s in sites}:
        trained_in = [rnd for rnd, sites in rounds.items() if sites[site]["status"] == "ok"]
        entries = ledgers.get(site, {"entries": []})["entries"]
        assert len(entries) == len(trained_in), (site, trained_in, entries)
        eps = [float(rounds[rnd][site]["epsilon"]) for rnd in trained_in]
        assert [round(e["epsilon_after"], 6) for e in entries] == [round(e, 6) for e in eps]
    assert len(ledgers) < SITES or any(len(v["entries"]) < 3 for v in ledgers.values())


def test_secure_aggregation_runs_on_the_sampled_cohort(tmp_path):
    """SecAgg+'s shares and threshold are shares of the sampled hospitals: three of six train
    each round, and the secure sum is plain FedAvg's on the same three."""
    import torch
    from safetensors.torch import load_file

    def run(name, secure):
        sets = {"sites": 6, "server.rounds": 3, "data.synthetic.samples_per_site": 200,
                "strategy.fraction_train": 0.5, "server.output_dir": str(tmp_path / name)}
        if secure:
            sets["strategy.secure_aggregation.reconstruction_threshold"] = 0.67
        run_dir = simulate(load_config(None, sets))
        return _rows(run_dir), load_file(str(run_dir / "model.safetensors")), load_file(str(run_dir / "checkpoint.safetensors"))

    plain_rows, plain, _ = run("plain", False)
    tests = [float(r["test_auc"]) for r in plain_rows if r["site"] == "global"]
    assert tests[-1] > max(0.65, tests[0] + 0.1), tests  # a sampled federation learns
    rows, secure, _ = run("secure", True)
    status = lambda rs: sorted((r["round"], r["site"], r["status"]) for r in rs if r["site"] != "global")  # noqa: E731
    assert status(rows) == status(plain_rows)
    assert sum(1 for r in rows if r["status"] == "ok" and r["train_loss"]) == 9  # three a round
    diff = math.sqrt(sum(float(((secure[k].float() - plain[k].float()) ** 2).sum()) for k in plain))
    scale = math.sqrt(sum(float((plain[k].float() ** 2).sum()) for k in plain))
    assert diff / scale < 0.01 and any(not torch.equal(secure[k], plain[k]) for k in plain), diff / scale


def test_too_small_partitions_are_config_errors(tmp_path):
    data = "../shared/data/medmnist/pneumoniamnist.npz"
    import os

    if not os.path.exists(data):
        pytest.skip(f"{data} is not here (real MedMNIST files, see README)")
    base = {"data.path": data, "server.output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"partition.min_partition_size: 10 images for each of 1000 sites needs 10000"):
        prepare_run(load_config(None, {**base, "sites": 1000, "partition.scheme": "dirichlet"}))
    # (its images in all: with the npz's own validation split shared out, a site may hold only validation images)
    with pytest.raises(ConfigError, match=r"partition: site-\d+ gets no training image \(\d+ in all\) from 4000 sites"):
        prepare_run(load_config(None, {**base, "sites": 4000, "partition.scheme": "iid"}))
    assert not any(tmp_path.iterdir())  # nothing half-written


def _many_rows(sites=300, rounds=3):
    rows = []
    for rnd in range(1, rounds + 1):
        for i in range(sites):
            asked = (i + rnd) % 10 == 0
            rows.append({"round": rnd, "site": f"site-{i:03d}", "status": "ok" if asked else "not-sampled",
                         "val_auc": 0.5 + i / (2 * sites) if asked else None, "bytes_from_site": 1000 if asked else 0})
        rows[-1]["status"] = "refused:privacy-budget"
        rows.append({"round": rnd, "site": "global", "status": "30 trained", "val_auc": 0.8, "test_auc": 0.79})
    return rows


def test_hundreds_of_sites_read_as_a_digest(tmp_path):
    rows = _many_rows()
    d = digest([r for r in rows if r["round"] == 3])
    assert d.sites == 300 and d.statuses["not-sampled"] == 269 and d.statuses["refused:privacy-budget"] == 1
    assert [r["site"] for r in d.failed] == ["site-299"]
    assert d.worst[0]["val_auc"] == min(d.scores) and d.best[0]["val_auc"] == max(d.scores)
    assert len(d.shown()) == 7

    console = Console(record=True, width=120)
    progress = RichProgress(console)
    with progress:
        progress.round_started(3, 3, "training")
        progress.round_finished(3, 3, [r for r in rows if r["round"] == 3])
    text = console.export_text()
    assert "300 sites: 269 not sampled, 30 ok, 1 refused (privacy budget)" in text
    assert "median" in text and "site-299" in text and text.count("site-") < 12

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with (run_dir / "metrics.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    dist = {f"site-{i:03d}": {"train": [i % 7, 3], "val": [1, 1]} for i in range(300)}
    (run_dir / "data_distribution.json").write_text(json.dumps(dist))
    report = write_report(run_dir).read_text()
    final = report[report.index("## Final round"):report.index("## Rounds")]
    assert "300 sites: 269 not sampled" in final and final.count("| site-") == 7
    for png in ("site_auc.png", "data_distribution.png"):
        assert (run_dir / png).stat().st_size > 10_000

    from server.console import run_view

    view = run_view({"rows": rows})  # the coordinator console's run page
    assert view["sites"] == ["site-299"] and view["hidden"] == 299
    assert "269 not sampled, 30 ok" in view["cell"][("counts", 3)]
    assert view["chart"].count("<polyline") == 4, view["chart"][:300]  # federation, median, 10th, 90th


def test_central_dp_noise_is_calibrated_to_the_sampled_cohort():
    """Flower's central-DP wrappers divide the noise by the hospitals aggregated: with 10 % of
    100 sampled that is 10, not 100 (which would add a tenth of the noise the guarantee needs)."""
    from strategies.factory import build_strategy, cohort

    cfg = load_config(None, {"sites": 100, "strategy.fraction_train": 0.1, "strategy.min_sites": 2,
                             "strategy.central_dp.clipping": "server-fixed"})
    assert cohort(cfg.strategy, 100) == 10 and cohort(cfg.strategy, 5) == 2
    assert build_strategy(cfg.strategy, cohort(cfg.strategy, 100)).num_sampled_clients == 10
