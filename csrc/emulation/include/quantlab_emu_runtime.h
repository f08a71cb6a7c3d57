// The CPU emulation's runtime interface: what the emulated CUDA headers (cuda_runtime.h, mma.h)
// and the PTX wrappers (emulation/ptx_emulation.h) call. Implemented in emulation/runtime.cpp,
// which is compiled WITHOUT the thread sanitizer: the scheduler's own hand-offs between fibers
// must not be mistaken for races in the kernels, while every memory access a kernel makes (its
// shared-memory and global reads and writes, the rows ldmatrix reads, the bytes cp.async copies)
// happens in instrumented code, in the fiber of the CUDA thread that makes it.
//
// Model (see docs/emulation.md): one CTA at a time, in an order chosen per launch; within a CTA
// every CUDA thread is a fiber, switched cooperatively at barriers and warp collectives only,
// so a CTA runs as a deterministic interleaving in which every __syncthreads and every
// *_sync collective is a real rendezvous of the threads that must reach it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "quantlab_emu_vector_types.h"

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

#if defined(__SANITIZE_THREAD__)
#define QUANTLAB_EMU_NO_TSAN __attribute__((no_sanitize_thread))
#else
#define QUANTLAB_EMU_NO_TSAN
#endif

namespace quantlab_emu {

// Emulated device: an H100 SXM's limits (the kernels' launch heuristics read them).
constexpr int kSmCount = 132;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;        // without cudaFuncSetAttribute
constexpr size_t kMaxDynamicSmemOptIn = 227 * 1024;      // sharedMemPerBlockOptin
constexpr size_t kSmemPerSm = 228 * 1024;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxBlocksPerSm = 32;

struct ThreadInfo {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  int warp;
  int lane;
};

// The calling CUDA thread (valid inside a kernel only).
const ThreadInfo& self();

// Print "quantlab-emulation: <check>: <message> (block (x,y,z), thread (x,y,z))" to stderr and
// abort: every checker reports through here, so a test can match the check's name.
[[noreturn]] void fail(const char* check, const char* fmt, ...)
    __attribute__((format(printf, 2, 3)));

// Byte copies the sanitizers do not attribute to the calling fiber (for the emulator's own
// hand-offs, e.g. inside a collective's combine).
void copy_bytes(void* dst, const void* src, size_t n);

// ---- Launch -------------------------------------------------------------------------------
using KernelBody = void (*)(void* closure);
// Runs `body(closure)` as every thread of every CTA of the grid. Returns a cudaError_t value.
int launch(const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem, KernelBody body,
           void* closure);
int set_max_dynamic_smem(const void* kernel_id, int bytes);
int last_error_and_reset();
int peek_last_error();

// ---- Shared memory ------------------------------------------------------------------------
// The CTA's dynamic shared memory (fresh per CTA, filled with the poison byte).
void* dynamic_shared();
// The CTA's instance of one static __shared__ declaration (identified by `tag`, one per
// declaration and template instance): allocated on first use in each CTA, poison-filled.
void* static_shared(const void* tag, size_t bytes, size_t align);
// Whether [p, p + bytes) lies inside one of the current CTA's shared allocations.
bool is_shared(const void* p, size_t bytes);

// ---- Barriers and warp collectives --------------------------------------------------------
void syncthreads();
int syncthreads_or(int predicate);
// A warp collective: every lane in `mask` must call it with the same `kind` and mask. Each lane
// deposits `in` (in_bytes <= kSlotBytes); when the last lane of the mask arrives, `combine` runs
// once over all deposits and writes each lane's result, which is copied to the caller's `out`.
// `combine` must not be instrumented by the thread sanitizer (QUANTLAB_EMU_NO_TSAN): it handles
// every lane's registers, not memory of the kernel.
constexpr size_t kSlotBytes = 256;
using Combine = void (*)(const unsigned char (*in)[kSlotBytes], unsigned char (*out)[kSlotBytes],
                         unsigned mask, const void* context);
void warp_collective(const char* kind, unsigned mask, const void* in, size_t in_bytes, void* out,
                     size_t out_bytes, Combine combine, const void* context);
void syncwarp(unsigned mask);

// ---- cp.async ------------------------------------------------------------------------------
// A copy the calling thread issued: `bytes` land at dst, the first `src_bytes` of them from src
// and the rest zero (PTX's src-size operand).
struct PendingCopy {
  void* dst;
  const void* src;
  uint32_t bytes;
  uint32_t src_bytes;
};
using PerformCopy = void (*)(const PendingCopy& copy);
// Record a copy (its destination is poisoned under ASan until performed).
void cp_async_issue(const PendingCopy& copy);
void cp_async_commit();
// Retire all but the newest `pending_allowed` committed groups of the calling thread: each of
// their copies is unpoisoned and handed to `perform`, which runs in the kernel's (instrumented)
// code, in this thread's fiber. A thread that exits with copies outstanding is an error.
void cp_async_wait(int pending_allowed, PerformCopy perform);

}  // namespace quantlab_emu
