// The CPU emulation's runtime: fibers, the CTA scheduler, barriers, warp collectives, shared
// memory and cp.async bookkeeping (interface and model: include/quantlab_emu_runtime.h).
//
// Compiled without -fsanitize=thread on purpose (the hand-offs between fibers here are the
// emulator's, not the kernel's), with the sanitizer interfaces called explicitly instead:
// - TSan: every CUDA thread is a TSan fiber; switches carry no synchronisation
//   (__tsan_switch_to_fiber_no_sync), and a __syncthreads is a release by every arriving thread
//   and an acquire by every leaving one. Nothing else orders two threads of a CTA, so a
//   shared-memory byte written by one thread and touched by another between two barriers is
//   reported as a data race.
// - ASan: fiber stacks are announced (__sanitizer_start/finish_switch_fiber); the destination
//   of a cp.async is poisoned from its issue until the wait_group that retires it, so any access
//   to it in between is reported.
#include <sanitizer/common_interface_defs.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "quantlab_emu_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define QL_ASAN 1
#else
#define QL_ASAN 0
#endif

#if defined(QUANTLAB_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#define QL_TSAN 1
#else
#define QL_TSAN 0
#endif

namespace quantlab_emu {
namespace {

// Fiber stacks: the kernels' frames are small (their registers), and ASan's swapcontext
// interceptor clears the shadow of the whole stack on every switch, so a smaller stack is a
// faster ASan run. The lowest page is a guard: an overflow faults instead of corrupting.
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;
  ThreadInfo info{};
  State state = State::kDone;
  int barriers_passed = 0;
  int syncwarps_passed = 0;
  std::vector<PendingCopy> uncommitted;
  std::deque<std::vector<PendingCopy>> groups;
};

struct WarpSlot {
  const char* kind = nullptr;
  unsigned mask = 0;
  unsigned arrived = 0;
  unsigned char in[32][kSlotBytes];
  unsigned char out[32][kSlotBytes];
  char sync[2] = {0, 0};  // TSan sync objects of __syncwarp, by the caller's count parity
};

struct SharedAlloc {
  const void* tag;
  unsigned char* ptr;
  size_t bytes;
};

struct Cta {
  std::vector<Fiber*> threads;
  int arrived = 0;
  int generation = 0;
  int vote_or = 0;
  int vote_result[2] = {0, 0};
  char barrier_sync[2] = {0, 0};  // TSan sync objects, one per barrier parity
  std::vector<WarpSlot> warps;
  unsigned char* dynamic = nullptr;
  size_t dynamic_bytes = 0;
  std::vector<SharedAlloc> statics;
  size_t static_bytes = 0;
};

struct Runtime {
  ucontext_t scheduler;
  void* scheduler_tsan = nullptr;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  std::vector<Fiber*> pool;
  Cta* cta = nullptr;
  Fiber* current = nullptr;
  KernelBody body = nullptr;
  void* closure = nullptr;
  int last_error = 0;
  std::unordered_map<const void*, int> max_dynamic_smem;
  char cta_sync = 0;   // the scheduler's CTA setup -> the CTA's threads
  char done_sync = 0;  // the CTA's threads -> the scheduler's teardown
};

Runtime& rt() {
  static Runtime* r = new Runtime();  // never destroyed: fibers may outlive static teardown
  return *r;
}

unsigned char fill_byte() {
  static const int value = [] {
    const char* env = std::getenv("QUANTLAB_EMU_SMEM_FILL");
    return env ? static_cast<int>(std::strtol(env, nullptr, 0) & 0xFF) : 0xA5;
  }();
  return static_cast<unsigned char>(value);
}

void vfail(const char* check, const char* fmt, va_list ap) {
  std::fprintf(stderr, "quantlab-emulation: %s: ", check);
  std::vfprintf(stderr, fmt, ap);
  const Fiber* f = rt().current;
  if (f != nullptr) {
    std::fprintf(stderr, " (block (%u,%u,%u), thread (%u,%u,%u))", f->info.block_idx.x,
                 f->info.block_idx.y, f->info.block_idx.z, f->info.thread_idx.x,
                 f->info.thread_idx.y, f->info.thread_idx.z);
  }
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

// ---- Fiber switching ------------------------------------------------------------------------

void switch_to_fiber(Fiber* f) {
  Runtime& r = rt();
  r.current = f;
#if QL_TSAN
  __tsan_switch_to_fiber(f->tsan_fiber, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
#if QL_ASAN
  __sanitizer_start_switch_fiber(&r.scheduler_fake_stack, f->stack, kStackBytes);
#endif
  swapcontext(&r.scheduler, &f->ctx);
#if QL_ASAN
  __sanitizer_finish_switch_fiber(r.scheduler_fake_stack, &r.scheduler_stack_bottom,
                                  &r.scheduler_stack_size);
#endif
  r.current = nullptr;
}

void yield_to_scheduler() {
  Runtime& r = rt();
  Fiber* f = r.current;
#if QL_TSAN
  __tsan_switch_to_fiber(r.scheduler_tsan, 1);
#endif
#if QL_ASAN
  __sanitizer_start_switch_fiber(&f->asan_fake_stack, r.scheduler_stack_bottom,
                                 r.scheduler_stack_size);
#endif
  swapcontext(&f->ctx, &r.scheduler);
#if QL_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, nullptr, nullptr);
#endif
}

void retire_all_copies(Fiber* f) {
#if QL_ASAN
  for (auto& group : f->groups)
    for (auto& c : group) ASAN_UNPOISON_MEMORY_REGION(c.dst, c.bytes);
  for (auto& c : f->uncommitted) ASAN_UNPOISON_MEMORY_REGION(c.dst, c.bytes);
#endif
  f->groups.clear();
  f->uncommitted.clear();
}

void thread_exit(Fiber* f) {
  Cta& cta = *rt().cta;
  if (cta.arrived > 0) {
    fail("barrier divergence",
         "thread exited after %d __syncthreads while %d threads wait at the next one",
         f->barriers_passed, cta.arrived);
  }
  const WarpSlot& slot = cta.warps[f->info.warp];
  if (slot.kind != nullptr && (slot.mask >> f->info.lane & 1u)) {
    fail("warp divergence", "lane %d exited while its warp waits for it at %s", f->info.lane,
         slot.kind);
  }
  retire_all_copies(f);
  f->state = State::kDone;
}

void fiber_entry(unsigned lo, unsigned hi) {
  Fiber* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
#if QL_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &rt().scheduler_stack_bottom,
                                  &rt().scheduler_stack_size);
#endif
  for (;;) {
#if QL_TSAN
    __tsan_acquire(&rt().cta_sync);
#endif
    rt().body(rt().closure);
    thread_exit(f);
#if QL_TSAN
    __tsan_release(&rt().done_sync);
#endif
    yield_to_scheduler();
  }
}

Fiber* new_fiber() {
  auto* f = new Fiber();
  f->stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                  -1, 0);
  if (f->stack == MAP_FAILED) fail("runtime", "cannot map a fiber stack");
  if (mprotect(f->stack, kGuardBytes, PROT_NONE) != 0) fail("runtime", "cannot guard a fiber stack");
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = f->stack;
  f->ctx.uc_stack.ss_size = kStackBytes;
  f->ctx.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->ctx, reinterpret_cast<void (*)()>(fiber_entry), 2,
              static_cast<unsigned>(p & 0xFFFFFFFFu), static_cast<unsigned>(p >> 32));
#if QL_TSAN
  f->tsan_fiber = __tsan_create_fiber(0);
#endif
  return f;
}

