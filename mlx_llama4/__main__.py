"""``python -m mlx_llama4``: the ``mlx-llama4`` command."""

import sys

from .cli import main

sys.exit(main())
