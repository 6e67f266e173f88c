// Tile rasterizer for projected 3D Gaussians on the CPU: binning, depth order, front-to-back
// compositing and its hand-written backward. Compositing rules follow 3DGS (Kerbl et al. 2023,
// Sec. 6) as implemented by gsplat: alpha = min(0.999, o * exp(-sigma)) at pixel centres,
// alpha < 1/255 skipped, a pixel stops before the Gaussian that would take T to 1e-4 or below.
//
// Plain C++ with a C interface (no torch headers), so it builds in about a second with any g++ and
// is called through ctypes on tensors' memory. Layout: I images (cameras), N Gaussians per image,
// D channels, all arrays contiguous. Gaussians are visited per tile in depth order; inside a tile
// only the pixels of each Gaussian's own bounding box are touched.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.999;
constexpr double kTransMin = 1e-4;
constexpr double kRadiusSigmas = 3.33;

struct Grid {
  int64_t I, N, width, height, tile, tw, th, TT;
  Grid(int64_t I_, int64_t N_, int64_t w, int64_t h, int64_t t)
      : I(I_), N(N_), width(w), height(h), tile(t), tw((w + t - 1) / t), th((h + t - 1) / t), TT(tw * th) {}
};

// Pixel bounding box (x0, x1, y0, y1 inclusive; x0 > x1 when empty) of the region where alpha can
// reach 1/255: the level set sigma = log(255 o), capped at 3.33 standard deviations as gsplat does.
// Also counts Gaussians per tile into counts[1 + image * TT + tile].
template <typename T>
void bin_count(const T* m, const T* q, const T* o, const uint8_t* valid, const Grid& g, int32_t* bb,
               int64_t* counts, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t k = 0; k < g.I * g.N; ++k) {
    int32_t* b = bb + 4 * k;
    b[0] = 1; b[1] = 0; b[2] = 1; b[3] = 0;
    const double op = static_cast<double>(o[k]);
    if (!valid[k] || !(op * 255.0 >= 1.0)) continue;
    const double a = q[3 * k], bq = q[3 * k + 1], c = q[3 * k + 2];
    const double det = a * c - bq * bq;
    if (!(det > 0.0) || !(a > 0.0)) continue;
    // The conic's inverse is the 2D covariance; its diagonal gives the axis-aligned extent.
    const double ext = std::min(kRadiusSigmas, std::sqrt(2.0 * std::log(std::min(op, 1.0) * 255.0)));
    // Half a pixel of slack keeps the box conservative under rounding.
    const double rx = ext * std::sqrt(c / det) + 0.5, ry = ext * std::sqrt(a / det) + 0.5;
    const double mx = m[2 * k], my = m[2 * k + 1];
    // Pixel centres j + 0.5 inside [mx - rx, mx + rx].
    const double fx0 = std::ceil(mx - rx - 0.5), fx1 = std::floor(mx + rx - 0.5);
    const double fy0 = std::ceil(my - ry - 0.5), fy1 = std::floor(my + ry - 0.5);
    if (!(fx1 >= 0.0) || !(fx0 <= g.width - 1.0) || !(fy1 >= 0.0) || !(fy0 <= g.height - 1.0)) continue;
    b[0] = static_cast<int32_t>(std::max(fx0, 0.0));
    b[1] = static_cast<int32_t>(std::min(fx1, g.width - 1.0));
    b[2] = static_cast<int32_t>(std::max(fy0, 0.0));
    b[3] = static_cast<int32_t>(std::min(fy1, g.height - 1.0));
  }
  for (int64_t k = 0; k < g.I * g.N; ++k) {
    const int32_t* b = bb + 4 * k;
    if (b[0] > b[1]) continue;
    const int64_t base = 1 + (k / g.N) * g.TT;
    for (int32_t ty = b[2] / g.tile; ty <= b[3] / g.tile; ++ty)
      for (int32_t tx = b[0] / g.tile; tx <= b[1] / g.tile; ++tx) counts[base + ty * g.tw + tx] += 1;
  }
  for (int64_t t = 0; t < g.I * g.TT; ++t) counts[t + 1] += counts[t];
}

