// The emulation's driver: runs the kernel families' own host launchers (csrc/<family>/*.cu,
// compiled for the CPU) on buffers read from files, one command per line of stdin, and writes
// the output buffers back. tests/emulation/ drives it; the checks live in the tests and in the
// sanitizers the runner is built with.
//
//   <op> in.<name>=<path> out.<name>=<path>:<bytes> p.<name>=<int> off.<name>=<bytes> ...
//
// Every buffer is its own heap allocation of exactly its size (so an access one element past it
// is out of bounds for ASan), 256-byte aligned like cudaMalloc unless off.<name> shifts it.
// Output buffers start filled with 0xFF bytes (NaN in every float type): an output element a
// kernel never writes is visible. The runner prints "done <op>" after each command.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "bitstack/cuda_kernels.cuh"
#include "groupwise_int/cuda_kernels.cuh"
#include "groupwise_int/cuda_mma.cuh"
#include "groupwise_int/mma_layout.h"
#include "pvq/cuda_kernels.cuh"
#include "pvq/pvq_decode.h"
#include "ternary/cuda_kernels.cuh"

namespace {

struct Buffer {
  void* base = nullptr;  // the allocation
  unsigned char* data = nullptr;
  size_t bytes = 0;
  std::string out_path;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "quantlab-emulation runner: %s\n", why.c_str());
  std::exit(2);
}

class Command {
 public:
  explicit Command(const std::string& line) {
    std::istringstream in(line);
    in >> op_;
    std::string tok;
    std::map<std::string, size_t> offsets;
    std::vector<std::pair<std::string, std::string>> buffers;
    while (in >> tok) {
      const size_t eq = tok.find('=');
      if (eq == std::string::npos) usage("bad token " + tok);
      const std::string key = tok.substr(0, eq), value = tok.substr(eq + 1);
      if (key.rfind("p.", 0) == 0) {
        params_[key.substr(2)] = std::strtoll(value.c_str(), nullptr, 10);
      } else if (key.rfind("off.", 0) == 0) {
        offsets[key.substr(4)] = std::strtoull(value.c_str(), nullptr, 10);
      } else if (key.rfind("in.", 0) == 0 || key.rfind("out.", 0) == 0) {
        buffers.emplace_back(key, value);
      } else {
        usage("bad key " + key);
      }
    }
    for (const auto& [key, value] : buffers) {
      const bool is_in = key[0] == 'i';
      const std::string name = key.substr(is_in ? 3 : 4);
      Buffer b;
      std::string path = value;
      if (!is_in) {
        const size_t colon = value.rfind(':');
        if (colon == std::string::npos) usage("out." + name + " needs <path>:<bytes>");
        path = value.substr(0, colon);
        b.bytes = std::strtoull(value.c_str() + colon + 1, nullptr, 10);
        b.out_path = path;
      } else {
        FILE* f = std::fopen(path.c_str(), "rb");
        if (!f) usage("cannot read " + path);
        std::fseek(f, 0, SEEK_END);
        b.bytes = static_cast<size_t>(std::ftell(f));
        std::fclose(f);
      }
      const size_t off = offsets.count(name) ? offsets[name] : 0;
      if (posix_memalign(&b.base, 256, b.bytes + off) != 0) usage("out of memory");
      b.data = static_cast<unsigned char*>(b.base) + off;
      if (is_in) {
        FILE* f = std::fopen(path.c_str(), "rb");
        if (std::fread(b.data, 1, b.bytes, f) != b.bytes) usage("short read " + path);
        std::fclose(f);
      } else {
        std::memset(b.data, 0xFF, b.bytes);
      }
      buffers_[name] = b;
    }
  }
  ~Command() {
    for (auto& [name, b] : buffers_) std::free(b.base);
  }

