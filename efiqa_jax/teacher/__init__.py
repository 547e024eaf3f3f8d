"""The VUAD teacher (EFIQA stage 1): data, augmentation, masking, training.

`train.train_and_evaluate(config, workdir)` is what `efiqa train-teacher`
runs; `data`, `augment` and `masking` are its input pipeline and the
progressive grid masking.
"""
