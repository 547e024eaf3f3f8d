import sys

from efiqa_jax.cli import main

sys.exit(main())
