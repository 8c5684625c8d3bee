"""The Gradio multimodal chat app."""
