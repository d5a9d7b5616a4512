"""fer_train.data: from image files on disk to normalised, augmented (and FMix-mixed) batches on the device.

Data flows one way: files -> readers -> pipelines -> the engine.
- base: CLASSES, Record, FERDataset (one split of one set), CombinedDataset, DataError.
- images: image headers, the checks made when a set is opened, and the one image decoder.
- readers: open_dataset(name, root, split, **options), one module per set (AffectNet, FERPlus, RAF-DB,
  facial_expressions, the built-in synthetic faces).
- splits: class_weights (docs/method.md eq. 3 / eq. 4), mixed_split (the mixed evaluation split).
- pipeline (the shared base: bad images met mid-run, input worker processes), dali_pipeline, torch_pipeline,
  order, and loader.build_loader, which picks DALI for a GPU where it is installed and the PyTorch pipeline
  elsewhere; both give a sample the same pixels and the same augmentation.
"""

from fer_train.data.base import CLASSES, CombinedDataset, FERDataset, Record
from fer_train.data.dali_pipeline import dali_available
from fer_train.data.loader import Loader, MixedTargets, build_loader
from fer_train.data.pipeline import InputWorkerError
from fer_train.data.readers import open_dataset
from fer_train.data.splits import class_weights, mixed_split
from fer_train.errors import DataError

__all__ = ["CLASSES", "CombinedDataset", "DataError", "FERDataset", "InputWorkerError", "Loader", "MixedTargets",
           "Record", "build_loader", "class_weights", "dali_available", "mixed_split", "open_dataset"]
