"""Configuration: the training run (:class:`TrainConfig`, loadable from YAML and overridable from the CLI),
the recognition defaults that the CLI, the web app and the Python API share, and the web app's settings
(:class:`AppSettings`). Light to import: the CLI reads its defaults here before any heavy import."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
}


IMAGE_SIZE = 48  # FER-2013's faces, and every model's input: IMAGE_SIZE x IMAGE_SIZE grayscale

# Recognition defaults: `ferkit predict/serve` flags, AppSettings and EmotionRecognizer's arguments.
WEIGHTS_DIR = Path(__file__).parent / "weights"  # the files shipped inside the package
# the shipped model (scripts/ship_model.sh copies a run's export into WEIGHTS_DIR; then name it here)
DEFAULT_MODEL = WEIGHTS_DIR / "ferkit_vgg_ba_light_s7_e110_int8_prior.onnx"
CENTERFACE = WEIGHTS_DIR / "centerface.onnx"  # the shipped face detector
MIN_FACE = 48  # smallest face side in pixels that the detector reports
DETECTOR = "centerface"  # face detector: the CenterFace CNN shipped in weights/
MARGIN = 0.05  # crop margin around each face box, as a fraction of its side (benchmarks/crop_margin.py)
MAX_PIXELS = 40_000_000  # larger images are refused (decompression-bomb guard)
TTA = "flip"  # the default: ten-crop was 4 PublicTest images better at 5x the model time (README, Results)
TTA_MODES = ("none", "flip", "crops")  # test-time augmentation per face (crops: ten-crop, 5x flip's model time)
MIB = 1024 * 1024  # uploads are limited in MiB
VIDEO_EVERY = 10  # a video's every N-th frame is recognized (predict --every, predict_paths)
HOST, PORT = "127.0.0.1", 7860  # where `ferkit serve` listens: this machine only, unless told
MAX_THREADS = 1024  # more threads than that are a typo (99999: torch crashed, ONNX Runtime took 16 GB and hung)
PROGRESS_LOG_INTERVAL_S = 30.0  # a progress bar drawn into a file or pipe (a nohup log) redraws this seldom
# `export --check`: the largest |ONNX - torch| difference of a float32 export's probabilities (measured: 5e-7)
CHECK_TOLERANCE = 1e-4
EVAL_BATCH_SIZE = 512  # faces a model scores at once in evaluation (ten-crop: 10 views each)


# what a resumed run may change: where the data, the work and the run folder are, how long it goes on (a cosine
# schedule is recomputed over the new length, an exponential one goes on) and its final evaluation; anything
# else is another recipe
RESUMABLE_CHANGES = ("data", "out", "epochs", "patience", "max_steps", "device", "threads", "compile", "progress",
                     "evaluate", "tta")  # fmt: skip


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a misspelt ``word``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _within(value: float, bounds: str) -> bool:
    """Whether a finite ``value`` lies in an interval written as ``"[0, 1)"``, ``"(0, inf)"``, ..."""
    low, high = (float(v) for v in bounds[1:-1].split(","))
    above = value >= low if bounds[0] == "[" else value > low
    below = value <= high if bounds[-1] == "]" else value < high
    return math.isfinite(value) and above and below


@dataclass
class TrainConfig:
    """Everything a training run needs. ``ferkit train --help`` lists these with their help text."""

    data: str = _opt("", "FER-2013 source: a .npz cache from `ferkit prepare`, fer2013.csv, or the image folder")
    out: str = _opt("runs/ferkit_small", "output folder for checkpoints, metrics.csv, train.log and the report")
    model: str = _opt("ferkit_small", "model name (see `ferkit models`), or timm:<arch>")
    model_kwargs: dict = _opt({}, "extra model arguments as YAML, e.g. '{width: 0.5, dropout: 0.4}'")
    init_weights: str = _opt("", "optional local file of initial (e.g. ImageNet) weights; never downloaded")
    epochs: int = _opt(30, "maximum number of epochs", bounds="[0, inf)")
    batch_size: int = _opt(128, "global batch size (split across processes under torchrun)", bounds="[1, inf)")
    optimizer: str = _opt("sgd", "sgd (Nesterov momentum) or adamw", choices=["sgd", "adamw"])
    lr: float = _opt(0.05, "initial (peak) learning rate", bounds="(0, inf)")
    momentum: float = _opt(0.9, "SGD momentum", bounds="[0, 1)")
    weight_decay: float = _opt(5e-4, "weight decay (not applied to norms and biases)", bounds="[0, inf)")
    schedule: str = _opt("cosine", "learning-rate schedule", choices=["cosine", "exponential", "plateau", "constant"])
    warmup_epochs: float = _opt(1.0, "linear warm-up length (cosine and exponential)", bounds="[0, inf)")
    decay_rate: float = _opt(0.96, "exponential schedule: factor per epoch", bounds="(0, 1]")
    plateau_patience: int = _opt(
        3,
        "plateau schedule: epochs in a row without PublicTest improvement that are allowed; one more halves the LR",
        bounds="[0, inf)",
    )
    min_lr_ratio: float = _opt(0.0, "cosine schedule: final LR as a fraction of the peak", bounds="[0, 1]")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy loss", bounds="[0, 1)")
    class_weights: bool = _opt(True, "weight the loss by dynamic class weights from the training label counts")
    class_weight_power: float = _opt(
        0.5,
        "0 = uniform, 0.5 = square-root smoothed, 1 = fully 'balanced' (at most 4: from about 40 the other "
        "classes' weights reach 0 beside disgust's)",
        bounds="[0, 4]",
    )
    class_weight_cap: float = _opt(
        0.0,
        "cap on a class weight, (images / (7 x class count))^power (1 for a class of average size), before the "
        "weights are scaled to average 1 over the training images (so a capped weight may end above the cap; a cap "
        "under every weight makes them equal; 0 = no cap)",
        bounds="[0, inf)",
    )
    sampler: str = _opt(
        "random",
        "random shuffling, or a class-balanced weighted sampler (which replaces the loss's class weights)",
        choices=["random", "balanced"],
    )
    augment: str = _opt("medium", "augmentation preset", choices=["none", "light", "medium", "strong"])
    mixup: float = _opt(0.0, "mixup Beta parameter (0 = off)", bounds="[0, inf)")
    cutmix: float = _opt(0.0, "CutMix Beta parameter (0 = off)", bounds="[0, inf)")
    geometry: float = _opt(
        1.0,
        "share of training faces that the preset scales, rotates and shifts (resampled, so blurred a "
        "little); the others are only flipped, sharp as test faces",
        bounds="[0, 1]",
    )
    sam_rho: float = _opt(
        0.0,
        "sharpness-aware minimisation (SAM): radius of the weight perturbation (0 = off, e.g. 0.05); "
        "each step then costs two forward-backward passes",
        bounds="[0, inf)",
    )
    ema: float = _opt(
        0.0,
        "exponential moving average of weights, decay per step (0 = off, e.g. 0.999), warmed up as "
        "min(ema, (1 + step) / (10 + step)): 0.999 is reached after about 9,000 steps",
        bounds="[0, 1)",
    )
    teacher: list = _opt(
        [],
        "knowledge distillation: checkpoints (.pt) or exported models (.onnx, e.g. the shipped one) whose averaged "
        "predictions teach this model; or, alone, the teacher_probs.npz that a distill_cache run wrote (the same "
        "training images and distill_temperature): the targets without the teachers",
    )
    distill_alpha: float = _opt(
        0.5, "distillation: weight of the teacher term (1 - alpha for the labels)", bounds="[0, 1]"
    )
    distill_temperature: float = _opt(4.0, "distillation: softmax temperature", bounds="(0, inf)")
    distill_cache: bool = _opt(
        False,
        "distillation: teach each image by the teachers' predictions on it and its mirror, computed once "
        "(out/teacher_probs.npz), instead of on every augmented batch: 2.4x faster for ferkit_vgg on a CPU, "
        "but every view of an image gets the same target",
    )
    patience: int = _opt(10, "early stopping: epochs without PublicTest improvement (0 = off)", bounds="[0, inf)")
    seed: int = _opt(
        0,
        "random seed; a CPU run repeats exactly on the same machine (on CUDA, cuDNN's autotuned kernels "
        "may differ slightly from run to run)",
        bounds="[0, 4294967295]",
    )
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    amp: str = _opt(
        "auto",
        "mixed precision: on CUDA auto means bf16 if supported, else fp16; on a CPU only bf16 turns it on "
        "(2x faster on some CPUs, no faster on others: benchmarks/train_throughput.py tells; auto is float32 there)",
        choices=["auto", "bf16", "fp16", "none"],
    )
    channels_last: bool = _opt(True, "use the channels_last memory format on CUDA")
    compile: bool = _opt(False, "torch.compile the model")
    sync_bn: bool = _opt(False, "under torchrun: synchronise BatchNorm statistics across processes")
    threads: int = _opt(0, "CPU threads for torch (0 = torch's default)", bounds=f"[0, {MAX_THREADS}]")
    train_limit: int = _opt(
        0, "use a fixed random subset of N training images (0 = all); for quick runs and tests", bounds="[0, inf)"
    )
    val_limit: int = _opt(0, "use a fixed random subset of N PublicTest images (0 = all)", bounds="[0, inf)")
    max_steps: int = _opt(
        0,
        "stop after this many optimiser steps in total (0 = no limit; for tests and smoke runs: the epoch it "
        "cuts short counts as done, and --resume goes on with the next one)",
        bounds="[0, inf)",
    )
    progress: bool = _opt(True, "show progress bars")
    evaluate: bool = _opt(True, "when training ends, evaluate best.pt on PrivateTest into out/eval")
    tta: str = _opt("none", "test-time augmentation of that final evaluation", choices=list(TTA_MODES))

    def __post_init__(self) -> None:
        """Check every field's type and choices, so that a bad config fails before any data is loaded."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                with contextlib.suppress(ValueError):
                    value = float(value)
            if not isinstance(value, _TYPES[kind]) or (isinstance(value, bool) and kind in ("int", "float")):
                raise ValueError(f"{f.name}: expected {kind}, got {value!r}")
            if kind == "float":
                value = float(value)
                setattr(self, f.name, value)
            if (choices := f.metadata.get("choices")) and value not in choices:
                raise ValueError(f"{f.name}: {value!r} is not one of {', '.join(choices)}")
            if (bounds := f.metadata.get("bounds")) and not _within(value, bounds):
                raise ValueError(f"{f.name}: {value!r} is outside {bounds}")
            if kind == "list" and not all(isinstance(v, str) for v in value):
                raise ValueError(f"{f.name}: expected a list of file names, got {value!r}")
        if fixed := sorted({"num_classes", "in_chans"} & set(self.model_kwargs)):
            raise ValueError(f"model_kwargs: {' and '.join(fixed)} cannot be set: FER-2013 has 7 classes, 1 channel")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        if not self.out.strip():  # Path("") is the working folder: the run's files would land among the user's
            raise ValueError("out: empty; name the run's folder (a new one, or '.' to mean this one)")

    @classmethod
    def from_yaml(cls, path: str | Path, options: Collection[str] = (), **overrides: Any) -> TrainConfig:
        """Read a YAML file of fields (unknown keys are an error) and apply ``overrides``; ``options``: see
        :meth:`from_dict`."""
        return cls.from_dict({**_read_mapping(path), **overrides}, source=str(path), options=options)

    @classmethod
    def of_run(
        cls, run_dir: str | Path, sources: Sequence[str], options: Collection[str] = (), **overrides: Any
    ) -> tuple[TrainConfig, list[str]]:
        """The config of the run in ``run_dir`` (see :func:`run_options`) with ``overrides``, and the fields it
        has that this ferkit no longer knows (dropped); a field the run predates takes its default."""
        path, values = run_options(run_dir, sources)
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        return cls.from_dict({**known, **overrides}, source=str(path), options=options), sorted(set(values) - names)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config", options: Collection[str] = ()) -> TrainConfig:
        """The config of ``values`` (from ``source``: a file's name); a bad value of a field in ``options``
        came from the command line and is named as its option (``--lr: ...``), not as the file's."""
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(map(str, set(values) - names)):
            said = ", ".join(k + did_you_mean(k, sorted(names)) for k in unknown)
            raise ValueError(f"{source}: unknown config field(s) {said}")
        try:
            return cls(**values)
        except ValueError as e:
            field, _, why = str(e).partition(": ")  # __post_init__'s messages begin with the field's name
            if field in options:
                raise ValueError(f"--{field.replace('_', '-')}: {why}") from e
            raise ValueError(f"{source}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> Path:
        """Write every field to ``path`` (atomically), in the form :meth:`from_yaml` reads."""
        from .fileio import atomic_write

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        return atomic_write(path, lambda f: f.write(text.encode()))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        merge = "tag:yaml.org,2002:merge"  # '<<: *anchor' keys, merged by the SafeLoader (a later key wins)
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value if k.tag != merge]
        if twice := next((k for k in keys if keys.count(k) > 1), None):
            raise yaml.constructor.ConstructorError(None, None, f"{twice!r} given twice", node.start_mark)
        return super().construct_mapping(node, deep)


