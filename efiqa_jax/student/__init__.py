"""EFIQA stage 2: the student (frozen encoder + adapter) and its training."""
