"""Where a hospital trains (medimaging/compute.py): the device and CPU threads are the
hospital's own settings (site.yaml `compute`), a simulated hospital's come from the engine's
resources; a GPU asked for on a machine without one is a one-line config error naming the
setting. GPU runs are in tests/test_gpu.py (skipped, saying so, where there is no GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from flwr.app import MessageType
from inprocess import InProcessGrid, site_yaml

from client.training.app import app as deployed_app
from client.config import load_site
from client.training.site import SITE_CONFIG_KEY
from medimaging.compute import ComputeUnavailable, cores, resolve_device
from medimaging.yamlconfig import ConfigError
from server.engine.rounds import run_federation
from server.records.outputs import read_rows
from simulations.config import load_config
from simulations.federation import hospital
from simulations.local_deployment import BIN
from simulations.runner import prepare_run

NO_GPU = not torch.cuda.is_available()


def test_auto_is_the_cpu_here_and_a_missing_gpu_is_named(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if NO_GPU:
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(ComputeUnavailable, match=rf"^compute.device: {spec} asks for a CUDA GPU, .* set it to auto or cpu"):
                resolve_device(spec)
    else:
        with pytest.raises(ComputeUnavailable, match=r"cuda:99, but this machine has \d+ CUDA device"):
            resolve_device("cuda:99")
    path = site_yaml(tmp_path, "site-a", 0, tmp_path / "state", device="gpu")
    with pytest.raises(ConfigError, match="compute.device"):
        load_site(path)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU: a cuda request is valid here")
def test_a_daemon_asked_for_a_gpu_the_machine_lacks_says_so_in_one_line_and_does_not_start(tmp_path):
    path = site_yaml(tmp_path, "site-a", 0, tmp_path / "state", device="cuda", extra="connection:\n  server: 127.0.0.1:9\n")
    res = subprocess.run([str(BIN / "aseanfl"), "client", "start", "-c", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {path}: compute.device: cuda asks for a CUDA GPU"), lines
    assert "Traceback" not in res.stdout + res.stderr


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU: a GPU share is valid here")
def test_a_simulation_asking_for_gpu_shares_without_a_gpu_is_a_config_error(tmp_path):
    res = subprocess.run([str(BIN / "aseanfl"), "simulate", "--rounds", "1", "--out", str(tmp_path), "--set",
                          "engine.gpus_per_site=0.25"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "engine.gpus_per_site: 0.25 asks for a share of a GPU" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr


@pytest.mark.parametrize("threads", [None, 1, 2])
def test_a_deployed_hospital_trains_on_its_own_threads_and_a_simulated_one_on_the_engines(tmp_path, threads):
    path = site_yaml(tmp_path, "site-a", 0, tmp_path / "state", threads=threads, device="cpu")
    cfg = load_config(None, {"sites": 1, "server.rounds": 1, "train.local_epochs": 1, "data.image_size": 32,
                             "server.output_dir": str(tmp_path / "runs"), "strategy.min_sites": 1})
    plan = prepare_run(cfg)
    seen = []

    def before(message):
        if message.metadata.message_type == MessageType.EVALUATE:
            seen.append(torch.get_num_threads())  # what the training task just before set

    grid = InProcessGrid(deployed_app, 1, before)
    grid.contexts[100].node_config = {SITE_CONFIG_KEY: str(path)}
    previous = torch.get_num_threads()
    try:
        run_federation(grid, plan)
        assert seen == [threads or cores()]
    finally:
        torch.set_num_threads(previous)
    assert [r["status"] for r in read_rows(plan.run_dir) if r["round"] == 1 and r["site"] == "site-a"] == ["ok"]
    simulated = hospital(load_config(None, {"engine.cpus_per_site": 3}), 0, 28, tmp_path)
    assert (simulated.threads, simulated.device) == (3, torch.device("cpu"))


def test_precision_resolves_per_device_or_names_the_setting():
    from medimaging.compute import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, False) is None  # fp32: bf16 autocast is slower on this CPU
    assert resolve_precision("bf16", cpu, True) is torch.bfloat16  # asked for: also with DP-SGD
    with pytest.raises(ComputeUnavailable, match=r"compute.precision: fp16 is for CUDA GPUs"):
        resolve_precision("fp16", cpu, False)
    with pytest.raises(ConfigError, match=r"engine.precision: fp16 is for CUDA GPUs"):
        from simulations.runner import check_gpus

        check_gpus(load_config(None, {"engine.precision": "fp16"}))


def test_bf16_autocast_trains_plain_and_with_dp_sgd_hooks_and_ghost():
    """Mixed precision on the CPU (the same code path a GPU takes): bf16 costs no AUC here, the
    weights stay fp32, and Opacus' per-sample clipping works under it in both modes."""
    from client.config import PrivacyConfig, TrainConfig
    from client.training.privacy import make_plan, train_private
    from medimaging.config import ModelConfig
    from medimaging.datasets import Split, to_tensor
    from medimaging.models import build_model
    from medimaging.synthetic import site_images
    from medimaging.training import evaluate, train_epochs

    (x, y), (tx, ty) = site_images(0, 1, 400, 200)
    train, test = Split(to_tensor(x, 32), torch.from_numpy(y)), Split(to_tensor(tx, 32), torch.from_numpy(ty))
    aucs = {}
    for precision in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model(ModelConfig(), 1, 2, 32)
        train_epochs(model, train, 3, 32, 1e-3, "adam", 0, precision=precision)
        aucs[precision] = evaluate(model, test, 2, precision=precision)["auc"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert aucs[None] > 0.7 and abs(aucs[torch.bfloat16] - aucs[None]) < 0.02, aucs
    for mode in ("hooks", "ghost"):
        policy = PrivacyConfig(enabled=True, target_epsilon=8.0, grad_sample_mode=mode)
        cfg = TrainConfig(local_epochs=1, batch_size=32)
        torch.manual_seed(0)
        model = build_model(ModelConfig(), 1, 2, 32, private=True)
        before = [p.detach().clone() for p in model.parameters()]
        loss, steps, history = train_private(model, train, cfg, policy, make_plan(policy, len(train), cfg, 5), 0,
                                             precision=torch.bfloat16)
        assert steps > 0 and torch.isfinite(torch.tensor(loss)) and history, mode
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), mode