// Tile lists filled in depth order (ties by index, as gsplat's stable radix sort on (tile, depth)
// leaves them), so no list needs sorting afterwards.
template <typename T>
void bin_fill(const T* depths, const int32_t* bb, const Grid& g, const int64_t* offsets, int32_t* ids,
              int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < g.I; ++i) {
    std::vector<int32_t> order;
    order.reserve(g.N);
    for (int64_t n = 0; n < g.N; ++n)
      if (bb[4 * (i * g.N + n)] <= bb[4 * (i * g.N + n) + 1]) order.push_back(static_cast<int32_t>(n));
    const T* di = depths + i * g.N;
    std::stable_sort(order.begin(), order.end(), [di](int32_t x, int32_t y) { return di[x] < di[y]; });
    std::vector<int64_t> cursor(offsets + i * g.TT, offsets + (i + 1) * g.TT);
    for (int32_t n : order) {
      const int32_t* b = bb + 4 * (i * g.N + n);
      for (int32_t ty = b[2] / g.tile; ty <= b[3] / g.tile; ++ty)
        for (int32_t tx = b[0] / g.tile; tx <= b[1] / g.tile; ++tx) ids[cursor[ty * g.tw + tx]++] = n;
    }
  }
}

template <typename T>
void forward(const T* m, const T* q, const T* col, const T* o, int64_t D, const int32_t* bb,
             const int64_t* off, const int32_t* ids, const Grid& g, T* out, T* T_out, int32_t* stop_out,
             int threads) {
  const T amin = kAlphaMin, amax = kAlphaMax, tmin = kTransMin;
  const int64_t tile = g.tile;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> trans(tile * tile), acc(tile * tile * D);
    std::vector<int32_t> done(tile * tile);
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < g.I * g.TT; ++it) {
      const int64_t i = it / g.TT, t = it % g.TT;
      const int32_t px0 = (t % g.tw) * tile, py0 = (t / g.tw) * tile;
      const int32_t pw = std::min<int64_t>(tile, g.width - px0), ph = std::min<int64_t>(tile, g.height - py0);
      std::fill(trans.begin(), trans.end(), T(1));
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(done.begin(), done.end(), -1);
      int64_t n_done = 0;
      const int64_t start = off[it], count = off[it + 1] - start;
      for (int64_t p = 0; p < count && n_done < int64_t(pw) * ph; ++p) {
        const int64_t k = i * g.N + ids[start + p];
        const int32_t* b = bb + 4 * k;
        const int32_t x0 = std::max(b[0], px0), x1 = std::min(b[1], px0 + pw - 1);
        const int32_t y0 = std::max(b[2], py0), y1 = std::min(b[3], py0 + ph - 1);
        const T mx = m[2 * k], my = m[2 * k + 1];
        const T a = q[3 * k], bq = q[3 * k + 1], c = q[3 * k + 2], op = o[k];
        const T* ck = col + k * D;
        for (int32_t y = y0; y <= y1; ++y) {
          const T dy = my - (T(y) + T(0.5));
          const int32_t row = (y - py0) * tile - px0;
          for (int32_t x = x0; x <= x1; ++x) {
            const int32_t pix = row + x;
            if (done[pix] >= 0) continue;
            const T dx = mx - (T(x) + T(0.5));
            const T sigma = T(0.5) * (a * dx * dx + c * dy * dy) + bq * dx * dy;
            const T alpha = std::min(amax, op * std::exp(-sigma));
            if (sigma < 0 || alpha < amin) continue;
            const T Tn = trans[pix] * (1 - alpha);
            if (Tn <= tmin) {
              done[pix] = static_cast<int32_t>(p);
              ++n_done;
              continue;
            }
            const T w = alpha * trans[pix];
            T* ap = acc.data() + pix * D;
            for (int64_t d = 0; d < D; ++d) ap[d] += w * ck[d];
            trans[pix] = Tn;
          }
        }
      }
      for (int32_t y = 0; y < ph; ++y) {
        for (int32_t x = 0; x < pw; ++x) {
          const int32_t pix = y * tile + x;
          const int64_t o_pix = (i * g.height + py0 + y) * g.width + px0 + x;
          T_out[o_pix] = trans[pix];
          stop_out[o_pix] = done[pix] >= 0 ? done[pix] : static_cast<int32_t>(count);
          for (int64_t d = 0; d < D; ++d) out[o_pix * D + d] = acc[pix * D + d];
        }
      }
    }
  }
}

