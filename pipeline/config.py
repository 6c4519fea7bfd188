"""`params.yaml` parsed into typed, validated config objects.

Every stage calls :func:`load_params` before it does any work, so a typo or an
out-of-range value costs one clear line (key path, value, what is allowed) and
exit code 2, never a half-run pipeline.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from pipeline.errors import UsageError
from pipeline.io import confine

BUILTIN_MODELS = ("mlp", "cnn_small", "cnn_medium")
_FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CsvSettings(_Section):
    """How a CSV table is read: the label column; every other column is a feature."""

    label_column: str = Field(min_length=1)
    feature_types: dict[str, Literal["continuous", "integer", "categorical"]] = Field(
        default_factory=dict, description="by column name; default continuous. Categorical features are immutable "
        "under the threat, integer ones are certified over the continuous box")


class DataConfig(_Section):
    dataset: Literal["digits", "breast_cancer", "idx", "npz", "csv", "image_folder"] = "digits"
    path: Optional[str] = Field(None, description="IDX directory, NPZ or CSV file, or image folder, inside the workspace")
    csv: Optional[CsvSettings] = Field(None, description="dataset 'csv': the label column and feature types")
    image_size: Optional[list[int]] = Field(None, description="image_folder: [height, width] every image is resized "
                                            "to; default their own size, which must then be common")
    image_channels: Optional[Literal[1, 3]] = Field(None, description="image_folder: 1 grayscale, 3 RGB; default "
                                                    "1 when every image is grayscale, else 3")
    name: Optional[str] = Field(None, min_length=1, description="what the report and registry call the data; "
                                "default: the built-in dataset's name, else the file or folder name of data.path")
    class_names: Optional[list[str]] = Field(None, description="one name per class label 0..K-1; default: "
                                             "the built-in dataset's names, else the label indices")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.25, gt=0.0, lt=0.5)
    max_samples: Optional[int] = Field(None, ge=20, description="stratified subsample before splitting")

    @model_validator(mode="after")
    def _path_matches_dataset(self) -> "DataConfig":
        if self.dataset in ("idx", "npz", "csv", "image_folder") and not self.path:
            raise ValueError(f"dataset {self.dataset!r} needs data.path")
        if (self.dataset == "csv") != (self.csv is not None):
            raise ValueError("dataset 'csv' needs data.csv (label_column), and data.csv is for dataset 'csv' only")
        if self.dataset != "image_folder" and (self.image_size is not None or self.image_channels is not None):
            raise ValueError("image_size and image_channels are settings of dataset 'image_folder' only")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError("image_size must be [height, width], each >= 1")
        if self.class_names is not None and (len(set(self.class_names)) != len(self.class_names)
                                             or not all(self.class_names)):
            raise ValueError("class_names must be distinct, non-empty names")
        return self

    def loader_options(self) -> dict:
        """Keyword arguments of the dataset's loader beyond (path, root)."""
        if self.dataset == "image_folder":
            return {"image_size": self.image_size, "channels": self.image_channels}
        return {}

    def display_name(self) -> str:
        """`name`, else the built-in dataset, else the stem of data.path (`data/raw/mnist` -> `mnist`)."""
        if self.name:
            return self.name
        if self.path:
            return Path(self.path.rstrip("/")).stem or self.dataset
        return self.dataset


def model_options(name: str) -> tuple[str, ...]:
    """The keys of the `model` section (besides `name`) that the named model is built with."""
    if name == "mlp":
        return ("hidden",)
    if name in ("cnn_small", "cnn_medium"):
        return ("channels", "dense")
    return ("options",)


def _not_a_setting(key: str, message: str) -> PydanticCustomError:
    """The error a key with no effect raises; :func:`format_validation_error` prints it as one line."""
    return PydanticCustomError("not_a_setting", "{key}: " + message, {"key": key})


_SUPPLIED_KEYS = ("source", "path", "layout", "supplier")
# model.source is the discriminator: a file source takes only these keys (state_dict also a factory)
_SOURCE_KEYS = {"onnx": _SUPPLIED_KEYS, "torchscript": _SUPPLIED_KEYS,
                "state_dict": _SUPPLIED_KEYS + ("name", "hidden", "channels", "dense", "options")}


