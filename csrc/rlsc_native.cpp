// The native CPU backend of the single-pass RLSC loss (rlsc_kernels/backends/native.py drives it).
//
// Per chunk of whole sequences (rows = tokens, T = temperature):
//   chunk_forward:  buf = h W^T (+ b)                         the library GEMM (at::addmm / at::mm)
//                   then one fused pass per row, rows in parallel (a row of V floats stays in
//                   the core's cache between the two sweeps over it):
//                     m = max_v z,  e_v = exp(z_v - m) written over buf,  s = sum_v e_v,
//                     a = sum_v e_v (z_v - m)  (entropy only),   z = buf / T
//                   -> lse = m + log s,  logp = z_y - lse,  mean_z = m + a / s
//   chunk_backward: with g_t = dLoss/dlogp_t / T known (the weights of the chunk's sequences),
//                   dz = c e + onehot(y) g, c = -g / s, goes into the two library GEMMs through
//                   their small operands: dH = c (e W) + g W_y, dW += e^T (c h) + scatter_y(g h)
//                   (fp32 accumulation), db += e^T c + scatter_y(g). No sweep writes dz.
// The exponential is a Cephes-style polynomial written so the compiler vectorises the row loop
// (no libm call inside it); max |rel err| about 2 ulp in float32. float64 uses std::exp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One copy of each row pass per instruction set, picked at load time by CPU feature (not by CPU
// model, as arch= clones would be: a newer AVX-512 part is no "skylake-avx512"); portable build.
#define RLSC_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RLSC_CPU_CLONES
#endif
#define RLSC_INLINE inline __attribute__((always_inline))

namespace {

RLSC_INLINE float exp_nonpositive(float x) {
  // exp(x) for x <= 0: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n by bits.
  // Branch-free and call-free (n is rounded with the 1.5 * 2^23 trick, not floor) so that the
  // row loops vectorise with the baseline instruction set too.
  const float lo = -87.33654f;  // below: the result underflows float32's normal range -> 0
  const float keep = x < lo ? 0.0f : 1.0f;
  x = x < lo ? lo : x;
  const float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * keep;
}

RLSC_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// Fused forward pass over rows [r0, r1) of buf [n, V] (raw logits on entry, e = exp(z - m) on exit).
constexpr int64_t kSumBlock = 512;

template <typename scalar_t>
RLSC_INLINE void forward_rows(scalar_t* buf, int64_t V, const int64_t* targets, scalar_t inv_t, bool want_mean_z,
                  scalar_t* lse, scalar_t* logp, scalar_t* sumexp, scalar_t* rest, scalar_t* mean_z, int64_t r0,
                  int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    scalar_t* row = buf + i * V;
    scalar_t raw_max = row[0];
#pragma omp simd reduction(max : raw_max)
    for (int64_t v = 0; v < V; ++v) raw_max = row[v] > raw_max ? row[v] : raw_max;
    const scalar_t m = raw_max * inv_t;  // max of z = raw / T, T > 0
    const scalar_t z_target = row[targets[i]] * inv_t - m;
    // Sums in float over blocks of kSumBlock entries (vectorised), blocks added in double: one
    // float32 running sum over tens of thousands of entries drifts by ~1e-6 relative, a bias
    // common to the whole row that would not cancel in dH.
    double s = 0, a = 0;
    for (int64_t v0 = 0; v0 < V; v0 += kSumBlock) {
      const int64_t v1 = v0 + kSumBlock < V ? v0 + kSumBlock : V;
      scalar_t bs = 0, ba = 0;
      if (want_mean_z) {
#pragma omp simd reduction(+ : bs, ba)
        for (int64_t v = v0; v < v1; ++v) {
          const scalar_t zs = row[v] * inv_t - m;
          const scalar_t e = exp_nonpositive(zs);
          row[v] = e;
          bs += e;
          ba += e * zs;
        }
      } else {
#pragma omp simd reduction(+ : bs)
        for (int64_t v = v0; v < v1; ++v) {
          const scalar_t e = exp_nonpositive(row[v] * inv_t - m);
          row[v] = e;
          bs += e;
        }
      }
      s += bs;
      a += ba;
    }
    const double log_s = std::log(s);
    lse[i] = static_cast<scalar_t>(m + log_s);
    logp[i] = static_cast<scalar_t>(z_target - log_s);
    sumexp[i] = static_cast<scalar_t>(s);
    // 1 - p_y from the double sum (exact where the target holds all the mass), and the target's
    // entry taken out of the buffer: the backward adds its gradient separately.
    rest[i] = static_cast<scalar_t>((s - static_cast<double>(row[targets[i]])) / s);
    row[targets[i]] = 0;
    if (want_mean_z) mean_z[i] = static_cast<scalar_t>(m + a / s);
  }
}

