// Kernels for XLA:CPU, called through the XLA FFI (see cpu_kernels.py): depthwise conv forward and
// backward, and per-channel sums for BatchNorm (at the end).
//
// Depthwise layout: x (N, H, W, C) float32, kernel (k, k, 1, C), output (N, Ho, Wo, C); zero padding `pad` on
// each side, the same stride on both axes. Channels are contiguous, so every inner loop runs over a block
// of channels and the compiler vectorises it.
//
// Why by hand: XLA:CPU has no fast depthwise kernel. Written as shifted slices, the backward becomes k*k
// loops that each read the whole output gradient again from memory. Here each image is done in one go,
// a block of channels at a time, while its slice of the input and the output gradient sit in cache;
// every sum is kept in registers and every output value is written once.
//
// Images are split between the threads of XLA's intra-op pool. Each chunk of images writes its own
// kernel-gradient partial, and the partials are added up in chunk order, so results do not depend on
// the schedule.

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

namespace {

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

void Drain(const std::shared_ptr<ParallelState>& state) {
  for (int64_t i = state->next.fetch_add(1); i < state->count; i = state->next.fetch_add(1)) {
    state->body(i);
    if (state->finished.fetch_add(1) + 1 == state->count) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->all_finished.notify_all();
    }
  }
}

void ParallelFor(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> body) {
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
int64_t NumChunks(ffi::ThreadPool& pool, int64_t batch) {
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

// One image, channels [c0, c0 + V * width of T): each output position sums its taps in registers.
template <typename T, int V, typename F>
void ForwardBlock(const Geometry& g, const float* x, const float* kernel, float* out, int64_t c0) {
  constexpr int L = Width<T>();
  const int64_t k = F::Kernel(g), C = g.channels, s = F::Stride(g);
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    for (int64_t ox = 0; ox < g.out_width; ++ox) {
      T acc[V] = {};
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t iy = oy * s - g.pad + ky;
        if (iy < 0 || iy >= g.height) continue;
        for (int64_t kx = 0; kx < k; ++kx) {
          const int64_t ix = ox * s - g.pad + kx;
          if (ix < 0 || ix >= g.width) continue;
          const float* xi = x + (iy * g.width + ix) * C + c0;
          const float* w = kernel + (ky * k + kx) * C + c0;
          for (int v = 0; v < V; ++v) acc[v] += Load<T>(xi + v * L) * Load<T>(w + v * L);
        }
      }
      float* o = out + (oy * g.out_width + ox) * C + c0;
      for (int v = 0; v < V; ++v) Store<T>(o + v * L, acc[v]);
    }
  }
}

// One image's input gradient for a channel block, in gather form: each input position sums, in
// registers, the output gradients of the positions whose window covers it, times the tap that links them.
// Every input value is written once (no zeroing, no read-modify-write).
template <typename T, int V, typename F>
void InputGradBlock(const Geometry& g, const float* kernel, const float* out_grad, float* in_grad, int64_t c0) {
  constexpr int L = Width<T>();
  const int64_t k = F::Kernel(g), C = g.channels, s = F::Stride(g);
  for (int64_t iy = 0; iy < g.height; ++iy) {
    for (int64_t ix = 0; ix < g.width; ++ix) {
      T acc[V] = {};
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t ty = iy + g.pad - ky;  // = oy * s
        if (ty < 0 || ty % s) continue;
        const int64_t oy = ty / s;
        if (oy >= g.out_height) continue;
        for (int64_t kx = 0; kx < k; ++kx) {
          const int64_t tx = ix + g.pad - kx;
          if (tx < 0 || tx % s) continue;
          const int64_t ox = tx / s;
          if (ox >= g.out_width) continue;
          const float* go = out_grad + (oy * g.out_width + ox) * C + c0;
          const float* w = kernel + (ky * k + kx) * C + c0;
          for (int v = 0; v < V; ++v) acc[v] += Load<T>(go + v * L) * Load<T>(w + v * L);
        }
      }
      float* dx = in_grad + (iy * g.width + ix) * C + c0;
      for (int v = 0; v < V; ++v) Store<T>(dx + v * L, acc[v]);
    }
  }
}

