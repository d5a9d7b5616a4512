"""The run configuration: one dataclass per section, the paper's presets, TOML / YAML files and
`section.key=value` overrides, checked as a whole before any work starts.

Precedence, lowest first: the dataclass defaults, the preset, the config file, the command line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fer_train.errors import ConfigError

# The choices settings may take; the modules that implement them import these names from here.
DATASETS = ("affectnet", "ferplus", "rafdb", "facial_expressions")
FERPLUS_LABEL_MODES = ("majority", "plurality", "soft")  # docs/method.md section 7
ON_ERROR = ("raise", "skip")
WEIGHT_SCHEMES = ("eq3", "eq4", "none")  # docs/method.md section 4
DATA_BACKENDS = ("auto", "dali", "torch")
STEMS = ("imagenet", "cifar")  # fer_kernels.models.resnet.STEMS
ARCHS = ("resnet18", "resnet50")
OPTIMIZERS = ("ranger", "radam", "sgd")  # ranger = Lookahead + RAdam (+ GC with optim.gc); radam = GC-RAdam alone
SCHEDULES = ("flat_cosine", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "none")


@dataclass
class DataConfig:
    """Training sets by folder (any subset); none given: the built-in synthetic set."""

    affectnet: str | None = None
    ferplus: str | None = None
    rafdb: str | None = None
    facial_expressions: str | None = None
    ferplus_label_mode: str = "majority"
    synthetic_size: int = 64  # side of the drawn faces
    synthetic_length: int | None = None  # training faces (default fer_train.data.synthetic.SPLIT_LENGTHS)
    synthetic_eval_length: int | None = None  # faces in each of val and test (the same default)
    on_error: str = "raise"  # or "skip": leave bad images out, counted in the data report and metrics.jsonl
    max_image_pixels: int = 50_000_000  # larger images (by their header) are bad input: decompression bombs
    image_size: int = 224
    crop: float = 0.875  # the centre crop's side over the resized shorter side: the paper's 224 of 256; less zooms in
    # random crops in training, not the paper's (0: off): magnification from [1 - zoom, 1 + zoom], and a shift of up
    # to `translate` of the image side along each axis (fer_train.recipe.augmentation.AugmentConfig)
    zoom: float = 0.0
    translate: float = 0.0
    backend: str = "auto"  # DALI where installed and the device is a GPU, else the PyTorch pipeline
    workers: int | None = None  # input worker processes; None: 2 on a GPU, 0 on a CPU (build_loader says why)
    # decoded images the PyTorch pipeline keeps when it reads in the main process (workers=0), so later epochs
    # skip reading and decoding them; 0: off. FERPlus, 48 x 48 grey, takes 66 MB.
    decoded_cache_mb: int = 1024
    timeout: float = 300.0  # seconds without a batch from the input pipeline's workers before the run stops
    class_weights: str = "eq3"  # docs/method.md section 4: eq3, eq4 or none
    class_balance: float = 0.0  # draw training samples with weight (class count) ** -class_balance (0: each once)
    fmix: bool = True
    fmix_alpha: float = 1.0
    fmix_decay_power: float = 3.0
    fmix_per_sample: bool = False  # the official FMix: one mask per batch
    label_smoothing: float = 0.0  # the targets' share spread evenly over the classes
    split_seed: int = 0  # the mixed evaluation split


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    act: str = "mish"
    booster: str | None = "plus"  # "plus" (ABP), "depthwise" (AB) or None
    fused: bool = True
    stem: str = "imagenet"  # the paper's 7x7/2 conv + max-pool; "cifar": 3x3/1 conv, no pool (small inputs)
    pretrained: str | None = None  # torchvision weights: a path, or "imagenet" (downloads)


@dataclass
class OptimConfig:
    name: str = "ranger"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # on weights of 2+ dimensions only: biases and batch-norm scales are not decayed
    decoupled_weight_decay: bool = False  # ranger / radam: AdamW's p *= 1 - lr * wd instead of L2 in the gradient
    gc: bool = True
    k: int = 6
    alpha: float = 0.5
    momentum: float = 0.9  # SGD
    schedule: str = "flat_cosine"  # the authors' code: flat for flat_fraction of the steps, then cosine to 0
    flat_fraction: float = 0.5


@dataclass
class TrainConfig:
    steps: int = 60_000
    time_budget: str | None = None  # e.g. "60m", "1h30m", "900s": the whole run, evaluation included, fits in it
    batch_size: int = 256  # global: micro_batch x accumulation x processes
    micro_batch: int | None = None  # per process per forward pass; None: batch_size / processes
    eval_every: int = 500
    eval_batch_size: int = 256
    checkpoint_every: int = 500
    log_every: int = 50
    amp: str = "auto"  # bf16 on GPUs that have it, else fp16 with GradScaler; bf16 on CPUs that compute it natively
    ema: float = 0.0  # decay of an exponential moving average of the weights, evaluated and saved when on (0: off)
    tta_report: bool = True  # the final report adds rows with horizontal-flip test-time augmentation
    keep_freed_memory: bool = True  # glibc keeps freed blocks for reuse instead of page-faulting them in again
    threads: str = "auto"  # intra-op threads: N, adaptive (measured, fer_train.threads), auto (adaptive with a budget)
    # CPU bf16 autocast, one process: the passes use bfloat16 weight copies that the fused optimizer writes (the
    # same steps without rounding the weights at each one; fer_kernels.optim.BFloat16Weights)
    bf16_weights: bool = True
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    out: str | None = None  # the run folder; default runs/<time>-<preset>


@dataclass
class RunConfig:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _paper(**sections) -> dict:
    """A paper preset: 60,000 steps of batch 256, evaluation every 500 (docs/method.md section 4) plus `sections`."""
    return {"train": {"steps": 60_000, "batch_size": 256, "eval_every": 500}, **sections}


_R18 = {"arch": "resnet18", "act": "relu", "booster": None}
_EQ3 = {"class_weights": "eq3"}
PRESETS: dict[str, tuple[str, dict]] = {
    # 48 x 48 like FERPlus, lr 3e-3 for a 300-step run (the paper's 1e-3 is for 60,000): measured 0.821 test
    # accuracy, the whole command in 2 min 6 s on 2 CPU cores (32 x 32 gave 0.35: the features get too small)
    "default": ("a short ResNet-18 + Mish + ABP run on the built-in synthetic faces (a few minutes on 2 CPU cores)",
                {"data": {"synthetic_size": 48, "synthetic_length": 4000, "image_size": 48},
                 "optim": {"lr": 3e-3},
                 "train": {"steps": 300, "batch_size": 32, "eval_every": 100, "checkpoint_every": 100,
                           "log_every": 10, "eval_batch_size": 100}}),
    # One hour of 2 CPU cores on FERPlus (docs/method.md section 7 for the data): 48 px like the data set's files,
    # the vote distributions as targets (FERPlus's best training mode; evaluation stays on the majority labels),
    # no class weights but class-balanced sampling at power 0.5 (rare classes drawn more often: in a controlled
    # pair it raised macro-F1 from 0.367 to 0.513, benchmarks/results/ferplus-class-balance/), lr 3e-3 (the
    # paper's 1e-3 is for 60,000 steps of 256), no FMix (in a 15-minute pair, two epochs, it cost 4.0 points of
    # accuracy: the paper's mixing is for its 60,000 steps; benchmarks/results/ferplus-fmix/), random crops
    # (zoom and shift by 0.1, not the paper's: level with none at the ~10,600 steps of an AVX2 hour, ahead from
    # step 8,000 on in a bfloat16 hour of ~38,000 steps, 0.8546 against 0.8486;
    # benchmarks/results/ferplus-random-crops/, ferplus-cpu-1h-random-crops/), the run's length set by the clock.
    # benchmarks/results/ferplus-cpu-1h/ holds a run of it and what it reached.
    "ferplus-cpu-1h": ("ResNet-18 + Mish + ABP on FERPlus in 60 minutes of wall time on a CPU (needs --ferplus)",
                       {"data": {"image_size": 48, "ferplus_label_mode": "soft", "class_weights": "none",
                                 "class_balance": 0.5, "fmix": False, "zoom": 0.1, "translate": 0.1},
                        "optim": {"lr": 3e-3},
                        "train": {"time_budget": "60m", "steps": 1_000_000, "batch_size": 32, "eval_every": 2000,
                                  "checkpoint_every": 1000, "log_every": 100, "eval_batch_size": 256,
                                  "ema": 0.999}}),
    # Tables 3-5: plain ResNet-18, eq. 3 weights, the optimizer rows
    "table3-sgd-0.01": ("SGD, lr 0.01", _paper(model=_R18, data=_EQ3, optim={"name": "sgd", "lr": 0.01})),
    "table3-sgd-0.001": ("SGD, lr 0.001", _paper(model=_R18, data=_EQ3, optim={"name": "sgd", "lr": 0.001})),
    "table3-ranger": ("Lookahead + RAdam, lr 0.001", _paper(model=_R18, data=_EQ3, optim={"gc": False})),
    "table3-ranger-gc": ("Lookahead + RAdam + GC, lr 0.001 (the paper's best)", _paper(model=_R18, data=_EQ3)),
    "table4-beta1-0.95": ("Ranger + GC, beta1 0.95", _paper(model=_R18, data=_EQ3, optim={"betas": (0.95, 0.999)})),
    "table5-beta2-0.98": ("Ranger + GC, beta2 0.98", _paper(model=_R18, data=_EQ3, optim={"betas": (0.9, 0.98)})),
    # Table 6: the architecture rows, Ranger + GC, eq. 3 weights
    "table6-resnet18": ("ResNet-18", _paper(model=_R18, data=_EQ3)),
    "table6-resnet18-pretrained": ("ImageNet-pretrained ResNet-18",
                                   _paper(model={**_R18, "pretrained": "imagenet"}, data=_EQ3)),
    "table6-resnet18-mish": ("ResNet-18 + Mish", _paper(model={**_R18, "act": "mish"}, data=_EQ3)),
    "table6-resnet18-ab": ("ResNet-18 + AB", _paper(model={**_R18, "booster": "depthwise"}, data=_EQ3)),
    "table6-resnet18-ab-mish": ("ResNet-18 + AB + Mish",
                                _paper(model={**_R18, "act": "mish", "booster": "depthwise"}, data=_EQ3)),
    # Table 7: one model per data set; eq. 4 weights for AffectNet, none for FERPlus and RAF-DB
    **{f"table7-{name}-{data_set}": (f"{title}, trained on {data_set}",
                                     _paper(model=model, data={"class_weights": "eq4" if data_set == "affectnet"
                                                               else "none"}))
       for name, title, model in (("resnet18", "ResNet-18", _R18),
                                  ("resnet50-mish-abp", "ResNet-50 + Mish + ABP",
                                   {"arch": "resnet50", "act": "mish", "booster": "plus"}))
       for data_set in ("affectnet", "ferplus", "rafdb")},
}


def _merge(config: RunConfig, values: dict, origin: str) -> None:
    """Sets `values` ({section: {key: value}}) on `config`, checking names and types."""
    for section, entries in values.items():
        if section == "preset":
            config.preset = str(entries)
            continue
        target = getattr(config, section, None)
        if not dataclasses.is_dataclass(target) or not isinstance(entries, dict):
            raise ConfigError(f"{origin}: unknown section {section!r}; sections are data, model, optim, train")
        known = {f.name: f for f in dataclasses.fields(target)}
        for key, value in entries.items():
            if key not in known:
                raise ConfigError(f"{origin}: unknown key {section}.{key}; {section} has {', '.join(known)}")
            setattr(target, key, _coerce(value, known[key], f"{origin}: {section}.{key}"))


def _coerce(value: Any, spec: dataclasses.Field, where: str) -> Any:
    """`value` (from TOML, YAML or a command-line string) as the field's type."""
    kind = str(spec.type)
    optional = "None" in kind
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} cannot be empty")
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("tuple"):
            parts = value.split(",") if isinstance(value, str) else list(value)
            if len(parts) != 2:
                raise ValueError
            return tuple(float(p) for p in parts)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {kind}") from None


