"""The NVIDIA DALI pipeline: decode, face crop, resize / centre crop, grey to RGB, flip, rotation + shear
with a mirrored border, colour jitter and normalisation, from the files of any fer_train data set.

A parallel external source reads each batch's files in Python worker processes and draws each
sample's parameters exactly as the PyTorch pipeline does (fer_train.data.pipeline.Pipeline.params, from
(seed, epoch, index)): resize, crop, face box, flip, rotation, shear and the optional random crop (zoom
and shift) become one matrix, so DALI does the geometry as a single warp of the decoded image (one pass at
the output size instead of one per step).

On the CPU (device_id=None) the graph is all DALI: decode; the colour jitter as one linear map of each
pixel's RGB at the source's resolution (48 x 48 for FERPlus: 20x fewer pixels than the output, which
made colour 4x cheaper than DALI's hsv after the warp, measured); warp_perspective with a "reflect"
border; crop_mirror_normalize. The linear map composes brightness, contrast about the mean grey,
saturation and a hue rotation about the grey axis, clamping once at the end: it departs from the specification
(fer_kernels.reference.augment: HSV hue, a clamp after each step) by about 0.026 of the [0, 1] range on
average at the largest hue shift, less on the pale colours of faces. On a GPU, DALI decodes on the device (nvJPEG,
"mixed") and the fused kernel of fer_kernels.augment does the rest exactly.

DALI decodes what fer_train.data.images.decode decodes, to the pixel: a worker checks each file with decode()
the first time it sees its bytes, so that both pipelines refuse the same files (DALI reads a JPEG with a
corrupt body without a word), and hands DALI a lossless PNG of decode()'s pixels for the kinds DALI reads
otherwise (CMYK JPEG, extended WebP: Header.plain). Failures come back with the batch as a sixth output
(fer_train.data.pipeline). The workers ignore stop signals sent to the process group (shield_worker); a
timer bounds the wait for a batch; a script read from standard input, which spawned workers cannot import,
is read in the main process.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import sys
import threading
import time
import zlib

import numpy as np
import torch
from torchvision.io import encode_png

from fer_train.data.images import decode, parse_header
from fer_train.errors import DataError
from fer_train.data.pipeline import (Pipeline, is_stopped, shield_worker, stack_targets, starting_workers,
                                     worker_failure)
from fer_train.recipe.augmentation import AugmentParams, apply, full_boxes


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def linear_colour(colour: torch.Tensor) -> torch.Tensor:
    """N x 3 x 3 maps of RGB for the (brightness, contrast, saturation, hue) rows of `colour`, without the
    contrast's shift toward the mean grey (added in the graph, where the image is decoded): contrast and
    brightness scale, saturation blends with the luma grey, the hue turns about the grey axis (Rodrigues'
    rotation, the linear map closest to HSV's hue shift among the usual ones: 0.026 mean error at 0.05
    of the circle, against 0.032 for YIQ's, measured on random colours)."""
    brightness, contrast, saturation, hue = colour.double().unbind(1)
    n = colour.shape[0]
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    luma = torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64)
    blend = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * luma.expand(3, 3)[None]
    k = 3 ** -0.5
    axis = torch.tensor([[0.0, -k, k], [k, 0.0, -k], [-k, k, 0.0]], dtype=torch.float64)
    angle = 2 * torch.pi * hue
    turn = eye + torch.sin(angle)[:, None, None] * axis + (1 - torch.cos(angle))[:, None, None] * (axis @ axis)
    return (turn @ blend * (brightness * contrast)[:, None, None]).float()


_HALF = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
_NO_FAILURES = np.zeros(0, dtype=np.uint8)


