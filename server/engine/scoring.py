"""Scoring one model at every hospital: the model file goes out with an EvaluationSpec, each
hospital replies with the figures it releases (never a case's score), and the server pools them
into evaluation.json and evaluation.md. Used by cross-site evaluation after a run's last round,
by `aseanfl evaluate -f` and by the contest (server/evaluation/)."""

from __future__ import annotations

import re
from pathlib import Path

from flwr.app import RecordDict
from pydantic import ValidationError

from medimaging.scoring import SiteScores, pool
from protocol.messages import MODEL_KEY, SCORES_KEY, model_record

from server.engine.exchange import ask_every_site
from server.engine.names import partition_names, site_name


def _site_scores(reply, known: dict[int, str], spec) -> tuple[str, SiteScores | str]:
    """(hospital, its figures) from a reply, or (hospital, why there are none)."""
    site = site_name(reply, known)
    if reply.has_error():  # Flower's "<class 'X'>:<'why'>" -> why
        return site, "error: " + re.sub(r"^<class '[^']*'>:<'(.*)'>$", r"\1", str(reply.error.reason), flags=re.S)
    try:
        record = reply.content.config_records[SCORES_KEY]
        scores = SiteScores.model_validate_json(str(record["json"]))
    except (KeyError, ValidationError) as exc:
        return site, f"error: its figures break the schema ({type(exc).__name__})"
    if record.get("model-sha256") != spec.model_sha256:
        return site, "error: it scored another model than the one sent"
    return site, scores


def evaluate_federation(grid, spec, blob: bytes, out_dir: Path, node_names: dict[int, str],
                        site_names: list[str] | None, timeout: float) -> dict:
    """Send the model file (`blob`, checked: check_model_file) to every connected hospital,
    collect their figures, pool them; write evaluation.json and evaluation.md into `out_dir`."""
    known = {**node_names, **partition_names(grid, site_names)}
    model = model_record(blob)
    replies, missing = ask_every_site(grid, known, lambda: RecordDict({MODEL_KEY: model, "config": spec.to_config()}),
                                      "evaluate.contest", spec.evaluation, timeout)
    results: dict[str, SiteScores | str] = dict(missing)
    for reply in replies:
        site, got = _site_scores(reply, known, spec)
        results[site] = got
    out = pooled_result(spec, results)
    write_results(out_dir, out)
    return out


def pooled_result(spec, results: dict[str, SiteScores | str]) -> dict:
    """evaluation.json's content: what each hospital released (or why nothing), and the pooled figures."""
    scored = {s: r for s, r in sorted(results.items()) if isinstance(r, SiteScores)}
    pooled = pool(list(scored.values()), spec.seed)
    pooled["left_out"] = [list(scored)[i] for i in pooled.get("left_out", [])]
    return {"evaluation": spec.evaluation, "model_sha256": spec.model_sha256, "card": spec.model_dump(mode="json"),
            "sites": {s: (r.model_dump(mode="json") if isinstance(r, SiteScores) else {"error": r})
                      for s, r in sorted(results.items())},
            "pooled": pooled}


def write_results(out_dir: Path, result: dict) -> None:
    """evaluation.json (everything the hospitals released, and the pooled figures) and a readable
    evaluation.md, each written whole or not at all."""
    import json
    import os

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("evaluation.json", json.dumps(result, indent=1) + "\n"), ("evaluation.md", _markdown(result))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def _cell(interval: dict | None) -> str:
    if not interval:
        return ""
    if interval.get("withheld"):
        return f"withheld ({interval['withheld']})"
    if interval.get("value") is None:
        return ""
    low, high = interval.get("low"), interval.get("high")
    ci = f" ({low:.3f}-{high:.3f})" if low is not None and high is not None and low == low else ""
    return f"{interval['value']:.3f}{ci}"


