"""fer_train: the training engine for fer_kernels' models (the paper's recipe, docs/method.md sections 3-8).

    python -m fer_train [train | evaluate | predict | export | presets | selfcheck]   the command line (cli.py)
    fer_train.config      RunConfig, the presets, config files and overrides (imports nothing heavy)
    fer_train.data        data-set readers, the DALI and PyTorch pipelines, build_loader
    fer_train.recipe      augmentation sampling, FMix, the learning-rate schedule
    fer_train.engine      Trainer: the training loop (with distributed, factories, run_data, checkpoint)
    fer_train.evaluation  evaluate, confusion matrices (CSV, PNG), summary tables
    fer_train.inference   faces in photos and videos: detection, tracking, FaceExpressionRecognizer
    fer_train.export      a model as ONNX
"""


def __getattr__(name):
    if name == "__version__":  # one version for the whole distribution, without importing torch here
        from fer_kernels import __version__
        return __version__
    if name == "FaceExpressionRecognizer":  # the inference API, loaded (with torch) only when asked for
        from fer_train.inference.recognizer import FaceExpressionRecognizer
        return FaceExpressionRecognizer
    raise AttributeError(f"module 'fer_train' has no attribute {name!r}")