// Back to front per pixel, rebuilding T_i = T_{i+1} / (1 - alpha_i) from the final transmittance.
// Per-Gaussian gradient rows [mean x, mean y, conic a, b, c, opacity, colour 0..D-1] accumulate in
// one buffer per thread ([threads, I * N, 6 + D]); the caller sums them.
template <typename T>
void backward(const T* m, const T* q, const T* col, const T* o, int64_t D, const int32_t* bb,
              const int64_t* off, const int32_t* ids, const T* T_fin, const int32_t* stp, const T* vC,
              const T* vA, const Grid& g, T* grads, int threads) {
  const T amin = kAlphaMin, amax = kAlphaMax;
  const int64_t tile = g.tile, G = 6 + D;
#pragma omp parallel num_threads(threads)
  {
    T* gbuf = grads + static_cast<int64_t>(omp_get_thread_num()) * g.I * g.N * G;
    const int64_t P = tile * tile;
    std::vector<T> trans(P), S(P), tA(P), vCp(P * D), gl(G);
    std::vector<int32_t> st(P);
    // Static round-robin tiles: each tile's sums land in the same thread's buffer on every run, so
    // the gradients are bitwise reproducible for a fixed thread count.
#pragma omp for schedule(static, 1)
    for (int64_t it = 0; it < g.I * g.TT; ++it) {
      const int64_t i = it / g.TT, t = it % g.TT;
      const int32_t px0 = (t % g.tw) * tile, py0 = (t / g.tw) * tile;
      const int32_t pw = std::min<int64_t>(tile, g.width - px0), ph = std::min<int64_t>(tile, g.height - py0);
      int32_t max_stop = 0;
      std::fill(st.begin(), st.end(), 0);
      for (int32_t y = 0; y < ph; ++y) {
        for (int32_t x = 0; x < pw; ++x) {
          const int32_t pix = y * tile + x;
          const int64_t o_pix = (i * g.height + py0 + y) * g.width + px0 + x;
          trans[pix] = T_fin[o_pix];
          S[pix] = 0;
          // d(alpha_out)/d(alpha_i) = T_final / (1 - alpha_i): the numerator is shared.
          tA[pix] = T_fin[o_pix] * vA[o_pix];
          st[pix] = stp[o_pix];
          max_stop = std::max(max_stop, st[pix]);
          for (int64_t d = 0; d < D; ++d) vCp[pix * D + d] = vC[o_pix * D + d];
        }
      }
      const int64_t start = off[it];
      for (int64_t p = max_stop - 1; p >= 0; --p) {
        const int64_t k = i * g.N + ids[start + p];
        const int32_t* b = bb + 4 * k;
        const int32_t x0 = std::max(b[0], px0), x1 = std::min(b[1], px0 + pw - 1);
        const int32_t y0 = std::max(b[2], py0), y1 = std::min(b[3], py0 + ph - 1);
        const T mx = m[2 * k], my = m[2 * k + 1];
        const T a = q[3 * k], bq = q[3 * k + 1], c = q[3 * k + 2], op = o[k];
        const T* ck = col + k * D;
        std::fill(gl.begin(), gl.end(), T(0));
        bool touched = false;
        for (int32_t y = y0; y <= y1; ++y) {
          const T dy = my - (T(y) + T(0.5));
          const int32_t row = (y - py0) * tile - px0;
          for (int32_t x = x0; x <= x1; ++x) {
            const int32_t pix = row + x;
            if (p >= st[pix]) continue;
            const T dx = mx - (T(x) + T(0.5));
            const T sigma = T(0.5) * (a * dx * dx + c * dy * dy) + bq * dx * dy;
            const T g_exp = std::exp(-sigma);
            const T alpha = std::min(amax, op * g_exp);
            if (sigma < 0 || alpha < amin) continue;
            touched = true;
            const T ra = 1 / (1 - alpha);
            const T Ti = trans[pix] * ra;  // transmittance in front of this Gaussian
            const T w = alpha * Ti;
            const T* vp = vCp.data() + pix * D;
            T cdot = 0;
            for (int64_t d = 0; d < D; ++d) {
              gl[6 + d] += w * vp[d];
              cdot += ck[d] * vp[d];
            }
            // d(colour)/d(alpha_i) = c_i T_i - (what lies behind) / (1 - alpha_i).
            const T v_a = cdot * Ti - (S[pix] - tA[pix]) * ra;
            S[pix] += cdot * w;
            trans[pix] = Ti;
            if (op * g_exp <= amax) {  // the clamp at 0.999 passes no gradient
              const T v_sigma = -v_a * alpha;
              gl[5] += v_a * g_exp;
              gl[0] += v_sigma * (a * dx + bq * dy);
              gl[1] += v_sigma * (bq * dx + c * dy);
              gl[2] += T(0.5) * v_sigma * dx * dx;
              gl[3] += v_sigma * dx * dy;
              gl[4] += T(0.5) * v_sigma * dy * dy;
            }
          }
        }
        if (touched) {
          T* dst = gbuf + k * G;
          for (int64_t j = 0; j < G; ++j) dst[j] += gl[j];
        }
      }
    }
  }
}

}  // namespace