class _BatchSource:
    """The external source: batch `info.iteration` of the epoch, as encoded files, targets, 3 x 3 warp
    matrices (output pixel -> source pixel), colour factors and the batch's failures (JSON bytes in the first
    sample's slot: {"complete": whether the batch could be made, "failures": [[sample, reason, message]]}).
    Runs in DALI's worker processes, or in the main process when they cannot start."""

    def __init__(self, pipeline: DaliPipeline, first_epoch: int, first_position: int, gpu: bool):
        self.pipeline, self.gpu = pipeline, gpu
        self.first_epoch, self.first_position = first_epoch, first_position
        self._epoch, self._batches, self._repeats = None, None, None
        self._main = os.getpid()
        self._checked: dict[str, tuple[int, tuple[int, int], bool]] = {}  # path -> (checksum, size, plain)

    def __setstate__(self, state):
        self.__dict__.update(state)
        if os.getpid() != self._main:  # unpickled in a worker process, as it starts
            shield_worker(self._main)

    def __call__(self, info):
        # A worker process's small tensor ops (sample parameters, drawn synthetic faces) run 20x slower with
        # two OpenMP threads beside busy neighbours (measured: 42 against 800 faces/s); DataLoader workers
        # get one thread by default, DALI's do not.
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        epoch = self.first_epoch + info.epoch_idx
        position = info.iteration + (self.first_position if info.epoch_idx == 0 else 0)
        pipeline = self.pipeline
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, pipeline.order.batches(epoch)
            self._repeats = pipeline.order.batch_repeats(epoch)
        if position >= len(self._batches):
            raise StopIteration
        indices = self._batches[position]
        files, targets, boxes, failures = [], [], [], []
        for index in indices.tolist():
            loaded, met = pipeline.read(index, self._load)
            failures += met
            if loaded is None:  # no batch: the main process raises
                files, targets, boxes = [_placeholder()] * len(indices), [torch.tensor(0)] * len(indices), \
                    [[0.0, 0.0, 1.0, 1.0]] * len(indices)
                break
            files.append(loaded[0])
            targets.append(loaded[1])
            boxes.append(loaded[2])
        params = pipeline.params(torch.tensor(boxes, dtype=torch.float64), indices, epoch, self._repeats[position])
        matrices = torch.cat([params.matrices, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(len(indices), 1, 3)], 1)
        if not self.gpu:  # DALI's warp puts pixel centres at i + 1/2, fer_kernels.augment at i
            matrices = (_HALF @ matrices.double() @ _HALF.inverse()).float()
        stacked = stack_targets(targets).numpy()
        rows = lambda a: [np.array(row) for row in a]  # noqa: E731 - one array per sample (0-d for labels)
        report = [_NO_FAILURES] * len(indices)
        if failures:
            text = json.dumps({"complete": loaded is not None, "failures": failures})
            report[0] = np.frombuffer(text.encode(), dtype=np.uint8)
        return (files, rows(stacked), rows(matrices.numpy()), rows(params.colour.numpy()),
                rows(linear_colour(params.colour).numpy()), report)

    def _load(self, part, local, record) -> tuple[np.ndarray, torch.Tensor, list[float]]:
        """(the bytes DALI decodes, the target, the face box) of one sample; ImageError if it cannot be used."""
        data = part.encoded(local)
        if record.path is None:  # drawn (synthetic): a PNG made here
            header = parse_header(data)
            file, size = np.frombuffer(data, dtype=np.uint8), (header.height, header.width)
        else:
            file, size = self._file(record.path, data, part.max_image_pixels)
        box = record.box if record.box is not None else full_boxes([size])[0].tolist()
        return file, self.pipeline.target(record), box

    def _file(self, path: str, data: bytes, max_pixels) -> tuple[np.ndarray, tuple[int, int]]:
        """(what DALI decodes for these bytes of the file at `path`, the image's size). decode() must read
        them, at the first sight of these bytes (by checksum: a file can change mid-run); a kind DALI reads
        otherwise goes as a PNG of decode()'s pixels, made again at each read (such files are rare)."""
        checksum = zlib.crc32(data)
        seen = self._checked.get(path)
        image = None
        if seen is None or seen[0] != checksum:
            image = decode(data, path, max_pixels)
            seen = self._checked[path] = checksum, tuple(image.shape[1:]), parse_header(data).plain
        if seen[2]:
            return np.frombuffer(data, dtype=np.uint8), seen[1]
        image = decode(data, path, max_pixels) if image is None else image
        return encode_png(image).numpy(), seen[1]


def _end_notify_for_the_dead(thread_id: int) -> None:
    """If the thread `thread_id` is waiting in multiprocessing.Condition.notify for a woken worker to take a
    task, ends that wait: called once every worker has exited, when none ever will. notify counts each
    sleeper's acknowledgement on the condition's _woken_count semaphore; a worker killed while it slept
    (SIGKILL, the kernel's OOM killer) never gives it, and DALI's task queue would wait for it for good (its
    own comments name the hazard). One release stands in for the dead sleeper: the queue is then used no
    more, since the pipeline's next run finds its workers gone, raises, and is rebuilt."""
    frame = sys._current_frames().get(thread_id)
    if frame is not None and frame.f_code is multiprocessing.synchronize.Condition.notify.__code__:
        frame.f_locals["self"]._woken_count.release()


