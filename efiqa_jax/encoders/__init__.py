"""Foundation-encoder code: input preprocessing (`preprocess`), feature
extraction with a frozen encoder (`extract`, `efiqa extract`) and label-free
pretraining of a small stand-in ViT (`pretrain`, `efiqa pretrain-encoder`).
The plain model is `models/vit.py`; weight porting is `port/vit.py`."""