// ---- Scheduling ----------------------------------------------------------------------------

std::string describe_states(const Cta& cta) {
  int barrier = 0, done = 0;
  std::string warps;
  for (const Fiber* f : cta.threads) {
    if (f->state == State::kBarrier) ++barrier;
    if (f->state == State::kDone) ++done;
  }
  for (size_t w = 0; w < cta.warps.size(); ++w) {
    const WarpSlot& s = cta.warps[w];
    if (s.kind != nullptr) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "; warp %zu: lanes 0x%08x of mask 0x%08x at %s", w, s.arrived,
                    s.mask, s.kind);
      warps += buf;
    }
  }
  char buf[128];
  std::snprintf(buf, sizeof buf, "%d threads at __syncthreads, %d exited", barrier, done);
  return buf + warps;
}

void run_cta(Cta& cta) {
  for (;;) {
    bool ran = false;
    bool all_done = true;
    for (Fiber* f : cta.threads) {
      if (f->state == State::kRunnable) {
        switch_to_fiber(f);
        ran = true;
      }
      if (f->state != State::kDone) all_done = false;
    }
    if (all_done) return;
    if (!ran) fail("deadlock", "no thread of the CTA can proceed: %s", describe_states(cta).c_str());
  }
}

std::vector<uint64_t> cta_order(uint64_t n) {
  std::vector<uint64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  const char* env = std::getenv("QUANTLAB_EMU_CTA_ORDER");
  const std::string mode = env ? env : "forward";
  if (mode == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (mode.rfind("shuffle:", 0) == 0) {
    std::mt19937_64 gen(std::strtoull(mode.c_str() + 8, nullptr, 10));
    std::shuffle(order.begin(), order.end(), gen);
  } else if (mode != "forward") {
    fail("runtime", "QUANTLAB_EMU_CTA_ORDER=%s: use forward, reverse or shuffle:<seed>",
         mode.c_str());
  }
  return order;
}

constexpr int kErrorInvalidValue = 1;
constexpr int kErrorInvalidConfiguration = 9;

}  // namespace