class ModelConfig(_Section):
    name: str = "cnn_small"
    hidden: list[int] = Field(default_factory=lambda: [128, 64], description="mlp layer widths")
    channels: list[int] = Field(default_factory=lambda: [16, 32], description="cnn_small / cnn_medium conv widths")
    dense: int = Field(100, ge=1, description="cnn_small / cnn_medium dense width")
    options: dict[str, Union[int, float, str, bool, list[int]]] = Field(
        default_factory=dict, description="keyword arguments for a 'module:callable' factory"
    )
    source: Literal["train", "onnx", "torchscript", "state_dict"] = Field(
        "train", description="train: the train stage trains `name`; onnx | torchscript: evaluate the supplied file at "
        "`path` instead (train imports it); state_dict: the weights file at `path` loaded into factory `name`")
    path: Optional[str] = Field(None, min_length=1, description="the supplied model file, inside the workspace")
    layout: Literal["nchw", "nhwc", "flat"] = Field("nchw", description="the supplied model's input layout; the "
                                                    "data is (C, H, W) per sample, permuted or flattened to fit")
    supplier: Optional[str] = Field(None, min_length=1, description="who supplied the file (recorded with its SHA-256)")

    @model_validator(mode="before")
    @classmethod
    def _only_options_of_the_model(cls, data):
        """mlp takes `hidden`, the CNNs `channels` and `dense`, a factory `options`: any other is an error."""
        name = data.get("name", "cnn_small") if isinstance(data, dict) else None
        source = data.get("source", "train") if isinstance(data, dict) else None
        if isinstance(source, str) and source in _SOURCE_KEYS:
            own_keys = _SOURCE_KEYS[source]
            for key in data:
                if key not in own_keys and key in cls.model_fields:
                    raise _not_a_setting(key, f"not a setting of model.source {source!r} (its settings: "
                                              f"{', '.join(k for k in own_keys if k != 'source')})")
        if isinstance(name, str) and (name in BUILTIN_MODELS or _FACTORY_PATTERN.match(name)):  # else: name's error
            own = model_options(name)
            for key in data:
                if key not in _SUPPLIED_KEYS and key != "name" and key in cls.model_fields and key not in own:
                    kind = "a 'module:callable' factory" if name not in BUILTIN_MODELS else f"model {name!r}"
                    raise _not_a_setting(key, f"not an option of {kind} (its options: {', '.join(own)})")
        return data

    @model_validator(mode="after")
    def _supplied_file(self) -> "ModelConfig":
        if self.source != "train" and not self.path:
            raise ValueError(f"source {self.source!r} needs model.path (the supplied file)")
        if self.source == "train" and (self.path or self.supplier or self.layout != "nchw"):
            raise ValueError("path, layout and supplier describe a supplied model: set model.source too")
        if self.source in ("torchscript", "state_dict") and self.layout == "nhwc":
            raise ValueError(f"layout 'nhwc' is for onnx files; a {self.source} model reads the data as (C, H, W) "
                             "('nchw') or flattened ('flat')")
        if self.source == "state_dict" and "name" not in self.model_fields_set:
            raise ValueError("source 'state_dict' needs model.name, the 'module:callable' factory the weights fit")
        return self

    @property
    def supplied(self) -> bool:
        return self.source != "train"

    def factory_options(self) -> dict:
        """Keyword arguments the named model factory is called with."""
        if self.name == "mlp":
            return {"hidden": list(self.hidden)}
        if self.name in ("cnn_small", "cnn_medium"):
            return {"channels": list(self.channels), "dense": self.dense}
        return dict(self.options)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in BUILTIN_MODELS and not _FACTORY_PATTERN.match(name):
            raise ValueError(f"unknown model; allowed: {', '.join(BUILTIN_MODELS)} or 'module:callable'")
        return name

    @field_validator("hidden", "channels")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if not widths or any(w < 1 for w in widths):
            raise ValueError("must be a non-empty list of integers >= 1")
        return widths