  const std::string& op() const { return op_; }
  int64_t p(const std::string& name) const {
    const auto it = params_.find(name);
    if (it == params_.end()) usage(op_ + ": missing p." + name);
    return it->second;
  }
  int64_t p(const std::string& name, int64_t fallback) const {
    const auto it = params_.find(name);
    return it == params_.end() ? fallback : it->second;
  }
  template <typename T = void>
  T* buf(const std::string& name) {
    const auto it = buffers_.find(name);
    if (it == buffers_.end()) usage(op_ + ": missing buffer " + name);
    return reinterpret_cast<T*>(it->second.data);
  }
  template <typename T = void>
  T* opt_buf(const std::string& name) {
    const auto it = buffers_.find(name);
    return it == buffers_.end() ? nullptr : reinterpret_cast<T*>(it->second.data);
  }
  void write_outputs() {
    for (auto& [name, b] : buffers_) {
      if (b.out_path.empty()) continue;
      FILE* f = std::fopen(b.out_path.c_str(), "wb");
      if (!f || std::fwrite(b.data, 1, b.bytes, f) != b.bytes) usage("cannot write " + b.out_path);
      std::fclose(f);
    }
  }

 private:
  std::string op_;
  std::map<std::string, int64_t> params_;
  std::map<std::string, Buffer> buffers_;
};

// p.expect_error=1: the launcher must refuse the call (its error is printed, the runner goes on);
// otherwise a launch error stops the runner.
bool g_expect_error = false;

void check(cudaError_t err, const std::string& op) {
  if (g_expect_error) {
    if (err == cudaSuccess) {
      std::fprintf(stderr, "quantlab-emulation: launch: %s succeeded, an error was expected\n",
                   op.c_str());
      std::exit(3);
    }
    std::printf("error %s\n", cudaGetErrorString(err));
    return;
  }
  if (err != cudaSuccess) {
    std::fprintf(stderr, "quantlab-emulation: launch: %s returned %s\n", op.c_str(),
                 cudaGetErrorString(err));
    std::exit(3);
  }
}

template <typename E>
E dtype(int64_t code) {
  return static_cast<E>(code);  // 0 fp32, 1 fp16, 2 bf16 in every family's DType
}

// ---- groupwise_int --------------------------------------------------------------------------

quantlab::groupwise_int::CudaWeight groupwise_weight(Command& c) {
  quantlab::groupwise_int::CudaWeight w{};
  w.qweight = c.buf<uint32_t>("qweight");
  w.scales = c.buf<float>("scales");
  w.qzeros = c.opt_buf<uint32_t>("qzeros");
  w.n = c.p("n");
  w.k = c.p("k");
  w.group_size = c.p("group_size");
  w.bits = static_cast<int>(c.p("bits"));
  return w;
}

