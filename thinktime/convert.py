"""A model folder (one `thinktime train` wrote, or any transformers checkpoint) written as a GGUF for llama.cpp.

The converter is llama.cpp's own `convert_hf_to_gguf.py`, taken from the sdist of the installed
llama-cpp-python (the registry package that carries llama.cpp's source), so conversion and runtime
come from the same llama.cpp. The sdist is fetched once with pip and its conversion scripts kept
under THINKTIME_HOME. The GGUF is written as `model.gguf` inside the folder, where `--engine auto`
finds it.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from thinktime import models
from thinktime.errors import BadInputError, EngineError

OUTTYPES = ("f16", "bf16", "q8_0", "f32")
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # what the converter imports


def converter_source() -> Path:
    """The folder holding llama.cpp's converter for the installed llama-cpp-python, fetched once."""
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise BadInputError("converting to GGUF needs llama-cpp-python",
                            hint="pip install 'thinktime[llamacpp]'") from None
    target = models.home() / "llama.cpp-converter" / version
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                  "-q", "-d", scratch, f"llama-cpp-python=={version}"],
                                 capture_output=True, text=True)
        archives = list(Path(scratch).glob("*.tar.gz"))
        if fetched.returncode or not archives:
            raise EngineError(f"could not fetch llama-cpp-python {version}'s source for its GGUF converter: "
                              f"{(fetched.stderr or fetched.stdout).strip().splitlines()[-1:]}",
                              hint="check that pip reaches the package index")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                inner = member.name.split("/vendor/llama.cpp/", 1)
                if len(inner) == 2 and inner[1].startswith(_KEEP) and (member.isfile() or member.isdir()):
                    member.name = inner[1]
                    archive.extract(member, partial, filter="data")
        partial.rename(target)  # atomic: a killed fetch leaves no half-copied converter behind
    return target


def convert(model: str | Path, outtype: str = "q8_0") -> Path:
    """Write `model`'s folder as model.gguf in it (replacing an older one) and return the file."""
    if outtype not in OUTTYPES:
        raise BadInputError(f"unknown GGUF type {outtype!r}", hint=f"use one of: {', '.join(OUTTYPES)}")
    folder = models.resolve(str(model)).path
    if models.gguf_file(str(folder)) is not None and models.gguf_file(str(folder)).name != "model.gguf":
        raise BadInputError(f"{folder} already holds a GGUF file", hint="convert a transformers model folder")
    source = converter_source()
    out = folder / "model.gguf"
    partial = folder / "model.gguf.partial"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), str(source)])}
    done = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder),
                           "--outfile", str(partial), "--outtype", outtype], capture_output=True, text=True, env=env)
    if done.returncode or not partial.is_file():
        partial.unlink(missing_ok=True)
        last = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise EngineError(f"llama.cpp's converter failed on {folder}: {last}",
                          hint="the architecture may be one llama.cpp cannot convert; keep --engine transformers")
    partial.replace(out)
    return out
