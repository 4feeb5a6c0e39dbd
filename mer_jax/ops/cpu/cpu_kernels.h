// Shared parts of the XLA:CPU FFI kernels (cpu_kernels_convs.cc, cpu_kernels_sums.cc; see cpu_kernels.py):
// the intra-op thread split, float vectors as wide as the CPU's registers, conv geometry, channel blocks,
// and the handlers' FFI signatures.
//
// Every kernel splits its work (images, pixel ranges) between the threads of XLA's intra-op pool. Work that
// sums over images writes one partial per chunk of images, and the partials are added up in chunk order,
// so results do not depend on the schedule.

#ifndef MER_JAX_CPU_KERNELS_H_
#define MER_JAX_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mer_jax_kernels {

struct Geometry {
  int64_t batch, height, width, channels, kernel, stride, pad, out_height, out_width;
};

// Runs body(i) for i in [0, count) on the caller and on the pool's threads. Items are claimed from an
// atomic counter, so a task that starts late finds nothing left and returns; the caller waits only for
// items that were claimed, which are running.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  int64_t count = 0;
  std::function<void(int64_t)> body;
  std::mutex mutex;
  std::condition_variable all_finished;
};

inline void Drain(const std::shared_ptr<ParallelState>& state) {
  for (int64_t i = state->next.fetch_add(1); i < state->count; i = state->next.fetch_add(1)) {
    state->body(i);
    if (state->finished.fetch_add(1) + 1 == state->count) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->all_finished.notify_all();
    }
  }
}

inline void ParallelFor(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> body) {
  auto state = std::make_shared<ParallelState>();
  state->count = count;
  state->body = std::move(body);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { Drain(state); });
  Drain(state);
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_finished.wait(lock, [&] { return state->finished.load() == state->count; });
}

// How many chunks of images: enough to balance two threads, few enough to keep partials small.
inline int64_t NumChunks(ffi::ThreadPool& pool, int64_t batch) {
  return std::max<int64_t>(1, std::min<int64_t>(batch, 4 * std::max<int64_t>(1, pool.num_threads())));
}

// Floats as one value: GCC/Clang vector extensions, which become SIMD registers with -march=native. Vec is
// as wide as the CPU's registers: 16 floats where AVX-512 is there (one zmm), else 8 (one AVX register,
// or two SSE or NEON registers). Memory is only read and written through memcpy (Load, Store), since
// channel blocks need not be aligned.
typedef float Vec8 __attribute__((vector_size(32)));
#if defined(__AVX512F__)
typedef float Vec __attribute__((vector_size(64)));
constexpr int kLanes = 16;
#else
typedef Vec8 Vec;
constexpr int kLanes = 8;
#endif

template <typename T> inline T Load(const float* p) { T v; std::memcpy(&v, p, sizeof(T)); return v; }
template <typename T> inline void Store(float* p, T v) { std::memcpy(p, &v, sizeof(T)); }
template <typename T> constexpr int Width() { return sizeof(T) / sizeof(float); }

// Output positions [first, last) along one axis whose tap `offset` reads an input index inside [0, size):
// o * stride - pad + offset in [0, size).
inline void ValidRange(int64_t offset, const Geometry& g, int64_t size, int64_t out_size, int64_t* first,
                       int64_t* last) {
  const int64_t lo = g.pad - offset, hi = size + g.pad - offset;  // lo <= o * stride < hi
  *first = lo <= 0 ? 0 : (lo + g.stride - 1) / g.stride;
  *last = std::max(*first, std::min(out_size, hi <= 0 ? 0 : (hi + g.stride - 1) / g.stride));
}

// Stride and kernel size as compile-time constants for the model's layers (0: read them from Geometry),
// so that tap loops unroll and the stride's divisions become shifts.
template <int S, int K> struct Fixed {
  static int64_t Stride(const Geometry& g) { return S ? S : g.stride; }
  static int64_t Kernel(const Geometry& g) { return K ? K : g.kernel; }
};

template <typename F>
void WithFixedGeometry(const Geometry& g, F body) {
  if (g.stride == 1 && g.kernel == 3) return body(Fixed<1, 3>());
  if (g.stride == 2 && g.kernel == 3) return body(Fixed<2, 3>());
  if (g.stride == 1 && g.kernel == 5) return body(Fixed<1, 5>());
  if (g.stride == 2 && g.kernel == 5) return body(Fixed<2, 5>());
  body(Fixed<0, 0>());
}

// Channel blocks of 4, 2 and 1 full vectors, one of 8 (with 16 lanes), then single channels, so that any
// channel count works and the common ones (multiples of 8) run vector code only. block(tag, c0) is called
// with a tag whose type names the block (T, V).
template <typename T, int V> struct Block { using Type = T; static constexpr int kVectors = V; };

template <typename F>
void ForChannelBlocks(int64_t channels, F block) {
  int64_t c0 = 0;
  for (; c0 + 4 * kLanes <= channels; c0 += 4 * kLanes) block(Block<Vec, 4>(), c0);
  for (; c0 + 2 * kLanes <= channels; c0 += 2 * kLanes) block(Block<Vec, 2>(), c0);
  for (; c0 + kLanes <= channels; c0 += kLanes) block(Block<Vec, 1>(), c0);
  if constexpr (kLanes > 8) {
    for (; c0 + 8 <= channels; c0 += 8) block(Block<Vec8, 1>(), c0);
  }
  for (; c0 < channels; ++c0) block(Block<float, 1>(), c0);
}

// Adds the per-chunk partials (chunks, size) in chunk order into out (size): the same result whatever the
// thread schedule was.
inline void SumPartials(const std::vector<float>& partials, int64_t chunks, int64_t size, float* out) {
  std::memcpy(out, partials.data(), sizeof(float) * size);
  for (int64_t chunk = 1; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < size; ++i) out[i] += partials[chunk * size + i];
}

// The handlers' signatures: XLA's intra-op pool, then float32 buffers: `kArgs` operands and `kResults`
// (>= 1) results, in order; the convs add their stride and pad attributes. (A binding can only be extended,
// not copied or moved, hence the recursion ends on the last result.)
template <int kArgs, int kResults, typename Binding>
auto WithBuffers(Binding&& binding) {
  static_assert(kResults >= 1, "every handler returns a buffer");
  if constexpr (kArgs > 0) {
    return WithBuffers<kArgs - 1, kResults>(std::move(binding).template Arg<ffi::Buffer<ffi::F32>>());
  } else if constexpr (kResults > 1) {
    return WithBuffers<0, kResults - 1>(std::move(binding).template Ret<ffi::Buffer<ffi::F32>>());
  } else {
    return std::move(binding).template Ret<ffi::Buffer<ffi::F32>>();
  }
}

template <int kArgs, int kResults>
auto Signature() {
  return WithBuffers<kArgs, kResults>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>());
}

template <int kArgs, int kResults>
auto ConvSignature() {
  return Signature<kArgs, kResults>().template Attr<int64_t>("stride").template Attr<int64_t>("pad");
}

}  // namespace mer_jax_kernels

#endif  // MER_JAX_CPU_KERNELS_H_