def _placeholder(cache=[]) -> np.ndarray:  # noqa: B006 - made once per process
    """A 1 x 1 grey PNG: the files of a batch that could not be made, which DALI still decodes."""
    if not cache:
        cache.append(encode_png(torch.zeros(1, 1, 1, dtype=torch.uint8)).numpy())
    return cache[0]


def _workers_can_start() -> bool:
    """Whether DALI's spawned worker processes can import this program's main module, as multiprocessing's
    spawn does (by module name, else by file): not when it is a script read from standard input
    (python - < script.py, whose __file__ is "<stdin>")."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    if path is None:  # an interactive session or python -c: spawn imports nothing
        return True
    return os.path.isfile(os.path.join(getattr(multiprocessing.process, "ORIGINAL_DIR", None) or "", path))


class DaliPipeline(Pipeline):
    def __init__(self, dataset, batch_size: int, train: bool, device: torch.device, *, num_threads: int = 2,
                 **options):
        super().__init__(dataset, batch_size, train, device, **options)
        if self.out_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the DALI pipeline writes float32 or float16 batches, not {self.out_dtype}")
        self.num_threads = num_threads
        self._pipe, self._stalled = None, None

    def __getstate__(self):
        return {**self.__dict__, "_pipe": None, "_stalled": None}  # the workers get the reading side only

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        source = _BatchSource(self, self.epoch, self.position, gpu)
        s, mean, std = self.config.out_size, self.config.mean, self.config.std
        parallel = self.num_workers > 0 and _workers_can_start()
        if self.num_workers > 0 and not parallel:
            print("warning: the DALI pipeline reads its files in the main process: its worker processes would "
                  "import the main script, which was read from standard input; run it from a file to use them",
                  file=sys.stderr)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=(self.device.index or 0) if gpu else None, py_num_workers=max(self.num_workers, 1),
                      py_start_method="spawn", prefetch_queue_depth=2)
        def graph():
            files, targets, matrices, colour, colour_map, failures = fn.external_source(
                source=source, num_outputs=6, batch=True, batch_info=True, parallel=parallel)
            if gpu:  # decode on the device; fer_kernels.augment does the rest
                return (fn.decoders.image(files, device="mixed", output_type=types.RGB), targets, matrices, colour,
                        failures)
            images = fn.decoders.image(files, device="cpu", output_type=types.RGB)
            grey = fn.reductions.mean(fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY))
            # contrast pulls toward the brightened mean grey: x -> c b x + (1 - c) b m, on every channel
            shift = (1.0 - colour[1]) * colour[0] * grey
            images = fn.coord_transform(images, M=colour_map, T=fn.stack(shift, shift, shift), dtype=types.UINT8)
            images = fn.experimental.warp_perspective(images, matrix=matrices, size=(s, s), border_mode="reflect",
                                                      inverse_map=True)
            images = fn.crop_mirror_normalize(images, mean=[255 * m for m in mean], std=[255 * v for v in std],
                                              dtype=types.FLOAT16 if self.out_dtype == torch.float16 else types.FLOAT,
                                              output_layout="HWC" if self.channels_last else "CHW")
            return images, targets, failures

        self._pipe, self._stalled = graph(), None
        with starting_workers():  # the worker processes start here
            self._pipe.build()

    def __iter__(self):
        # A pipeline is built at (epoch, position) and then goes on by itself: an iteration stopped
        # early resumes, like the PyTorch pipeline's, at the first batch not handed out.
        if self._pipe is None:
            self._build()
        while True:
            try:
                outputs = self._run()
            except StopIteration:
                self._pipe.reset()
                break
            except RuntimeError as err:  # DALI's "Worker data receiving interrupted" when a worker has gone
                failure = self._stalled or worker_failure("DALI", self._workers(), None, self.timeout)
                if failure is None:
                    raise
                self._pipe = None  # its workers are gone: the next iteration builds a new one
                raise failure from err
            if self._stalled is not None:  # the batch came from a stopped worker resumed to end the wait
                failure = self._stalled
                self.close()
                raise failure
            report = np.array(outputs[-1][0])
            if report.size:
                report = json.loads(report.tobytes())
                try:
                    self.note([tuple(f) for f in report["failures"]], report["complete"])
                except DataError:
                    self._pipe = None  # it has read past this batch: a next iteration rebuilds it here
                    raise
            self.position += 1
            yield self._to_torch(outputs)
        self.epoch, self.position = self.epoch + 1, 0

    def _run(self):
        """The next batch, waiting at most `timeout` seconds for the workers: then a timer records their
        states and ends the wait, and __iter__ raises. It kills a running worker (DALI stops when a worker
        exits) but resumes a stopped one: DALI's task queue waits for a worker it wakes to take the task
        (multiprocessing.Condition.notify), so a stopped worker would hold the main process in that wait for
        good. A worker that died while it slept on the queue holds it the same way (it can never take the
        task): the timer then ends that wait itself (_end_notify_for_the_dead)."""
        workers = self._workers()
        if not workers:
            return self._pipe.run()
        start, lock, waiting = time.monotonic(), threading.Lock(), [True]
        caller = threading.get_ident()

        def stalled():
            with lock:  # not once the batch has come
                if not waiting:
                    return
                # a worker that has died is the cause, whatever else the wait looks like
                died = any(process.exitcode is not None for process in workers)
                self._stalled = worker_failure("DALI", workers, None if died else time.monotonic() - start,
                                               self.timeout)
                killed = []
                for process in workers:
                    if process.exitcode is None:
                        resume = is_stopped(process)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(process.pid, signal.SIGCONT if resume else signal.SIGKILL)
                        killed += [] if resume else [process]
                for process in killed:
                    process.join(timeout=1.0)
                if all(process.exitcode is not None for process in workers):
                    _end_notify_for_the_dead(caller)

        timer = threading.Timer(self.timeout, stalled)
        timer.daemon = True
        timer.start()
        try:
            return self._pipe.run()
        finally:
            with lock:
                waiting.clear()
            timer.cancel()

    def close(self) -> None:
        """Left to DALI, the end of the process waits up to a second for each worker to leave by itself (they
        take longer: torch is loaded in them), pipeline after pipeline: 8 s at the end of a training run. A
        SIGTERM from this process ends a worker at once (shield_worker); DALI then finds them gone.

        DALI's observer thread must see the workers end before the pipeline is dropped. Dropping it asks the
        thread to stop; if that request is what wakes the thread, it takes the exit for a gentle one and
        notifies the workers' task queues, waiting on a condition whose semaphore a killed worker may hold,
        forever. That hang ended 2 of 2 training runs started side by side on 2 busy cores."""
        workers = self._workers()
        for process in workers:
            process.terminate()
        for process in workers:
            process.join(timeout=5.0)
        observer = getattr(getattr(self._pool(), "_observer", None), "thread", None)
        if observer is not None and all(process.exitcode is not None for process in workers):
            observer.join(timeout=5.0)  # it leaves by itself once it sees a worker gone
        self._pipe, self._stalled = None, None

    def _pool(self):
        """DALI's process pool of the built pipeline, None when it reads in this process. DALI 2.x keeps it at
        Pipeline._py_pool.pool, with its workers at ._processes and its observer thread at ._observer.thread
        (not a public interface)."""
        return getattr(getattr(self._pipe, "_py_pool", None), "pool", None)

    def _workers(self) -> list:
        """The worker processes (multiprocessing.Process) of the built pipeline, none when it reads in this
        process."""
        return list(getattr(self._pool(), "_processes", []))

    def _to_torch(self, outputs):
        targets = torch.from_numpy(np.array(outputs[1].as_tensor())).to(self.device, non_blocking=True)
        if self.device.type != "cuda":
            images = torch.from_numpy(np.array(outputs[0].as_tensor()))
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # N x C x H x W view of NHWC storage
            return images, targets
        from nvidia.dali.plugin.pytorch import feed_ndarray
        decoded = []
        for k in range(len(outputs[0])):
            sample = outputs[0][k]
            image = torch.empty(sample.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(sample, image, cuda_stream=torch.cuda.current_stream(self.device))
            decoded.append(image.permute(2, 0, 1))  # HWC storage seen as C x H x W
        params = AugmentParams(torch.from_numpy(np.array(outputs[2].as_tensor()))[:, :2].float(),
                               torch.from_numpy(np.array(outputs[3].as_tensor())).float(), self.config)
        return apply(decoded, params, self.out_dtype, self.channels_last), targets

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pipe = None  # rebuilt at the new position
