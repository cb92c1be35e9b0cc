"""SecAgg+ (Flower's protocol, real simulation): the server sees only the sum, and the sum is
right, even with a hospital refusing (privacy budget) and one dropping out mid-protocol."""

import csv
import math

import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from safetensors.torch import load_file

from conftest import simulate_plan
from server.engine.plan import Progress
from server.engine.updates import initial_arrays
from simulations.config import ConfigError, load_config
from simulations.runner import prepare_run, simulate

SITES = ["nanning", "hanoi", "bangkok", "kuala-lumpur"]
BROKEN = 3  # kuala-lumpur's data "fails to load" when it trains: it drops out after sharing its keys


class Seen(Progress):
    def __init__(self):
        self.training = []

    def received(self, rnd, phase, reply):
        if phase == "training":
            self.training.append(reply)


def _run(tmp_path, name, secure):
    overrides = {
        "sites": SITES, "server.rounds": 2, "server.output_dir": str(tmp_path / name), "train.local_epochs": 1,
        "privacy.enabled": True, "privacy.target_epsilon": 4.0, "site_privacy.hanoi.budget_epsilon": 3.5,
        "privacy.ledger_dir": str(tmp_path / name / "ledgers"),
    }
    if secure:
        overrides["strategy.secure_aggregation.num_shares"] = 1.0
    seen = Seen()

    def broken(index):
        if index == BROKEN:
            raise OSError("/data/kl/images: input/output error")

    plan = prepare_run(load_config(None, overrides), seen)
    start = initial_arrays(plan.config, plan.shape, private=True).to_torch_state_dict()
    run_dir = simulate_plan(plan, broken)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return load_file(str(run_dir / "model.safetensors")), rows, seen, start


def _norm(a, b):
    return math.sqrt(sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a))


def test_secure_sum_equals_plain_fedavg_with_a_refusal_and_a_dropout(tmp_path):
    plain, plain_rows, _, start = _run(tmp_path, "plain", secure=False)
    secure, rows, seen, _ = _run(tmp_path, "secure", secure=True)

    # The same hospitals trained, refused and failed in both runs.
    def statuses(rs):
        return sorted((r["round"], r["status"]) for r in rs if r["site"] not in ("global",) and r["round"] != "0")

    assert statuses(rows) == statuses(plain_rows)
    assert ("2", "refused:privacy-budget") in statuses(rows) and ("1", "error") in statuses(rows)
    # SecAgg+ unmasked the example-weighted mean of the others: plain FedAvg's model, up to the
    # quantisation of round 1's sum carried through round 2's training (measured: 0.8 % of the update).
    off = _norm(secure, plain) / _norm(plain, start)
    assert off < 0.03, off
    assert any(not torch.equal(secure[k], plain[k]) for k in plain)  # it really went another way
    # What reached the server from training: metrics, the site name, a masked vector; no model.
    assert seen.training
    for reply in seen.training:
        assert sum(len(a.data) for rec in reply.content.array_records.values() for a in rec.values()) == 0
        if "refusal" not in reply.content.config_records:
            assert Key.MASKED_PARAMETERS in reply.content.config_records[RECORD_KEY_CONFIGS]


@pytest.mark.parametrize(
    "sets, expected",
    [({"strategy.central_dp.clipping": "server-fixed"}, "works with central_dp.clipping 'client-fixed' only"),
     ({"strategy.secure_aggregation.reconstruction_threshold": 5, "strategy.secure_aggregation.num_shares": 4},
      "strategy.secure_aggregation: `reconstruction_threshold` must be less than `num_shares`")],
)
def test_secure_aggregation_config_errors(tmp_path, sets, expected):
    cfg = {"sites": 3, "server.output_dir": str(tmp_path), "strategy.secure_aggregation.max_weight": 5000, **sets}
    with pytest.raises(ConfigError, match=expected):
        simulate(load_config(None, cfg))
    assert not any(tmp_path.iterdir())
