"""The Gradio multimodal chat app: ``mlx-llama4 app`` (or ``python -m mlx_llama4.app``).

Modules: ``cli`` (flags, loading, launch), ``ui`` (layout and events), ``handlers`` (what the events run),
``inputs`` (what the routes accept: only uploaded files), ``chat`` (per-session state, image checks, a reply
streamed from the batching engine), ``history`` (chat history in any shape -> model messages), ``device`` (the
process-wide model and its engine, loading), ``models`` (the picker's list).
"""
