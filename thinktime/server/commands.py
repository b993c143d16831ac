"""`thinktime serve`. Light at import time: FastAPI and uvicorn load inside the command, so `thinktime --help`
stays fast."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from thinktime.cli_common import (DeviceOpt, DtypeOpt, EngineOpt, HostOpt, LangOpt, MaxTokensOpt, ModelOpt, NoThinkOpt, SeedOpt,
                           SourceOpt, SystemPromptOpt, TemperatureOpt, TopPOpt, TrustOpt, make_thinker, app, err,
                           friendly_errors)
from thinktime.errors import BadInputError


@app.command()
def serve(
    model: Optional[str] = ModelOpt, engine: str = EngineOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, host: str = HostOpt,
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="THINKTIME_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (env THINKTIME_API_KEY)."),
    served_model_name: Optional[list[str]] = typer.Option(None, "--served-model-name",
                                                          help="Name(s) clients use for the model."),
    strategy: str = typer.Option("cot", "--strategy", "-s", help="Default strategy when a request names none."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait; more get 429 + Retry-After."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Rows in one batched generate "
                                            "(default: the engine's limit)."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds a request may take in all."),
    max_n: int = typer.Option(16, "--max-n", help="Largest n a request may ask for."),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit",
                                                   help="Largest max_tokens a request may ask for "
                                                        "(default: the context length)."),
    lang: str = LangOpt, system_prompt: Optional[Path] = SystemPromptOpt, no_think: bool = NoThinkOpt,
    max_new_tokens: Optional[int] = MaxTokensOpt, temperature: float = TemperatureOpt, top_p: float = TopPOpt,
    seed: Optional[int] = SeedOpt, trust_remote_code: bool = TrustOpt, source: Optional[str] = SourceOpt,
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health)."""
    with friendly_errors():
        if not 0 < port < 65536:
            raise BadInputError(f"--port must be between 1 and 65535, got {port}")
        import uvicorn

        from thinktime.server.app import ServerConfig, create_app

        thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, max_new_tokens,
                                temperature, top_p, seed, trust_remote_code, source, strategy=strategy)
        names = tuple(served_model_name or ()) or tuple(dict.fromkeys([thinker.model_name] + ([model] if model else [])))
        config = ServerConfig(api_key=api_key, served_names=names, max_queue=max_queue, max_batch=max_batch,
                              request_timeout=request_timeout, max_n=max_n, max_tokens_limit=max_tokens_limit)
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            err.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it may use it")
        err.print(f"[green]serving[/] {', '.join(names)} on http://{host}:{port}/v1 (Ctrl-C to stop)")
        # Ctrl-C: open streams get a few seconds to end, then are cut (their jobs withdrawn), so a full
        # queue does not keep the server running for minutes.
        uvicorn.run(create_app(thinker, config), host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=5)
