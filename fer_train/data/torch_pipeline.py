"""The pipeline for machines without DALI: torchvision decodes (JPEG on the GPU where there is one), and
the augmentation of docs/method.md section 6 runs on the device as one fused pass (fer_kernels.augment).

DataLoader workers read the files (and decode what the GPU cannot: PNG, WebP, or everything on a CPU
machine); the main process decodes the batch's JPEGs on the GPU, draws each sample's parameters from
(seed, epoch, index) and writes the normalised batch with one kernel. On a CPU machine the workers also
augment, so they share that work as they share decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from fer_train.errors import DataError
from fer_train.data.images import decode
from fer_train.data.pipeline import Pipeline, stack_targets
from fer_train.recipe.augmentation import apply, full_boxes

__all__ = ["TorchPipeline"]

_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class _Item:
    data: torch.Tensor  # decoded uint8 C x H x W, or the encoded bytes of a JPEG left for the GPU
    encoded: bool
    box: tuple | None
    path: str | None


class _Fetch:
    """DataLoader worker side: one batch of samples, read and (unless left to the GPU) decoded; for a CPU
    batch also augmented (`augment_epoch` set)."""

    def __init__(self, pipeline: TorchPipeline, gpu_jpeg: bool, augment_epoch: int | None = None):
        self.pipeline, self.gpu_jpeg, self.augment_epoch = pipeline, gpu_jpeg, augment_epoch

    def __call__(self, indices):
        items, targets = [], []
        for index in indices:
            part, local, record = self.pipeline.sample(index)
            if record.path is None:  # generated (synthetic): the data set draws it
                items.append(_Item(part.image(local), False, None, None))
            else:
                data = torch.frombuffer(bytearray(part.encoded(local)), dtype=torch.uint8)
                if self.gpu_jpeg and bytes(data[:3]) == _JPEG_MAGIC:
                    items.append(_Item(data, True, record.box, record.path))
                else:
                    items.append(_Item(decode(data, record.path), False, record.box, record.path))
            targets.append(self.pipeline.target(record))
        if self.augment_epoch is not None:
            return self.pipeline.augment([it.data for it in items], items, indices, self.augment_epoch), \
                stack_targets(targets)
        return items, stack_targets(targets)


class TorchPipeline(Pipeline):
    def __iter__(self):
        batches = self.order.batches(self.epoch)[self.position:]
        gpu = self.device.type == "cuda"
        # On the CPU the workers augment too. One thread each: beside the other busy processes, two OpenMP
        # threads made its small per-image ops 50x slower (measured: 1.4 s against 27 ms for 16 images).
        fetch = _Fetch(self, gpu_jpeg=gpu, augment_epoch=None if gpu else self.epoch)
        loader = DataLoader(batches, batch_size=None, collate_fn=fetch, num_workers=self.num_workers, pin_memory=gpu,
                            prefetch_factor=4 if self.num_workers else None)
        for indices, (batch, targets) in zip(batches, loader):
            if gpu:
                batch = self.augment(self._decode(batch), batch, indices, self.epoch)
            self.position += 1
            yield batch, targets.to(self.device, non_blocking=True)
        self.epoch, self.position = self.epoch + 1, 0

    def augment(self, images: list[torch.Tensor], items: list[_Item], indices, epoch: int) -> torch.Tensor:
        """The normalised batch of decoded `images` (the samples `indices` of `epoch`)."""
        sizes = torch.tensor([im.shape[1:] for im in images])
        boxes = torch.where(torch.tensor([it.box is not None for it in items])[:, None],
                            torch.tensor([it.box or (0, 0, 0, 0) for it in items], dtype=torch.float64),
                            full_boxes(sizes))
        return apply(images, self.params(boxes, indices, epoch), self.out_dtype, self.channels_last)

    def _decode(self, items: list[_Item]) -> list[torch.Tensor]:
        images = [None] * len(items)
        jpegs = [k for k, it in enumerate(items) if it.encoded]
        if jpegs:
            try:
                decoded = decode_jpeg([items[k].data for k in jpegs], mode=ImageReadMode.UNCHANGED, device=self.device)
            except RuntimeError as err:
                paths = [items[k].path for k in jpegs]
                raise DataError(f"cannot decode one of {paths} on {self.device} ({err})") from err
            for k, image in zip(jpegs, decoded):
                images[k] = image
        for k, it in enumerate(items):
            if not it.encoded:
                images[k] = it.data.to(self.device, non_blocking=True)
        return images