// Byte copies and fills the sanitizers' interceptors do not see (memcpy/memset would be
// attributed to the fiber that happens to run the emulator's code); the attribute keeps g++ from
// turning the loops back into library calls.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void copy_bytes(
    void* dst, const void* src, size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  for (size_t i = 0; i < n; ++i) d[i] = s[i];
}

__attribute__((optimize("no-tree-loop-distribute-patterns"))) void fill_bytes(void* dst,
                                                                              unsigned char value,
                                                                              size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  for (size_t i = 0; i < n; ++i) d[i] = value;
}

// ---- Interface ------------------------------------------------------------------------------

const ThreadInfo& self() {
  Fiber* f = rt().current;
  if (f == nullptr) fail("runtime", "a device function was called outside a kernel");
  return f->info;
}

void fail(const char* check, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(check, fmt, ap);
  va_end(ap);
  std::abort();
}

int set_max_dynamic_smem(const void* kernel_id, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kMaxDynamicSmemOptIn) return kErrorInvalidValue;
  rt().max_dynamic_smem[kernel_id] = bytes;
  return 0;
}

int last_error_and_reset() {
  const int e = rt().last_error;
  rt().last_error = 0;
  return e;
}

int peek_last_error() { return rt().last_error; }

int launch(const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem, KernelBody body,
           void* closure) {
  Runtime& r = rt();
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const uint64_t ctas = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || ctas == 0 ||
      grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    return r.last_error = kErrorInvalidConfiguration;
  }
  const auto found = r.max_dynamic_smem.find(kernel_id);
  const size_t allowed = found == r.max_dynamic_smem.end() ? kDefaultDynamicSmem : found->second;
  if (dynamic_smem > allowed) return r.last_error = kErrorInvalidValue;
  if (r.scheduler_tsan == nullptr) {
#if QL_TSAN
    r.scheduler_tsan = __tsan_get_current_fiber();
#else
    r.scheduler_tsan = &r;
#endif
  }
  while (r.pool.size() < threads) r.pool.push_back(new_fiber());
  r.body = body;
  r.closure = closure;
  const unsigned warps = static_cast<unsigned>((threads + 31) / 32);
  for (uint64_t linear_cta : cta_order(ctas)) {
    Cta cta;
    r.cta = &cta;
    cta.warps.resize(warps);
    cta.dynamic_bytes = dynamic_smem;
    void* mem = nullptr;
    if (posix_memalign(&mem, 128, dynamic_smem) != 0) fail("runtime", "out of memory");
    cta.dynamic = static_cast<unsigned char*>(mem);
    fill_bytes(cta.dynamic, fill_byte(), dynamic_smem);
    const uint3 bidx{static_cast<unsigned>(linear_cta % grid.x),
                     static_cast<unsigned>(linear_cta / grid.x % grid.y),
                     static_cast<unsigned>(linear_cta / grid.x / grid.y)};
    for (uint64_t t = 0; t < threads; ++t) {
      Fiber* f = r.pool[t];
      f->info.thread_idx = {static_cast<unsigned>(t % block.x),
                            static_cast<unsigned>(t / block.x % block.y),
                            static_cast<unsigned>(t / block.x / block.y)};
      f->info.block_idx = bidx;
      f->info.block_dim = block;
      f->info.grid_dim = grid;
      f->info.linear = static_cast<int>(t);
      f->info.warp = static_cast<int>(t / 32);
      f->info.lane = static_cast<int>(t % 32);
      f->state = State::kRunnable;
      f->barriers_passed = 0;
      f->syncwarps_passed = 0;
      cta.threads.push_back(f);
    }
#if QL_TSAN
    // CTAs run one after the other, ordered through the scheduler: races between CTAs (which
    // only atomics and fences may order on the GPU) are not detected.
    __tsan_release(&r.cta_sync);
#endif
    run_cta(cta);
#if QL_TSAN
    __tsan_acquire(&r.done_sync);
#endif
    for (const SharedAlloc& a : cta.statics) std::free(a.ptr);
    std::free(cta.dynamic);
    r.cta = nullptr;
  }
  return 0;
}

