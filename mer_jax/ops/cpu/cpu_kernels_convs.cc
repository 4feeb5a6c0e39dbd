// Conv kernels for XLA:CPU behind the XLA FFI (see cpu_kernels.py): depthwise conv forward and backward,
// and the gradients of the frame trunks' convs (grey-input kernel and input gradients, a small conv's
// kernel gradient).
//
// Depthwise layout: x (N, H, W, C) float32, kernel (k, k, 1, C), output (N, Ho, Wo, C); zero padding `pad` on
// each side, the same stride on both axes. Channels are contiguous, so every inner loop runs over a block
// of channels and the compiler vectorises it.
//
// Why by hand: XLA:CPU has no fast depthwise kernel. Written as shifted slices, the backward becomes k*k
// loops that each read the whole output gradient again from memory. Here each image is done in one go,
// a block of channels at a time, while its slice of the input and the output gradient sit in cache;
// every sum is kept in registers and every output value is written once.

#include "cpu_kernels.h"

namespace mer_jax_kernels {
namespace {

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
// (ky, kx) read -> in_grad (N, H, W, 1), the sum over every tap that read each pixel. Which (tap row,
// output row) pairs reach an input row depends only on the row, so the pairs are listed once per call; each
// input row's shares are added into a row buffer with the padding columns, then copied out.
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

}  // namespace
}  // namespace mer_jax_kernels

using mer_jax_kernels::ConvSignature;

// x, kernel -> out.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxDepthwiseForward, mer_jax_kernels::ForwardImpl, (ConvSignature<2, 1>()));
// x, kernel, out_grad -> in_grad, kernel_grad.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxDepthwiseBackward, mer_jax_kernels::BackwardImpl, (ConvSignature<3, 2>()));
// x (N, H, W, 1), kernel, out_grad -> kernel_grad.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxOneChannelKernelGrad, mer_jax_kernels::OneChannelKernelGradImpl,
                              (ConvSignature<3, 1>()));
// x (N, H, W, Ci), kernel (k, k, Ci, Co), out_grad -> kernel_grad.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxConvKernelGrad, mer_jax_kernels::ConvKernelGradImpl, (ConvSignature<3, 1>()));
// tap_grads (N, Ho, Wo, k*k) -> in_grad (N, H, W, 1).
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxOneChannelInputGrad, mer_jax_kernels::OneChannelInputGradImpl,
                              (ConvSignature<1, 1>()));