// One image's depthwise kernel gradient for a channel block: tap by tap, the products of output gradient
// and input summed in registers over the positions where the tap is inside the image, then added to `sums`
// (k*k, C). Positions go round-robin to kChains sets of accumulators: with one set, every product waits
// for the previous add (a chain of FMA latencies) when the block is only one or two vectors wide.
template <typename T, int V, typename F>
void KernelGradBlock(const Geometry& g, const float* x, const float* out_grad, float* sums, int64_t c0) {
  constexpr int L = Width<T>();
  constexpr int kChains = V >= 4 ? 1 : 4 / V;
  const int64_t k = F::Kernel(g), C = g.channels, s = F::Stride(g);
  for (int64_t ky = 0; ky < k; ++ky) {
    int64_t oy0, oy1;
    ValidRange(ky, g, g.height, g.out_height, &oy0, &oy1);
    for (int64_t kx = 0; kx < k; ++kx) {
      int64_t ox0, ox1;
      ValidRange(kx, g, g.width, g.out_width, &ox0, &ox1);
      T acc[kChains][V] = {};
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        const float* go = out_grad + (oy * g.out_width + ox0) * C + c0;
        const float* xi = x + ((oy * s - g.pad + ky) * g.width + ox0 * s - g.pad + kx) * C + c0;
        int64_t ox = ox0;
        for (; ox + kChains <= ox1; ox += kChains, go += kChains * C, xi += kChains * s * C)
          for (int u = 0; u < kChains; ++u)
            for (int v = 0; v < V; ++v) acc[u][v] += Load<T>(go + u * C + v * L) * Load<T>(xi + u * s * C + v * L);
        for (; ox < ox1; ++ox, go += C, xi += s * C)
          for (int v = 0; v < V; ++v) acc[0][v] += Load<T>(go + v * L) * Load<T>(xi + v * L);
      }
      for (int u = 1; u < kChains; ++u)
        for (int v = 0; v < V; ++v) acc[0][v] += acc[u][v];
      float* sum = sums + (ky * k + kx) * C + c0;
      for (int v = 0; v < V; ++v) Store<T>(sum + v * L, Load<T>(sum + v * L) + acc[0][v]);
    }
  }
}

// One image's kernel gradient for a grey-input conv, one vector of channels [c0, c0 + width of T): every
// output position reads its output gradient once and adds its product with each of the k*k taps' pixels to
// that tap's accumulator (k*k independent sums in registers). `padded` is the image with its zero border,
// (padded_height, padded_width), so no tap needs a bounds check.
template <typename T, typename F>
void OneChannelKernelGradBlock(const Geometry& g, const float* padded, int64_t padded_width, const float* out_grad,
                               float* sums, int64_t c0) {
  constexpr int kMaxTaps = 25;
  const int64_t k = F::Kernel(g), C = g.channels, s = F::Stride(g);
  T acc[kMaxTaps] = {};
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    const float* go = out_grad + oy * g.out_width * C + c0;
    const float* row = padded + oy * s * padded_width;
    for (int64_t ox = 0; ox < g.out_width; ++ox, go += C, row += s) {
      const T grad = Load<T>(go);
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx) acc[ky * k + kx] += grad * row[ky * padded_width + kx];
    }
  }
  for (int64_t t = 0; t < k * k; ++t) Store<T>(sums + t * C + c0, Load<T>(sums + t * C + c0) + acc[t]);
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
void SumPartials(const std::vector<float>& partials, int64_t chunks, int64_t size, float* out) {
  std::memcpy(out, partials.data(), sizeof(float) * size);
  for (int64_t chunk = 1; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < size; ++i) out[i] += partials[chunk * size + i];
}

Geometry MakeGeometry(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& kernel, int64_t stride,
                      int64_t pad) {
  auto dims = x.dimensions();
  Geometry g;
  g.batch = dims[0], g.height = dims[1], g.width = dims[2], g.channels = kernel.dimensions()[3];
  g.kernel = kernel.dimensions()[0], g.stride = stride, g.pad = pad;
  g.out_height = (g.height + 2 * pad - g.kernel) / stride + 1;
  g.out_width = (g.width + 2 * pad - g.kernel) / stride + 1;
  return g;
}

