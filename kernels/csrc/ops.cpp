// fluxfill_native: schemas, argument checks, Meta and CPU kernels of the native kernel library.
//
// Built by the repository's CMakeLists.txt into fluxfill_kernels/_C.so and loaded with
// torch.ops.load_library (fluxfill_kernels/native.py); registration is TORCH_LIBRARY only, so the
// library does not link libpython. The CUDA kernels live in ops_cuda.cu, compiled only when torch
// has CUDA (FLUXFILL_NATIVE_CUDA).
#include "fluxfill_native.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace fluxfill_native {

namespace {

// Work per parallel_for chunk, in elements (ATen uses the same figure).
constexpr int64_t kGrainElements = 32768;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

void check_norm_weight(const at::Tensor& w, const char* name, const c10::SymInt& head_dim, const at::Tensor& q) {
  const bool ok = (w.dim() == 1 && w.sym_size(0) == head_dim) ||
      (w.dim() == 2 && w.sym_size(0) == 2 && w.sym_size(1) == head_dim);
  TORCH_CHECK(ok, "qk_norm_rope: ", name, " must be [D] or [2, D] with D = ", head_dim, "; got shape ",
              w.sym_sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "qk_norm_rope: ", name, " must be floating point; got ",
              w.scalar_type());
  TORCH_CHECK(w.device() == q.device(), "qk_norm_rope: ", name, " is on ", w.device(), " but q is on ",
              q.device());
}

void check_rope_table(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 2 && t.sym_size(0) == q.sym_size(1) && t.sym_size(1) == q.sym_size(3), "qk_norm_rope: ",
              name, " must be [L, D] = [", q.sym_size(1), ", ", q.sym_size(3), "]; got shape ", t.sym_sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "qk_norm_rope: ", name, " must be floating point (float32 "
              "preferred); got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "qk_norm_rope: ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

}  // namespace

at::Tensor float_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::Tensor fill_cond_alloc(const at::Tensor& latents, const at::Tensor& mask, int64_t vae_scale_factor) {
  const int64_t s = vae_scale_factor;
  TORCH_CHECK(s >= 1, "fill_cond: vae_scale_factor must be >= 1; got ", s);
  TORCH_CHECK(latents.dim() == 4, "fill_cond: masked_image_latents must be [B, C, h, w]; got shape ",
              latents.sym_sizes());
  TORCH_CHECK(at::isFloatingType(latents.scalar_type()),
              "fill_cond: masked_image_latents must be floating point; got ", latents.scalar_type());
  TORCH_CHECK(latents.sym_size(2) % 2 == 0 && latents.sym_size(3) % 2 == 0,
              "fill_cond: masked_image_latents height and width must be even; got shape ", latents.sym_sizes());
  TORCH_CHECK(mask.dim() == 4 && mask.sym_size(0) == latents.sym_size(0) && mask.sym_size(1) == 1 &&
                  mask.sym_size(2) == latents.sym_size(2) * s && mask.sym_size(3) == latents.sym_size(3) * s,
              "fill_cond: mask must be [B, 1, h*s, w*s] = [", latents.sym_size(0), ", 1, ", latents.sym_size(2) * s,
              ", ", latents.sym_size(3) * s, "] for masked_image_latents of shape ", latents.sym_sizes(),
              " and vae_scale_factor ", s, "; got shape ", mask.sym_sizes());
  TORCH_CHECK(at::isFloatingType(mask.scalar_type()), "fill_cond: mask must be floating point; got ",
              mask.scalar_type());
  TORCH_CHECK(mask.device() == latents.device(), "fill_cond: mask is on ", mask.device(),
              " but masked_image_latents is on ", latents.device());
  const c10::SymInt tokens = (latents.sym_size(2) / 2) * (latents.sym_size(3) / 2);
  const c10::SymInt channels = latents.sym_size(1) * 4 + 4 * s * s;
  return at::empty_symint({latents.sym_size(0), tokens, channels}, latents.options());
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_alloc(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_norm_w, const at::Tensor& k_norm_w,
    const at::Tensor& cos, const at::Tensor& sin, int64_t txt_len) {
  TORCH_CHECK(q.dim() == 4, "qk_norm_rope: q must be [B, L, H, D]; got shape ", q.sym_sizes());
  TORCH_CHECK(k.sym_sizes() == q.sym_sizes(), "qk_norm_rope: k must have q's shape ", q.sym_sizes(),
              "; got ", k.sym_sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "qk_norm_rope: q must be floating point; got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "qk_norm_rope: k must have q's dtype ", q.scalar_type(),
              "; got ", k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "qk_norm_rope: k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK(q.sym_size(3) % 2 == 0, "qk_norm_rope: head dim D of q must be even; got ", q.sym_size(3));
  TORCH_CHECK(q.sym_stride(3) == 1, "qk_norm_rope: q's last dim must be contiguous; got strides ",
              q.sym_strides());
  TORCH_CHECK(k.sym_stride(3) == 1, "qk_norm_rope: k's last dim must be contiguous; got strides ",
              k.sym_strides());
  check_norm_weight(q_norm_w, "q_norm_w", q.sym_size(3), q);
  check_norm_weight(k_norm_w, "k_norm_w", q.sym_size(3), q);
  check_rope_table(cos, "cos", q);
  check_rope_table(sin, "sin", q);
  TORCH_CHECK(txt_len >= 0 && txt_len <= q.sym_size(1), "qk_norm_rope: txt_len must lie in [0, L = ",
              q.sym_size(1), "]; got ", txt_len);
  const c10::SymInt shape[4] = {q.sym_size(0), q.sym_size(2), q.sym_size(1), q.sym_size(3)};
  return {at::empty_symint(shape, q.options()), at::empty_symint(shape, k.options())};
}

namespace {

// ---- fill_cond ------------------------------------------------------------------------------------
// One output row per packed token (b, i, j): 4C latent values (c, di, dj), then 4*s*s mask values
// ((p*s + q), di, dj) read from mask[b, 0, (2i+di)*s + p, (2j+dj)*s + q] and cast to the output dtype.

template <typename out_t, typename mask_t>
void fill_cond_cpu_kernel(const at::Tensor& lat, const at::Tensor& mask, int64_t s, at::Tensor& out) {
  const int64_t channels = lat.size(1), hh = lat.size(2) / 2, ww = lat.size(3) / 2;
  const int64_t row = out.size(2), tokens = out.size(0) * hh * ww;
  const int64_t l0 = lat.stride(0), l1 = lat.stride(1), l2 = lat.stride(2), l3 = lat.stride(3);
  const int64_t m0 = mask.stride(0), m2 = mask.stride(2), m3 = mask.stride(3);
  const out_t* lat_p = lat.const_data_ptr<out_t>();
  const mask_t* mask_p = mask.const_data_ptr<mask_t>();
  out_t* out_p = out.mutable_data_ptr<out_t>();
  at::parallel_for(0, tokens, grain_for(row), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (hh * ww), i = (t / ww) % hh, j = t % ww;
      out_t* o = out_p + t * row;
      const out_t* l = lat_p + b * l0 + 2 * i * l2 + 2 * j * l3;
      for (int64_t c = 0; c < channels; ++c) {
        const out_t* lc = l + c * l1;
        *o++ = lc[0];
        *o++ = lc[l3];
        *o++ = lc[l2];
        *o++ = lc[l2 + l3];
      }
      const mask_t* m = mask_p + b * m0 + 2 * i * s * m2 + 2 * j * s * m3;
      for (int64_t p = 0; p < s; ++p) {
        for (int64_t q = 0; q < s; ++q) {
          const mask_t* mq = m + p * m2 + q * m3;
          *o++ = c10::convert<out_t>(mq[0]);
          *o++ = c10::convert<out_t>(mq[s * m3]);
          *o++ = c10::convert<out_t>(mq[s * m2]);
          *o++ = c10::convert<out_t>(mq[s * m2 + s * m3]);
        }
      }
    }
  });
}

at::Tensor fill_cond_cpu(const at::Tensor& latents, const at::Tensor& mask, int64_t vae_scale_factor) {
  at::Tensor out = fill_cond_alloc(latents, mask, vae_scale_factor);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, latents.scalar_type(), "fill_cond_cpu", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(), "fill_cond_cpu_mask", [&] {
      fill_cond_cpu_kernel<out_t, scalar_t>(latents, mask, vae_scale_factor, out);
    });
  });
  return out;
}

