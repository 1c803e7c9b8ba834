"""The browser demo: a Gradio chat with TextBind, also usable through Gradio's API (`python -m textbind.serve`).

`textbind.serve.chat` holds the conversation logic (sessions, limits, uploads, examples) without
Gradio; `textbind.serve.app` builds the Gradio app around it and holds the command line.
"""
