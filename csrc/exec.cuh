// kfac_kernels: the block-execution model the kernels are written against.
//
// Every kernel body in csrc/ is a template over an "executor" `Blk` and is written as a
// sequence of *phases*: `blk.for_each(count, f)` runs f(i) for every work item i of the phase,
// `blk.sync()` separates phases, and the collective helpers (`row_reduce`, `sum`, `max_abs`,
// `any`) are the only places where items cooperate. No per-thread state survives a barrier:
// anything a later phase needs lives in shared memory. Two executors implement the model:
//
//   DeviceBlock  - the CUDA thread block: items are strided over threads, `sync` is
//                  __syncthreads, reductions use warp shuffles and a shared scratch area.
//   HostBlock    - a sequential emulation on the CPU: items run one after the other, in
//                  forward or reversed order. Running the same body both ways and demanding
//                  bit-identical results exposes any phase in which one item reads what another
//                  item of the same phase writes (a data race on the GPU).
//
// This is how the kernels are tested on machines without a GPU: the code that runs on the
// device is the code that the host emulation runs (see csrc/emulate.cu).
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define KK_HD __host__ __device__
#define KK_INLINE __forceinline__
#else
#define KK_HD
#define KK_INLINE inline
#endif

namespace kk {

constexpr int kWarp = 32;
// Shared scratch the collective helpers of DeviceBlock need (one double per warp).
constexpr int kScratchBytes = 32 * sizeof(double);

template <class T>
KK_HD KK_INLINE bool is_finite(T x) {
  // No fast-math anywhere in this project, so this is exact: inf - inf and NaN - NaN are NaN.
  return (x == x) && (x - x == T(0));
}

// ---------------------------------------------------------------------------------------------
struct DeviceBlock {
  void* scratch;  // kScratchBytes of shared memory, used by sum() and max_abs()

  template <class F>
  KK_HD KK_INLINE void for_each(int count, F&& f) const {
#if defined(__CUDA_ARCH__)
    for (int i = threadIdx.x; i < count; i += blockDim.x) f(i);
#endif
  }

  KK_HD KK_INLINE void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }

  // For each row r < nrows: done(r, sum_{k in [k0, k1)} term(r, k)) with range(r, k0, k1).
  // One warp per row, lanes stride over k, shuffle reduction; done() runs on lane 0.
  template <class Acc, class Range, class Term, class Done>
  KK_HD KK_INLINE void row_reduce(int nrows, Range&& range, Term&& term, Done&& done) const {
#if defined(__CUDA_ARCH__)
    const int lane = threadIdx.x & (kWarp - 1);
    const int warp = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    for (int r = warp; r < nrows; r += nwarps) {
      int k0, k1;
      range(r, k0, k1);
      Acc s = Acc(0);
      for (int k = k0 + lane; k < k1; k += kWarp) s += term(r, k);
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
      if (lane == 0) done(r, s);
    }
#endif
  }

  // Block-wide OR of pred(i) over all items, each evaluated exactly once (a predicate may store
  // per-item results, which later phases can read: this is also a barrier).
  template <class Pred>
  KK_HD KK_INLINE bool any(int count, Pred&& pred) const {
#if defined(__CUDA_ARCH__)
    int local = 0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) local |= pred(i) ? 1 : 0;
    return __syncthreads_or(local) != 0;
#else
    return false;
#endif
  }

  // Block-wide sum of term(i); every thread gets the same value (summed in the same order).
  template <class Acc, class Term>
  KK_HD KK_INLINE Acc sum(int count, Term&& term) const {
#if defined(__CUDA_ARCH__)
    Acc local = Acc(0);
    for (int i = threadIdx.x; i < count; i += blockDim.x) local += term(i);
    return combine_<Acc>(local, false);
#else
    return Acc(0);
#endif
  }

  // Block-wide max of |term(i)| (0 for no items); NaN items are ignored (checked separately).
  template <class Acc, class Term>
  KK_HD KK_INLINE Acc max_abs(int count, Term&& term) const {
#if defined(__CUDA_ARCH__)
    Acc local = Acc(0);
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const Acc v = fabs(Acc(term(i)));
      local = v > local ? v : local;
    }
    return combine_<Acc>(local, true);
#else
    return Acc(0);
#endif
  }

 private:
  template <class Acc>
  KK_HD KK_INLINE Acc combine_(Acc v, bool is_max) const {
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const Acc o = __shfl_down_sync(0xffffffffu, v, off);
      v = is_max ? (o > v ? o : v) : v + o;
    }
    Acc* s = static_cast<Acc*>(scratch);
    const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
    __syncthreads();  // a previous reduction may still be reading the scratch
    if ((threadIdx.x & (kWarp - 1)) == 0) s[threadIdx.x / kWarp] = v;
    __syncthreads();
    Acc total = s[0];
    for (int w = 1; w < nwarps; ++w) total = is_max ? (s[w] > total ? s[w] : total) : total + s[w];
    return total;
#else
    return v;
#endif
  }
};

// ---------------------------------------------------------------------------------------------
struct HostBlock {
  bool reverse = false;  // run the items of each phase last to first

  template <class F>
  KK_HD void for_each(int count, F&& f) const {
#if !defined(__CUDA_ARCH__)
    if (reverse) {
      for (int i = count - 1; i >= 0; --i) f(i);
    } else {
      for (int i = 0; i < count; ++i) f(i);
    }
#endif
  }

  KK_HD void sync() const {}

  template <class Acc, class Range, class Term, class Done>
  KK_HD void row_reduce(int nrows, Range&& range, Term&& term, Done&& done) const {
#if !defined(__CUDA_ARCH__)
    for_each(nrows, [&](int r) {
      int k0, k1;
      range(r, k0, k1);
      Acc s = Acc(0);
      for (int k = k0; k < k1; ++k) s += term(r, k);
      done(r, s);
    });
#endif
  }

  template <class Pred>
  KK_HD bool any(int count, Pred&& pred) const {
    // Every item is evaluated (predicates may store per-item results), in the phase's order.
    bool r = false;
#if !defined(__CUDA_ARCH__)
    for_each(count, [&](int i) { r = pred(i) || r; });
#endif
    return r;
  }

  template <class Acc, class Term>
  KK_HD Acc sum(int count, Term&& term) const {
    Acc s = Acc(0);
#if !defined(__CUDA_ARCH__)
    for (int i = 0; i < count; ++i) s += term(i);
#endif
    return s;
  }

  template <class Acc, class Term>
  KK_HD Acc max_abs(int count, Term&& term) const {
    Acc m = Acc(0);
#if !defined(__CUDA_ARCH__)
    for (int i = 0; i < count; ++i) {
      const Acc v = std::fabs(Acc(term(i)));
      m = v > m ? v : m;
    }
#endif
    return m;
  }
};

// ---------------------------------------------------------------------------------------------
template <class T, class Blk>
KK_HD void fill_nan(const Blk& blk, T* out, int count) {
  blk.for_each(count, [&](int e) { out[e] = T(NAN); });
}

}  // namespace kk
