// The native CPU backend of the single-pass RLSC loss (rlsc_kernels/backends/native.py drives it).
//
// Per chunk of whole sequences (rows = tokens, T = temperature):
//   chunk_forward:  buf = h W^T (+ b)                         the library GEMM (at::addmm / at::mm;
//                                                             bf16 h, W: MKL's bf16 GEMM, fp32 out)
//                   then one fused pass per row, rows in parallel (a row of V floats stays in
//                   the core's cache between the two sweeps over it):
//                     m = max_v z,  e_v = exp(z_v - m) written over buf,  s = sum_v e_v,
//                     a = sum_v e_v (z_v - m)  (entropy only),   z = buf / T
//                   -> lse = m + log s,  logp = z_y - lse,  mean_z = m + a / s,
//                      1 - p_y = sum_{v != y} e_v / s  (no cancellation near p_y = 1)
//   chunk_backward: with g_t = dLoss/dlogp_t / T known (the weights of the chunk's sequences),
//                   dz = c e + onehot(y) g, c = -g / s, goes into the two library GEMMs through
//                   their small operands: dH = c (e W) + g W_y, dW += e^T (c h) + scatter_y(g h)
//                   (fp32 accumulation), db += e^T c + scatter_y(g). No sweep writes dz.
// bf16 h and W (MKL's cblas_gemm_bf16bf16f32, fp32 accumulation and output): the forward goes by
// vocabulary blocks whose fp32 logits stay in cache (chunk_forward_bf16), e is kept as bf16, and
// the two gradient GEMMs take bf16 operands with fp32 outputs.
// Target ids are bounds-checked here on every call (an id outside [0, V) raises IndexError), so
// no input reads or writes outside the buffers, also with the Python checks off.
// The exponential is a Cephes-style polynomial written so the compiler vectorises the row loop
// (no libm call inside it); max |rel err| about 2 ulp in float32. float64 uses std::exp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

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
  // exp(x) for x <= 0 (valid up to x = 88: the bf16 pass uses it up to kAboveRef): x = n ln2 + r,
  // |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n by bits.
  // Branch-free and call-free (n is rounded with the 1.5 * 2^23 trick, not floor) so that the
  // row loops vectorise with the baseline instruction set too.
  // below lo the result is 0: 2^-100 (not float32's 2^-126 underflow) because an e that small
  // times c and W lands in the subnormal range inside the gradient GEMMs, which x86 runs several
  // times slower (peaked rows hold ~17% such entries); each is < 2^-100 of the row's largest
  // term, far below float32 rounding of the sums it joins.
  const float lo = -69.31471806f;  // -100 ln 2
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

// Fused forward pass over rows [r0, r1) of buf [n, V] (raw logits on entry, e = exp(z - m) on
// exit, the target's entry 0). Each block of kSumBlock entries goes through tmp (L1) first.
constexpr int64_t kSumBlock = 512;

// bf16 <-> float bits (round to nearest even; x is finite here: an exponential).
RLSC_INLINE uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

RLSC_INLINE float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// One block of at most kSumBlock entries of a row, in the working precision: tmp[j] = e =
// exp(in[j] * inv_t - m), bs = sum of e and (want_mean_z) ba = sum of e (z - m). target indexes the
// row's target inside the block, or -1: its e goes to e_target and leaves tmp and bs (ba keeps it),
// the block summed again without it. Shared by the float/double forward and the bf16 forward.
template <typename scalar_t>
RLSC_INLINE void exp_block(const scalar_t* in, int64_t len, scalar_t inv_t, scalar_t m, bool want_mean_z,
                           int64_t target, scalar_t* tmp, scalar_t& bs, scalar_t& ba, scalar_t& e_target) {
  scalar_t s = 0, sa = 0;
  if (want_mean_z) {
#pragma omp simd reduction(+ : s, sa)
    for (int64_t j = 0; j < len; ++j) {
      const scalar_t zs = in[j] * inv_t - m;
      const scalar_t e = exp_nonpositive(zs);
      tmp[j] = e;
      s += e;
      sa += e * zs;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) {
      const scalar_t e = exp_nonpositive(in[j] * inv_t - m);
      tmp[j] = e;
      s += e;
    }
  }
  if (target >= 0) {
    e_target = tmp[target];
    tmp[target] = 0;
    s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) s += tmp[j];
  }
  bs = s;
  ba = sa;
}

