"""The pipeline for machines without DALI: torchvision decodes (JPEG on the GPU where there is one), and
the augmentation of docs/method.md section 6 runs on the device as one fused pass (fer_kernels.augment).

DataLoader workers read the files (and decode what the GPU cannot: PNG, WebP, JPEGs other than plain
upright grey or YCbCr ones, or everything on a CPU machine); the main process decodes the batch's JPEGs on
the GPU, draws each sample's parameters from (seed, epoch, index) and writes the normalised batch with one
kernel. On a CPU machine the workers also augment, so they share that work as they share decoding. Without
workers (data.workers=0, the default on a CPU, where workers would only compete with the training step for
its cores) the main process keeps what it decodes (up to data.decoded_cache_mb), so every epoch after the
first neither reads nor decodes, and a batch costs its augmentation pass alone. Images
that cannot be read are replaced or raise in the main process (fer_train.data.pipeline); the workers
ignore stop signals sent to the process group (shield_worker), and the main process waits at most
`timeout` seconds for a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import time

import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from fer_train.data.images import ImageError, decode, parse_header
from fer_train.data.pipeline import Pipeline, shield_worker, stack_targets, starting_workers, worker_failure
from fer_train.recipe.augmentation import apply, full_boxes

__all__ = ["TorchPipeline"]


@dataclasses.dataclass
class _Item:
    data: torch.Tensor  # decoded uint8 C x H x W, or the encoded bytes of a JPEG left for the GPU
    encoded: bool
    box: tuple | None
    path: str | None

    def pin_memory(self) -> _Item:
        """The DataLoader's pin_memory calls this for each item a worker sends towards a GPU: its data is then
        copied to the device asynchronously (unpinned, each copy waits for the host)."""
        return dataclasses.replace(self, data=self.data.pin_memory())


class _Fetch:
    """DataLoader worker side: one batch of samples, read and (unless left to the GPU) decoded; for a CPU
    batch also augmented (`augment_epoch` set). Gives (images or items, the samples' targets, failures), or
    (None, None, failures) when the batch cannot be made (Pipeline.read)."""

    def __init__(self, pipeline: TorchPipeline, gpu_jpeg: bool, augment_epoch: int | None = None):
        self.pipeline, self.gpu_jpeg, self.augment_epoch = pipeline, gpu_jpeg, augment_epoch

    def __call__(self, batch):
        indices, repeats = batch  # the samples and how often each was drawn before in the epoch
        items, targets, failures = [], [], []
        for index in indices.tolist():
            loaded, met = self.pipeline.read(index, self._load)
            failures += met
            if loaded is None:
                return None, None, failures
            items.append(loaded[0])
            targets.append(loaded[1])
        if self.augment_epoch is not None:
            return self.pipeline.augment([it.data for it in items], items, indices, self.augment_epoch, repeats), \
                targets, failures
        return items, targets, failures

    def _load(self, part, local, record) -> tuple[_Item, torch.Tensor]:
        target = self.pipeline.target(record)
        if record.path is None:  # generated (synthetic): the data set draws it
            return _Item(part.image(local), False, None, None), target
        cache = self.pipeline.decoded
        item = cache.get((id(part), local))
        if item is None:
            item = self._read(part, local, record)
            if not item.encoded and self.pipeline.keep_decoded(item.data):
                cache[(id(part), local)] = item
        return item, target

    def _read(self, part, local, record) -> _Item:
        data = part.encoded(local)
        header = parse_header(data)
        # the GPU decoder reads plain JPEGs as decode() does, but applies no EXIF orientation
        if self.gpu_jpeg and header is not None and header.format == "jpeg" and header.plain and \
                header.orientation == 1 and (part.max_image_pixels is None or header.pixels <= part.max_image_pixels):
            return _Item(torch.frombuffer(bytearray(data), dtype=torch.uint8), True, record.box, record.path)
        return _Item(decode(data, record.path, part.max_image_pixels), False, record.box, record.path)


class TorchPipeline(Pipeline):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Decoded images by (data set, index), kept when the main process reads (no workers): worker processes
        # end with each epoch, and their copies with them. A file changed after it was kept is not read again.
        self.decoded: dict[tuple[int, int], _Item] = {}
        self._decoded_bytes = 0

    def keep_decoded(self, image: torch.Tensor) -> bool:
        """Whether `image` is kept: read in the main process and within what is left of the decoded cache
        (then it counts against it)."""
        size = image.numel() * image.element_size()
        if self.num_workers > 0 or self._decoded_bytes + size > self.decoded_cache_mb * 2 ** 20:
            return False
        self._decoded_bytes += size
        return True

    def __iter__(self):
        batches = list(zip(self.order.batches(self.epoch), self.order.batch_repeats(self.epoch)))[self.position:]
        gpu = self.device.type == "cuda"
        # On the CPU the workers augment too. One thread each: beside the other busy processes, two OpenMP
        # threads made its small per-image ops 50x slower (measured: 1.4 s against 27 ms for 16 images).
        fetch = _Fetch(self, gpu_jpeg=gpu, augment_epoch=None if gpu else self.epoch)
        workers = self.num_workers > 0
        loader = DataLoader(batches, batch_size=None, collate_fn=fetch, num_workers=self.num_workers, pin_memory=gpu,
                            prefetch_factor=4 if workers else None, timeout=self.timeout if workers else 0,
                            worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers else None)
        with starting_workers():
            iterator = iter(loader)
        for indices, repeats in batches:
            start = time.monotonic()
            try:
                batch, targets, failures = next(iterator)
            except RuntimeError as err:  # a timeout, a worker's death, or an error in a worker (re-raised)
                processes = getattr(iterator, "_workers", [])  # DataLoader's worker processes (not public)
                failure = worker_failure("PyTorch", processes, time.monotonic() - start, self.timeout) \
                    if workers else None
                if failure is None:
                    raise
                for process in processes:  # a stopped worker cannot exit: the interpreter would wait for it
                    if process.exitcode is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(process.pid, signal.SIGCONT)
                raise failure from err
            self.note(failures, complete=batch is not None)
            if gpu:
                batch = self.augment(self._decode(batch, indices, targets), batch, indices, self.epoch, repeats)
            self.position += 1
            yield batch, stack_targets(targets).to(self.device, non_blocking=True)
        self.epoch, self.position = self.epoch + 1, 0

    def augment(self, images: list[torch.Tensor], items: list[_Item], indices, epoch: int,
                repeats=None) -> torch.Tensor:
        """The normalised batch of decoded `images` (the samples `indices` of `epoch`, drawn `repeats` times
        before in it: Pipeline.params)."""
        sizes = torch.tensor([im.shape[1:] for im in images])
        boxes = torch.where(torch.tensor([it.box is not None for it in items])[:, None],
                            torch.tensor([it.box or (0, 0, 0, 0) for it in items], dtype=torch.float64),
                            full_boxes(sizes))
        return apply(images, self.params(boxes, indices, epoch, repeats), self.out_dtype, self.channels_last)

    def _decode(self, items: list[_Item], indices, targets: list[torch.Tensor]) -> list[torch.Tensor]:
        images = [None] * len(items)
        jpegs = [k for k, it in enumerate(items) if it.encoded]
        if jpegs:
            # nvJPEG's hardware decoder does not wait for the work queued on the stream it is given: it can write
            # into blocks the caching allocator handed out again while queued kernels (the last step's) still read
            # them, silently (pytorch/vision#9606; torchcodec drains the stream the same way). Drained first.
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            try:
                decoded = decode_jpeg([items[k].data for k in jpegs], mode=ImageReadMode.UNCHANGED, device=self.device)
            except RuntimeError:
                # the GPU decoder refuses the batch: decode each on the CPU to find the file, which is then
                # replaced or raises as in the workers
                decoded = [self._cpu_decode(items, targets, k, int(indices[k])) for k in jpegs]
            for k, image in zip(jpegs, decoded):
                images[k] = image
        for k, it in enumerate(items):
            if not it.encoded:
                images[k] = it.data.to(self.device, non_blocking=True)
        return images

    def _cpu_decode(self, items: list[_Item], targets: list[torch.Tensor], k: int, index: int) -> torch.Tensor:
        """Item k (sample `index`) decoded on the CPU, or the sample that stands in for it (replacing its
        item and target)."""
        item = items[k]
        try:
            return decode(item.data, item.path, self.sample(index)[0].max_image_pixels).to(self.device)
        except ImageError as err:
            failure = index, err.reason, str(err)
        self.note([failure])  # raises, or counts it and the next sample that reads stands in
        self._failed[index] = failure
        loaded, failures = self.read(index, _Fetch(self, gpu_jpeg=False)._load)
        self.note(failures, complete=loaded is not None)
        items[k], targets[k] = loaded
        return loaded[0].data.to(self.device)


def _worker_init(main: int, worker_id: int) -> None:
    shield_worker(main)
    # Batches reach the main process through shared-memory files it opens by name. The default, passing file
    # descriptors, has the main process ask the worker for each one while it unpickles a batch: a worker
    # stopped (SIGSTOP, Ctrl-Z, a debugger) with a batch in the queue would hang the main process there,
    # beyond the reach of data.timeout, instead of ending the wait with the worker's state.
    torch.multiprocessing.set_sharing_strategy("file_system")