def _markdown(result: dict) -> str:
    p = result["pooled"]
    floors = sorted({s["min_cases"] for s in result["sites"].values() if "min_cases" in s}) or [result["card"]["min_cases"]]
    floor = str(floors[0]) if len(floors) == 1 else f"{floors[0]}-{floors[-1]} (each hospital's own floor)"
    lines = [f"# Evaluation `{result['evaluation']}`", "", f"Model sha256 `{result['model_sha256']}` "
             f"({result['card']['model']['name']}, {result['card']['num_classes']} classes, "
             f"{result['card']['image_size']} px); each hospital scored it on its own held-out cases (test: files never "
             "trained on; validation: cases validated on in training), "
             f"figures on fewer than {floor} positives or negatives are withheld.", ""]
    if result["card"]["task"] == "segmentation":
        lines += ["| hospital | cases | Dice per label (95 % CI) |", "|---|---|---|"]
        for site, s in result["sites"].items():
            if "error" in s:
                lines.append(f"| {site} | | {s['error']} |")
            else:
                lines.append(f"| {site} | {s['cases']} {s.get('split') or ''} | {'; '.join(_cell(d) for d in s['dice'])} |")
        dice = "; ".join("" if d is None else f"{d:.3f}" for d in p.get("global_dice", []))
        lines += [f"| **pooled** | {p['cases']} | global Dice {dice} (exact, from voxel sums) |"]
        return "\n".join(lines) + "\n"
    lines += ["| hospital | cases | AUC (95 % CI) | accuracy | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for site, s in result["sites"].items():
        if "error" in s:
            lines.append(f"| {site} | | {s['error']} | | | |")
            continue
        lines.append(f"| {site} | {s['cases']} {s.get('split') or ''} | {_cell(s['auc'])} | {_cell(s['accuracy'])} | {_cell(s.get('sensitivity'))} | "
                     f"{_cell(s.get('specificity'))} |")
    def fmt(key: str) -> str:
        value, ci = p.get(key), p.get("intervals", {}).get(key) or {}
        if value is None:
            return ""
        return f"{value:.3f}" + (f" ({ci['low']:.3f}-{ci['high']:.3f})" if ci.get("low") is not None else "")

    lines += [f"| **pooled** | {p['cases']} | {fmt('auc')} (on the score grid) | {fmt('accuracy')} (exact) | "
              f"{fmt('sensitivity')} (exact) | {fmt('specificity')} (exact) |", "",
              "Intervals: at each hospital a percentile bootstrap of its cases (1000 resamples, seeded); pooled, "
              "Wilson intervals for the exact proportions and a bootstrap within each hospital and class of the "
              "released score-grid counts for the AUC.", ""]
    if p.get("left_out"):
        lines += [f"Left out of the pooled AUC (a figure withheld): {', '.join(p['left_out'])}.", ""]
    return "\n".join(lines)


def site_line(s: dict) -> str:
    """One hospital's figures in a line (or why there are none)."""
    if "error" in s:
        return s["error"]
    if s["task"] == "segmentation":
        return f"Dice {'; '.join(_cell(d) for d in s['dice'])} on {s['cases']} {s.get('split') or ''} cases"
    return f"AUC {_cell(s['auc'])}, accuracy {_cell(s['accuracy'])} on {s['cases']} {s.get('split') or ''} cases"


def pooled_line(p: dict) -> str:
    if "global_dice" in p:
        dice = ", ".join("withheld" if d is None else f"{d:.3f}" for d in p["global_dice"])
        return f"{p['hospitals']} hospitals, {p['cases']} cases: global Dice {dice}"
    said = []
    for k in ("auc", "accuracy", "sensitivity", "specificity"):
        if isinstance(p.get(k), float):
            ci = p.get("intervals", {}).get(k) or {}
            band = f" ({ci['low']:.3f}-{ci['high']:.3f})" if ci.get("low") is not None else ""
            said.append(f"{k} {p[k]:.3f}{band}")
    return f"{p['hospitals']} hospitals, {p['cases']} cases: {', '.join(said) or 'no figure released'}"
