"""The contest on the deployed federation (tests/test_deployment.py): `aseanfl evaluate -f`
of the run's model, two teams' submissions and a resubmission, the leaderboard in the terminal
and in the coordinator's console, and a broken model file refused before anything is sent.
Run while site-d has not approved the app bundle yet."""

from __future__ import annotations

from pathlib import Path

import torch
from consoles import shot
from safetensors.torch import save_file

from simulations.local_deployment import aseanfl

CONTEST = "asean-cxr-2026"


def _baseline(tmp: Path) -> tuple[Path, Path]:
    """A second team's model: the same architecture, untrained (seeded), with its model card."""
    from medimaging.config import ModelConfig
    from server.engine.config import RunConfig
    from server.evaluation.federated import ModelCard

    folder = tmp / "team-baseline"
    folder.mkdir(exist_ok=True)
    card = ModelCard(model=ModelConfig(name="cnn"), in_channels=1, num_classes=2, image_size=32, private=True)
    torch.manual_seed(7)
    save_file({k: v.contiguous() for k, v in card.build(RunConfig()).state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "card.yaml").write_text("model: {name: cnn}\nin_channels: 1\nnum_classes: 2\nimage_size: 32\nprivate: true\n")
    return folder / "model.safetensors", folder / "card.yaml"


def contest(dep, tmp: Path, model: Path, page, url: str) -> dict:
    fed = str(dep.fed)
    out: dict = {"model": model}
    evaluations = dep.fed / "server" / "evaluations"
    out["evaluate"] = aseanfl("evaluate", "-f", fed, "--model", str(model), "--wait-for-sites", "4", "--out",
                              str(tmp / "evaluations"), timeout=600, cwd=tmp)
    (tmp / "contest.yaml").write_text(f"name: {CONTEST}\ntask: {{image_size: 32}}\nmetric: auc\nsplit: test\n"
                                      "wait_for_sites: 4\nwait_timeout_s: 60\n")
    out["baseline"], card = _baseline(tmp)

    def submit(team: str, path: Path, *more: str):
        return aseanfl("contest", "submit", "-f", fed, "--contest", str(tmp / "contest.yaml"), "--team", team,
                       "--model", str(path), "--out", str(tmp / "evaluations"), *more, timeout=600, cwd=tmp)

    out["federated"] = submit("federated", model)
    out["baseline team"] = submit("baseline", out["baseline"], "--card", str(card))
    before = sorted(evaluations.glob("run-*"))
    out["copycat"] = submit("copycat", model)
    out["scored again"] = sorted(evaluations.glob("run-*")) != before
    out["leaderboard"] = aseanfl("leaderboard", "-f", fed, "--contest", CONTEST)
    cut = tmp / "cut.safetensors"
    cut.write_bytes(model.read_bytes()[:2000])
    out["cut"] = aseanfl("evaluate", "-f", fed, "--model", str(cut), "--card", str(card), timeout=120, cwd=tmp)
    out["sent for the cut file"] = sorted(evaluations.glob("run-*")) != before
    page.goto(url + "/contests")
    shot(page, "coordinator-contests")
    out["console"] = page.eval_on_selector_all(
        f"table[data-contest='{CONTEST}'] tr[data-team]",
        "rows => rows.map(r => [r.children[0].textContent.trim(), r.dataset.team, r.children[3].textContent.trim()])")
    return out


def central(hospitals: Path, sites: list[str], model: Path, private: bool = True) -> dict[str, tuple]:
    """Each hospital's test cases scored centrally: site -> (probability of class 1, labels). The
    test reads the hospitals' own decoded files here; the server never does."""
    from safetensors.torch import load_file

    from client.config import load_site
    from medimaging.config import ModelConfig
    from medimaging.datasets import load_npz, targets, to_tensor
    from medimaging.files import decode
    from server.engine.config import RunConfig
    from server.evaluation.federated import ModelCard

    card = ModelCard(model=ModelConfig(name="cnn"), in_channels=1, num_classes=2, image_size=32, private=private)
    net = card.build(RunConfig())
    net.load_state_dict(load_file(str(model)))
    net.eval()
    out = {}
    for site in sites:
        cfg = load_site(hospitals / site / "site.yaml")
        arrays = load_npz(str(decode(cfg.data).cache))
        x, y = to_tensor(arrays["test_images"], 32), targets(arrays["test_labels"], 32).numpy().astype(int)
        assert len(y) >= 40 and 0 < y.sum() < len(y) and x.std() > 0.1, site  # real, labelled, both classes
        with torch.no_grad():
            out[site] = (torch.softmax(net(x).double(), 1)[:, 1].numpy(), y)
    return out
