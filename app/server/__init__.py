"""The OpenAI- and Anthropic-compatible HTTP server: ``mlx-llama4 serve`` (or ``python -m mlx_llama4.app.server``).

Modules: ``cli`` (flags, bind checks, loading, uvicorn), ``app`` (settings, middlewares, ``/health``,
``/metrics``), ``openai_routes`` and ``openai_schemas`` (the OpenAI API), ``anthropic_routes`` and
``anthropic_schemas`` (Anthropic's Messages API), ``tools`` (tool calling as both APIs share it), ``replies``
(collecting and streaming a reply, cancelled when the client leaves), ``media`` (image URLs under limits),
``security`` (bind rule, API key, body limit), ``errors`` (both APIs' error shapes), ``metrics`` (Prometheus),
and ``engine_client``, the only module that calls the engine. No MLX runs in this package: the engine does all
of it on its own thread.
"""
