"""Foundation-encoder helpers: input preprocessing (`preprocess`)."""
