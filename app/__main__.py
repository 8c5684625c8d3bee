"""``python -m mlx_llama4.app``: the same as ``mlx-llama4 app``."""

import sys

from .cli import main

sys.exit(main())
