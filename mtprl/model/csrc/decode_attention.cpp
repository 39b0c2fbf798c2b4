// Decode attention for the CPU rollout (mtprl/model/cpu_attention.py builds and loads this file).
//
// out[b,h,m,:] = softmax_j(scale * q[b,h,m,:] . k[b,h,j,:] + mask[b,0,m,j]) @ v[b,h,:,:]
// for FEW query rows m per (batch row, kv head) - one-token decode steps and MTP draft levels, GQA folded into m -
// where PyTorch's CPU attention (SDPA's flash kernel, or matmul/softmax/matmul) costs several microseconds of
// GEMM set-up per (b, h) pair. float32, AVX2 + FMA; the last dim of every input must be contiguous; K/V may be
// strided views of a cache (e.g. [rows, heads, slots, Dh] sliced to the first kv_len slots); masked keys carry
// -inf (or any value below -87.3 after the row max is subtracted) and get exactly zero weight.
// Per (b, h): scores by 8-key blocks (one FMA chain per key, then an 8-way horizontal-add tree), a vectorised
// max and exp (degree-6 polynomial, Cephes expf coefficients, ~1 ulp), then P @ V with four independent
// accumulator sets (the FMA latency, not its throughput, bounds a single chain).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "needs AVX2 and FMA (compiled with -march=native)"
#endif
#include <cmath>
#include <vector>

static inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  // lane i of the result = horizontal sum of a_i
  __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3), h45 = _mm256_hadd_ps(a4, a5), h67 = _mm256_hadd_ps(a6, a7);
  __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  // h0123 = [s0l s1l s2l s3l | s0h s1h s2h s3h] (l/h = 128-bit halves)
  __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20), hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
  return _mm256_add_ps(lo, hi);
}


// exp(x) for 8 floats: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes expf coefficients),
// 2^n through the exponent bits; x below -87.3 (masked keys: -1e30) gives exactly 0.
static inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

