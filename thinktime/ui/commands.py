"""`thinktime ui`. Light at import time: Gradio loads inside the command, so `thinktime --help` stays fast."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from thinktime.cli_common import (DeviceOpt, DtypeOpt, EngineOpt, HostOpt, LangOpt, MaxTokensOpt, ModelOpt, NoThinkOpt,
                                  SeedOpt, SourceOpt, SystemPromptOpt, TemperatureOpt, TopPOpt, TrustOpt, app, err,
                                  friendly_errors, make_thinker)


@app.command()
def ui(
    model: Optional[str] = ModelOpt, engine: str = EngineOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, host: str = HostOpt,
    port: int = typer.Option(7860, "--port", help="TCP port."),
    lang: str = LangOpt, system_prompt: Optional[Path] = SystemPromptOpt, no_think: bool = NoThinkOpt,
    max_new_tokens: Optional[int] = MaxTokensOpt, temperature: float = TemperatureOpt, top_p: float = TopPOpt,
    seed: Optional[int] = SeedOpt, trust_remote_code: bool = TrustOpt, source: Optional[str] = SourceOpt,
) -> None:
    """A web chat that streams the thinking into a collapsible panel and the answer below it (offline)."""
    with friendly_errors():
        from thinktime.ui.app import launch

        thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, max_new_tokens,
                                temperature, top_p, seed, trust_remote_code, source)
        err.print(f"[green]web chat[/] on http://{host}:{port} (Ctrl-C to stop)")
        launch(thinker, host=host, port=port)