template <bool kOneChannel>
ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& kernel, int64_t stride) {
  if (x.dimensions().size() != 4 || kernel.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("conv: x must be (N, H, W, C or 1) and kernel (k, k, 1, C)");
  auto k = kernel.dimensions();
  if (k[0] != k[1] || k[2] != 1 || x.dimensions()[3] != (kOneChannel ? 1 : k[3]) || stride < 1)
    return ffi::Error::InvalidArgument(kOneChannel
                                           ? "grey-input conv: x must be (N, H, W, 1) and kernel (k, k, 1, C)"
                                           : "depthwise: kernel must be (k, k, 1, C) with C = x's channels");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> out, int64_t stride, int64_t pad) {
  if (ffi::Error error = CheckShapes<false>(x, kernel, stride); error.failure()) return error;
  const Geometry g = MakeGeometry(x, kernel, stride, pad);
  const float* xs = x.typed_data();
  const float* ws = kernel.typed_data();
  float* os = out->typed_data();
  const int64_t in_image = g.height * g.width * g.channels;
  const int64_t out_image = g.out_height * g.out_width * g.channels;
  WithFixedGeometry(g, [&](auto fixed) {
    using F = decltype(fixed);
    ParallelFor(pool, g.batch, [&](int64_t n) {
      const float* xn = xs + n * in_image;
      float* on = os + n * out_image;
      ForChannelBlocks(g.channels, [&](auto block, int64_t c0) {
        using B = decltype(block);
        ForwardBlock<typename B::Type, B::kVectors, F>(g, xn, ws, on, c0);
      });
    });
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                        ffi::Buffer<ffi::F32> out_grad, ffi::ResultBuffer<ffi::F32> in_grad,
                        ffi::ResultBuffer<ffi::F32> kernel_grad, int64_t stride, int64_t pad) {
  if (ffi::Error error = CheckShapes<false>(x, kernel, stride); error.failure()) return error;
  const Geometry g = MakeGeometry(x, kernel, stride, pad);
  const int64_t taps = g.kernel * g.kernel, C = g.channels;
  const int64_t in_image = g.height * g.width * C;
  const int64_t out_image = g.out_height * g.out_width * C;
  const int64_t chunks = NumChunks(pool, g.batch);
  std::vector<float> partials(chunks * taps * C, 0.0f);  // (chunk, tap, C)
  const float* xs = x.typed_data();
  const float* ws = kernel.typed_data();
  const float* gs = out_grad.typed_data();
  float* dxs = in_grad->typed_data();
  WithFixedGeometry(g, [&](auto fixed) {
    using F = decltype(fixed);
    ParallelFor(pool, chunks, [&](int64_t chunk) {
      const int64_t first = g.batch * chunk / chunks, last = g.batch * (chunk + 1) / chunks;
      float* partial = partials.data() + chunk * taps * C;
      for (int64_t n = first; n < last; ++n) {
        const float* xn = xs + n * in_image;
        const float* gn = gs + n * out_image;
        float* dxn = dxs + n * in_image;
        ForChannelBlocks(C, [&](auto block, int64_t c0) {
          using B = decltype(block);
          InputGradBlock<typename B::Type, B::kVectors, F>(g, ws, gn, dxn, c0);
          KernelGradBlock<typename B::Type, B::kVectors, F>(g, xn, gn, partial, c0);
        });
      }
    });
  });
  SumPartials(partials, chunks, taps * C, kernel_grad->typed_data());
  return ffi::Error::Success();
}

// The kernel gradient alone of a grey-input conv, x (N, H, W, 1): for the convs whose input gradient XLA
// computes itself (fused with the work around it) or does not need (pixels).
ffi::Error OneChannelKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                                    ffi::Buffer<ffi::F32> out_grad, ffi::ResultBuffer<ffi::F32> kernel_grad,
                                    int64_t stride, int64_t pad) {
  if (ffi::Error error = CheckShapes<true>(x, kernel, stride); error.failure()) return error;
  const Geometry g = MakeGeometry(x, kernel, stride, pad);
  if (g.kernel > 5) return ffi::Error::InvalidArgument("grey-input conv kernel gradient: kernel size above 5");
  const int64_t taps = g.kernel * g.kernel, C = g.channels;
  const int64_t in_image = g.height * g.width;
  const int64_t out_image = g.out_height * g.out_width * C;
  // Every tap of every output position lies inside the padded image.
  const int64_t padded_height = (g.out_height - 1) * g.stride + g.kernel;
  const int64_t padded_width = (g.out_width - 1) * g.stride + g.kernel;
  const int64_t chunks = NumChunks(pool, g.batch);
  std::vector<float> partials(chunks * taps * C, 0.0f);  // (chunk, tap, C)
  const float* xs = x.typed_data();
  const float* gs = out_grad.typed_data();
  WithFixedGeometry(g, [&](auto fixed) {
    using F = decltype(fixed);
    ParallelFor(pool, chunks, [&](int64_t chunk) {
      float* partial = partials.data() + chunk * taps * C;
      std::vector<float> padded(padded_height * padded_width, 0.0f);
      const int64_t rows = std::max<int64_t>(0, std::min(g.height, padded_height - g.pad));
      const int64_t cols = std::max<int64_t>(0, std::min(g.width, padded_width - g.pad));
      for (int64_t n = g.batch * chunk / chunks; n < g.batch * (chunk + 1) / chunks; ++n) {
        for (int64_t y = 0; y < rows; ++y)  // the border stays zero from the allocation
          std::memcpy(&padded[(y + g.pad) * padded_width + g.pad], xs + n * in_image + y * g.width,
                      sizeof(float) * cols);
        const float* gn = gs + n * out_image;
        int64_t c0 = 0;
        for (; c0 + kLanes <= C; c0 += kLanes)
          OneChannelKernelGradBlock<Vec, F>(g, padded.data(), padded_width, gn, partial, c0);
        if constexpr (kLanes > 8) {
          for (; c0 + 8 <= C; c0 += 8)
            OneChannelKernelGradBlock<Vec8, F>(g, padded.data(), padded_width, gn, partial, c0);
        }
        for (; c0 < C; ++c0) OneChannelKernelGradBlock<float, F>(g, padded.data(), padded_width, gn, partial, c0);
      }
    });
  });
  SumPartials(partials, chunks, taps * C, kernel_grad->typed_data());
  return ffi::Error::Success();
}

// One image's kernel gradient of a conv with several input channels, x (H, W, Ci) and out_grad (Ho, Wo, Co),
// for input channels [ci0, ci0 + kInputs) and a block of output channels from co0: tap by tap, each output
// position's gradient vector times each of its input pixel's kInputs channels, summed in registers, then
// added to `sums` (k, k, Ci, Co). g.channels is Co.
template <typename T, int V, typename F, int kInputs>
void ConvKernelGradBlock(const Geometry& g, int64_t in_channels, const float* x, const float* out_grad,
                         float* sums, int64_t ci0, int64_t co0) {
  constexpr int L = Width<T>();
  const int64_t k = F::Kernel(g), C = g.channels, s = F::Stride(g), Ci = in_channels;
  for (int64_t ky = 0; ky < k; ++ky) {
    int64_t oy0, oy1;
    ValidRange(ky, g, g.height, g.out_height, &oy0, &oy1);
    for (int64_t kx = 0; kx < k; ++kx) {
      int64_t ox0, ox1;
      ValidRange(kx, g, g.width, g.out_width, &ox0, &ox1);
      T acc[kInputs][V] = {};
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        const float* go = out_grad + (oy * g.out_width + ox0) * C + co0;
        const float* xi = x + ((oy * s - g.pad + ky) * g.width + ox0 * s - g.pad + kx) * Ci + ci0;
        for (int64_t ox = ox0; ox < ox1; ++ox, go += C, xi += s * Ci) {
          T grad[V];
          for (int v = 0; v < V; ++v) grad[v] = Load<T>(go + v * L);
          for (int c = 0; c < kInputs; ++c)
            for (int v = 0; v < V; ++v) acc[c][v] += grad[v] * xi[c];
        }
      }
      for (int c = 0; c < kInputs; ++c) {
        float* sum = sums + ((ky * k + kx) * Ci + ci0 + c) * C + co0;
        for (int v = 0; v < V; ++v) Store<T>(sum + v * L, Load<T>(sum + v * L) + acc[c][v]);
      }
    }
  }
}

ffi::Error ConvKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                              ffi::Buffer<ffi::F32> out_grad, ffi::ResultBuffer<ffi::F32> kernel_grad,
                              int64_t stride, int64_t pad) {
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != kd[1] || kd[2] != xd[3] || stride < 1)
    return ffi::Error::InvalidArgument("conv kernel gradient: x must be (N, H, W, Ci) and kernel (k, k, Ci, Co)");
  Geometry g;
  g.batch = xd[0], g.height = xd[1], g.width = xd[2], g.channels = kd[3], g.kernel = kd[0];
  g.stride = stride, g.pad = pad;
  g.out_height = (g.height + 2 * pad - g.kernel) / stride + 1;
  g.out_width = (g.width + 2 * pad - g.kernel) / stride + 1;
  const int64_t Ci = xd[3], C = g.channels, size = g.kernel * g.kernel * Ci * C;
  if (out_grad.element_count() != g.batch * g.out_height * g.out_width * C)
    return ffi::Error::InvalidArgument("conv kernel gradient: out_grad must be (N, Ho, Wo, Co)");
  const int64_t in_image = g.height * g.width * Ci, out_image = g.out_height * g.out_width * C;
  const int64_t chunks = NumChunks(pool, g.batch);
  std::vector<float> partials(chunks * size, 0.0f);  // (chunk, k, k, Ci, Co)
  const float* xs = x.typed_data();
  const float* gs = out_grad.typed_data();
  WithFixedGeometry(g, [&](auto fixed) {
    using F = decltype(fixed);
    ParallelFor(pool, chunks, [&](int64_t chunk) {
      float* partial = partials.data() + chunk * size;
      for (int64_t n = g.batch * chunk / chunks; n < g.batch * (chunk + 1) / chunks; ++n) {
        ForChannelBlocks(C, [&](auto block, int64_t co0) {
          using B = decltype(block);
          int64_t ci0 = 0;
          for (; ci0 + 4 <= Ci; ci0 += 4)
            ConvKernelGradBlock<typename B::Type, B::kVectors, F, 4>(g, Ci, xs + n * in_image, gs + n * out_image,
                                                                     partial, ci0, co0);
          for (; ci0 < Ci; ++ci0)
            ConvKernelGradBlock<typename B::Type, B::kVectors, F, 1>(g, Ci, xs + n * in_image, gs + n * out_image,
                                                                     partial, ci0, co0);
        });
      }
    });
  });
  SumPartials(partials, chunks, size, kernel_grad->typed_data());
  return ffi::Error::Success();
}