class FeatureBudget(_Section):
    """One tabular feature's L∞ budget in its own units: exactly one of `absolute` (in the
    feature's unit), `relative` (a share of the value; taken at the largest |value| of the
    training split, so the ball contains every relative one), `std` (training standard
    deviations) or `uncertainty` (a stated measurement uncertainty u, times `k`, default 2)."""

    immutable: bool = Field(False, description="written as the string 'immutable': radius 0")
    absolute: Optional[float] = Field(None, ge=0.0)
    relative: Optional[float] = Field(None, ge=0.0)
    std: Optional[float] = Field(None, ge=0.0)
    uncertainty: Optional[float] = Field(None, ge=0.0)
    k: Optional[float] = Field(None, ge=0.0, description="coverage factor for `uncertainty`")

    @model_validator(mode="before")
    @classmethod
    def _immutable_or_unit(cls, value: object) -> object:
        """'immutable' is a budget of zero; a bare number has no unit and is refused."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise PydanticCustomError("unitless_budget", "unit-less budget: give its unit (absolute: x, relative: x, "
                                      "std: x, or uncertainty: u with k) or 'immutable'")
        if value == "immutable":
            return {"immutable": True}
        if isinstance(value, str):
            raise PydanticCustomError("budget", "a budget is a mapping with its unit, or 'immutable'")
        return value

    @model_validator(mode="after")
    def _one_unit(self) -> "FeatureBudget":
        given = [name for name in ("absolute", "relative", "std", "uncertainty") if getattr(self, name) is not None]
        if self.immutable:
            if given or self.k is not None:
                raise ValueError("an immutable feature has no budget")
            return self
        if len(given) != 1:
            raise ValueError("give exactly one of absolute, relative, std, uncertainty (the budget's unit)")
        if self.k is not None and given != ["uncertainty"]:
            raise ValueError("k multiplies a stated `uncertainty` only")
        return self

    def describe(self) -> str:
        if self.immutable:
            return "immutable (radius 0)"
        if self.absolute is not None:
            return f"±{self.absolute:g} (absolute)"
        if self.relative is not None:
            return f"±{self.relative:g} × |value| (relative)"
        if self.std is not None:
            return f"±{self.std:g} training standard deviations"
        return f"±{self.k if self.k is not None else 2.0:g} × u, u = {self.uncertainty:g} (measurement uncertainty)"


Budget = FeatureBudget


class ThreatConfig(_Section):
    norm: Literal["linf", "l2"] = "linf"
    epsilon: float = Field(0.1, ge=0.0, description="with `features`: the multiplier of the declared budgets (1.0 = "
                           "as declared); tabular data without them: in training standard deviations per feature")
    rationale: Optional[str] = None
    features: Optional[dict[str, Budget]] = Field(
        None, description="tabular data: per-feature L∞ budgets in the feature's units, by column name")
    unlisted: Optional[Budget] = Field(None, description="the budget of every feature `features` does not name")

    @model_validator(mode="after")
    def _budgets_need_linf(self) -> "ThreatConfig":
        if (self.features is not None or self.unlisted is not None) and self.norm != "linf":
            raise ValueError("per-feature budgets are L∞ boxes: they need threat.norm 'linf'")
        if self.unlisted is not None and self.features is None:
            raise ValueError("threat.unlisted needs threat.features")
        return self


class PGDConfig(_Section):
    steps: int = Field(10, ge=1)
    step_size: float = Field(0.025, gt=0.0)
    restarts: int = Field(1, ge=1)
    schedule: Literal["constant", "cosine"] = "constant"


class APGDConfig(_Section):
    steps: int = Field(100, ge=1)
    restarts: int = Field(1, ge=1)
    targets: int = Field(3, ge=1, description="APGD-T: most likely wrong classes to target")


class SquareConfig(_Section):
    queries: int = Field(1000, ge=1)
    p_init: float = Field(0.8, gt=0.0, le=1.0)
    restarts: int = Field(1, ge=1)


class SweepConfig(_Section):
    points: int = Field(9, ge=2, description="ε values from 0 to max_factor·ε")
    max_factor: float = Field(2.0, gt=0.0)
    max_samples: Optional[int] = Field(None, ge=1)


class MaskingConfig(_Section):
    enabled: bool = True
    tolerance: float = Field(0.02, ge=0.0, le=1.0, description="accuracy slack before a check fails")
    large_epsilon_max_accuracy: float = Field(0.1, ge=0.0, le=1.0)


class TrainPGDConfig(PGDConfig):
    """The inner maximisation of adversarial training: one PGD run per batch."""

    steps: int = Field(7, ge=1)
    step_size: float = Field(0.025, gt=0.0)

    @field_validator("restarts")
    @classmethod
    def _one_restart(cls, restarts: int) -> int:
        # Restarts would multiply the cost of every training step; Madry et al. train with one
        # random start, and a fresh start each batch already varies the point. Restarts are an
        # evaluation setting (attack.pgd.restarts, train.val_pgd.restarts).
        if restarts != 1:
            raise ValueError("training runs one PGD restart per batch (restarts multiply the cost of every "
                             "step); set restarts for evaluation in attack.pgd or train.val_pgd")
        return restarts


class _TrainBase(_Section):
    """Settings every training method has; each method's own settings live in its subclass."""

    method: str
    lr_schedule: Literal["constant", "cosine", "piecewise"] = "constant"
    early_stopping_patience: Optional[int] = Field(None, ge=1)
    init_checkpoint: Optional[str] = Field(None, description="fine-tune: directory with model.pt and model.json")
    finetune: Literal["all", "head"] = "all"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    weight_decay: float = Field(0.0, ge=0.0)
    val_pgd: PGDConfig = PGDConfig(steps=10, step_size=0.02)

    @model_validator(mode="before")
    @classmethod
    def _only_settings_in_effect(cls, data):
        if isinstance(data, dict):
            for key in data:
                if key in cls.model_fields and key not in cls.keys_in_effect(data):
                    raise _not_a_setting(key, cls.why_not_in_effect(key, data))
        return data

    @classmethod
    def own_settings(cls) -> tuple[str, ...]:
        """The settings of this method beyond the ones every method has."""
        return tuple(name for name in cls.model_fields if name not in _TrainBase.model_fields)

    @classmethod
    def keys_in_effect(cls, data: dict) -> set[str]:
        """The keys that change what training does, given the other keys in `data`."""
        keys = set(cls.model_fields)
        if data.get("optimizer", "adam") != "sgd":
            keys.discard("momentum")
        if data.get("init_checkpoint") is None:
            keys.discard("finetune")
        return keys

    @classmethod
    def why_not_in_effect(cls, key: str, data: dict) -> str:
        if key == "momentum":
            return f"only used by train.optimizer 'sgd', not {data.get('optimizer', 'adam')!r}"
        return "only used with train.init_checkpoint (fine-tuning)"


class _NoRadius:
    """Methods that train on clean (or noisy) inputs have no training radius and no ε warm-up."""

    @property
    def epsilon(self) -> None:
        return None

    @property
    def epsilon_warmup_epochs(self) -> int:
        return 0


class _Radius(_TrainBase):
    epsilon_warmup_epochs: int = Field(0, ge=0)
    epsilon: Optional[float] = Field(
        None, gt=0.0, description="training radius; default threat.epsilon (certified training often trains above it)")


class _PGDTrained(_Radius):
    pgd: TrainPGDConfig = TrainPGDConfig()


LP_THREAT = "lp"  # train.threat: the `threat` section's Lp ball (the default)


class _ThreatChoice(_PGDTrained):
    """PGD-AT, TRADES and consistency train against the Lp ball (`threat`) or, with `train.threat` naming
    one of `conditions.threats`, against that condition: worst of `worst_of_k` random parameters, then
    `pgd.steps` signed-gradient steps of `pgd.step_size` × each parameter's range."""

    threat: str = Field(LP_THREAT, min_length=1, description="'lp' or the name of a condition in conditions.threats")
    worst_of_k: Optional[int] = Field(None, ge=1, description="condition training: random parameter draws per "
                                                              "sample (default 8)")

    @classmethod
    def keys_in_effect(cls, data: dict) -> set[str]:
        keys = super().keys_in_effect(data)
        if data.get("threat", LP_THREAT) == LP_THREAT:
            keys.discard("worst_of_k")
        else:
            keys -= {"epsilon", "val_pgd"}
        return keys

    @classmethod
    def why_not_in_effect(cls, key: str, data: dict) -> str:
        if key == "worst_of_k":
            return "only used when train.threat names a condition, not the Lp ball"
        if key in ("epsilon", "val_pgd"):
            return (f"an Lp-ball setting; train.threat = {data.get('threat')!r} is a condition (its range is the "
                    "condition's, validation uses conditions.search)")
        return super().why_not_in_effect(key, data)


