"""Schemas of what crosses the wire between server and hospital (besides model arrays).

The server sends a TaskSpec; a hospital replies with TrainMetrics / EvalMetrics, a fixed set
of aggregate numbers. extra="forbid" on both sides means nothing else can ride along.
"""

from __future__ import annotations

import json

import math
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from pydantic import BaseModel, ConfigDict, Field

from medimaging.config import AugmentConfig, Dims, ModelConfig, Strict, Task

TASK_KEY = "task"
NAMES_KEY = "array-names"  # SecAgg+: legacy Parameters have no names; the server sends them alongside
MODEL_KEY = "model"  # an evaluation request's array record: the model file, bytes as one uint8 array
CONTROL_KEY = "control"  # SCAFFOLD: the server's control variate in a task, a hospital's change of its own in the reply
FILE_KEY = "file"
# model.freeze / model.adapters: the frozen layers (an array record), sent to a hospital until it
# holds them, and their digest (a config record, in every task of such a run)
FROZEN_KEY = "frozen"
FEATURES_KEY = "feature-sums"  # head calibration: a hospital's feature sums (medimaging/calibration.py)
PERSONAL_HEAD_KEY = "personal-head"  # strategy.personal_heads: the head fit for the one hospital a message goes to
FROZEN_DIGEST_KEY = "frozen-digest"


def model_record(blob: bytes) -> ArrayRecord:
    """A model file's bytes as the request's array record."""
    return ArrayRecord({FILE_KEY: Array(np.frombuffer(blob, dtype=np.uint8).copy())})


class TrainConfig(Strict):
    local_epochs: int = Field(2, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["adam", "sgd"] = "adam"
    logit_adjustment: float = Field(0.0, ge=0, le=5, description=(
        "label skew: each hospital trains on logits + tau log(its class prior) (Menon et al. 2021; FedLC, Zhang et "
        "al. 2022), so a hospital that holds few images of a class does not pull the shared head away from it; "
        "0 = plain cross-entropy. Single-label classification, not with DP-SGD"))
    augment: AugmentConfig = AugmentConfig()
    lr_schedule: Literal["constant", "step", "cosine"] = Field("constant", description=(
        "the learning rate over the rounds (over the epochs in a centralized comparison): step = MedMNIST v2's "
        "(x0.1 from half the rounds, x0.01 from three quarters), cosine = half a cosine to 0; the server sends each "
        "round's lr"))

    def lr_factor(self, index: int, count: int) -> float:
        """The schedule's factor for round (or epoch) `index` of `count`, counted from 0."""
        if self.lr_schedule == "step":
            return 0.1 ** ((index >= 0.5 * count) + (index >= 0.75 * count))
        if self.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * index / count))
        return 1.0

    def at_round(self, server_round: int, total_rounds: int) -> "TrainConfig":
        """What a hospital trains with in this round (1-based): the scheduled lr, as a constant."""
        if self.lr_schedule == "constant" or server_round < 1:
            return self
        factor = self.lr_factor(min(server_round, total_rounds) - 1, total_rounds)
        return self.model_copy(update={"lr": self.lr * factor, "lr_schedule": "constant"})


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


PERSONAL_METHODS = ("none", "fedper", "fedrep", "ditto", "apfl")


class Personalization(Message):
    """Each hospital's own model beside the federation's (strategy.personalization; the
    hospital's side is client/training/personal.py). fedper/fedrep keep the classifier head at the
    hospital and federate the body; ditto/apfl keep a whole personal model at the hospital and
    federate a plain global model. Nothing personal is ever sent."""

    method: Literal[PERSONAL_METHODS] = "none"  # type: ignore[valid-type]
    head_epochs: int = Field(1, ge=1, le=100, description="fedrep: epochs on the head (body frozen) before the body's")
    ditto_lambda: float = Field(1.0, ge=0, description="ditto: pull of the personal model towards the global one")
    ditto_epochs: int | None = Field(None, ge=1, le=100, description="ditto: the personal model's epochs each round "
                                                                      "(Li et al.'s local personal steps); default: "
                                                                      "train.local_epochs")
    apfl_alpha: float = Field(0.25, ge=0, le=1, description="apfl: starting weight of the personal model in the mix "
                                                            "(then learned by each hospital)")

    @property
    def keeps_head(self) -> bool:
        return self.method in ("fedper", "fedrep")

    @property
    def keeps_model(self) -> bool:
        return self.method in ("ditto", "apfl")

    @property
    def extra_passes(self) -> bool:
        """Trains more than the federated update each round (FedRep's head pass, Ditto's and APFL's
        personal model): outside a DP-SGD ledger, and beyond SCAFFOLD's control variates."""
        return self.method == "fedrep" or self.keeps_model