// The input gradient of a grey-input conv from its taps' shares: tap_grads (N, Ho, Wo, k*k), where
// tap_grads[n, oy, ox, ky*k + kx] is what output position (oy, ox) passes to the input pixel its tap
// (ky, kx) read -> in_grad (N, H, W, 1), the sum over every tap that read each pixel. Gather form: which
// (tap row, output row) pairs reach an input row depends only on the row (likewise for columns), so the
// pairs are listed once per call and each pixel adds its few shares in registers and is written once.
struct TapReach {
  int64_t count = 0;
  int64_t tap[8], out[8];  // at most ceil(k / stride) <= k <= 7 pairs
};

std::vector<TapReach> ReachingTaps(int64_t size, int64_t out_size, int64_t kernel, int64_t stride, int64_t pad) {
  std::vector<TapReach> reach(size);
  for (int64_t i = 0; i < size; ++i)
    for (int64_t k = 0; k < kernel; ++k) {
      const int64_t shifted = i + pad - k;  // = output index * stride
      if (shifted < 0 || shifted % stride || shifted / stride >= out_size) continue;
      reach[i].tap[reach[i].count] = k;
      reach[i].out[reach[i].count++] = shifted / stride;
    }
  return reach;
}

ffi::Error OneChannelInputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> tap_grads,
                                   ffi::ResultBuffer<ffi::F32> in_grad, int64_t stride, int64_t pad) {
  auto t = tap_grads.dimensions();
  auto x = in_grad->dimensions();
  int64_t kernel = 0;
  while (t.size() == 4 && (kernel + 1) * (kernel + 1) <= t[3]) ++kernel;
  if (t.size() != 4 || x.size() != 4 || x[3] != 1 || x[0] != t[0] || kernel * kernel != t[3] || stride < 1 ||
      kernel > 7)
    return ffi::Error::InvalidArgument("grey-input conv input gradient: tap_grads must be (N, Ho, Wo, k*k) "
                                       "with k <= 7 and the input gradient (N, H, W, 1)");
  const int64_t batch = x[0], height = x[1], width = x[2], out_height = t[1], out_width = t[2];
  const int64_t taps = kernel * kernel;
  const std::vector<TapReach> rows = ReachingTaps(height, out_height, kernel, stride, pad);
  const float* shares = tap_grads.typed_data();
  float* result = in_grad->typed_data();
  ParallelFor(pool, batch, [&](int64_t n) {
    const float* image_shares = shares + n * out_height * out_width * taps;
    float* image = result + n * height * width;
    // One input row at a time in a buffer with the padding columns on both sides (and room for the last
    // output column's taps): each (tap row, tap column) pair adds one strided run of shares to it.
    std::vector<float> line(std::max(width + 2 * pad, (out_width - 1) * stride + kernel), 0.0f);
    for (int64_t iy = 0; iy < height; ++iy) {
      std::fill(line.begin(), line.end(), 0.0f);
      const TapReach& row = rows[iy];
      for (int64_t r = 0; r < row.count; ++r) {
        const float* share = image_shares + row.out[r] * out_width * taps + row.tap[r] * kernel;
        for (int64_t kx = 0; kx < kernel; ++kx) {
          float* to = line.data() + kx;
          for (int64_t ox = 0; ox < out_width; ++ox) to[ox * stride] += share[ox * taps + kx];
        }
      }
      std::memcpy(image + iy * width, line.data() + pad, sizeof(float) * width);
    }
  });
  return ffi::Error::Success();
}

