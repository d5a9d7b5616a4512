"""fer_train.data: from image files on disk to normalised, augmented (and FMix-mixed) batches on the device.

- open_dataset(name, root, split, **options): one split of AffectNet, FERPlus, RAF-DB, facial_expressions
  or the built-in synthetic set, with labels mapped to CLASSES (datasets.py, synthetic.py).
- CombinedDataset, class_weights (SPEC eq. 3 / eq. 4), mixed_split (the mixed evaluation split).
- build_loader(datasets, batch_size, train, ...): the DALI pipeline where nvidia-dali is installed, the
  PyTorch one elsewhere, both giving a sample the same augmentation (loader.py).
"""

from fer_train.data.dali_pipeline import dali_available
from fer_train.data.datasets import (CLASSES, CombinedDataset, DataError, FERDataset, Record, class_weights,
                                     mixed_split, open_dataset)
from fer_train.data.loader import BACKENDS, Loader, MixedTargets, build_loader

__all__ = ["BACKENDS", "CLASSES", "CombinedDataset", "DataError", "FERDataset", "Loader", "MixedTargets", "Record",
           "build_loader", "class_weights", "dali_available", "mixed_split", "open_dataset"]
