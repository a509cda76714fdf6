// kfac_kernels: batched two-sided Jacobi eigensolver for symmetric matrices, one thread block per
// matrix, matrix and eigenvectors in shared memory. Algorithm body only (written against
// exec.cuh); the kernel and its launcher are in jacobi.cu, the host emulation in emulate.cu.
//
// Ordering: parallel round-robin ("circle method"). The matrix is padded to even order m with a
// zero row/column when n is odd; a sweep is m - 1 rounds, and round r pairs index m - 1 with r and
// (r + k) mod (m - 1) with (r - k) mod (m - 1) for k = 1 .. m/2 - 1, so every pair (p < q) is met
// exactly once per sweep and the m/2 rotations of a round touch disjoint rows and columns.
//
// Per round: (1) every pair computes its rotation from the current 2 x 2 block (in fp64):
// rotate iff |a_pq| > max(tol * sqrt(|a_pp|) * sqrt(|a_qq|), eps(T) * ||A||_F); (2) the block
// rotation A <- J^T A J is applied as independent 2 x 2 updates, one per (pair, pair) block, with
// the annihilated a_pq set to exactly 0 and the new diagonal taken from step (1), and V <- V J.
// A round without any rotation costs one barrier; a sweep without any rotation ends the
// iteration (converged). After max_sweeps sweeps a final check decides convergence.
//
// Warm start: with previous eigenvectors Q0, A <- Q0^T F Q0 (fp64 dot products, symmetrised) and
// V <- Q0, so the result is Q0 J: a nearly diagonal A converges in one or two sweeps.
//
// Output: eigenvalues ascending (stable order), eigenvector columns permuted to match;
// info[b] = 0 converged, 1 not converged within max_sweeps, 2 non-finite input. Failed matrices
// get NaN eigenvalues and eigenvectors. sweeps[b] (optional) = sweeps that rotated something.
#pragma once

#include <cfloat>

#include "exec.cuh"