// Channel sums: over every position of a and b, both (..., C), per channel, sum(a) and sum(a * b).
// BatchNorm's statistics are (sum x, sum x*x) = ChannelSums(x, x); the gradients of its scale-and-shift
// are (sum g, sum g*x) = ChannelSums(g, x). Positions go in tiles of kTilePositions, so a tile's rows stay
// in cache while each channel block reads them; a block sums its tile in float32 registers and adds the
// result to the chunk's float64 totals, which keeps long sums (N*H*W ~ 400k terms) accurate.
constexpr int64_t kTilePositions = 128;

template <typename T> inline void AddTo(double* out, T v) {
  float lanes[Width<T>()];
  std::memcpy(lanes, &v, sizeof(T));
  for (int i = 0; i < Width<T>(); ++i) out[i] += lanes[i];
}

template <typename T, int V>
void ChannelSumsBlock(const float* a, const float* b, int64_t positions, int64_t C, int64_t c0, double* sum_a,
                      double* sum_ab) {
  constexpr int L = Width<T>();
  T acc_a[V] = {}, acc_ab[V] = {};
  for (int64_t p = 0; p < positions; ++p) {
    const float* ap = a + p * C + c0;
    const float* bp = b + p * C + c0;
    for (int v = 0; v < V; ++v) {
      const T av = Load<T>(ap + v * L);
      acc_a[v] += av;
      acc_ab[v] += av * Load<T>(bp + v * L);
    }
  }
  for (int v = 0; v < V; ++v) {
    AddTo(sum_a + c0 + v * L, acc_a[v]);
    AddTo(sum_ab + c0 + v * L, acc_ab[v]);
  }
}