class _ConditionTrained(_TrainBase):
    """Methods that train for a condition only: `threat` must name one of `conditions.threats`."""

    threat: str = Field(min_length=1, description="the name of a condition in conditions.threats")
    epsilon_warmup_epochs: int = Field(0, ge=0, description="epochs over which the condition's range grows to full")

    @property
    def epsilon(self) -> None:
        return None

    @classmethod
    def keys_in_effect(cls, data: dict) -> set[str]:
        return super().keys_in_effect(data) - {"val_pgd"}

    @classmethod
    def why_not_in_effect(cls, key: str, data: dict) -> str:
        if key == "val_pgd":
            return "validation under a condition uses conditions.search, not PGD"
        return super().why_not_in_effect(key, data)


class StandardTrain(_NoRadius, _TrainBase):
    method: Literal["standard"] = "standard"


class PgdAtTrain(_ThreatChoice):
    method: Literal["pgd_at"] = "pgd_at"


class TradesTrain(_ThreatChoice):
    method: Literal["trades"] = "trades"
    beta: float = Field(6.0, ge=0.0, description="weight of the KL term")


class MartTrain(_PGDTrained):
    method: Literal["mart"] = "mart"
    beta: float = Field(6.0, ge=0.0, description="weight of the KL term")


class FastAtTrain(_Radius):
    method: Literal["fast_at"] = "fast_at"
    fast_at_step_factor: float = Field(1.25, gt=0.0, description="FGSM step as a multiple of ε")
    catastrophic_drop: float = Field(0.2, gt=0.0, le=1.0, description="robust-accuracy fall that stops training")


class AwpTrain(_PGDTrained):
    method: Literal["awp"] = "awp"
    awp_gamma: float = Field(0.005, ge=0.0, description="weight perturbation, relative to each layer's norm")
    awp_base: Literal["pgd_at", "trades"] = "pgd_at"
    beta: float = Field(6.0, ge=0.0, description="awp over trades: weight of the KL term")

    @classmethod
    def keys_in_effect(cls, data: dict) -> set[str]:
        keys = super().keys_in_effect(data)
        if data.get("awp_base", "pgd_at") != "trades":
            keys.discard("beta")
        return keys

    @classmethod
    def why_not_in_effect(cls, key: str, data: dict) -> str:
        if key == "beta":
            return f"only used by train.awp_base 'trades', not {data.get('awp_base', 'pgd_at')!r}"
        return super().why_not_in_effect(key, data)


class ConsistencyTrain(_ThreatChoice):
    method: Literal["consistency"] = "consistency"
    consistency_weight: float = Field(1.0, ge=0.0)
    consistency_temperature: float = Field(0.5, gt=0.0)


class IbpTrain(_Radius):
    method: Literal["ibp"] = "ibp"
    kappa_end: float = Field(0.5, ge=0.0, le=1.0, description="final weight of the clean loss")


class CrownIbpTrain(_Radius):
    method: Literal["crown_ibp"] = "crown_ibp"
    kappa_end: float = Field(0.5, ge=0.0, le=1.0, description="final weight of the clean loss")
    beta_end: float = Field(0.0, ge=0.0, le=1.0,
                            description="final weight of the CROWN-IBP bound against IBP (1: CROWN-IBP throughout)")


class GaussianTrain(_NoRadius, _TrainBase):
    method: Literal["gaussian"] = "gaussian"
    noise_sigma: float = Field(0.25, gt=0.0, description="σ of the training noise")


class WorstOfKTrain(_ConditionTrained):
    """Engstrom et al. 2019: cross-entropy on the worst of k random parameters of the condition."""

    method: Literal["worst_of_k"] = "worst_of_k"
    worst_of_k: int = Field(8, ge=1, description="random parameter draws per sample")


class AugmentationTrain(_ConditionTrained):
    """Plain augmentation with the condition: the baseline condition training must beat."""

    method: Literal["augmentation"] = "augmentation"


TRAIN_SETTINGS: dict[str, type[_TrainBase]] = {
    cls.model_fields["method"].default: cls
    for cls in (StandardTrain, PgdAtTrain, TradesTrain, MartTrain, FastAtTrain, AwpTrain, ConsistencyTrain,
                IbpTrain, CrownIbpTrain, GaussianTrain, WorstOfKTrain, AugmentationTrain)
}
DEFAULT_TRAIN_METHOD = "pgd_at"


def _train_method(value) -> object:
    """The tag of the `train` union: the method named, `pgd_at` when none is."""
    if isinstance(value, dict):
        return value.get("method", DEFAULT_TRAIN_METHOD)
    return getattr(value, "method", None)


# One settings class per training method, chosen by `train.method`: a key of another method is an error.
TrainConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in TRAIN_SETTINGS.items())],
    Discriminator(_train_method),
]


