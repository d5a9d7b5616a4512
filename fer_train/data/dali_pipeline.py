"""The NVIDIA DALI pipeline: decode, face crop, resize / centre crop, grey to RGB, flip, rotation + shear
with a mirrored border, colour jitter and normalisation, from the files of any fer_train data set.

A parallel external source reads each batch's files in Python worker processes and draws each
sample's parameters exactly as the PyTorch pipeline does (fer_train.data.pipeline.Pipeline.params, from
(seed, epoch, index)): resize, crop, face box, flip, rotation and shear become one matrix, so DALI does
the geometry as a single warp of the decoded image (one pass at the output size instead of one per
step).

On the CPU (device_id=None) the graph is all DALI: decode; the colour jitter as one linear map of each
pixel's RGB at the source's resolution (48 x 48 for FERPlus: 20x fewer pixels than the output, which
made colour 4x cheaper than DALI's hsv after the warp, measured); warp_perspective with a "reflect"
border; crop_mirror_normalize. The linear map composes brightness, contrast about the mean grey,
saturation and a hue rotation about the grey axis, clamping once at the end: it departs from the specification
(fer_kernels.reference.augment: HSV hue, a clamp after each step) by about 0.026 of the [0, 1] range on
average at the largest hue shift, less on the pale colours of faces. On a GPU, DALI decodes on the device (nvJPEG,
"mixed") and the fused kernel of fer_kernels.augment does the rest exactly.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from fer_train.data.pipeline import Pipeline, stack_targets
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


def _image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the file header alone."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


_HALF = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


class _BatchSource:
    """The external source: batch `info.iteration` of the epoch, as encoded files, targets, 3 x 3 warp
    matrices (output pixel -> source pixel) and colour factors. Runs in DALI's worker processes."""

    def __init__(self, pipeline: DaliPipeline, first_epoch: int, first_position: int, gpu: bool):
        self.pipeline, self.gpu = pipeline, gpu
        self.first_epoch, self.first_position = first_epoch, first_position
        self._epoch, self._batches = None, None

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
        if position >= len(self._batches):
            raise StopIteration
        indices = self._batches[position]
        files, targets, boxes = [], [], []
        for index in indices.tolist():
            part, local, record = pipeline.sample(index)
            data = part.encoded(local)
            files.append(np.frombuffer(data, dtype=np.uint8))
            targets.append(pipeline.target(record))
            boxes.append(record.box if record.box is not None else full_boxes([_image_size(data)])[0].tolist())
        params = pipeline.params(torch.tensor(boxes, dtype=torch.float64), indices, epoch)
        matrices = torch.cat([params.matrices, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(len(indices), 1, 3)], 1)
        if not self.gpu:  # DALI's warp puts pixel centres at i + 1/2, fer_kernels.augment at i
            matrices = (_HALF @ matrices.double() @ _HALF.inverse()).float()
        stacked = stack_targets(targets).numpy()
        rows = lambda a: [np.array(row) for row in a]  # noqa: E731 - one array per sample (0-d for labels)
        return (files, rows(stacked), rows(matrices.numpy()), rows(params.colour.numpy()),
                rows(linear_colour(params.colour).numpy()))


class DaliPipeline(Pipeline):
    def __init__(self, dataset, batch_size: int, train: bool, device: torch.device, *, num_threads: int = 2,
                 **options):
        super().__init__(dataset, batch_size, train, device, **options)
        if self.out_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the DALI pipeline writes float32 or float16 batches, not {self.out_dtype}")
        self.num_threads = num_threads
        self._pipe = None

    def __getstate__(self):
        return {**self.__dict__, "_pipe": None}  # DALI's worker processes get the reading side only

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        source = _BatchSource(self, self.epoch, self.position, gpu)
        s, mean, std = self.config.out_size, self.config.mean, self.config.std

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=(self.device.index or 0) if gpu else None, py_num_workers=self.num_workers,
                      py_start_method="spawn", prefetch_queue_depth=2)
        def graph():
            files, targets, matrices, colour, colour_map = fn.external_source(
                source=source, num_outputs=5, batch=True, batch_info=True, parallel=True)
            if gpu:  # decode on the device; fer_kernels.augment does the rest
                return fn.decoders.image(files, device="mixed", output_type=types.RGB), targets, matrices, colour
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
            return images, targets

        self._pipe = graph()
        self._pipe.build()

    def __iter__(self):
        # A pipeline is built at (epoch, position) and then goes on by itself: an iteration stopped
        # early resumes, like the PyTorch pipeline's, at the first batch not handed out.
        if self._pipe is None:
            self._build()
        while True:
            try:
                outputs = self._pipe.run()
            except StopIteration:
                self._pipe.reset()
                break
            self.position += 1
            yield self._to_torch(outputs)
        self.epoch, self.position = self.epoch + 1, 0

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
