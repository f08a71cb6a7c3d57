// QUANTLAB_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...): a kernel launch, spelled
// so that the CPU emulation (csrc/emulation/, QUANTLAB_EMULATION) can run the same launcher
// code. On the GPU it is exactly kernel<<<grid, block, shared_bytes, stream>>>(args...). The
// kernel comes last because a template kernel's name holds commas.
#pragma once

#if defined(QUANTLAB_EMULATION)
#define QUANTLAB_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::quantlab_emu::LaunchConfig((grid), (block), (shared_bytes), (stream)).kernel(__VA_ARGS__)
#else
#define QUANTLAB_LAUNCH(grid, block, shared_bytes, stream, ...) \
  __VA_ARGS__<<<(grid), (block), (shared_bytes), (stream)>>>
#endif
