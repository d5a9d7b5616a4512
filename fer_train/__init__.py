"""fer_train: the training engine for fer_kernels' models.

For now it holds a self-check (``python -m fer_train``) that the kernels, layers and models work on this
machine; the data pipeline and the training engine follow (issues #4 and #5).
"""
