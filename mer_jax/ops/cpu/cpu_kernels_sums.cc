// Sum kernels for XLA:CPU behind the XLA FFI (see cpu_kernels.py): per-channel sums for BatchNorm, and the
// top-K frame gather (a weighted sum of uint8 frames) with its selection gradient.

#include "cpu_kernels.h"

namespace mer_jax_kernels {
namespace {

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

}  // namespace
}  // namespace mer_jax_kernels

using mer_jax_kernels::Signature;

// a, b -> sum a, sum a*b.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxChannelSums, mer_jax_kernels::ChannelSumsImpl, (Signature<2, 2>()));
// selection (B, K, T), frames (B, T, ...) uint8 -> (B, K, pixels).
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxFrameGather, mer_jax_kernels::FrameGatherImpl,
                              (ffi::Ffi::Bind()
                                   .Ctx<ffi::ThreadPool>()
                                   .Arg<ffi::Buffer<ffi::F32>>()
                                   .Arg<ffi::Buffer<ffi::U8>>()
                                   .Ret<ffi::Buffer<ffi::F32>>()));
// selection (B, K, T), frames (B, T, ...) uint8, out_grad (B, K, pixels) -> selection_grad (B, K, T).
XLA_FFI_DEFINE_HANDLER_SYMBOL(MerJaxFrameGatherSelectionGrad, mer_jax_kernels::FrameGatherSelectionGradImpl,
                              (ffi::Ffi::Bind()
                                   .Ctx<ffi::ThreadPool>()
                                   .Arg<ffi::Buffer<ffi::F32>>()
                                   .Arg<ffi::Buffer<ffi::U8>>()
                                   .Arg<ffi::Buffer<ffi::F32>>()
                                   .Ret<ffi::Buffer<ffi::F32>>()));
