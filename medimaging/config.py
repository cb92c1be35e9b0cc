"""Pydantic schemas for the imaging task: data source and model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.i18n import Reason

MODEL_MIN_SIZE = {"cnn": 16, "smallresnet": 8, "resnet18": 16, "densenet121": 32, "unet": 16, "monai": 8}
# MONAI networks a bundle's network_def may name (model.name=monai), with the task each does. Hospitals
# build them from literal arguments only: no bundle code runs anywhere (medimaging/bundles.py).
NETWORKS = {"Classifier": "classification", "DenseNet121": "classification", "DenseNet169": "classification",
            "DenseNet201": "classification", "ResNet": "classification", "SEResNet50": "classification",
            "SEResNet101": "classification", "UNet": "segmentation",
            "BasicUNet": "segmentation", "SegResNet": "segmentation", "AttentionUnet": "segmentation"}
Task = Literal["classification", "segmentation"]
Dims = Literal[2, 3]


def check_model_task(cfg: "ModelConfig", task: str, image_size: int | None = None) -> None:
    """ValueError naming the fields where the network cannot do the task."""
    model = cfg.name
    if model == "monai":
        does = NETWORKS[cfg.network.target]
        if does != task:
            raise Reason("model.network {target} is a {does} network; the data's task is {task}",
                         target=cfg.network.target, does=does, task=task)
        return
    if (model == "unet") != (task == "segmentation"):
        want = "model.name=unet" if task == "segmentation" else "model.name=cnn, smallresnet, resnet18 or densenet121"
        raise Reason("model.name={model} does not fit the {task} task of the data; use {want}", model=model, task=task,
                     want=want)
    if model == "unet" and image_size is not None and image_size % 8:
        raise Reason("image size {size}: model.name=unet halves it three times, so it must be a multiple of 8",
                     size=image_size)


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Strict):
    """The embedded default: lesion present/absent images generated per hospital; or, with
    task=segmentation, images with lesion masks; spatial_dims=3 makes volumes."""

    samples_per_site: int = Field(400, ge=20, description="mean images per hospital")
    test_per_site: int = Field(100, ge=10, description="images per hospital in the global test split")
    task: Task = Field("classification", description="classification (lesion present?) or segmentation (where?)")
    spatial_dims: Dims = Field(2, description="2 = images, 3 = volumes (CT/MRI-like)")


class DicomConfig(Strict):
    """`data.files.dicom`: how DICOM pixels become the image a model sees."""

    window: Literal["auto", "none"] | tuple[float, float] = Field(
        "auto", description="auto: the file's VOI LUT or window centre/width where it has one; none: the full "
        "range after the Modality LUT; [centre, width]: this window for every file (e.g. [40, 400] for CT soft tissue)")

    @field_validator("window")
    @classmethod
    def _width(cls, window):
        if isinstance(window, tuple) and window[1] < 1:
            raise Reason("a window's width must be at least 1 (got {width})", width=window[1])
        return window


class QidoQuery(Strict):
    """`data.files.dicomweb.query`: which of the manifest's studies' instances to use (QIDO-RS
    matching: `*` wildcards in text, `YYYYMMDD-YYYYMMDD` date ranges)."""

    modality: str | None = Field(None, description="e.g. CR, DX, CT, MR, US")
    study_date: str | None = Field(None, pattern=r"^\d{8}(-\d{8})?$|^-\d{8}$|^\d{8}-$", description="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    series_description: str | None = Field(None, description="e.g. 'CHEST PA*'")


class DicomWebConfig(Strict):
    """`data.files.dicomweb`: read the images from the hospital's PACS over DICOMweb (QIDO-RS and
    WADO-RS; GET requests only, so a read-only account is enough)."""

    url: str = Field(pattern=r"^https?://\S+$", description="the PACS's DICOMweb root, e.g. http://pacs:8042/dicom-web")
    username: str | None = Field(None, description="the account aseanfl reads with (read-only is enough)")
    password_file: Path | None = Field(None, description="a file holding the password (never the password itself here)")
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="or: the environment variable holding it")
    ca_certificate: Path | None = Field(None, description="the CA that signed the PACS's HTTPS certificate, if not a public one")
    manifest: Path = Field(description="CSV: one UID column (study, series or instance), label[, split]")
    query: QidoQuery = Field(default_factory=QidoQuery, description="narrow the manifest's rows to matching instances")
    timeout_s: float = Field(30, gt=0, le=600, description="seconds to wait for each answer of the PACS")

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, values):
        if isinstance(values, dict) and "password" in values:
            raise Reason("no password in site.yaml: put it in a file (password_file) or an environment variable "
                         "(password_env) and name that here")
        return values

    @model_validator(mode="after")
    def _one_secret(self) -> "DicomWebConfig":
        if self.password_file is not None and self.password_env is not None:
            raise Reason("password_file and password_env: give one of them")
        if (self.password_file is not None or self.password_env is not None) and not self.username:
            raise Reason("a password needs a username")
        return self


class FilesConfig(Strict):
    """`data.files`: a folder of image files (the manifest's paths are relative to `root`), or
    the hospital's PACS over DICOMweb (`dicomweb`)."""

    root: Path | None = Field(None, description="folder holding the images (or use dicomweb)")
    manifest: Path | None = Field(
        None, description="CSV with columns path,label[,split] (or path,mask[,split] for segmentation); None = folder per class")
    classes: list[str] | None = Field(None, min_length=2, description="label names in order; None = sorted names found")
    multilabel: bool = Field(False, description="the manifest's label lists findings separated by '|' ('none' = no finding)")
    spatial_dims: Dims = Field(2, description="3: each item is a volume (a NIfTI file or a folder of DICOM slices)")
    image_size: int = Field(64, ge=8, le=512, description="side the images are decoded and cached at")
    test_fraction: float = Field(0.2, ge=0, lt=0.9, description="share held out as test where no split is given")
    cache_dir: Path = Field(Path(".aseanfl-cache"), description="decoded images (stays at the hospital)")
    dicom: DicomConfig = Field(default_factory=DicomConfig, description="windowing of DICOM pixels")
    dicomweb: DicomWebConfig | None = Field(None, description="read the images from the PACS instead of a folder")

    @model_validator(mode="after")
    def _one_source(self) -> "FilesConfig":
        if (self.root is None) == (self.dicomweb is None):
            raise Reason("give either root (a folder of files) or dicomweb (the PACS), not both or neither")
        if self.dicomweb is not None and self.manifest is not None:
            raise Reason("manifest: with dicomweb, the manifest goes in dicomweb.manifest (rows keyed by UID)")
        return self


class DataConfig(Strict):
    path: Path | None = Field(None, description="MedMNIST-style .npz; None = synthetic default")
    files: FilesConfig | None = Field(None, description="DICOM/NIfTI/PNG/JPEG files; decoded to a cached .npz (wins over path)")
    image_size: int | None = Field(None, ge=8, le=512, description="side in pixels; None = native")
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9, description="share of a site's images held back for validation, "
                                "where the npz has no validation split of its own (MedMNIST's val_images are used)")
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("path")
    @classmethod
    def _check_npz(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        if not path.is_file():
            raise Reason("file not found: {file}", file=path)
        check_npz(path)
        return path.resolve()


class AugmentConfig(Strict):
    """Random per-image changes to training batches (medimaging.augment); validation and test
    images are never changed. All off by default."""

    flip: bool = Field(False, description="left-right flip, half the images")
    rotate_deg: float = Field(0.0, ge=0, le=180, description="rotation up to this many degrees, half the images")
    intensity: float = Field(0.0, ge=0, le=1, description="intensity scale and shift up to this fraction, half the images")
    noise_std: float = Field(0.0, ge=0, le=1, description="Gaussian noise of this std (images span [-1, 1]), half the images")

    @property
    def active(self) -> bool:
        return self.flip or self.rotate_deg > 0 or self.intensity > 0 or self.noise_std > 0


def check_augment(cfg: AugmentConfig, task: str, dims: int) -> None:
    """ValueError where train.augment would move pixels the labels cannot follow."""
    moves = [k for k in ("flip", "rotate_deg") if getattr(cfg, k)]
    if moves and task == "segmentation":
        raise Reason("{field}: flips and rotations are for 2D classification (masks and volumes are not moved with "
                     "them); intensity and noise_std work for every task", field=f"train.augment.{moves[0]}")
    if cfg.rotate_deg and dims == 3:  # flips take volumes (each axis drawn on its own): classes do not move
        raise Reason("{field}: rotations are for 2D images; flips, intensity and noise_std work for volumes",
                     field="train.augment.rotate_deg")


class AdapterConfig(Strict):
    """LoRA adapters (Hu et al. 2021) on the model's convolution and linear layers, through PEFT
    (medimaging/finetune.py): the layers' own weights stay as model.weights gave them."""

    kind: Literal["lora"] = "lora"
    rank: int = Field(4, ge=1, le=64, description="the adapters' rank r: each adapted layer learns a rank-r change")
    alpha: float | None = Field(None, gt=0, description="LoRA's alpha (the change is scaled by alpha/rank); default: rank")
    targets: list[str] | None = Field(
        None, min_length=1, description="the layers to adapt, by name (a name matches itself and any layer ending in "
                                        "'.name'); default: every convolution and linear layer but the classifier head")


def _literal(value, where: str, depth: int = 0) -> None:
    """A network argument is data: numbers, strings, lists and mappings of them. MONAI's config
    syntax ($ code, @ references, % macros, nested _target_) and downloads (pretrained) are not."""
    if depth > 8:
        raise ValueError(f"{where}: nested too deep")
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ValueError(f"{where}: {value[:40]!r} is MONAI config code or a reference, not a value (bundle code "
                         "is never run)")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _literal(item, f"{where}.{i}", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key.startswith("_") or (key == "pretrained" and item):
                raise ValueError(f"{where}.{key}: not allowed (a nested component, or weights downloaded at run "
                                 "time)")
            _literal(item, f"{where}.{key}", depth + 1)
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise ValueError(f"{where}: {type(value).__name__} is not a plain value")


class NetworkSpec(Strict):
    """A MONAI network by class name and literal arguments (a bundle's network_def, read by
    medimaging/bundles.py): what the task tells hospitals to build."""

    target: Literal[tuple(NETWORKS)] = Field(description="the monai.networks.nets class")
    args: dict[str, object] = Field(default_factory=dict, description="its constructor's arguments, values only")

    @field_validator("args")
    @classmethod
    def _values(cls, args: dict) -> dict:
        _literal(args, "args")
        return args


class ModelConfig(Strict):
    name: Literal["cnn", "smallresnet", "resnet18", "densenet121", "unet", "monai"] = Field(
        "cnn", description="classifiers: cnn, smallresnet (0.9 M parameters in 3D: volumes at 28-64 voxels), "
                           "resnet18, densenet121; segmentation: unet (MONAI UNet); monai: model.network (a "
                           "bundle's network, set by --bundle / task.bundle)")
    network: NetworkSpec | None = Field(None, description="model.name=monai: the MONAI network and its arguments")
    norm: Literal["group", "instance", "batch"] = Field(
        "group", description="normalisation layers of smallresnet/resnet18/densenet121 (unet: instance unless batch)"
    )
    weights: Path | None = Field(
        None, description="start the global model from this local file: safetensors, a PyTorch state dict, a "
                          "torchvision-layout ResNet/DenseNet checkpoint, or a MONAI bundle folder (medimaging/weights.py)")
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                       description="the weights file's sha256: written by the run; checked when given")
    new_head: bool = Field(False, description="with weights for another class count: start the classifier head afresh")
    freeze: list[str] = Field(
        [], description="layers that keep model.weights' values and never travel, by state-dict name prefix (layer1, "
                        "features.denseblock1); 'body' is every layer but the classifier head")
    adapters: AdapterConfig | None = Field(None, description="train LoRA adapters (and the classifier head) instead of "
                                                             "the layers' weights; only they travel")

    @model_validator(mode="after")
    def _network(self) -> "ModelConfig":
        if (self.name == "monai") != (self.network is not None):
            raise ValueError("model.network is given with model.name=monai, and only then (a bundle sets both)")
        return self

    @property
    def fine_tunes_part(self) -> bool:
        """Part of the model is frozen: only the trainable tensors travel."""
        return bool(self.freeze or self.adapters)


NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def check_npz(path: Path) -> None:
    """Raise ValueError naming the problem if `path` is not a usable MedMNIST-layout file:
    images (N,H,W), (N,H,W,C) or volumes (N,D,H,W), uint8 or float in [0, 1] without NaN;
    labels (N,), (N,1), 0/1 findings (N,K), or integer masks shaped like the images
    (segmentation); as many labels as images in each split; at least two classes."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # np.load would try it as a pickle or a .npy
        raise ValueError(f"{path.name} is not an .npz file (a MedMNIST-layout zip of numpy arrays with the keys "
                         f"{', '.join(NPZ_KEYS)}); for a folder of DICOM/PNG/NIfTI files use data.files.root")
    try:
        with np.load(path) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise ValueError(f"{path.name} lacks arrays {missing}; expected MedMNIST keys {list(NPZ_KEYS)}")
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except ValueError:
        raise
    except Exception as exc:  # zip errors: a damaged file
        raise ValueError(f"{path.name} is not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    for split in ("train", "test"):
        _check_split(path.name, split, arrays[f"{split}_images"], arrays[f"{split}_labels"])
    labels = arrays["train_labels"]
    if labels.ndim < 2 or labels.shape[1] == 1:
        classes = np.unique(np.concatenate([arrays["train_labels"].reshape(-1), arrays["test_labels"].reshape(-1)]))
        if len(classes) < 2:
            raise ValueError(f"{path.name}: every label is {classes[0] if len(classes) else 'missing'}; "
                             "a classifier needs at least two classes")


def _check_split(name: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    where = f"{name}: {split}_images"
    if images.ndim not in (3, 4):
        raise ValueError(f"{where} shape {images.shape} is not (N,H,W), (N,H,W,C) or (N,D,H,W)")
    if len(labels) != len(images):
        raise ValueError(f"{name}: {split}_labels holds {len(labels)} labels for {len(images)} {split}_images; "
                         "each image needs one label")
    if np.issubdtype(images.dtype, np.floating):
        if not np.all(np.isfinite(images)):
            bad = int(np.count_nonzero(~np.isfinite(images).reshape(len(images), -1).all(1)))
            raise ValueError(f"{where}: {bad} images hold NaN or infinite values")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"{where}: float images must lie in [0, 1] (found {images.min():.4g} to "
                             f"{images.max():.4g}); store uint8 (0-255) or scale them")
    elif images.dtype != np.uint8:
        raise ValueError(f"{where}: dtype {images.dtype}; store uint8 (0-255) or float images in [0, 1]")
    if labels.ndim >= 3:
        if labels.shape[1:] != images.shape[1:labels.ndim]:
            raise ValueError(f"{name}: {split}_labels shape {labels.shape} is neither per-image labels nor "
                             f"masks shaped like {split}_images {images.shape}")
        if np.issubdtype(labels.dtype, np.floating) or labels.min() < 0:
            raise ValueError(f"{name}: segmentation masks must hold integer labels >= 0 (got {labels.dtype})")
        return
    if np.issubdtype(labels.dtype, np.floating) and not np.all(np.isfinite(labels)):
        raise ValueError(f"{name}: {split}_labels holds NaN or infinite values")
    if labels.ndim == 2 and labels.shape[1] > 1 and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} has {labels.shape[1]} label columns with values other than 0/1; "
                         "multi-label targets must be 0/1 per finding")
    if labels.ndim < 2 or labels.shape[1] == 1:
        if not np.array_equal(labels, np.round(labels)) or labels.min(initial=0) < 0:
            raise ValueError(f"{name}: {split}_labels must be class numbers (integers >= 0)")