template <typename scalar_t>
RLSC_INLINE void forward_rows(scalar_t* buf, int64_t V, const int64_t* targets, scalar_t inv_t, bool want_mean_z,
                  scalar_t* lse, scalar_t* logp, scalar_t* sumexp, scalar_t* rest, scalar_t* mean_z, int64_t r0,
                  int64_t r1) {
  alignas(64) scalar_t tmp[kSumBlock];
  for (int64_t i = r0; i < r1; ++i) {
    scalar_t* row = buf + i * V;
    const int64_t y = targets[i];  // in [0, V): checked by the caller
    scalar_t raw_max = row[0];
#pragma omp simd reduction(max : raw_max)
    for (int64_t v = 0; v < V; ++v) raw_max = row[v] > raw_max ? row[v] : raw_max;
    const scalar_t m = raw_max * inv_t;  // max of z = raw / T, T > 0
    const scalar_t z_target = row[y] * inv_t - m;
    // Sums in float over blocks of kSumBlock entries (vectorised), blocks added in double: one
    // float32 running sum over tens of thousands of entries drifts by ~1e-6 relative, a bias
    // common to the whole row that would not cancel in dH. `others` leaves the target out (its
    // block is summed again without it): 1 - p_y = others / s has no cancellation even where the
    // target holds nearly all the mass (a float block sum 1 + 1e-9 would lose the 1e-9).
    double others = 0, a = 0;
    scalar_t e_target = 0;
    for (int64_t v0 = 0; v0 < V; v0 += kSumBlock) {
      const int64_t v1 = v0 + kSumBlock < V ? v0 + kSumBlock : V;
      const int64_t len = v1 - v0;
      scalar_t bs, ba;
      // The target's entry leaves the buffer (the backward adds its gradient separately).
      exp_block(row + v0, len, inv_t, m, want_mean_z, y >= v0 && y < v1 ? y - v0 : -1, tmp, bs, ba, e_target);
      others += bs;
      a += ba;
      scalar_t* dst = row + v0;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) dst[j] = tmp[j];
    }
    const double s = others + static_cast<double>(e_target);
    const double log_s = std::log(s);
    lse[i] = static_cast<scalar_t>(m + log_s);
    logp[i] = static_cast<scalar_t>(z_target - log_s);
    sumexp[i] = static_cast<scalar_t>(s);
    // 1 - p_y = -expm1(logp), here as others / s: no cancellation near p_y = 1.
    rest[i] = static_cast<scalar_t>(others / s);
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

// The bf16 forward, by vocabulary blocks of kVBlock: the logits GEMM of one block writes an fp32
// scratch [n, kVBlock] (8 MiB at 512 rows: it stays in cache, where the whole [n, V] fp32 block
// would go to memory and back), and this pass turns it into that block's e = exp(z - ref) as
// bf16 in E [n, V] right away. ref is the row's first-block max; a later block whose max is more
// than kAboveRef above it rescales the row's e written so far (rare: logits of one row rarely
// spread so) and takes its max as ref. So e <= exp(kAboveRef) and no overflow, and an entry far
// below the true max underflows only where exp(z - max) < 2^-126 too. Per-row state across
// blocks: ref, others = sum of e without the target, a = sum of e (z - ref), e_t and z_t (the
// target's e and z).
constexpr int64_t kVBlock = 4096;
constexpr float kAboveRef = 32.0f;

RLSC_CPU_CLONES void bf16_block_rows(const float* scratch, int64_t ld_s, uint16_t* E, int64_t ld_e, int64_t v0,
                                     int64_t v1, const int64_t* targets, float inv_t, bool want_mean_z, float* ref,
                                     double* others, double* a, float* e_t, float* z_t, int64_t r0, int64_t r1) {
  alignas(64) float tmp[kSumBlock];
  const int64_t len = v1 - v0;
  for (int64_t i = r0; i < r1; ++i) {
    const float* row = scratch + i * ld_s;
    uint16_t* erow = E + i * ld_e;
    float raw_max = row[0];
#pragma omp simd reduction(max : raw_max)
    for (int64_t j = 0; j < len; ++j) raw_max = row[j] > raw_max ? row[j] : raw_max;
    const float block_max = raw_max * inv_t;
    if (v0 == 0) {
      ref[i] = block_max;
      others[i] = a[i] = 0;
      e_t[i] = 0;
    } else if (block_max > ref[i] + kAboveRef) {
      const float f = exp_nonpositive(ref[i] - block_max);
      a[i] = f * (a[i] + static_cast<double>(ref[i] - block_max) * (others[i] + e_t[i]));
      others[i] *= f;
      e_t[i] *= f;
#pragma omp simd
      for (int64_t v = 0; v < v0; ++v) erow[v] = to_bf16(from_bf16(erow[v]) * f);
      ref[i] = block_max;
    }
    const float m = ref[i];
    const int64_t y = targets[i];
    double o = 0, aa = 0;
    for (int64_t j0 = 0; j0 < len; j0 += kSumBlock) {
      const int64_t j1 = j0 + kSumBlock < len ? j0 + kSumBlock : len;
      const int64_t bl = j1 - j0;
      const float* in = row + j0;
      const int64_t target = y >= v0 + j0 && y < v0 + j1 ? y - v0 - j0 : -1;
      float bs, ba;
      exp_block(in, bl, inv_t, m, want_mean_z, target, tmp, bs, ba, e_t[i]);
      if (target >= 0) z_t[i] = in[target] * inv_t;
      o += bs;
      aa += ba;
      uint16_t* dst = erow + v0 + j0;
#pragma omp simd
      for (int64_t j = 0; j < bl; ++j) dst[j] = to_bf16(tmp[j]);
    }
    others[i] += o;
    a[i] += aa;
  }
}

// ---- bf16 GEMMs with fp32 accumulation and fp32 output: MKL's cblas_gemm_bf16bf16f32 ----------
// Looked up at run time in the libraries already loaded (the torch CPU wheel's libtorch_cpu
// exports it), used only where the CPU has bf16 matrix or vector units (AMX-BF16 or AVX512-BF16,
// read from cpuid, with the OS enabling their register state). MKL_INT is 32-bit (LP64).
using Bf16GemmFn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Bf16Gemm {
  Bf16GemmFn fn = nullptr;  // null: not usable here, see status
  int (*set_threads_local)(int) = nullptr;  // MKL_Set_Num_Threads_Local (C interface), where found
  bool amx_bf16 = false, avx512_bf16 = false, symbol = false, intel = false;
  std::string status;
};

#if defined(__x86_64__) && defined(__GNUC__)
void cpu_bf16_units(bool& amx_bf16, bool& avx512_bf16, bool& intel) {
  unsigned a, b, c, d;
  amx_bf16 = avx512_bf16 = intel = false;
  if (__get_cpuid(0, &a, &b, &c, &d)) intel = b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;  // GenuineIntel
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & (1u << 27))) return;  // OSXSAVE
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(xcr0_hi) << 32) | xcr0_lo;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
  const bool avx512_os = (xcr0 & 0xE6) == 0xE6;                   // SSE, AVX, opmask, ZMM state
  const bool amx_os = (xcr0 & (3ull << 17)) == (3ull << 17);       // TILECFG, TILEDATA state
  const bool amx_cpu = (d & (1u << 22)) && (d & (1u << 24));      // AMX-BF16, AMX-TILE
  const bool avx512f = b & (1u << 16);
  if (amx_cpu && amx_os) {
    // Linux hands out the tile data state on request (arch_prctl ARCH_REQ_XCOMP_PERM); without it
    // the first AMX instruction faults. Granted or already held: the library may use AMX.
    constexpr long kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtileData = 18;
    uint64_t perm = 0;
    syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData);
    if (syscall(SYS_arch_prctl, kGetXcompPerm, &perm) == 0 && (perm & (1ull << kXtileData))) amx_bf16 = true;
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) avx512_bf16 = avx512f && avx512_os && (a & (1u << 5));
}
#else
void cpu_bf16_units(bool& amx_bf16, bool& avx512_bf16, bool& intel) { amx_bf16 = avx512_bf16 = intel = false; }
#endif