def train_section_for(train: dict, method: str) -> dict:
    """`train` (as written in params.yaml) switched to `method`: the shared settings and those the
    two methods share are kept, the others dropped (they would have no effect) and the new
    method's own settings not given take their defaults."""
    switched = {**train, "method": method}
    in_effect = TRAIN_SETTINGS[method].keys_in_effect(switched)
    return {key: value for key, value in switched.items() if key in in_effect}


class AttackConfig(_Section):
    attacks: list[Literal["fgsm", "pgd", "pgd_cw", "apgd_ce", "apgd_dlr", "apgd_t", "square"]] = Field(
        default_factory=lambda: ["fgsm", "pgd", "apgd_ce", "apgd_t", "square"]
    )
    pgd: PGDConfig = PGDConfig(steps=50, step_size=0.01, restarts=2)
    apgd: APGDConfig = APGDConfig()
    square: SquareConfig = SquareConfig()
    mode: Literal["independent", "sequential"] = Field(
        "independent", description="sequential attacks only the samples still robust (same verdict, faster)"
    )
    sweep: SweepConfig = SweepConfig()
    masking: MaskingConfig = MaskingConfig()
    batch_size: int = Field(256, ge=1)
    max_samples: Optional[int] = Field(None, ge=1)

    @field_validator("attacks")
    @classmethod
    def _non_empty(cls, attacks: list[str]) -> list[str]:
        if not attacks or len(set(attacks)) != len(attacks):
            raise ValueError("must list each attack once and at least one")
        return attacks


class CertifyConfig(_Section):
    methods: list[Literal["ibp", "crown_ibp", "crown", "alpha_crown"]] = Field(
        default_factory=lambda: ["ibp", "crown"]
    )
    batch_size: int = Field(128, ge=1)
    max_samples: Optional[int] = Field(None, ge=1)
    time_budget_s: Optional[float] = Field(None, gt=0.0, description="per method; certifies a prefix when exceeded")
    sweep: bool = Field(True, description="verified accuracy at the attack stage's ε grid")
    random_points: int = Field(32, ge=0, description="random points per sample for the containment check")
    tolerance: float = Field(1e-4, gt=0.0, description="float slack allowed in the containment check")


class SmoothingConfig(_Section):
    enabled: bool = True
    sigma: float = Field(0.25, gt=0.0)
    n0: int = Field(100, ge=1, description="noise samples to select the class")
    n: int = Field(1000, ge=1, description="noise samples to estimate its probability")
    alpha: float = Field(0.001, gt=0.0, lt=1.0, description="failure probability of each certificate")
    batch_size: int = Field(1000, ge=1)
    max_samples: Optional[int] = Field(100, ge=1)
    radii: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])

    @model_validator(mode="after")
    def _n0_within_n(self) -> "SmoothingConfig":
        if self.n0 > self.n:
            raise ValueError(f"n0 = {self.n0} must not exceed n = {self.n}")
        if any(r < 0 for r in self.radii):
            raise ValueError("radii must be >= 0")
        return self


class ExportConfig(_Section):
    opset: int = Field(17, ge=9, le=20)
    atol: float = Field(1e-4, gt=0.0, description="max |onnx - torch| logit difference")
    min_label_agreement: float = Field(1.0, gt=0.0, le=1.0)


class ClinicalConfig(_Section):
    """The diagnostic reading of the evidence (stage `clinical`): which class is the finding whose
    miss is the hazard, and which columns define the subgroups every figure is repeated for."""

    positive_class: str = Field(min_length=1, description="a class name (data.class_names or the loader's)")
    hazard: str = Field("a false negative: a positive case the model does not detect",
                        min_length=1, description="the harm a wrong output causes, as the risk file names it")
    subgroups: list[str] = Field(default_factory=list, description="tabular feature columns; one group per value")
    calibration_bins: int = Field(10, ge=2, le=100)
    bootstrap: int = Field(1000, ge=100, description="resamples for the ECE interval")
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
                                    description="confidence thresholds for selective prediction")
    exact_time_budget_s: Optional[float] = Field(
        None, gt=0.0, description="complete MILP verification of every test case within this budget (ReLU MLPs, "
        "L∞ boxes); cases left when it runs out are 'unknown'. Off when null")
    exact_case_limit_s: float = Field(10.0, gt=0.0, description="solver time limit per case and class")

    @field_validator("thresholds")
    @classmethod
    def _in_unit_interval(cls, values: list[float]) -> list[float]:
        if not values or any(not 0.0 <= v < 1.0 for v in values):
            raise ValueError("thresholds must be in [0, 1) and at least one")
        return sorted(set(values))


class ReportConfig(_Section):
    title: str = "Robustness evidence report"
    profile: Literal["default", "sotif", "medical"] = "default"
    signing_key: Optional[str] = Field(
        None, description="Ed25519 private key (PEM) inside the workspace; env ROBUSTGATE_SIGNING_KEY overrides"
    )
    intended_purpose: Optional[str] = None
    input_domain: Optional[str] = None
    out_of_scope_use: Optional[str] = None


class InputsConfig(_Section):
    data: str = Field(description="data.path, or pipeline/data/datasets.py for a built-in dataset")
    model: str = Field(description="the module file of a module:callable model, or pipeline/models.py")
    properties: str = Field("pipeline/stages/properties.py",
                            description="the folder holding properties.instances and every file it lists "
                                        "(or the built-in pipeline/stages/properties.py when none is listed)")


class GateConfig(_Section):
    policy: str = "policies/default.yaml"


class RegisterConfig(_Section):
    model_name: str = Field("robustgate-model", min_length=1, pattern=r"^[\w.\-]+$",
                            description="default: robustgate-<data name> (see Params._default_model_name)")
    experiment: str = Field("robustgate", min_length=1)


