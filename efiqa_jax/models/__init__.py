"""Flax NNX models: the (residual) U-Net shared by VUAD and RRWNet."""