ffi::Error ChannelSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                           ffi::ResultBuffer<ffi::F32> sum_a, ffi::ResultBuffer<ffi::F32> sum_ab) {
  auto dims = a.dimensions();
  if (dims.size() < 1 || b.element_count() != a.element_count() || b.dimensions().back() != dims.back())
    return ffi::Error::InvalidArgument("channel sums: a and b must both be (..., C) of the same shape");
  const int64_t C = dims.back();
  const int64_t positions = C == 0 ? 0 : a.element_count() / C;
  const int64_t tiles = (positions + kTilePositions - 1) / kTilePositions;
  const int64_t chunks = std::max<int64_t>(1, NumChunks(pool, tiles));
  std::vector<double> partials(chunks * 2 * C, 0.0);  // (chunk, {a, ab}, C)
  const float* as = a.typed_data();
  const float* bs = b.typed_data();
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    double* partial_a = partials.data() + chunk * 2 * C;
    double* partial_ab = partial_a + C;
    for (int64_t tile = tiles * chunk / chunks; tile < tiles * (chunk + 1) / chunks; ++tile) {
      const int64_t p0 = tile * kTilePositions, count = std::min(kTilePositions, positions - p0);
      ForChannelBlocks(C, [&](auto block, int64_t c0) {
        using B = decltype(block);
        ChannelSumsBlock<typename B::Type, B::kVectors>(as + p0 * C, bs + p0 * C, count, C, c0, partial_a,
                                                         partial_ab);
      });
    }
  });
  float* out_a = sum_a->typed_data();
  float* out_ab = sum_ab->typed_data();
  for (int64_t c = 0; c < C; ++c) {
    double total_a = 0.0, total_ab = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      total_a += partials[chunk * 2 * C + c];
      total_ab += partials[chunk * 2 * C + C + c];
    }
    out_a[c] = static_cast<float>(total_a);
    out_ab[c] = static_cast<float>(total_ab);
  }
  return ffi::Error::Success();
}

