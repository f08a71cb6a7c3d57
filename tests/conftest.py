"""Shared fixtures. Tests never touch the network: the hub is forced offline."""

from __future__ import annotations

import os
import tempfile

# Before transformers / datasets are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="quantlab-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct as an fp32 safetensors directory (converted once)."""
    from quantlab.export.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def short_default_model_path(
    default_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The bundled model cut to its first 6 blocks (real weights, the tokenizer and everything
    else unchanged): for tests of what does not depend on the depth (streamed == resident),
    at a fifth of the full model's time."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    blocks = 6
    out = tmp_path_factory.mktemp("smollm2-6-blocks")
    state = load_file(default_model_path / "model.safetensors")
    kept = {
        name: tensor
        for name, tensor in state.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < blocks
    }
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((default_model_path / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (default_model_path / name).is_file():
            shutil.copy(default_model_path / name, out / name)
    return out


@pytest.fixture(scope="session")
def default_tokenizer(default_model_path: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


@pytest.fixture
def default_model(default_model_path: Path) -> torch.nn.Module:
    """A fresh fp32 copy of the default model (tests may quantize it in place)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    """A randomly initialised 2-block Llama with quantizable shapes (hidden 128, MLP 256)."""
    from tests.checkpoint_mutations import make_tiny_llama

    return make_tiny_llama()


@pytest.fixture
def fresh_kernel_policy():  # noqa: ANN201 (the policy module)
    """The kernel policy with no decision made yet (and none left behind for later tests)."""
    from quantlab.ops import kernel_policy

    kernel_policy.reset()
    yield kernel_policy
    kernel_policy.reset()


@pytest.fixture(autouse=True)
def _gpu_tests_run_the_compiled_kernels(request: pytest.FixtureRequest) -> None:
    """A ``gpu`` test tests the compiled CUDA kernels, verified or not: it runs with
    QUANTLAB_CUDA_KERNELS=1 (a test of the default policy unsets it itself)."""
    if request.node.get_closest_marker("gpu") is None:
        return
    from quantlab.ops import kernel_policy

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv(kernel_policy.ENV_VAR, "1")
    kernel_policy.reset()
    request.addfinalizer(kernel_policy.reset)