void* find_symbol(const char* name) {
  if (void* p = dlsym(RTLD_DEFAULT, name)) return p;
  // The library that holds ATen (libtorch_cpu), already loaded: dlopen only returns its handle.
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) && info.dli_fname) {
    if (void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
      void* p = dlsym(lib, name);
      dlclose(lib);
      return p;
    }
  }
  return nullptr;
}

const Bf16Gemm& bf16_gemm() {
  static const Bf16Gemm g = [] {
    Bf16Gemm r;
    cpu_bf16_units(r.amx_bf16, r.avx512_bf16, r.intel);
    void* p = find_symbol("cblas_gemm_bf16bf16f32");
    r.symbol = p != nullptr;
    if (!r.symbol) {
      r.status = "cblas_gemm_bf16bf16f32 not found in the loaded libraries (a torch without MKL?)";
    } else if (!r.amx_bf16 && !r.avx512_bf16) {
      r.status = "the CPU (or the OS) offers neither AMX-BF16 nor AVX512-BF16";
    } else {
      r.fn = reinterpret_cast<Bf16GemmFn>(p);
      r.set_threads_local = reinterpret_cast<int (*)(int)>(find_symbol("MKL_Set_Num_Threads_Local"));
      r.status = std::string("MKL cblas_gemm_bf16bf16f32 on ") + (r.amx_bf16 ? "AMX-BF16" : "AVX512-BF16") +
                 (r.intel ? "" : " (not an Intel CPU: MKL's speed there unmeasured)");
    }
    return r;
  }();
  return g;
}