// The float32 passes, compiled once per instruction set; float64 (the oracle) stays generic.
RLSC_CPU_CLONES void forward_rows_f32(float* buf, int64_t V, const int64_t* targets, float inv_t, bool want_mean_z,
                                      float* lse, float* logp, float* sumexp, float* rest, float* mean_z, int64_t r0,
                                      int64_t r1) {
  forward_rows<float>(buf, V, targets, inv_t, want_mean_z, lse, logp, sumexp, rest, mean_z, r0, r1);
}

template <typename scalar_t>
void forward_block(scalar_t* buf, int64_t V, const int64_t* targets, scalar_t inv_t, bool want_mean_z,
                   scalar_t* lse, scalar_t* logp, scalar_t* sumexp, scalar_t* rest, scalar_t* mean_z, int64_t r0,
                   int64_t r1) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    forward_rows_f32(buf, V, targets, inv_t, want_mean_z, lse, logp, sumexp, rest, mean_z, r0, r1);
  } else {
    forward_rows<scalar_t>(buf, V, targets, inv_t, want_mean_z, lse, logp, sumexp, rest, mean_z, r0, r1);
  }
}

void check_chunk(const at::Tensor& buf, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(buf.device().is_cpu() && hidden.device().is_cpu() && weight.device().is_cpu(),
              "rlsc native backend: tensors must be on the CPU");
  TORCH_CHECK(buf.dim() == 2 && buf.is_contiguous(), "rlsc native backend: buf must be a contiguous [n, V] tensor");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "rlsc native backend: hidden [n, D] and weight [V, D] expected");
  TORCH_CHECK(buf.size(0) == hidden.size(0) && buf.size(1) == weight.size(0),
              "rlsc native backend: buf must be [n, V] = [", hidden.size(0), ", ", weight.size(0), "]");
  TORCH_CHECK(buf.scalar_type() == hidden.scalar_type() && buf.scalar_type() == weight.scalar_type(),
              "rlsc native backend: buf, hidden and weight must share one dtype (float32 or float64)");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.is_contiguous(),
              "rlsc native backend: targets must be contiguous int64 [n] (ignored tokens mapped to a valid id)");
}

constexpr int64_t kRowGrain = 4;

// Logits of the chunk into buf, then the fused pass. Returns (lse, logp, sumexp, 1 - p_target,
// mean_z or empty); buf ends holding e = exp(z - max), 0 at each row's target.
std::vector<at::Tensor> chunk_forward(at::Tensor buf, const at::Tensor& hidden, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                                      double temperature, bool want_mean_z) {
  check_chunk(buf, hidden, weight, targets);
  TORCH_CHECK(temperature > 0, "rlsc native backend: temperature must be > 0");
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(buf, *bias, hidden, weight.t());
  } else {
    at::mm_out(buf, hidden, weight.t());
  }
  const int64_t n = buf.size(0), V = buf.size(1);
  auto opts = buf.options();
  at::Tensor lse = at::empty({n}, opts), logp = at::empty({n}, opts), sumexp = at::empty({n}, opts);
  at::Tensor rest = at::empty({n}, opts);
  at::Tensor mean_z = want_mean_z ? at::empty({n}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "rlsc_chunk_forward", [&] {
    scalar_t* b = buf.data_ptr<scalar_t>();
    const int64_t* y = targets.data_ptr<int64_t>();
    const scalar_t inv_t = static_cast<scalar_t>(1.0 / temperature);
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* logp_p = logp.data_ptr<scalar_t>();
    scalar_t* s_p = sumexp.data_ptr<scalar_t>();
    scalar_t* rest_p = rest.data_ptr<scalar_t>();
    scalar_t* mz_p = want_mean_z ? mean_z.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kRowGrain, [&](int64_t r0, int64_t r1) {
      forward_block<scalar_t>(b, V, y, inv_t, want_mean_z, lse_p, logp_p, s_p, rest_p, mz_p, r0, r1);
    });
  });
  return {lse, logp, sumexp, rest, mean_z};
}