class RuntimeConfig(_Section):
    """Where and how the work runs. Metrics are identical across processes; the thread count and the processor
    order floating-point reductions, so they shape the low-order bits and may change a trained model (each
    stage records them: pipeline/runtime.py)."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$",
                        description="auto: cuda, else mps, else cpu; a device not on this machine is refused")
    precision: Literal["float32", "bf16", "fp16"] = Field(
        "float32", description="training autocast; certification and attacks always run in float32")
    threads: Optional[int] = Field(None, ge=1, description="torch threads per process; default cores / processes")
    processes: int = Field(1, ge=1, description="attack, certify and smooth shards; data-parallel training under torchrun")
    workers: int = Field(0, ge=0, description="training data-loader worker processes per training process (0: read "
                         "batches in the training process)")


class PropertiesConfig(_Section):
    instances: Optional[str] = Field(None, min_length=1, description="a VNN-COMP instances.csv (onnx, vnnlib, "
                                     "timeout per row, paths relative to the CSV) to decide with `robustgate prove`")
    claims: bool = Field(True, description="write one VNNLIB robustness property per certified test sample")
    max_claims: int = Field(200, ge=1)
    timeout_s: float = Field(60.0, gt=0.0, description="the timeout written into the claims' instances.csv")



# --- conditions (ISO 21448 triggering conditions; pipeline/conditions) -------------------------

CONDITION_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# metrics/conditions.json holds one record per condition next to these keys
RESERVED_CONDITION_NAMES = ("schema_version", "seed", "dataset_fingerprint", "model_sha256", "n", "split",
                            "seconds", "reused", "conditions", "runtime")


def _interval(values: list[float], name: str, positive: bool = False) -> list[float]:
    if len(values) != 2 or not values[0] < values[1]:
        raise ValueError(f"{name} must be [low, high] with low < high")
    if positive and values[0] <= 0:
        raise ValueError(f"{name} must be positive")
    return values


class _ConditionBase(_Section):
    rationale: str = Field(min_length=1, description="the ODD condition this range stands for, and why this range")


class _RangeCondition(_ConditionBase):
    range: list[float]

    @field_validator("range")
    @classmethod
    def _ordered(cls, values: list[float]) -> list[float]:
        return _interval(values, "range", positive=cls.model_fields["kind"].default in ("contrast", "gamma", "scaling"))


class BrightnessCondition(_RangeCondition):
    kind: Literal["brightness"] = "brightness"


class ContrastCondition(_RangeCondition):
    kind: Literal["contrast"] = "contrast"


class GammaCondition(_RangeCondition):
    kind: Literal["gamma"] = "gamma"


class ScalingCondition(_RangeCondition):
    kind: Literal["scaling"] = "scaling"


class ParameterSmoothingConfig(_Section):
    """Randomized smoothing over the angle (pipeline/conditions/smoothing.py): θ ~ N(0, σ²) degrees."""

    sigma: float = Field(gt=0.0, description="standard deviation of the smoothing angle, degrees")
    n0: int = Field(32, ge=1, description="draws that select the class")
    n: int = Field(512, ge=1, description="draws that bound its probability")
    alpha: float = Field(0.001, gt=0.0, lt=0.5, description="failure probability of each certificate")


class RotationCondition(_RangeCondition):
    kind: Literal["rotation"] = "rotation"
    smoothing: Optional[ParameterSmoothingConfig] = Field(
        None, description="also certify the angle-smoothed classifier (bounds do not reach bilinear rotation)")


class BlurCondition(_RangeCondition):
    kind: Literal["blur"] = "blur"

    @field_validator("range")
    @classmethod
    def _non_negative(cls, values: list[float]) -> list[float]:
        if values[0] < 0:
            raise ValueError("a blur sigma must be >= 0")
        return values


class FogCondition(_RangeCondition):
    kind: Literal["fog"] = "fog"
    level: Optional[float] = Field(None, description="the haze intensity blended towards; default the domain's upper bound")

    @field_validator("range")
    @classmethod
    def _coefficient(cls, values: list[float]) -> list[float]:
        if values[0] < 0 or values[1] > 1:
            raise ValueError("the fog blend coefficient lies in [0, 1]")
        return values


class BrightnessContrastCondition(_ConditionBase):
    kind: Literal["brightness_contrast"] = "brightness_contrast"
    brightness: list[float]
    contrast: list[float]

    @field_validator("brightness", "contrast")
    @classmethod
    def _ordered(cls, values: list[float], info) -> list[float]:
        return _interval(values, info.field_name, positive=info.field_name == "contrast")


class NoiseCondition(_ConditionBase):
    kind: Literal["noise"] = "noise"
    sigma: float = Field(gt=0.0, description="largest noise standard deviation, input units")


class TranslationCondition(_ConditionBase):
    kind: Literal["translation"] = "translation"
    pixels: int = Field(ge=1, description="integer shifts of up to this many pixels in each direction")


class OcclusionCondition(_ConditionBase):
    kind: Literal["occlusion"] = "occlusion"
    size: int = Field(ge=1, description="side of the square patch, pixels")
    stride: int = Field(1, ge=1, description="distance between enumerated patch positions, pixels")
    fill: Optional[float] = Field(None, description="patch value; default the domain's lower bound")


CONDITION_SETTINGS = (BrightnessCondition, ContrastCondition, BrightnessContrastCondition, GammaCondition,
                      FogCondition, NoiseCondition, BlurCondition, RotationCondition, ScalingCondition,
                      TranslationCondition, OcclusionCondition)
CONDITION_KINDS = tuple(cls.model_fields["kind"].default for cls in CONDITION_SETTINGS)
ConditionConfig = Annotated[Union[CONDITION_SETTINGS], Field(discriminator="kind")]


class ConditionSearchConfig(_Section):
    grid: int = Field(9, ge=2, description="grid points per parameter axis (and the heat map's resolution)")
    random: int = Field(16, ge=0, description="random parameter draws per sample")
    steps: int = Field(10, ge=0, description="gradient-ascent steps on the parameters (differentiable kinds)")
    step_fraction: float = Field(0.1, gt=0.0, le=1.0, description="ascent step as a share of each axis' range")
    restarts: int = Field(1, ge=1, description="gradient ascents per sample (from the worst point found, then random)")
    gradient: Literal["differences", "autograd"] = Field(
        "differences", description="how the descent takes the sign of d margin/dθ. differences: a forward difference "
                                   "per parameter axis (one more forward each; cheaper wherever a backward through "
                                   "the model costs more forwards than the condition has axes); autograd: a "
                                   "backward pass")


class ConditionCertifyConfig(_Section):
    enabled: bool = True
    method: Literal["crown", "forward_crown"] = Field(
        "crown", description="crown: CROWN on (θ, x) ↦ f(T(x, θ)); forward_crown: affine transforms folded into "
                             "a linear layer of θ, intermediate bounds in forward mode (far cheaper on large images)")
    max_boxes: int = Field(32, ge=1, description="parameter boxes per sample branch and bound may split into")
    batch_size: int = Field(256, ge=1)
    time_budget_s: Optional[float] = Field(None, gt=0.0, description="per condition; the rest stays unknown")
    tolerance: float = Field(1e-4, gt=0.0, description="margins within this of zero are not verified")


class ConditionSanityConfig(_Section):
    enabled: bool = True
    tolerance: float = Field(0.02, ge=0.0, le=1.0, description="accuracy slack before a check fails")
    scales: list[float] = Field(default_factory=lambda: [0.5], description="shares of the range, each re-searched")

    @field_validator("scales")
    @classmethod
    def _shares(cls, scales: list[float]) -> list[float]:
        if any(not 0 < s < 1 for s in scales):
            raise ValueError("scales are shares of the range, strictly between 0 and 1")
        return sorted(scales)


class ConditionsConfig(_Section):
    max_samples: Optional[int] = Field(200, ge=1)
    batch_size: int = Field(512, ge=1)
    failures: int = Field(4, ge=0, description="failure examples kept per condition (the report's gallery)")
    search: ConditionSearchConfig = ConditionSearchConfig()
    certify: ConditionCertifyConfig = ConditionCertifyConfig()
    sanity: ConditionSanityConfig = ConditionSanityConfig()
    threats: dict[str, ConditionConfig] = Field(default_factory=dict)

    @field_validator("threats")
    @classmethod
    def _names(cls, threats: dict) -> dict:
        for name in threats:
            if not CONDITION_NAME.match(name) or name in RESERVED_CONDITION_NAMES:
                raise ValueError(f"condition name {name!r}: use lower-case letters, digits and _ (not "
                                 f"{', '.join(RESERVED_CONDITION_NAMES)})")
        return threats


class Params(_Section):
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    threat: ThreatConfig = ThreatConfig()
    train: TrainConfig = PgdAtTrain()
    attack: AttackConfig = AttackConfig()
    certify: CertifyConfig = CertifyConfig()
    smoothing: SmoothingConfig = SmoothingConfig()
    conditions: ConditionsConfig = ConditionsConfig()
    export: ExportConfig = ExportConfig()
    properties: PropertiesConfig = PropertiesConfig()
    clinical: Optional[ClinicalConfig] = None
    report: ReportConfig = ReportConfig()
    gate: GateConfig = GateConfig()
    # `register` would shadow ABCMeta.register on the model class, hence the alias.
    registry: RegisterConfig = Field(RegisterConfig(), alias="register")
    runtime: RuntimeConfig = RuntimeConfig()
    # The user's files as DVC deps (dvc.yaml templates them); checked against data.path and model.name.
    inputs: Optional[InputsConfig] = None

    @model_validator(mode="before")
    @classmethod
    def _default_model_name(cls, raw: object) -> object:
        """register.model_name defaults to robustgate-<data name>, so a registry holds one name per dataset."""
        if not isinstance(raw, dict) or not isinstance(raw.get("register", {}), dict):
            return raw
        if raw.get("register", {}).get("model_name") is not None:
            return raw
        try:
            data = DataConfig.model_validate(raw.get("data") or {})
        except ValidationError:
            return raw  # reported by the field's own validation
        name = re.sub(r"[^\w.\-]+", "-", data.display_name()).strip("-") or "model"
        return {**raw, "register": {**raw.get("register", {}), "model_name": f"robustgate-{name}"}}

    def section_hash(self, *sections: str, exclude: dict | None = None) -> str:
        """SHA-256 of the named sections (all when none), for traceability; `exclude` drops fields
        the way pydantic's `model_dump` does, e.g. {"train": {"method"}}."""
        dumped = self.model_dump(mode="json", by_alias=True, exclude=exclude)
        chosen = {k: dumped[k] for k in (sections or dumped.keys())}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line: the first offending key path, its value and what is allowed."""
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    method = None
    if loc[:1] == ["train"] and len(loc) > 1 and loc[1] in TRAIN_SETTINGS:
        method = loc.pop(1)  # the union's tag, not a key the user wrote
    if loc[:2] == ["conditions", "threats"] and len(loc) > 3 and loc[3] in CONDITION_KINDS:
        loc.pop(3)  # the condition kind's tag, not a key the user wrote
    path = ".".join(loc) or "<root>"
    message = first["msg"]
    value = first.get("input")
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if first["type"] == "not_a_setting":
        return f"{source}: {path}.{message}{suffix}"
    if first["type"] == "extra_forbidden" and method is not None and _owners(loc[-1]):
        return f"{source}: {path}: {_not_train_setting(loc[-1], method)}{suffix}"
    if first["type"] == "union_tag_invalid" and loc == ["train"]:
        path, value = "train.method", first["ctx"]["tag"]
        message = "Input should be " + ", ".join(repr(m) for m in TRAIN_SETTINGS)
    elif first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        return f"{source}: {path}: required{f' by train.method {method!r}' if method else ''}{suffix}"
    shown = "{...}" if isinstance(value, dict) else repr(value)
    return f"{source}: {path} = {shown}: {message}{suffix}"


def _owners(key: str) -> list[str]:
    """The training methods that have `key` as a setting."""
    return [name for name, cls in TRAIN_SETTINGS.items() if key in cls.model_fields]


def _not_train_setting(key: str, method: str) -> str:
    own = ", ".join(TRAIN_SETTINGS[method].own_settings()) or "none"
    return f"not a setting of train.method {method!r} (a setting of {', '.join(_owners(key))}; {method}'s own: {own})"


def with_method(params: Params, method: str) -> Params:
    """The same params trained with another method (`robustgate compare`, the study): the settings
    every method shares and those both methods have are kept; the others are dropped, since they
    would have no effect, and the new method's own settings not given take their defaults."""
    if method not in TRAIN_SETTINGS:
        raise UsageError(f"train.method {method!r}: unknown; allowed: {', '.join(TRAIN_SETTINGS)}")
    written = params.train.model_dump(exclude_unset=True)
    if issubclass(TRAIN_SETTINGS[method], _ConditionTrained) and written.get("threat", LP_THREAT) == LP_THREAT:
        raise UsageError(f"train.method {method!r} trains for a condition: set train.threat to one of "
                         "conditions.threats")
    try:
        train = TRAIN_SETTINGS[method].model_validate(train_section_for(written, method))
    except ValidationError as error:  # cannot happen for settings that were valid under the first method
        raise UsageError(format_validation_error("params.yaml", error)) from None
    return params.model_copy(update={"train": train})


