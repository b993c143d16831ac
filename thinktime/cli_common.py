"""What every command of the `thinktime` CLI shares: the app, the consoles, error printing, and the options that
load a model. The command modules (cli, server, evaluation, bootstrap) import this one; it imports none of them."""
from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from thinktime import __version__
from thinktime.errors import EXIT_INTERRUPTED, BadInputError, ThinktimeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Turn thinking time into capability: deep-thinking answers, checked.")
# emoji=False: ":100:" in an answer ("1:100:1000") or a step stays text, not 💯
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


@contextmanager
def friendly_errors(interrupted: str = ""):
    """Known errors print what went wrong and what to do, and exit with their documented code; `interrupted`
    is added to the message after Ctrl-C (how to go on)."""
    try:
        yield
    except ThinktimeError as exc:
        # Messages quote user input and install commands ("thinktime[vllm]"): printed as text, not as markup.
        err.print(f"[bold red]error:[/] {escape(exc.message)}", markup=True)
        if exc.hint:
            err.print(f"  [yellow]hint:[/] {escape(exc.hint)}")
        raise typer.Exit(exc.exit_code) from None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) as exc:
        # A path the user gave (an output folder, a file) that cannot be used: bad input, not a crash.
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"[bold red]error:[/] {escape(str(exc.strerror or exc) + where)}", markup=True)
        err.print("  [yellow]hint:[/] check the path: its folders must exist as folders, and be writable")
        raise typer.Exit(BadInputError.exit_code) from None
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/]" + (f" ({interrupted})" if interrupted else ""))
        raise typer.Exit(EXIT_INTERRUPTED) from None


def version_callback(value: bool) -> None:
    if value:
        print(f"thinktime {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


# Options shared by every command that loads a model.
ModelOpt = typer.Option(None, "--model", "-m", help="Alias, local folder, .gguf file or hub repo id. "
                        "Default: internlm3-8b-instruct on a GPU, the embedded smollm2-135m on a CPU.")
EngineOpt = typer.Option("auto", "--engine", help="Inference engine: auto (llamacpp for a GGUF model on a CPU "
                         "where llama-cpp-python is installed, else transformers), transformers, llamacpp, vllm, "
                         "openai, or openai:URL for any OpenAI-compatible server.")
DeviceOpt = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:1, ...")
DtypeOpt = typer.Option(None, "--dtype", help="auto (default), bf16, fp16, fp32.")
LangOpt = typer.Option("auto", "--lang", help="Thinking prompt language: auto (by the question), en, zh.")
SystemPromptOpt = typer.Option(None, "--system-prompt", help="A file whose text replaces the thinking prompt.")
NoThinkOpt = typer.Option(False, "--no-think", help="Plain chat: no deep-thinking system prompt.")
MaxTokensOpt = typer.Option(None, "--max-new-tokens", help="New tokens per chain (default 8192 on GPU, 1024 on CPU).")
TemperatureOpt = typer.Option(0.0, "--temperature", "-t", help="0 is greedy.")
TopPOpt = typer.Option(1.0, "--top-p")
SeedOpt = typer.Option(None, "--seed", help="Makes sampling reproducible.")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Run the model repo's own Python code (off by default).")
SourceOpt = typer.Option(None, "--source", help="Where to download from when needed: hf or modelscope.")
HostOpt = typer.Option("127.0.0.1", "--host", help="Address to bind; the loopback by default. 0.0.0.0 exposes "
                       "the server to the network (set --api-key then).")
# Engine options (--engine vllm | openai | openai:URL); None means the engine's default.
BaseUrlOpt = typer.Option(None, "--base-url", help="--engine openai: the server's URL, e.g. http://127.0.0.1:8000/v1 "
                          "(or write --engine openai:URL).")
ApiKeyOpt = typer.Option(None, "--api-key", help="--engine openai: the server's API key "
                         "(default: $THINKTIME_API_KEY or $OPENAI_API_KEY).")
TensorParallelOpt = typer.Option(None, "--tensor-parallel-size", help="--engine vllm: GPUs that split each layer.")
PipelineParallelOpt = typer.Option(None, "--pipeline-parallel-size", help="--engine vllm: GPUs (or nodes) that split "
                                   "the layers into stages.")
DataParallelOpt = typer.Option(None, "--data-parallel-size", help="--engine vllm: independent model replicas.")
ExecutorOpt = typer.Option(None, "--distributed-executor-backend", help="--engine vllm: ray (multi-node) or mp.")
FastOpt = typer.Option(None, "--fast/--no-fast", help="--engine transformers: the fast decoder (static KV cache, "
                       "CUDA graphs; the default on CUDA). --no-fast decodes with plain generate().")


def engine_options(base_url=None, api_key=None, tensor_parallel_size=None, pipeline_parallel_size=None,
                   data_parallel_size=None, distributed_executor_backend=None, fast=None) -> dict:
    """The engine options a command was given (unset ones left out, so each engine keeps its defaults)."""
    values = dict(base_url=base_url, api_key=api_key, tensor_parallel_size=tensor_parallel_size,
                  pipeline_parallel_size=pipeline_parallel_size, data_parallel_size=data_parallel_size,
                  distributed_executor_backend=distributed_executor_backend, fast=fast)
    return {k: v for k, v in values.items() if v is not None}


def make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, max_new_tokens, temperature,
                  top_p, seed, trust_remote_code, source, **extra):
    from thinktime.api import Thinker
    from thinktime.prompts import load_system_prompt

    with err.status("loading model…", spinner="dots"):
        return Thinker(model, engine=engine, device=device, dtype=dtype, lang=lang,
                       system_prompt=load_system_prompt(system_prompt) if system_prompt else None,
                       think=not no_think, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, trust_remote_code=trust_remote_code, source=source, **extra)