// MKL single-threaded on this thread while alive (inside a parallel region: one GEMM per thread).
// Without MKL_Set_Num_Threads_Local, MKL's default (sequential when called inside OpenMP) holds.
struct SequentialGemms {
  int (*set)(int) = nullptr;
  int before = 0;
  explicit SequentialGemms(bool active) {
    if (active && (set = bf16_gemm().set_threads_local) != nullptr) before = set(1);
  }
  ~SequentialGemms() {
    if (set != nullptr) set(before);
  }
};

int as_int(int64_t x, const char* what) {
  TORCH_CHECK(x <= std::numeric_limits<int>::max(), "rlsc native backend: ", what, " = ", x,
              " exceeds the bf16 GEMM's 32-bit sizes");
  return static_cast<int>(x);
}

// Row-major C [m, n] = alpha op(A) op(B) + beta C; A, B bf16 bits, C float32.
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b,
               int64_t ldb, float beta, float* c, int64_t ldc) {
  const Bf16GemmFn fn = bf16_gemm().fn;
  TORCH_CHECK(fn != nullptr, "rlsc native backend: bf16 GEMM unavailable: ", bf16_gemm().status);
  if (m == 0 || n == 0) return;
  fn(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, as_int(m, "m"), as_int(n, "n"),
     as_int(k, "k"), 1.0f, static_cast<const uint16_t*>(a), as_int(lda, "lda"), static_cast<const uint16_t*>(b),
     as_int(ldb, "ldb"), beta, c, as_int(ldc, "ldc"));
}

