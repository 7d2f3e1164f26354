// fluxfill_native: shared declarations of the native kernel library (see ops.cpp).
//
// The *_alloc functions validate the arguments (TORCH_CHECK messages name the argument) and
// return the empty, contiguous outputs. They work on symbolic sizes, so the Meta kernels
// (FakeTensor, torch.compile) and the CPU/CUDA kernels share one set of checks and shapes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace fluxfill_native {

// fill_cond: [B, C, h, w] latents, [B, 1, h*s, w*s] mask -> [B, (h/2)*(w/2), 4*C + 4*s*s].
at::Tensor fill_cond_alloc(const at::Tensor& latents, const at::Tensor& mask, int64_t vae_scale_factor);

// qk_norm_rope: q, k [B, L, H, D] -> two [B, H, L, D] in q's dtype.
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_alloc(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_norm_w, const at::Tensor& k_norm_w,
    const at::Tensor& cos, const at::Tensor& sin, int64_t txt_len);

// t as a float32 contiguous tensor (t itself when it already is one).
at::Tensor float_contiguous(const at::Tensor& t);

#ifdef FLUXFILL_NATIVE_CUDA
at::Tensor fill_cond_cuda(const at::Tensor& latents, const at::Tensor& mask, int64_t vae_scale_factor);
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_norm_w, const at::Tensor& k_norm_w,
    const at::Tensor& cos, const at::Tensor& sin, int64_t txt_len, double eps);
#endif

}  // namespace fluxfill_native