class _DuplicateKey(Exception):
    def __init__(self, key, first_line: int, second_line: int):
        super().__init__(key)
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _Yaml11Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (plain YAML 1.1 reads it as a string) and refuses a
    key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # unhashable key: the base constructor reports it
                    continue
        return super().construct_mapping(node, deep=deep)


_Yaml11Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(path: Path) -> object:
    """Parse a YAML file safely (no object construction), with scientific floats; invalid UTF-8,
    invalid YAML and duplicate keys are one line each."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path.name}: not valid UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:
        raise UsageError(f"{path.name}: cannot read ({error.strerror})") from None
    try:
        return yaml.load(text, Loader=_Yaml11Loader)  # noqa: S506 (SafeLoader subclass)
    except _DuplicateKey as error:
        raise UsageError(f"{path.name}: duplicate key {error.key!r} on lines {error.first_line} and "
                         f"{error.second_line}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path.name}: not valid YAML: {str(error).splitlines()[0]}") from None


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise UsageError(format_validation_error(source, error)) from None
    check_train_threat(params, source)
    return params


def check_train_threat(params: Params, source: str = "params.yaml") -> None:
    """`train.threat` names the Lp ball or a condition this params file defines."""
    name = getattr(params.train, "threat", LP_THREAT)
    if name != LP_THREAT and name not in params.conditions.threats:
        named = ", ".join(sorted(params.conditions.threats)) or "none"
        raise UsageError(f"{source}: train.threat = {name!r}: not a condition of conditions.threats (defined: "
                         f"{named}); {LP_THREAT!r} is the threat section's Lp ball")


def load_params(path: Path, root: Path) -> Params:
    """Read, validate and check the file references of `params.yaml`."""
    if not path.is_file():
        raise UsageError(f"params file {path} does not exist")
    params = parse_params(read_yaml(path), path.name)
    if params.data.path is not None:
        data_path = confine(params.data.path, root, "data.path")
        if not data_path.exists():
            raise UsageError(f"{path.name}: data.path = {params.data.path!r}: no such file or directory")
    if params.train.init_checkpoint is not None:
        init = confine(params.train.init_checkpoint, root, "train.init_checkpoint")
        if not (init / "model.pt").is_file():
            raise UsageError(f"{path.name}: train.init_checkpoint = {params.train.init_checkpoint!r}: no model.pt there")
    if params.report.signing_key is not None:
        key = confine(params.report.signing_key, root, "report.signing_key")
        if not key.is_file():
            raise UsageError(f"{path.name}: report.signing_key = {params.report.signing_key!r}: no such file")
    policy = confine(params.gate.policy, root, "gate.policy")
    if not policy.is_file():
        raise UsageError(f"{path.name}: gate.policy = {params.gate.policy!r}: no such file")
    from pipeline.inputs import check_dvc_inputs

    check_dvc_inputs(params, root, path.name)
    return params
