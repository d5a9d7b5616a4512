"""The training recipe of docs/method.md sections 3, 5 and 6: how each sample's augmentation is drawn
(augmentation.py), FMix's lambda, masks and loss (fmix.py) and the learning-rate schedule (schedule.py). The
passes that apply augmentation and FMix are fer_kernels ops (fer_kernels.augment, fer_kernels.fmix_mix)."""