def test_deterministic_mode_is_set_for_the_task_and_off_again():
    from medimaging.compute import set_deterministic

    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


OOM_RUN = """
import os, resource, sys
sys.path.insert(0, {tests!r})
from inprocess import Collect, InProcessGrid
from client.training.app import build_client_app
from server.engine.rounds import run_federation
from server.records.outputs import read_rows
from simulations.config import load_config
from simulations.federation import hospital
from simulations.runner import prepare_run
cfg = load_config(None, {{"sites": 1, "server.rounds": 1, "strategy.min_sites": 1, "model.name": "resnet18",
    "data.image_size": 256, "train.batch_size": 64, "train.local_epochs": 1, "server.output_dir": {out!r},
    "data.synthetic.samples_per_site": 64, "data.synthetic.test_per_site": 10}})
plan = prepare_run(cfg, Collect())
plan.node_names = {{100: "nanning"}}
grid = InProcessGrid(build_client_app(lambda ctx, size: hospital(plan.config, 0, size, plan.run_dir)), 1)
pages = int(open("/proc/self/statm").read().split()[0])
resource.setrlimit(resource.RLIMIT_AS, (pages * os.sysconf("SC_PAGE_SIZE") + 1_500_000_000, resource.RLIM_INFINITY))
run_federation(grid, plan)
print([r["status"] for r in read_rows(plan.run_dir) if r["site"] == "nanning"])
print("\\n".join(plan.progress.problems))
"""


def test_out_of_memory_at_a_hospital_is_a_named_error_for_that_site(tmp_path):
    """A real out-of-memory: the hospital's process may use 1.5 GB more than it holds, and a
    resnet18 batch of 64 images at 256 px needs more. Its reply is an error naming the cause and
    the settings that help; the round ends and the process lives on."""
    from pathlib import Path

    code = OOM_RUN.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "['error']", lines  # the site's row for the round: its training failed
    said = [line for line in lines if "out of memory" in line]
    assert said and "out of memory on the hospital's CPU (resnet18, 256 px, train.batch_size 64, fp32)" in said[0]
    assert "lower train.batch_size" in said[0]