void run(Command& c) {
  namespace gw = quantlab::groupwise_int;
  const std::string& op = c.op();
  if (op == "groupwise_int_dequant") {
    check(gw::launch_dequant(groupwise_weight(c), c.buf("out"), dtype<gw::DType>(c.p("dtype")),
                             nullptr),
          op);
  } else if (op == "groupwise_int_gemv") {
    check(gw::launch_gemv(groupwise_weight(c), c.buf("x"), c.buf("y"), c.p("m"),
                          dtype<gw::DType>(c.p("dtype")), nullptr),
          op);
  } else if (op == "groupwise_int_grouped_gemv") {
    gw::GroupedWeight w{};
    w.qweight = c.buf<uint32_t>("qweight");
    w.scales = c.buf("scales");
    w.qzeros = c.opt_buf<uint32_t>("qzeros");
    w.scale_dtype = dtype<gw::DType>(c.p("scale_dtype"));
    w.experts = c.p("experts");
    w.n = c.p("n");
    w.k = c.p("k");
    w.group_size = c.p("group_size");
    w.bits = static_cast<int>(c.p("bits"));
    check(gw::launch_grouped_gemv(w, c.buf<int64_t>("offsets"), c.opt_buf("x"), c.opt_buf("y"),
                                  c.p("rows"), dtype<gw::DType>(c.p("dtype")), nullptr),
          op);
  } else if (op == "groupwise_int_gemm") {
    const gw::CudaWeight w = groupwise_weight(c);
    const int64_t m = c.p("m");
    const int requested = static_cast<int>(c.p("splits"));
    const int splits = requested > 0 ? std::min(requested, gw::kGemmMaxSplits)
                                     : gw::gemm_pick_splits(m, w.n, w.k, quantlab_emu::kSmCount);
    const size_t bytes = gw::gemm_workspace_bytes(m, w.n, w.k, splits);
    std::vector<float> workspace(bytes / sizeof(float));
    check(gw::launch_gemm(w, c.buf("x"), c.buf("y"), m, dtype<gw::DType>(c.p("dtype")), splits,
                          bytes ? workspace.data() : nullptr, nullptr),
          op);
    std::printf("splits %d\n", splits);
  } else if (op == "groupwise_int_mma") {
    gw::MmaWeight w{};
    w.qweight = c.buf<uint32_t>("qweight");
    w.scales = c.buf("scales");
    w.zeros = c.opt_buf<uint32_t>("zeros");
    w.scale_dtype = dtype<gw::DType>(c.p("scale_dtype"));
    w.n = c.p("n");
    w.k = c.p("k");
    w.group_size = c.p("group_size");
    w.bits = static_cast<int>(c.p("bits"));
    const int64_t m = c.p("m");
    const gw::DType act = dtype<gw::DType>(c.p("dtype"));
    const int splits = gw::mma_resolve_splits(
        w, m, act, std::min<int>(static_cast<int>(c.p("splits")), gw::kMmaMaxSplits),
        quantlab_emu::kSmCount);
    const size_t bytes = gw::mma_workspace_bytes(w, m, splits);
    const int64_t n_counters = gw::mma_counter_count(w, m, splits);
    // As the binding allocates them: the workspace uninitialised, the counters zeroed.
    std::vector<float> workspace(bytes / sizeof(float));
    if (bytes > 0) std::memset(workspace.data(), 0xFF, bytes);
    std::vector<int> counters(static_cast<size_t>(std::max<int64_t>(n_counters, 0)), 0);
    const int launches = static_cast<int>(c.p("launches", 1));
    for (int i = 0; i < launches; ++i) {  // a reused counter buffer must be reset by the kernel
      check(gw::launch_mma(w, c.buf("x"), c.buf("y"), m, act, splits,
                           bytes ? workspace.data() : nullptr, bytes ? counters.data() : nullptr,
                           nullptr),
            op);
    }
    for (int v : counters)
      if (v != 0) quantlab_emu::fail("split-K", "a tile counter was left at %d after the launch", v);
    std::printf("splits %d\n", splits);
  } else if (op == "groupwise_int_mma_repack") {
    // The CUDA repack kernel (cuda_mma_repack.cu) on exported tensors: qweight [n, q_row_words],
    // scales [n, groups] 16-bit, qzeros [n, z_row_words] when present.
    namespace ml = gw::mma_layout;
    gw::mma_repack::Source s{};
    s.qweight = c.buf<uint32_t>("qweight");
    s.scales = c.buf<uint16_t>("scales");
    s.qzeros = c.opt_buf<uint32_t>("qzeros");
    s.n = c.p("n");
    s.k = c.p("k");
    s.groups = c.p("groups");
    s.bits = static_cast<int>(c.p("bits"));
    s.q_row_words = (s.k * s.bits + 31) / 32;
    s.z_row_words = (s.groups * s.bits + 31) / 32;
    gw::mma_repack::Extents e{};
    e.k16 = ml::k_pad(s.k) / ml::kTileK;
    e.n_tiles = ml::n_pad(s.n) / ml::kTileN;
    e.groups = ml::kernel_groups(s.k, c.p("group_size"));
    check(gw::launch_mma_repack(s, e, c.buf<uint32_t>("q"), c.buf<uint16_t>("s"),
                                c.opt_buf<uint32_t>("z"), nullptr),
          op);
  } else if (op == "groupwise_int_mma_layout_map") {
    // The mma layout's index maps as mma_layout.h defines them (what the kernel reads), for the
    // tests to check the Python repack against: per (n, k) of the padded weight the qweight word
    // and bit of its code; per (n, group) the scales index and the zeros word and bit; the split
    // plan for every request 0..20.
    namespace ml = gw::mma_layout;
    const int64_t n_pad = gw::mma_n_pad(c.p("n"));
    const int64_t k_pad = gw::mma_k_pad(c.p("k"));
    const int64_t group = c.p("group_size");
    const int bits = static_cast<int>(c.p("bits"));
    const int64_t n_tiles = n_pad / ml::kTileN;
    const int64_t groups = (k_pad + group - 1) / group;
    auto* q = c.buf<int64_t>("qpos");  // [n_pad, k_pad, 2]
    for (int64_t kk = 0; kk < k_pad / ml::kTileK; ++kk)
      for (int64_t nn = 0; nn < n_tiles; ++nn)
        for (int lane = 0; lane < 32; ++lane)
          for (int word = 0; word < bits; ++word)
            for (int slot = 0; slot < 32 / bits; ++slot) {
              const ml::TilePosition at = ml::b_code_position(lane, word, slot, bits);
              const int64_t n = nn * ml::kTileN + at.col, k = kk * ml::kTileK + at.k;
              q[(n * k_pad + k) * 2] = ml::b_word(kk, nn, n_tiles, lane, word, bits);
              q[(n * k_pad + k) * 2 + 1] = slot * bits;
            }
    auto* sp = c.buf<int64_t>("spos");  // [n_pad, groups]
    auto* zp = c.buf<int64_t>("zpos");  // [n_pad, groups, 2]
    for (int64_t grp = 0; grp < groups; ++grp)
      for (int64_t nn = 0; nn < n_tiles; ++nn)
        for (int g = 0; g < 8; ++g)
          for (int sub = 0; sub < 8; ++sub) {
            const int64_t n = nn * ml::kTileN + 8 * sub + g;
            sp[n * groups + grp] = ml::scale_index(grp, nn, n_tiles, g, sub);
            zp[(n * groups + grp) * 2] = ml::zero_word(grp, nn, n_tiles, g, sub, bits);
            zp[(n * groups + grp) * 2 + 1] = ml::zero_bit(sub, bits);
          }
    auto* plan = c.buf<int64_t>("plan");  // [21, 2]
    for (int requested = 0; requested <= 20; ++requested) {
      int splits = 0, per = 0;
      ml::split_plan(k_pad / ml::kStageK, requested, gw::kMmaMaxSplits, &splits, &per);
      plan[requested * 2] = splits;
      plan[requested * 2 + 1] = per;
    }
  }
  // ---- ternary ----
  else if (op == "ternary_gemv") {
    namespace t = quantlab::ternary;
    t::CudaWeight w{};
    w.qweight = c.buf<uint8_t>("qweight");
    w.scales = c.buf<float>("scales");
    w.n = c.p("n");
    w.k = c.p("k");
    w.row_bytes = c.p("row_bytes");
    w.group_size = c.p("group_size");
    if (!t::gemv_supported(w)) quantlab_emu::fail("runner", "ternary gemv does not support this");
    check(t::launch_gemv(w, c.buf("x"), c.buf("y"), c.p("m"), dtype<t::DType>(c.p("dtype")),
                         quantlab_emu::kSmCount,
                         static_cast<int>(quantlab_emu::kMaxDynamicSmemOptIn), nullptr),
          op);
  } else if (op == "ternary_fake_quantize") {
    namespace t = quantlab::ternary;
    check(t::launch_fake_quantize_activations(c.buf("x"), c.buf("out"), c.p("m"), c.p("k"),
                                              dtype<t::DType>(c.p("dtype")), nullptr),
          op);
  } else if (op == "ternary_dequant") {
    namespace t = quantlab::ternary;
    check(t::launch_dequant(c.buf<uint8_t>("qweight"), static_cast<int>(c.p("packing")),
                            c.p("row_bytes"), c.buf<float>("scales"), c.p("n"), c.p("k"),
                            c.p("group_size"), c.buf("out"), dtype<t::DType>(c.p("dtype")),
                            nullptr),
          op);
  } else if (op == "ternary_to_aligned_i2") {
    namespace t = quantlab::ternary;
    check(t::launch_to_aligned_i2(c.buf<uint8_t>("qweight"), static_cast<int>(c.p("packing")),
                                  c.p("row_bytes_in"), c.p("n"), c.p("k"), c.buf<uint8_t>("out"),
                                  c.p("row_bytes_out"), nullptr),
          op);
  }
  // ---- bitstack ----
  else if (op == "bitstack_gemv" || op == "bitstack_dequant_rows") {
    namespace b = quantlab::bitstack;
    b::CudaWeight w{};
    w.signs = c.buf<uint8_t>("signs");
    w.u = c.buf<uint16_t>("u");
    w.v = c.buf<uint16_t>("v");
    w.blocks = c.p("blocks");
    w.n = c.p("n");
    w.k = c.p("k");
    w.rank = c.p("rank");
    if (op == "bitstack_gemv") {
      if (!b::gemv_supported(w, c.p("m"))) quantlab_emu::fail("runner", "bitstack gemv unsupported");
      check(b::launch_gemv(w, c.buf("x"), c.buf("y"), c.p("m"), dtype<b::DType>(c.p("dtype")),
                           nullptr),
            op);
    } else {
      check(b::launch_dequant_rows(w, c.p("row0"), c.p("row1"), c.buf("out"),
                                   dtype<b::DType>(c.p("dtype")), nullptr),
            op);
    }
  }
  // ---- pvq ----
  else if (op == "pvq_decode" || op == "pvq_gemv") {
    namespace q = quantlab::pvq;
    q::CudaWeight w{};
    w.codes = c.buf<uint32_t>("codes");
    w.n_words = c.p("n_words");
    w.row_scales = c.buf<float>("row_scales");
    w.levels = c.buf<float>("levels");
    w.n_levels = c.p("n_levels");
    w.n = c.p("n");
    w.k = c.p("k");
    w.dim = static_cast<int>(c.p("dim"));
    w.pulses = static_cast<int>(c.p("pulses"));
    w.code_bits = static_cast<int>(c.p("code_bits"));
    std::vector<uint64_t> counts(q::count_entries(w.dim, w.pulses));
    if (!q::fill_counts(w.dim, w.pulses, counts.data())) quantlab_emu::fail("runner", "N too big");
    w.counts = counts.data();
    w.size = counts[w.dim * (w.pulses + 1) + w.pulses];
    if (op == "pvq_decode") {
      check(q::launch_decode(w, c.buf("out"), dtype<q::DType>(c.p("dtype")), nullptr), op);
    } else {
      check(q::launch_gemv(w, c.buf("x"), c.buf("y"), c.p("m"), dtype<q::DType>(c.p("dtype")),
                           nullptr),
            op);
    }
  } else {
    usage("unknown op " + op);
  }
}

}  // namespace

int main() {
  std::string line;
  char chunk[4096];
  while (std::fgets(chunk, sizeof chunk, stdin)) {
    line += chunk;
    if (line.empty() || line.back() != '\n') continue;
    line.pop_back();
    if (!line.empty()) {
      Command c(line);
      g_expect_error = c.p("expect_error", 0) != 0;
      run(c);
      c.write_outputs();
      std::printf("done %s\n", c.op().c_str());
      std::fflush(stdout);
    }
    line.clear();
  }
  return 0;
}
