"""Where a hospital trains (medimaging/compute.py): the device and CPU threads are the
hospital's own settings (site.yaml `compute`), a simulated hospital's come from the engine's
resources; a GPU asked for on a machine without one is a one-line config error naming the
setting. GPU runs are in tests/test_gpu.py (skipped, saying so, where there is no GPU)."""

from __future__ import annotations

import subprocess

import pytest
import torch
from flwr.app import MessageType
from inprocess import InProcessGrid, site_yaml

from client.app import app as deployed_app
from client.config import load_site
from client.site import SITE_CONFIG_KEY
from medimaging.compute import ComputeUnavailable, cores, resolve_device
from medimaging.yamlconfig import ConfigError
from server.loop import run_federation
from server.outputs import read_rows
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
