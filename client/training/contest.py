"""A hospital scores a submitted model on its own labelled cases (federated evaluation, the
contest): only the aggregate figures of medimaging/scoring.py leave, with the small-cell rule
applied at the larger of the server's and the hospital's own `min_cases`.

The model arrives as the submitted file's bytes (record MODEL_KEY): the hospital hashes what it
received and scores it only if the sha256 is the one the server named, so the hash in its audit
log is that of the model it actually scored."""

from __future__ import annotations

import hashlib

import torch
from flwr.app import ConfigRecord

from medimaging.models import build_model
from medimaging.scoring import SiteScores, noised_score, score, segmentation_score
from medimaging.training import predict

from protocol.messages import FILE_KEY, MODEL_KEY, SCORES_KEY, EvaluationSpec, model_record
from client.training.site import SiteDataError

__all__ = ["SCORES_KEY", "model_record", "score_model", "scores_record"]


def received_model(spec: EvaluationSpec, content) -> dict[str, torch.Tensor]:
    """The model file in the request, checked against the sha256 the server named."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    blob = content[MODEL_KEY][FILE_KEY].numpy().tobytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != spec.model_sha256:
        raise SiteDataError(f"the model received has sha256 {digest}, not {spec.model_sha256} as the evaluation "
                            "names it; nothing was scored")
    try:
        return load(blob)
    except (SafetensorError, ValueError) as exc:
        raise SiteDataError(f"the model received is not a readable safetensors file ({exc}); nothing was scored") from None


def evaluation_cases(spec: EvaluationSpec, hospital):
    """(the cases a model is scored on, which split they are): the hospital's own choice in
    site.yaml, else the evaluation's; a hospital without held-out test files scores on its
    validation cases, and says so."""
    wanted = hospital.evaluation_split or spec.split
    if wanted == "test" and hospital.test is not None and len(hospital.test):
        return hospital.test, "test"
    return hospital.data.val, "validation"


NOISE_KEY_FILE = "evaluation-noise.key"  # the hospital's secret behind its DP noise (never sent)


def noise_seed(hospital, spec: EvaluationSpec, which: str, min_cases: int) -> int:
    """The seed of this hospital's DP noise for one model (secret_seed of what is scored)."""
    return secret_seed(hospital, f"{spec.model_sha256}|{which}|{min_cases}|{spec.threshold}".encode())


def secret_seed(hospital, asked: bytes) -> int:
    """A noise seed from the hospital's own secret key (made once, readable by the daemon's
    account only) and what is asked, so the same question asked again gets the same noise
    (asking twice tells nothing new) and nobody else can take it off."""
    import hmac
    import os

    path = hospital.ledger_root / NOISE_KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another worker made it a moment ago
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
    return int.from_bytes(hmac.new(path.read_bytes(), asked, hashlib.sha256).digest()[:8], "little")


def score_model(spec: EvaluationSpec, content, hospital) -> SiteScores:
    """The submitted model, scored on this hospital's evaluation cases."""
    split, which = evaluation_cases(spec, hospital)
    if split.multilabel:
        raise SiteDataError("federated evaluation scores single-label classification and segmentation; this "
                            "hospital's task is multi-label")
    if hospital.noise_epsilon is not None and (split.segmentation or spec.num_classes != 2):
        raise SiteDataError("this hospital releases evaluation figures with DP noise only (site.yaml "
                            "evaluation.noise_epsilon), which aseanfl applies to two-class figures; nothing was scored")
    model = build_model(spec.model, spec.in_channels, spec.num_classes, spec.image_size, spec.private, spec.spatial_dims)
    try:
        model.load_state_dict(received_model(spec, content))
    except RuntimeError as exc:  # other tensors than the card's model
        raise SiteDataError(f"the model file does not hold a {spec.model.name} of its card "
                            f"({str(exc).splitlines()[0][:200]}); nothing was scored") from None
    model.to(hospital.device)
    min_cases = max(spec.min_cases, hospital.min_cases)
    outputs = predict(model, split, 64, hospital.precision)
    if split.segmentation:
        scores = segmentation_score(outputs.argmax(1).numpy(), split.y.numpy(), spec.num_classes, min_cases, spec.seed)
    else:
        probs = torch.softmax(outputs.double(), dim=1).numpy()  # float64: a float32 softmax ties every score above 1 - 6e-8
        if hospital.noise_epsilon is not None:
            try:
                scores = noised_score(probs, split.y.numpy(), hospital.noise_epsilon,
                                      noise_seed(hospital, spec, which, min_cases), min_cases, spec.threshold, spec.seed)
            except ValueError as exc:
                raise SiteDataError(f"{exc}; nothing was scored") from None
        else:
            scores = score(probs, split.y.numpy(), min_cases, spec.threshold, spec.seed)
    scores.split = which
    return scores


def scores_record(scores: SiteScores, spec: EvaluationSpec) -> ConfigRecord:
    return ConfigRecord({"json": scores.model_dump_json(), "model-sha256": spec.model_sha256})
