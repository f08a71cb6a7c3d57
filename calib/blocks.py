"""A model's decoder blocks, one at a time: where each block's weights are while it is processed.

Every method walks the blocks in order -- capture the first block's inputs, then for each block:
bring it to the compute device, calibrate and quantize it, hand it on, put it away. How a block is
brought in and put away is the only difference between a model held in memory and one streamed
from its checkpoint, and :class:`ModelBlocks` owns it:

* resident (``source=None``): the model's tensors are real; a block is moved to ``device`` and
  back where it was (for a model on the CPU processed on a GPU: one block on the GPU at a time).
* streamed (``source`` loads and releases submodules by path, e.g.
  :class:`quantlab.export.lazy_model.LazyModel`): the model lives on the meta device; a block's
  weights are read from the checkpoint when it is opened and every tensor it holds when it is
  closed -- its quantized layers included, once ``on_done`` has written them -- goes back to the
  meta device. Only the buffers the block's constructor made (rotary tables) stay. The modules
  outside the blocks that the first block's inputs need (the embedding) are loaded for the capture
  only.

Nothing here knows about architectures or formats: the caller names the blocks' path and the
modules the capture does not need (final norm, head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from quantlab.calib.activations import ActivationStore

__all__ = ["ModelBlocks", "WeightSource", "move_outside_blocks"]


class WeightSource(Protocol):
    """Loads a submodule's weights by dotted path onto the compute device, and releases them."""

    def load(self, prefix: str = "") -> nn.Module: ...

    def release(self, prefix: str = "") -> None: ...

    def stored_weight(self, name: str) -> Any:
        """Parameter ``name`` as rows read on demand (``weight[rows]``), its module unloaded."""
        ...


def move_outside_blocks(
    model: nn.Module, blocks: nn.ModuleList, device: torch.device | str
) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` to ``device``, in place.

    Used so the embedding, rotary tables and head run where the blocks are processed while the
    blocks themselves stay where they live (one at a time is moved in). ``param.data`` is replaced
    rather than the Parameter object, so tied weights (embedding = lm_head) stay tied.
    """
    inside = set(blocks.modules())
    for module in model.modules():
        if module in inside:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(device)


def _tensor_owners(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    """``(owner, name, tensor, is_parameter)`` for every parameter and buffer under ``module``."""
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                yield owner, name, param, True
        for name, buf in owner._buffers.items():
            if buf is not None:
                yield owner, name, buf, False


class ModelBlocks:
    """The decoder blocks ``model.get_submodule(path)`` of ``model``, processed on ``device``.

    Args:
        model: the whole model (resident or on the meta device).
        path: dotted path of its ``nn.ModuleList`` of blocks.
        device: where a block is processed.
        source: streams the weights (``None``: the model is resident).
        skip_for_capture: paths of modules outside the blocks that capturing the first block's
            inputs does not need (final norm, head): a streamed model does not load them.
        on_done: called with ``(index, block)`` when a block is closed, before it is put away (a
            streaming export writes it there).
        on_open: called with ``(index, block)`` as a block is opened, before the caller sees it
            (a baseline evaluation runs the float block there).
        activations: where the calibration activations between blocks are kept (RAM up to a
            budget, then disk); ``None``: in RAM, unbounded.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str,
        device: torch.device | str,
        source: WeightSource | None = None,
        skip_for_capture: tuple[str, ...] = (),
        on_done: Callable[[int, nn.Module], None] | None = None,
        on_open: Callable[[int, nn.Module], None] | None = None,
        activations: ActivationStore | None = None,
    ) -> None:
        self.model = model
        self.path = path
        self.blocks = model.get_submodule(path)
        if not isinstance(self.blocks, nn.ModuleList):
            raise TypeError(f"{path} is a {type(self.blocks).__name__}, not an nn.ModuleList")
        self.device = torch.device(device)
        self.source = source
        self.skip_for_capture = skip_for_capture
        self.on_done = on_done
        self.on_open = on_open
        self.activations = activations

    @property
    def streamed(self) -> bool:
        """Whether block weights come from the checkpoint (and leave memory once closed)."""
        return self.source is not None

    def __len__(self) -> int:
        return len(self.blocks)

    # -- outside the blocks --------------------------------------------------------------------

    def _outside_paths(self, skip: tuple[str, ...]) -> list[str]:
        """Paths of the modules outside the blocks that own tensors directly, minus the ``skip``
        ones (and everything under them)."""
        inside = {id(m) for m in self.blocks.modules()}
        paths = []
        for name, module in self.model.named_modules():
            if id(module) in inside or any(name == s or name.startswith(s + ".") for s in skip):
                continue
            if module._parameters or module._buffers:
                paths.append(name)
        return paths

    @contextlib.contextmanager
    def outside_on_device(self, with_head: bool = False) -> Iterator[None]:
        """The modules outside the blocks on ``device`` for the duration (streamed: loaded, minus
        ``skip_for_capture`` unless ``with_head``, and released after)."""
        if self.source is not None:
            paths = self._outside_paths(() if with_head else self.skip_for_capture)
            for path in paths:
                self.source.load(path)
            try:
                yield
            finally:
                for path in paths:
                    self.source.release(path)
            return
        params = [p for p in self.model.parameters() if p.device.type != "meta"]
        home = params[0].device if params else self.device
        move_outside_blocks(self.model, self.blocks, self.device)
        try:
            yield
        finally:
            move_outside_blocks(self.model, self.blocks, home)

    # -- one block -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` on ``device`` with its weights (``on_open(index, block)`` runs
        first); on exit ``on_done(index, block)`` runs and the block is put away (resident: back
        where it was; streamed: every tensor it holds, apart from its constructor-made buffers,
        to the meta device)."""
        block = self.blocks[index]
        if self.source is None:
            home = next(block.parameters()).device
            block.to(self.device)
            if self.on_open is not None:
                self.on_open(index, block)
            yield block
            if self.on_done is not None:
                self.on_done(index, block)
            block.to(home)
            return
        prefix = f"{self.path}.{index}"
        # Buffers that exist before loading (non-persistent, made by the constructor) stay.
        keep = {id(t) for _, _, t, is_param in _tensor_owners(block) if not is_param}
        self.source.load(prefix)
        try:
            if self.on_open is not None:
                self.on_open(index, block)
            yield block
            if self.on_done is not None:
                self.on_done(index, block)
        finally:
            self.source.release(prefix)
            for owner, name, tensor, is_param in list(_tensor_owners(block)):
                if tensor.device.type == "meta" or (not is_param and id(tensor) in keep):
                    continue
                if is_param:
                    owner._parameters[name] = nn.Parameter(
                        tensor.to("meta"), requires_grad=tensor.requires_grad
                    )
                else:
                    owner._buffers[name] = tensor.to("meta")