namespace kk {

enum JacobiInfo : int { kJacobiOk = 0, kJacobiNotConverged = 1, kJacobiNonFinite = 2 };

template <class T>
struct EighParams {
  const T* F;          // input stack: row stride f_stride_r, batch stride f_stride_b, unit columns
  int64_t f_stride_b;
  int64_t f_stride_r;
  const T* Q0;         // optional warm start (may be null), same layout rules
  int64_t q_stride_b;
  int64_t q_stride_r;
  T* evals;            // [B, n] contiguous
  T* evecs;            // [B, n, n] contiguous, eigenvectors in columns
  int* info;           // [B]
  int* sweeps;         // [B] or null
  int n;
  double tol;
  int max_sweeps;
};

template <class T> KK_HD KK_INLINE double unit_roundoff();
template <> KK_HD KK_INLINE double unit_roundoff<float>() { return double(FLT_EPSILON); }
template <> KK_HD KK_INLINE double unit_roundoff<double>() { return DBL_EPSILON; }

// Shared-memory layout of one block (offsets in bytes, all 8-byte aligned).
struct JacobiLayout {
  int n, m, h;
  size_t off_cs, off_sn, off_dpp, off_dqq, off_flag, off_pidx, off_qidx, off_perm, off_A, off_V;
  size_t bytes;
  template <class T>
  KK_HD static JacobiLayout make(int n) {
    JacobiLayout L;
    L.n = n;
    L.m = n + (n & 1);
    L.h = L.m / 2;
    size_t o = kScratchBytes;
    auto take = [&](size_t nbytes) { size_t at = o; o += (nbytes + 7) / 8 * 8; return at; };
    L.off_cs = take(L.h * sizeof(double));
    L.off_sn = take(L.h * sizeof(double));
    L.off_dpp = take(L.h * sizeof(double));
    L.off_dqq = take(L.h * sizeof(double));
    L.off_flag = take(L.h * sizeof(int));
    L.off_pidx = take(L.h * sizeof(int));
    L.off_qidx = take(L.h * sizeof(int));
    L.off_perm = take(size_t(n) * sizeof(int));
    L.off_A = take(size_t(L.m) * L.m * sizeof(T));
    L.off_V = take(size_t(L.m) * L.m * sizeof(T));
    L.bytes = o;
    return L;
  }
};

// Pair k of round r (0 <= r < m - 1, 0 <= k < m / 2), returned with p < q.
KK_HD KK_INLINE void jacobi_pair(int round, int k, int m, int& p, int& q) {
  const int mm = m - 1;
  int a, b;
  if (k == 0) {
    a = round;
    b = mm;
  } else {
    a = (round + k) % mm;
    b = (round - k + mm) % mm;
  }
  p = a < b ? a : b;
  q = a < b ? b : a;
}

KK_HD KK_INLINE double jacobi_threshold(double app, double aqq, double tol, double floor_) {
  const double t = tol * sqrt(fabs(app)) * sqrt(fabs(aqq));
  return t > floor_ ? t : floor_;
}

// Rotation annihilating a_pq (Rutishauser's formulas): c, s and t = tan(angle).
KK_HD KK_INLINE void jacobi_rotation(double app, double aqq, double apq, double& c, double& s,
                                     double& t) {
  const double theta = (aqq - app) / (2.0 * apq);
  const double at = fabs(theta);
  t = at > 1e150 ? 0.5 / theta : (theta >= 0.0 ? 1.0 : -1.0) / (at + sqrt(1.0 + theta * theta));
  c = 1.0 / sqrt(1.0 + t * t);
  s = t * c;
}

template <class T, class Blk>
KK_HD void jacobi_body(const Blk& blk, int64_t b, const EighParams<T>& p, unsigned char* smem) {
  const int n = p.n;
  const JacobiLayout L = JacobiLayout::make<T>(n);
  const int m = L.m, h = L.h;
  double* cs = reinterpret_cast<double*>(smem + L.off_cs);
  double* sn = reinterpret_cast<double*>(smem + L.off_sn);
  double* dpp = reinterpret_cast<double*>(smem + L.off_dpp);
  double* dqq = reinterpret_cast<double*>(smem + L.off_dqq);
  int* flag = reinterpret_cast<int*>(smem + L.off_flag);
  int* pidx = reinterpret_cast<int*>(smem + L.off_pidx);  // the round's pairs, computed once
  int* qidx = reinterpret_cast<int*>(smem + L.off_qidx);
  int* perm = reinterpret_cast<int*>(smem + L.off_perm);
  T* A = reinterpret_cast<T*>(smem + L.off_A);
  T* V = reinterpret_cast<T*>(smem + L.off_V);
  const T* F = p.F + b * p.f_stride_b;
  const T* Q0 = p.Q0 ? p.Q0 + b * p.q_stride_b : nullptr;
  const int64_t qs = p.q_stride_r;
  T* evals = p.evals + b * n;
  T* evecs = p.evecs + b * int64_t(n) * n;

  blk.for_each(m * m, [&](int e) {
    const int r = e / m, c = e - r * m;
    A[e] = (r < n && c < n) ? F[r * p.f_stride_r + c] : T(0);
  });
  blk.sync();
  if (Q0 != nullptr) {
    blk.for_each(n * n, [&](int e) {  // V <- F Q0
      const int r = e / n, c = e - r * n;
      double s = 0.0;
      for (int k = 0; k < n; ++k) s += double(A[r * m + k]) * double(Q0[k * qs + c]);
      V[r * m + c] = T(s);
    });
    blk.sync();
    blk.for_each(n * n, [&](int e) {  // A <- Q0^T (F Q0)
      const int r = e / n, c = e - r * n;
      double s = 0.0;
      for (int k = 0; k < n; ++k) s += double(Q0[k * qs + r]) * double(V[k * m + c]);
      A[r * m + c] = T(s);
    });
    blk.sync();
    blk.for_each(n * n, [&](int e) {  // symmetrise: item (r < c) owns both entries
      const int r = e / n, c = e - r * n;
      if (r < c) {
        const T a = T(0.5) * (A[r * m + c] + A[c * m + r]);
        A[r * m + c] = a;
        A[c * m + r] = a;
      }
    });
    blk.for_each(m * m, [&](int e) {
      const int r = e / m, c = e - r * m;
      V[e] = (r < n && c < n) ? Q0[r * qs + c] : T(r == c ? 1 : 0);
    });
  } else {
    blk.for_each(m * m, [&](int e) {
      const int r = e / m, c = e - r * m;
      V[e] = T(r == c ? 1 : 0);
    });
  }
  blk.sync();
  const bool bad = blk.any(m * m, [&](int e) { return !is_finite(A[e]) || !is_finite(V[e]); });
  int info = kJacobiOk;
  int sweeps = 0;
  if (bad) {
    info = kJacobiNonFinite;
  } else {
    const double amax = blk.template max_abs<double>(m * m, [&](int e) { return double(A[e]); });
    double normf = 0.0;
    if (amax > 0.0) {
      normf = amax * sqrt(blk.template sum<double>(m * m, [&](int e) {
        const double v = double(A[e]) / amax;
        return v * v;
      }));
    }
    const double floor_ = unit_roundoff<T>() * normf;
    const double tol = p.tol;
    bool converged = false;
    for (int sweep = 0; sweep < p.max_sweeps && !converged; ++sweep) {
      bool rotated = false;
      for (int round = 0; round < m - 1; ++round) {
        // (1) rotation parameters of the round's pairs (stored per pair; any() is the barrier)
        const bool any_rot = blk.any(h, [&](int k) {
          int pp, qq;
          jacobi_pair(round, k, m, pp, qq);
          const double app = A[pp * m + pp], aqq = A[qq * m + qq], apq = A[pp * m + qq];
          const bool rot = fabs(apq) > jacobi_threshold(app, aqq, tol, floor_);
          double c = 1.0, s = 0.0, t = 0.0;
          if (rot) jacobi_rotation(app, aqq, apq, c, s, t);
          cs[k] = c;
          sn[k] = s;
          dpp[k] = app - t * apq;
          dqq[k] = aqq + t * apq;
          flag[k] = rot ? 1 : 0;
          pidx[k] = pp;
          qidx[k] = qq;
          return rot;
        });
        if (!any_rot) continue;
        rotated = true;
        // (2) A <- J^T A J, one item per 2 x 2 block (pair P rows, pair Q columns)
        blk.for_each(h * h, [&](int e) {
          const int P = e / h, Q = e - P * h;
          if (!flag[P] && !flag[Q]) return;
          const int p1 = pidx[P], q1 = qidx[P];
          if (P == Q) {
            A[p1 * m + p1] = T(dpp[P]);
            A[q1 * m + q1] = T(dqq[P]);
            A[p1 * m + q1] = T(0);
            A[q1 * m + p1] = T(0);
            return;
          }
          const int p2 = pidx[Q], q2 = qidx[Q];
          const T c1 = T(cs[P]), s1 = T(sn[P]), c2 = T(cs[Q]), s2 = T(sn[Q]);
          const T x11 = A[p1 * m + p2], x12 = A[p1 * m + q2];
          const T x21 = A[q1 * m + p2], x22 = A[q1 * m + q2];
          const T y11 = c1 * x11 - s1 * x21, y12 = c1 * x12 - s1 * x22;
          const T y21 = s1 * x11 + c1 * x21, y22 = s1 * x12 + c1 * x22;
          A[p1 * m + p2] = c2 * y11 - s2 * y12;
          A[p1 * m + q2] = s2 * y11 + c2 * y12;
          A[q1 * m + p2] = c2 * y21 - s2 * y22;
          A[q1 * m + q2] = s2 * y21 + c2 * y22;
        });
        // V <- V J, one item per (row, pair)
        blk.for_each(n * h, [&](int e) {
          const int i = e / h, P = e - i * h;
          if (!flag[P]) return;
          const int pp = pidx[P], qq = qidx[P];
          const T c = T(cs[P]), s = T(sn[P]);
          const T v1 = V[i * m + pp], v2 = V[i * m + qq];
          V[i * m + pp] = c * v1 - s * v2;
          V[i * m + qq] = s * v1 + c * v2;
        });
        blk.sync();
      }
      if (rotated) {
        ++sweeps;
      } else {
        converged = true;
      }
    }
    if (!converged) {  // sweep limit reached: converged iff no pair is above its threshold
      converged = !blk.any(n * n, [&](int e) {
        const int r = e / n, c = e - r * n;
        if (r >= c) return false;
        return fabs(double(A[r * m + c])) >
               jacobi_threshold(A[r * m + r], A[c * m + c], tol, floor_);
      });
    }
    info = converged ? kJacobiOk : kJacobiNotConverged;
  }
  if (info != kJacobiOk) {
    fill_nan(blk, evals, n);
    fill_nan(blk, evecs, n * n);
  } else {
    // stable ascending order: perm[rank(i)] = i
    blk.for_each(n, [&](int i) {
      const T di = A[i * m + i];
      int rank = 0;
      for (int j = 0; j < n; ++j) {
        const T dj = A[j * m + j];
        rank += (dj < di || (dj == di && j < i)) ? 1 : 0;
      }
      perm[rank] = i;
    });
    blk.sync();
    blk.for_each(n, [&](int j) { evals[j] = A[perm[j] * m + perm[j]]; });
    blk.for_each(n * n, [&](int e) {
      const int r = e / n, j = e - r * n;
      evecs[e] = V[r * m + perm[j]];
    });
  }
  blk.for_each(1, [&](int) {
    p.info[b] = info;
    if (p.sweeps) p.sweeps[b] = sweeps;
  });
}

}  // namespace kk