// The gradient GEMMs of a chunk from buf = e (chunk_forward's output, target entries 0) without
// writing dz: dz = c e + onehot(y) g (1 - p_y), c_t = -g_t / s_t, goes in through the GEMMs'
// small operands,
//   dH = c (e W) + g (1 - p_y) W_y,  dW += e^T (c h) + scatter_y(g (1 - p_y) h),  db likewise,
// which saves a read-modify-write sweep over the [n, V] buffer. g [n] = dLoss/dlogp_t / T (0 for
// ignored tokens), rest [n] = 1 - p_y from chunk_forward. Outputs undefined = not needed: dhidden [n, D] is overwritten, dweight [V, D]
// and dbias [V] are accumulated.
void chunk_backward(const at::Tensor& buf, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                    const at::Tensor& g, const at::Tensor& sumexp, const at::Tensor& rest,
                    c10::optional<at::Tensor> dhidden,
                    c10::optional<at::Tensor> dweight, c10::optional<at::Tensor> dbias) {
  check_chunk(buf, hidden, weight, targets);
  const int64_t n = buf.size(0);
  for (const at::Tensor* t : {&g, &sumexp, &rest}) {
    TORCH_CHECK(t->scalar_type() == buf.scalar_type() && t->dim() == 1 && t->numel() == n,
                "rlsc native backend: g, sumexp and rest must be [n] tensors of buf's dtype");
  }
  const at::Tensor c = -g / sumexp;
  const at::Tensor g_target = (g * rest).unsqueeze(1);
  if (dhidden.has_value() && dhidden->defined()) {
    at::mm_out(*dhidden, buf, weight);
    dhidden->mul_(c.unsqueeze(1));
    dhidden->add_(weight.index_select(0, targets) * g_target);
  }
  if (dweight.has_value() && dweight->defined()) {
    dweight->addmm_(buf.t(), hidden * c.unsqueeze(1));
    dweight->index_add_(0, targets, hidden * g_target);
  }
  if (dbias.has_value() && dbias->defined()) {
    dbias->addmv_(buf.t(), c);
    dbias->index_add_(0, targets, g_target.squeeze(1));
  }
}

int64_t num_threads() { return at::get_num_threads(); }

// Threads an OpenMP region of this extension actually gets (checks that the build honours
// torch.set_num_threads through ATen's parallel_for).
int64_t parallel_for_threads() {
  std::atomic<int64_t> seen_max{0};
  at::parallel_for(0, 1 << 16, 1, [&](int64_t, int64_t) {
    int64_t t = at::get_thread_num() + 1;
    int64_t cur = seen_max.load();
    while (t > cur && !seen_max.compare_exchange_weak(cur, t)) {
    }
  });
  return seen_max.load();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native CPU kernels of the single-pass RLSC loss";
  m.def("chunk_forward", &chunk_forward, "logits GEMM + fused lse/log-prob pass for one chunk");
  m.def("chunk_backward", &chunk_backward, "dH / dW / db GEMMs of one chunk from its exp(z - max) buffer");
  m.def("num_threads", &num_threads, "at::get_num_threads() as seen by the extension");
  m.def("parallel_for_threads", &parallel_for_threads, "threads used by one at::parallel_for of the extension");
}
