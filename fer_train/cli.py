"""`python -m fer_train [train | evaluate | predict | export | curves | presets | selfcheck] ...`; no subcommand:
train the default preset (ResNet-18 + Mish + ABP on the built-in synthetic faces) and report its test results."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from fer_train.config import DATASETS, PRESETS, build_config, parse_overrides
from fer_train.errors import ConfigError, DataError

_SHORTCUTS = {  # flag -> config key, for what is set most often
    "steps": "train.steps", "batch_size": "train.batch_size", "micro_batch": "train.micro_batch",
    "lr": "optim.lr", "optimizer": "optim.name", "arch": "model.arch", "device": "train.device",
    "amp": "train.amp", "image_size": "data.image_size", "backend": "data.backend", "workers": "data.workers",
    "eval_every": "train.eval_every", "seed": "train.seed", "out": "train.out", "time_budget": "train.time_budget",
}


def _data_flags(parser: argparse.ArgumentParser) -> None:
    for name in DATASETS:
        parser.add_argument(f"--{name.replace('_', '-')}", metavar="DIR", dest=name,
                            help=f"the {name} folder (its on-disk layout: docs/method.md section 7)")


def _parser() -> argparse.ArgumentParser:
    prog = "fer-train" if os.path.basename(sys.argv[0]) == "fer-train" else "python -m fer_train"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser("train", help="train a model (the default command)",
                                description="Train with a preset, a config file (TOML or YAML: sections data, model, "
                                            "optim, train) and overrides, in that order of precedence. Under "
                                            "torchrun every process trains one shard (DDP).")
    train.add_argument("--preset", default="default", help="one of `python -m fer_train presets` (default: default)")
    train.add_argument("--config", metavar="FILE", help="a .toml / .yaml file of settings")
    _data_flags(train)
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="any setting, e.g. --set optim.betas=0.9,0.98 --set data.class_weights=eq4")
    for flag, key in _SHORTCUTS.items():
        train.add_argument(f"--{flag.replace('_', '-')}", dest=flag, metavar=key.split(".")[1].upper(),
                           help=f"sets {key}")
    train.add_argument("--compile", action="store_true", default=None, help="sets train.compile (torch.compile)")
    train.add_argument("--resume", metavar="RUN_OR_CHECKPOINT",
                       help="continue a run from its last.pt (or the given .pt) with its settings; --set and the "
                            "flags above still apply, e.g. --steps to train longer")
    train.add_argument("--stop-after", type=int, metavar="N",
                       help="stop with a checkpoint after N steps of this session (to split a run)")
    train.add_argument("--overwrite", action="store_true",
                       help="delete the files of a run already in --out first (without it, such a folder is an error)")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint: accuracy and confusion matrices",
                                   description="Evaluate a checkpoint on the test splits of the given data sets (the "
                                               "run's own when none is given; --synthetic for the built-in set).")
    evaluate.add_argument("checkpoint", help="a .pt file or a run folder (its best.pt, else last.pt)")
    _data_flags(evaluate)
    evaluate.add_argument("--synthetic", action="store_true", help="the built-in synthetic set's test split")
    evaluate.add_argument("--out", metavar="DIR", help="where the CSV / PNG / summary go (default: beside the "
                                                       "checkpoint, in eval-<time>/)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--batch-size", type=int, default=None,
                          help="images per batch (default: the run's train.eval_batch_size, as its own evaluations)")
    evaluate.add_argument("--backend", default=None, help="data.backend: auto, dali or torch")
    evaluate.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default=None,
                          help="autocast for the evaluation (default: the run's train.amp, so that the numbers are "
                               "the ones the run reported; none: float32)")
    evaluate.add_argument("--tta", action="store_true",
                          help="also report each split with horizontal-flip test-time augmentation (the mean of the "
                               "two passes' probabilities)")

    _predict_parser(commands)
    export = commands.add_parser("export", help="write a model as ONNX (standard operators, metadata for predict)",
                                 description="Write a run's model as an ONNX file: the unfused model (standard "
                                             "operators), outputs logits and calibrated probabilities, the class "
                                             "names, input transform and temperature in its metadata; checked "
                                             "against PyTorch in onnxruntime.")
    export.add_argument("checkpoint", help="a .pt file or a run folder (its best.pt, else last.pt)")
    export.add_argument("--output", "-o", required=True, metavar="FILE.onnx")

    curves = commands.add_parser("curves", help="draw runs' training curves (also of a run still training)",
                                 description="Draw the loss, evaluation accuracy and macro-F1, learning rate and "
                                             "images/s over the steps of one run, or of several side by side, from "
                                             "their metrics.jsonl. Every run draws its own at the end "
                                             "(training-curves.png); this also draws one still training.")
    curves.add_argument("runs", nargs="+", metavar="RUN", help="a run folder or its metrics.jsonl")
    curves.add_argument("--output", "-o", metavar="FILE.png",
                        help="where the PNG goes (default for one run: training-curves.png in its folder; "
                             "needed for several)")

    commands.add_parser("presets", help="list the presets (the paper's runs)")
    commands.add_parser("selfcheck", help="check this installation: kernels against the reference, a short training")
    return parser


def _overrides(args) -> dict:
    items = list(args.set)
    items += [f"{key}={getattr(args, flag)}" for flag, key in _SHORTCUTS.items() if getattr(args, flag) is not None]
    items += [f"data.{name}={getattr(args, name)}" for name in DATASETS if getattr(args, name) is not None]
    if args.compile:
        items.append("train.compile=true")
    return parse_overrides(items)


def _run_dir(config) -> Path:
    if config.train.out:
        return Path(config.train.out)
    return Path("runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{config.preset}"


# Settings a resumed run must keep: the model and optimizer they describe are what the checkpoint holds.
_KEPT_ON_RESUME = {"model": ("arch", "act", "booster"), "optim": ("name",)}


def train(args, started: float | None = None) -> int:
    from fer_train import checkpoint, run_folder
    from fer_train.distributed import end_distributed
    from fer_train.engine import NonFiniteLoss, Trainer

    overrides = _overrides(args)
    resume = None
    if args.resume:
        resume = checkpoint.load(args.resume)
        saved = checkpoint.saved_settings(resume["config"])
        for section, keys in _KEPT_ON_RESUME.items():
            for key in keys:
                asked = overrides.get(section, {}).get(key)
                if asked is not None and str(asked) != str(saved[section][key]):
                    raise ConfigError(f"--resume: {resume['path']} was trained with {section}.{key}="
                                      f"{saved[section][key]}; a resumed run keeps it (drop {section}.{key}={asked}, "
                                      f"or start a new run)")
        for section, values in overrides.items():
            saved.setdefault(section, {}).update(values)
        config = build_config(resume["config"]["preset"], overrides=saved)
        run_dir = Path(resume["path"]).parent
    else:
        config = build_config(args.preset, args.config, overrides)
        run_dir = _run_dir(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone owns the folder
        run_folder.prepare(run_dir, overwrite=args.overwrite, resume=resume is not None)
    try:
        outcome = Trainer(config, run_dir, resume=resume, stop_after=args.stop_after, started=started).fit()
        end_distributed(barrier=True)  # every rank ends its fit at the same step
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        end_distributed()
    if outcome["stopped"] in ("SIGTERM", "SIGINT"):
        return 128 + {"SIGTERM": 15, "SIGINT": 2}[outcome["stopped"]]
    return 0


def _checkpoint_path(path: str) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    return path


def evaluate(args) -> int:
    from fer_train import checkpoint
    from fer_train.data import build_loader
    from fer_train.distributed import select_device
    from fer_train.factories import amp_dtype
    from fer_train.reports import evaluate_and_report
    from fer_train.run_data import open_run_data

    path = _checkpoint_path(args.checkpoint)
    device = select_device(args.device)
    loaded = checkpoint.load_model(path, device)
    model, config = loaded.model, loaded.config
    given = {name: getattr(args, name) for name in DATASETS if getattr(args, name)}
    if given or args.synthetic:
        for name in DATASETS:
            setattr(config.data, name, given.get(name))
    if args.backend:
        config.data.backend = args.backend
    # the run's autocast by default (docs/method.md section 8): a checkpoint evaluated in float32 after bfloat16
    # training differs from the run's own report by a few images
    amp = args.amp or config.train.amp
    dtype = amp_dtype(amp, device)
    # the run's own batch by default: under autocast another batch size may take other kernels, other roundings
    batch_size = config.train.eval_batch_size if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    data = open_run_data(config)
    if not data.test:
        raise ConfigError(f"nothing to evaluate: {path}'s run had no test split, and none was given (--ferplus DIR, "
                          "--affectnet DIR, --rafdb DIR or --synthetic)")
    out = Path(args.out) if args.out else path.parent / f"eval-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)

    loaders = []

    def loader_for(name, dataset):
        loaders.append(build_loader(dataset, batch_size, False, config.data.image_size, device,
                                    config.data.backend, num_workers=config.data.workers,
                                    channels_last=config.train.channels_last, crop=config.data.crop))
        return loaders[-1]

    _, table = evaluate_and_report(model, data.test, loader_for, out, f"{path}: test results", device=device,
                                   amp_dtype=dtype, channels_last=config.train.channels_last,
                                   temperature=loaded.temperature, tta_rows=args.tta)
    for loader in loaders:
        loader.close()  # now: at the process's end DALI would wait for each worker in turn
    precision = "float32" if dtype is None else f"{str(dtype).replace('torch.', '')} autocast"
    print(f"{path}, step {loaded.step}, {precision} (amp={amp}):\n{table}")
    print(f"confusion matrices and summary: {out}")
    return 0


def _predict_parser(commands) -> None:
    from fer_train.inference import DETECTORS, MAX_SIDE

    predict = commands.add_parser(
        "predict", help="find the faces in images and videos and classify their expressions",
        description="Find every face in images and videos (a detector), classify each (the model, calibrated "
                    "probabilities) and write one row per face; videos: faces tracked across frames, smoothed over "
                    "time. docs/inference.md describes the choices and the outputs.")
    predict.add_argument("checkpoint", help="a .pt file, a run folder (its best.pt, else last.pt) or an exported .onnx")
    predict.add_argument("inputs", nargs="+", help="image and video files, or folders (searched recursively)")
    predict.add_argument("--output", "-o", default="-", help="a .csv, .json or .jsonl file; - for JSON on stdout")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument("--batch-size", type=int, default=64, help="images (video frames) per detector pass and "
                                                                    "faces per classifier pass (default: 64)")
    predict.add_argument("--whole-image", action="store_true",
                         help="each image is one face, already cropped (no detection)")
    predict.add_argument("--detector", default="centerface", choices=DETECTORS, help="(default: centerface)")
    predict.add_argument("--threshold", type=float, help="detector confidence threshold (default: the detector's, "
                                                         "0.3 for centerface)")
    predict.add_argument("--detect-size", type=int, default=MAX_SIDE, metavar="PIXELS",
                         help=f"longest side the detector sees; larger images are shrunk for detection only "
                              f"(default: {MAX_SIDE}; smaller is faster, larger finds smaller faces)")
    predict.add_argument("--margin", type=float, help="crop margin around the detected box (default: the measured one)")
    predict.add_argument("--no-align", action="store_true", help="do not turn faces to level the eyes")
    predict.add_argument("--annotate", metavar="DIR", help="write copies with boxes and labels drawn: STEM.jpg, STEM.mp4")
    predict.add_argument("--report", metavar="DIR", help="per video: a timeline PNG per face (STEM.track-ID.png) and "
                                                        "a summary of its expressions (STEM.summary.md, .json)")
    predict.add_argument("--every", type=int, default=1, metavar="N", help="videos: process every Nth frame")
    predict.add_argument("--smooth", type=float, default=0.5, metavar="SECONDS",
                         help="videos: time constant of each face's probability smoothing (0: none; default 0.5)")
    predict.add_argument("--strict", action="store_true", help="stop at the first file that cannot be read "
                                                               "(default: report it and go on)")


def predict(args) -> int:
    from pathlib import Path

    from fer_train.inference import FaceExpressionRecognizer
    from fer_train.inference.outputs import check_folder, check_output
    from fer_train.inference.predict import Options, collect_inputs, predict_files, summary_line

    # every setting is checked before the model loads
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--every", args.every, 1),
                             ("--detect-size", args.detect_size, 32)):
        if value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    if not args.smooth >= 0:
        raise ConfigError(f"--smooth {args.smooth}: must be 0 (no smoothing) or a positive number of seconds")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise ConfigError(f"--threshold {args.threshold}: must be between 0 and 1")
    check_output(args.output)
    for flag in ("annotate", "report"):
        if getattr(args, flag):
            check_folder(getattr(args, flag), f"--{flag} {getattr(args, flag)}")
    images, videos = collect_inputs(args.inputs)
    recognizer = FaceExpressionRecognizer(args.checkpoint, detector=args.detector, device=args.device,
                                          threshold=args.threshold, margin=args.margin, align=not args.no_align,
                                          batch_size=args.batch_size, detect_size=args.detect_size)
    options = Options(output=args.output, whole_image=args.whole_image, strict=args.strict, every=args.every,
                      smooth=args.smooth, batch_size=args.batch_size,
                      annotate=Path(args.annotate) if args.annotate else None,
                      report=Path(args.report) if args.report else None)
    counts = predict_files(recognizer, images, videos, options)
    print(summary_line(counts, args.output), file=sys.stderr)
    return 0


def export(args) -> int:
    from fer_train import checkpoint
    from fer_train.export import export_onnx

    loaded = checkpoint.load_model(_checkpoint_path(args.checkpoint), "cpu")
    path, difference = export_onnx(loaded, args.output)
    print(f"{path}: {len(loaded.classes)} classes, input {loaded.input_transform['size']} px; onnxruntime vs PyTorch: "
          f"max probability difference {difference:.2g}", file=sys.stderr)
    return 0


def curves(args) -> int:
    from fer_train.reports import write_training_curves
    from fer_train.runlog import read_metrics

    runs, folders = {}, []
    for given in args.runs:
        path = Path(given)
        metrics = path / "metrics.jsonl" if path.is_dir() else path
        if not metrics.is_file():
            raise ConfigError(f"curves: {given}: no metrics.jsonl there (give a run folder or its metrics.jsonl)")
        label = metrics.parent.name if metrics.parent.name not in runs else given  # two folders of one name
        runs[label] = read_metrics(metrics)
        folders.append(metrics.parent)
    if args.output is None and len(runs) > 1:
        raise ConfigError("curves: several runs need --output FILE.png")
    output = Path(args.output) if args.output else folders[0] / "training-curves.png"
    if output.suffix.lower() != ".png" or output.is_dir():
        raise ConfigError(f"curves: --output {output}: give a file name ending in .png")
    print(write_training_curves(runs, output))
    return 0


def presets() -> int:
    width = max(map(len, PRESETS))
    for name, (description, _) in PRESETS.items():
        print(f"{name:<{width}}  {description}")
    print("\nThe table presets set the model, optimizer and class weights of the paper's rows; give the data "
          "with --affectnet / --ferplus / --rafdb / --facial-expressions.")
    return 0


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The command line; `started` (a time.perf_counter() reading) is when the command began: a training run's
    time budget counts from it, the start-up included."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    if argv[0] == "selfcheck":  # its own flags
        from fer_train.selfcheck import main as selfcheck
        return selfcheck(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return train(args, started)
        if args.command == "evaluate":
            return evaluate(args)
        if args.command == "predict":
            return predict(args)
        if args.command == "export":
            return export(args)
        if args.command == "curves":
            return curves(args)
        return presets()
    except (ConfigError, DataError) as err:
        # bad settings, paths and data: one line naming what is wrong; anything else is a bug and keeps its
        # traceback (exit status 1)
        print(f"error: {err}", file=sys.stderr)
        return 2
