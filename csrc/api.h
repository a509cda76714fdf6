// kfac_kernels: the host API of the compiled kernels (no Python, no torch).
//
// Everything crosses this boundary as plain integers: device pointers, element strides, sizes,
// dtype codes, the device index and the CUDA stream. Every entry point checks its arguments
// first (check_*), throwing std::invalid_argument with a message naming the argument, before it
// touches a device; launch errors throw std::runtime_error. Launches are asynchronous on the
// given stream and never synchronise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kk {

enum DTypeCode : int { kFloat32 = 0, kFloat64 = 1 };
enum InverseVariant : int { kVariantSmem = 0, kVariantBlocked = 1 };

// (F_b + gamma_b I)^{-1} by Cholesky for b < batch. F: [batch] x n x n with row stride f_stride_r
// (>= n) and batch stride f_stride_b (0 to reuse one matrix, else the matrices must not overlap),
// unit column stride; only its lower triangle is read. out: contiguous [batch, n, n]. work:
// contiguous [batch, n, n] scratch, required by the blocked variant (may be 0 for smem). info:
// int32 [batch]. gamma: per-matrix damping of F's dtype with stride gamma_stride (0 or 1), or 0 to
// use gamma_scalar (>= 0) for every matrix.
struct InverseCall {
  int64_t F = 0, f_stride_b = 0, f_stride_r = 0;
  int64_t out = 0, work = 0, info = 0;
  int64_t gamma = 0, gamma_stride = 0;
  double gamma_scalar = 0.0;
  int64_t batch = 0, n = 0;
  int64_t dtype = kFloat32, variant = kVariantSmem;
  bool fp64_accumulate = true;  // fp32 input: fp64 dot products (fp64 input: always)
  int64_t device = 0, stream = 0;
};

// Jacobi eigendecomposition: eigenvalues ascending into evals [batch, n], eigenvectors (columns,
// matching order) into evecs [batch, n, n], info int32 [batch] (0 converged, 1 not converged in
// max_sweeps, 2 non-finite input; failed matrices are NaN), sweeps int32 [batch] or 0. Q0: optional
// previous eigenvectors (same layout rules as F) to start from.
struct EighCall {
  int64_t F = 0, f_stride_b = 0, f_stride_r = 0;
  int64_t Q0 = 0, q_stride_b = 0, q_stride_r = 0;
  int64_t evals = 0, evecs = 0, info = 0, sweeps = 0;
  int64_t batch = 0, n = 0;
  int64_t dtype = kFloat32;
  double tol = 0.0;
  int64_t max_sweeps = 0;
  int64_t device = 0, stream = 0;
};

void check_inverse_call(const InverseCall& c);
void check_eigh_call(const EighCall& c);

// Shared memory one block needs (bytes); 0 where a variant has no per-matrix limit.
size_t smem_bytes_inverse(int64_t dtype, bool fp64_accumulate, int64_t n, int64_t variant);
size_t smem_bytes_jacobi(int64_t dtype, int64_t n);

// Device side (cholesky.cu, jacobi.cu, device.cu): check, then launch on (device, stream).
void launch_damped_inverse(const InverseCall& c);
void launch_jacobi_eigh(const EighCall& c);
int64_t device_smem_per_block_optin(int64_t device);  // queries the device (initialises CUDA)
// Largest n the one-block-per-matrix kernels take on this device (queries the device).
int64_t max_n_inverse_smem(int64_t dtype, bool fp64_accumulate, int64_t device);
int64_t max_n_jacobi(int64_t dtype, int64_t device);
std::string cuda_build_info();  // compile-time facts only; touches no device

// Host emulation (emulate.cpp): the same kernel bodies, run sequentially on host memory;
// `reverse` runs the work items of every phase in reverse order (see exec.cuh).
void emulate_damped_inverse(const InverseCall& c, bool reverse);
void emulate_jacobi_eigh(const EighCall& c, bool reverse);

}  // namespace kk
