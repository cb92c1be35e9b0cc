"""The layout is the architecture, and stays so: the layers and the absence of import circles are
contracts in pyproject.toml ([tool.importlinter]) that import-linter checks on the real import
graph (imports inside functions included); files stay small; the README stays a front page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import-linter's `lint-imports` command, run by this interpreter (whichever environment runs the suite)
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
PACKAGES = CONFIG["root_packages"]
MAX_LINES = 400


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's packages, not the installed ones
    return subprocess.run([*LINT, str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_package_is_in_a_contract():
    found = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "benchmarks"))
    assert sorted(PACKAGES) == found
    layers = [name for c in CONFIG["contracts"] if c["type"] == "layers" and "." not in c["layers"][0]
              for layer in c["layers"] for name in layer.split(" | ")]
    assert sorted(layers) == found  # each top-level package sits in the top-level layers


def test_the_layers_hold_and_no_package_has_an_import_circle():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    contracts = CONFIG["contracts"]
    assert len(contracts) >= 4 and f"{len(contracts)} kept, 0 broken" in out.stdout
    for contract in contracts:
        assert re.sub(r"\s+", " ", contract["name"]) in re.sub(r"\s+", " ", out.stdout)


def test_the_contracts_refuse_a_role_crossing_an_upward_import_and_a_circle(tmp_path):
    """The same check on a copy of the tree with four wrong imports added: each is named."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "locale", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    wrong = {
        "server/engine/rounds.py": "import client.training.app  # the coordinator reaching into the hospital's code",
        "server/records/outputs.py": "import server.engine.rounds  # records below the engine",
        "common/i18n.py": "import aseanfl.cli  # the command line imported from the bottom",
        "medimaging/items.py": "import medimaging.files  # files imports items: a circle",
    }
    for path, line in wrong.items():
        with (tmp_path / path).open("a") as f:
            f.write(f"\n{line}\n")
    out = _lint(tmp_path)
    text = out.stdout
    assert out.returncode != 0 and "broken" in text
    assert "server is not allowed to import client" in text
    assert "server.records is not allowed to import server.engine" in text
    assert "common is not allowed to import aseanfl" in text
    assert "No cycles are allowed in medimaging" in text and ".items -> .files" in text


def test_source_files_stay_under_400_lines():
    long = {}
    for name in PACKAGES:
        for path in (ROOT / name).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                long[str(path.relative_to(ROOT))] = lines
    assert not long, f"split these by concern: {long}"


def test_the_readme_is_a_front_page_with_two_commands_and_live_links():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, len(readme.encode())
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    setup = [b for b in blocks if "pip install torch==2.13.0" in b or ".ci/test" in b]
    assert setup, "the README's set-up commands are missing"
    test_command = next(line for b in blocks for line in b.splitlines() if ".ci/test" in line)
    assert len(test_command) <= 80
    assert ".ci/test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command
    for target in re.findall(r"\]\(((?:docs/|\.ci/|benchmarks/)[^)#]+)", readme):
        assert (ROOT / target).exists(), target


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors: headings lower-cased, punctuation dropped, spaces to '-'."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out | set(re.findall(r'<a id="([^"]+)"', markdown))


def test_every_link_between_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", text):
            target = target[0] or target[1]
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_every_source_file_the_docs_name_exists():
    """The docs follow the layout: a module they point a reader to is where they say."""
    named = re.compile(r"(?<![\w./-])((?:aseanfl|common|protocol|client|server|strategies|simulations|medimaging|tests|"
                       r"benchmarks)/[\w/-]+\.py)\b")
    missing = [f"{page.name}: {path}" for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
               for path in named.findall(page.read_text()) if not (ROOT / path).is_file()]
    assert not missing, missing


def test_no_page_calls_a_command_that_exists_not_yet_there():
    """A 'Not yet' in the docs is a promise; once the command exists the sentence must go
    (docs/researcher.md said `aseanfl evaluate -f` was not there long after it was)."""
    from typer.main import get_command

    from aseanfl.cli import app

    group = get_command(app)
    commands = {name for name in group.commands}
    commands |= {f"{name} {sub}" for name, cmd in group.commands.items() for sub in getattr(cmd, "commands", {})}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    stale = []
    for page in pages:
        for paragraph in page.read_text().split("\n\n"):
            if re.search(r"\bnot yet\b", paragraph, re.I):
                for called in re.findall(r"`aseanfl ([a-z-]+(?: [a-z-]+)?)", paragraph):
                    if called in commands or called.split()[0] in commands:
                        stale.append(f"{page.name}: 'not yet' beside `aseanfl {called}`")
    assert not stale, stale
    assert "evaluate" in commands, "the check sees the command line's commands"


def test_monai_loads_without_bert_and_adapters_still_get_transformers():
    """`import monai` would import transformers' BERT (2.3 s in every hospital process):
    medimaging/monai_loader.py loads MONAI without it. Every monai import in the packages comes
    right after the loader's; a hospital worker and a simulation load no transformers; PEFT,
    imported afterwards in the same process, still gets the real one."""
    late = []
    for name in PACKAGES:
        for path in (ROOT / name).rglob("*.py"):
            if path == ROOT / "medimaging" / "monai_loader.py":
                continue
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                if re.match(r"\s*(import monai\b|from monai\b)", line) and not re.match(
                        r"\s*(import medimaging\.monai_loader\b|import monai\b|from monai\b)", lines[i - 1]):
                    late.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not late, f"import medimaging.monai_loader on the line before: {late}"
    code = ("import sys, client.training.app, simulations.runner, monai.networks.nets as nets\n"
            "assert 'transformers' not in sys.modules, 'transformers loaded'\n"
            "assert nets.resnet18 and nets.Transchex\n"
            "import peft, transformers\n"
            "print(type(transformers.PreTrainedModel).__name__, peft.LoraConfig.__name__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "LoraConfig" in res.stdout, res.stderr[-2000:]
