"""The data of a run: the training set, the splits watched during training, the splits reported at the end,
and the mixed evaluation split, all opened and checked before training starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fer_train.config import DATASETS, RunConfig
from fer_train.data import CombinedDataset, mixed_split, open_dataset
from fer_train.data.readers import ferplus

__all__ = ["MIXED_POOL", "RunData", "TEST", "VALIDATION", "open_run_data"]

# Each set's splits (docs/method.md sections 7-8): the one watched during training, the ones reported at the
# end, and the ones pooled into the mixed evaluation. RAF-DB has no validation split: it is seen during
# training only through mixed-val; facial_expressions is training data only.
VALIDATION = {"affectnet": "val", "ferplus": "valid", "synthetic": "val"}
TEST = {"affectnet": ("val",), "ferplus": ("valid", "test"), "rafdb": ("test",), "synthetic": ("test",)}
MIXED_POOL = {"affectnet": ("val",), "ferplus": ("valid", "test"), "rafdb": ("test",)}


@dataclass
class RunData:
    """The training set and the evaluation sets of a run, opened and checked before training starts."""

    train: object
    selection: tuple[str, object] | None  # (name, data set) whose accuracy picks best.pt
    validation: dict[str, object] = field(default_factory=dict)  # evaluated every eval_every steps
    test: dict[str, object] = field(default_factory=dict)  # evaluated with the best model at the end
    missing: list[str] = field(default_factory=list)  # the splits a set has that are not on disk, said aloud


def _open(name: str, root, split: str, config) -> object:
    d = config.data
    if name == "synthetic":
        length = d.synthetic_length if split == "train" else d.synthetic_eval_length
        return open_dataset("synthetic", None, split, size=d.synthetic_size, length=length, on_error=d.on_error)
    # FERPlus's evaluation protocol is its majority labels whatever the training labels are (docs/method.md
    # section 8): a model trained on vote distributions is compared with the others on the same images.
    options = {"label_mode": d.ferplus_label_mode if split == "train" else "majority"} if name == "ferplus" else {}
    return open_dataset(name, root, split, on_error=d.on_error, max_image_pixels=d.max_image_pixels, **options)


def _has_split(root: Path, name: str, split: str) -> bool:
    """Whether a test or validation split is on disk (FERPlus copies often lack FER2013Test)."""
    if name == "ferplus":
        return (root / ferplus.FOLDERS[split] / "label.csv").is_file()
    return True


def open_run_data(config: RunConfig) -> RunData:
    """The configured sets (or the synthetic one), their evaluation splits and the mixed split."""
    roots = {name: Path(getattr(config.data, name)) for name in DATASETS if getattr(config.data, name)}
    if not roots:
        roots = {"synthetic": None}
    parts = [_open(name, root, "train", config) for name, root in roots.items()]
    train = parts[0] if len(parts) == 1 else CombinedDataset(parts)
    data = RunData(train, None)
    splits = {(name, split) for name in roots for split in TEST.get(name, ()) + ((VALIDATION[name],) if name in
                                                                                 VALIDATION else ())}
    opened = {(name, split): _open(name, roots[name], split, config) for name, split in sorted(splits)
              if roots[name] is None or _has_split(roots[name], name, split)}
    data.missing = [f"{name} {split} (no {ferplus.FOLDERS[split]}/label.csv under {roots[name]})"
                    for name, split in sorted(splits) if (name, split) not in opened]
    for name in roots:
        if (name, VALIDATION.get(name)) in opened:
            data.validation[f"{name} {VALIDATION[name]}"] = opened[name, VALIDATION[name]]
        for split in TEST.get(name, ()):
            if (name, split) in opened:
                data.test[f"{name} {split}"] = opened[name, split]
    pooled = [opened[name, split] for name in roots for split in MIXED_POOL.get(name, ()) if (name, split) in opened]
    if len({d.name for d in pooled}) > 1:  # the mixed evaluation needs sets to mix
        mixed_val, mixed_test = mixed_split(pooled, config.data.split_seed)
        data.validation = {"mixed val": mixed_val, **data.validation}
        data.test = {"mixed test": mixed_test, **data.test}
    if data.validation:
        data.selection = next(iter(data.validation.items()))
    return data
