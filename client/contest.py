"""A hospital scores a submitted model on its own labelled cases (federated evaluation, the
contest): only the aggregate figures of medimaging/scoring.py leave, with the small-cell rule
applied at the larger of the server's and the hospital's own `min_cases`."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord

from medimaging.datasets import Split
from medimaging.models import build_model
from medimaging.scoring import SiteScores, score, segmentation_score
from medimaging.training import predict

from .messages import EvaluationSpec

SCORES_KEY = "scores"  # the reply's config record: the SiteScores as JSON


def score_model(spec: EvaluationSpec, arrays, split: Split, device: torch.device, precision, own_min_cases: int) -> SiteScores:
    """The spec's model with the server's arrays, scored on `split` (the hospital's evaluation cases)."""
    model = build_model(spec.model, spec.in_channels, spec.num_classes, spec.image_size, spec.private, spec.spatial_dims)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.to(device)
    min_cases = max(spec.min_cases, own_min_cases)
    outputs = predict(model, split, 64, precision)
    if split.segmentation:
        return segmentation_score(outputs.argmax(1).numpy(), split.y.numpy(), spec.num_classes, min_cases, spec.seed)
    probs = torch.softmax(outputs, dim=1).numpy().astype(np.float64)
    return score(probs, split.y.numpy(), min_cases, spec.threshold, spec.seed)


def scores_record(scores: SiteScores) -> ConfigRecord:
    return ConfigRecord({"json": scores.model_dump_json()})
