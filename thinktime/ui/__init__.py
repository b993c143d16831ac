"""The web chat (`thinktime ui`); `thinktime.ui.app.build(thinker)` makes the Gradio app."""