// Frame gather: selection (B, K, T) float32 and frames (B, T, P) uint8 (P = pixels of a frame, any trailing
// dims) -> (B, K, P) float32, out[b, k] = sum over t of selection[b, k, t] * frames[b, t]. The pixels are
// converted to float in registers, so the frames are read as bytes once and never written out as floats.
constexpr int64_t kGatherPixels = 2048;  // pixels per work item: a few items per image for two threads

// kLanes pixels (bytes) as floats. GCC scalarises __builtin_convertvector from bytes, hence the intrinsics.
inline Vec LoadPixels(const uint8_t* p) {
#if defined(__AVX512F__)
  return (Vec)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (Vec)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  float lanes[kLanes];
  for (int i = 0; i < kLanes; ++i) lanes[i] = p[i];
  return Load<Vec>(lanes);
#endif
}

struct GatherShape {
  int64_t batch, slots, frames, pixels;
};

ffi::Error CheckGather(ffi::Buffer<ffi::F32>& selection, ffi::Buffer<ffi::U8>& frames, GatherShape* shape) {
  auto s = selection.dimensions();
  auto f = frames.dimensions();
  if (s.size() != 3 || f.size() < 2 || f[0] != s[0] || f[1] != s[2])
    return ffi::Error::InvalidArgument("frame gather: selection must be (B, K, T) and frames (B, T, ...)");
  shape->batch = s[0], shape->slots = s[1], shape->frames = s[2];
  shape->pixels = s[0] * s[2] == 0 ? 0 : frames.element_count() / (s[0] * s[2]);
  return ffi::Error::Success();
}

ffi::Error FrameGatherImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> selection, ffi::Buffer<ffi::U8> frames,
                           ffi::ResultBuffer<ffi::F32> out) {
  GatherShape d;
  if (ffi::Error error = CheckGather(selection, frames, &d); error.failure()) return error;
  const int64_t pieces = (d.pixels + kGatherPixels - 1) / kGatherPixels;
  const float* weights = selection.typed_data();
  const uint8_t* pixels = frames.typed_data();
  float* result = out->typed_data();
  ParallelFor(pool, d.batch * pieces, [&](int64_t item) {
    const int64_t b = item / pieces, p0 = (item % pieces) * kGatherPixels;
    const int64_t p1 = std::min(d.pixels, p0 + kGatherPixels);
    const uint8_t* image = pixels + b * d.frames * d.pixels;
    const float* w = weights + b * d.slots * d.frames;  // (K, T)
    float* o = result + b * d.slots * d.pixels;         // (K, P)
    for (int64_t k = 0; k < d.slots; ++k) {
      // Frames with weight 0 add exactly 0 (pixels are finite), so they are skipped: a hard top-K selection
      // is one-hot, and each slot then costs one read of one frame.
      const float* wk = w + k * d.frames;
      float* ok = o + k * d.pixels;
      std::vector<int64_t> used;
      for (int64_t t = 0; t < d.frames; ++t)
        if (wk[t] != 0.0f) used.push_back(t);
      int64_t p = p0;
      for (; p + kLanes <= p1; p += kLanes) {
        Vec acc = {};
        for (int64_t t : used) acc += wk[t] * LoadPixels(image + t * d.pixels + p);
        Store<Vec>(ok + p, acc);
      }
      for (; p < p1; ++p) {
        float acc = 0.0f;
        for (int64_t t : used) acc += wk[t] * image[t * d.pixels + p];
        ok[p] = acc;
      }
    }
  });
  return ffi::Error::Success();
}