template <int D>
static void pair_attention(const float* q, int64_t qs_m, int M, const float* k, int64_t ks_s, const float* v,
                           int64_t vs_s, const float* mask, int64_t ms_m, int S, float scale, float* out,
                           int64_t os_m, float* sc) {
  constexpr int C = D / 8;
  const int S8 = S & ~7;
  for (int m = 0; m < M; ++m) {
    const float* qm = q + m * qs_m;
    __m256 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(qm + 8 * c), _mm256_set1_ps(scale));
    float* s = sc + m * S;
    const float* mm = mask + m * ms_m;
    for (int j = 0; j < S8; j += 8) {
      __m256 a[8];
      for (int r = 0; r < 8; ++r) {
        const float* kj = k + (j + r) * ks_s;
        __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kj));
        for (int c = 1; c < C; ++c) acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kj + 8 * c), acc);
        a[r] = acc;
      }
      __m256 r8 = reduce8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
      _mm256_storeu_ps(s + j, _mm256_add_ps(r8, _mm256_loadu_ps(mm + j)));
    }
    for (int j = S8; j < S; ++j) {
      const float* kj = k + j * ks_s;
      float acc = 0.f;
      for (int d = 0; d < D; ++d) acc += qm[d] * kj[d];
      s[j] = acc * scale + mm[j];
    }
    __m256 mx8 = _mm256_set1_ps(-3.0e38f);
    for (int j = 0; j < S8; j += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + j));
    float mxa[8];
    _mm256_storeu_ps(mxa, mx8);
    float mx = mxa[0];
    for (int i = 1; i < 8; ++i) mx = mxa[i] > mx ? mxa[i] : mx;
    for (int j = S8; j < S; ++j) mx = s[j] > mx ? s[j] : mx;
    const __m256 mxv = _mm256_set1_ps(mx);
    __m256 sumv = _mm256_setzero_ps();
    for (int j = 0; j < S8; j += 8) {
      __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mxv));
      _mm256_storeu_ps(s + j, e);
      sumv = _mm256_add_ps(sumv, e);
    }
    float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = S8; j < S; ++j) tail[j - S8] = s[j] - mx;
    __m256 et = exp256(_mm256_loadu_ps(tail));
    _mm256_storeu_ps(tail, et);
    float sum = 0.f;
    for (int j = S8; j < S; ++j) { s[j] = tail[j - S8]; sum += tail[j - S8]; }
    float sv[8];
    _mm256_storeu_ps(sv, sumv);
    for (int i = 0; i < 8; ++i) sum += sv[i];
    const float inv = 1.f / sum;
    __m256 o[4][C];  // four independent accumulator sets: FMA latency, not throughput, bounds one chain
    for (int u = 0; u < 4; ++u)
      for (int c = 0; c < C; ++c) o[u][c] = _mm256_setzero_ps();
    const int S4 = S & ~3;
    for (int j = 0; j < S4; j += 4) {
      for (int u = 0; u < 4; ++u) {
        const float* vj = v + (j + u) * vs_s;
        __m256 p = _mm256_set1_ps(s[j + u]);
        for (int c = 0; c < C; ++c) o[u][c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * c), o[u][c]);
      }
    }
    for (int j = S4; j < S; ++j) {
      const float* vj = v + j * vs_s;
      __m256 p = _mm256_set1_ps(s[j]);
      for (int c = 0; c < C; ++c) o[0][c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * c), o[0][c]);
    }
    for (int c = 0; c < C; ++c) o[0][c] = _mm256_add_ps(_mm256_add_ps(o[0][c], o[1][c]), _mm256_add_ps(o[2][c], o[3][c]));
    float* om = out + m * os_m;
    __m256 iv = _mm256_set1_ps(inv);
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(om + 8 * c, _mm256_mul_ps(o[0][c], iv));
  }
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  // q [B,H,M,D], k / v [B,H,S,D], mask [B,1 or H,M,S] additive -> out [B,H,M,D] (contiguous)
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "q, k, v, mask must be 4-d");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              mask.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask.device().is_cpu(), "CPU only");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(), "k, v must be [B,H,S,D]");
  TORCH_CHECK(mask.size(0) == B && (mask.size(1) == 1 || mask.size(1) == H) && mask.size(2) == M && mask.size(3) == S,
              "mask must be [B,1,M,S] or [B,H,M,S]");
  TORCH_CHECK(S >= 1, "need at least one key");
  TORCH_CHECK(D == 16 || D == 32, "head_dim must be 16 or 32 (larger head dims: use SDPA, its GEMMs win there)");
  auto out = torch::empty({B, H, M, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto qs = q.strides(); auto ks = k.strides(); auto vs = v.strides(); auto ms = mask.strides();
  TORCH_CHECK(ms[3] == 1 && qs[3] == 1 && ks[3] == 1 && vs[3] == 1, "last dims must be contiguous");
  const int64_t ms_h = mask.size(1) == 1 ? 0 : ms[1];
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(M * S);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      const float* qb = qp + b * qs[0] + h * qs[1];
      const float* kb = kp + b * ks[0] + h * ks[1];
      const float* vb = vp + b * vs[0] + h * vs[1];
      const float* mb = mp + b * ms[0] + h * ms_h;
      float* ob = op + (b * H + h) * M * D;
#define CASE(DD) case DD: pair_attention<DD>(qb, qs[2], M, kb, ks[2], vb, vs[2], mb, ms[2], S, (float)scale, ob, D, sc.data()); break;
      switch (D) { CASE(16) CASE(32) default: break; }
    }
  });
  return out;
}

