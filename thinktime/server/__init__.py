"""The OpenAI-compatible server (`thinktime serve`). Importing this package loads nothing heavy;
`thinktime.server.app.create_app(thinker)` builds the FastAPI app."""