// Which operands a chunk has: fp32/fp64 throughout (buf, hidden and weight of one dtype), or bf16
// hidden and weight with an fp32 buf (the bf16 GEMMs; buf then ends in the bf16 form of e).
bool check_chunk(const at::Tensor& buf, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(buf.device().is_cpu() && hidden.device().is_cpu() && weight.device().is_cpu(),
              "rlsc native backend: tensors must be on the CPU");
  TORCH_CHECK(buf.dim() == 2 && buf.is_contiguous(), "rlsc native backend: buf must be a contiguous [n, V] tensor");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "rlsc native backend: hidden [n, D] and weight [V, D] expected");
  TORCH_CHECK(buf.size(0) == hidden.size(0) && buf.size(1) == weight.size(0),
              "rlsc native backend: buf must be [n, V] = [", hidden.size(0), ", ", weight.size(0), "]");
  const bool bf16 = hidden.scalar_type() == at::kBFloat16;
  if (bf16) {
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && buf.scalar_type() == at::kFloat,
                "rlsc native backend: bf16 hidden needs bf16 weight and a float32 buf");
    TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(),
                "rlsc native backend: bf16 hidden and weight must be contiguous");
    TORCH_CHECK(bf16_gemm().fn != nullptr, "rlsc native backend: bf16 operands need the bf16 GEMM, unavailable here: ",
                bf16_gemm().status, "; pass float32 operands");
  } else {
    TORCH_CHECK(buf.scalar_type() == hidden.scalar_type() && buf.scalar_type() == weight.scalar_type(),
                "rlsc native backend: buf, hidden and weight must share one dtype (float32 or float64), "
                "or hidden and weight be bfloat16 with a float32 buf");
  }
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.is_contiguous(),
              "rlsc native backend: targets must be contiguous int64 [n] (ignored tokens mapped to a valid id)");
  // Every id indexes a row of V logits: one out of range would read (and zero) memory outside
  // the buffer. n comparisons per chunk, next to n * V exponentials: checked always, also
  // with check_values=False.
  const int64_t* y = targets.data_ptr<int64_t>();
  const int64_t V = weight.size(0);
  for (int64_t i = 0, n = targets.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < V, "rlsc native backend: target id ", y[i],
                      " is outside the vocabulary [0, ", V, ") (and is not ignore_index)");
  }
  return bf16;
}

constexpr int64_t kRowGrain = 4;

// The bf16 forward of a chunk (see bf16_block_rows). Everything of row i stays inside row i's
// own 4V bytes of buf, so a row slice of buf is the same slice of E (the driver may run the
// backward over row ranges): E = e as bf16 in the first 2V bytes (row stride 2V bf16), the fp32
// scratch of the row's current block in the last 2V bytes (row stride V floats) where a block
// fits there (V >= 2 kVBlock), else in an allocated [n, kVBlock]. The fp32 bias is added to the
// scratch before each block's GEMM (beta = 1).
void chunk_forward_bf16(at::Tensor& buf, const at::Tensor& hidden, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& targets, double temperature,
                        bool want_mean_z, float* lse, float* logp, float* sumexp, float* rest, float* mean_z) {
  const int64_t n = buf.size(0), V = buf.size(1), D = hidden.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == V && bias->is_contiguous(),
                "rlsc native backend: bias must be contiguous float32 [V]");
  }
  const int64_t vb = V < kVBlock ? V : kVBlock;
  at::Tensor own_scratch;
  float* scratch;
  int64_t ld_s;
  if (2 * vb <= V) {
    scratch = buf.data_ptr<float>() + (V + 1) / 2;  // row i: after its V bf16 = ceil(V / 2) floats
    ld_s = V;
  } else {
    own_scratch = at::empty({n, vb}, buf.options());
    scratch = own_scratch.data_ptr<float>();
    ld_s = vb;
  }
  uint16_t* E = static_cast<uint16_t*>(buf.data_ptr());
  auto f32 = buf.options();
  at::Tensor ref = at::empty({n}, f32), e_t = at::empty({n}, f32), z_t = at::empty({n}, f32);
  at::Tensor others = at::empty({n}, f32.dtype(at::kDouble)), a = at::empty({n}, f32.dtype(at::kDouble));
  float *ref_p = ref.data_ptr<float>(), *e_t_p = e_t.data_ptr<float>(), *z_t_p = z_t.data_ptr<float>();
  double *others_p = others.data_ptr<double>(), *a_p = a.data_ptr<double>();
  const int64_t* y = targets.data_ptr<int64_t>();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const auto* w = static_cast<const uint16_t*>(weight.data_ptr());
  const auto* h = static_cast<const uint16_t*>(hidden.data_ptr());
  const float* bias_p = has_bias ? bias->data_ptr<float>() : nullptr;
  // One parallel region: each thread takes a range of rows through all the vocabulary blocks
  // (its GEMMs single-threaded, its part of the scratch its own), instead of a threaded GEMM and a
  // row pass per block: two synchronisations per block would cost most where the cores are shared.
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(kRowGrain, (n + threads - 1) / threads);
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    SequentialGemms one_thread(at::in_parallel_region());
    for (int64_t v0 = 0; v0 < V; v0 += vb) {
      const int64_t v1 = v0 + vb < V ? v0 + vb : V;
      const int64_t len = v1 - v0;
      if (bias_p != nullptr) {
        for (int64_t i = r0; i < r1; ++i) std::memcpy(scratch + i * ld_s, bias_p + v0, len * sizeof(float));
      }
      gemm_bf16(false, true, r1 - r0, len, D, h + r0 * D, D, w + v0 * D, D, bias_p != nullptr ? 1.0f : 0.0f,
                scratch + r0 * ld_s, ld_s);
      bf16_block_rows(scratch, ld_s, E, 2 * V, v0, v1, y, inv_t, want_mean_z, ref_p, others_p, a_p, e_t_p, z_t_p, r0,
                      r1);
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    const double s = others_p[i] + static_cast<double>(e_t_p[i]);
    const double log_s = std::log(s);
    lse[i] = static_cast<float>(ref_p[i] + log_s);
    logp[i] = static_cast<float>((z_t_p[i] - ref_p[i]) - log_s);
    sumexp[i] = static_cast<float>(s);
    rest[i] = static_cast<float>(others_p[i] / s);  // 1 - p_y, no cancellation
    if (want_mean_z) mean_z[i] = static_cast<float>(ref_p[i] + a_p[i] / s);
  }
}

