"""Pydantic schema of a hospital's local training settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from medimaging.compute import ComputeConfig
from medimaging.config import FilesConfig, Strict
from protocol.messages import TrainConfig  # noqa: F401  (site.yaml's `train:`; the wire schema owns it)


class PrivacyConfig(Strict):
    """A hospital's sample-level differential privacy policy (DP-SGD with Opacus)."""

    enabled: bool = False
    target_epsilon: float = Field(8.0, gt=0, description="epsilon one planned run is calibrated to reach")
    budget_epsilon: float | None = Field(
        None, gt=0, description="hard cap on the ledger's total epsilon across rounds and runs; default target_epsilon"
    )
    delta: float | None = Field(None, gt=0, lt=1, description="default 1/(10 n) for n local training images")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping bound")
    accountant: Literal["auto", "rdp", "prv", "pld"] = Field(
        "auto", description="auto: the tightest of rdp (Renyi DP), prv (Opacus) and pld (dp-accounting) for each "
                            "figure; all are valid upper bounds, so auto adds no more noise than the budget needs")
    grad_sample_mode: Literal["hooks", "ghost"] = Field("hooks", description="ghost clipping saves memory")
    ledger_dir: Path | None = Field(None, description="where the privacy ledger lives; default <run folder>/privacy")

    @property
    def cap(self) -> float:
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon


class ConnectionConfig(Strict):
    """How the daemon reaches the federation's SuperLink (paths relative to site.yaml)."""

    server: str = Field(pattern=r"^[^:\s]+:\d+$", description="the SuperLink's host:port")
    root_certificates: Path = Field(Path("ca.crt"), description="the federation's CA certificate")
    node_key: Path = Field(Path("node.key"), description="this hospital's private node key (never leaves the site)")
    client_certificate: Path = Field(Path("client.crt"), description="this hospital's certificate for the server's door (mutual TLS)")
    client_key: Path = Field(Path("client.key"), description="its private key (never leaves the site)")
    runtime_port: int = Field(9094, ge=1024, le=65535, description="local port between the daemon and its app processes")


class EvaluationSite(Strict):
    """Federated evaluation (the contest) at this hospital: which of its cases score a submitted
    model, and the small-cell floor it holds to whatever the server asks."""

    split: Literal["test", "validation"] | None = Field(
        None, description="test: the files' held-out test cases (manifest split=test, or data.test_fraction), never "
                          "trained on; validation: the share validated on in training rounds; default: as the "
                          "evaluation asks (test)")
    min_cases: int = Field(20, ge=1, description="figures on fewer positives or negatives are withheld here")
    noise_epsilon: float | None = Field(
        None, gt=0, le=10, description="release two-class figures under this epsilon-DP only (Laplace noise on the "
                                       "counts, medimaging/scoring.noised_score); each model scored costs it once")


class StatisticsSite(Strict):
    """Federated statistics (`aseanfl stats -f`): what this hospital releases about its data, at
    what floor and with what noise. Only counts of a fixed schema leave (medimaging/stats.py)."""

    release: list[Literal["classes", "modality", "size", "spacing", "slices", "thickness", "intensity", "masks"]] = Field(
        default_factory=lambda: ["classes", "modality", "size", "spacing", "slices", "thickness", "intensity", "masks"],
        description="the fields this hospital releases; the others are left out and marked withheld")
    min_count: int = Field(10, ge=1, description="counts below this are withheld (the server may ask for more, never less)")
    noise_epsilon: float | None = Field(
        None, gt=0, le=10, description="release every figure with Laplace noise at this epsilon (per statistics request)")


class SiteConfig(Strict):
    """site.yaml: what a hospital's daemon knows about itself. None of it is ever sent."""

    site: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="the hospital's id in the federation")
    language: Literal["en", "vi", "th", "zh_Hans", "id", "ms", "km", "my"] | None = Field(
        None, description="what the daemon and `aseanfl client` print here (default: the locale); --lang overrides")
    data: FilesConfig
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="this hospital's device and CPU threads")
    evaluation: EvaluationSite = Field(default_factory=EvaluationSite, description="scoring submitted models")
    statistics: StatisticsSite = Field(default_factory=StatisticsSite, description="what `aseanfl stats` may learn")
    classes: dict[str, str] = Field(
        default_factory=dict, description="this hospital's class names (folder or manifest labels, any language) -> "
                                          "the federation's, e.g. {clear: normal}; unmapped names stay as they are")
    connection: ConnectionConfig | None = Field(None, description="needed by `aseanfl client start`")
    require_approval: bool = Field(True, description="run only app bundles listed in approved_apps")
    approved_apps: Path = Field(Path("approved-apps.yaml"), description="sha256 allow-list of app bundles")
    audit_log: Path = Field(Path("audit.jsonl"), description="append-only record of every outbound message")
    state_dir: Path = Field(Path("state"), description="privacy ledgers and the daemon's own files")

    def resolved(self, base: Path) -> "SiteConfig":
        """Relative paths made absolute against `base` (the folder of site.yaml)."""
        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

        out = self.model_copy(deep=True)
        out.data.root, out.data.manifest, out.data.cache_dir = fix(out.data.root), fix(out.data.manifest), fix(out.data.cache_dir)
        if out.data.dicomweb is not None:
            web = out.data.dicomweb
            web.manifest, web.password_file, web.ca_certificate = fix(web.manifest), fix(web.password_file), fix(web.ca_certificate)
        out.approved_apps, out.audit_log, out.state_dir = fix(out.approved_apps), fix(out.audit_log), fix(out.state_dir)
        # the ledger outlives runs: the hospital's budget counts every run it joined
        out.privacy.ledger_dir = fix(out.privacy.ledger_dir) or out.state_dir / "privacy"
        if out.connection is not None:
            c = out.connection
            c.root_certificates, c.node_key = fix(c.root_certificates), fix(c.node_key)
            c.client_certificate, c.client_key = fix(c.client_certificate), fix(c.client_key)
        return out


def load_site(path: Path) -> SiteConfig:
    """site.yaml -> SiteConfig with absolute paths; ConfigError naming the field on any problem."""
    from medimaging.yamlconfig import read_config

    return read_config(path, None, SiteConfig).resolved(path.resolve().parent)
