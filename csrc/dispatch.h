// kfac_kernels: compile-time switches. A runtime code is turned into template arguments once, at
// the API boundary, so that the kernels themselves carry no branches on dtype or accumulation.
#pragma once

#include "api.h"
#include "cholesky.cuh"
#include "jacobi.cuh"

// Runs the lambda __VA_ARGS__ with `T` (element type) and `Acc` (accumulation type) defined:
// float64 -> (double, double); float32 -> (float, double) when FP64ACC, else (float, float).
#define KK_FLOAT_ACC_SWITCH(DTYPE, FP64ACC, ...) \
  [&] {                                          \
    if ((DTYPE) == ::kk::kFloat64) {             \
      using T = double;                          \
      using Acc = double;                        \
      return __VA_ARGS__();                      \
    }                                            \
    if (FP64ACC) {                               \
      using T = float;                           \
      using Acc = double;                        \
      return __VA_ARGS__();                      \
    }                                            \
    using T = float;                             \
    using Acc = float;                           \
    return __VA_ARGS__();                        \
  }()

// Runs the lambda __VA_ARGS__ with `T` defined from a dtype code.
#define KK_FLOAT_SWITCH(DTYPE, ...)  \
  [&] {                              \
    if ((DTYPE) == ::kk::kFloat64) { \
      using T = double;              \
      return __VA_ARGS__();          \
    }                                \
    using T = float;                 \
    return __VA_ARGS__();            \
  }()

namespace kk {

template <class T>
inline InverseParams<T> make_inverse_params(const InverseCall& c) {
  InverseParams<T> p;
  p.F = reinterpret_cast<const T*>(c.F);
  p.f_stride_b = c.f_stride_b;
  p.f_stride_r = c.f_stride_r;
  p.out = reinterpret_cast<T*>(c.out);
  p.work = reinterpret_cast<T*>(c.work);
  p.info = reinterpret_cast<int*>(c.info);
  p.gamma = reinterpret_cast<const T*>(c.gamma);
  p.gamma_stride = c.gamma_stride;
  p.gamma_scalar = T(c.gamma_scalar);
  p.n = int(c.n);
  return p;
}

template <class T>
inline EighParams<T> make_eigh_params(const EighCall& c) {
  EighParams<T> p;
  p.F = reinterpret_cast<const T*>(c.F);
  p.f_stride_b = c.f_stride_b;
  p.f_stride_r = c.f_stride_r;
  p.Q0 = reinterpret_cast<const T*>(c.Q0);
  p.q_stride_b = c.q_stride_b;
  p.q_stride_r = c.q_stride_r;
  p.evals = reinterpret_cast<T*>(c.evals);
  p.evecs = reinterpret_cast<T*>(c.evecs);
  p.info = reinterpret_cast<int*>(c.info);
  p.sweeps = reinterpret_cast<int*>(c.sweeps);
  p.n = int(c.n);
  p.tol = c.tol;
  p.max_sweeps = int(c.max_sweeps);
  return p;
}

}  // namespace kk