#define AVATAR_GS_EXPORT(T, SUFFIX)                                                                       \
  extern "C" void gs_bin_count_##SUFFIX(const T* m, const T* q, const T* o, const uint8_t* valid,         \
                                        int64_t I, int64_t N, int64_t w, int64_t h, int64_t tile,         \
                                        int32_t* bbox, int64_t* counts, int threads) {                    \
    bin_count<T>(m, q, o, valid, Grid(I, N, w, h, tile), bbox, counts, threads);                          \
  }                                                                                                       \
  extern "C" void gs_bin_fill_##SUFFIX(const T* depths, const int32_t* bbox, int64_t I, int64_t N,        \
                                       int64_t w, int64_t h, int64_t tile, const int64_t* offsets,        \
                                       int32_t* ids, int threads) {                                       \
    bin_fill<T>(depths, bbox, Grid(I, N, w, h, tile), offsets, ids, threads);                             \
  }                                                                                                       \
  extern "C" void gs_forward_##SUFFIX(const T* m, const T* q, const T* col, const T* o, int64_t D,        \
                                      const int32_t* bbox, const int64_t* off, const int32_t* ids,        \
                                      int64_t I, int64_t N, int64_t w, int64_t h, int64_t tile, T* out,   \
                                      T* trans, int32_t* stop, int threads) {                             \
    forward<T>(m, q, col, o, D, bbox, off, ids, Grid(I, N, w, h, tile), out, trans, stop, threads);       \
  }                                                                                                       \
  extern "C" void gs_backward_##SUFFIX(const T* m, const T* q, const T* col, const T* o, int64_t D,       \
                                       const int32_t* bbox, const int64_t* off, const int32_t* ids,       \
                                       const T* trans, const int32_t* stop, const T* v_render,            \
                                       const T* v_alpha, int64_t I, int64_t N, int64_t w, int64_t h,      \
                                       int64_t tile, T* grads, int threads) {                             \
    backward<T>(m, q, col, o, D, bbox, off, ids, trans, stop, v_render, v_alpha, Grid(I, N, w, h, tile),  \
                grads, threads);                                                                          \
  }

AVATAR_GS_EXPORT(float, f32)
AVATAR_GS_EXPORT(double, f64)
