// kfac_kernels: batched damped Cholesky inverse, (F_b + gamma_b I)^{-1} for a stack of symmetric
// matrices. Algorithm bodies only (written against exec.cuh); kernels and launchers are in
// cholesky.cu, the host emulation in emulate.cu.
//
// Two variants, same mathematics:
//
//  * "smem": one thread block per matrix, the whole matrix in shared memory (n up to ~240 fp32
//    on an H100). Left-looking Cholesky, column by column: every entry of column j is one dot
//    product over the columns left of it, accumulated in Acc (fp64 by default) by one warp and
//    rounded once. Then the triangular inverse W = L^{-1} in place (LAPACK trti2 order, right to
//    left), then (F + gamma I)^{-1} = W^T W written straight to global memory.
//
//  * "blocked": any n. 32 x 32 tiles in global memory, one launch per step, grid = tiles x batch:
//    right-looking blocked Cholesky (factor the diagonal tile with the smem routines above and
//    invert it; panel update L_ik = A_ik W_kk^T; trailing update A_ij -= L_ik L_jk^T), then the
//    blocked inverse W = L^{-1} by tile diagonals (W_ij = -W_ii sum_p L_ip W_pj, all tiles at one
//    distance from the diagonal in one launch), then W^T W. Tile products accumulate in Acc.
//
// info[b] = 0 on success, k > 0 when the leading k x k minor of F_b + gamma_b I is not positive
// definite (or not finite); the inverse of such a matrix is all NaN, never garbage.
// The lower triangle of F is what is read (as LAPACK's potrf with uplo = L).
#pragma once

#include "exec.cuh"

