"""`python -m fer_train predict`: images and videos in, rows out (fer_train.inference.outputs), a summary line.

Images are read through fer_train.data.images (the project's one decoder: EXIF orientation, grey, 16-bit,
palettes, CMYK), in batches of at most batch_size images and _BATCH_PIXELS pixels; a file that cannot be
read becomes a row with its error and a line on standard error (strict: the first one stops the run). Videos
go through fer_train.inference.video, one after another.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from fer_train.config import installed
from fer_train.errors import ConfigError, DataError
from fer_train.inference.outputs import RowWriter, VideoAnnotator, annotate_image, output_names, write_report
from fer_train.inference.video import VIDEO_EXTENSIONS, process_video

__all__ = ["IMAGE_EXTENSIONS", "Options", "VIDEO_EXTENSIONS", "collect_inputs", "predict_files"]

# searched for in folders; a file named on the command line is read whatever its name
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_BATCH_PIXELS = 64_000_000  # decoded pixels held at once for one detector pass: bounds memory for big photos


@dataclass
class Options:
    output: str = "-"
    whole_image: bool = False
    annotate: Path | None = None
    report: Path | None = None
    strict: bool = False
    every: int = 1
    smooth: float = 0.5
    batch_size: int = 64
    progress: bool = True


def collect_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """(images, videos) named by `inputs`: files as given (a video by its extension, VIDEO_EXTENSIONS; any
    other file is read as an image, by content), folders searched recursively for IMAGE_EXTENSIONS and
    VIDEO_EXTENSIONS (any case), sorted. Duplicates are kept once. DataError naming a path that does not
    exist or a folder with neither."""
    found: dict[Path, None] = {}  # an ordered set
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            media = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
            if not media:
                raise DataError(f"{path}: the folder holds no image or video ({', '.join(IMAGE_EXTENSIONS)}, "
                                f"{', '.join(VIDEO_EXTENSIONS)} files, searched recursively)")
            found.update(dict.fromkeys(media))
        elif path.is_file():
            found[path] = None
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found:
        raise DataError("no images or videos given")
    videos = [p for p in found if p.suffix.lower() in VIDEO_EXTENSIONS]
    return [p for p in found if p.suffix.lower() not in VIDEO_EXTENSIONS], videos


def predict_files(recognizer, images: list[Path], videos: list[Path], options: Options) -> dict:
    """Writes the rows of every input to options.output (and annotations, reports); returns the counts that
    the summary line gives. Raises DataError for an unreadable file under options.strict."""
    if options.whole_image and videos:
        raise ConfigError(f"--whole-image takes each image as one face; {videos[0]} is a video, whose faces are "
                          "always detected: leave it out or drop --whole-image")
    if videos and not installed("av"):  # before any image is done: the run would stop at the first video
        raise ConfigError(f"{videos[0]} is a video, and reading videos needs PyAV (FFmpeg's decoders): "
                          "pip install av, or leave the videos out")
    names = output_names(images + videos)
    writer = RowWriter(options.output, recognizer.classes)
    counts = {"images": len(images), "faces": 0, "with_faces": 0, "without_faces": 0, "unreadable": 0,
              "videos": len(videos), "frames": 0, "tracks": 0, "video_errors": 0}
    try:
        for batch in _image_batches(images, options, counts, writer):
            paths, tensors = zip(*batch)
            for path, image, faces in zip(paths, tensors, recognizer.process(list(tensors), options.whole_image)):
                rows = [_face_row(path, f) for f in faces] or [_empty_row(path)]
                for row in rows:
                    writer.write(row)
                counts["faces"] += len(faces)
                counts["with_faces" if faces else "without_faces"] += 1
                if options.annotate is not None:
                    annotate_image(image, [r for r in rows if r["box"]], recognizer.classes,
                                   options.annotate / f"{names[path]}.jpg")
        for path in videos:
            _video(recognizer, path, names[path], options, counts, writer)
    finally:
        writer.close()
    return counts


def _skip(path, err: DataError, counter: str, options, counts, writer) -> None:
    """A file that cannot be read: with --strict the error stops the run (exit 2); else it is said, counted
    and written as a row with its error."""
    if options.strict:
        raise err
    print(f"skipped: {err}", file=sys.stderr)
    counts[counter] += 1
    writer.write(_empty_row(path, str(err)))


def _image_batches(images, options, counts, writer):
    from fer_train.data.images import load

    batch, pixels = [], 0
    for path in images:
        try:
            image = load(path)
        except DataError as err:
            _skip(path, err, "unreadable", options, counts, writer)
            continue
        if batch and (len(batch) == options.batch_size or pixels + image[0].numel() > _BATCH_PIXELS):
            yield batch
            batch, pixels = [], 0
        batch.append((path, image))
        pixels += image[0].numel()
    if batch:
        yield batch


def _video(recognizer, path, name, options, counts, writer) -> None:
    annotator = None
    try:
        if options.annotate is not None:
            from fer_train.inference.video import video_info
            _, rate, width, height = video_info(path)
            annotator = VideoAnnotator(options.annotate / f"{name}.mp4", width, height, rate, recognizer.classes)
        result = process_video(recognizer, path, writer.write, every=options.every, batch=options.batch_size,
                               smooth=options.smooth, annotate=annotator, progress=options.progress)
    except DataError as err:
        _skip(path, err, "video_errors", options, counts, writer)
        return
    finally:
        if annotator is not None:
            annotator.close()
    counts["frames"] += result.processed
    counts["tracks"] += len(result.tracks)
    if options.report is not None:
        write_report(result, recognizer.classes, options.report, name)


def _face_row(path: Path, face) -> dict:
    return {"path": str(path), "face": face.index, "box": [round(v, 2) for v in face.box], "score": face.score,
            "class": face.label, "probabilities": face.probabilities}


def _empty_row(path: Path, error: str | None = None) -> dict:
    row = {"path": str(path), "face": None, "box": None, "score": None, "class": None, "probabilities": None}
    if error is not None:
        row["error"] = error
    return row


def summary_line(counts: dict, output: str) -> str:
    parts = []
    if counts["images"]:
        parts.append(f"{counts['images']} image(s): {counts['faces']} face(s) in {counts['with_faces']}, "
                     f"{counts['without_faces']} without a face, {counts['unreadable']} unreadable")
    if counts["videos"]:
        parts.append(f"{counts['videos']} video(s): {counts['frames']} frame(s) processed, {counts['tracks']} "
                     f"track(s), {counts['video_errors']} unreadable")
    where = "standard output" if output == "-" else output
    return "; ".join(parts) + f"; rows written to {where}"
