"""fer_train: the training engine for fer_kernels' models (the paper's recipe, SPEC sections 3-8).

    python -m fer_train [train | evaluate | predict | presets | selfcheck]   the command line (cli.py)
    fer_train.data        data-set readers, the DALI and PyTorch pipelines, build_loader
    fer_train.config      RunConfig, the presets, config files and overrides
    fer_train.engine      Trainer: the training loop, evaluation, checkpoints, DDP
    fer_train.evaluation  evaluate, confusion matrices (CSV, PNG), summary tables
    fer_train.predict     classify image files
    fer_train.checkpoint  atomic checkpoints; load_model
"""