namespace kk {

template <class T>
struct InverseParams {
  const T* F;          // input stack, row stride f_stride_r, batch stride f_stride_b, unit columns
  int64_t f_stride_b;
  int64_t f_stride_r;
  T* out;              // [B, n, n] contiguous: the inverses
  T* work;             // [B, n, n] contiguous workspace (blocked variant only)
  int* info;           // [B]
  const T* gamma;      // per-matrix damping (may be null: gamma_scalar is used)
  int64_t gamma_stride;
  T gamma_scalar;
  int n;
};

// Odd leading dimension: a warp walking down a column hits 32 different banks.
KK_HD KK_INLINE int smem_ld(int n) { return n | 1; }

template <class T, class Acc>
KK_HD KK_INLINE size_t inverse_smem_bytes(int n) {
  return 2 * size_t(n) * sizeof(Acc) + size_t(n) * smem_ld(n) * sizeof(T);
}

template <class T>
KK_HD KK_INLINE T damping_of(const InverseParams<T>& p, int64_t b) {
  return p.gamma ? p.gamma[b * p.gamma_stride] : p.gamma_scalar;
}

// ------------------------------------------------------------------ shared-memory building blocks
// In-place left-looking Cholesky of the lower triangle of A (n x n, leading dimension ld).
// Returns 0, or j + 1 when the pivot of column j is not positive and finite (block-uniform).
template <class T, class Acc, class Blk>
KK_HD int chol_lower_inplace(const Blk& blk, T* A, int ld, int n, Acc* tmp) {
  for (int j = 0; j < n; ++j) {
    // tmp[r] = A[j+r][j] - sum_{k<j} L[j+r][k] L[j][k], rows j..n-1
    blk.template row_reduce<Acc>(
        n - j, [&](int, int& k0, int& k1) { k0 = 0; k1 = j; },
        [&](int r, int k) { return Acc(A[(j + r) * ld + k]) * Acc(A[j * ld + k]); },
        [&](int r, Acc s) { tmp[r] = Acc(A[(j + r) * ld + j]) - s; });
    blk.sync();
    const Acc d = tmp[0];
    if (!(d > Acc(0)) || !is_finite(d)) return j + 1;
    const Acc ljj = sqrt(d);
    const Acc inv = Acc(1) / ljj;
    blk.for_each(n - j, [&](int r) { A[(j + r) * ld + j] = T(r == 0 ? ljj : tmp[r] * inv); });
    blk.sync();
  }
  return 0;
}

// In-place inverse of a lower-triangular L (n x n, leading dimension ld): W = L^{-1}.
// Column j (right to left): W_jj = 1 / L_jj, W_ij = -W_jj sum_{k=j+1}^{i} W_ik L_kj.
template <class T, class Acc, class Blk>
KK_HD void trtri_lower_inplace(const Blk& blk, T* A, int ld, int n, Acc* tmp, Acc* dinv) {
  blk.for_each(n, [&](int i) { dinv[i] = Acc(1) / Acc(A[i * ld + i]); });
  blk.sync();
  for (int j = n - 1; j >= 0; --j) {
    blk.template row_reduce<Acc>(
        n - 1 - j, [&](int r, int& k0, int& k1) { k0 = j + 1; k1 = j + 2 + r; },
        [&](int r, int k) { return Acc(A[(j + 1 + r) * ld + k]) * Acc(A[k * ld + j]); },
        [&](int r, Acc s) { tmp[r] = s; });
    blk.sync();
    const Acc w = dinv[j];
    blk.for_each(n - j, [&](int r) { A[(j + r) * ld + j] = T(r == 0 ? w : -w * tmp[r - 1]); });
    blk.sync();
  }
}

// out = W^T W for the lower-triangular W in shared memory; out is n x n, contiguous. Every entry
// is computed on its own (same products, same order for (r, c) and (c, r)): exactly symmetric.
template <class T, class Acc, class Blk>
KK_HD void lauum_lower_to(const Blk& blk, const T* W, int ld, int n, T* out) {
  blk.for_each(n * n, [&](int e) {
    const int r = e / n, c = e - r * n;
    Acc s = Acc(0);
    for (int k = r > c ? r : c; k < n; ++k) s += Acc(W[k * ld + r]) * Acc(W[k * ld + c]);
    out[e] = T(s);
  });
}

// ------------------------------------------------------------------ variant "smem": one block / matrix
template <class T, class Acc, class Blk>
KK_HD void inverse_smem_body(const Blk& blk, int64_t b, const InverseParams<T>& p,
                             unsigned char* smem) {
  const int n = p.n, ld = smem_ld(n);
  Acc* tmp = reinterpret_cast<Acc*>(smem);
  Acc* dinv = tmp + n;
  T* A = reinterpret_cast<T*>(dinv + n);
  const T* F = p.F + b * p.f_stride_b;
  T* out = p.out + b * int64_t(n) * n;
  const T g = damping_of(p, b);
  blk.for_each(n * n, [&](int e) {
    const int r = e / n, c = e - r * n;
    const T v = F[r * p.f_stride_r + c];
    A[r * ld + c] = r == c ? v + g : v;
  });
  blk.sync();
  const int info = chol_lower_inplace<T, Acc>(blk, A, ld, n, tmp);
  if (info != 0) {
    fill_nan(blk, out, n * n);
    blk.for_each(1, [&](int) { p.info[b] = info; });
    return;
  }
  trtri_lower_inplace<T, Acc>(blk, A, ld, n, tmp, dinv);
  lauum_lower_to<T, Acc>(blk, A, ld, n, out);
  blk.for_each(1, [&](int) { p.info[b] = 0; });
}

// ------------------------------------------------------------------ variant "blocked": tiles
constexpr int kTile = 32;
constexpr int kTileLd = kTile + 1;
constexpr int kTileThreads = 256;  // 16 x 16 items, each 2 x 2 outputs {r, r+16} x {c, c+16}

KK_HD KK_INLINE int num_tiles(int n) { return (n + kTile - 1) / kTile; }

template <class T, class Acc>
KK_HD KK_INLINE size_t blocked_smem_bytes() {
  // one Acc tile (accumulators) + two T tiles; potrf uses one T tile and 2 x kTile Acc
  return size_t(kTile) * kTileLd * sizeof(Acc) + 2 * size_t(kTile) * kTileLd * sizeof(T);
}

// Copy tile (row0, col0) of the n x n contiguous matrix M into s (kTile x kTileLd), zero-padded.
template <class T, class Blk>
KK_HD void load_tile(const Blk& blk, T* s, const T* M, int n, int row0, int col0) {
  blk.for_each(kTile * kTile, [&](int e) {
    const int r = e / kTile, c = e - r * kTile;
    const int gr = row0 + r, gc = col0 + c;
    s[r * kTileLd + c] = (gr < n && gc < n) ? M[int64_t(gr) * n + gc] : T(0);
  });
}

// For every output (r, c) of a kTile x kTile tile: out(r, c, sum_{m<kdim} x(r, m) y(c, m)).
template <class Acc, class Blk, class X, class Y, class Out>
KK_HD void tile_product(const Blk& blk, int kdim, X&& x, Y&& y, Out&& out) {
  blk.for_each(kTileThreads, [&](int e) {
    const int r = e / 16, c = e - r * 16;
    Acc a00 = Acc(0), a01 = Acc(0), a10 = Acc(0), a11 = Acc(0);
    for (int m = 0; m < kdim; ++m) {
      const Acc x0 = x(r, m), x1 = x(r + 16, m), y0 = y(c, m), y1 = y(c + 16, m);
      a00 += x0 * y0;
      a01 += x0 * y1;
      a10 += x1 * y0;
      a11 += x1 * y1;
    }
    out(r, c, a00);
    out(r, c + 16, a01);
    out(r + 16, c, a10);
    out(r + 16, c + 16, a11);
  });
}

template <class T>
KK_HD KK_INLINE bool in_matrix(int n, int tr, int tc, int r, int c) {
  return tr * kTile + r < n && tc * kTile + c < n;
}

template <class T>
KK_HD KK_INLINE int64_t tile_index(int n, int tr, int tc, int r, int c) {
  return int64_t(tr * kTile + r) * n + (tc * kTile + c);
}

// out <- F + gamma I for tile t of matrix b (all nt x nt tiles); info <- 0.
template <class T, class Blk>
KK_HD void blocked_init_body(const Blk& blk, int64_t b, int t, const InverseParams<T>& p) {
  const int n = p.n, nt = num_tiles(n);
  const int tr = t / nt, tc = t - tr * nt;
  const T* F = p.F + b * p.f_stride_b;
  T* out = p.out + b * int64_t(n) * n;
  const T g = damping_of(p, b);
  blk.for_each(kTile * kTile, [&](int e) {
    const int r = e / kTile, c = e - r * kTile;
    if (!in_matrix<T>(n, tr, tc, r, c)) return;
    const int gr = tr * kTile + r, gc = tc * kTile + c;
    const T v = F[gr * p.f_stride_r + gc];
    out[int64_t(gr) * n + gc] = gr == gc ? v + g : v;
  });
  if (t == 0) blk.for_each(1, [&](int) { p.info[b] = 0; });
}

// Step k: factor diagonal tile k (L_kk into out), invert it (W_kk into work, zeros above).
template <class T, class Acc, class Blk>
KK_HD void blocked_potrf_body(const Blk& blk, int64_t b, int k, const InverseParams<T>& p,
                              unsigned char* smem) {
  if (p.info[b] != 0) return;
  const int n = p.n, nv = n - k * kTile < kTile ? n - k * kTile : kTile;
  Acc* tmp = reinterpret_cast<Acc*>(smem);
  Acc* dinv = tmp + kTile;
  T* D = reinterpret_cast<T*>(dinv + kTile);
  T* out = p.out + b * int64_t(n) * n;
  T* work = p.work + b * int64_t(n) * n;
  load_tile(blk, D, out, n, k * kTile, k * kTile);
  blk.sync();
  const int c = chol_lower_inplace<T, Acc>(blk, D, kTileLd, nv, tmp);
  if (c != 0) {
    blk.for_each(1, [&](int) { p.info[b] = k * kTile + c; });
    return;
  }
  blk.for_each(nv * nv, [&](int e) {
    const int r = e / nv, cc = e - r * nv;
    if (r >= cc) out[tile_index<T>(n, k, k, r, cc)] = D[r * kTileLd + cc];
  });
  blk.sync();
  trtri_lower_inplace<T, Acc>(blk, D, kTileLd, nv, tmp, dinv);
  blk.for_each(nv * nv, [&](int e) {
    const int r = e / nv, cc = e - r * nv;
    work[tile_index<T>(n, k, k, r, cc)] = r >= cc ? D[r * kTileLd + cc] : T(0);
  });
}

// Step k, tile i = k + 1 + t: L_ik = A_ik W_kk^T.
template <class T, class Acc, class Blk>
KK_HD void blocked_trsm_body(const Blk& blk, int64_t b, int k, int t, const InverseParams<T>& p,
                             unsigned char* smem) {
  if (p.info[b] != 0) return;
  const int n = p.n, i = k + 1 + t;
  T* X = reinterpret_cast<T*>(smem);
  T* Y = X + kTile * kTileLd;
  T* out = p.out + b * int64_t(n) * n;
  const T* work = p.work + b * int64_t(n) * n;
  load_tile(blk, X, out, n, i * kTile, k * kTile);
  load_tile(blk, Y, work, n, k * kTile, k * kTile);
  blk.sync();
  tile_product<Acc>(
      blk, kTile, [&](int r, int m) { return Acc(X[r * kTileLd + m]); },
      [&](int c, int m) { return Acc(Y[c * kTileLd + m]); },
      [&](int r, int c, Acc v) {
        if (in_matrix<T>(n, i, k, r, c)) out[tile_index<T>(n, i, k, r, c)] = T(v);
      });
}

// Step k, trailing tile (i, j), k < j <= i, numbered t = a (a + 1) / 2 + c' with i = k+1+a,
// j = k+1+c': A_ij -= L_ik L_jk^T.
template <class T, class Acc, class Blk>
KK_HD void blocked_syrk_body(const Blk& blk, int64_t b, int k, int t, const InverseParams<T>& p,
                             unsigned char* smem) {
  if (p.info[b] != 0) return;
  int a = int((sqrt(8.0 * t + 1.0) - 1.0) / 2.0);
  while (a * (a + 1) / 2 > t) --a;
  while ((a + 1) * (a + 2) / 2 <= t) ++a;
  const int n = p.n, i = k + 1 + a, j = k + 1 + (t - a * (a + 1) / 2);
  T* X = reinterpret_cast<T*>(smem);
  T* Y = X + kTile * kTileLd;
  T* out = p.out + b * int64_t(n) * n;
  load_tile(blk, X, out, n, i * kTile, k * kTile);
  load_tile(blk, Y, out, n, j * kTile, k * kTile);
  blk.sync();
  tile_product<Acc>(
      blk, kTile, [&](int r, int m) { return Acc(X[r * kTileLd + m]); },
      [&](int c, int m) { return Acc(Y[c * kTileLd + m]); },
      [&](int r, int c, Acc v) {
        if (!in_matrix<T>(n, i, j, r, c)) return;
        T& dst = out[tile_index<T>(n, i, j, r, c)];
        dst = T(Acc(dst) - v);
      });
}

// Inverse, distance d: tile (i, j) = (t + d, t): W_ij = -W_ii sum_{p=j}^{i-1} L_ip W_pj.
template <class T, class Acc, class Blk>
KK_HD void blocked_trtri_body(const Blk& blk, int64_t b, int d, int t, const InverseParams<T>& p,
                              unsigned char* smem) {
  if (p.info[b] != 0) return;
  const int n = p.n, j = t, i = t + d;
  Acc* S = reinterpret_cast<Acc*>(smem);
  T* X = reinterpret_cast<T*>(S + kTile * kTileLd);
  T* Y = X + kTile * kTileLd;
  const T* L = p.out + b * int64_t(n) * n;
  T* work = p.work + b * int64_t(n) * n;
  blk.for_each(kTile * kTileLd, [&](int e) { S[e] = Acc(0); });
  for (int q = j; q < i; ++q) {
    blk.sync();
    load_tile(blk, X, L, n, i * kTile, q * kTile);
    load_tile(blk, Y, work, n, q * kTile, j * kTile);
    blk.sync();
    tile_product<Acc>(
        blk, kTile, [&](int r, int m) { return Acc(X[r * kTileLd + m]); },
        [&](int c, int m) { return Acc(Y[m * kTileLd + c]); },
        [&](int r, int c, Acc v) { S[r * kTileLd + c] += v; });
  }
  blk.sync();
  load_tile(blk, X, work, n, i * kTile, i * kTile);
  blk.sync();
  tile_product<Acc>(
      blk, kTile, [&](int r, int m) { return Acc(X[r * kTileLd + m]); },
      [&](int c, int m) { return S[m * kTileLd + c]; },
      [&](int r, int c, Acc v) {
        if (in_matrix<T>(n, i, j, r, c)) work[tile_index<T>(n, i, j, r, c)] = T(-v);
      });
}

// Inverse tile (r, c) of W^T W: sum_{k >= max(r, c)} W_kr^T W_kc; NaN where info != 0.
template <class T, class Acc, class Blk>
KK_HD void blocked_lauum_body(const Blk& blk, int64_t b, int t, const InverseParams<T>& p,
                              unsigned char* smem) {
  const int n = p.n, nt = num_tiles(n);
  const int tr = t / nt, tc = t - tr * nt;
  T* out = p.out + b * int64_t(n) * n;
  if (p.info[b] != 0) {
    blk.for_each(kTile * kTile, [&](int e) {
      const int r = e / kTile, c = e - r * kTile;
      if (in_matrix<T>(n, tr, tc, r, c)) out[tile_index<T>(n, tr, tc, r, c)] = T(NAN);
    });
    return;
  }
  Acc* S = reinterpret_cast<Acc*>(smem);
  T* X = reinterpret_cast<T*>(S + kTile * kTileLd);
  T* Y = X + kTile * kTileLd;
  const T* work = p.work + b * int64_t(n) * n;
  blk.for_each(kTile * kTileLd, [&](int e) { S[e] = Acc(0); });
  for (int k = tr > tc ? tr : tc; k < nt; ++k) {
    blk.sync();
    load_tile(blk, X, work, n, k * kTile, tr * kTile);
    load_tile(blk, Y, work, n, k * kTile, tc * kTile);
    blk.sync();
    tile_product<Acc>(
        blk, kTile, [&](int r, int m) { return Acc(X[m * kTileLd + r]); },
        [&](int c, int m) { return Acc(Y[m * kTileLd + c]); },
        [&](int r, int c, Acc v) { S[r * kTileLd + c] += v; });
  }
  blk.sync();
  blk.for_each(kTile * kTile, [&](int e) {
    const int r = e / kTile, c = e - r * kTile;
    if (in_matrix<T>(n, tr, tc, r, c)) out[tile_index<T>(n, tr, tc, r, c)] = T(S[r * kTileLd + c]);
  });
}

// The launch sequence of the blocked variant, shared by the device launcher and the emulator.
// `ex` provides init(grid), potrf(k), trsm(k, grid), syrk(k, grid), trtri(d, grid), lauum(grid).
template <class Exec>
void blocked_sequence(int n, Exec& ex) {
  const int nt = num_tiles(n);
  ex.init(nt * nt);
  for (int k = 0; k < nt; ++k) {
    ex.potrf(k);
    const int m = nt - k - 1;
    if (m > 0) {
      ex.trsm(k, m);
      ex.syrk(k, m * (m + 1) / 2);
    }
  }
  for (int d = 1; d < nt; ++d) ex.trtri(d, nt - d);
  ex.lauum(nt * nt);
}

}  // namespace kk
