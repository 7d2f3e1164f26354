// fluxfill_native: CUDA kernels (compiled only when torch has CUDA; registered in ops.cpp).
//
// fill_cond: one thread per output element (grid-stride loop); pure data movement plus a cast.
// qk_norm_rope: one warp per (b, h, l) row; fp32 accumulation (fp64 for double inputs).
#include "fluxfill_native.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/TypeCast.h>

#include <algorithm>

namespace fluxfill_native {

namespace {

constexpr int kThreads = 256;                  // threads per block
constexpr int kWarpsPerBlock = kThreads / 32;  // qk_norm_rope rows per block
constexpr int64_t kMaxBlocks = 65535LL * 8;    // fill_cond grid cap (the loop is grid-stride)

template <typename out_t, typename mask_t>
__global__ void fill_cond_kernel(const out_t* __restrict__ lat, const mask_t* __restrict__ mask,
                                 out_t* __restrict__ out, int64_t total, int64_t row, int64_t lat_channels4,
                                 int64_t tokens, int64_t ww, int64_t s, int64_t l0, int64_t l1, int64_t l2,
                                 int64_t l3, int64_t m0, int64_t m2, int64_t m3) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < total; n += step) {
    const int64_t ch = n % row;
    const int64_t t = (n / row) % tokens;
    const int64_t b = n / (row * tokens);
    const int64_t i = t / ww, j = t % ww;
    if (ch < lat_channels4) {
      const int64_t c = ch >> 2, di = (ch >> 1) & 1, dj = ch & 1;
      out[n] = lat[b * l0 + c * l1 + (2 * i + di) * l2 + (2 * j + dj) * l3];
    } else {
      const int64_t m = ch - lat_channels4;
      const int64_t pq = m >> 2, di = (m >> 1) & 1, dj = m & 1;
      const int64_t p = pq / s, q = pq % s;
      out[n] = c10::convert<out_t>(mask[b * m0 + ((2 * i + di) * s + p) * m2 + ((2 * j + dj) * s + q) * m3]);
    }
  }
}

__device__ __forceinline__ float inv_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return rsqrt(v); }

template <typename scalar_t>
__global__ void qk_norm_rope_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                    const float* __restrict__ w, int64_t w_second, const float* __restrict__ cos,
                                    const float* __restrict__ sin, int64_t rows, int64_t len, int64_t heads,
                                    int64_t dim, int64_t x0, int64_t x1, int64_t x2, int64_t txt_len,
                                    at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;  // r is the same for the whole warp: the warp stays converged for the shuffles
  const int64_t l = r % len, h = (r / len) % heads, b = r / (len * heads);
  const scalar_t* in = x + b * x0 + l * x1 + h * x2;

  acc_t sum_sq = 0;
  for (int64_t d = lane; d < dim; d += 32) {
    const acc_t v = static_cast<acc_t>(in[d]);
    sum_sq += v * v;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  const acc_t inv_rms = inv_sqrt(sum_sq / static_cast<acc_t>(dim) + eps);

  const float* wr = w + (l >= txt_len ? w_second : 0);
  const float* c = cos + l * dim;
  const float* sn = sin + l * dim;
  scalar_t* o = out + r * dim;
  for (int64_t d = 2 * lane; d < dim; d += 64) {
    const acc_t re = static_cast<acc_t>(in[d]) * inv_rms * static_cast<acc_t>(wr[d]);
    const acc_t im = static_cast<acc_t>(in[d + 1]) * inv_rms * static_cast<acc_t>(wr[d + 1]);
    o[d] = static_cast<scalar_t>(re * static_cast<acc_t>(c[d]) - im * static_cast<acc_t>(sn[d]));
    o[d + 1] = static_cast<scalar_t>(im * static_cast<acc_t>(c[d + 1]) + re * static_cast<acc_t>(sn[d + 1]));
  }
}

template <typename scalar_t>
void launch_qk_norm_rope(const at::Tensor& x, const at::Tensor& w, const at::Tensor& cos, const at::Tensor& sin,
                         int64_t txt_len, double eps, at::Tensor& out, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0) * x.size(1) * x.size(2);
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  qk_norm_rope_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
      w.dim() == 2 ? x.size(3) : 0, cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), rows, x.size(1),
      x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), txt_len, static_cast<acc_t>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor fill_cond_cuda(const at::Tensor& latents, const at::Tensor& mask, int64_t vae_scale_factor) {
  at::Tensor out = fill_cond_alloc(latents, mask, vae_scale_factor);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(latents.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = out.numel();
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, latents.scalar_type(), "fill_cond_cuda", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(), "fill_cond_cuda_mask", [&] {
      fill_cond_kernel<out_t, scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          latents.const_data_ptr<out_t>(), mask.const_data_ptr<scalar_t>(), out.mutable_data_ptr<out_t>(), total,
          out.size(2), 4 * latents.size(1), out.size(1), latents.size(3) / 2, vae_scale_factor, latents.stride(0),
          latents.stride(1), latents.stride(2), latents.stride(3), mask.stride(0), mask.stride(2),
          mask.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_norm_w, const at::Tensor& k_norm_w,
    const at::Tensor& cos, const at::Tensor& sin, int64_t txt_len, double eps) {
  auto outs = qk_norm_rope_alloc(q, k, q_norm_w, k_norm_w, cos, sin, txt_len);
  if (q.numel() == 0) return outs;
  const c10::cuda::CUDAGuard guard(q.device());
  // q and k are read in place; the small operands are made fp32 contiguous (a no-op when they are).
  const at::Tensor qw = float_contiguous(q_norm_w), kw = float_contiguous(k_norm_w);
  const at::Tensor cos_c = float_contiguous(cos), sin_c = float_contiguous(sin);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_norm_rope_cuda", [&] {
    launch_qk_norm_rope<scalar_t>(q, qw, cos_c, sin_c, txt_len, eps, std::get<0>(outs), stream);
    launch_qk_norm_rope<scalar_t>(k, kw, cos_c, sin_c, txt_len, eps, std::get<1>(outs), stream);
  });
  return outs;
}

}  // namespace fluxfill_native