// Logits of the chunk, then the fused pass. Returns (lse, logp, sumexp, 1 - p_target, mean_z or
// empty). buf ends holding e = exp(z - ref), 0 at each row's target: float32/64 operands write
// the logits into buf ([n, V], ref = the row max) and turn them into e in place; bf16 operands
// (chunk_forward_bf16) leave e as bf16 in the first half of each row's bytes (row stride 2V).
// Either way sumexp is the sum of that e, so the backward's c = -g / sumexp matches it.
std::vector<at::Tensor> chunk_forward(at::Tensor buf, const at::Tensor& hidden, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                                      double temperature, bool want_mean_z) {
  const bool bf16 = check_chunk(buf, hidden, weight, targets);
  TORCH_CHECK(temperature > 0, "rlsc native backend: temperature must be > 0");
  const int64_t n = buf.size(0), V = buf.size(1);
  auto opts = buf.options();
  at::Tensor lse = at::empty({n}, opts), logp = at::empty({n}, opts), sumexp = at::empty({n}, opts);
  at::Tensor rest = at::empty({n}, opts);
  at::Tensor mean_z = want_mean_z ? at::empty({n}, opts) : at::empty({0}, opts);
  if (bf16) {
    chunk_forward_bf16(buf, hidden, weight, bias, targets, temperature, want_mean_z, lse.data_ptr<float>(),
                       logp.data_ptr<float>(), sumexp.data_ptr<float>(), rest.data_ptr<float>(),
                       want_mean_z ? mean_z.data_ptr<float>() : nullptr);
    return {lse, logp, sumexp, rest, mean_z};
  }
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(buf, *bias, hidden, weight.t());
  } else {
    at::mm_out(buf, hidden, weight.t());
  }
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
// ignored tokens), rest [n] = 1 - p_y from chunk_forward (float32, float64 for float64 operands).
// Outputs undefined = not needed: dhidden [n, D] is overwritten, dweight [V, D] and dbias [V] are
// accumulated, all in buf's dtype. bf16 operands (buf holding the bf16 e): the two GEMMs take
// bf16 e, bf16 W and bf16 (c h) with fp32 accumulation and fp32 outputs (dW accumulates in fp32
// over the chunks); e and c h are the only values rounded to 16 bits (the logit gradient c e of
// 16-bit precision), the target's term and the row scale c are applied in fp32.
void chunk_backward(const at::Tensor& buf, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                    const at::Tensor& g, const at::Tensor& sumexp, const at::Tensor& rest,
                    c10::optional<at::Tensor> dhidden,
                    c10::optional<at::Tensor> dweight, c10::optional<at::Tensor> dbias) {
  const bool bf16 = check_chunk(buf, hidden, weight, targets);
  const int64_t n = buf.size(0), V = buf.size(1), D = hidden.size(1);
  for (const at::Tensor* t : {&g, &sumexp, &rest}) {
    TORCH_CHECK(t->scalar_type() == buf.scalar_type() && t->dim() == 1 && t->numel() == n,
                "rlsc native backend: g, sumexp and rest must be [n] tensors of buf's dtype");
  }
  const bool need_h = dhidden.has_value() && dhidden->defined();
  const bool need_w = dweight.has_value() && dweight->defined();
  const bool need_b = dbias.has_value() && dbias->defined();
  for (const auto* t : {&dhidden, &dweight, &dbias}) {
    if (t->has_value() && (*t)->defined()) {
      TORCH_CHECK((*t)->scalar_type() == buf.scalar_type() && (*t)->is_contiguous(),
                  "rlsc native backend: dhidden, dweight and dbias must be contiguous tensors of buf's dtype");
    }
  }
  const at::Tensor c = (-g / sumexp).contiguous();
  const at::Tensor g_target = (g * rest).unsqueeze(1);
  if (!bf16) {
    if (need_h) {
      at::mm_out(*dhidden, buf, weight);
      dhidden->mul_(c.unsqueeze(1));
      dhidden->add_(weight.index_select(0, targets) * g_target);
    }
    if (need_w) {
      dweight->addmm_(buf.t(), hidden * c.unsqueeze(1));
      dweight->index_add_(0, targets, hidden * g_target);
    }
    if (need_b) {
      dbias->addmv_(buf.t(), c);
      dbias->index_add_(0, targets, g_target.squeeze(1));
    }
    return;
  }
  const void* e = buf.data_ptr();  // bf16 [n, V], row stride 2V (chunk_forward_bf16)
  // The [n, D]-sized work around the GEMMs in plain serial loops (about n D operations each, next
  // to the GEMMs' n V D): one parallel region fewer per torch op, which is what costs where the
  // cores are shared. The target's term g (1 - p_y) is applied in fp32.
  const at::Tensor g_c = g.contiguous(), rest_c = rest.contiguous();
  const float *cp = c.data_ptr<float>(), *gp = g_c.data_ptr<float>(), *rp = rest_c.data_ptr<float>();
  const auto* hb = static_cast<const uint16_t*>(hidden.data_ptr());
  const auto* wb = static_cast<const uint16_t*>(weight.data_ptr());
  const int64_t* y = targets.data_ptr<int64_t>();
  if (need_h) {
    TORCH_CHECK(dhidden->dim() == 2 && dhidden->size(0) == n && dhidden->size(1) == D,
                "rlsc native backend: dhidden must be [n, D]");
    float* dh = dhidden->data_ptr<float>();
    gemm_bf16(false, false, n, D, V, e, 2 * V, wb, D, 0.0f, dh, D);
    for (int64_t t = 0; t < n; ++t) {
      const float ct = cp[t], gt = gp[t] * rp[t];
      const uint16_t* wy = wb + y[t] * D;
      float* row = dh + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) row[d] = row[d] * ct + from_bf16(wy[d]) * gt;
    }
  }
  if (need_w) {
    TORCH_CHECK(dweight->dim() == 2 && dweight->size(0) == V && dweight->size(1) == D,
                "rlsc native backend: dweight must be [V, D]");
    float* dw = dweight->data_ptr<float>();
    at::Tensor ch = at::empty({n, D}, hidden.options());
    auto* chp = static_cast<uint16_t*>(ch.data_ptr());
    for (int64_t t = 0; t < n; ++t) {
      const float ct = cp[t];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) chp[t * D + d] = to_bf16(from_bf16(hb[t * D + d]) * ct);
    }
    gemm_bf16(true, false, V, D, n, e, 2 * V, chp, D, 1.0f, dw, D);
    for (int64_t t = 0; t < n; ++t) {
      const float gt = gp[t] * rp[t];
      float* row = dw + y[t] * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) row[d] += from_bf16(hb[t * D + d]) * gt;
    }
  }
  if (need_b) {
    TORCH_CHECK(dbias->numel() == V, "rlsc native backend: dbias must be [V]");
    // db += e^T c in fp32 (no bf16 rounding of c): columns in parallel, rows in order.
    const uint16_t* eb = static_cast<const uint16_t*>(e);
    float* db = dbias->data_ptr<float>();
    at::parallel_for(0, V, 2048, [&](int64_t v0, int64_t v1) {
      for (int64_t t = 0; t < n; ++t) {
        const uint16_t* row = eb + t * 2 * V;
        const float ct = cp[t];
#pragma omp simd
        for (int64_t v = v0; v < v1; ++v) db[v] += ct * from_bf16(row[v]);
      }
    });
    for (int64_t t = 0; t < n; ++t) db[y[t]] += gp[t] * rp[t];
  }
}

