"""A deployed federation over real links: fast, rate-limited, and flapping.

Each hospital's daemon runs in its own network namespace joined to the server by a veth pair
(simulations.links): first unlimited, then each link limited with a token bucket (`tc tbf`, both
ways), then limited with one hospital's link cut (`ip link set down`) for `--cut` seconds as that
hospital starts training in round 1. Prints per scenario: seconds per round, bytes per hospital
per round both ways, and each hospital's status per round. Needs root and iproute2.

    sudo python -m benchmarks.links --sites 3 --rounds 3 --mbit 2 --cut 30
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.links import Links, sweep, unavailable
from simulations.local_deployment import BIN, LocalDeployment, aseanfl

SCENARIOS = ("fast", "limited", "flapping")


def _wait_for(path: Path, start: int, pattern: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, path.read_bytes()[start:].decode(errors="replace")):
            return True
        time.sleep(0.2)
    return False


def _scenario(dep: LocalDeployment, links: Links, sites: list[str], name: str, rounds: int, mbit: float,
              cut: float, overrides: list[str]) -> dict:
    for i in range(len(sites)):
        links.limit(i, None if name == "fast" else mbit)
    measured = links.uplink_mbit(0)
    out = dep.root / f"results-{name}"
    cmd = [str(BIN / "aseanfl"), "run", "-f", str(dep.fed), "--out", str(out), "--rounds", str(rounds), *overrides]
    log = dep.root / f"{sites[0]}.log"
    start = log.stat().st_size
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=dep.root)
    down = None
    if name == "flapping" and _wait_for(log, start, r"ROUND 1\]\n.*Receiving: train message", 300):
        links.cut(0)  # the first hospital's link goes down as it starts training
        down = time.monotonic()
        time.sleep(cut)
        links.restore(0)
        down = time.monotonic() - down
    said = run.communicate(timeout=3600)[0]
    folder = next(out.glob("run-*"), None)
    if run.returncode != 0 or folder is None:
        raise RuntimeError(f"{name}: the run failed:\n{said[-3000:]}")
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    per_site = {s: [r for r in rows if r["site"] == s] for s in sites}
    return {
        "scenario": name, "mbit": None if name == "fast" else mbit, "measured_mbit": measured, "cut_s": down,
        "round_seconds": json.loads((folder / "summary.json").read_text())["round_seconds"],
        "bytes_to_site": {s: [int(r["bytes_to_site"] or 0) for r in rs] for s, rs in per_site.items()},
        "bytes_from_site": {s: [int(r["bytes_from_site"] or 0) for r in rs] for s, rs in per_site.items()},
        "status": {s: [r["status"] for r in rs] for s, rs in per_site.items()}, "log": said,
    }


def measure(root: Path, sites: int = 3, rounds: int = 3, mbit: float = 2.0, cut: float = 30.0, samples: int = 90,
            image_size: int = 32, model: str = "cnn", scenarios=SCENARIOS) -> list[dict]:
    """Provision and start a loopback federation whose hospitals sit behind their own links, and
    run `scenarios` on it, one after the other. Everything is stopped and removed at the end."""
    names = [f"site-{chr(97 + i)}" for i in range(sites)]
    sweep()
    with Links(sites) as links, LocalDeployment(root, names, "links", host=links.server_ip) as dep:
        if dep.provision().returncode != 0:
            raise RuntimeError("provisioning failed")
        digest = aseanfl("app-hash").stdout.strip()
        for i, site in enumerate(names):
            dep.prepare_site(site, i, image_size=image_size, samples=samples)
            dep.approve(site, digest)
        dep.start_server()
        for i, site in enumerate(names):
            dep.start_site(site, prefix=links.command(i))
        if dep.wait_online(set(names)) < set(names):
            raise RuntimeError("the hospitals in their namespaces did not connect")
        overrides = [x for k, v in {"model.name": model, "task.image_size": image_size, "dp_models": "false",
                                    "wait_for_sites": sites, "train.local_epochs": 2}.items()
                     for x in ("--set", f"{k}={v}")]
        return [_scenario(dep, links, names, name, rounds, mbit, cut, overrides) for name in scenarios]


def table(results: list[dict]) -> str:
    lines = ["| link | measured uplink (Mbit/s) | s per round | kB to / from each hospital per round | status per round |",
             "|---|---|---|---|---|"]
    for r in results:
        link = "unlimited" if r["mbit"] is None else f"tbf {r['mbit']:g} Mbit/s"
        if r["cut_s"]:
            link += f", site-a cut {r['cut_s']:.0f} s in round 1"
        to = max(b for v in r["bytes_to_site"].values() for b in v) / 1e3
        back = max(b for v in r["bytes_from_site"].values() for b in v) / 1e3
        status = "; ".join(f"{s}: {','.join(v)}" for s, v in r["status"].items())
        seconds = ", ".join(f"{s:.1f}" for s in r["round_seconds"])
        lines.append(f"| {link} | {r['measured_mbit']:.1f} | {seconds} | {to:.0f} / {back:.0f} | {status} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mbit", type=float, default=2.0)
    ap.add_argument("--cut", type=float, default=30.0, help="seconds the flapping link stays down")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    if reason := unavailable():
        sys.exit(f"benchmarks.links: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(Path(tmp), args.sites, args.rounds, args.mbit, args.cut, model=args.model,
                          image_size=args.image_size)
    print(table(results))


if __name__ == "__main__":
    main()
