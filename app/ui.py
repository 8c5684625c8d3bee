"""The Gradio Blocks: layout and event wiring (``build``), and ``launch``."""

from __future__ import annotations

import sys
from typing import Optional

import gradio as gr

from mlx_llama4.demo_tools import TOOL_NAMES

from .chat import ChatSession
from .handlers import ChatApp
from .inputs import GuardedBlocks

LOADING = "load"  # the queue slot of model switches: one at a time
FOLLOW_SECONDS = 2.0  # how often a page checks whether another session switched the model
# System fonts only: the page loads nothing from the internet, so the app works offline.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
/* Pictures in the chat as thumbnails (the expand button shows them full size). */
#chatbot .message img { max-height: 200px; width: auto; object-fit: contain; }
/* The chat's label and its corner buttons (clear, copy all) float over the top of the chat: start the
   scrolling conversation below them, so that they never cover a message. */
#chatbot .bubble-wrap { margin-top: 36px; height: calc(100% - 36px); }
"""


def build(app: ChatApp) -> gr.Blocks:
    """The page: the chat and its textbox on the left; model picker, system prompt and sampling on the right.

    Reply events (send, retry, the ``/chat`` API) have no concurrency limit: every session's reply goes to
    the engine at once, which generates up to ``--max-batch`` of them together in one batch and queues the
    others (a reply it has no room for becomes a "busy" note). The textbox's Stop button and the chat's
    Clear button cancel the running reply; Gradio then cancels the handler, which cancels the engine
    request (its row is freed at the engine's next step), and ``finish`` settles the chat. The model is one
    for the whole process: switches run one at a time (``concurrency_id="load"``), and a timer brings every
    page's picker and status line up to date.
    """
    d = app.config.defaults
    with GuardedBlocks(title=app.config.title, fill_height=True) as demo:
        session = gr.State(ChatSession())
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(
                    label="Llama 4", elem_id="chatbot", height="70vh", buttons=["copy", "copy_all"],
                    placeholder="Ask anything. Attach, paste or drop images and documents (.txt, .md, .py, "
                                ".pdf …): the model sees every one in the conversation.")
                textbox = gr.MultimodalTextbox(
                    elem_id="message", show_label=False, file_count="multiple", sources=["upload"],
                    placeholder="Message (Enter to send, Shift+Enter for a new line)", autofocus=True,
                    submit_btn=True, stop_btn=False)
            with gr.Column(scale=1, min_width=260):
                picker = gr.Dropdown(label="Model", choices=app.choices(), interactive=True, elem_id="model-picker",
                                     value=app.holder.current.name if app.holder.current else None)
                refresh = gr.Button("↻ Rescan models", size="sm")
                status = gr.Markdown(app.status(), elem_id="model-status")
                system = gr.Textbox(label="System prompt", value=d.system, lines=3)
                temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, app.config.max_tokens_limit, value=d.max_tokens, step=1,
                                       label="Max tokens")
                with gr.Accordion("Tools", open=False):
                    tools = gr.CheckboxGroup(TOOL_NAMES, value=list(d.tools), label="Tools the model may call",
                                             elem_id="tools",
                                             info="Run here, by the app: a calculator, a shape drawer, a random "
                                                  "number. Each call and its result show in the chat.")
        api_send = gr.Button(visible=False)
        api_reset = gr.Button(visible=False)
        api_reply = gr.Textbox(visible=False)
        api_stats = gr.JSON(visible=False)
        timer = gr.Timer(FOLLOW_SECONDS)

        sampling = [system, temperature, top_p, max_tokens]
        generate = dict(fn=app.respond, inputs=[chatbot, session] + sampling + [tools], outputs=[chatbot],
                        concurrency_limit=None, api_visibility="undocumented", show_progress="full")
        finish = dict(fn=app.finish, inputs=[chatbot, session], outputs=[textbox, chatbot], queue=False,
                      api_visibility="undocumented")
        sent = textbox.submit(app.add_message, [textbox, chatbot, session], [textbox, chatbot], queue=False,
                              api_name="add_message", api_visibility="undocumented")
        reply = sent.then(api_name="respond", **generate)
        reply.then(api_name="finish", **finish)
        retried = chatbot.retry(app.prepare_retry, [chatbot, session], [textbox, chatbot], queue=False,
                                api_name="prepare_retry", api_visibility="undocumented")
        re_reply = retried.then(api_name="retry", **generate)
        re_reply.then(api_name="finish_retry", **finish)
        textbox.stop(None, None, None, cancels=[reply, re_reply], api_name="stop", api_visibility="undocumented")
        chatbot.undo(app.undo, [chatbot], [textbox, chatbot], queue=False, api_name="undo",
                     api_visibility="undocumented")
        chatbot.clear(app.clear, [session], [session], queue=False, cancels=[reply, re_reply],
                      api_name="clear_chat", api_visibility="undocumented")

        api_send.click(app.api_chat, [textbox] + sampling + [session], [api_reply, api_stats],
                       api_name="chat", concurrency_limit=None)
        api_reset.click(app.api_clear, [session], [session], api_name="clear", queue=False)

        picker.select(app.switch_model, [picker], [picker, status], api_name="load_model", concurrency_limit=1,
                     concurrency_id=LOADING, api_visibility="undocumented", show_progress="full")
        refresh.click(app.refresh, None, [picker], queue=False, api_name="rescan", api_visibility="undocumented")
        timer.tick(app.follow_model, [status], [picker, status], queue=False, show_progress="hidden",
                   api_name="follow_model", api_visibility="undocumented")
        demo.load(app.on_load, None, [picker, status], queue=False, api_name="on_load",
                  api_visibility="undocumented")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
           max_file_size: str | int = "20mb", block: bool = True, max_queue: int = 64) -> gr.Blocks:
    """Start the server: only uploaded files are served (no ``allowed_paths``), uploads are size-limited.

    Gradio's own start-up lines are silenced (they name ``launch(share=True)``, not our ``--share``);
    with ``block`` the address is printed here and the call returns when the server stops.
    """
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                prevent_thread_lock=True, show_error=True, quiet=True, ssr_mode=False,
                inbrowser=False, allowed_paths=[], mcp_server=False, theme=THEME, css=CSS)
    if block:
        print(f"Running on {demo.local_url}" + ("" if share else " (--share also publishes a public link)"),
              file=sys.stderr, flush=True)
        demo.block_thread()
    return demo