// (usable, amx_bf16, avx512_bf16, symbol, intel, status): whether chunk_forward/chunk_backward
// accept bf16 operands here, and why (AMX-BF16 or AVX512-BF16 present and enabled by the OS,
// MKL's bf16 GEMM symbol found; the vendor, for the caller's default).
std::tuple<bool, bool, bool, bool, bool, std::string> bf16_gemm_status() {
  const Bf16Gemm& g = bf16_gemm();
  return {g.fn != nullptr, g.amx_bf16, g.avx512_bf16, g.symbol, g.intel, g.status};
}

// hidden [M, K] @ weight [N, K]^T in fp32 from bf16 operands (products exact, fp32 accumulation
// and output): the logits a sampler draws from, as the op computes them, without an fp32 copy of
// the weight. Only where bf16_gemm() is usable (the caller checks bf16_gemm_status).
torch::Tensor bf16_linear(const torch::Tensor& hidden, const torch::Tensor& weight) {
  const Bf16Gemm& g = bf16_gemm();
  TORCH_CHECK(g.fn != nullptr, "bf16_linear: ", g.status);
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "bf16_linear: hidden [M, K] and weight [N, K] expected, got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "bf16_linear: bfloat16 hidden and weight expected");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "bf16_linear: CPU tensors expected");
  const int64_t M = hidden.size(0), N = weight.size(0), K = hidden.size(1);
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M <= kMax && N <= kMax && K <= kMax, "bf16_linear: dimensions beyond MKL's 32-bit indices");
  auto out = torch::zeros({M, N}, hidden.options().dtype(at::kFloat));
  if (M == 0 || N == 0 || K == 0) return out;
  const auto h = hidden.contiguous(), w = weight.contiguous();
  g.fn(kRowMajor, kNoTrans, kTrans, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1.0f,
       reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>()), static_cast<int>(K),
       reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), static_cast<int>(K), 0.0f,
       out.data_ptr<float>(), static_cast<int>(N));
  return out;
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
  m.def("bf16_gemm_status", &bf16_gemm_status,
        "(usable, amx_bf16, avx512_bf16, symbol_found, intel, status): the bf16 GEMM path of chunk_forward/chunk_backward");
  m.def("bf16_linear", &bf16_linear, "hidden @ weight.T in fp32 from bf16 operands (MKL cblas_gemm_bf16bf16f32)");
  m.def("num_threads", &num_threads, "at::get_num_threads() as seen by the extension");
  m.def("parallel_for_threads", &parallel_for_threads, "threads used by one at::parallel_for of the extension");
}