// ---- qk_norm_rope ---------------------------------------------------------------------------------
// One row per (b, h, l), in output order: y = x * rsqrt(mean(x^2) + eps) * w (fp32, or fp64 for
// double inputs), then the interleaved rotation by cos/sin[l]; written to out[b, h, l, :].

template <typename scalar_t>
void qk_norm_rope_cpu_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& cos,
                             const at::Tensor& sin, int64_t txt_len, double eps, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = x.size(2), len = x.size(1), dim = x.size(3);
  const int64_t rows = x.size(0) * heads * len;
  const int64_t x0 = x.stride(0), x1 = x.stride(1), x2 = x.stride(2);
  const int64_t w_second = w.dim() == 2 ? dim : 0;  // offset of the weight row for tokens >= txt_len
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const float* w_p = w.const_data_ptr<float>();
  const float* cos_p = cos.const_data_ptr<float>();
  const float* sin_p = sin.const_data_ptr<float>();
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  const acc_t eps_acc = static_cast<acc_t>(eps);
  at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t l = r % len, h = (r / len) % heads, b = r / (len * heads);
      const scalar_t* in = x_p + b * x0 + l * x1 + h * x2;
      const float* wr = w_p + (l >= txt_len ? w_second : 0);
      const float* c = cos_p + l * dim;
      const float* sn = sin_p + l * dim;
      scalar_t* o = out_p + r * dim;
      acc_t sum_sq = 0;
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t v = static_cast<acc_t>(in[d]);
        sum_sq += v * v;
      }
      const acc_t inv_rms = acc_t(1) / std::sqrt(sum_sq / static_cast<acc_t>(dim) + eps_acc);
      for (int64_t d = 0; d < dim; d += 2) {
        const acc_t re = static_cast<acc_t>(in[d]) * inv_rms * static_cast<acc_t>(wr[d]);
        const acc_t im = static_cast<acc_t>(in[d + 1]) * inv_rms * static_cast<acc_t>(wr[d + 1]);
        o[d] = static_cast<scalar_t>(re * c[d] - im * sn[d]);
        o[d + 1] = static_cast<scalar_t>(im * c[d + 1] + re * sn[d + 1]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_norm_w, const at::Tensor& k_norm_w,
    const at::Tensor& cos, const at::Tensor& sin, int64_t txt_len, double eps) {
  auto outs = qk_norm_rope_alloc(q, k, q_norm_w, k_norm_w, cos, sin, txt_len);
  if (q.numel() == 0) return outs;
  // q and k are read in place; the small operands are made fp32 contiguous (a no-op when they are).
  const at::Tensor qw = float_contiguous(q_norm_w), kw = float_contiguous(k_norm_w);
  const at::Tensor cos_c = float_contiguous(cos), sin_c = float_contiguous(sin);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_norm_rope_cpu", [&] {
    qk_norm_rope_cpu_kernel<scalar_t>(q, qw, cos_c, sin_c, txt_len, eps, std::get<0>(outs));
    qk_norm_rope_cpu_kernel<scalar_t>(k, kw, cos_c, sin_c, txt_len, eps, std::get<1>(outs));
  });
  return outs;
}