void* dynamic_shared() { return rt().cta->dynamic; }

void* static_shared(const void* tag, size_t bytes, size_t align) {
  Cta& cta = *rt().cta;
  for (const SharedAlloc& a : cta.statics) {
    if (a.tag == tag) {
#if QL_TSAN
      __tsan_acquire(a.ptr);
#endif
      return a.ptr;
    }
  }
  if (cta.static_bytes + bytes + cta.dynamic_bytes > kMaxDynamicSmemOptIn) {
    fail("shared memory", "static (%zu B) + dynamic (%zu B) shared memory exceeds %zu B",
         cta.static_bytes + bytes, cta.dynamic_bytes, kMaxDynamicSmemOptIn);
  }
  void* mem = nullptr;
  if (posix_memalign(&mem, std::max<size_t>(align, 16), bytes) != 0) fail("runtime", "out of memory");
  fill_bytes(mem, fill_byte(), bytes);
  cta.statics.push_back({tag, static_cast<unsigned char*>(mem), bytes});
  cta.static_bytes += bytes;
#if QL_TSAN
  // The first thread to reach the declaration allocates it; every thread acquires it below, so
  // the allocation and the poison fill are not the kernel's accesses.
  __tsan_release(mem);
#endif
  return mem;
}

bool is_shared(const void* p, size_t bytes) {
  const Cta* cta = rt().cta;
  if (cta == nullptr) return false;
  const auto* b = static_cast<const unsigned char*>(p);
  auto inside = [&](const unsigned char* base, size_t n) {
    return b >= base && b + bytes <= base + n;
  };
  if (inside(cta->dynamic, cta->dynamic_bytes)) return true;
  for (const SharedAlloc& a : cta->statics)
    if (inside(a.ptr, a.bytes)) return true;
  return false;
}

namespace {

void barrier(int predicate) {
  Runtime& r = rt();
  Cta& cta = *r.cta;
  Fiber* f = r.current;
  for (const Fiber* other : cta.threads) {
    if (other->state == State::kDone) {
      fail("barrier divergence",
           "__syncthreads number %d reached while thread (%u,%u,%u) exited after %d", 
           f->barriers_passed + 1, other->info.thread_idx.x, other->info.thread_idx.y,
           other->info.thread_idx.z, other->barriers_passed);
    }
  }
  const int parity = cta.generation & 1;
#if QL_TSAN
  __tsan_release(&cta.barrier_sync[parity]);
#endif
  cta.vote_or |= predicate != 0;
  f->state = State::kBarrier;
  if (++cta.arrived == static_cast<int>(cta.threads.size())) {
    cta.vote_result[parity] = cta.vote_or;
    cta.vote_or = 0;
    cta.arrived = 0;
    ++cta.generation;
    for (Fiber* t : cta.threads) t->state = State::kRunnable;
  }
  yield_to_scheduler();
  ++f->barriers_passed;
#if QL_TSAN
  __tsan_acquire(&cta.barrier_sync[parity]);
#endif
}

}  // namespace

void syncthreads() { barrier(0); }

