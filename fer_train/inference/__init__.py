"""fer_train.inference: faces in the wild. Find every face in photos and videos (a pluggable detector),
crop and align it as the training data frames faces, classify it with a trained model (PyTorch or its ONNX
export), track faces across video frames and write rows, annotated copies and per-face timelines.

    detect       detectors behind one call (CenterFace, Haar, any function)  centerface  the CenterFace network
    faces        crops: face square, eye alignment, the model's evaluation transform in one pass
    classifier   the model (.pt or .onnx) -> calibrated probabilities
    recognizer   FaceExpressionRecognizer: the Python API
    tracking     identities across frames, smoothing over time               video      PyAV decoding, the loop
    outputs      rows (CSV, JSON, JSONL), annotations, timelines, summaries   predict    the command's driver

Importing this package is cheap; FaceExpressionRecognizer loads its modules on first use.
"""

DETECTORS = ("centerface", "haar")  # the detectors known by name (any function is one too)
MAX_SIDE = 640  # the longest side the detector sees by default: docs/inference.md (speed vs small faces)

__all__ = ["DETECTORS", "FaceExpressionRecognizer", "MAX_SIDE"]


def __getattr__(name):
    if name == "FaceExpressionRecognizer":
        from fer_train.inference.recognizer import FaceExpressionRecognizer
        return FaceExpressionRecognizer
    raise AttributeError(f"module 'fer_train.inference' has no attribute {name!r}")