// ---- Meta (shapes only: FakeTensor, torch.compile, opcheck) ---------------------------------------

at::Tensor fill_cond_meta(const at::Tensor& latents, const at::Tensor& mask, int64_t vae_scale_factor) {
  return fill_cond_alloc(latents, mask, vae_scale_factor);
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_norm_w, const at::Tensor& k_norm_w,
    const at::Tensor& cos, const at::Tensor& sin, int64_t txt_len, double /*eps*/) {
  return qk_norm_rope_alloc(q, k, q_norm_w, k_norm_w, cos, sin, txt_len);
}

}  // namespace

}  // namespace fluxfill_native

TORCH_LIBRARY(fluxfill_native, m) {
  m.def("fill_cond(Tensor masked_image_latents, Tensor mask, int vae_scale_factor) -> Tensor");
  m.def(
      "qk_norm_rope(Tensor q, Tensor k, Tensor q_norm_w, Tensor k_norm_w, Tensor cos, Tensor sin, "
      "int txt_len, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fluxfill_native, CPU, m) {
  m.impl("fill_cond", &fluxfill_native::fill_cond_cpu);
  m.impl("qk_norm_rope", &fluxfill_native::qk_norm_rope_cpu);
}

TORCH_LIBRARY_IMPL(fluxfill_native, Meta, m) {
  m.impl("fill_cond", &fluxfill_native::fill_cond_meta);
  m.impl("qk_norm_rope", &fluxfill_native::qk_norm_rope_meta);
}

#ifdef FLUXFILL_NATIVE_CUDA
TORCH_LIBRARY_IMPL(fluxfill_native, CUDA, m) {
  m.impl("fill_cond", &fluxfill_native::fill_cond_cuda);
  m.impl("qk_norm_rope", &fluxfill_native::qk_norm_rope_cuda);
}
#endif
