"""Deployed vs simulated round time, measured in one run on the same images.

Deployed: `aseanfl server start` + one `aseanfl client start` daemon per hospital on loopback
(the nginx front with mutual TLS, node keys, app approval, audit log; one ClientApp process per task, as Flower's
deployment runtime does). Simulated: the same PNG files through `data.files` on Flower's
Simulation Engine (Ray), split IID across the same number of hospitals. Prints mean seconds per
round after the first (start-up excluded), the ratio, and where a deployed task's time goes (from
the hospitals' worker lines).

    python -m benchmarks.deployment --sites 3 --rounds 4                       # the small setting
    python -m benchmarks.deployment --model resnet18 --image-size 64 --samples 750   # a realistic round
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import tempfile
from pathlib import Path

from simulations.config import load_config
from simulations.local_deployment import LocalDeployment, aseanfl
from simulations.runner import simulate


def _steady(summary: Path) -> float:
    seconds = json.loads(summary.read_text())["round_seconds"]
    rest = seconds[1:] or seconds
    return sum(rest) / len(rest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=90, help="images per hospital (80%% of them train)")
    args = ap.parse_args()
    sets = {"model.name": args.model, "task.image_size": args.image_size, "dp_models": "false"}  # the simulated model
    sites = [f"site-{chr(97 + i)}" for i in range(args.sites)]
    with tempfile.TemporaryDirectory() as tmp, LocalDeployment(Path(tmp), sites, "bench") as dep:
        dep.provision()
        digest = aseanfl("app-hash").stdout.strip()
        for i, site in enumerate(sites):
            dep.prepare_site(site, i, image_size=args.image_size, samples=args.samples)
            dep.approve(site, digest)
        dep.start_server()
        for site in sites:
            dep.start_site(site)
        dep.wait_online(set(sites))
        access = dep.fed / "server" / "front" / "access.log"
        seen = access.stat().st_size
        overrides = [x for k, v in {**sets, "wait_for_sites": len(sites)}.items() for x in ("--set", f"{k}={v}")]
        run = dep.run("--rounds", str(args.rounds), *overrides, timeout=3600)
        if run.returncode != 0:
            raise SystemExit(f"deployed run failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        deployed = _steady(next((Path(tmp) / "results").glob("run-*")) / "summary.json")
        with access.open("rb") as f:  # the Fleet requests the hospitals made during the run, by the front's log
            f.seek(seen)
            fleet = [line.split() for line in f.read().decode().splitlines() if " /v1/fleet/" in line]
        per_round = len(fleet) / len(sites) / args.rounds
        dep.stop_all()
        tasks = [tuple(map(float, m)) for site in sites for m in re.findall(  # each hospital's first task imports
            r"task: message ([\d.]+) s, bundle check ([\d.]+) s, app ([\d.]+) s",  # the bundle: left out
            (Path(tmp) / f"{site}.log").read_text(errors="replace"))]

        manifest = Path(tmp) / "all.csv"
        with manifest.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for png in sorted((Path(tmp) / "pacs").glob("*/*/*.png")):
                w.writerow([png.relative_to(Path(tmp) / "pacs"), png.parent.name])
        cfg = load_config(None, {"sites": len(sites), "server.rounds": args.rounds, "server.output_dir": str(Path(tmp) / "sim"),
                                 "data.files.root": str(Path(tmp) / "pacs"), "data.files.manifest": str(manifest),
                                 "data.files.image_size": args.image_size, "data.files.test_fraction": 0.1,
                                 "model.name": args.model})
        simulated = _steady(simulate(cfg) / "summary.json")
    print(f"{len(sites)} hospitals, {args.rounds} rounds, {args.model} at {args.image_size}x{args.image_size}, "
          f"{args.samples} images per hospital; mean seconds per round after the first")
    print(f"| setting | s/round |\n|---|---|\n| deployed (loopback: nginx front with mutual TLS, daemons) | {deployed:.1f} |\n"
          f"| simulated (Ray) | {simulated:.1f} |\n| ratio | {deployed / simulated:.2f}x |")
    print(f"| overhead (deployed - simulated) | {deployed - simulated:.1f} |")
    print(f"Fleet API requests through the front per hospital per round (polling while waiting included): {per_round:.0f}")
    if tasks:
        med = [statistics.median(t[i] for t in tasks) for i in range(3)]
        print(f"a hospital's task, median of {len(tasks)}: message from the SuperNode {med[0]:.2f} s, bundle check "
              f"{med[1]:.3f} s, the app (training or validation) {med[2]:.2f} s")


if __name__ == "__main__":
    main()
