"""Foundation-encoder helpers: input preprocessing (`preprocess`) and label-free
pretraining of a small stand-in ViT (`pretrain`, `efiqa pretrain-encoder`)."""