def run_options(run_dir: str | Path, sources: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    """The training options a run recorded, as written, and the file they are read from: the first of
    ``sources`` in ``run_dir`` that exists, ``config.yaml`` (the recipe of the run's latest start, written
    beside its logs) or a checkpoint (``last.pt``: the recipe it resumes with; ``best.pt``)."""
    for name in sources:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        if name == "config.yaml":
            return path, _read_mapping(path)
        from .checkpoint import load_checkpoint

        return path, load_checkpoint(path, mmap=True).get("config") or {}  # the config, not the tensors
    raise ValueError(f"{run_dir}: none of {', '.join(sources)} to read the run's options from")


def _read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (an empty file is an empty one)."""
    from .fileio import not_a_file

    if problem := not_a_file(path, "config file"):
        raise ValueError(f"{path}: {problem}")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.load(f, Loader=_UniqueKeyLoader) or {}  # a SafeLoader
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a UTF-8 text file, so not a YAML config ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    return values


@dataclass
class AppSettings:
    """Limits and options of the web app (``ferkit serve --help`` lists them as flags)."""

    model: str | list[str] | None = None  # .onnx or .pt file (a list: an ensemble); None: the shipped model
    max_upload_mb: float = 10.0  # larger uploads are refused with 413
    max_pixels: int = MAX_PIXELS  # images with more pixels (width x height) are refused with 413
    max_concurrency: int = 2  # inferences running at once, one recognizer each
    max_queue: int = 32  # requests that may wait for a free recognizer; more are refused with 503
    queue_timeout_s: float = 10.0  # longest wait for a free recognizer before 503
    timeout_s: float = 30.0  # longest decode + detect + classify of one image before 504
    upload_timeout_s: float = 60.0  # longest time to receive a request's body before 408 (slow clients)
    keep_files_s: float = 600.0  # the UI's uploads and results (faces: personal data) are deleted after this long
    threads: int | None = None  # onnxruntime threads per recognizer (default: CPU cores / max_concurrency)
    min_face: int = MIN_FACE  # smallest face side in pixels that the detector reports
    detector: str = DETECTOR  # centerface, haar, a CenterFace or YuNet .onnx file or a Haar .xml cascade
    margin: float = MARGIN  # crop margin around each face box, as a fraction of its side
    tta: str = TTA  # none, flip (each face with its mirror) or crops (ten-crop)
    ui: bool = True  # mount the Gradio UI at /

    def __post_init__(self) -> None:
        positive = ("max_upload_mb", "max_pixels", "max_concurrency", "min_face")
        for name in (*positive, "queue_timeout_s", "timeout_s", "upload_timeout_s", "keep_files_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {self.max_queue!r}")
        if not 60 <= self.keep_files_s < math.inf:  # a photo waits in the queue, its result is fetched after
            raise ValueError(f"keep_files_s must be at least 60 seconds and finite, got {self.keep_files_s!r}")
        if not math.isfinite(self.max_upload_mb):
            raise ValueError(f"max_upload_mb must be a finite number of MiB, got {self.max_upload_mb!r}")
        if self.max_upload_bytes < 1:  # 1e-30 MiB: every upload refused
            raise ValueError(f"max_upload_mb {self.max_upload_mb!r} is under one byte")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)