class TaskSpec(Message):
    """What the server asks a hospital to do in one round."""

    run: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",  # never "." or "..": it names folders at the hospital
                     description="run id; names ledger entries and the hospital's state/<run>/ folder")
    server_round: int = Field(ge=0)
    total_rounds: int = Field(ge=1, description="planned rounds; DP noise is calibrated for them")
    seed: int
    model: ModelConfig
    train: TrainConfig
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    image_size: int = Field(ge=8)
    task: Task = Field("classification", description="classification (incl. multi-label) or segmentation")
    spatial_dims: Dims = Field(2, description="2 = images, 3 = volumes")
    classes: list[str] | None = Field(None, description="the federation's class names in label order (a hospital "
                                                        "whose own differ refuses); None: not checked (a simulation)")
    private: bool = Field(False, description="the federation trains with DP-SGD: DP-compatible model")
    client_clipping: Literal["none", "fixed", "adaptive"] = Field(
        "none", description="clip the update at the hospital (Flower client-side central DP)"
    )
    fedbn: bool = Field(False, description="keep normalisation layers at the hospital; send the rest")
    personal: Personalization = Field(default_factory=Personalization, description="the hospital's own model, if any")
    scaffold: bool = Field(False, description="correct local steps with control variates (the task's 'control' record)")
    finetune_eval: bool = Field(False, description="also validate after one local epoch of fine-tuning")
    codec: Literal["none", "fp16", "int8", "int4"] = Field("none", description="how the update is encoded")
    block: int = Field(256, ge=8, le=65536)
    topk: float | None = Field(None, gt=0, le=1)
    error_feedback: bool = True

    @property
    def compressed(self) -> bool:
        return self.codec != "none" or self.topk is not None

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({TASK_KEY: self.model_dump_json()})

    @classmethod
    def from_config(cls, record: ConfigRecord) -> "TaskSpec":
        return cls.model_validate(json.loads(str(record[TASK_KEY])))


class TrainMetrics(Message):
    num_examples: int = Field(alias="num-examples", ge=1)
    train_loss: float = Field(alias="train-loss")
    steps: int = Field(ge=0)
    epsilon: float = Field(description="the hospital's total epsilon spent so far; NaN without DP")
    norm_bit: bool | None = Field(None, description="set by Flower's adaptive clipping mod: update was clipped")

    def record(self) -> MetricRecord:
        return MetricRecord(self.model_dump(by_alias=True, exclude_none=True))


class EvalMetrics(Message):
    num_examples: int = Field(alias="num-examples", ge=1)
    val_loss: float = Field(alias="val-loss")
    val_accuracy: float = Field(alias="val-accuracy", ge=0, le=1)
    val_auc: float = Field(alias="val-auc")
    ft_val_accuracy: float | None = Field(None, alias="ft-val-accuracy", ge=0, le=1)
    ft_val_auc: float | None = Field(None, alias="ft-val-auc")
    val_dice: float | None = Field(None, alias="val-dice", description="segmentation: mean Dice of the foreground labels")
    ft_val_dice: float | None = Field(None, alias="ft-val-dice")
    pers_val_accuracy: float | None = Field(None, alias="pers-val-accuracy", ge=0, le=1,
                                            description="ditto/apfl: the hospital's personalized model")
    pers_val_auc: float | None = Field(None, alias="pers-val-auc")
    pers_val_dice: float | None = Field(None, alias="pers-val-dice")

    def record(self) -> MetricRecord:
        return MetricRecord(self.model_dump(by_alias=True, exclude_none=True))


REFUSAL_KEY = "refusal"


class Refusal(Message):
    """A hospital's structured 'no' to a round: it did not train, and says why."""

    code: Literal["privacy-budget", "privacy-ledger"]
    reason: str
    epsilon_spent: float = Field(math.nan, alias="epsilon-spent")
    epsilon_budget: float = Field(math.nan, alias="epsilon-budget")

    def record(self) -> ConfigRecord:
        return ConfigRecord(self.model_dump(by_alias=True))


EVALUATION_KEY = "evaluation"
SCORES_KEY = "scores"  # an evaluation reply's config record: "json" (medimaging.scoring.SiteScores), "model-sha256"


class EvaluationSpec(Message):
    """What the server asks a hospital to score (federated evaluation): a model of this card,
    its arrays in the message, identified by the model file's sha256."""

    evaluation: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="evaluation id; names audit entries")
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model: ModelConfig
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    image_size: int = Field(ge=8)
    task: Task = "classification"
    spatial_dims: Dims = 2
    private: bool = False
    min_cases: int = Field(20, ge=1, description="figures on fewer positives or negatives are withheld")
    threshold: float = Field(0.5, gt=0, lt=1, description="operating point: probability of class 1")
    split: Literal["test", "validation"] = Field("test", description="the cases asked for (a hospital's site.yaml may name its own)")
    seed: int = 0
    classes: list[str] | None = None  # the federation's class names, agreed before the model was sent

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({EVALUATION_KEY: self.model_dump_json()})

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "EvaluationSpec":
        return cls.model_validate_json(str(config[EVALUATION_KEY]))


DESCRIBE_KEY = "describe"
CLASSES_KEY = "classes"  # a reply's config record: "names" (the hospital's class names in label order), "task"
STATISTICS_KEY = "statistics"  # a reply's config record: "json" (medimaging.stats.SiteStats)


class DescribeSpec(Message):
    """What the server asks a hospital about its data: its class names (`query.classes`, before
    a run) or its statistics (`query.stats`, `aseanfl stats -f`). Never a per-image value."""

    request: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="request id; names audit entries")
    image_size: int = Field(64, ge=8, le=512, description="the task's side (the hospital decodes its images to it)")
    min_count: int = Field(1, ge=1, description="counts below this are withheld (the hospital's own floor may be higher)")

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({DESCRIBE_KEY: self.model_dump_json()})

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "DescribeSpec":
        return cls.model_validate_json(str(config[DESCRIBE_KEY]))