int syncthreads_or(int predicate) {
  const int parity = rt().cta->generation & 1;
  barrier(predicate);
  return rt().cta->vote_result[parity];
}

void warp_collective(const char* kind, unsigned mask, const void* in, size_t in_bytes, void* out,
                     size_t out_bytes, Combine combine, const void* context) {
  Runtime& r = rt();
  Cta& cta = *r.cta;
  Fiber* f = r.current;
  const int lane = f->info.lane;
  if (in_bytes > kSlotBytes || out_bytes > kSlotBytes) fail("runtime", "%s: operands too large", kind);
  if (!(mask >> lane & 1u)) {
    fail("warp collective", "%s called by lane %d, which is not in its mask 0x%08x", kind, lane,
         mask);
  }
  const unsigned present =
      cta.threads.size() >= static_cast<size_t>(f->info.warp + 1) * 32
          ? 0xFFFFFFFFu
          : (1u << (cta.threads.size() % 32)) - 1u;
  if ((mask & ~present) != 0) {
    fail("warp collective", "%s mask 0x%08x names lanes this warp does not have (0x%08x)", kind,
         mask, present);
  }
  WarpSlot& slot = cta.warps[f->info.warp];
  if (slot.kind == nullptr) {
    slot.kind = kind;
    slot.mask = mask;
  } else if (std::strcmp(slot.kind, kind) != 0 || slot.mask != mask) {
    fail("warp divergence", "lane %d reached %s (mask 0x%08x) while lanes 0x%08x wait at %s (mask 0x%08x)",
         lane, kind, mask, slot.arrived, slot.kind, slot.mask);
  }
  for (const Fiber* other : cta.threads) {
    if (other->info.warp == f->info.warp && (mask >> other->info.lane & 1u) &&
        other->state == State::kDone) {
      fail("warp divergence", "%s: lane %d of the mask has exited", kind, other->info.lane);
    }
  }
  copy_bytes(slot.in[lane], in, in_bytes);
  slot.arrived |= 1u << lane;
  f->state = State::kWarp;
  if (slot.arrived == mask) {
    combine(slot.in, slot.out, mask, context);
    for (Fiber* t : cta.threads)
      if (t->info.warp == f->info.warp && (mask >> t->info.lane & 1u)) t->state = State::kRunnable;
    slot.kind = nullptr;
    slot.arrived = 0;
  }
  yield_to_scheduler();
  copy_bytes(out, slot.out[lane], out_bytes);
}

namespace {
void no_combine(const unsigned char (*)[kSlotBytes], unsigned char (*)[kSlotBytes], unsigned,
                const void*) {}
}  // namespace

void syncwarp(unsigned mask) {
  // Unlike the other collectives, __syncwarp orders memory among the lanes it names (CUDA C++
  // Programming Guide, "Synchronization Functions"): a release before, an acquire after.
  Runtime& r = rt();
  Fiber* f = r.current;
  char* sync = &r.cta->warps[f->info.warp].sync[f->syncwarps_passed++ & 1];
#if QL_TSAN
  __tsan_release(sync);
#endif
  char none = 0;
  warp_collective("__syncwarp", mask, &none, 0, &none, 0, no_combine, nullptr);
#if QL_TSAN
  __tsan_acquire(sync);
#else
  (void)sync;
#endif
}

void cp_async_issue(const PendingCopy& copy) {
  Fiber* f = rt().current;
#if QL_ASAN
  ASAN_POISON_MEMORY_REGION(copy.dst, copy.bytes);
#endif
  f->uncommitted.push_back(copy);
}

void cp_async_commit() {
  Fiber* f = rt().current;
  f->groups.push_back(std::move(f->uncommitted));
  f->uncommitted.clear();
}

void cp_async_wait(int pending_allowed, PerformCopy perform) {
  Fiber* f = rt().current;
  while (static_cast<int>(f->groups.size()) > pending_allowed) {
    std::vector<PendingCopy> group = std::move(f->groups.front());
    f->groups.pop_front();
    for (const PendingCopy& c : group) {
#if QL_ASAN
      ASAN_UNPOISON_MEMORY_REGION(c.dst, c.bytes);
#endif
      perform(c);
    }
  }
}

}  // namespace quantlab_emu