// The frame gather's gradient with respect to the selection: out_grad (B, K, P) float32 and the frames ->
// (B, K, T), the dot product of each slot's output gradient with each frame's pixels. One image per work
// item, so each sum is added in one fixed order.
ffi::Error FrameGatherSelectionGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> selection,
                                        ffi::Buffer<ffi::U8> frames, ffi::Buffer<ffi::F32> out_grad,
                                        ffi::ResultBuffer<ffi::F32> selection_grad) {
  GatherShape d;
  if (ffi::Error error = CheckGather(selection, frames, &d); error.failure()) return error;
  if (out_grad.element_count() != d.batch * d.slots * d.pixels)
    return ffi::Error::InvalidArgument("frame gather gradient: out_grad must be (B, K, pixels of a frame)");
  const uint8_t* pixels = frames.typed_data();
  const float* grads = out_grad.typed_data();
  float* result = selection_grad->typed_data();
  constexpr int kChains = 4;
  ParallelFor(pool, d.batch, [&](int64_t b) {
    const uint8_t* image = pixels + b * d.frames * d.pixels;
    for (int64_t k = 0; k < d.slots; ++k) {
      const float* g = grads + (b * d.slots + k) * d.pixels;
      for (int64_t t = 0; t < d.frames; ++t) {
        const uint8_t* f = image + t * d.pixels;
        Vec acc[kChains] = {};
        int64_t p = 0;
        for (; p + kChains * kLanes <= d.pixels; p += kChains * kLanes)
          for (int u = 0; u < kChains; ++u)
            acc[u] += Load<Vec>(g + p + u * kLanes) * LoadPixels(f + p + u * kLanes);
        for (; p + kLanes <= d.pixels; p += kLanes) acc[0] += Load<Vec>(g + p) * LoadPixels(f + p);
        Vec total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        float lanes[kLanes];
        std::memcpy(lanes, &total, sizeof(Vec));
        float sum = 0.0f;
        for (int i = 0; i < kLanes; ++i) sum += lanes[i];
        for (; p < d.pixels; ++p) sum += g[p] * f[p];
        result[(b * d.slots + k) * d.frames + t] = sum;
      }
    }
  });
  return ffi::Error::Success();
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

}  // namespace

// x, kernel -> out.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxDepthwiseForward, ForwardImpl, (ConvSignature<2, 1>()));
// x, kernel, out_grad -> in_grad, kernel_grad.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxDepthwiseBackward, BackwardImpl, (ConvSignature<3, 2>()));
// x (N, H, W, 1), kernel, out_grad -> kernel_grad.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxOneChannelKernelGrad, OneChannelKernelGradImpl, (ConvSignature<3, 1>()));
// x (N, H, W, Ci), kernel (k, k, Ci, Co), out_grad -> kernel_grad.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxConvKernelGrad, ConvKernelGradImpl, (ConvSignature<3, 1>()));
// tap_grads (N, Ho, Wo, k*k) -> in_grad (N, H, W, 1).
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxOneChannelInputGrad, OneChannelInputGradImpl, (ConvSignature<1, 1>()));
// a, b -> sum a, sum a*b.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxChannelSums, ChannelSumsImpl, (Signature<2, 2>()));
// selection (B, K, T), frames (B, T, ...) uint8 -> (B, K, pixels).
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxFrameGather, FrameGatherImpl,
                              (ffi::Ffi::Bind()
                                   .Ctx<ffi::ThreadPool>()
                                   .Arg<ffi::Buffer<ffi::F32>>()
                                   .Arg<ffi::Buffer<ffi::U8>>()
                                   .Ret<ffi::Buffer<ffi::F32>>()));
// selection (B, K, T), frames (B, T, ...) uint8, out_grad (B, K, pixels) -> selection_grad (B, K, T).
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxFrameGatherSelectionGrad, FrameGatherSelectionGradImpl,
                              (ffi::Ffi::Bind()
                                   .Ctx<ffi::ThreadPool>()
                                   .Arg<ffi::Buffer<ffi::F32>>()
                                   .Arg<ffi::Buffer<ffi::U8>>()
                                   .Arg<ffi::Buffer<ffi::F32>>()
                                   .Ret<ffi::Buffer<ffi::F32>>()));