// Few-row matmul y = init + x @ w for batch-1 decode and verification steps (x [M,K] with M <= 16, w [K,N]
// row-major, init [N], [1,N], [M,N] or none): such a step streams every weight once, and torch's GEMM reads them
// slowly there (one row: ~2/3 of this CPU's read bandwidth; 2-16 rows: 2-4x the one-row time). Here the weights
// are read once, in order, with a prefetch 1 KB ahead in each row, and every loaded weight vector serves all M
// rows: one row takes 8 weight rows per pass (16 outputs in two registers); more rows take 4 weight rows per pass
// (8 weight registers) and update each row's 16 outputs in turn (y stays in L1/L2).
static void one_row(const float* X, const float* W, float* Y, int64_t K, int64_t N) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 a[8];
    const float* wr[8];
    for (int i = 0; i < 8; ++i) { a[i] = _mm256_set1_ps(X[k + i]); wr[i] = W + (k + i) * N; }
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      __m256 c0 = _mm256_loadu_ps(Y + n), c1 = _mm256_loadu_ps(Y + n + 8);
      for (int i = 0; i < 8; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[i] + n + 256), _MM_HINT_T0);
        c0 = _mm256_fmadd_ps(a[i], _mm256_loadu_ps(wr[i] + n), c0);
        c1 = _mm256_fmadd_ps(a[i], _mm256_loadu_ps(wr[i] + n + 8), c1);
      }
      _mm256_storeu_ps(Y + n, c0);
      _mm256_storeu_ps(Y + n + 8, c1);
    }
    for (; n < N; ++n) {
      float acc = Y[n];
      for (int i = 0; i < 8; ++i) acc += X[k + i] * wr[i][n];
      Y[n] = acc;
    }
  }
  for (; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) Y[n] += X[k] * W[k * N + n];
}

static void few_rows(const float* X, const float* W, float* Y, int64_t M, int64_t K, int64_t N) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const float *w0 = W + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + n + 256), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + n + 256), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w2 + n + 256), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w3 + n + 256), _MM_HINT_T0);
      const __m256 v00 = _mm256_loadu_ps(w0 + n), v01 = _mm256_loadu_ps(w0 + n + 8);
      const __m256 v10 = _mm256_loadu_ps(w1 + n), v11 = _mm256_loadu_ps(w1 + n + 8);
      const __m256 v20 = _mm256_loadu_ps(w2 + n), v21 = _mm256_loadu_ps(w2 + n + 8);
      const __m256 v30 = _mm256_loadu_ps(w3 + n), v31 = _mm256_loadu_ps(w3 + n + 8);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = X + m * K + k;
        float* ym = Y + m * N + n;
        __m256 c0 = _mm256_loadu_ps(ym), c1 = _mm256_loadu_ps(ym + 8);
        __m256 a = _mm256_broadcast_ss(xm);
        c0 = _mm256_fmadd_ps(a, v00, c0); c1 = _mm256_fmadd_ps(a, v01, c1);
        a = _mm256_broadcast_ss(xm + 1);
        c0 = _mm256_fmadd_ps(a, v10, c0); c1 = _mm256_fmadd_ps(a, v11, c1);
        a = _mm256_broadcast_ss(xm + 2);
        c0 = _mm256_fmadd_ps(a, v20, c0); c1 = _mm256_fmadd_ps(a, v21, c1);
        a = _mm256_broadcast_ss(xm + 3);
        c0 = _mm256_fmadd_ps(a, v30, c0); c1 = _mm256_fmadd_ps(a, v31, c1);
        _mm256_storeu_ps(ym, c0);
        _mm256_storeu_ps(ym + 8, c1);
      }
    }
    for (; n < N; ++n)
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = X + m * K + k;
        Y[m * N + n] += xm[0] * w0[n] + xm[1] * w1[n] + xm[2] * w2[n] + xm[3] * w3[n];
      }
  }
  for (; k < K; ++k)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) Y[m * N + n] += X[m * K + k] * W[k * N + n];
}

torch::Tensor small_mm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> init) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0) && x.size(0) >= 1 && x.size(0) <= 16,
              "x [M,K] with 1 <= M <= 16, w [K,N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() && w.device().is_cpu(),
              "float32 CPU tensors only");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = w.size(0), N = w.size(1);
  torch::Tensor y = init.has_value() ? init->to(at::kFloat).expand({M, N}).contiguous().clone()
                                     : torch::zeros({M, N}, w.options());
  if (M == 1)
    one_row(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), K, N);
  else
    few_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, K, N);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention);
  m.def("small_mm", &small_mm, pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("init") = pybind11::none());
}