def read_config_file(path: str | os.PathLike) -> dict:
    """{section: {key: value}} from a .toml, .yaml or .yml file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: {err}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .toml file") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected sections (data, model, optim, train) at the top level")
        return values
    raise ConfigError(f"config file {path}: expected .toml, .yaml or .yml")


def parse_overrides(items: list[str]) -> dict:
    """["optim.lr=0.01", "train.steps=100"] -> {"optim": {"lr": "0.01"}, "train": {"steps": "100"}}."""
    values: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.01")
        values.setdefault(section, {})[name] = value.strip()
    return values


def build_config(preset: str = "default", file: str | os.PathLike | None = None,
                 overrides: dict | None = None, check_paths: bool = True) -> RunConfig:
    """The run's configuration from a preset, a file and overrides ({section: {key: value}}), checked
    (the data folders too, unless check_paths is False: a checkpoint's run may come from another machine)."""
    values_from_file = read_config_file(file) if file is not None else {}
    preset = str(values_from_file.get("preset", preset)) if preset == "default" else preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; `python -m fer_train presets` lists them")
    config = RunConfig(preset=preset)
    _merge(config, PRESETS[preset][1], f"preset {preset}")
    if file is not None:
        _merge(config, {k: v for k, v in values_from_file.items() if k != "preset"}, str(file))
    _merge(config, overrides or {}, "command line")
    check(config, check_paths)
    return config


def parse_duration(text: str, where: str = "duration") -> float:
    """Seconds of "90s", "60m", "1h30m", "1.5h" or a plain number of seconds."""
    value = str(text).strip().lower().replace(" ", "")
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", value)
    if not value or parts is None or not any(parts.groups()):
        raise ConfigError(f"{where}: {text!r} is not a duration (e.g. 90s, 60m, 1h30m)")
    hours, minutes, seconds = (float(g or 0) for g in parts.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise ConfigError(f"{where}: {text!r} is not a positive duration")
    return total


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _one_of(value, allowed, where):
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {allowed}, got {value!r}")


def check(config: RunConfig, check_paths: bool = True) -> None:
    """Every value in range and every data folder present, so that no error waits for step 1,000. Data
    folders are made absolute, so evaluate and --resume find them from any working directory."""
    d, m, o, t = config.data, config.model, config.optim, config.train
    for name in DATASETS:
        root = getattr(d, name)
        if check_paths and root is not None:
            if not Path(root).is_dir():
                raise ConfigError(f"data.{name}: {root} is not a folder")
            setattr(d, name, str(Path(root).resolve()))
    given = [name for name in DATASETS if getattr(d, name)]
    if check_paths and config.preset != "default":  # a real-data run silently on synthetic faces helps no one
        needed = config.preset.rsplit("-", 1)[1] if config.preset.startswith("table7") else \
            "ferplus" if config.preset.startswith("ferplus") else None
        if not given or (needed and needed not in given):
            flag = f"--{needed}" if needed else "--affectnet / --ferplus / --rafdb / --facial-expressions"
            raise ConfigError(f"preset {config.preset} trains on real data: give it with {flag} DIR")
    _one_of(d.ferplus_label_mode, FERPLUS_LABEL_MODES, "data.ferplus_label_mode")
    _one_of(d.on_error, ON_ERROR, "data.on_error")
    _one_of(d.backend, DATA_BACKENDS, "data.backend")
    if d.backend == "dali" and not installed("nvidia.dali"):
        raise ConfigError("data.backend=dali but NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 "
                          "(or fer-kernels[dali]), or use data.backend=auto / torch")
    _one_of(d.class_weights, WEIGHT_SCHEMES, "data.class_weights")
    _one_of(m.arch, ARCHS, "model.arch")
    _one_of(m.act, ("mish", "relu"), "model.act")
    _one_of(m.booster, (None, "plus", "depthwise"), "model.booster")
    _one_of(m.stem, STEMS, "model.stem")
    if m.stem != "imagenet" and m.pretrained is not None:
        raise ConfigError(f"model.pretrained: torchvision's weights have the ImageNet stem, not model.stem={m.stem}")
    if check_paths and m.pretrained not in (None, "imagenet"):
        if not Path(m.pretrained).is_file():
            raise ConfigError(f"model.pretrained: {m.pretrained} is not a file (or use 'imagenet')")
        m.pretrained = str(Path(m.pretrained).resolve())
    _one_of(o.name, OPTIMIZERS, "optim.name")
    _one_of(o.schedule, SCHEDULES, "optim.schedule")
    _one_of(t.amp, AMP_MODES, "train.amp")
    positive = {"data.image_size": d.image_size, "data.synthetic_size": d.synthetic_size, "train.steps": t.steps,
                "train.batch_size": t.batch_size, "train.eval_every": t.eval_every, "train.log_every": t.log_every,
                "train.checkpoint_every": t.checkpoint_every, "train.eval_batch_size": t.eval_batch_size,
                "optim.k": o.k}
    for where, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where} must be positive, got {value}")
    if d.workers is not None and d.workers < 0:
        raise ConfigError(f"data.workers must be >= 0, got {d.workers}")
    if d.decoded_cache_mb < 0:
        raise ConfigError(f"data.decoded_cache_mb must be >= 0 (0: no cache), got {d.decoded_cache_mb}")
    if d.max_image_pixels < 1 or not d.timeout > 0:
        raise ConfigError(f"data.max_image_pixels and data.timeout must be positive, got {d.max_image_pixels} and "
                          f"{d.timeout}")
    if d.image_size < 16:
        raise ConfigError(f"data.image_size must be at least 16 (ResNet downsamples 32x), got {d.image_size}")
    if t.micro_batch is not None and (t.micro_batch <= 0 or t.batch_size % t.micro_batch):
        raise ConfigError(f"train.micro_batch ({t.micro_batch}) must be positive and divide train.batch_size "
                          f"({t.batch_size})")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"optim.lr must be a positive number, got {o.lr}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be in [0, 1), got {o.betas}")
    if not 0 < o.alpha <= 1:
        raise ConfigError(f"optim.alpha must be in (0, 1], got {o.alpha}")
    if not 0 <= o.flat_fraction <= 1:
        raise ConfigError(f"optim.flat_fraction must be in [0, 1], got {o.flat_fraction}")
    if o.eps <= 0 or o.weight_decay < 0 or o.momentum < 0:
        raise ConfigError("optim.eps must be positive and optim.weight_decay, optim.momentum non-negative")
    if o.decoupled_weight_decay and o.name == "sgd":
        raise ConfigError("optim.decoupled_weight_decay is for ranger and radam; SGD's optim.weight_decay is L2")
    if not 0 <= d.class_balance <= 1:
        raise ConfigError(f"data.class_balance must be in [0, 1] (0: every image once per epoch; 1: every class "
                          f"equally often), got {d.class_balance}")
    if d.class_balance and d.class_weights != "none":
        raise ConfigError(f"data.class_balance={d.class_balance} and data.class_weights={d.class_weights} both "
                          f"correct for rare classes, which would count them twice; set data.class_weights=none")
    if not 0 < d.crop <= 1:
        raise ConfigError(f"data.crop must be in (0, 1] (the centre crop's share of the resized shorter side; the "
                          f"paper's 0.875 is 224 of 256, 1 keeps the whole face box), got {d.crop}")
    if not 0 <= d.zoom < 1:
        raise ConfigError(f"data.zoom must be in [0, 1) (magnification drawn from [1 - zoom, 1 + zoom]), got {d.zoom}")
    if not 0 <= d.translate <= 0.5:
        raise ConfigError(f"data.translate must be in [0, 0.5] (the largest shift as a share of the image side), "
                          f"got {d.translate}")
    if not (0 <= d.label_smoothing < 1 and 0 <= t.ema < 1):
        raise ConfigError(f"data.label_smoothing and train.ema must be in [0, 1), got {d.label_smoothing} and {t.ema}")
    if t.time_budget is not None:
        parse_duration(t.time_budget, "train.time_budget")
    if d.fmix_alpha <= 0 or d.fmix_decay_power < 0:
        raise ConfigError("data.fmix_alpha must be positive and data.fmix_decay_power non-negative")
