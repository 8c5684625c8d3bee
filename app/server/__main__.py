"""``python -m mlx_llama4.app.server``: the same as ``mlx-llama4 serve``."""

import sys

from .cli import main

sys.exit(main())
