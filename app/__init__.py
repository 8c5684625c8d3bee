"""The Gradio multimodal chat app: ``mlx-llama4 app`` (or ``python -m mlx_llama4.app``).

Modules: ``cli`` (flags, loading, launch), ``ui`` (layout and events), ``handlers`` (what the events run),
``inputs`` (what the routes accept: only uploaded files), ``chat`` (per-session state, image checks, the
generation worker), ``history`` (chat history in any shape -> model messages), ``device`` (the one thread
that runs MLX, the process-wide model holder), ``models`` (the picker's list).
"""
